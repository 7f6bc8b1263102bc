"""Host time of the plugin's per-forward metadata (``build_forward_metadata``), the host work a
decode step adds to vLLM's own (issue 18: no larger than vLLM's).

Runs on the CPU, no vLLM engine: the builder with persistent buffers, as the metadata builder
calls it each step, for decode / verify batches and one prefill. Prints a table and writes JSON.
    python eval/bench_forward_metadata.py [--out eval/results/forward_metadata_host_<tag>.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from vllm_cp_nsa.nsa_attention import MetadataBuffers, build_forward_metadata
from vllm_cp_nsa.split_plan import RoundRobinSplit

SHAPES = {  # name: (query lens, max decode query len, cp size, strategy)
    "decode b1": ([1], 1, 1, None),
    "decode b8": ([1] * 8, 1, 1, None),
    "decode b64": ([1] * 64, 1, 1, None),
    "verify b8 (MTP k=1)": ([2] * 8, 2, 1, None),
    "decode b8, cp 4 round-robin": ([1] * 8, 1, 4, RoundRobinSplit()),
    "prefill 4K": ([4096], 1, 1, None),
}


def time_one(query_lens, max_decode, cp, strategy, calls: int) -> float:
    n = sum(query_lens)
    buffers = MetadataBuffers(8192, "cpu")
    kwargs = dict(query_lens=query_lens, slot_mapping=torch.arange(n, dtype=torch.long) + 1000,
                  block_table=torch.zeros(len(query_lens), 1024, dtype=torch.int32), block_size=64, cp_size=cp,
                  cp_rank=0, strategy=strategy, min_tokens_for_cp=0, max_decode_query_len=max_decode, device="cpu",
                  num_input_tokens=n, graph_padded=False, buffers=buffers, max_seq_len=8192,
                  seq_lens=[1100 + i for i in range(len(query_lens))])  # fmt: skip
    for _ in range(max(10, calls // 10)):
        build_forward_metadata(**kwargs)
    start = time.perf_counter()
    for _ in range(calls):
        build_forward_metadata(**kwargs)
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = {name: time_one(*shape, calls=args.calls) for name, shape in SHAPES.items()}
    print(f"build_forward_metadata, us per call ({platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads)")
    for name, us in rows.items():
        print(f"  {name:30s} {us:9.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"us_per_call": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "calls": args.calls}, f, indent=1)


if __name__ == "__main__":
    main()
