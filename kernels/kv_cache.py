"""Triton quantize-and-write kernels for the latent (MLA) and indexer key caches.

Byte layouts and rounding are those of :mod:`kv_cache_ref` (the oracle); the fp8 bytes
are bit-identical to it: scales are ``amax / 448`` (correctly rounded division) rounded up
to a power of two with integer arithmetic, values are ``x * (1/scale)`` (exact for a power
of two) converted to float8_e4m3fn with round-to-nearest-even.

One program writes ``BLOCK_T`` tokens; a negative slot writes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import cast_rne, fp32_to_e4m3_bits, pow2_reciprocal, pow2_round_up, quantize_rows_ue8m0
from .kv_cache_ref import (
    FP8_DS_MLA_ROW_BYTES,
    INDEX_HEAD_DIM,
    INDEXER_FP8_SLOT_BYTES,
    LATENT_DIM,
    LATENT_ROW_DIM,
    ROPE_DIM,
)

_SCALE_FLOOR = tl.constexpr(1e-4)
_FP8_MAX = tl.constexpr(448.0)


# ------------------------------------------------------------------ latent cache
@triton.jit
def _write_latent_fp8_kernel(
    cache_u8_ptr,  # uint8 view of the cache, 656 bytes per slot
    cache_f32_ptr,  # fp32 view of the same bytes (164 per slot)
    cache_bf16_ptr,  # bf16 view of the same bytes (328 per slot)
    kv_c_ptr,
    k_pe_ptr,
    slot_ptr,
    num_tokens,
    stride_kv_c,
    stride_k_pe,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < num_tokens
    slot = tl.load(slot_ptr + offs_t, mask=t_ok, other=-1).to(tl.int64)
    keep = t_ok & (slot >= 0)
    offs_d = tl.arange(0, 512)
    x = tl.load(
        kv_c_ptr + offs_t.to(tl.int64)[:, None] * stride_kv_c + offs_d[None, :],
        mask=keep[:, None],
        other=0.0,
    ).to(tl.float32)
    tiles = tl.reshape(x, (BLOCK_T, 4, 128))
    amax = tl.max(tl.abs(tiles), axis=2)  # [BLOCK_T, 4]
    scale = pow2_round_up(tl.maximum(tl.math.div_rn(amax, _FP8_MAX), _SCALE_FLOOR))
    q = fp32_to_e4m3_bits(tiles * pow2_reciprocal(scale)[:, :, None])
    q = tl.reshape(q, (BLOCK_T, 512)).to(tl.uint8)
    row = slot * 656
    tl.store(cache_u8_ptr + row[:, None] + offs_d[None, :], q, mask=keep[:, None])
    offs_s = tl.arange(0, 4)
    tl.store(
        cache_f32_ptr + (slot * 164 + 128)[:, None] + offs_s[None, :], scale, mask=keep[:, None]
    )
    offs_r = tl.arange(0, 64)
    pe = tl.load(
        k_pe_ptr + offs_t.to(tl.int64)[:, None] * stride_k_pe + offs_r[None, :],
        mask=keep[:, None],
        other=0.0,
    )
    tl.store(
        cache_bf16_ptr + (slot * 328 + 264)[:, None] + offs_r[None, :],
        cast_rne(pe, tl.bfloat16),
        mask=keep[:, None],
    )


@triton.jit
def _write_latent_plain_kernel(
    cache_ptr,
    kv_c_ptr,
    k_pe_ptr,
    slot_ptr,
    num_tokens,
    stride_kv_c,
    stride_k_pe,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < num_tokens
    slot = tl.load(slot_ptr + offs_t, mask=t_ok, other=-1).to(tl.int64)
    keep = t_ok & (slot >= 0)
    offs_d = tl.arange(0, 512)
    x = tl.load(
        kv_c_ptr + offs_t.to(tl.int64)[:, None] * stride_kv_c + offs_d[None, :],
        mask=keep[:, None],
        other=0.0,
    )
    row = slot * 576
    tl.store(
        cache_ptr + row[:, None] + offs_d[None, :],
        cast_rne(x, cache_ptr.dtype.element_ty),
        mask=keep[:, None],
    )
    offs_r = tl.arange(0, 64)
    pe = tl.load(
        k_pe_ptr + offs_t.to(tl.int64)[:, None] * stride_k_pe + offs_r[None, :],
        mask=keep[:, None],
        other=0.0,
    )
    tl.store(
        cache_ptr + (row + 512)[:, None] + offs_r[None, :],
        cast_rne(pe, cache_ptr.dtype.element_ty),
        mask=keep[:, None],
    )


def _check_rows(name: str, x: torch.Tensor, width: int, num_tokens: int) -> None:
    if x.dim() != 2 or x.shape[0] != num_tokens or x.shape[1] != width:
        raise ValueError(f"{name} must be [{num_tokens}, {width}], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim")


def write_latent_cache(
    cache: torch.Tensor,
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
) -> None:
    """Triton version of :func:`kv_cache_ref.write_latent_cache` (same bytes)."""
    num_tokens = slot_mapping.shape[0]
    _check_rows("kv_c", kv_c, LATENT_DIM, num_tokens)
    _check_rows("k_pe", k_pe, ROPE_DIM, num_tokens)
    if not cache.is_contiguous():
        raise ValueError("latent cache must be contiguous")
    if num_tokens == 0:
        return
    slots = slot_mapping.to(torch.int64).contiguous()
    block_t = 4
    grid = (triton.cdiv(num_tokens, block_t),)
    if kv_cache_dtype == "fp8_ds_mla":
        if cache.dtype != torch.uint8 or cache.shape[-1] != FP8_DS_MLA_ROW_BYTES:
            raise ValueError(
                f"fp8_ds_mla cache must be uint8 [..., {FP8_DS_MLA_ROW_BYTES}], got "
                f"{cache.dtype} {tuple(cache.shape)}"
            )
        flat = cache.view(-1)
        _write_latent_fp8_kernel[grid](
            flat,
            flat.view(torch.float32),
            flat.view(torch.bfloat16),
            kv_c,
            k_pe,
            slots,
            num_tokens,
            kv_c.stride(0),
            k_pe.stride(0),
            BLOCK_T=block_t,
            num_warps=4,
        )
    else:
        if cache.shape[-1] != LATENT_ROW_DIM or not cache.dtype.is_floating_point:
            raise ValueError(
                f"latent cache must be float [..., {LATENT_ROW_DIM}], got "
                f"{cache.dtype} {tuple(cache.shape)}"
            )
        _write_latent_plain_kernel[grid](
            cache.view(-1),
            kv_c,
            k_pe,
            slots,
            num_tokens,
            kv_c.stride(0),
            k_pe.stride(0),
            BLOCK_T=block_t,
            num_warps=4,
        )


# ----------------------------------------------------------------- indexer cache
@triton.jit
def _write_indexer_fp8_kernel(
    cache_u8_ptr,
    cache_f32_ptr,
    k_ptr,
    slot_ptr,
    num_tokens,
    stride_k,
    block_size,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < num_tokens
    slot = tl.load(slot_ptr + offs_t, mask=t_ok, other=-1).to(tl.int64)
    keep = t_ok & (slot >= 0)
    offs_d = tl.arange(0, 128)
    x = tl.load(
        k_ptr + offs_t.to(tl.int64)[:, None] * stride_k + offs_d[None, :],
        mask=keep[:, None],
        other=0.0,
    ).to(tl.float32)
    q, scale = quantize_rows_ue8m0(x)
    blk = slot // block_size
    off = slot % block_size
    tl.store(
        cache_u8_ptr + (blk * block_size * 132 + off * 128)[:, None] + offs_d[None, :],
        q,
        mask=keep[:, None],
    )
    tl.store(cache_f32_ptr + blk * block_size * 33 + block_size * 32 + off, scale, mask=keep)


@triton.jit
def _write_indexer_plain_kernel(
    cache_ptr, k_ptr, slot_ptr, num_tokens, stride_k, BLOCK_T: tl.constexpr
):
    pid = tl.program_id(0)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < num_tokens
    slot = tl.load(slot_ptr + offs_t, mask=t_ok, other=-1).to(tl.int64)
    keep = t_ok & (slot >= 0)
    offs_d = tl.arange(0, 128)
    x = tl.load(
        k_ptr + offs_t.to(tl.int64)[:, None] * stride_k + offs_d[None, :],
        mask=keep[:, None],
        other=0.0,
    )
    tl.store(
        cache_ptr + (slot * 128)[:, None] + offs_d[None, :],
        cast_rne(x, cache_ptr.dtype.element_ty),
        mask=keep[:, None],
    )


def write_indexer_cache(
    cache: torch.Tensor,
    k: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    fp8: bool,
) -> None:
    """Triton version of :func:`kv_cache_ref.write_indexer_cache` (same bytes)."""
    num_tokens = slot_mapping.shape[0]
    _check_rows("k", k, INDEX_HEAD_DIM, num_tokens)
    if not cache.is_contiguous():
        raise ValueError("indexer cache must be contiguous")
    if num_tokens == 0:
        return
    slots = slot_mapping.to(torch.int64).contiguous()
    block_t = 8
    grid = (triton.cdiv(num_tokens, block_t),)
    if fp8:
        if cache.dtype != torch.uint8 or cache[0].numel() != block_size * INDEXER_FP8_SLOT_BYTES:
            raise ValueError(
                f"fp8 indexer cache must be uint8 with {block_size}*{INDEXER_FP8_SLOT_BYTES} "
                f"bytes per block (dim 0 = blocks), got {cache.dtype} {tuple(cache.shape)}"
            )
        flat = cache.view(-1)
        _write_indexer_fp8_kernel[grid](
            flat,
            flat.view(torch.float32),
            k,
            slots,
            num_tokens,
            k.stride(0),
            block_size,
            BLOCK_T=block_t,
            num_warps=4,
        )
    else:
        if not cache.dtype.is_floating_point or cache.numel() % INDEX_HEAD_DIM:
            raise ValueError(f"plain indexer cache must be float [..., 128], got {cache.dtype}")
        _write_indexer_plain_kernel[grid](
            cache.view(-1), k, slots, num_tokens, k.stride(0), BLOCK_T=block_t, num_warps=4
        )
