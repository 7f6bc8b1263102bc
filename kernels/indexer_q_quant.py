"""Triton fp8 quantization of the indexer queries for DeepGEMM's MQA logits.

Per row and head, the indexer-key recipe of :func:`kv_cache_ref.quantize_indexer_fp8`
(scale = max(amax, 1e-4) / 448 rounded up to a power of two, values / scale to e4m3fn with
round-to-nearest-even), the scale folded into that head's weight (``relu(s x) w =
relu(x) s w`` for ``s > 0``), heads zero-padded to the count DeepGEMM takes. vLLM fuses the
same into its ``_fused_q_kernel``; unfused in torch it was several full passes over the
queries per layer (2026-11-28 H100 profile). One program quantizes ``BLOCK_R`` rows of one
head. Reference: :func:`kv_cache_ref.quantize_indexer_queries`; the bytes are identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import quantize_rows_ue8m0
from .kv_cache_ref import INDEX_HEAD_DIM, quantize_indexer_queries as quantize_indexer_queries_ref

_BLOCK_R = 16


@triton.jit
def _quantize_indexer_q_kernel(
    q_ptr,
    w_ptr,
    q8_ptr,
    w8_ptr,
    num_rows,
    num_heads,
    stride_qr,
    stride_qh,
    stride_wr,
    num_heads_out,
    BLOCK_R: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    rows = (pid * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    row_ok = rows < num_rows
    real = row_ok & ((rows * 0 + head) < num_heads)  # padded heads: zero queries, zero weights
    offs_d = tl.arange(0, 128)
    x = tl.load(
        q_ptr + rows[:, None] * stride_qr + head * stride_qh + offs_d[None, :],
        mask=real[:, None],
        other=0.0,
    ).to(tl.float32)
    bits, scale = quantize_rows_ue8m0(x)
    out_row = rows * num_heads_out + head
    tl.store(q8_ptr + out_row[:, None] * 128 + offs_d[None, :], bits, mask=row_ok[:, None])
    w = tl.load(w_ptr + rows * stride_wr + head, mask=real, other=0.0).to(tl.float32)
    tl.store(w8_ptr + out_row, w * scale, mask=row_ok)


def quantize_indexer_queries(
    q: torch.Tensor, weights: torch.Tensor, num_heads_out: int, use_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, H, 128] (float), weights [n, H] -> (fp8 q [n, num_heads_out, 128] contiguous,
    fp32 weights [n, num_heads_out] with the scales folded in); fp8 queries are only padded.
    Triton for CUDA tensors (``use_triton=True``: anyway, the CPU interpreter in tests), the
    reference otherwise."""
    if q.dim() != 3 or q.shape[2] != INDEX_HEAD_DIM:
        raise ValueError(f"q must be [n, heads, {INDEX_HEAD_DIM}], got {tuple(q.shape)}")
    n, num_heads, _ = q.shape
    if weights.shape != (n, num_heads):
        raise ValueError(f"weights must be [{n}, {num_heads}], got {tuple(weights.shape)}")
    if num_heads_out < num_heads:
        raise ValueError(f"num_heads_out={num_heads_out} < {num_heads} query heads")
    if q.dtype == torch.float8_e4m3fn or n == 0 or not (q.is_cuda if use_triton is None else use_triton):
        return quantize_indexer_queries_ref(q, weights, num_heads_out)
    if q.stride(2) != 1:
        q = q.contiguous()
    q8 = torch.empty((n, num_heads_out, INDEX_HEAD_DIM), dtype=torch.float8_e4m3fn, device=q.device)
    w8 = torch.empty((n, num_heads_out), dtype=torch.float32, device=q.device)
    grid = (triton.cdiv(n, _BLOCK_R), num_heads_out)
    _quantize_indexer_q_kernel[grid](
        q, weights, q8.view(torch.uint8), w8, n, num_heads, q.stride(0), q.stride(1),
        weights.stride(0), num_heads_out, BLOCK_R=_BLOCK_R, num_warps=4,
    )  # fmt: skip
    return q8, w8
