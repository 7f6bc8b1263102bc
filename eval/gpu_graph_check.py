"""CUDA-graph replays vs eager runs of the plugin inside real vLLM (GPU host, staged stack).

For each configuration (TP / CP mode, KV dtype, MTP) the tiny V3.2 runs twice in fresh
processes, ``enforce_eager=True`` and with CUDA graphs (the plugin picks
FULL_DECODE_ONLY), on the same prompts with greedy sampling. Five requests make decode
batches that vLLM pads up to a capture size, so the graph runs replay padded batches.
Reported per configuration: greedy tokens equal or not (first divergence), how many
forwards were FULL-graph padded batches (the builder's plan trace), the plugin's CUDA
graph decision line, vLLM's graph-capture line, and the MTP acceptance counters.

    (device) source eval/gpu_env.sh && python3 eval/gpu_graph_check.py --out $OUT [names...]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

# name -> (tp, cp mode, kv cache dtype, num speculative tokens, dtype[, more cp_nsa options]);
# a CP mode splits every batch of >= N tokens (SPLIT_EVERY_BATCH, not the split policy's auto,
# which runs these short batches unsplit) unless the options say otherwise
SPLIT_EVERY_BATCH = {"decode_attention": "split", "min_tokens_for_cp": 0}
CONFIGS = {
    "tp1-bf16": (1, "off", "auto", 0, "bfloat16"),
    "tp1-fp32-mtp1": (1, "off", "auto", 1, "float32"),
    "tp2-rr-bf16": (2, "round-robin-split", "auto", 0, "bfloat16"),
    "tp2-rr-fp32-mtp1": (2, "round-robin-split", "auto", 1, "float32"),
    "tp2-inseq-fp32-mtp1": (2, "in-seq-split", "auto", 1, "float32"),
    "tp2-rr-fp8": (2, "round-robin-split", "fp8", 0, "bfloat16"),
    "tp2-rr-fp32-mtp2": (2, "round-robin-split", "auto", 2, "float32"),
    "tp2-rr-tpdecode-fp32-mtp1": (2, "round-robin-split", "auto", 1, "float32", {"decode_attention": "tp"}),
    # chunked prefill (128-token chunks, capture sizes up to 128: CHUNKED_CAPTURE_SIZES):
    # prefill and mixed batches replay breakable piecewise graphs, padded to a capture size
    "tp1-bf16-chunked": (1, "off", "auto", 0, "bfloat16"),
    "tp1-fp8-mtp1-chunked": (1, "off", "fp8", 1, "bfloat16"),
    "tp1-fp8-chunked": (1, "off", "fp8", 0, "bfloat16"),
    "tp1-bf16-mtp1-chunked": (1, "off", "auto", 1, "bfloat16"),
}
CHUNKED_CAPTURE_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128]
"""Graph sizes of the chunked cases. vLLM 0.34's default largest size is 2 x max_num_seqs (x the
decode query length): 16 tokens here, below every mixed batch of these prompts, so without these
sizes the piecewise graphs are captured but never replayed (the 2026-12-04 GPU run counted 0)."""
# engine arguments beyond the defaults, per configuration
LLM_OVERRIDES = {
    name: {"max_num_batched_tokens": 128, "compilation_config": {"cudagraph_capture_sizes": CHUNKED_CAPTURE_SIZES}}
    for name in CONFIGS if "-chunked" in name
}


def tiny_prompts() -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(_model()))
    texts = ["Hello, my name is", "The quick brown fox jumps over the lazy dog. " * 12,
             "Once upon a time " * 60, "1 2 3 4 5 6 7 8 9 10 " * 9, "a b c"]
    return [tok(t).input_ids for t in texts]


def _model() -> Path:
    from make_tiny_model import build_tiny_model

    return build_tiny_model("/tmp/tiny_v32_mtp", seed=0, mtp_friendly=True)


def run_one(name: str, eager: bool, out_dir: Path, prompts, max_tokens: int, timeout_s: float) -> dict:
    tp, mode, kv_dtype, num_spec, dtype, *more = CONFIGS[name]
    tag = f"{name}-{'eager' if eager else 'graph'}"
    trace = f"/tmp/cpnsa_trace_{tag}"
    for old in glob.glob(trace + ".rank*"):
        os.remove(old)
    cp_nsa = {"mode": mode, **(SPLIT_EVERY_BATCH if mode != "off" else {}), **(more[0] if more else {})}
    llm = {"model": str(_model()), "dtype": dtype, "tensor_parallel_size": tp, "max_model_len": 2048,
           "enforce_eager": eager, "max_num_seqs": 8, "gpu_memory_utilization": 0.3, "seed": 0,
           "kv_cache_dtype": kv_dtype, "additional_config": {"cp_nsa": cp_nsa}}
    llm.update(LLM_OVERRIDES.get(name, {}))
    if num_spec:
        llm["speculative_config"] = {"method": "mtp", "num_speculative_tokens": num_spec}
    spec = {"llm": llm, "prompts": prompts,
            "sampling": {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}}
    env = dict(os.environ, CP_NSA_TRACE_PLANS=trace)
    started = time.time()
    try:
        proc = subprocess.run([sys.executable, str(REPO / "plugin_tests/e2e/vllm_runner.py"), json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout_s)
        stdout, log, rc = proc.stdout, proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        log, rc = stdout + ((e.stderr or b"").decode() if isinstance(e.stderr, bytes) else (e.stderr or "")), "timeout"
    (out_dir / f"graph_check_{tag}.log").write_text(log)
    result = {"tag": tag, "rc": rc, "wall_s": round(time.time() - started, 1)}
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if lines:
        payload = json.loads(lines[-1][len("RESULT "):])
        result.update(tokens=[o["token_ids"] for o in payload["outputs"]], init_s=round(payload["init_s"], 1),
                      generate_s=round(payload["generate_s"], 2), spec_decode=payload["info"].get("spec_decode"))
    else:
        result["error"] = log[-3000:]
    lines = [json.loads(line) for path in glob.glob(trace + ".rank*") for line in open(path)]
    forwards = [line for line in lines if "strategy" in line]  # the builder's line per forward
    result["forwards"] = len(forwards)
    # forwards a piecewise graph replayed padded (the attention's eager break writes these)
    result["piecewise_padded_forwards"] = sum(1 for line in lines if line.get("piecewise_padded"))
    result["graph_padded_forwards"] = sum(1 for f in forwards if f.get("graph_padded"))
    result["graph_padded_examples"] = sorted({(f["num_tokens"], f["rows_per_rank"], f["strategy"])
                                              for f in forwards if f.get("graph_padded")})[:6]
    result["plugin_graph_line"] = next((m.group(0) for m in re.finditer(r"vllm_cp_nsa: CUDA graphs[^\n]*", log)), None)
    result["kernel_provider_line"] = next((m.group(0) for m in re.finditer(r"vllm_cp_nsa: kernel provider[^\n]*", log)), None)
    result["vllm_capture_line"] = next((m.group(0) for m in re.finditer(r"Graph capturing finished[^\n]*", log)), None)
    # vLLM logs one "Capturing CUDA graphs (<kind>, <mode>)" progress line per kind it captures
    result["vllm_captured_modes"] = sorted(set(re.findall(r"Capturing CUDA graphs \(([^)]*)\)", log)))
    result["cudagraph_mode_line"] = next((m.group(0) for m in re.finditer(r"[^\n]*cudagraph_mode[^\n]*", log)), None)
    return result


def compare(eager: dict, graph: dict) -> dict:
    if "tokens" not in eager or "tokens" not in graph:
        return {"equal": None}
    diverged = [(i, next(j for j, (a, b) in enumerate(zip(e, g)) if a != b))
                for i, (e, g) in enumerate(zip(eager["tokens"], graph["tokens"])) if e != g]
    return {"equal": not diverged, "first_divergence (request, token)": diverged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", default=list(CONFIGS))
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp"))
    parser.add_argument("--budget-s", type=float, default=500)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--timeout-s", type=float, default=240)
    args = parser.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = tiny_prompts()
    started = time.time()
    results = []
    for name in args.names:
        if time.time() - started > args.budget_s:
            results.append({"name": name, "skipped": "time budget"})
            continue
        eager = run_one(name, True, out_dir, prompts, args.max_tokens, args.timeout_s)
        graph = run_one(name, False, out_dir, prompts, args.max_tokens, args.timeout_s)
        row = {"name": name, "config": CONFIGS[name], **compare(eager, graph), "eager": eager, "graph": graph}
        results.append(row)
        print("RESULT", json.dumps({k: row[k] for k in ("name", "equal")}),
              f"padded graph forwards {graph['graph_padded_forwards']}/{graph['forwards']}",
              f"piecewise padded {graph['piecewise_padded_forwards']}",
              f"wall eager {eager['wall_s']}s graph {graph['wall_s']}s",
              f"spec {graph.get('spec_decode')}", flush=True)
        (out_dir / "graph_check.json").write_text(json.dumps(results, indent=1))
    print(f"total {time.time() - started:.0f}s")


if __name__ == "__main__":
    main()
