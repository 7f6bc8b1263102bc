"""Rows of a sparse-attention result whose index list holds no valid slot: out = 0,
lse = -inf, in place (the reference's values; FlashMLA leaves +inf / undefined values there).

Only padding rows have no keys, so the Triton kernel reads each row's indices and writes
nothing but those rows. The torch form (``masked_fill`` over the whole output) cost a full
copy and pass of a [rows, 128, 512] tensor per layer: 7 ms of a 16K prefill on 2x H100
(2026-11-28 profile). Reference: :func:`rows_without_keys_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_K = 512
_BLOCK_E = 1024


@triton.jit
def _zero_rows_without_keys_kernel(
    out_ptr,
    lse_ptr,
    idx_ptr,
    topk,
    row_elems,
    num_heads,
    stride_out,
    stride_lse,
    stride_lse_head,
    stride_idx,
    BLOCK_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    valid = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k0 in range(0, topk, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_ptr + row * stride_idx + offs, mask=offs < topk, other=-1)
        valid = tl.maximum(valid, (idx >= 0).to(tl.int32))
    # element limits: the row's sizes when it has no valid index, else 0 (nothing written)
    empty = tl.max(valid, axis=0) == 0
    elems_limit = tl.where(empty, row_elems, 0)
    heads_limit = tl.where(empty, num_heads, 0)
    for e0 in range(0, row_elems, BLOCK_E):
        offs = e0 + tl.arange(0, BLOCK_E)
        zeros = tl.zeros([BLOCK_E], dtype=out_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_out + offs, zeros, mask=offs < elems_limit)
    offs_h = tl.arange(0, 256)
    for h0 in range(0, num_heads, 256):
        h = h0 + offs_h
        tl.store(lse_ptr + row * stride_lse + h * stride_lse_head, tl.full([256], float("-inf"), tl.float32),
                 mask=h < heads_limit)  # fmt: skip


def rows_without_keys_ref(out: torch.Tensor, lse: torch.Tensor, indices: torch.Tensor):
    """Torch reference (out of place): out [..., H, D], lse [..., H], indices [..., K]."""
    has_key = (indices >= 0).any(dim=-1)
    return out.masked_fill(~has_key[..., None, None], 0.0), lse.masked_fill(~has_key[..., None], float("-inf"))


def _rows(t: torch.Tensor, trailing: int) -> torch.Tensor | None:
    """``t`` as [rows, *trailing dims] without a copy (flatten copies when the leading
    dims do not collapse: then another address), or None."""
    flat = t.flatten(0, t.dim() - trailing - 1) if t.dim() > trailing + 1 else t
    return flat if flat.data_ptr() == t.data_ptr() else None


def zero_rows_without_keys(out: torch.Tensor, lse: torch.Tensor, indices: torch.Tensor,
                           use_triton: bool | None = None):  # fmt: skip
    """In place by the Triton kernel for CUDA tensors (``use_triton=True``: anyway, the CPU
    interpreter in tests) whose layout fits (each row's [H, D] block contiguous, fp32 lse),
    else the reference; returns (out, lse)."""
    if out.shape[:-2] != indices.shape[:-1] or lse.shape != out.shape[:-1]:
        raise ValueError(f"out {tuple(out.shape)}, lse {tuple(lse.shape)} and indices "
                         f"{tuple(indices.shape)} must share their leading dims")  # fmt: skip
    num_heads, dim = out.shape[-2:]
    out2, lse2, idx2 = _rows(out, 2), _rows(lse, 1), _rows(indices, 1)
    fits = (
        (out.is_cuda if use_triton is None else use_triton)
        and None not in (out2, lse2, idx2)
        and out.stride(-1) == 1 and out.stride(-2) == dim
        and indices.stride(-1) == 1 and lse.dtype == torch.float32
    )  # fmt: skip
    if not fits:
        return rows_without_keys_ref(out, lse, indices)
    if out2.shape[0]:
        _zero_rows_without_keys_kernel[(out2.shape[0],)](
            out2, lse2, idx2, idx2.shape[1], num_heads * dim, num_heads, out2.stride(0),
            lse2.stride(0), lse2.stride(1), idx2.stride(0), BLOCK_K=_BLOCK_K, BLOCK_E=_BLOCK_E,
            num_warps=4,
        )  # fmt: skip
    return out, lse

