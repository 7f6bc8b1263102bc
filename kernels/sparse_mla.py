"""Triton sparse MLA attention (absorbed MQA form: one 576-dim latent KV head shared by
all query heads, values are its first 512 dims) over a paged latent cache.

Semantics are those of :func:`attention_ref.sparse_mla` (the oracle): ``indices`` hold cache
slots, ``-1`` or any slot outside the cache is skipped, a row with no valid index gives
zeros and ``lse = -inf``, ``lse`` is the natural log of the sum of exp(scaled scores).

Design (Hopper first):
- one program = one query row x ``BLOCK_H`` (<= 64) heads; for 128 heads the two head blocks
  of a row are adjacent program ids, so the gathered K rows of the second one hit L2;
- Q (``BLOCK_H x 576``) is loaded once; the selected rows stream in tiles of ``BLOCK_N`` with
  an online softmax (exp2); the 512-dim part of each K tile is reused as the V tile, so a
  slot row is read once per tile for both products (``S = Qn Kn^T + Qr Kr^T``, ``O += P Kn``);
- ``fp8_ds_mla`` rows are dequantised in registers (fp8 * power-of-two scale is exact in
  bf16), so the fp8 and bf16 paths run the same tensor-core products;
- decode / verify rows (few query rows) split the top-k range over several programs
  (flash-decoding) and merge the partial (out, lse) pairs in a second small kernel.

Measured on an H200 (eval/kernel_notes.md): prefill ~250 TFLOP/s at 128 heads / top-k 2048,
0.43-0.51x FlashMLA's sparse prefill; decode 0.58-0.66x FlashMLA's fp8 decode for 32-256 rows.
The main loss is Triton's layout for chained products: with 8 warps and 64 heads both
warpgroups compute the same S tile (see the notes for what was tried).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ._triton_utils import (
    cast_rne,
    interpreting,
    load_fp8_as_f32,
    mma,
    native_fp8,
    next_pow2,
    num_sms,
)
from .kv_cache_ref import FP8_DS_MLA_ROW_BYTES, LATENT_DIM, LATENT_ROW_DIM, ROPE_DIM

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


@triton.jit
def _sparse_mla_fwd_kernel(
    q_ptr,
    stride_qm,
    stride_qh,
    kv_ptr,  # plain cache (576 values per slot) or uint8 (656 bytes per slot)
    kv_f32_ptr,  # fp32 view of the fp8 cache (scales); unused for plain caches
    kv_bf16_ptr,  # bf16 view of the fp8 cache (rope); unused for plain caches
    idx_ptr,
    stride_im,
    out_ptr,
    stride_om,
    stride_os,
    stride_oh,
    lse_ptr,
    stride_lm,
    stride_ls,
    num_heads,
    topk,
    num_slots,
    keys_per_split,
    qk_scale_log2,
    NUM_HEAD_BLOCKS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP8: tl.constexpr,
    NATIVE_FP8: tl.constexpr,
    PARTIAL: tl.constexpr,
    UPCAST: tl.constexpr,
    IDX64: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    row = pid // NUM_HEAD_BLOCKS
    hb = pid % NUM_HEAD_BLOCKS
    row64 = row.to(tl.int64)

    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < num_heads
    offs_d = tl.arange(0, 512)
    offs_r = tl.arange(0, 64)
    q_rows = q_ptr + row64 * stride_qm + offs_h[:, None] * stride_qh
    q_nope = tl.load(q_rows + offs_d[None, :], mask=h_ok[:, None], other=0.0)
    q_pe = tl.load(q_rows + 512 + offs_r[None, :], mask=h_ok[:, None], other=0.0)
    cdt = q_nope.dtype

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, 512], dtype=tl.float32)

    k_begin = split * keys_per_split
    k_end = tl.minimum(topk, k_begin + keys_per_split)
    idx_row = idx_ptr + row64 * stride_im
    # the slots of the next tile are fetched one iteration ahead (loop-carried), so the
    # gathered K loads depend on no load of their own iteration and can be pipelined
    offs_n = k_begin + tl.arange(0, BLOCK_N)
    nxt = tl.load(idx_row + offs_n, mask=offs_n < k_end, other=-1)
    for start in range(k_begin, k_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < k_end
        slot = nxt
        offs_nn = offs_n + BLOCK_N
        nxt = tl.load(idx_row + offs_nn, mask=offs_nn < k_end, other=-1)
        valid = n_ok & (slot >= 0) & (slot < num_slots)
        slot = tl.where(valid, slot, 0)
        if IDX64:  # caches of more than 2^31 elements
            slot = slot.to(tl.int64)
        if FP8:
            kn = load_fp8_as_f32(
                kv_ptr + slot[:, None] * 656 + offs_d[None, :], valid[:, None], NATIVE_FP8
            )
            sc = tl.load(
                kv_f32_ptr + (slot * 164 + 128)[:, None] + tl.arange(0, 4)[None, :],
                mask=valid[:, None],
                other=0.0,
            )
            kn = tl.reshape(
                tl.reshape(kn, (BLOCK_N, 4, 128)) * sc[:, :, None], (BLOCK_N, 512)
            ).to(cdt)
            kr = tl.load(
                kv_bf16_ptr + (slot * 328 + 264)[:, None] + offs_r[None, :],
                mask=valid[:, None],
                other=0.0,
            ).to(cdt)
        else:
            k_rows = kv_ptr + slot[:, None] * 576
            kn = tl.load(k_rows + offs_d[None, :], mask=valid[:, None], other=0.0).to(cdt)
            kr = tl.load(k_rows + 512 + offs_r[None, :], mask=valid[:, None], other=0.0).to(cdt)
        s = mma(q_nope, tl.trans(kn), tl.zeros([BLOCK_H, BLOCK_N], tl.float32), UPCAST)
        s = mma(q_pe, tl.trans(kr), s, UPCAST)
        s = tl.where(valid[None, :], s * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = mma(p.to(cdt), kn, acc, UPCAST)
        m_i = m_new

    has = l_i > 0.0
    inv_l = tl.where(has, 1.0 / tl.where(has, l_i, 1.0), 0.0)
    o = acc * inv_l[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    o_ptrs = out_ptr + row64 * stride_om + split * stride_os + offs_h[:, None] * stride_oh
    l_ptrs = lse_ptr + row64 * stride_lm + split * stride_ls + offs_h
    if PARTIAL:
        tl.store(o_ptrs + offs_d[None, :], o, mask=h_ok[:, None])
        tl.store(l_ptrs, lse2, mask=h_ok)
    else:
        if UPCAST:  # interpreter: its fp32 -> bf16 cast truncates
            o_cast = cast_rne(o, out_ptr.dtype.element_ty)
        else:
            o_cast = o.to(out_ptr.dtype.element_ty)
        tl.store(o_ptrs + offs_d[None, :], o_cast, mask=h_ok[:, None])
        tl.store(l_ptrs, lse2 * 0.6931471805599453, mask=h_ok)


@triton.jit
def _combine_splits_kernel(
    part_out_ptr,  # [M, S, H, 512] fp32
    part_lse_ptr,  # [M, S, H] fp32, log2 units
    out_ptr,
    stride_om,
    stride_oh,
    lse_ptr,
    stride_lm,
    num_heads,
    num_splits,
    NUM_HEAD_BLOCKS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    row = (pid // NUM_HEAD_BLOCKS).to(tl.int64)
    hb = pid % NUM_HEAD_BLOCKS
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < num_heads
    offs_d = tl.arange(0, 512)
    lse_base = part_lse_ptr + row * num_splits * num_heads + offs_h
    mx = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    for s in range(num_splits):
        mx = tl.maximum(mx, tl.load(lse_base + s * num_heads, mask=h_ok, other=float("-inf")))
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    tot = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, 512], dtype=tl.float32)
    out_base = part_out_ptr + (row * num_splits * num_heads + offs_h)[:, None] * 512
    for s in range(num_splits):
        w = tl.exp2(tl.load(lse_base + s * num_heads, mask=h_ok, other=float("-inf")) - mx_safe)
        tot += w
        po = tl.load(out_base + s * num_heads * 512 + offs_d[None, :], mask=h_ok[:, None], other=0.0)
        acc += w[:, None] * po
    has = tot > 0.0
    o = acc * tl.where(has, 1.0 / tl.where(has, tot, 1.0), 0.0)[:, None]
    lse2 = tl.where(has, mx_safe + tl.log2(tl.where(has, tot, 1.0)), float("-inf"))
    tl.store(
        out_ptr + row * stride_om + offs_h[:, None] * stride_oh + offs_d[None, :],
        cast_rne(o, out_ptr.dtype.element_ty),
        mask=h_ok[:, None],
    )
    tl.store(lse_ptr + row * stride_lm + offs_h, lse2 * 0.6931471805599453, mask=h_ok)


# ----------------------------------------------------------------------- wrappers
def _default_config(num_heads: int, q_dtype: torch.dtype, device: torch.device):
    """(BLOCK_H, BLOCK_N, num_warps, num_stages) for the forward kernel.

    Hopper (checked offline with ptxas for Triton 3.6 / 3.9: registers, spills, shared
    memory): 64 heads x 64 keys, 8 warps, 2 stages uses 216 KB of shared memory (Q + two
    K tiles) and no spills; fewer than 64 heads use 16-row blocks when they fit, else 64.
    fp32 queries (tf32 products) need smaller tiles to fit shared memory.
    """
    if device.type != "cuda":
        return min(64, max(16, next_pow2(num_heads))), 16, 4, 1
    if q_dtype == torch.float32:
        return 16, 16, 4, 2
    block_h = 16 if num_heads <= 16 else 64
    return block_h, 64, 8, 2


def _check_inputs(q, kv_cache, indices, d_v, kv_cache_dtype):
    if q.dim() != 3 or indices.dim() != 2 or q.shape[0] != indices.shape[0]:
        raise ValueError(
            f"sparse_mla expects q [M,H,576] and indices [M,K]; got "
            f"{tuple(q.shape)}, {tuple(indices.shape)}"
        )
    if q.shape[2] != LATENT_ROW_DIM:
        raise ValueError(f"q head dim must be {LATENT_ROW_DIM}, got {q.shape[2]}")
    if d_v != LATENT_DIM:
        raise ValueError(f"d_v must be {LATENT_DIM}, got {d_v}")
    if kv_cache_dtype == "fp8_ds_mla":
        if kv_cache.dtype != torch.uint8 or kv_cache.shape[-1] != FP8_DS_MLA_ROW_BYTES:
            raise ValueError(
                f"fp8_ds_mla cache must be uint8 [..., 656], got {kv_cache.dtype} "
                f"{tuple(kv_cache.shape)}"
            )
    elif kv_cache.shape[-1] != LATENT_ROW_DIM or not kv_cache.dtype.is_floating_point:
        raise ValueError(
            f"latent cache must be float [..., 576], got {kv_cache.dtype} {tuple(kv_cache.shape)}"
        )
    if not kv_cache.is_contiguous():
        raise ValueError("latent cache must be contiguous")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"unsupported q dtype {q.dtype}")


def sparse_mla_fwd(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    kv_cache_dtype: str = "auto",
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MLA over rows ``q [M,H,576]`` and slot ``indices [M,K]``.

    ``num_splits`` > 1 splits the K range over programs (flash-decoding) and merges;
    ``None`` picks 1 when the rows fill the GPU, more for few rows.
    Returns ``(out [M,H,512] q.dtype, lse [M,H] fp32)``.
    """
    _check_inputs(q, kv_cache, indices, d_v, kv_cache_dtype)
    if q.stride(2) != 1:
        q = q.contiguous()
    if indices.stride(1) != 1:
        indices = indices.contiguous()
    if indices.dtype != torch.int32:
        indices = indices.to(torch.int32)
    num_rows, num_heads, _ = q.shape
    topk = indices.shape[1]
    fp8 = kv_cache_dtype == "fp8_ds_mla"
    out = torch.empty(num_rows, num_heads, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(num_rows, num_heads, dtype=torch.float32, device=q.device)
    if num_rows == 0:
        return out, lse
    if topk == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse

    block_h, block_n, num_warps, num_stages = _default_config(num_heads, q.dtype, q.device)
    num_hb = triton.cdiv(num_heads, block_h)

    if num_splits is None:
        num_splits = _auto_splits(num_rows * num_hb, topk, block_n, q.device)
    tiles = triton.cdiv(topk, block_n)
    num_splits = max(1, min(int(num_splits), tiles))
    keys_per_split = triton.cdiv(tiles, num_splits) * block_n
    num_splits = triton.cdiv(topk, keys_per_split)

    num_slots = kv_cache.numel() // kv_cache.shape[-1]
    flat = kv_cache.view(-1)
    if fp8:
        kv_f32, kv_bf16 = flat.view(torch.float32), flat.view(torch.bfloat16)
    else:
        kv_f32 = kv_bf16 = flat
    common = dict(
        NUM_HEAD_BLOCKS=num_hb,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        FP8=fp8,
        NATIVE_FP8=native_fp8(q.device),
        UPCAST=interpreting(),
        IDX64=flat.numel() >= 2**31 - 1024,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    qk_scale_log2 = float(sm_scale) * _LOG2E
    if num_splits == 1:
        _sparse_mla_fwd_kernel[(num_rows * num_hb, 1)](
            q, q.stride(0), q.stride(1), flat, kv_f32, kv_bf16, indices, indices.stride(0),
            out, out.stride(0), 0, out.stride(1), lse, lse.stride(0), 0,
            num_heads, topk, num_slots, keys_per_split, qk_scale_log2,
            PARTIAL=False, **common,
        )  # fmt: skip
        return out, lse
    part_out = torch.empty(
        num_rows, num_splits, num_heads, d_v, dtype=torch.float32, device=q.device
    )
    part_lse = torch.empty(num_rows, num_splits, num_heads, dtype=torch.float32, device=q.device)
    _sparse_mla_fwd_kernel[(num_rows * num_hb, num_splits)](
        q, q.stride(0), q.stride(1), flat, kv_f32, kv_bf16, indices, indices.stride(0),
        part_out, part_out.stride(0), part_out.stride(1), part_out.stride(2),
        part_lse, part_lse.stride(0), part_lse.stride(1),
        num_heads, topk, num_slots, keys_per_split, qk_scale_log2,
        PARTIAL=True, **common,
    )  # fmt: skip
    comb_bh = min(8, next_pow2(num_heads))
    comb_hb = triton.cdiv(num_heads, comb_bh)
    _combine_splits_kernel[(num_rows * comb_hb,)](
        part_out, part_lse, out, out.stride(0), out.stride(1), lse, lse.stride(0),
        num_heads, num_splits, NUM_HEAD_BLOCKS=comb_hb, BLOCK_H=comb_bh,
        num_warps=4 if q.device.type == "cuda" else 1,
    )  # fmt: skip
    return out, lse


def _auto_splits(programs: int, topk: int, block_n: int, device: torch.device) -> int:
    """Flash-decoding split count: about one wave of programs, >= 2 tiles per split.

    H200 (run 2 of eval/kernel_notes.md), 128 heads, top-k 2048: 64 programs -> 2 splits
    best, 256 programs -> 1 split best; more splits only add partial-result traffic."""
    if device.type != "cuda":
        return 1
    per_wave = num_sms(device) // max(1, programs)
    if per_wave < 2:
        return 1
    max_splits = max(1, topk // (2 * block_n))
    return max(1, min(max_splits, 1 << (per_wave.bit_length() - 1)))


def sparse_mla_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    kv_cache_dtype: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill rows: ``q [M,H,576]``, ``indices [M,K]`` -> ``(out [M,H,512], lse [M,H])``."""
    return sparse_mla_fwd(q, kv_cache, indices, sm_scale, d_v, kv_cache_dtype, num_splits=1)


def sparse_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    kv_cache_dtype: str = "auto",
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode / target-verify rows: ``q [B,S,H,576]``, ``indices [B,S,K]`` ->
    ``(out [B,S,H,512], lse [B,S,H])``; splits the K range when the rows are few."""
    if q.dim() != 4 or indices.dim() != 3 or q.shape[:2] != indices.shape[:2]:
        raise ValueError(
            f"sparse_mla_decode expects q [B,S,H,576] and indices [B,S,K]; got "
            f"{tuple(q.shape)}, {tuple(indices.shape)}"
        )
    b, s, h, d = q.shape
    out, lse = sparse_mla_fwd(
        q.reshape(b * s, h, d),
        kv_cache,
        indices.reshape(b * s, indices.shape[2]),
        sm_scale,
        d_v,
        kv_cache_dtype,
        num_splits=num_splits,
    )
    return out.view(b, s, h, d_v), lse.view(b, s, h)


__all__ = ["sparse_mla_fwd", "sparse_mla_prefill", "sparse_mla_decode", "ROPE_DIM"]
