"""TTFT of a DeepSeek-V3.2-dimension layer stack under CP vs TP-attention (torchrun).

One process per GPU (NCCL) or per CPU rank (gloo, for a small smoke run). For
every workload it runs, on the same ranks and weights:
- ``tp-attn``: what vLLM's TP does: attention heads split across ranks, the
  indexer on every rank over all tokens, attention output all-reduced, MoE
  TP-sharded + all-reduce;
- ``in-seq-split`` and ``round-robin-split``: the plugin's CP (all heads + indexer
  on each rank's own rows, KV all-gathered, MoE through the full communicator).
It reports wall time of the whole prefill forward (TTFT of the stack), the time
in attention + indexer, in the KV all-gather and in the MoE all-gather /
reduce-scatter, and µs per token.

  torchrun --nproc_per_node=4 eval/bench_ttft.py --out DIR            # GPUs
  torchrun --nproc_per_node=2 eval/bench_ttft.py --smoke --out DIR    # CPU, tiny dims
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vllm_cp_nsa.communicator import FullMoeCommunicator, TorchDistGroup
from vllm_cp_nsa.kernels.dispatch import get_ops
from vllm_cp_nsa.nsa_attention import build_forward_metadata
from vllm_cp_nsa.reference_model import (
    Dims, LayerStack, NsaLayer, PagedBatch, ShardedMlp, ShardedMoe, _rms_norm, make_caches, random_hidden,
)
from vllm_cp_nsa.split_plan import InSeqSplit, RoundRobinSplit

BLOCK = 64


class TimedGroup(TorchDistGroup):
    """Times every collective with CUDA events (or wall clock on CPU), by kind."""

    def __init__(self, group=None, kv_width: int = 704):
        super().__init__(group)
        self.kv_width = kv_width
        self.pending: list[tuple[str, object, object]] = []
        self.enabled = False

    def _timed(self, kind, fn, *args):
        if not self.enabled:
            return fn(*args)
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args)
            end.record()
        else:
            start = time.perf_counter()
            out = fn(*args)
            end = time.perf_counter()
        self.pending.append((kind, start, end))
        return out

    def all_gather(self, x):
        kind = "kv_all_gather" if x.shape[-1] == self.kv_width else "moe_all_gather"
        return self._timed(kind, super().all_gather, x)

    def reduce_scatter(self, x):
        return self._timed("moe_reduce_scatter", super().reduce_scatter, x)

    def all_reduce(self, x):
        return self._timed("all_reduce", super().all_reduce, x)

    def collect(self) -> dict[str, float]:
        totals: dict[str, float] = defaultdict(float)
        for kind, start, end in self.pending:
            totals[kind] += start.elapsed_time(end) if torch.cuda.is_available() else (end - start) * 1e3
        self.pending.clear()
        return dict(totals)


class AttentionTimer:
    """Wraps every layer's attention to time it (attention + indexer + KV gather/write)."""

    def __init__(self):
        self.pending = []
        self.enabled = False

    def wrap(self, module):
        forward = module.forward

        def timed(*args, **kwargs):
            if not self.enabled:
                return forward(*args, **kwargs)
            if torch.cuda.is_available():
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = forward(*args, **kwargs)
                end.record()
            else:
                start, out, end = time.perf_counter(), forward(*args, **kwargs), None
                end = time.perf_counter()
            self.pending.append((start, end))
            return out

        module.forward = timed

    def collect(self) -> float:
        total = sum(s.elapsed_time(e) if torch.cuda.is_available() else (e - s) * 1e3 for s, e in self.pending)
        self.pending.clear()
        return total


class PaddedHeadsOps:
    """vLLM pads each TP rank's query heads to a multiple of 64 for FlashMLA sparse on
    Hopper (flashmla_sparse.py, prefill_padding); the TP baseline can do the same."""

    def __init__(self, ops, multiple: int):
        self.ops, self.multiple = ops, multiple

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def _pad(self, q, dim):
        pad = -q.shape[dim] % self.multiple
        if not pad:
            return q, q.shape[dim]
        shape = list(q.shape)
        shape[dim] = pad
        return torch.cat([q, q.new_zeros(shape)], dim=dim), q.shape[dim]

    def sparse_mla_prefill(self, q, kv_cache, indices, sm_scale, d_v=512, kv_cache_dtype="auto"):
        heads = q.shape[1]
        qp, _ = self._pad(q, 1)
        out, lse = self.ops.sparse_mla_prefill(qp, kv_cache, indices, sm_scale, d_v, kv_cache_dtype)
        return out[:, :heads], lse[:, :heads]

    def sparse_mla_decode_positions(self, q, kv_cache, positions, row_req, block_table, block_size, sm_scale,
                                    d_v=512, kv_cache_dtype="auto", forward_state=None):  # fmt: skip
        heads = q.shape[2]
        qp, _ = self._pad(q, 2)
        out, lse = self.ops.sparse_mla_decode_positions(qp, kv_cache, positions, row_req, block_table, block_size,
                                                        sm_scale, d_v, kv_cache_dtype, forward_state)  # fmt: skip
        return out[:, :, :heads], lse[:, :, :heads]

    def sparse_mla_decode(self, q, kv_cache, indices, sm_scale, d_v=512, kv_cache_dtype="auto", forward_state=None):
        heads = q.shape[2]
        qp, _ = self._pad(q, 2)
        out, lse = self.ops.sparse_mla_decode(qp, kv_cache, indices, sm_scale, d_v, kv_cache_dtype, forward_state)
        return out[:, :, :heads], lse[:, :, :heads]


class TpAttentionStack(torch.nn.Module):
    """vLLM-TP-style baseline: heads split, indexer replicated, outputs all-reduced."""

    def __init__(self, dims: Dims, num_layers: int, seed: int, group, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        world, rank = group.world_size, group.rank
        self.local_dims = Dims(**{**dims.__dict__, "heads": dims.heads // world})
        self.layers = torch.nn.ModuleList()
        for i in range(num_layers):
            attn = NsaLayer(dims, gen, dtype)
            heads = slice(rank * dims.heads // world, (rank + 1) * dims.heads // world)
            qk = dims.nope + dims.rope
            attn.q_b.data = attn.q_b.data.view(dims.heads, qk, -1)[heads].reshape(-1, dims.q_lora).contiguous()
            attn.w_uk_t.data = attn.w_uk_t.data[heads].contiguous()
            attn.w_uv.data = attn.w_uv.data[heads].contiguous()
            attn.o.data = attn.o.data.view(dims.hidden, dims.heads, dims.v_head)[:, heads].reshape(dims.hidden, -1).contiguous()
            attn.dims = self.local_dims
            mlp = (ShardedMlp(dims.hidden, dims.dense_inter, gen, rank, world, dtype) if i == 0
                   else ShardedMoe(dims, gen, rank, world, dtype))
            self.layers.append(torch.nn.ModuleDict({"attn": attn, "mlp": mlp}))
        self.ones = torch.nn.Parameter(torch.ones(dims.hidden, dtype=dtype), requires_grad=False)

    def forward(self, hidden, batch, caches, group, ops):
        meta = build_forward_metadata(batch.query_lens, batch.slot_mapping.to(hidden.device),
                                      batch.block_table.to(hidden.device), batch.block_size, group.world_size,
                                      group.rank, None, 0, 1, hidden.device)
        positions = batch.positions.to(hidden.device)
        x, residual = hidden, None
        for layer, cache in zip(self.layers, caches):
            residual = x if residual is None else x + residual
            h = group.all_reduce(layer["attn"](_rms_norm(residual, self.ones), positions, meta, cache, group, ops))
            residual = residual + h
            x = group.all_reduce(layer["mlp"](_rms_norm(residual, self.ones)))
        return _rms_norm(x + residual, self.ones)


def workloads(smoke: bool) -> dict[str, tuple[list[int], list[int]]]:
    """name -> (query_lens, context_lens)."""
    if smoke:
        return {"single 256": ([256], [0]), "4x64 + 8 decodes": ([64] * 4 + [1] * 8, [0] * 4 + [100] * 8)}
    out = {f"single {n // 1024}K": ([n], [0]) for n in (1024, 4096, 16384, 32768, 65536)}
    out["8x1K"] = ([1024] * 8, [0] * 8)
    out["4x4K + 32 decodes"] = ([4096] * 4 + [1] * 32, [0] * 4 + [4096] * 32)
    return out


def run(args) -> None:
    backend = "nccl" if torch.cuda.is_available() and not args.smoke else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    dims = Dims(topk=32) if args.smoke else Dims.deepseek_v32(experts=args.experts)
    ops = get_ops("torch" if args.smoke else "triton", device)
    tp_ops = PaddedHeadsOps(ops, args.pad_tp_heads) if args.pad_tp_heads > 1 else ops
    group = TimedGroup(kv_width=dims.kv_lora + dims.rope + dims.index_dim)
    timer = AttentionTimer()
    comm = FullMoeCommunicator()
    stacks = {
        "tp-attn": TpAttentionStack(dims, args.layers, 0, group, dtype).to(device),
        "cp": LayerStack(dims, args.layers, 0, group, comm, dtype).to(device),
    }
    for stack in stacks.values():
        for layer in stack.layers:
            timer.wrap(layer["attn"] if isinstance(layer, torch.nn.ModuleDict) else layer.attn)
    modes = [("tp-attn", "tp-attn", None), ("in-seq-split", "cp", InSeqSplit()),
             ("round-robin-split", "cp", RoundRobinSplit())]
    rows = []
    reference = None
    for name, (query_lens, context_lens) in workloads(args.smoke).items():
        max_blocks = -(-(max(q + c for q, c in zip(query_lens, context_lens))) // BLOCK)
        batch = PagedBatch(query_lens, context_lens, BLOCK, max_blocks)
        num_tokens = sum(query_lens)
        hidden = random_hidden(num_tokens, dims.hidden, seed=1, dtype=dtype).to(device)
        caches = make_caches(dims, args.layers, batch.num_blocks, BLOCK, "auto", dtype, device)
        for mode, stack_name, strategy in modes:
            stack = stacks[stack_name]

            def forward():
                if stack_name == "tp-attn":
                    return stack(hidden, batch, caches, group, tp_ops)
                return stack(hidden, batch, caches, group, strategy, ops)

            for _ in range(args.warmup):
                result = forward()
            # The modes compute the same function of the same weights: check it.
            reference = result if mode == "tp-attn" else reference
            rel_err = ((result.float() - reference.float()).norm() / reference.float().norm()).item()
            samples = []
            breakdown = defaultdict(float)
            for _ in range(args.iters):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                dist.barrier()
                group.enabled = timer.enabled = True
                start = time.perf_counter()
                forward()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                samples.append((time.perf_counter() - start) * 1e3)
                group.enabled = timer.enabled = False
                for kind, ms in group.collect().items():
                    breakdown[kind] += ms / args.iters
                breakdown["attention"] += timer.collect() / args.iters
            t = torch.tensor([sorted(samples)[len(samples) // 2]], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # TTFT = slowest rank
            b = {k: torch.tensor([v], device=device) for k, v in sorted(breakdown.items())}
            for v in b.values():
                dist.all_reduce(v, op=dist.ReduceOp.MAX)
            row = {"workload": name, "tokens": num_tokens, "mode": mode, "ttft_ms": t.item(),
                   "rel_err_vs_tp_attn": rel_err,
                   "us_per_token": t.item() * 1e3 / num_tokens, **{f"{k}_ms": v.item() for k, v in b.items()}}
            rows.append(row)
            if rank == 0:
                print(json.dumps(row), flush=True)
        del caches
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rank == 0:
        write_report(rows, args, world, device)
    dist.destroy_process_group()


def write_report(rows, args, world, device) -> None:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (gloo smoke)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = f"n{world}" + (f"_pad{args.pad_tp_heads}" if args.pad_tp_heads > 1 else "")
    (out / f"ttft_{tag}.json").write_text(json.dumps({"card": card, "world": world, "layers": args.layers,
                                                       "experts": args.experts, "rows": rows}, indent=1))
    by = {(r["workload"], r["mode"]): r for r in rows}
    setup = ("tiny dims, fp32, torch reference ops, gloo" if args.smoke else
             f"hidden 7168, 128 heads, kv_lora 512, rope 64, indexer 64x128, top-k 2048, bf16, Triton kernels, NCCL; "
             f"{args.layers} layers (first dense, then MoE with {args.experts} experts, 8 active + 1 shared)")
    lines = [f"# TTFT of a DeepSeek-V3.2-dimension stack, {world} x {card}", "",
             f"{setup}. TP baseline query heads padded to a multiple of {args.pad_tp_heads} per rank. "
             f"Median of {args.iters} after {args.warmup} warm-up; slowest rank. "
             "'attention+indexer' includes the KV all-gather and cache writes; 'MoE AG+RS' includes the "
             "one exit all-gather of the final hidden states.", "",
             "| workload | tokens | mode | TTFT ms | µs/token | attention+indexer ms | KV all-gather ms | "
             "MoE AG+RS ms | all-reduce ms | speed-up vs tp-attn (total / attention) | rel err vs tp-attn |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = by[(r["workload"], "tp-attn")]
        lines.append(
            f"| {r['workload']} | {r['tokens']} | {r['mode']} | {r['ttft_ms']:.1f} | {r['us_per_token']:.1f} | "
            f"{r.get('attention_ms', 0):.1f} | {r.get('kv_all_gather_ms', 0):.2f} | "
            f"{r.get('moe_all_gather_ms', 0) + r.get('moe_reduce_scatter_ms', 0):.2f} | "
            f"{r.get('all_reduce_ms', 0):.2f} | {base['ttft_ms'] / r['ttft_ms']:.2f}x / "
            f"{base.get('attention_ms', 0) / max(r.get('attention_ms', 1e-9), 1e-9):.2f}x | "
            f"{r['rel_err_vs_tp_attn']:.1e} |")
    (out / f"ttft_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="eval/results/tmp")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="tiny dims on CPU/gloo with the torch ops")
    ap.add_argument("--pad-tp-heads", type=int, default=1,
                    help="pad the TP baseline's per-rank query heads to this multiple (vLLM: 64 on Hopper)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
