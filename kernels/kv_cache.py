"""Triton quantize-and-write kernels for the latent (MLA) and indexer key caches.

Byte layouts and rounding are those of :mod:`kv_cache_ref` (the oracle); the fp8 bytes
are bit-identical to it: scales are ``amax / 448`` (correctly rounded division) rounded up
to a power of two with integer arithmetic, values are ``x * (1/scale)`` (exact for a power
of two) converted to float8_e4m3fn with round-to-nearest-even.

One program writes ``BLOCK_T`` tokens of one cache; a negative slot writes nothing. Both
caches' new tokens go in one launch (``write_token_caches``, what a layer runs): one launch a
layer fewer than a write per cache (vLLM 0.34's own V3.2 writes both inside its norm-rope kernel).
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
def _latent_fp8_rows(
    pid,
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
def _latent_plain_rows(
    pid,
    cache_ptr,
    kv_c_ptr,
    k_pe_ptr,
    slot_ptr,
    num_tokens,
    stride_kv_c,
    stride_k_pe,
    BLOCK_T: tl.constexpr,
):
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


# ----------------------------------------------------------------- indexer cache
@triton.jit
def _indexer_fp8_rows(
    pid,
    cache_u8_ptr,
    cache_f32_ptr,
    k_ptr,
    slot_ptr,
    num_tokens,
    stride_k,
    block_size,
    BLOCK_T: tl.constexpr,
):
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
def _indexer_plain_rows(pid, cache_ptr, k_ptr, slot_ptr, num_tokens, stride_k, BLOCK_T: tl.constexpr):
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


# ------------------------------------------------------------------ one launch
_NONE, _PLAIN, _FP8 = 0, 1, 2


@triton.jit
def latent_rows(KIND: tl.constexpr, pid, a_ptr, b_ptr, c_ptr, kv_c_ptr, k_pe_ptr, slot_ptr, num_tokens,
                stride_kv_c, stride_k_pe, BLOCK_T: tl.constexpr):  # fmt: skip
    """Tokens ``pid * BLOCK_T ..`` into a latent cache of kind KIND (``_latent_args``): fp8,
    a / b / c = uint8 / fp32 / bf16 views of one cache; plain, a = the cache."""
    if KIND == 2:
        _latent_fp8_rows(pid, a_ptr, b_ptr, c_ptr, kv_c_ptr, k_pe_ptr, slot_ptr, num_tokens, stride_kv_c,
                         stride_k_pe, BLOCK_T)  # fmt: skip
    else:
        _latent_plain_rows(pid, a_ptr, kv_c_ptr, k_pe_ptr, slot_ptr, num_tokens, stride_kv_c, stride_k_pe, BLOCK_T)


@triton.jit
def index_rows(KIND: tl.constexpr, pid, a_ptr, b_ptr, k_ptr, slot_ptr, num_tokens, stride_k, block_size,
               BLOCK_T: tl.constexpr):  # fmt: skip
    """Tokens ``pid * BLOCK_T ..`` into an indexer cache of kind KIND (``_index_args``): fp8,
    a / b = uint8 / fp32 views; plain, a = the cache."""
    if KIND == 2:
        _indexer_fp8_rows(pid, a_ptr, b_ptr, k_ptr, slot_ptr, num_tokens, stride_k, block_size, BLOCK_T)
    else:
        _indexer_plain_rows(pid, a_ptr, k_ptr, slot_ptr, num_tokens, stride_k, BLOCK_T)


@triton.jit
def _write_caches_kernel(
    latent_a_ptr, latent_b_ptr, latent_c_ptr, kv_c_ptr, k_pe_ptr, stride_kv_c, stride_k_pe,
    index_a_ptr, index_b_ptr, k_ptr, stride_k, block_size,
    slot_ptr, num_tokens,
    LATENT: tl.constexpr, INDEX: tl.constexpr, INDEX_PART: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Program (token block, part): part 0 the latent cache (when LATENT), the next the indexer
    cache (when INDEX); the views as ``latent_rows`` / ``index_rows`` take them."""
    pid = tl.program_id(0)
    part = tl.program_id(1)
    if LATENT != 0:
        if part == 0:
            latent_rows(LATENT, pid, latent_a_ptr, latent_b_ptr, latent_c_ptr, kv_c_ptr, k_pe_ptr, slot_ptr,
                        num_tokens, stride_kv_c, stride_k_pe, BLOCK_T)  # fmt: skip
    if INDEX != 0:
        if part == INDEX_PART:
            index_rows(INDEX, pid, index_a_ptr, index_b_ptr, k_ptr, slot_ptr, num_tokens, stride_k, block_size,
                       BLOCK_T)  # fmt: skip


def _check_rows(name: str, x: torch.Tensor, width: int, num_tokens: int) -> None:
    if x.dim() != 2 or x.shape[0] != num_tokens or x.shape[1] != width:
        raise ValueError(f"{name} must be [{num_tokens}, {width}], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim")


def _latent_args(cache: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor, num_tokens: int, kv_cache_dtype: str):
    """(kind, the three cache pointers' tensors) after the checks."""
    _check_rows("kv_c", kv_c, LATENT_DIM, num_tokens)
    _check_rows("k_pe", k_pe, ROPE_DIM, num_tokens)
    if not cache.is_contiguous():
        raise ValueError("latent cache must be contiguous")
    if kv_cache_dtype == "fp8_ds_mla":
        if cache.dtype != torch.uint8 or cache.shape[-1] != FP8_DS_MLA_ROW_BYTES:
            raise ValueError(
                f"fp8_ds_mla cache must be uint8 [..., {FP8_DS_MLA_ROW_BYTES}], got "
                f"{cache.dtype} {tuple(cache.shape)}"
            )
        flat = cache.view(-1)
        return _FP8, (flat, flat.view(torch.float32), flat.view(torch.bfloat16))
    if cache.shape[-1] != LATENT_ROW_DIM or not cache.dtype.is_floating_point:
        raise ValueError(
            f"latent cache must be float [..., {LATENT_ROW_DIM}], got "
            f"{cache.dtype} {tuple(cache.shape)}"
        )
    flat = cache.view(-1)
    return _PLAIN, (flat, flat, flat)


def _index_args(cache: torch.Tensor, k: torch.Tensor, num_tokens: int, block_size: int, fp8: bool):
    """(kind, the two cache pointers' tensors) after the checks."""
    _check_rows("k", k, INDEX_HEAD_DIM, num_tokens)
    if not cache.is_contiguous():
        raise ValueError("indexer cache must be contiguous")
    if fp8:
        if cache.dtype != torch.uint8 or cache[0].numel() != block_size * INDEXER_FP8_SLOT_BYTES:
            raise ValueError(
                f"fp8 indexer cache must be uint8 with {block_size}*{INDEXER_FP8_SLOT_BYTES} "
                f"bytes per block (dim 0 = blocks), got {cache.dtype} {tuple(cache.shape)}"
            )
        flat = cache.view(-1)
        return _FP8, (flat, flat.view(torch.float32))
    if not cache.dtype.is_floating_point or cache.numel() % INDEX_HEAD_DIM:
        raise ValueError(f"plain indexer cache must be float [..., 128], got {cache.dtype}")
    flat = cache.view(-1)
    return _PLAIN, (flat, flat)


def _launch(slot_mapping: torch.Tensor, latent=None, index=None, block_t: int = 4) -> None:
    """One launch over the caches given: ``latent`` = (kind, cache views, kv_c, k_pe), ``index``
    = (kind, cache views, k, block_size)."""
    num_tokens = slot_mapping.shape[0]
    if num_tokens == 0:
        return
    slots = slot_mapping.to(torch.int64).contiguous()
    l_kind, (la, lb, lc), kv_c, k_pe = latent if latent else (_NONE, (slots, slots, slots), slots[:, None], slots[:, None])
    i_kind, (ia, ib), k, block_size = index if index else (_NONE, (slots, slots), slots[:, None], 1)
    parts = (l_kind != _NONE) + (i_kind != _NONE)
    _write_caches_kernel[(triton.cdiv(num_tokens, block_t), parts)](
        la, lb, lc, kv_c, k_pe, kv_c.stride(0), k_pe.stride(0),
        ia, ib, k, k.stride(0), block_size,
        slots, num_tokens,
        LATENT=l_kind, INDEX=i_kind, INDEX_PART=int(l_kind != _NONE), BLOCK_T=block_t, num_warps=4,
    )  # fmt: skip


def write_latent_cache(
    cache: torch.Tensor,
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
) -> None:
    """Triton version of :func:`kv_cache_ref.write_latent_cache` (same bytes)."""
    kind, views = _latent_args(cache, kv_c, k_pe, slot_mapping.shape[0], kv_cache_dtype)
    _launch(slot_mapping, latent=(kind, views, kv_c, k_pe))


def write_indexer_cache(
    cache: torch.Tensor,
    k: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    fp8: bool,
) -> None:
    """Triton version of :func:`kv_cache_ref.write_indexer_cache` (same bytes)."""
    kind, views = _index_args(cache, k, slot_mapping.shape[0], block_size, fp8)
    _launch(slot_mapping, index=(kind, views, k, block_size), block_t=8)


def write_token_caches(
    latent_cache: torch.Tensor,
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    kv_cache_dtype: str,
    index_cache: torch.Tensor,
    k: torch.Tensor,
    index_fp8: bool,
    slot_mapping: torch.Tensor,
    block_size: int,
) -> None:
    """Both caches' new tokens in one launch: :func:`write_latent_cache` and
    :func:`write_indexer_cache` of the same slots (same bytes)."""
    n = slot_mapping.shape[0]
    l_kind, l_views = _latent_args(latent_cache, kv_c, k_pe, n, kv_cache_dtype)
    i_kind, i_views = _index_args(index_cache, k, n, block_size, index_fp8)
    _launch(slot_mapping, latent=(l_kind, l_views, kv_c, k_pe), index=(i_kind, i_views, k, block_size))
