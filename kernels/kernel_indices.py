"""Sparse-attention indices in the forms the vLLM kernels take, each one Triton pass (the torch
forms are the references):

- :func:`kernel_indices`, FlashMLA's: int32, -1 for every index outside ``[0, num_slots)``
  (its fp8 kernel skips only -1), -1 padded to a whole number of top-k tiles;
- :func:`compact_kernel_indices`, FA3's paged varlen kernel's: per row the indices inside the
  cache first, in their order, -1 after them, and their count. FA3 reads only the first
  ``count`` entries of a row, so its cost follows the valid keys, where FlashMLA's sparse
  kernel pays for the whole top-k width even when most of it is -1 (short rows).
Both also take request-local positions with their ``Paging`` (row -> request -> block table) and
map them to slots in the same pass: decode rows skip the separate positions -> slots kernel
(``kernels/slots.py``), one launch a layer less (vLLM's own remaps its indices in one kernel).

The torch form of the first made four to five passes over the [rows, top-k] indices in every
layer (two compares, an or, the fill, the pad copy): elementwise work vLLM's own model does not do,
inside the +9.9 ms of such kernels a 16K prefill at -tp 1 spent over it on one H200
(``eval/results/profile_h200_n1_v034_prefill16K_1204.md``). Dispatch: Triton for CUDA
tensors, the reference elsewhere (tests force Triton under the CPU interpreter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .slots import positions_to_slots_ref, slots_of

_BLOCK = 1024


@dataclass(frozen=True)
class Paging:
    """Indices that are request-local positions: row ``m``'s request ``row_req[m]`` (-1: none)
    and the block table that maps its positions to cache slots (as ``kernels/slots.py``)."""

    row_req: torch.Tensor
    block_table: torch.Tensor
    block_size: int


@triton.jit
def _kernel_indices_kernel(idx_ptr, out_ptr, topk, padded, stride_idx, stride_out, num_slots,
                           req_ptr, table_ptr, stride_table, block_size,
                           FROM_POSITIONS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    idx = tl.load(idx_ptr + row * stride_idx + offs, mask=offs < topk, other=-1).to(tl.int64)
    idx = slots_of(idx, row, req_ptr, table_ptr, stride_table, block_size, FROM_POSITIONS)
    idx = tl.where((idx < 0) | (idx >= num_slots), -1, idx)
    tl.store(out_ptr + row * stride_out + offs, idx.to(tl.int32), mask=offs < padded)


def padded_topk(topk: int, multiple: int) -> int:
    """``topk`` rounded up to whole tiles of ``multiple`` (at least one tile)."""
    return max(1, -(-topk // multiple)) * multiple


def _slots_ref(indices: torch.Tensor, paging: Paging | None) -> torch.Tensor:
    """Reference: ``indices`` as cache slots (positions through ``paging``, kernels/slots.py)."""
    if paging is None:
        return indices
    rows = positions_to_slots_ref(indices.reshape(-1, indices.shape[-1]), paging.row_req, paging.block_table,
                                  paging.block_size)  # fmt: skip
    return rows.view(indices.shape)


def kernel_indices_ref(indices: torch.Tensor, num_slots: int, multiple: int, paging: Paging | None = None) -> torch.Tensor:
    """Reference: indices [..., K] (any integer dtype; positions with ``paging``) -> int32 [..., padded_topk(K)]."""
    indices = _slots_ref(indices, paging)
    valid = (indices >= 0) & (indices < num_slots)
    idx = torch.where(valid, indices, -1).to(torch.int32)
    return F.pad(idx, (0, padded_topk(indices.shape[-1], multiple) - indices.shape[-1]), value=-1).contiguous()


def kernel_indices(indices: torch.Tensor, num_slots: int, multiple: int, use_triton: bool | None = None,
                   paging: Paging | None = None) -> torch.Tensor:  # fmt: skip
    """Triton for CUDA tensors (capturable: no host sync), :func:`kernel_indices_ref` otherwise;
    ``use_triton=True`` runs the kernel anyway (the CPU interpreter in tests). With ``paging``
    the indices are request-local positions, mapped to slots in the same pass."""
    if indices.dim() < 1 or indices.dtype.is_floating_point or multiple < 1:
        raise ValueError(f"integer indices [..., K] and a tile multiple >= 1; got {indices.dtype} "
                         f"{tuple(indices.shape)}, multiple {multiple}")  # fmt: skip
    if not (indices.is_cuda if use_triton is None else use_triton) or indices.numel() == 0:
        return kernel_indices_ref(indices, num_slots, multiple, paging)
    topk = indices.shape[-1]
    padded = padded_topk(topk, multiple)
    rows = indices.reshape(-1, topk)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = torch.empty((rows.shape[0], padded), dtype=torch.int32, device=indices.device)
    grid = (rows.shape[0], triton.cdiv(padded, _BLOCK))
    _kernel_indices_kernel[grid](rows, out, topk, padded, rows.stride(0), out.stride(0), num_slots,
                                 *_paging_args(paging, rows), FROM_POSITIONS=paging is not None,
                                 BLOCK=_BLOCK, num_warps=4)  # fmt: skip
    return out.view(*indices.shape[:-1], padded)


def _paging_args(paging: Paging | None, rows: torch.Tensor) -> tuple:
    """(row_req, block_table, its row stride, block_size) for the kernels; placeholders without paging."""
    if paging is None:
        return rows, rows, 0, 1
    if paging.row_req.shape != rows.shape[:1] or paging.block_table.dim() != 2:
        raise ValueError(f"paging: row_req [rows] and block_table [R, B] for {rows.shape[0]} rows; got "
                         f"{tuple(paging.row_req.shape)}, {tuple(paging.block_table.shape)}")  # fmt: skip
    table = paging.block_table if paging.block_table.stride(-1) == 1 else paging.block_table.contiguous()
    return paging.row_req.contiguous(), table, table.stride(0), paging.block_size


@triton.jit
def _compact_kernel_indices_kernel(idx_ptr, out_ptr, counts_ptr, topk, stride_idx, stride_out, num_slots,
                                   req_ptr, table_ptr, stride_table, block_size,
                                   FROM_POSITIONS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """One program per row: each block's valid entries go to the running count plus their
    prefix rank, then -1 fills ``[count, topk)`` (disjoint addresses: no ordering needed)."""
    row = tl.program_id(0).to(tl.int64)
    count = 0
    for k0 in range(0, topk, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        idx = tl.load(idx_ptr + row * stride_idx + offs, mask=offs < topk, other=-1).to(tl.int64)
        idx = slots_of(idx, row, req_ptr, table_ptr, stride_table, block_size, FROM_POSITIONS)
        valid = (idx >= 0) & (idx < num_slots)
        valid_i = valid.to(tl.int32)
        dst = count + tl.cumsum(valid_i, 0) - valid_i
        tl.store(out_ptr + row * stride_out + dst, idx.to(tl.int32), mask=valid)
        count += tl.sum(valid_i, 0)
    for k0 in range(0, topk, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        tail = (offs >= count) & (offs < topk)
        tl.store(out_ptr + row * stride_out + offs, tl.full([BLOCK], -1, tl.int32), mask=tail)
    tl.store(counts_ptr + row, count)


def compact_kernel_indices_ref(indices: torch.Tensor, num_slots: int,
                               paging: Paging | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Reference: indices [..., K] (any integer dtype; positions with ``paging``) -> (int32 [..., K], int32 counts [...])."""
    indices = _slots_ref(indices, paging)
    valid = (indices >= 0) & (indices < num_slots)
    valid_first = torch.sort((~valid).to(torch.int8), dim=-1, stable=True).indices
    idx = torch.where(valid, indices, -1).gather(-1, valid_first).to(torch.int32)
    return idx.contiguous(), valid.sum(-1, dtype=torch.int32)


def compact_kernel_indices(indices: torch.Tensor, num_slots: int, use_triton: bool | None = None,
                           paging: Paging | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per row, the indices in ``[0, num_slots)`` first (their order kept), -1 after them, and
    how many: (int32 [..., K] contiguous, int32 [...]). Dispatch and ``paging`` as :func:`kernel_indices`."""
    if indices.dim() < 1 or indices.dtype.is_floating_point:
        raise ValueError(f"integer indices [..., K]; got {indices.dtype} {tuple(indices.shape)}")
    if not (indices.is_cuda if use_triton is None else use_triton) or indices.numel() == 0:
        return compact_kernel_indices_ref(indices, num_slots, paging)
    topk = indices.shape[-1]
    rows = indices.reshape(-1, topk)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    out = torch.empty((rows.shape[0], topk), dtype=torch.int32, device=indices.device)
    counts = torch.empty(rows.shape[0], dtype=torch.int32, device=indices.device)
    _compact_kernel_indices_kernel[(rows.shape[0],)](
        rows, out, counts, topk, rows.stride(0), out.stride(0), num_slots, *_paging_args(paging, rows),
        FROM_POSITIONS=paging is not None, BLOCK=_BLOCK, num_warps=4,
    )
    return out.view(indices.shape), counts.view(indices.shape[:-1])
