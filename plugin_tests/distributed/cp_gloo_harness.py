"""Multi-process gloo harness and shared builders for the distributed CP tests.

``run_ranks(body, world, *args)`` forks ``world`` processes, each joins a gloo
process group (TCP on a free localhost port), runs ``body(group, *args)`` and
returns whatever it returns (pickled through a file) to the parent as a list
indexed by rank. A worker exception is re-raised in the parent with its
traceback; a run that does not finish within ``timeout`` (a hang in a
collective) kills the workers and fails.

Only the processes started here are ever killed, by their own handles.
"""

from __future__ import annotations

import datetime
import pickle
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vllm_cp_nsa.communicator import TorchDistGroup
from vllm_cp_nsa.kernels.attention_ref import slots_from_positions
from vllm_cp_nsa.nsa_attention import NsaCaches
from vllm_cp_nsa.reference_model import PagedBatch

DEFAULT_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, body: Callable, args: tuple) -> None:
    torch.set_num_threads(1)  # 2 cores, up to 4 ranks: no intra-op threads
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S),
    )
    try:
        result = body(TorchDistGroup(), *args)
        with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(body: Callable, world: int, *args: Any, timeout: float = DEFAULT_TIMEOUT_S) -> list[Any]:
    with tempfile.TemporaryDirectory(prefix="cp_gloo_") as out_dir:
        ctx = mp.start_processes(
            _entry, args=(world, free_port(), out_dir, body, args), nprocs=world, join=False,
            start_method="fork",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.05, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{getattr(body, '__name__', body)} on {world} ranks did not finish in {timeout:.0f} s "
                        f"(hang in a collective?)"
                    )
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                    proc.join(5)
        results = []
        for rank in range(world):
            with open(Path(out_dir) / f"rank{rank}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results


# ----------------------------------------------------------------------- a world of one
class LocalGroup:
    """``CpGroup`` of a single process (the no-CP, full-weight oracle)."""

    world_size = 1
    rank = 0

    def all_gather(self, x):
        return x.contiguous()

    def reduce_scatter(self, x):
        return x.contiguous()

    def all_reduce(self, x):
        return x

    def all_to_all(self, x, output_split_sizes, input_split_sizes):
        return x.contiguous()


# ----------------------------------------------------------------------- metrics
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (inf when shapes differ or out has NaN)."""
    if out.shape != ref.shape:
        return float("inf")
    if out.numel() == 0:
        return 0.0
    diff = (out.double() - ref.double()).abs().max().item()
    if diff != diff:  # NaN
        return float("inf")
    return diff / max(ref.double().abs().max().item(), 1e-30)


def gather_objects(group: TorchDistGroup, obj: Any) -> list[Any]:
    out = [None] * group.world_size
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------- batches and caches
def paged_batch(query_lens: Sequence[int], context_lens: Sequence[int], block_size: int = 16,
                null_block: bool = False) -> PagedBatch:
    """``PagedBatch`` with room for every request; ``null_block`` shifts all blocks
    by one so block 0 (slots 0..block_size-1) is never used, like vLLM's null block."""
    need = max(q + c for q, c in zip(query_lens, context_lens)) if query_lens else 1
    batch = PagedBatch(list(query_lens), list(context_lens), block_size, -(-need // block_size) + 1)
    if null_block:
        batch.slot_mapping = batch.slot_mapping + block_size
        batch.block_table = batch.block_table + 1
    return batch


def num_cache_blocks(batch: PagedBatch, null_block: bool = False) -> int:
    return batch.num_blocks + (1 if null_block else 0)


def context_slots(batch: PagedBatch) -> torch.Tensor:
    """Cache slots of every request's already-cached context (positions < context_len)."""
    slots = []
    for r, c in enumerate(batch.context_lens):
        if c:
            pos = torch.arange(c)[None]
            slots.append(slots_from_positions(batch.block_table[r][None], pos, batch.block_size)[0])
    return torch.cat(slots) if slots else torch.empty(0, dtype=torch.long)


def fill_context(caches: Sequence[NsaCaches], batch: PagedBatch, seed: int, poison: float | None = None) -> None:
    """Random (seeded, identical on every rank) context rows in every layer's caches;
    every other slot set to ``poison`` when given (NaN / sentinel)."""
    gen = torch.Generator().manual_seed(seed)
    slots = context_slots(batch)
    for cache in caches:
        for buf in (cache.latent, cache.index):
            flat = buf.view(-1, buf.shape[-1])
            if poison is not None:
                flat.fill_(poison)
            flat[slots] = torch.randn(len(slots), flat.shape[-1], generator=gen).to(flat.dtype)
