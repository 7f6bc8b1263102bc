"""Host-side checks of one layer's batch: every index the attention's kernels will follow
(rows' requests, their key ranges, the blocks holding those keys, the new tokens' slots),
read back and checked against the block table and the caches.

A wrong index inside a CUDA kernel faults asynchronously: "illegal memory access", reported by
whatever call comes next (the held fp8 + MTP piecewise graphs reported it in the Triton
indexer's row prep, 2026-12-03). These checks name the broken invariant instead. They read
the device (a sync per layer) and cannot run inside a graph capture, so they are off unless
``VLLM_CP_NSA_CHECK_BOUNDS=1``, and skipped while a stream captures.
"""

from __future__ import annotations

import os

import torch

CHECK_BOUNDS_ENV = "VLLM_CP_NSA_CHECK_BOUNDS"


def bounds_checks_enabled() -> bool:
    return os.environ.get(CHECK_BOUNDS_ENV, "0") == "1"


def batch_bounds_errors(
    local_req: torch.Tensor,
    kv_len: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    num_blocks: int,
) -> list[str]:
    """What is out of bounds in a layer's batch, one line each (empty: nothing).

    ``local_req`` / ``kv_len`` [rows]: each local row's request (-1: padding) and how many keys
    it attends over (its position + 1); ``slot_mapping`` [tokens]: the new tokens' cache slots
    (-1: none); ``block_table`` [requests, columns]; ``num_blocks``: the caches' blocks."""
    errors = []
    req, keys = local_req.long().cpu(), kv_len.long().cpu()
    table = block_table.long().cpu()
    if req.shape != keys.shape:
        return [f"{req.shape[0]} local rows but {keys.shape[0]} key lengths"]
    if (req < -1).any() or (req >= table.shape[0]).any():
        errors.append(f"local rows name requests {int(req.min())}..{int(req.max())} of a "
                      f"{table.shape[0]}-request block table")  # fmt: skip
    real = (req >= 0) & (req < table.shape[0])
    width = table.shape[1] * block_size
    if (keys[real] < 1).any():
        errors.append(f"real rows with no keys: rows {_first(real & (keys < 1))}")
    beyond = real & (keys > width)
    if beyond.any():
        errors.append(f"key ranges up to {int(keys[beyond].max())} beyond the block table's {table.shape[1]} "
                      f"columns x {block_size} = {width} positions: rows {_first(beyond)}")  # fmt: skip
    for r in req[real].unique().tolist():
        used = min(table.shape[1], -(-int(keys[req == r].max()) // block_size))
        blocks = table[r, :used]
        bad = (blocks < 0) | (blocks >= num_blocks)
        if bad.any():
            errors.append(f"request {r}: block-table columns {_first(bad)} name blocks "
                          f"{blocks[bad][:4].tolist()} of a {num_blocks}-block cache")  # fmt: skip
    slots = slot_mapping.long().cpu()
    bad_slots = (slots < -1) | (slots >= num_blocks * block_size)
    if bad_slots.any():
        errors.append(f"new tokens {_first(bad_slots)} map to slots {slots[bad_slots][:4].tolist()} of "
                      f"{num_blocks * block_size}")  # fmt: skip
    return errors


def check_batch_bounds(
    local_req: torch.Tensor,
    kv_len: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_table: torch.Tensor,
    block_size: int,
    num_blocks: int,
    layer: str = "",
) -> None:
    """Raise ValueError naming what is out of bounds (skipped while a CUDA stream captures)."""
    if local_req.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    errors = batch_bounds_errors(local_req, kv_len, slot_mapping, block_table, block_size, num_blocks)
    if errors:
        raise ValueError(f"vllm_cp_nsa bounds check ({CHECK_BOUNDS_ENV}=1){' ' + layer if layer else ''}: "
                         + "; ".join(errors))  # fmt: skip


def _first(mask: torch.Tensor, count: int = 4) -> list[int]:
    return mask.nonzero().flatten()[:count].tolist()
