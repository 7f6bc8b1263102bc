"""Where a profiled prefill's GPU time goes: torch-profiler chrome traces, summed per kernel
category, runs side by side.

    python3 eval/profile_summary.py $OUT/profiles               # one run per sub-folder
    python3 eval/profile_summary.py $OUT/profiles/* --top 25    # the same, more kernels listed
    python3 eval/profile_summary.py raw.tgz --baseline native-tp  # traces inside a tar archive

Inputs: folders, trace files (``*.json`` / ``*.json.gz``, what vLLM 0.32's torch profiler writes:
``<prefix>_dp0_pp0_tp<T>_dcp0_ep<E>_rank<R>.<ns>.pt.trace.json.gz``, one per rank) or tar
archives of them. A run is the folder a trace lies in (``profiles/<run>/...``); a rank is the
``rank<R>`` of the file name (else the trace's ``distributedInfo``). Where a run holds several
traces of one rank, the newest (by name) counts.

Per rank: the GPU events (``cat`` kernel / gpu_memcpy / gpu_memset) summed per kernel name and
per category (``CATEGORY_PATTERNS`` below: the first pattern that matches the name wins), the
kernel time (sum over all streams), GPU busy (union over streams: NCCL on its own stream
overlaps compute, so busy < sum when it does), the GPU span (first GPU event start to the last
one's end), GPU idle in that span (span - busy: launch gaps, host syncs, eager overhead), the
profiled engine steps (vLLM's ``execute_context_..._generation_...`` CPU annotations) and the
host's side of them (kernel / graph launch calls, aten ops dispatched, time in CUDA runtime /
driver calls: what a host-bound step spends its time on), and inside the steps on their own
threads: aten-op (and, in a trace recorded with stacks, Python-function) self time, time in
blocking CUDA calls (syncs with the GPU) and the untraced rest, with the host ops by self time
side by side (``summarize_host_steps``). A run's column is the mean over its ranks. A trace
with no GPU events (a CPU-only run, or a host without CUPTI) is summed over its CPU ops' self
time instead, and says so.

Standard library only: it runs on any python3 (the GPU host's, or here on the CPU).
Used by eval/gpu_compare.py (the ``profile`` phase) and documented in eval/compare_notes.md.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

# (regex searched in the kernel name, case-insensitive; category). The FIRST matching row wins,
# so the specific names come before the generic ones ("indexer_k_quant_and_cache" is a KV-cache
# write, not indexer work; "fused_moe_kernel" is MoE, not GEMM). Adjust here.
CATEGORY_PATTERNS: list[tuple[str, str]] = [
    (r"^memcpy|^memset", "memcpy/memset"),
    (r"nccl|cross_device_reduce|all_?reduce|all_?gather|reduce_?scatter|one_?shot|two_?shot|multimem",
     "collectives"),
    # KV-cache writes: the plugin's Triton writers, vLLM's MLA / indexer cache writers.
    (r"\b_write_(latent|indexer)_\w*kernel|concat_and_cache|indexer_k_quant_and_cache|reshape_and_cache",
     "kv-cache write"),
    # Indexer: the plugin's Triton logits + exact top-k; vLLM's DeepGEMM (paged) MQA logits,
    # its top-k per row and the gather of the indexer keys for prefill.
    (r"\b_indexer_logits_kernel|\b_topk_kernel\b|mqa_logits|clean_logits|top_?k_?per_?row|gather_indexer|indexer",
     "indexer"),
    # Attention: the plugin's Triton sparse MLA + split combine; FlashMLA (dense / sparse,
    # prefill / decode, combine), vLLM's index conversion for it, and the dense FlashAttention-3
    # kernel vLLM 0.32 runs for V3.2 prefill (FlashAttnFwdSm90, which would match "cutlass").
    (r"\b_sparse_mla_fwd_kernel|\b_combine_splits_kernel|flash_?mla|flash_fwd|flash_?attn|sparse|mla|"
     r"req_index_to_global", "attention"),
    (r"moe|expert|topkgating|topk_softmax|grouped_topk", "moe"),
    (r"nvjet|cutlass|xmma|gemm|gemv|cublas|wgmma|onednn_mm|aten::(addmm|mm|bmm|baddbmm|_scaled_mm|linear)\b",
     "gemm"),
    # vLLM's Triton _fused_q_kernel: the indexer query's RoPE + fp8 quantization (the plugin
    # does the same in separate rope / cat / quantize kernels, filed here too).
    (r"\b_fused_q_kernel|rms_?norm|layer_?norm|norm_kernel|rotary|rope|elementwise|act_and_mul|silu|gelu|quant|"
     r"triton_(poi|per|red)_|reduce_kernel|softmax|index|gather|scatter|cat|copy|fill|arange|cumsum|sort",
     "norm/rope/elementwise"),
]
OTHER = "other"
# Row order of the tables (any category of the patterns missing here goes before "other").
DISPLAY_ORDER = ["indexer", "attention", "kv-cache write", "gemm", "moe", "collectives",
                 "norm/rope/elementwise", "memcpy/memset"]
CATEGORIES = list(dict.fromkeys(DISPLAY_ORDER + [c for _, c in CATEGORY_PATTERNS] + [OTHER]))
_COMPILED = [(re.compile(p, re.IGNORECASE), c) for p, c in CATEGORY_PATTERNS]

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
STEP_ANNOTATION = re.compile(r"^execute_")  # vLLM's per-step record_function (gpu_worker.annotate_profile)
TRACE_SUFFIXES = (".json", ".json.gz")
TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz")
KEEP_KERNELS = 40  # per rank, in the stored summary


def categorize(name: str) -> str:
    for pattern, category in _COMPILED:
        if pattern.search(name):
            return category
    return OTHER


def load_trace(data: bytes) -> dict:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return json.loads(data)


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1e3


def _cpu_self_times(events: list[dict]) -> list[tuple[str, float, float, float]]:
    """(name, ts, end, self µs) of cpu_op events: nesting is per thread, a child's time is
    taken off its parent's."""
    by_thread = defaultdict(list)
    for e in events:
        by_thread[(e.get("pid"), e.get("tid"))].append(e)
    out = []
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e.get("dur", 0)))
        stack: list[list] = []  # [name, ts, end, self]
        for e in thread_events:
            ts, end = e["ts"], e["ts"] + e.get("dur", 0)
            while stack and stack[-1][2] <= ts + 1e-6:
                out.append(tuple(stack.pop()))
            if stack:
                stack[-1][3] -= end - ts
            stack.append([e["name"], ts, end, end - ts])
        out.extend(tuple(s) for s in reversed(stack))
    return out


def summarize_trace(trace: dict) -> dict:
    """One rank's trace: ms per category and per kernel, and the totals (module docstring)."""
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict) and e.get("ph") == "X"]
    gpu = [e for e in events if e.get("cat") in GPU_CATS]
    steps = [e for e in events if e.get("cat") == "user_annotation" and STEP_ANNOTATION.match(e.get("name", ""))]
    if gpu:
        source = "gpu"
        timed = [(e["name"], e["ts"], e["ts"] + e.get("dur", 0), e.get("dur", 0)) for e in gpu]
    else:
        source = "cpu_op self time (no GPU events in the trace)"
        timed = _cpu_self_times([e for e in events if e.get("cat") == "cpu_op"])
    kernels: dict[str, dict] = {}
    categories = dict.fromkeys(CATEGORIES, 0.0)
    for name, _, _, dur in timed:
        k = kernels.setdefault(name, {"category": categorize(name), "calls": 0, "ms": 0.0})
        k["calls"] += 1
        k["ms"] += dur / 1e3
        categories[k["category"]] += dur / 1e3
    kernel_ms = sum(categories.values())
    span_ms = (max(t[2] for t in timed) - min(t[1] for t in timed)) / 1e3 if timed else 0.0
    busy_ms = _union_ms([(t[1], t[2]) for t in timed]) if gpu else None
    api = [e for e in events if e.get("cat") in HOST_API_CATS]
    host = summarize_host_steps(events, steps)
    return {
        "source": source,
        "kernel_ms": kernel_ms,
        "busy_ms": busy_ms,
        "span_ms": span_ms,
        "idle_ms": None if busy_ms is None else span_ms - busy_ms,
        "launches": len(timed),
        # the host's side of a host-bound step: how many launches it made, how many aten ops
        # it dispatched, and how long the CUDA runtime / driver calls themselves took
        "host_launch_calls": sum(1 for e in api if LAUNCH_CALL.search(e.get("name", ""))),
        "host_cpu_ops": sum(1 for e in events if e.get("cat") == "cpu_op"),
        "host_api_ms": sum(e.get("dur", 0) for e in api) / 1e3,
        "steps": len(steps),
        "step_ms": sum(e.get("dur", 0) for e in steps) / 1e3 if steps else None,
        "step_names": sorted({e["name"] for e in steps})[:4],
        "categories": categories,
        "kernels": dict(sorted(kernels.items(), key=lambda kv: -kv[1]["ms"])),
        **host,
    }


def summarize_host_steps(events: list[dict], steps: list[dict]) -> dict:
    """Where the engine steps' host time goes, on the threads that ran them: self time of the
    aten ops (and of Python functions, in a trace recorded with stacks), time in CUDA runtime /
    driver calls and in the blocking ones among them (a sync with the GPU), and the time no
    traced event covers (Python between ops). A step that is host-bound spends its TTFT here."""
    if not steps:
        return {"host_op_ms": None, "host_blocking_ms": None, "host_untraced_ms": None, "host_ops": {}}
    windows = defaultdict(list)  # thread -> [(start, end)] of its steps
    for e in steps:
        windows[(e.get("pid"), e.get("tid"))].append((e["ts"], e["ts"] + e.get("dur", 0)))

    def inside(e: dict) -> bool:
        spans = windows.get((e.get("pid"), e.get("tid")), ())
        return any(lo <= e["ts"] and e["ts"] + e.get("dur", 0) <= hi for lo, hi in spans)

    ops = [e for e in events if e.get("cat") in HOST_SELF_CATS and inside(e)]
    api = [e for e in events if e.get("cat") in HOST_API_CATS and inside(e)]
    self_times = defaultdict(lambda: [0, 0.0])
    for name, _, _, self_us in _cpu_self_times(ops + api):
        entry = self_times[name]
        entry[0] += 1
        entry[1] += self_us / 1e3
    covered = defaultdict(list)
    for e in ops + api:
        covered[(e.get("pid"), e.get("tid"))].append((e["ts"], e["ts"] + e.get("dur", 0)))
    step_ms = sum(hi - lo for spans in windows.values() for lo, hi in spans) / 1e3
    api_names = {e["name"] for e in api}
    return {
        "host_op_ms": sum(ms for name, (_, ms) in self_times.items() if name not in api_names),
        "host_blocking_ms": sum(e.get("dur", 0) for e in api if BLOCKING_CALL.search(e.get("name", ""))) / 1e3,
        "host_untraced_ms": step_ms - sum(_union_ms(spans) for spans in covered.values()),
        "host_ops": {name: {"calls": n, "ms": ms}
                     for name, (n, ms) in sorted(self_times.items(), key=lambda kv: -kv[1][1])},
    }


# ----------------------------------------------------------------------------- inputs


def _is_trace_name(name: str) -> bool:
    return name.endswith(TRACE_SUFFIXES)


def _rank_of(name: str, trace: dict, fallback: int) -> str:
    match = re.search(r"rank(\d+)", Path(name).name)
    if match:
        return match.group(1)
    info = trace.get("distributedInfo") or {}
    return str(info.get("rank", fallback))


def _iter_sources(path: Path):
    """(run, file name, bytes) of every trace file under ``path``."""
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file() and _is_trace_name(file.name):
                yield file.parent.name, str(file), file.read_bytes()
            elif file.is_file() and file.name.endswith(TAR_SUFFIXES) and tarfile.is_tarfile(file):
                yield from _iter_sources(file)
    elif path.is_file() and _is_trace_name(path.name):
        yield path.resolve().parent.name, str(path), path.read_bytes()
    elif path.is_file() and tarfile.is_tarfile(path):
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if member.isfile() and _is_trace_name(member.name):
                    parent = Path(member.name).parent.name or path.name
                    yield parent, f"{path}:{member.name}", tar.extractfile(member).read()
    else:
        print(f"profile_summary: skipped {path} (no trace files)", file=sys.stderr)


def collect_runs(paths: list[str | Path], keep_kernels: int | None = KEEP_KERNELS,
                 trace_prefix: str | None = None) -> dict:
    """{run: {"ranks": {rank: summary}, "files": [...], "notes": [...]}} in input order; with
    ``trace_prefix`` only the trace files whose names start with it (vLLM names a trace
    ``<profile_prefix>_dp..``: ``prefill16K_...``, ``decode8_...``)."""
    found: dict[str, dict[str, list[tuple[str, dict]]]] = {}
    for path in paths:
        for run, name, data in _iter_sources(Path(path)):
            if trace_prefix and not Path(name.rsplit(":", 1)[-1]).name.startswith(trace_prefix):
                continue
            try:
                trace = load_trace(data)
            except (OSError, ValueError, EOFError) as exc:
                print(f"profile_summary: skipped {name}: {exc}", file=sys.stderr)
                continue
            if not isinstance(trace, dict) or "traceEvents" not in trace:
                if "trace" in Path(name).name:  # other JSON (a run's logs beside its traces) quietly
                    print(f"profile_summary: skipped {name}: no traceEvents", file=sys.stderr)
                continue
            ranks = found.setdefault(run, {})
            ranks.setdefault(_rank_of(name, trace, len(ranks)), []).append((name, trace))
    runs = {}
    for run, ranks in found.items():
        entry = {"ranks": {}, "files": [], "notes": []}
        for rank in sorted(ranks, key=int):
            traces = sorted(ranks[rank], key=lambda nt: Path(nt[0]).name)
            if len(traces) > 1:
                entry["notes"].append(f"rank {rank}: {len(traces)} traces, the newest counted")
            name, trace = traces[-1]
            summary = summarize_trace(trace)
            if keep_kernels is not None:
                summary["kernels"] = dict(list(summary["kernels"].items())[:keep_kernels])
                summary["host_ops"] = dict(list(summary["host_ops"].items())[:keep_kernels])
            entry["ranks"][rank] = summary
            entry["files"].append(name)
        runs[run] = entry
    return runs


# ----------------------------------------------------------------------------- attribution
HOST_OP_CATS = {"cpu_op", "user_annotation", "python_function"}


def attribute_kernels(trace: dict, pattern: str = ".", depth: int = 3) -> list[tuple[str, str, int, float]]:
    """Which host ops launched the GPU work: for every kernel / memcpy / memset whose name
    matches ``pattern``, its launch (the runtime event with the same correlation id) and
    the innermost ``depth`` CPU ops enclosing that launch on its thread (engine-step
    annotations left out). Returns (ops, kernel, calls, ms), most ms first. Needs a trace
    recorded with CPU activity (vLLM's default)."""
    events = trace.get("traceEvents", [])
    regex = re.compile(pattern, re.IGNORECASE)
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    host_ops: dict = {}
    for e in events:
        if e.get("cat") in HOST_OP_CATS and e.get("ph") == "X" and not STEP_ANNOTATION.match(e["name"]):
            host_ops.setdefault(e["tid"], []).append(e)
    totals: dict[tuple[str, str], list] = {}
    for e in events:
        if e.get("cat") not in GPU_CATS or not regex.search(e["name"]):
            continue
        launch = launches.get(e.get("args", {}).get("correlation"))
        if launch is None:
            continue
        enclosing = [op for op in host_ops.get(launch["tid"], [])
                     if op["ts"] <= launch["ts"] and op["ts"] + op["dur"] >= launch["ts"] + launch["dur"]]
        enclosing.sort(key=lambda op: (op["ts"], -op["dur"]))  # outermost first
        key = (" > ".join(op["name"] for op in enclosing[-depth:]) or "(no host op)", e["name"])
        entry = totals.setdefault(key, [0, 0.0])
        entry[0] += 1
        entry[1] += e["dur"] / 1e3
    return sorted(((ops, name, n, ms) for (ops, name), (n, ms) in totals.items()), key=lambda r: -r[3])


def render_attribution(paths: list[str | Path], pattern: str, top: int) -> str:
    lines = []
    for path in paths:
        for run, name, data in _iter_sources(Path(path)):
            try:
                rows = attribute_kernels(load_trace(data), pattern)
            except (OSError, ValueError, EOFError) as exc:
                print(f"profile_summary: skipped {name}: {exc}", file=sys.stderr)
                continue
            lines += ["", f"### {run}: {Path(name).name}", ""]
            lines += _table(["host ops (outer > inner)", "GPU work", "calls", "ms"],
                            [[ops, kern[:60], str(n), _f(ms, ".3f")] for ops, kern, n, ms in rows[:top]])
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- tables

# CUDA runtime / driver calls on the host, and the ones among them that launch GPU work
# (kernels, CUDA graphs)
HOST_API_CATS = ("cuda_runtime", "cuda_driver")
LAUNCH_CALL = re.compile(r"LaunchKernel|GraphLaunch|LaunchCooperativeKernel")
# Calls that return only when the GPU has caught up (or a copy has landed): a host waiting on
# the device inside a step.
BLOCKING_CALL = re.compile(r"Synchronize|^cudaMemcpy$|^cuMemcpy(DtoH|HtoD)?(_v2)?$|^cudaMemcpy(To|From)Symbol$")
# Host events whose self time is the step's own work (python_function: traces with stacks).
HOST_SELF_CATS = ("cpu_op", "python_function")
HOST_TIMES = [("host: aten op / Python self time", "host_op_ms"),
              ("host: in blocking CUDA calls (syncs)", "host_blocking_ms"),
              ("host: untraced (between traced events)", "host_untraced_ms")]
HOST_COUNTS = [("host: kernel / graph launch calls", "host_launch_calls"), ("host: aten ops dispatched", "host_cpu_ops")]

TOTALS = [("kernel time (sum over streams)", "kernel_ms"), ("GPU busy (union of streams)", "busy_ms"),
          ("GPU span (first to last GPU event)", "span_ms"), ("GPU idle in span", "idle_ms"),
          ("engine step (execute_* annotation, CPU)", "step_ms"),
          ("host: CUDA runtime / driver call time", "host_api_ms")]


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def run_means(run: dict) -> dict:
    """A run's numbers as the mean over its ranks."""
    ranks = list(run["ranks"].values())
    out = {key: _mean([r.get(key) for r in ranks])
           for _, key in TOTALS + HOST_TIMES + HOST_COUNTS + [("", "launches"), ("", "steps")]}
    out["categories"] = {c: _mean([r["categories"].get(c, 0.0) for r in ranks]) or 0.0 for c in CATEGORIES}
    out["kernels"] = _mean_by_name([r["kernels"] for r in ranks])
    out["host_ops"] = _mean_by_name([r.get("host_ops", {}) for r in ranks])
    out["sources"] = sorted({r["source"] for r in ranks})
    return out


def _mean_by_name(per_rank: list[dict[str, dict]]) -> dict[str, dict]:
    """Per-name ``calls`` and ``ms`` summed over ranks / the rank count (a name a rank lacks
    counts 0 there), its other fields (a kernel's category) kept; most ms first."""
    out: dict[str, dict] = {}
    for entries in per_rank:
        for name, entry in entries.items():
            mean = out.setdefault(name, {**entry, "calls": 0.0, "ms": 0.0})
            mean["calls"] += entry["calls"] / len(per_rank)
            mean["ms"] += entry["ms"] / len(per_rank)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["ms"]))


def _f(value, spec=".2f") -> str:
    return "–" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def render_markdown(runs: dict, baseline: str | None = None, top: int = 15, level: str = "##",
                    title: str = "Prefill profile") -> str:
    """Categories side by side (mean over ranks, ms and share of kernel time; the difference
    to ``baseline``, default the first run), the totals, per-rank category times, and each
    run's top kernels."""
    runs = {name: run for name, run in runs.items() if run.get("ranks")}
    if not runs:
        return f"{level} {title}\n\nno trace files found\n"
    names = list(runs)
    base = baseline if baseline in runs else names[0]
    means = {name: run_means(runs[name]) for name in names}
    others = [n for n in names if n != base]
    lines = [f"{level} {title}: GPU time per category (ms, mean over ranks; share of kernel time)", ""]
    header = ["category"] + names + [f"{n} − {base}" for n in others]
    rows = []
    for category in CATEGORIES:
        values = {n: means[n]["categories"][category] for n in names}
        if not any(values.values()):
            continue
        row = [category]
        for n in names:
            total = means[n]["kernel_ms"] or 0.0
            row.append(f"{values[n]:.2f} ({values[n] / total:.0%})" if total else _f(values[n]))
        row += [f"{values[n] - values[base]:+.2f}" for n in others]
        rows.append(row)
    for label, key in TOTALS + HOST_TIMES:
        row = [f"**{label}**"] + [_f(means[n][key]) for n in names]
        row += [_f(None if means[n][key] is None or means[base][key] is None else means[n][key] - means[base][key],
                   "+.2f") for n in others]
        rows.append(row)
    rows.append(["GPU events / engine steps"] + [f"{means[n]['launches']:.0f} / {means[n]['steps']:.0f}"
                                                  for n in names] + ["" for _ in others])
    for label, key in HOST_COUNTS:
        row = [label] + ["–" if means[n][key] is None else f"{means[n][key]:.0f}" for n in names]
        row += ["" if means[n][key] is None or means[base][key] is None else f"{means[n][key] - means[base][key]:+.0f}"
                for n in others]
        rows.append(row)
    lines += _table(header, rows)
    sources = {n: means[n]["sources"] for n in names if means[n]["sources"] != ["gpu"]}
    if sources:
        lines += ["", "Not GPU time: " + "; ".join(f"{n}: {', '.join(s)}" for n, s in sources.items())]
    notes = [f"{n}: {note}" for n in names for note in runs[n].get("notes", [])]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes)]

    lines += ["", f"{level}# Per rank (ms)", ""]
    shown = [c for c in CATEGORIES if any(r["categories"].get(c) for run in runs.values()
                                          for r in run["ranks"].values())]
    rows = [[n, rank] + [_f(r["categories"].get(c, 0.0)) for c in shown]
            + [_f(r["kernel_ms"]), _f(r["busy_ms"]), _f(r["span_ms"]), _f(r["step_ms"])]
            for n in names for rank, r in runs[n]["ranks"].items()]
    lines += _table(["run", "rank"] + shown + ["kernel sum", "busy", "span", "step"], rows)

    if any(means[n]["host_ops"] for n in names):
        lines += ["", f"{level}# Host ops by self time inside the engine steps (ms, mean over ranks)", ""]
        op_names = list(dict.fromkeys(name for n in names for name in list(means[n]["host_ops"])[:top]))
        op_names.sort(key=lambda name: -max(means[n]["host_ops"].get(name, {}).get("ms", 0.0) for n in names))
        rows = [[name.replace("|", "/")[:70]]
                + [_f(means[n]["host_ops"][name]["ms"], ".3f") + f" ({means[n]['host_ops'][name]['calls']:g})"
                   if name in means[n]["host_ops"] else "–" for n in names]
                for name in op_names[:top]]
        lines += _table(["host op (calls)"] + names, rows)

    for n in names:
        lines += ["", f"{level}# Top kernels: {n} (mean over ranks)", ""]
        total = means[n]["kernel_ms"] or 0.0
        rows = [[name.replace("|", "/")[:90], k["category"], f"{k['calls']:g}", f"{k['ms']:.3f}",
                 f"{k['ms'] / total:.1%}" if total else "–"]
                for name, k in list(means[n]["kernels"].items())[:top]]
        lines += _table(["kernel", "category", "calls", "ms", "share"], rows)
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("paths", nargs="+", help="folders (a run per folder holding traces), trace files, tar archives")
    ap.add_argument("--baseline", help="run the differences are taken against (default: the first)")
    ap.add_argument("--top", type=int, default=15, help="kernels listed per run")
    ap.add_argument("--json", help="also write the per-rank summaries here")
    ap.add_argument("--trace-prefix", help="only trace files whose names start with this "
                                           "(e.g. prefill, decode: a run folder holding both profiles)")
    ap.add_argument("--title", default="Prefill profile", help="heading of the tables")
    ap.add_argument("--attribute", metavar="REGEX",
                    help="instead: per trace, the host ops that launched the GPU work matching REGEX")
    args = ap.parse_args(argv)
    if args.attribute:
        print(render_attribution(args.paths, args.attribute, args.top), end="")
        return
    runs = collect_runs(args.paths, trace_prefix=args.trace_prefix)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1) + "\n")
    print(render_markdown(runs, baseline=args.baseline, top=args.top, title=args.title), end="")


if __name__ == "__main__":
    main()
