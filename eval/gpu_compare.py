"""The plugin inside real vLLM against vLLM's own TP and PCP, in the same run on the same GPUs.

    python eval/gpu_compare.py drive --n 2 --out DIR [--configs native-tp,plugin-rr,...]
    python eval/gpu_compare.py drive --cpu-dry-run --out DIR        # plumbing check on CPU
    python eval/gpu_compare.py drive --n 2 --out DIR --phases warmup,ttft,profile   # + a prefill profile
    python eval/gpu_compare.py drive --n 2 --out DIR --phases warmup,decode,profile_decode   # + decode steps
    python eval/gpu_compare.py worker --spec FILE                   # one configuration (drive starts it)

Each configuration runs in its own process (vLLM's process-wide state never leaks between
them) under a per-configuration timeout and a total budget. The worker writes its results
after every measurement, and the driver rewrites compare_<gpu>_n<N>.json / .md (and .png)
after every configuration, so a run that is cut off still leaves what it measured.
The optional ``profile`` phase (``--phases ...,profile`` or ``--profile``; always run last)
traces one single-prompt prefill of ``--profile-length`` tokens with vLLM's torch profiler
into DIR/profiles/<run>/ (one trace per rank) and adds eval/profile_summary.py's tables;
``profile_decode`` traces ``DECODE_PROFILE_STEPS`` decode steps of the largest decode batch
into the same folder (trace prefix ``decode<B>``; summarize with
``profile_summary.py --trace-prefix decode``).
Commands, columns and caveats: eval/compare_notes.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

EVAL_DIR = Path(__file__).resolve().parent
K = 1024

# name -> how the configuration differs from the common engine arguments.
# parallel "tp": tensor_parallel_size=N; "pcp": tensor_parallel_size=1,
# prefill_context_parallel_size=N (vLLM's PCP adds ranks, so N GPUs means TP 1 x PCP N).
_DEEPGEMM = {"kernels": "vllm-deepgemm", "indexer_cache": "fp8"}
# The CP split on every batch of >= N tokens, not the split policy's auto choice (the default).
_SPLIT = {"decode_attention": "split", "min_tokens_for_cp": 0}
CONFIGS = {
    "native-tp": {"plugin": False, "parallel": "tp"},
    "native-pcp": {"plugin": False, "parallel": "pcp"},
    "plugin-rr": {"plugin": True, "parallel": "tp", "cp_nsa": {"mode": "round-robin-split", **_SPLIT}},
    "plugin-inseq": {"plugin": True, "parallel": "tp", "cp_nsa": {"mode": "in-seq-split", **_SPLIT}},
    # Attention unsplit on every rank: separates the plugin's kernels from its CP split.
    "plugin-off": {"plugin": True, "parallel": "tp", "cp_nsa": {"mode": "off"}},
    # Prefill and mixed batches eager (FULL graphs for uniform decode only), as every batch the
    # CP split runs at N > 1 (graph_sizing.piecewise_graph_decision): at -tp 1 beside plugin-off
    # it prices what the split batches do without piecewise CUDA graphs.
    "plugin-off-decodegraphs": {"plugin": True, "parallel": "tp", "cp_nsa": {"mode": "off"},
                                "cudagraph_mode": "FULL_DECODE_ONLY"},
    # the plugin's indexer chunked by its logits bound before 2026-12-04 (256 MiB; default now
    # vLLM's 512: kernels/budgets.py), for the A/B behind that change
    "plugin-off-logits256": {"plugin": True, "parallel": "tp", "cp_nsa": {"mode": "off"},
                             "env": {"VLLM_SPARSE_INDEXER_MAX_LOGITS_MB": "256"}},
    # -dg: vLLM's DeepGEMM prefill indexer on the plugin's CP rows, over an fp8 indexer cache
    # as native vLLM keeps it (kernels "vllm-deepgemm", indexer_cache "fp8"; see README).
    "plugin-rr-dg": {"plugin": True, "parallel": "tp", "cp_nsa": {"mode": "round-robin-split", **_SPLIT, **_DEEPGEMM}},
    "plugin-inseq-dg": {"plugin": True, "parallel": "tp", "cp_nsa": {"mode": "in-seq-split", **_SPLIT, **_DEEPGEMM}},
    "plugin-off-dg": {"plugin": True, "parallel": "tp", "cp_nsa": {"mode": "off", **_DEEPGEMM}},
    # -tpdec: decode / verify batches unsplit, attention heads split over the ranks
    # (decode_attention "tp", SGLang's --enable-cp-decode-attn-tp); prefill as plugin-rr-dg.
    "plugin-rr-dg-tpdec": {"plugin": True, "parallel": "tp",
                           "cp_nsa": {"mode": "round-robin-split", **_SPLIT, "decode_attention": "tp", **_DEEPGEMM}},
    # --preset release: the accuracy reference, vLLM's own model on the checkpoint's weights
    # dequantized to bf16 ("model": "bf16", make_tiny_model --dequantize-from), bf16 KV, no MTP,
    # agreement only; with it in the report every other run's agreement is measured against it.
    "native-bf16ref": {"plugin": False, "parallel": "tp", "model": "bf16", "kv_dtypes": ["auto"], "mtp": False,
                       "phases": ["warmup", "agreement"]},
    # The plugin's own model on the same bf16 copy (its fp8-vs-bf16 gap; the reference on CPU,
    # where vLLM refuses its own V3.2).
    "plugin-off-bf16": {"plugin": True, "parallel": "tp", "cp_nsa": {"mode": "off"}, "model": "bf16",
                        "kv_dtypes": ["auto"], "mtp": False, "phases": ["warmup", "agreement"]},
    # Step aside: the plugin installed (on the path) without cp_nsa in additional_config, so on
    # CUDA vLLM's own model should run; and the same with VLLM_PLUGINS="" (no plugin loaded).
    "stepaside": {"plugin": True, "parallel": "tp"},
    "stepaside-noplugins": {"plugin": True, "parallel": "tp", "env": {"VLLM_PLUGINS": ""}},
    # SGLang on the same checkpoint and workloads (its own staged stack: --sglang-path): TP, and
    # its DeepSeek-V3.2 prefill CP (round-robin = "interleave"; attn_cp_size resolves to tp_size).
    "sglang-tp": {"plugin": False, "parallel": "tp", "engine": "sglang"},
    "sglang-cp": {"plugin": False, "parallel": "tp", "engine": "sglang",
                  "sglang": {"enable_prefill_cp": True, "cp_strategy": "interleave"}},
}
# Phases the SGLang worker has no equivalent for (vLLM's engine.step loop, vLLM's profiler).
SGLANG_UNSUPPORTED_PHASES = ("busy", "profile", "profile_decode")
DEFAULT_CONFIGS = "native-tp,plugin-rr,plugin-inseq,native-pcp"
DRY_RUN_CONFIGS = "native-tp,native-pcp,plugin-rr,plugin-inseq"
# untimed full-length decode runs of each batch size before its timed reps
DECODE_WARMUP_REPS = 2

PHASES = ["warmup", "agreement", "ttft", "batches", "busy", "decode"]
# Agreement reference when the report has it (any kv / MTP variant is measured against it).
BF16_REFERENCES = ["native-bf16ref", "plugin-off-bf16"]
# Plugin log lines kept per run (the startup line says whether the plugin serves the model).
PLUGIN_LOG_LINES = 4
# Not in the default list. "profile" always runs last in its worker: vLLM creates the torch
# profiler only at the first start_profile, so the phases before it run without one.
OPTIONAL_PHASES = ["profile", "profile_decode"]
PROFILE_LENGTH, DRY_RUN_PROFILE_LENGTH = 16 * K, 256
# profile_decode: engine steps skipped after the start (the batch's prefill), steps traced
DECODE_PROFILE_DELAY_STEPS, DECODE_PROFILE_STEPS = 2, 8
# vLLM 0.32 ProfilerConfig for the profile phase (torch_profiler_dir is added per run). No Python
# stacks (large traces, host overhead); no key_averages table on stop (the summary is ours).
PROFILER_CONFIG = {"profiler": "torch", "torch_profiler_with_stack": False,
                   "torch_profiler_record_shapes": False, "torch_profiler_dump_cuda_time_total": False}
CAPTURE_SIZES = [1, 2, 4, 8, 16]
MTP_CONFIG = {"method": "mtp", "num_speculative_tokens": 1}
# Every report's JSON is also kept here (outside --out, which a device call empties), so a later
# call with --append adds its runs to the same tables.
KEEP_DIR = Path("/tmp/gpu_compare_reports")
# Seconds of the budget kept back for writing the report.
REPORT_RESERVE_S = 10

# Prompt lengths in tokens; every prompt is random token ids, seeded by what it is for.
GPU_WORKLOAD = {
    "batches": [[8, 1 * K], [4, 4 * K]],
    "busy": {"decoding": 8, "decoding_length": 1 * K, "new": 4, "new_length": 4 * K},
    "decode": {"batch_sizes": [1, 8], "length": 1 * K, "tokens": 128},
    # One greedy / logprob prompt longer than index_topk (2048), so sparse selection matters.
    "greedy": {"lengths": [128, 1 * K, 3 * K], "tokens": 32},
    "logprobs": {"lengths": [1 * K, 3 * K]},
    "warmup_length": 1 * K,
}
DRY_RUN_WORKLOAD = {  # the tiny model's index_topk is 64
    "batches": [[4, 64], [2, 256]],
    "busy": {"decoding": 4, "decoding_length": 64, "new": 2, "new_length": 256},
    "decode": {"batch_sizes": [1, 4], "length": 64, "tokens": 16},
    "greedy": {"lengths": [32, 100, 200], "tokens": 8},
    "logprobs": {"lengths": [100, 200]},
    "warmup_length": 64,
}
# --trained-model: agreement on the trained tiny model (eval/trained_tiny), whose greedy answers
# are right or wrong, over generations long enough to diverge (the random checkpoints' near-flat
# distributions flip greedy tokens on bf16 noise). Held-out problems of each synthetic task.
TRAINED_PROBLEMS_PER_TASK, TRAINED_TOKENS = 8, 64


# host_probe: iterations of its Python loop, tiny CUDA ops it launches back to back
PROBE_LOOP_ITERATIONS, PROBE_CUDA_OPS = 20_000, 100


def host_probe() -> dict:
    """How fast this host runs the engine's thread right now, by fixed work timed in it: a
    Python loop (us) and tiny CUDA ops launched back to back (us per op: dispatch + launch,
    what a host-bound step is made of), the CPU it ran on and the 1-minute load. Taken before
    every timed sample: one engine's 1K TTFT ran 1.5-2.5x another's for the same work on shared
    hosts (H200, 12-04..06), and the probe tells a slower host from a slower engine."""
    start = time.perf_counter()
    total = 0
    for i in range(PROBE_LOOP_ITERATIONS):
        total += i * i
    python_us = (time.perf_counter() - start) * 1e6
    launch_us = None
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            x = torch.zeros(1, device="cuda")
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(PROBE_CUDA_OPS):
                x.add_(1)
            torch.cuda.synchronize()
            launch_us = (time.perf_counter() - start) * 1e6 / PROBE_CUDA_OPS
    except Exception:  # the probe never fails a measurement
        launch_us = None
    return {"python_us": round(python_us, 1), "launch_us": None if launch_us is None else round(launch_us, 2),
            "cpu": current_cpu(), "load1": round(os.getloadavg()[0], 2)}


def current_cpu() -> int | None:
    """The CPU this thread last ran on (/proc/self/stat field 39), None where unreadable."""
    try:
        stat = Path("/proc/thread-self/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[36])
    except (OSError, ValueError, IndexError):
        return None


def probe_medians(probes: list[dict]) -> dict:
    """Median Python-loop time, per-op launch time and 1-minute load of ``probes``, the CPUs they
    ran on."""
    def median(key):
        values = [p[key] for p in probes if p.get(key) is not None]
        return statistics.median(values) if values else None

    return {"python_us": median("python_us"), "launch_us": median("launch_us"), "load1": median("load1"),
            "cpus": sorted({p["cpu"] for p in probes if p.get("cpu") is not None}), "samples": len(probes)}


def machine_id(gpus: int) -> dict:
    """Which machine a report ran on: the kernel's boot id and the GPUs' UUIDs (two device calls
    on one warm machine share both; a fresh start does not), so reports are pooled only when they
    come from one machine (``parity_table.py --pool``)."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = None
    return {"boot_id": boot_id, "gpu_uuids": [row[0] for row in nvidia_smi("uuid")][:gpus]}


def length_label(tokens: int) -> str:
    return f"{tokens // K}K" if tokens >= K and tokens % K == 0 else str(tokens)


def profile_shape_label(prompts: int, length: int) -> str:
    """``16K`` for one prompt, ``8x1K`` for eight: the profiled batch (and its traces' prefix)."""
    return length_label(length) if prompts == 1 else f"{prompts}x{length_label(length)}"


def parse_length(text: str) -> int:
    text = text.strip().upper()
    return int(text[:-1]) * K if text.endswith("K") else int(text)


# ----------------------------------------------------------------------------- worker


def random_prompt(tag: str, length: int, low: int, high: int) -> list[int]:
    """Token ids in [low, high), the same for every configuration (seeded by ``tag``);
    distinct tags give distinct prompts, so nothing is ever served from a cache."""
    rng = random.Random(tag)
    return [rng.randrange(low, high) for _ in range(length)]


class GpuMemoryPoller:
    """Peak of nvidia-smi's memory.used per GPU while the worker runs (a background
    thread: vLLM's memory lives in its worker processes, out of this one's reach)."""

    def __init__(self, num_gpus: int, period_s: float = 0.5):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = [int(x) for x in visible.split(",") if x.strip().isdigit()] if visible else list(range(num_gpus))
        self.indices = ids[:num_gpus]
        self.peak_mib: dict[int, int] = {}
        self.total_mib: dict[int, int] = {}
        self.period_s = period_s
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> bool:
        try:
            text = subprocess.run(
                ["nvidia-smi", "--query-gpu=index,memory.used,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return False
        for line in text.strip().splitlines():
            index, used, total = (int(v) for v in line.split(","))
            if index in self.indices:
                self.peak_mib[index] = max(self.peak_mib.get(index, 0), used)
                self.total_mib[index] = total
        return True

    def _run(self) -> None:
        while not self.stopped.is_set() and self._sample():
            self.stopped.wait(self.period_s)

    def start(self) -> None:
        self.thread.start()

    def summary(self) -> dict:
        return {"nvidia_smi_peak_mib": self.peak_mib, "nvidia_smi_total_mib": self.total_mib}


def _rank_info(worker) -> dict:
    """Runs on every rank after startup: what really serves the model there; resets the
    torch peak so the end-of-run peak is the measurements' own."""
    import torch

    model = worker.get_model()
    runner = worker.model_runner
    info = {
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "attention_impls": sorted({type(m.impl).__name__ for m in model.modules() if hasattr(m, "impl")}),
        "model_runner": f"{type(runner).__module__}.{type(runner).__qualname__}",
        "cudagraph_mode": str(worker.vllm_config.compilation_config.cudagraph_mode),
        "weights_bytes": getattr(runner, "model_memory_usage", None),
    }
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        info["allocated_bytes"] = torch.cuda.memory_allocated()
    return info


def _rank_peak(worker) -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    return {"peak_bytes": torch.cuda.max_memory_allocated(), "allocated_bytes": torch.cuda.memory_allocated()}


class Worker:
    """One configuration: start the engine once, then every measurement in order."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.workload = spec["workload"]
        self.deadline = spec["deadline"]
        self.result_path = Path(spec["result_path"])
        self.progress_path = Path(spec["progress_path"])
        self.result = {"name": spec["name"], "status": "starting", "error": None, "llm_kwargs": spec["llm"],
                       "uses_plugin": spec["uses_plugin"], "phase_s": {}, "ttft": {}, "decode": {},
                       "skipped": [], "errors": {}}
        self.llm = None
        self.low = self.high = 0

    def save(self) -> None:
        tmp = self.result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result) + "\n")
        os.replace(tmp, self.result_path)

    def progress(self, text: str) -> None:
        with open(self.progress_path, "a") as f:
            f.write(f"[{self.spec['name']}] {text}\n")

    def prompt(self, tag: str, length: int) -> list[int]:
        return random_prompt(tag, length, self.low, self.high)

    def generate(self, prompts: list[list[int]], **sampling) -> tuple[float, list]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(temperature=0.0, **sampling)
        start = time.perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - start, outputs

    def run(self) -> None:
        poller = GpuMemoryPoller(self.spec["num_gpus"])
        poller.start()
        self.save()
        start = time.perf_counter()
        try:
            self.startup()
        except Exception:
            self.result.update(status="failed", error=traceback.format_exc()[-3000:])
            self.result["phase_s"]["startup"] = round(time.perf_counter() - start, 2)
            self.progress(f"startup FAILED after {self.result['phase_s']['startup']:.1f}s")
            self.save()
            os._exit(1)
        self.result["phase_s"]["startup"] = round(time.perf_counter() - start, 2)
        self.progress(f"startup {self.result['phase_s']['startup']:.1f}s")
        self.result["status"] = "running"
        self.save()
        for phase in self.spec["phases"]:
            if time.time() > self.deadline:
                self.result["skipped"].append(phase)
                self.progress(f"{phase} skipped (deadline)")
                continue
            start = time.perf_counter()
            try:
                getattr(self, f"phase_{phase}")()
            except Exception:
                self.result["errors"][phase] = traceback.format_exc()[-3000:]
                self.progress(f"{phase} FAILED: {traceback.format_exc().strip().splitlines()[-1][:300]}")
            self.result["phase_s"][phase] = round(time.perf_counter() - start, 2)
            self.progress(f"{phase} {self.result['phase_s'][phase]:.1f}s")
            self.save()
        try:
            self.result["memory"] = {**poller.summary(), "ranks": self.rank_peaks()}
        except Exception:
            self.result["errors"]["memory"] = traceback.format_exc()[-3000:]
        self.result["status"] = "partial" if self.result["skipped"] or self.result["errors"] else "ok"
        self.save()
        self.progress(f"done: {self.result['status']}")
        os._exit(0)  # skip vLLM's slow interpreter-shutdown hooks; the driver reaps the workers

    def rank_peaks(self) -> list:
        return self.llm.collective_rpc(_rank_peak)

    def startup(self) -> None:
        import torch
        import vllm
        from make_tiny_model import SPECIAL_TOKENS  # eval/ is this script's directory
        from vllm import LLM

        self.result["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__,
                                   "cuda": torch.version.cuda, "python": sys.version.split()[0]}
        self.llm = LLM(**self.spec["llm"])
        self.low, self.high = len(SPECIAL_TOKENS), len(self.llm.get_tokenizer())
        config = self.llm.llm_engine.vllm_config
        blocks = config.cache_config.num_gpu_blocks
        self.result["info"] = {
            "ranks": self.llm.collective_rpc(_rank_info),
            "kv_cache_dtype": config.cache_config.cache_dtype,
            "block_size": config.cache_config.block_size,
            "kv_capacity_tokens": blocks * config.cache_config.block_size if blocks else None,
            "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
            "cudagraph_capture_sizes": list(config.compilation_config.cudagraph_capture_sizes or []),
        }

    def phase_warmup(self) -> None:
        self.generate([self.prompt("warmup", self.workload["warmup_length"])], max_tokens=8, ignore_eos=True)

    def phase_agreement(self) -> None:
        greedy = self.workload["greedy"]
        prompts = greedy.get("prompts") or [self.prompt(f"greedy:{n}", n) for n in greedy["lengths"]]
        _, outputs = self.generate(prompts, max_tokens=greedy["tokens"], ignore_eos=True)
        self.result["greedy"] = {"lengths": greedy["lengths"],
                                 "tokens": [list(o.outputs[0].token_ids) for o in outputs]}
        lengths = self.workload["logprobs"]["lengths"]
        prompts = self.workload["logprobs"].get("prompts") or [self.prompt(f"logprobs:{n}", n) for n in lengths]
        _, outputs = self.generate(prompts, max_tokens=1, prompt_logprobs=0)
        self.result["prompt_logprobs"] = {"lengths": lengths, "logprobs": [
            [None if entry is None else round(entry[token].logprob, 5)
             for entry, token in zip(o.prompt_logprobs, o.prompt_token_ids)] for o in outputs]}

    def _timed_ttft(self, label: str, kind: str, count: int, length: int) -> None:
        """Warm-up of the same shape, then ``reps`` timed generates of fresh prompts."""
        self.generate([self.prompt(f"{label}:warmup:{i}", length) for i in range(count)], max_tokens=1)
        times, probes = [], []
        for rep in range(self.spec["reps"]):
            probes.append(host_probe())
            seconds, _ = self.generate([self.prompt(f"{label}:{rep}:{i}", length) for i in range(count)],
                                       max_tokens=1)
            times.append(seconds)
        self.result["ttft"][label] = {"kind": kind, "requests": count, "prompt_tokens": length,
                                      "times_s": [round(t, 5) for t in times],
                                      "median_s": round(statistics.median(times), 5), "host_probe": probes}
        self.progress(f"  ttft {label}: median {statistics.median(times) * 1e3:.1f} ms")
        self.save()

    def phase_ttft(self) -> None:
        for length in self.spec["ttft_lengths"]:
            if time.time() > self.deadline:
                self.result["skipped"].append(f"ttft {length_label(length)}")
                continue
            self._timed_ttft(length_label(length), "single", 1, length)

    def phase_batches(self) -> None:
        for count, length in self.workload["batches"]:
            self._timed_ttft(f"{count}x{length_label(length)}", "batch", count, length)

    def _busy_once(self, tag: str) -> tuple[float, int]:
        """Seconds (and engine steps) from adding the new requests while the decoding ones
        run until every new one has its first token."""
        from vllm import SamplingParams, TokensPrompt

        busy = self.workload["busy"]
        engine = self.llm.llm_engine
        decode_params = SamplingParams(temperature=0.0, ignore_eos=True,
                                       max_tokens=self.spec["llm"]["max_model_len"] - busy["decoding_length"])
        decoding = [f"{tag}:decoding:{i}" for i in range(busy["decoding"])]
        for request_id in decoding:
            engine.add_request(request_id, TokensPrompt(prompt_token_ids=self.prompt(request_id,
                                                                                     busy["decoding_length"])),
                               decode_params)
        produced = dict.fromkeys(decoding, 0)
        while min(produced.values()) < 2:  # every decoding request past its prefill
            for out in engine.step():
                produced[out.request_id] = len(out.outputs[0].token_ids)
        new = [f"{tag}:new:{i}" for i in range(busy["new"])]
        start = time.perf_counter()
        for request_id in new:
            engine.add_request(request_id, TokensPrompt(prompt_token_ids=self.prompt(request_id, busy["new_length"])),
                               SamplingParams(temperature=0.0, max_tokens=1))
        pending, steps = set(new), 0
        while pending:
            steps += 1
            for out in engine.step():
                if out.request_id in pending and out.outputs[0].token_ids:
                    pending.discard(out.request_id)
        seconds = time.perf_counter() - start
        engine.abort_request(decoding)
        while engine.has_unfinished_requests():
            engine.step()
        return seconds, steps

    def phase_busy(self) -> None:
        busy = self.workload["busy"]
        label = f"{busy['new']}x{length_label(busy['new_length'])} + {busy['decoding']} decoding"
        self._busy_once("busy:warmup")
        runs = [self._busy_once(f"busy:{rep}") for rep in range(self.spec["reps"])]
        times = [seconds for seconds, _ in runs]
        self.result["ttft"][label] = {"kind": "busy", "requests": busy["new"], "prompt_tokens": busy["new_length"],
                                      "decoding": busy["decoding"], "steps": [steps for _, steps in runs],
                                      "times_s": [round(t, 5) for t in times],
                                      "median_s": round(statistics.median(times), 5)}
        self.progress(f"  ttft {label}: median {statistics.median(times) * 1e3:.1f} ms")

    def _profiled_generate(self, warmup_prompts, prompts, max_tokens: int, prefix: str, **window):
        """An unprofiled generate of ``warmup_prompts`` (Triton JIT / autotuning of new shapes
        stays out of the trace), then ``prompts`` under vLLM's torch profiler (``LLM(profiler_config=
        ...)``, ``start_profile(prefix, **window)`` / ``stop_profile``). Every rank writes
        ``<prefix>_dp.._tp<T>_.._rank<R>.<ns>.pt.trace.json.gz`` into the run's profile folder when
        the profiler stops. Returns (unprofiled s, profiled s, the new files there)."""
        folder = Path(self.spec["profile"]["dir"])
        before = {p for p in folder.rglob("*")} if folder.exists() else set()
        unprofiled_s, _ = self.generate(warmup_prompts, max_tokens=max_tokens, ignore_eos=True)
        self.llm.start_profile(profile_prefix=prefix, **window)
        try:
            profiled_s, _ = self.generate(prompts, max_tokens=max_tokens, ignore_eos=True)
        finally:
            self.llm.stop_profile()  # a no-op if max_iterations already stopped it
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                       if p.is_file() and p not in before) if folder.exists() else []
        if not any(f.startswith(prefix) and ".pt.trace.json" in f for f in files):
            raise RuntimeError(f"the torch profiler wrote no {prefix} trace into {folder}")
        return unprofiled_s, profiled_s, files

    def phase_profile(self) -> None:
        """One prefill (max_tokens=1) of ``--profile-prompts`` prompts of the profile length
        under the profiler (one batch: they fit ``max_num_batched_tokens``)."""
        profile = self.spec["profile"]
        length, count, folder = profile["length"], profile["prompts"], profile["dir"]
        shape = profile_shape_label(count, length)
        warmup_s, profiled_s, files = self._profiled_generate(
            [self.prompt(f"profile:warmup:{i}", length) for i in range(count)],
            [self.prompt(f"profile:{i}", length) for i in range(count)], 1, f"prefill{shape}")
        self.result["profile"] = {"length": length, "prompts": count, "dir": folder, "files": files,
                                  "unprofiled_s": round(warmup_s, 5), "profiled_s": round(profiled_s, 5)}
        self.progress(f"  profile {shape}: {profiled_s * 1e3:.1f} ms profiled "
                      f"({warmup_s * 1e3:.1f} ms unprofiled), {len(files)} files in {folder}")

    def phase_profile_decode(self) -> None:
        """``DECODE_PROFILE_STEPS`` decode steps of the largest decode batch under the profiler
        (vLLM's ``delay_iterations`` skips the batch's prefill step). Traces: ``decode<B>_...``."""
        decode = self.workload["decode"]
        batch, length = max(decode["batch_sizes"]), decode["length"]
        tokens = DECODE_PROFILE_DELAY_STEPS + DECODE_PROFILE_STEPS + 2
        prefix = f"decode{batch}"

        def prompts(tag):
            return [self.prompt(f"profile_decode:{tag}:{i}", length) for i in range(batch)]

        unprofiled_s, profiled_s, files = self._profiled_generate(
            prompts("warmup"), prompts("0"), tokens, prefix,
            delay_iterations=DECODE_PROFILE_DELAY_STEPS, max_iterations=DECODE_PROFILE_STEPS)
        self.result["profile_decode"] = {"batch": batch, "prompt_tokens": length, "tokens": tokens,
                                         "prefix": prefix, "steps": DECODE_PROFILE_STEPS, "files": files,
                                         "unprofiled_s": round(unprofiled_s, 5), "profiled_s": round(profiled_s, 5)}
        self.progress(f"  profile_decode batch {batch}: {len(files)} files in {self.spec['profile']['dir']}")

    def phase_decode(self) -> None:
        decode = self.workload["decode"]
        tokens, length = decode["tokens"], decode["length"]
        for batch in decode["batch_sizes"]:
            def prompts(tag):
                return [self.prompt(f"decode:{tag}:{batch}:{i}", length) for i in range(batch)]

            # two full-length warmups: at b1 the first reps after the TTFT phases ran up to 1.7x
            # slower than the later ones in both engines (H100, 12-05), then settled
            for rep in range(DECODE_WARMUP_REPS):
                self.generate(prompts(f"warmup:{rep}"), max_tokens=tokens, ignore_eos=True)
            # median of --reps samples: one 128-token sample varied by up to 30 % between calls
            samples, probes = [], []
            for rep in range(self.spec["reps"]):
                probes.append(host_probe())
                first_s, _ = self.generate(prompts(f"first:{rep}"), max_tokens=1)
                all_s, outputs = self.generate(prompts(f"all:{rep}"), max_tokens=tokens, ignore_eos=True)
                samples.append((first_s, all_s, (all_s - first_s) / (tokens - 1) * 1e3))
            generated = [len(o.outputs[0].token_ids) for o in outputs]
            ms = statistics.median(m for _, _, m in samples)
            self.result["decode"][str(batch)] = {"prompt_tokens": length, "tokens": tokens, "generated": generated,
                                                 "first_s": [round(f, 5) for f, _, _ in samples],
                                                 "all_s": [round(a, 5) for _, a, _ in samples],
                                                 "ms_per_token_reps": [round(m, 3) for _, _, m in samples],
                                                 "ms_per_token": round(ms, 3), "host_probe": probes}
            self.progress(f"  decode batch {batch}: {ms:.2f} ms/token")
            self.save()


def sglang_engine_kwargs(llm: dict, config: dict) -> dict:
    """vLLM's ``LLM`` arguments of a run (``llm_kwargs``) as SGLang ``Engine`` arguments."""
    kwargs = {
        "model_path": llm["model"], "tp_size": llm["tensor_parallel_size"], "dtype": llm["dtype"],
        "random_seed": llm["seed"], "context_length": llm["max_model_len"],
        "chunked_prefill_size": llm["max_num_batched_tokens"], "max_running_requests": llm["max_num_seqs"],
        "disable_radix_cache": not llm["enable_prefix_caching"], "mem_fraction_static": llm["gpu_memory_utilization"],
        "kv_cache_dtype": "fp8_e4m3" if llm["kv_cache_dtype"] == "fp8" else "auto",
        "cuda_graph_max_bs": max(CAPTURE_SIZES), "disable_cuda_graph": llm["enforce_eager"],
        "skip_tokenizer_init": True, "log_level": "info",
    }
    if "speculative_config" in llm:  # MTP k=1, DeepSeek's NextN layer as the draft
        kwargs.update(speculative_algorithm="EAGLE", speculative_num_steps=1, speculative_eagle_topk=1,
                      speculative_num_draft_tokens=2)
    kwargs.update(config.get("sglang", {}))
    return kwargs


class _Completion:
    """An SGLang result as the parts of vLLM's RequestOutput the phases read."""

    def __init__(self, prompt: list[int], out: dict):
        self.prompt_token_ids = prompt
        self.outputs = [SimpleNamespace(token_ids=out["output_ids"])]
        entries = (out.get("meta_info") or {}).get("input_token_logprobs")
        # SGLang: (logprob, token id, text) per prompt position, None at position 0;
        # vLLM: None, then {token id: Logprob} per position
        self.prompt_logprobs = None if entries is None else [
            None if e is None or e[0] is None else {e[1]: SimpleNamespace(logprob=e[0])}
            for e in entries]


class SglangWorker(Worker):
    """The same measurements through SGLang's offline ``Engine`` (``sglang-*`` configurations)."""

    def startup(self) -> None:
        import sglang
        import torch
        from make_tiny_model import SPECIAL_TOKENS
        from transformers import AutoTokenizer

        self.result["versions"] = {"sglang": sglang.__version__, "torch": torch.__version__,
                                   "cuda": torch.version.cuda, "python": sys.version.split()[0]}
        kwargs = self.spec["sglang_engine"]
        self.llm = sglang.Engine(**kwargs)
        self.low, self.high = len(SPECIAL_TOKENS), len(AutoTokenizer.from_pretrained(kwargs["model_path"]))
        self.result["info"] = {"ranks": [{"model_class": "sglang " + kwargs.get("cp_strategy", "tp"),
                                          "cudagraph_mode": "off" if kwargs["disable_cuda_graph"] else "on"}],
                               "kv_cache_dtype": kwargs["kv_cache_dtype"],
                               "engine_args": {k: v for k, v in kwargs.items() if k != "model_path"}}
        unsupported = [p for p in self.spec["phases"] if p in SGLANG_UNSUPPORTED_PHASES]
        self.spec["phases"] = [p for p in self.spec["phases"] if p not in SGLANG_UNSUPPORTED_PHASES]
        self.result["skipped"] += [f"{p} (no SGLang equivalent here)" for p in unsupported]

    def generate(self, prompts: list[list[int]], **sampling) -> tuple[float, list]:
        params = {"temperature": 0.0, "max_new_tokens": sampling.get("max_tokens", 16),
                  "ignore_eos": sampling.get("ignore_eos", False)}
        logprobs = "prompt_logprobs" in sampling
        start = time.perf_counter()
        outs = self.llm.generate(input_ids=prompts, sampling_params=params, return_logprob=logprobs,
                                 **({"logprob_start_len": 0} if logprobs else {}))
        seconds = time.perf_counter() - start
        return seconds, [_Completion(p, o) for p, o in zip(prompts, outs)]

    def rank_peaks(self) -> list:
        return []


# ----------------------------------------------------------------------------- agreement math


def trained_workload(model_dir: Path, base: dict) -> dict:
    """``base`` with the agreement prompts replaced by held-out synthetic problems (token ids of
    the trained model's own tokenizer) and their expected answers, for ``--trained-model``."""
    import synthetic_tasks
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    docs = [(task, doc) for task in synthetic_tasks.TASKS
            for doc in synthetic_tasks.eval_problems(task, TRAINED_PROBLEMS_PER_TASK)]
    prompts = [tok.encode(doc["question"]).ids for _, doc in docs]
    return {**base, "greedy": {"prompts": prompts, "lengths": [len(p) for p in prompts], "tokens": TRAINED_TOKENS,
                               "tasks": [task for task, _ in docs],
                               "answers": [synthetic_tasks.answer_number(doc) for _, doc in docs]},
            "logprobs": {"prompts": prompts, "lengths": [len(p) for p in prompts]}}


def answers_correct(tok, greedy: dict, tokens: list[list[int]]) -> dict[str, str]:
    """Per task, right answers / problems: the number after the first ``#### `` of the greedy
    text's first line (``tok``: the trained model's ``tokenizers.Tokenizer``)."""
    import synthetic_tasks

    right: dict[str, list[int]] = {}
    for task, answer, ids in zip(greedy["tasks"], greedy["answers"], tokens):
        text = tok.decode(ids, skip_special_tokens=True).split("\n", 1)[0]
        right.setdefault(task, []).append(int(synthetic_tasks.generated_answer(text) == answer))
    return {task: f"{sum(r)}/{len(r)}" for task, r in right.items()}


def greedy_agreement(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Prompts whose greedy tokens are identical, and the mean fraction of tokens generated
    before the first difference (greedy decoding on a random model diverges at near-ties)."""
    prefixes = []
    for ref, oth in zip(reference, other):
        same = 0
        while same < min(len(ref), len(oth)) and ref[same] == oth[same]:
            same += 1
        prefixes.append(same / max(len(ref), 1))
    return {"identical": sum(a == b for a, b in zip(reference, other)), "prompts": len(reference),
            "mean_prefix_fraction": round(statistics.mean(prefixes), 4) if prefixes else None}


def logprob_deltas(reference: list[list[float | None]], other: list[list[float | None]]) -> dict:
    """max and mean |delta| of the prompt-token logprobs over every position both have."""
    deltas = [abs(a - b) for ref, oth in zip(reference, other) for a, b in zip(ref, oth)
              if a is not None and b is not None]
    if not deltas:
        return {"max": None, "mean": None, "positions": 0}
    return {"max": round(max(deltas), 5), "mean": round(statistics.mean(deltas), 5), "positions": len(deltas)}


# ----------------------------------------------------------------------------- driver


def run_name(config: str, kv_dtype: str, mtp: bool, round_no: int = 1) -> str:
    """``config[+kv][+mtp]``, then ``@<round>`` from the second round on (``--rounds``): the
    round is part of the variant, so a round's runs are compared with its own reference."""
    return (config + ("" if kv_dtype == "auto" else f"+{kv_dtype}") + ("+mtp" if mtp else "")
            + ("" if round_no == 1 else f"@{round_no}"))


def run_allowed(config: str, kv_dtype: str, mtp: bool) -> bool:
    """Whether ``config`` runs in this kv / MTP variant (the bf16 references: bf16 KV, no MTP)."""
    spec = CONFIGS[config]
    return kv_dtype in spec.get("kv_dtypes", [kv_dtype]) and not (mtp and spec.get("mtp") is False)


def variant_suffix(name: str) -> str:
    """What follows the config in a run name: ``+fp8``, ``+mtp``, ``@2`` (``run_name``)."""
    return name[len(re.split(r"[+@]", name)[0]):]


def without_round(name: str) -> str:
    return name.split("@")[0]


def profiler_config(args, profile_dir: Path) -> dict:
    """vLLM's ProfilerConfig of a profiled run: ``--profile-activities`` and ``--profile-with-stack``
    (Python functions in the trace: profile_summary's host table then names the plugin's
    own code where a host-bound step spends its time)."""
    config = {**PROFILER_CONFIG, "torch_profiler_dir": str(profile_dir)}
    if args.profile_activities:
        config["torch_profiler_activities"] = args.profile_activities.split(",")
    if args.profile_with_stack:
        config["torch_profiler_with_stack"] = True
    return config


def llm_kwargs(config: dict, args, model_dir: Path, kv_dtype: str, mtp: bool, max_model_len: int) -> dict:
    kwargs = {
        "model": str(model_dir), "dtype": "bfloat16", "seed": 0, "max_model_len": max_model_len,
        "max_num_seqs": 16, "max_num_batched_tokens": args.max_num_batched_tokens,
        "enable_prefix_caching": False, "gpu_memory_utilization": args.gpu_memory_utilization,
        "enforce_eager": args.eager or args.cpu_dry_run, "kv_cache_dtype": kv_dtype,
        "compilation_config": {"cudagraph_capture_sizes": CAPTURE_SIZES},
    }
    if config["parallel"] == "tp":
        kwargs["tensor_parallel_size"] = args.n
    else:
        kwargs.update(tensor_parallel_size=1, prefill_context_parallel_size=args.n)
        # vLLM 0.32 (PCPManager.validate_config): sparse-MLA PCP without DCP refuses CUDA graphs.
        kwargs["compilation_config"] = {"cudagraph_mode": "NONE"}
    if "cp_nsa" in config:
        kwargs["additional_config"] = {"cp_nsa": config["cp_nsa"]}
    if "cudagraph_mode" in config:
        kwargs["compilation_config"]["cudagraph_mode"] = config["cudagraph_mode"]
    if mtp:
        kwargs["speculative_config"] = dict(MTP_CONFIG)
    return kwargs


def worker_env(uses_plugin: bool, args) -> dict:
    """The plugin's runs see it; the native runs must not (vLLM's own DeepseekV32 then runs)."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != args.plugin_path]
    if uses_plugin and args.plugin_path:
        paths.insert(0, args.plugin_path)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    if not uses_plugin and not args.plugin_path:
        env["VLLM_PLUGINS"] = ""  # the plugin is an installed distribution here: load no plugin
    env.update(
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # engine core in the worker: llm_engine.step() and RPCs reach it
        VLLM_ALLOW_INSECURE_SERIALIZATION="1",  # collective_rpc with a function
        HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
        # NVLink multicast stays off on these hosts (shared GPUs).
        NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1",
    )
    if args.cpu_dry_run:
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        if args.n > 1:
            env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
    return env


def sglang_env(env: dict, args) -> dict:
    """A vLLM run's environment with SGLang's staged site dir in place of vLLM's: the two stacks
    pin different torch builds and never share a process."""
    if not args.sglang_path:
        sys.exit("sglang-* configurations need --sglang-path (the unpacked SGLang stack)")
    vllm_site = os.environ.get("VSITE")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not (vllm_site and p.startswith(vllm_site))]
    env = {**env, "PYTHONPATH": os.pathsep.join([args.sglang_path, *paths])}
    env.pop("VLLM_PLUGINS", None)
    return env


def safe_name(name: str) -> str:
    """A run name as a folder name of letters, digits, '.', '_' and '-' ("+" is not one)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def summarize_profile(result: dict, profile_dir: Path, trace_prefix: str, key: str) -> None:
    """eval/profile_summary.py over the run's traces whose names start with ``trace_prefix``,
    into ``result[key]`` (per rank: ms per category and the top kernels); a failure is
    recorded, never raised."""
    try:
        from profile_summary import collect_runs

        runs = collect_runs([profile_dir], keep_kernels=60, trace_prefix=trace_prefix)
        if runs:
            result[key] = runs.get(profile_dir.name) or next(iter(runs.values()))
            result[key]["dir"] = str(profile_dir)
    except Exception:
        result.setdefault("errors", {})[key] = traceback.format_exc()[-3000:]


def nvidia_smi(query: str) -> list[list[str]]:
    try:
        text = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [[v.strip() for v in line.split(",")] for line in text.strip().splitlines()]


def gpu_tag(gpu_name: str) -> str:
    match = re.search(r"([A-Z]\d{2,3}[A-Z]?)", gpu_name.upper())
    return match.group(1).lower() if match else re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")


def wait_gpus_released(n: int, timeout_s: float = 30.0) -> float:
    """Seconds until every GPU the last run used is back under 1 GiB (the next run's
    memory profiling must see free GPUs)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        rows = nvidia_smi("memory.used")[:n]
        if not rows or all(int(r[0]) < 1024 for r in rows):
            break
        time.sleep(1)
    return round(time.monotonic() - start, 1)


def ensure_model(args) -> tuple[Path, float]:
    """Build the checkpoint once (a BUILD.json with the same arguments means it is complete);
    a failed GPU draw is retried on the CPU rather than losing the whole run."""
    model_dir = Path(args.model_dir)
    identity = [] if args.cpu_dry_run else ["--real-dims", "--num-layers", str(args.num_layers),
                                            "--num-nextn-predict-layers", "1"]
    if args.preset == "release":
        identity += ["--preset", "release"] + ([] if args.cpu_dry_run else ["--num-experts", str(args.num_experts)])
    marker = model_dir / "BUILD.json"
    if marker.exists() and json.loads(marker.read_text())["args"] == identity:
        print(f"BUILD skipped: {model_dir} already built ({marker.read_text().strip()})", flush=True)
        return model_dir, 0.0
    start = time.monotonic()
    for device in [None] if args.cpu_dry_run else list(dict.fromkeys([args.build_device, "cpu"])):
        device_args = [] if device is None else ["--device", device]
        proc = subprocess.run([sys.executable, str(EVAL_DIR / "make_tiny_model.py"), str(model_dir), *identity,
                               *device_args], capture_output=True, text=True)
        if proc.returncode == 0:
            break
        print(f"BUILD on {device} failed: {proc.stderr.strip()[-1500:]}", flush=True)
    else:
        sys.exit("checkpoint build failed")
    marker.write_text(json.dumps({"args": identity, "device": device}) + "\n")
    seconds = time.monotonic() - start
    print(f"BUILD {proc.stdout.strip()} ({seconds:.1f}s wall)", flush=True)
    return model_dir, seconds


def checkpoint_dirs(model_dir: Path, args, configs: list[str]) -> tuple[Path, Path | None, float]:
    """(the checkpoint every timed run loads, the bf16 copy the ``"model": "bf16"`` configs load,
    seconds spent dequantizing). ``--weights bf16`` times every run on the release checkpoint's
    bf16-dequantized copy: issue 18's bf16-weights table, in the same driver and workloads."""
    bf16_configs = [c for c in configs if CONFIGS[c].get("model") == "bf16"]
    if not bf16_configs and args.weights != "bf16":
        return model_dir, None, 0.0
    if args.preset != "release":
        needs = "--weights bf16" if args.weights == "bf16" else f"configs {bf16_configs}"
        sys.exit(f"{needs} need --preset release (the bf16 copy is dequantized from its fp8 block weights)")
    bf16_dir, seconds = ensure_bf16_copy(model_dir, args)
    return (bf16_dir if args.weights == "bf16" else model_dir), bf16_dir, seconds


def ensure_bf16_copy(model_dir: Path, args) -> tuple[Path, float]:
    """``model_dir``'s weights dequantized to bf16 (no quantization_config) next to it, once."""
    copy_dir = model_dir.with_name(model_dir.name + "-bf16")
    marker, source = copy_dir / "BUILD.json", (model_dir / "BUILD.json").read_text()
    if marker.exists() and json.loads(marker.read_text()).get("from") == source:
        print(f"BUILD skipped: {copy_dir} already dequantized", flush=True)
        return copy_dir, 0.0
    start = time.monotonic()
    for device in ["cpu"] if args.cpu_dry_run else list(dict.fromkeys([args.build_device, "cpu"])):
        proc = subprocess.run([sys.executable, str(EVAL_DIR / "make_tiny_model.py"), str(copy_dir),
                               "--dequantize-from", str(model_dir), "--device", device], capture_output=True, text=True)
        if proc.returncode == 0:
            break
        print(f"DEQUANTIZE on {device} failed: {proc.stderr.strip()[-1500:]}", flush=True)
    else:
        sys.exit("dequantized copy failed")
    marker.write_text(json.dumps({"from": source, "device": device}) + "\n")
    seconds = time.monotonic() - start
    print(f"BUILD {proc.stdout.strip()} ({seconds:.1f}s wall)", flush=True)
    return copy_dir, seconds


def plugin_log_lines(log_text: str) -> list[str]:
    """The plugin's first log lines of a run (without the logger's prefix): whether it
    registered, stepped aside, or what it serves with."""
    lines = [re.sub(r"^.*?\]\s*", "", ln).strip() for ln in log_text.splitlines() if "vllm_cp_nsa" in ln]
    return list(dict.fromkeys(ln[:240] for ln in lines if ln))[:PLUGIN_LOG_LINES]


# Wrappers that only say "see the other process": never the line worth reporting.
GENERIC_ERRORS = ("initialization failed", "validation error for", "See stack trace", "See root cause")


def error_line(text: str) -> str:
    """The last exception message in ``text`` that names a cause (worker processes log the
    root cause; the engine re-raises a generic wrapper)."""
    hits = [m.group(1).strip() for m in re.finditer(r"((?:\w+(?:Error|Exception)|Value error)[:,] .*)", text)
            if not any(g in m.group(1) for g in GENERIC_ERRORS)]
    if hits:
        return hits[-1][:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def run_worker(name: str, spec: dict, env: dict, timeout_s: float, logs: Path, n: int) -> dict:
    spec_path, log_path = logs / f"{name}.spec.json", logs / f"{name}.log"
    result_path, progress_path = Path(spec["result_path"]), Path(spec["progress_path"])
    for path in (result_path, progress_path):
        path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "worker", "--spec", str(spec_path)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(logs),
                                start_new_session=True)
    shown, timed_out = 0, False
    while proc.poll() is None:
        time.sleep(1)
        shown = echo_progress(progress_path, shown)
        if time.monotonic() - start > timeout_s:
            timed_out = True
            break
    stop_process_group(proc)
    echo_progress(progress_path, shown)
    result = json.loads(result_path.read_text()) if result_path.exists() else {"name": name}
    log_text = log_path.read_text(errors="replace")
    result.update(rc=proc.returncode, wall_s=round(time.monotonic() - start, 1), log=str(log_path),
                  gpu_release_s=wait_gpus_released(n) if not spec["cpu"] else 0.0)
    if timed_out and result.get("status") not in ("ok", "partial"):  # not when it finished at the wire
        result["status"] = "timeout"
        result["error"] = f"killed after {timeout_s:.0f}s (per-run timeout or budget)"
    elif result.get("status") not in ("ok", "partial", "failed"):
        result["status"] = "crashed"
        result["error"] = log_text[-3000:]
    result["error_line"] = summarize_error(result, log_text)
    return result


def summarize_error(result: dict, log_text: str) -> str:
    """One line for the report: why the run failed, or which measurement failed."""
    if result["status"] == "timeout":
        return result["error"]
    if result["status"] in ("failed", "crashed"):
        return error_line(log_text + "\n" + result["error"])
    return "; ".join(f"{phase}: {error_line(tail)}" for phase, tail in result.get("errors", {}).items())


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of the group remains; orphaned vLLM workers'
    zombies would keep a plain killpg(pgid, 0) answering."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_process_group(proc: subprocess.Popen) -> None:
    """End the worker and every vLLM process it started (its session), politely first."""
    for sig, grace_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        if proc.poll() is not None and not group_alive(proc.pid):
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        waited = time.monotonic()
        while time.monotonic() - waited < grace_s and (proc.poll() is None or group_alive(proc.pid)):
            time.sleep(0.2)
    proc.wait()


def echo_progress(path: Path, shown: int) -> int:
    if not path.exists():
        return shown
    text = path.read_text()
    if len(text) > shown:
        print(text[shown:], end="", flush=True)
    return len(text)


def drive(args) -> None:
    t0 = time.monotonic()
    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    workload = dict(DRY_RUN_WORKLOAD if args.cpu_dry_run else GPU_WORKLOAD)
    lengths = [parse_length(x) for x in (args.lengths or ("64,256" if args.cpu_dry_run else
                                                          "1K,4K,16K,32K,64K")).split(",")]
    configs = (args.configs or (DRY_RUN_CONFIGS if args.cpu_dry_run else DEFAULT_CONFIGS)).split(",")
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    phases = [p for p in args.phases.split(",") if p]
    if args.profile and "profile" not in phases:
        phases.append("profile")
    if any(p not in PHASES + OPTIONAL_PHASES for p in phases):
        sys.exit(f"phases must be among {PHASES + OPTIONAL_PHASES}")
    profile_length = None
    profiling = [p for p in OPTIONAL_PHASES if p in phases]
    # last, whatever the order given: nothing is timed after the profiler ran
    phases = [p for p in phases if p not in OPTIONAL_PHASES] + profiling
    if "profile" in phases:
        profile_length = (parse_length(args.profile_length) if args.profile_length else
                          DRY_RUN_PROFILE_LENGTH if args.cpu_dry_run else PROFILE_LENGTH)
        if args.profile_prompts < 1 or args.profile_prompts * profile_length > args.max_num_batched_tokens:
            sys.exit(f"--profile-prompts {args.profile_prompts} x {length_label(profile_length)} tokens must be "
                     f"one batch: 1 to --max-num-batched-tokens {args.max_num_batched_tokens} tokens")
    kv_dtypes = args.kv_dtypes.split(",")
    mtp_variants = {"off": [False], "on": [True], "both": [False, True]}[args.mtp]

    gpus = nvidia_smi("name,memory.total")
    gpu_name = "cpu (dry run)" if args.cpu_dry_run else (gpus[0][0] if gpus else "unknown GPU")
    tag = "cpu" if args.cpu_dry_run else gpu_tag(gpu_name)
    if args.trained_model:
        model_dir, build_s = Path(args.trained_model).resolve(), 0.0
        workload = trained_workload(model_dir, workload)
        phases = [p for p in phases if p in ("warmup", "agreement")]  # a 6 MB model times nothing useful
    else:
        model_dir, build_s = ensure_model(args)
    model_dir, bf16_dir, dequantize_s = checkpoint_dirs(model_dir, args, configs)
    build_s += dequantize_s
    longest = max(lengths + [n for _, n in workload["batches"]] + [workload["busy"]["new_length"],
                  workload["decode"]["length"] + workload["decode"]["tokens"],
                  max(workload["greedy"]["lengths"]) + workload["greedy"]["tokens"],
                  max(workload["logprobs"]["lengths"]) + 1] + ([profile_length + 1] if profile_length else []))
    max_model_len = -(-(longest + 64) // 256) * 256
    report = {
        "meta": {
            "gpu": gpu_name, "gpu_tag": tag, "n": args.n, "gpus": gpus[:args.n], "machine": machine_id(args.n),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "model_dir": str(model_dir), "model_config": json.loads((model_dir / "config.json").read_text()),
            "build_s": round(build_s, 1), "budget_s": args.budget_s, "config_timeout_s": args.config_timeout_s,
            "reps": args.reps, "lengths": lengths, "workload": workload, "phases": phases,
            "max_model_len": max_model_len, "max_num_batched_tokens": args.max_num_batched_tokens,
            "gpu_memory_utilization": args.gpu_memory_utilization, "capture_sizes": CAPTURE_SIZES,
            "cpu_dry_run": args.cpu_dry_run, "command": sys.argv, "profile_length": profile_length,
            "profile_prompts": args.profile_prompts,
            "profile_activities": args.profile_activities, "profile_with_stack": args.profile_with_stack,
            "trained_model": bool(args.trained_model),
            "weights": args.weights,
        },
        "runs": {},
    }
    stem = out / f"compare_{tag}_n{args.n}"
    kept = KEEP_DIR / stem.name
    if args.append and kept.with_suffix(".json").exists():
        # earlier device calls' runs (same GPU kind and N), so one report holds the whole table
        report["runs"] = json.loads(kept.with_suffix(".json").read_text())["runs"]
        print(f"APPEND to the runs of {kept}.json: {', '.join(report['runs'])}", flush=True)
    runs = [(c, kv, mtp) for kv in kv_dtypes for mtp in mtp_variants for c in configs]
    # --rounds: the whole list again, in the same order (A B A B): a second engine of each config
    runs = [(*run, r) for r in range(1, args.rounds + 1) for run in runs if run_allowed(*run)]
    for config_name, kv_dtype, mtp, round_no in runs:
        name = run_name(config_name, kv_dtype, mtp, round_no)
        remaining = args.budget_s - (time.monotonic() - t0) - REPORT_RESERVE_S
        if remaining < args.min_run_s:
            report["runs"][name] = {"name": name, "status": "skipped",
                                    "error_line": f"budget: {remaining:.0f}s left < --min-run-s {args.min_run_s}"}
            print(f"SKIP {name}: {remaining:.0f}s of budget left", flush=True)
            continue
        timeout_s = min(args.config_timeout_s, remaining)
        config = CONFIGS[config_name]
        kwargs = llm_kwargs(config, args, bf16_dir if config.get("model") == "bf16" else model_dir, kv_dtype, mtp,
                            max_model_len)
        profile_dir = out / "profiles" / safe_name(name)
        profiled = bool(profiling) and round_no == 1  # the profilers run in the first round only
        if profiled:
            shutil.rmtree(profile_dir, ignore_errors=True)  # no stale traces of an earlier call
            kwargs["profiler_config"] = profiler_config(args, profile_dir)
        spec = {
            "name": name, "uses_plugin": config["plugin"], "cpu": args.cpu_dry_run, "num_gpus": args.n,
            "llm": kwargs, "profile": {"length": profile_length, "prompts": args.profile_prompts, "dir": str(profile_dir)}
            if profiled else None,
            "workload": workload, "ttft_lengths": lengths, "reps": args.reps,
            "phases": [p for p in phases if p in config.get("phases", phases)
                       and (profiled or p not in OPTIONAL_PHASES)],
            # The worker stops starting measurements a little before the driver's kill.
            "deadline": time.time() + timeout_s - min(20.0, timeout_s / 10),
            "result_path": str(logs / f"{name}.result.json"), "progress_path": str(logs / f"{name}.progress"),
        }
        if config.get("engine") == "sglang":
            spec["sglang_engine"] = sglang_engine_kwargs(kwargs, config)
        print(f"RUN {name} (timeout {timeout_s:.0f}s, budget used {time.monotonic() - t0:.0f}s)", flush=True)
        env = worker_env(config["plugin"], args)
        if config.get("engine") == "sglang":
            env = sglang_env(env, args)
        result = run_worker(name, spec, {**env, **config.get("env", {})}, timeout_s, logs, args.n)
        result["plugin_log"] = plugin_log_lines(Path(result["log"]).read_text(errors="replace"))
        if profiled and profile_length and profile_dir.exists():
            summarize_profile(result, profile_dir, "prefill", "profile_summary")
        if profiled and "profile_decode" in phases and profile_dir.exists():
            summarize_profile(result, profile_dir, "decode", "profile_decode_summary")
        report["runs"][name] = result
        print(f"END {name}: {result['status']} in {result['wall_s']}s "
              f"(phases {result.get('phase_s', {})}) {result.get('error_line', '')}", flush=True)
        write_report(report, stem)
    report["meta"]["total_s"] = round(time.monotonic() - t0, 1)
    write_report(report, stem)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("no matplotlib: PNG left to eval/plot_compare.py", flush=True)
    else:
        from plot_compare import plot

        plot(report, stem.with_suffix(".png"))
    print(f"WROTE {stem}.json {stem}.md in {report['meta']['total_s']}s", flush=True)


# ----------------------------------------------------------------------------- report


def reference_run(report: dict, wanted: str, suffix: str) -> str | None:
    """``wanted`` with the same kv / MTP variant when it measured TTFT, else None."""
    run = report["runs"].get(wanted + suffix)
    return wanted + suffix if run and run.get("ttft") else None


def agreement_reference(report: dict, suffix: str) -> str | None:
    """The bf16-dequantized reference (BF16_REFERENCES) for every variant when the report has
    one; else native-tp of the same variant, else the first run of that variant with agreement data."""
    for name in BF16_REFERENCES:
        if (report["runs"].get(name) or {}).get("greedy"):
            return name
    ref = report["runs"].get("native-tp" + suffix)
    if ref and ref.get("greedy"):
        return "native-tp" + suffix
    return next((name for name, run in report["runs"].items()
                 if variant_suffix(name) == suffix and run.get("greedy")), None)


def ratio_to_reference(key: str, reference: float | None, this: float | None) -> float | None:
    """The report's ratio convention. TTFT: speed (the reference's / this run's, > 1 = faster);
    decode: time (this run's / the reference's, < 1 = faster). None when either is missing."""
    if not (reference and this):
        return None
    return reference / this if key == "ttft" else this / reference


def _fmt(value, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def _gib(nbytes) -> str:
    return _fmt(None if nbytes is None else nbytes / 2**30, ".2f")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def pooled_rounds(runs: dict) -> dict:
    """Per config and variant (a run name without its ``@<round>``): how many rounds measured
    it (``--rounds``; 1 without), and the median of every round's samples together (TTFT
    seconds per workload, decode ms per token per batch size), the spread of the rounds' own
    medians beside it."""
    grouped: dict[str, list[dict]] = {}
    for name, run in runs.items():
        grouped.setdefault(without_round(name), []).append(run)
    pooled = {}
    for base, rounds in grouped.items():
        ttft: dict[str, list[float]] = {}
        decode: dict[str, list[float]] = {}
        for run in rounds:
            for label, entry in run.get("ttft", {}).items():
                ttft.setdefault(label, []).append(entry)
            for batch, entry in run.get("decode", {}).items():
                decode.setdefault(batch, []).append(entry)
        pooled[base] = {
            "rounds": sum(1 for run in rounds if run.get("ttft") or run.get("decode")),
            "ttft": {lb: (statistics.median(t for e in es for t in e["times_s"]),
                          min(e["median_s"] for e in es), max(e["median_s"] for e in es)) for lb, es in ttft.items()},
            "decode": {b: (statistics.median(m for e in es for m in e["ms_per_token_reps"]),
                           min(e["ms_per_token"] for e in es), max(e["ms_per_token"] for e in es))
                       for b, es in decode.items()},
        }
    return pooled


def _pooled_rounds_section(runs: dict) -> list[str]:
    """The ``pooled_rounds`` tables, ratios against native-tp of the same variant; [] without rounds."""
    if not any("@" in name for name in runs):
        return []
    pooled = pooled_rounds(runs)
    bases = list(pooled)
    lines = ["", "## All rounds pooled (median of every round's samples; [lowest, highest] round median)", ""]
    for key, label, scale, spec in (("ttft", "TTFT ms", 1e3, ".1f"), ("decode", "decode ms per token", 1, ".2f")):
        workloads = list(dict.fromkeys(w for b in bases for w in pooled[b][key]))
        if not workloads:
            continue
        rows = []
        for w in workloads:
            row = [w]
            for b in bases:
                entry = pooled[b][key].get(w)
                row.append("–" if entry is None else
                           f"{entry[0] * scale:{spec}} [{entry[1] * scale:{spec}}, {entry[2] * scale:{spec}}]")
            rows.append(row)
        lines += _table([label] + [f"{b} ({pooled[b]['rounds']} rounds)" for b in bases], rows) + [""]
        rows = []
        for w in workloads:
            row = [w]
            for b in bases:
                ref = pooled.get("native-tp" + variant_suffix(b), {}).get(key, {}).get(w)
                entry = pooled[b][key].get(w)
                row.append(_fmt(ratio_to_reference(key, ref and ref[0], entry and entry[0]), ".2f"))
            rows.append(row)
        verdict = "native-tp's / this run's: > 1 = faster" if key == "ttft" else "this run's / native-tp's: < 1 = faster"
        lines += [f"Pooled {label} vs native-tp of the same variant ({verdict})", ""]
        lines += _table([label] + bases, rows) + [""]
    return lines[:-1]


def run_probes(run: dict) -> list[dict]:
    """Every ``host_probe`` a run took (one per timed TTFT / decode sample)."""
    entries = [*run.get("ttft", {}).values(), *run.get("decode", {}).values()]
    return [p for e in entries for p in e.get("host_probe", [])]


def _host_probe_section(runs: dict) -> list[str]:
    """Per run, the host's speed while it was measured (``host_probe``), and its Python-loop time
    over that of native-tp of the same variant (and round): a ratio far from 1 says the two ran on
    hosts of different speed, so their host-bound points (1K, decode) compare hosts, not engines;
    [] if no run has probes."""
    rows = []
    for name, run in runs.items():
        probes = run_probes(run)
        if not probes:
            continue
        m = probe_medians(probes)
        reference = probe_medians(run_probes(runs.get("native-tp" + variant_suffix(name), {})))
        cpus = ", ".join(map(str, m["cpus"][:8])) + (" …" if len(m["cpus"]) > 8 else "")
        rows.append([name, str(m["samples"]), _fmt(m["python_us"], ".0f"), _fmt(m["launch_us"], ".2f"),
                     _fmt(m["python_us"] / reference["python_us"] if reference["python_us"] else None, ".2f"),
                     cpus or "–", _fmt(m["load1"], ".1f")])
    if not rows:
        return []
    return ["", f"## Host probe before each timed sample (medians: a {PROBE_LOOP_ITERATIONS:,}-step Python loop; "
                f"{PROBE_CUDA_OPS} tiny CUDA ops back to back, per op; the engine's own thread)", "",
            *_table(["run", "samples", "Python loop us", "CUDA op us", "loop / native-tp's", "CPUs", "load (1 min)"],
                    rows)]


def _profiled_batch(meta: dict) -> str:
    count, length = meta.get("profile_prompts") or 1, length_label(meta["profile_length"])
    return f"One prompt of {length} tokens" if count == 1 else f"One batch of {count} prompts of {length} tokens"


def _profile_section(runs: dict, names: list[str], summary_key: str, title: str, caption) -> list[str]:
    """eval/profile_summary.py's tables of the runs holding ``summary_key`` (differences against
    the first native-tp run), with ``caption(profiled run names)`` under the heading; [] if none."""
    profiled = {n: runs[n][summary_key] for n in names if (runs[n].get(summary_key) or {}).get("ranks")}
    if not profiled:
        return []
    from profile_summary import render_markdown as render_profile

    baseline = next((n for n in profiled if n.startswith("native-tp")), None)
    table = render_profile(profiled, baseline=baseline, top=10, title=title).rstrip().split("\n")
    return ["", table[0], "", caption(profiled)] + table[1:]


def _plugins_env(config: dict) -> str:
    value = config.get("env", {}).get("VLLM_PLUGINS")
    return "(unset)" if value is None else repr(value)


def render_markdown(report: dict) -> str:
    meta, runs = report["meta"], report["runs"]
    names = list(runs)
    versions = next((r["versions"] for r in runs.values() if r.get("versions")), {})
    cfg = meta["model_config"]
    built = f"built in {meta['build_s']}s" if meta["build_s"] else "already built"
    lines = [
        f"# vLLM native TP / PCP vs the plugin: {meta['gpu']}, N={meta['n']}",
        "",
        f"- date {meta['date']}; vLLM {versions.get('vllm', '?')}, torch {versions.get('torch', '?')}, "
        f"CUDA {versions.get('cuda', '?')}, Python {versions.get('python', '?')}",
        (f"- model: the trained tiny DeepSeek-V3.2 `{meta['model_dir']}` ({cfg['num_hidden_layers']} layers, "
         f"hidden {cfg['hidden_size']}, index_topk {cfg['index_topk']}, YaRN)" if meta.get("trained_model") else
        f"- model: random DeepSeek-V3.2 ({cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, "
        f"{cfg['num_attention_heads']} heads, index_topk {cfg['index_topk']}, {cfg['n_routed_experts']} experts "
        f"top-{cfg['num_experts_per_tok']}, MTP layers {cfg['num_nextn_predict_layers']}), "
        f"{'fp8 128x128 block weights (the release format; *-bf16 runs: its bf16-dequantized copy)' if cfg.get('quantization_config') else 'bf16 weights (the release checkpoint dequantized: --weights bf16)' if meta.get('weights') == 'bf16' else 'bf16 weights'}, "
        f"`{meta['model_dir']}` ({built})"),
        f"- engine: max_model_len {meta['max_model_len']}, max_num_batched_tokens {meta['max_num_batched_tokens']}, "
        f"max_num_seqs 16, prefix caching off, gpu_memory_utilization {meta['gpu_memory_utilization']}, "
        f"CUDA-graph capture sizes {meta['capture_sizes']} (PCP: none)"
        + (", enforce_eager (dry run)" if meta["cpu_dry_run"] else ""),
        f"- TTFT = wall time of `llm.generate(max_tokens=1)`, median of {meta['reps']} after a warm-up of the "
        f"same shape, fresh random prompts; budget {meta['budget_s']}s, used {meta.get('total_s', '(running)')}s",
        "",
        "## Runs",
        "",
    ]
    rows = []
    for name in names:
        run = runs[name]
        info, ranks = run.get("info", {}), run.get("info", {}).get("ranks") or [{}]
        memory = run.get("memory", {})
        smi_peak = max(memory.get("nvidia_smi_peak_mib", {}).values(), default=None)
        transient = [r["peak_bytes"] - rank.get("allocated_bytes", 0)
                     for r, rank in zip(memory.get("ranks") or [], ranks) if r]
        rows.append([
            name, run.get("status", "?"), _fmt(run.get("phase_s", {}).get("startup")),
            (ranks[0].get("model_class") or "–").rsplit(".", 1)[-1],
            ", ".join(ranks[0].get("attention_impls") or []) or "–",
            (ranks[0].get("cudagraph_mode") or "–").replace("CUDAGraphMode.", ""),
            info.get("kv_cache_dtype") or "–", _fmt(info.get("kv_capacity_tokens"), ","),
            _gib(ranks[0].get("weights_bytes")), _fmt(None if smi_peak is None else smi_peak / 1024, ".1f"),
            _gib(max(transient) if transient else None),
            (run.get("error_line") or "").replace("|", "/")[:160],
        ])
    lines += _table(["run", "status", "startup s", "model class", "attention impl", "CUDA graphs", "KV cache",
                     "KV capacity (tokens)", "weights GiB/rank", "peak GiB (nvidia-smi)",
                     "transient GiB (torch)", "error"], rows)

    labels = list(dict.fromkeys(label for run in runs.values() for label in run.get("ttft", {})))
    if labels:
        medians = {name: {lb: runs[name].get("ttft", {}).get(lb, {}).get("median_s") for lb in labels}
                   for name in names}
        lines += ["", "## TTFT (ms)", ""]
        lines += _table(["workload"] + names, [[lb] + [_fmt(None if medians[n][lb] is None else medians[n][lb] * 1e3)
                                                       for n in names] for lb in labels])
        for wanted in ("native-tp", "plugin-inseq"):
            lines += ["", f"## TTFT speed-up vs {wanted} of the same variant (its TTFT / this run's; > 1 = faster)",
                      ""]
            rows = []
            for lb in labels:
                row = [lb]
                for name in names:
                    ref = reference_run(report, wanted, variant_suffix(name))
                    a = medians.get(ref, {}).get(lb) if ref else None
                    b = medians[name][lb]
                    row.append(_fmt(ratio_to_reference("ttft", a, b), ".2f"))
                rows.append(row)
            lines += _table(["workload"] + names, rows)

    batch_sizes = list(dict.fromkeys(b for run in runs.values() for b in run.get("decode", {})))
    if batch_sizes:
        lines += ["", "## Decode (ms per output token: (t(T tokens) - t(1 token)) / (T-1), median of --reps samples)", ""]
        lines += _table(["batch"] + names, [[b] + [_fmt(runs[n].get("decode", {}).get(b, {}).get("ms_per_token"),
                                                        ".2f") for n in names] for b in batch_sizes])
        lines += ["", "## Decode time vs native-tp of the same variant (this run's ms / its ms; < 1 = faster)", ""]
        rows = []
        for b in batch_sizes:
            row = [b]
            for name in names:
                ref = runs.get("native-tp" + variant_suffix(name), {})
                a = ref.get("decode", {}).get(b, {}).get("ms_per_token")
                c = runs[name].get("decode", {}).get(b, {}).get("ms_per_token")
                row.append(_fmt(ratio_to_reference("decode", a, c), ".2f"))
            rows.append(row)
        lines += _table(["batch"] + names, rows)

    lines += _pooled_rounds_section(runs)
    lines += _host_probe_section(runs)

    rows = []
    for name in names:
        run = runs[name]
        ref_name = agreement_reference(report, variant_suffix(name))
        if not run.get("greedy") or ref_name in (None, name):
            continue
        ref = runs[ref_name]
        greedy = greedy_agreement(ref["greedy"]["tokens"], run["greedy"]["tokens"])
        deltas = (logprob_deltas(ref["prompt_logprobs"]["logprobs"], run["prompt_logprobs"]["logprobs"])
                  if ref.get("prompt_logprobs") and run.get("prompt_logprobs") else {})
        rows.append([name, ref_name, f"{greedy['identical']}/{greedy['prompts']}",
                     _fmt(greedy["mean_prefix_fraction"], ".2f"), _fmt(deltas.get("max"), ".4f"),
                     _fmt(deltas.get("mean"), ".4f"), str(deltas.get("positions", "–"))])
    if rows:
        greedy = meta["workload"]["greedy"]
        if meta.get("trained_model"):
            lengths = greedy["lengths"]
            lines += ["", f"## Agreement (trained model: greedy {greedy['tokens']} tokens and prompt logprobs of "
                      f"{len(lengths)} held-out synthetic problems of {min(lengths)}-{max(lengths)} tokens)", ""]
        else:
            lines += ["", f"## Agreement (greedy: {greedy['tokens']} tokens for prompts of {greedy['lengths']} tokens; "
                      f"prompt logprobs of prompts of {meta['workload']['logprobs']['lengths']} tokens)", ""]
        lines += _table(["run", "reference", "greedy identical", "mean matching prefix", "max abs Δ logprob",
                         "mean abs Δ logprob", "positions"], rows)
    if meta.get("trained_model"):
        from tokenizers import Tokenizer

        greedy = meta["workload"]["greedy"]
        tok = Tokenizer.from_file(str(Path(meta["model_dir"]) / "tokenizer.json"))
        scored = {n: answers_correct(tok, greedy, runs[n]["greedy"]["tokens"]) for n in names if runs[n].get("greedy")}
        tasks = list(dict.fromkeys(greedy["tasks"]))
        lines += ["", "## Answers of the trained model (right / held-out problems, first line of the greedy text)", ""]
        lines += _table(["run"] + tasks, [[n] + [scored[n][t] for t in tasks] for n in scored])

    logged = [n for n in names if runs[n].get("plugin_log") is not None]
    if logged:
        lines += ["", "## Model class and the plugin's log lines (step aside: no cp_nsa, or VLLM_PLUGINS=\"\")", ""]
        lines += _table(["run", "model class", "VLLM_PLUGINS", "plugin log lines"], [
            [n, ((runs[n].get("info", {}).get("ranks") or [{}])[0].get("model_class") or "–"),
             _plugins_env(CONFIGS.get(n.split("+")[0], {})),
             " / ".join(runs[n]["plugin_log"]).replace("|", "/") or "–"] for n in logged])

    activities = meta.get("profile_activities") or "CPU,CUDA (CPU on a CPU host)"
    lines += _profile_section(
        runs, names, "profile_summary", "Prefill profile",
        lambda profiled: (
            f"{_profiled_batch(meta)}, `generate(max_tokens=1)` under "
            f"vLLM's torch profiler (activities {activities}), after an unprofiled one of the same shape; "
            "wall ms profiled / unprofiled: "
            + "; ".join(f"{n} {p['profiled_s'] * 1e3:.1f} / {p['unprofiled_s'] * 1e3:.1f}"
                        for n in profiled if (p := runs[n].get("profile")))
            + ". Traces: `profiles/<run>/`, one per rank (`python3 eval/profile_summary.py profiles`)."))
    lines += _profile_section(
        runs, names, "profile_decode_summary", "Decode profile",
        lambda profiled: (
            "{steps} decode steps of a batch of {batch} prompts of {prompt_tokens} tokens under vLLM's "
            "torch profiler (the batch's prefill skipped); totals over the traced steps. Traces: "
            "`profiles/<run>/decode*` (`python3 eval/profile_summary.py profiles --trace-prefix decode`)."
        ).format(**next(p for n in profiled if (p := runs[n].get("profile_decode")))))

    phase_columns = PHASES + [p for p in OPTIONAL_PHASES if any(p in runs[n].get("phase_s", {}) for n in names)]
    lines += ["", "## Phase timings (s)", ""]
    lines += _table(["run", "wall"] + ["startup"] + phase_columns + ["GPU release"],
                    [[n, _fmt(runs[n].get("wall_s"))] + [_fmt(runs[n].get("phase_s", {}).get(p))
                                                         for p in ["startup"] + phase_columns]
                     + [_fmt(runs[n].get("gpu_release_s"))] for n in names])
    skipped = [f"{n}: {', '.join(runs[n]['skipped'])}" for n in names if runs[n].get("skipped")]
    if skipped:
        lines += ["", "Skipped at the deadline: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def write_report(report: dict, stem: Path) -> None:
    """The report into --out, and its JSON into KEEP_DIR too (what a later --append call merges)."""
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    KEEP_DIR.mkdir(parents=True, exist_ok=True)
    (KEEP_DIR / stem.name).with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="run one configuration (started by drive)")
    worker.add_argument("--spec", required=True)
    d = sub.add_parser("drive", help="run the configurations and write the report")
    d.add_argument("--n", type=int, default=2, help="GPUs (= TP size, or PCP size for native-pcp)")
    d.add_argument("--out", required=True)
    d.add_argument("--configs", help=f"comma list of {', '.join(CONFIGS)} (default {DEFAULT_CONFIGS})")
    d.add_argument("--kv-dtypes", default="auto", help="comma list of auto, fp8")
    d.add_argument("--mtp", choices=["off", "on", "both"], default="off", help="MTP variant (1 draft token)")
    d.add_argument("--lengths", help="single-prompt TTFT lengths, e.g. 1K,4K,16K,32K,64K (the default)")
    d.add_argument("--phases", default=",".join(PHASES),
                   help=f"comma list of {PHASES} and the optional {OPTIONAL_PHASES} (always run last)")
    d.add_argument("--profile", action="store_true", help="add the profile phase (same as ...,profile in --phases)")
    d.add_argument("--profile-length", help=f"prompt tokens of the profiled prefill (default "
                                             f"{length_label(PROFILE_LENGTH)}; dry run {DRY_RUN_PROFILE_LENGTH})")
    d.add_argument("--profile-prompts", type=int, default=1,
                   help="prompts in the profiled prefill batch (e.g. 8 with --profile-length 1K: 8x1K)")
    d.add_argument("--profile-activities", help="torch profiler activities, e.g. CUDA (less host overhead, no "
                                                "step annotations); default vLLM's: CPU,CUDA (CPU on a CPU host)")
    d.add_argument("--profile-with-stack", action="store_true",
                   help="record Python stacks in the profiles (bigger traces, slower steps under the profiler)")
    d.add_argument("--reps", type=int, default=3)
    d.add_argument("--rounds", type=int, default=1,
                   help="run every config this many times, alternating (A B A B): separate engine processes, "
                        "whose 1K TTFT differed by up to 16%% for the same work (12-05); the report pools them")
    d.add_argument("--budget-s", type=float, default=540, help="total wall time, checkpoint build included")
    d.add_argument("--config-timeout-s", type=float, default=300)
    d.add_argument("--min-run-s", type=float, default=60, help="do not start a run with less budget than this")
    d.add_argument("--model-dir", help="checkpoint directory (built there once)")
    d.add_argument("--num-layers", type=int, default=3)
    d.add_argument("--preset", choices=["default", "release"], default="default",
                   help="checkpoint format: release = the official release's fp8 block weights + scales, grouped "
                        "routing, YaRN (make_tiny_model --preset release); its bf16 copy for *-bf16 configs")
    d.add_argument("--weights", choices=["as-built", "bf16"], default="as-built",
                   help="bf16: every run loads the --preset release checkpoint's bf16-dequantized copy")
    d.add_argument("--num-experts", type=int, default=32, help="routed experts of the --preset release checkpoint")
    d.add_argument("--append", action="store_true",
                   help=f"add this call's runs to the last report of the same GPU kind and N (kept in {KEEP_DIR})")
    d.add_argument("--build-device", default="cuda", help="where make_tiny_model draws the weights")
    d.add_argument("--plugin-path", help="directory holding the plugin as an installed distribution "
                                         "(put on PYTHONPATH for plugin runs only)")
    d.add_argument("--max-num-batched-tokens", type=int, default=16384)
    d.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    d.add_argument("--eager", action="store_true", help="enforce_eager for every run")
    d.add_argument("--sglang-path", metavar="DIR",
                   help="site dir of the staged SGLang stack (ENGINE=sglang eval/stage_gpu_stack.sh), for sglang-*")
    d.add_argument("--trained-model", metavar="DIR",
                   help="agreement only, on a trained checkpoint (eval/trained_tiny): held-out synthetic problems, "
                        f"{TRAINED_TOKENS} greedy tokens each, answers scored; no TTFT / decode phases")
    d.add_argument("--cpu-dry-run", action="store_true",
                   help="tiny model, tiny lengths, enforce_eager, on CPU: checks the plumbing")
    args = ap.parse_args(argv)
    if args.command == "worker":
        spec = json.loads(Path(args.spec).read_text())
        (SglangWorker if spec.get("sglang_engine") else Worker)(spec).run()
        return
    if args.model_dir is None:
        args.model_dir = "/tmp/cmp_tiny_v32" if args.cpu_dry_run else f"/tmp/cmp_real_v32_l{args.num_layers}"
        if args.preset == "release":
            args.model_dir += "_release" + ("" if args.cpu_dry_run else f"_e{args.num_experts}")
    drive(args)


if __name__ == "__main__":
    main()
