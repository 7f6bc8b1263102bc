"""Triton: what an NSA layer does between its projections and its attention, in two launches.

``latent_prologue`` (after the fused q_a / kv_a projection and the indexer's wk + weights_proj):
the q_a and kv_a RMSNorms, MLA's rope of k_pe, the indexer key's fp32 LayerNorm and rope, the
indexer heads' weights scaled to fp32. ``query_rope``
(after q_b and the indexer's wq_b): MLA's rope of q_pe and the indexer query's rope, in place,
q_pe also into the attention's latent query buffer (the copy that buffer took before), and
where the indexer scores fp8 queries, the roped indexer query quantized with the heads' scales
folded into their weights (vLLM's ``fused_q`` does the same; the plugin ran it as a third launch).

On CUDA the plugin ran these as two RMSNorm launches, vLLM's rotary kernel twice (MLA's q + k,
the indexer's q), the indexer key's own kernel and the weights' scaling: six launches a layer
where vLLM 0.34's own V3.2 runs two (``fused_norm_rope`` / ``fused_q``); the norm / rope share of the b8 decode gap in
the 1204j profile on one H200 (eval/gpu_vllm_notes.md). The arithmetic is the unfused path's:
vLLM's RMSNorm (fp32, the normalized row rounded to the dtype, then times the weight, rounded),
the LayerNorm in fp32 rounded to the dtype, and vLLM 0.34's rotary kernel, which reads cos / sin
in the rows' dtype (vLLM matches its table to the query's) and computes a pair in fp32, rounded
once (the kernel before it rounded each product and sum: 1 step apart in a third of the outputs,
seen on an H200 on 2026-12-05; 0.34's ``fused_norm_rope`` / ``fused_q`` round once too). With
bf16 rows and cos / sin the products are exact in fp32, so a fused multiply-add gives the same
bits. Only the norms' fp32 reduction order may differ. References: :func:`latent_prologue_ref`,
:func:`query_rope_ref`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import kv_cache_ref
from ._triton_utils import cast_rne, next_pow2, quantize_rows_ue8m0
from .kv_cache import _index_args, _latent_args, index_rows, latent_rows
from .kv_cache_ref import INDEX_HEAD_DIM, QuantizedIndexerQuery, quantize_indexer_queries

_QUERY_HEADS_PER_PROGRAM = 16
"""Heads of one row one ``query_rope`` program ropes: a decode batch of 8 rows still spreads
over 128 programs (a whole row per program left most of the GPU idle at decode sizes)."""


class Norm(NamedTuple):
    """A row norm's parameters: ``bias`` None is an RMSNorm (weight in any float dtype), else a
    LayerNorm (fp32 weight and bias, as the indexer's ``k_norm``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float


class TokenCacheWrite(NamedTuple):
    """The new tokens' cache writes ``latent_prologue`` also does (an unsplit batch: its rows are
    its tokens in order): the first ``len(slot_mapping)`` rows' normed kv_c + roped k_pe into
    the latent cache, their normed + roped key into the indexer cache, the bytes of
    ``kv_cache.write_token_caches`` (vLLM 0.34's own V3.2 writes both caches in its norm-rope
    kernel the same way)."""

    latent_cache: torch.Tensor
    kv_cache_dtype: str
    index_cache: torch.Tensor
    index_fp8: bool
    slot_mapping: torch.Tensor
    """[tokens] int64 (negative: not written)."""
    block_size: int


class Rope(NamedTuple):
    """A rope over a row's first ``dim`` dims: ``cos_sin`` [positions, >= dim] (cos of pair i
    at column i, its sin at dim / 2 + i) in the rows' dtype; pairs (i, i + dim / 2) NeoX,
    (2i, 2i + 1) interleaved."""

    cos_sin: torch.Tensor
    dim: int
    neox: bool


@triton.jit
def _pairs(HALF: tl.constexpr, PAIRS: tl.constexpr, NEOX: tl.constexpr):
    pair = tl.arange(0, PAIRS)
    if NEOX:
        first = pair
        second = pair + HALF
    else:
        first = 2 * pair
        second = 2 * pair + 1
    return pair, pair < HALF, first, second


@triton.jit
def _cos_sin(cs_ptr, pos, stride_cs, pair, mask, HALF: tl.constexpr, dtype: tl.constexpr):
    row = cs_ptr + pos * stride_cs
    cos = cast_rne(tl.load(row + pair, mask=mask, other=0.0).to(tl.float32), dtype).to(tl.float32)
    sin = cast_rne(tl.load(row + HALF + pair, mask=mask, other=0.0).to(tl.float32), dtype).to(tl.float32)
    return cos, sin


@triton.jit
def _rotated(a, b, cos, sin, dtype: tl.constexpr):
    """vLLM's rotary arithmetic on a pair (a, b) already in ``dtype``: fp32, rounded once."""
    return cast_rne(a * cos - b * sin, dtype), cast_rne(b * cos + a * sin, dtype)


@triton.jit
def _rms_norm_row(x_ptr, w_ptr, out_ptr, eps, DIM: tl.constexpr, BLOCK: tl.constexpr, dtype: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < DIM
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / DIM + eps)
    normed = cast_rne(x * rstd, dtype).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, cast_rne(normed * w, dtype), mask=mask)


@triton.jit
def _layer_normed_at(x_ptr, w_ptr, b_ptr, cols, mask, mean, rstd, dtype: tl.constexpr):
    """The LayerNorm's result at ``cols``, rounded to ``dtype``, back in fp32."""
    x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0)
    return cast_rne((x - mean) * rstd * w + b, dtype).to(tl.float32)


@triton.jit
def _latent_prologue_kernel(
    pos_ptr,
    q_ptr, q_w_ptr, q_out_ptr, stride_q, q_eps,
    kv_ptr, kv_w_ptr, kv_out_ptr, stride_kv, kv_eps,
    pe_ptr, pe_out_ptr, stride_pe, mla_cs_ptr, stride_mla_cs,
    key_ptr, key_w_ptr, key_b_ptr, key_out_ptr, stride_key, key_eps, key_cs_ptr, stride_key_cs,
    hw_ptr, hw_scale_ptr, hw_out_ptr, stride_hw, NUM_HW: tl.constexpr, HW_BLOCK: tl.constexpr,
    latent_a_ptr, latent_b_ptr, latent_c_ptr, index_a_ptr, index_b_ptr, slot_ptr, num_slots, block_size,
    Q_DIM: tl.constexpr, Q_BLOCK: tl.constexpr, KV_DIM: tl.constexpr, KV_BLOCK: tl.constexpr,
    PE_HALF: tl.constexpr, PE_PAIRS: tl.constexpr, MLA_NEOX: tl.constexpr,
    KEY_DIM: tl.constexpr, KEY_BLOCK: tl.constexpr, KEY_HALF: tl.constexpr, KEY_PAIRS: tl.constexpr,
    KEY_NEOX: tl.constexpr, LATENT: tl.constexpr, INDEX: tl.constexpr,
):  # fmt: skip
    """Program (row, part): part 0 the q_a RMSNorm, 1 the kv_a RMSNorm and k_pe's rope, 2 the
    indexer key and its heads' weights (times their scale, fp32). Outputs are contiguous rows.
    LATENT / INDEX (kv_cache's kinds: 0 none, 1 plain, 2 fp8): parts 1 / 2 then also write
    their row's token into that cache (rows past ``num_slots`` none), read back from the outputs
    they just stored (a barrier first: other threads of the program stored them)."""
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    dtype = q_out_ptr.dtype.element_ty
    if part == 0:
        _rms_norm_row(q_ptr + row * stride_q, q_w_ptr, q_out_ptr + row * Q_DIM, q_eps, Q_DIM, Q_BLOCK, dtype)
    elif part == 1:
        _rms_norm_row(kv_ptr + row * stride_kv, kv_w_ptr, kv_out_ptr + row * KV_DIM, kv_eps, KV_DIM, KV_BLOCK, dtype)
        pair, mask, first, second = _pairs(PE_HALF, PE_PAIRS, MLA_NEOX)
        pos = tl.load(pos_ptr + row + pair * 0).to(tl.int64)
        cos, sin = _cos_sin(mla_cs_ptr, pos, stride_mla_cs, pair, mask, PE_HALF, dtype)
        src = pe_ptr + row * stride_pe
        a = tl.load(src + first, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(src + second, mask=mask, other=0.0).to(tl.float32)
        out_a, out_b = _rotated(a, b, cos, sin, dtype)
        dst = pe_out_ptr + row * (2 * PE_HALF)
        tl.store(dst + first, out_a, mask=mask)
        tl.store(dst + second, out_b, mask=mask)
        if LATENT != 0:
            tl.debug_barrier()
            latent_rows(LATENT, row, latent_a_ptr, latent_b_ptr, latent_c_ptr, kv_out_ptr, pe_out_ptr, slot_ptr,
                        num_slots, KV_DIM, 2 * PE_HALF, 1)  # fmt: skip
    else:
        src = key_ptr + row * stride_key
        dst = key_out_ptr + row * KEY_DIM
        offs = tl.arange(0, KEY_BLOCK)
        in_row = offs < KEY_DIM
        x = tl.load(src + offs, mask=in_row, other=0.0).to(tl.float32)
        mean = tl.sum(x, 0) / KEY_DIM
        centered = tl.where(in_row, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, 0) / KEY_DIM + key_eps)
        w = tl.load(key_w_ptr + offs, mask=in_row, other=0.0)
        b = tl.load(key_b_ptr + offs, mask=in_row, other=0.0)
        tl.store(dst + offs, cast_rne(centered * rstd * w + b, dtype), mask=in_row & (offs >= 2 * KEY_HALF))
        pair, mask, first, second = _pairs(KEY_HALF, KEY_PAIRS, KEY_NEOX)
        pos = tl.load(pos_ptr + row + pair * 0).to(tl.int64)
        cos, sin = _cos_sin(key_cs_ptr, pos, stride_key_cs, pair, mask, KEY_HALF, dtype)
        a = _layer_normed_at(src, key_w_ptr, key_b_ptr, first, mask, mean, rstd, dtype)
        b = _layer_normed_at(src, key_w_ptr, key_b_ptr, second, mask, mean, rstd, dtype)
        out_a, out_b = _rotated(a, b, cos, sin, dtype)
        tl.store(dst + first, out_a, mask=mask)
        tl.store(dst + second, out_b, mask=mask)
        heads = tl.arange(0, HW_BLOCK)
        hw = tl.load(hw_ptr + row * stride_hw + heads, mask=heads < NUM_HW, other=0.0).to(tl.float32)
        scale = tl.load(hw_scale_ptr + heads * 0)
        tl.store(hw_out_ptr + row * NUM_HW + heads, hw * scale, mask=heads < NUM_HW)
        if INDEX != 0:
            tl.debug_barrier()
            index_rows(INDEX, row, index_a_ptr, index_b_ptr, key_out_ptr, slot_ptr, num_slots, KEY_DIM, block_size, 1)


@triton.jit
def _rope_head_block(x_ptr, stride_head, heads, real, pos, cs_ptr, stride_cs, HEAD_DIM: tl.constexpr,
                     HEAD_BLOCK: tl.constexpr, HALF: tl.constexpr, NEOX: tl.constexpr, dtype: tl.constexpr):  # fmt: skip
    """Heads ``heads`` (those with ``real``) of one row: the rope over each head's first 2 * HALF
    dims, in place. Returns (the whole heads after it, in fp32 [BLOCK_H, HEAD_BLOCK]; the
    roped values in ``dtype``; the mask of the roped dims). Each dim reads its pair partner,
    so a program holds whole heads (what the fp8 quantization of a head needs)."""
    cols = tl.arange(0, HEAD_BLOCK)
    in_rope = cols < 2 * HALF
    if NEOX:
        pair = cols % HALF
        first = cols < HALF
        partner = tl.where(first, cols + HALF, cols - HALF)
    else:
        pair = cols // 2
        first = cols % 2 == 0
        partner = cols ^ 1
    partner = tl.where(in_rope, partner, cols)
    cos, sin = _cos_sin(cs_ptr, pos, stride_cs, pair, in_rope, HALF, dtype)
    base = x_ptr + heads[:, None].to(tl.int64) * stride_head
    rows_ok = real[:, None] & (cols < HEAD_DIM)[None, :]
    x = tl.load(base + cols[None, :], mask=rows_ok, other=0.0).to(tl.float32)
    partner_x = tl.load(base + partner[None, :], mask=rows_ok, other=0.0).to(tl.float32)
    # vLLM's rotary arithmetic (``_rotated``): a' = a cos - b sin, b' = b cos + a sin in fp32,
    # rounded once to the dtype
    x_cos = x * cos[None, :]
    partner_sin = partner_x * sin[None, :]
    roped = cast_rne(tl.where(first[None, :], x_cos - partner_sin, x_cos + partner_sin), dtype)
    rope_mask = rows_ok & in_rope[None, :]
    tl.store(base + cols[None, :], roped, mask=rope_mask)
    return tl.where(in_rope[None, :], roped.to(tl.float32), x), roped, rope_mask


@triton.jit
def _query_rope_kernel(
    pos_ptr,
    q_ptr, stride_q_row, stride_q_head, num_q_heads, mla_cs_ptr, stride_mla_cs,
    copy_ptr, stride_copy_row, stride_copy_head,
    iq_ptr, stride_iq_row, stride_iq_head, num_iq_heads, key_cs_ptr, stride_key_cs,
    hw_ptr, stride_hw_row, q8_ptr, w8_ptr, num_q8_heads,
    Q_DIM: tl.constexpr, Q_BLOCK: tl.constexpr, MLA_HALF: tl.constexpr, MLA_NEOX: tl.constexpr,
    IQ_DIM: tl.constexpr, IQ_BLOCK: tl.constexpr, KEY_HALF: tl.constexpr, KEY_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr, COPY: tl.constexpr, QUANT: tl.constexpr,
):  # fmt: skip
    """Program (row, part, head block): part 0 MLA's q_pe heads (also into the copy when COPY),
    part 1 the indexer query's heads (and, when QUANT, those heads to fp8 with vLLM's recipe,
    their weights times each scale, heads up to ``num_q8_heads``: padding heads zero)."""
    row = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(2) * BLOCK_H
    heads = h0 + tl.arange(0, BLOCK_H)
    dtype = q_ptr.dtype.element_ty
    if tl.program_id(1) == 0:
        if h0 < num_q_heads:
            pos = tl.load(pos_ptr + row + tl.arange(0, Q_BLOCK) * 0).to(tl.int64)
            _, roped, rope_mask = _rope_head_block(q_ptr + row * stride_q_row, stride_q_head, heads,
                                                   heads < num_q_heads, pos, mla_cs_ptr, stride_mla_cs, Q_DIM,
                                                   Q_BLOCK, MLA_HALF, MLA_NEOX, dtype)  # fmt: skip
            if COPY:
                cols = tl.arange(0, Q_BLOCK)
                copy = copy_ptr + row * stride_copy_row + heads[:, None].to(tl.int64) * stride_copy_head
                tl.store(copy + cols[None, :], roped, mask=rope_mask)
    else:
        if h0 < (num_q8_heads if QUANT else num_iq_heads):
            pos = tl.load(pos_ptr + row + tl.arange(0, IQ_BLOCK) * 0).to(tl.int64)
            real = heads < num_iq_heads
            values, _, _ = _rope_head_block(iq_ptr + row * stride_iq_row, stride_iq_head, heads, real, pos,
                                            key_cs_ptr, stride_key_cs, IQ_DIM, IQ_BLOCK, KEY_HALF, KEY_NEOX,
                                            dtype)  # fmt: skip
            if QUANT:  # IQ_DIM == IQ_BLOCK == 128: whole heads
                # padding heads: +0 values (their rope made -0 of some), weight 0 below
                bits, scale = quantize_rows_ue8m0(tl.where(real[:, None], values, 0.0))
                out = heads < num_q8_heads
                cols = tl.arange(0, IQ_BLOCK)
                dst = q8_ptr + (row * num_q8_heads + heads[:, None].to(tl.int64)) * IQ_DIM + cols[None, :]
                tl.store(dst, bits, mask=out[:, None])
                w = tl.load(hw_ptr + row * stride_hw_row + heads, mask=real, other=0.0).to(tl.float32)
                tl.store(w8_ptr + row * num_q8_heads + heads, w * scale, mask=out)


def rms_norm_ref(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """vLLM's RMSNorm arithmetic: fp32, the normalized row rounded to x's dtype, times the weight, rounded."""
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)
    return (normed.float() * norm.weight.float()).to(x.dtype)


def layer_norm_ref(x: torch.Tensor, norm: Norm) -> torch.Tensor:
    """The LayerNorm in fp32 (fp32 weight and bias), rounded to x's dtype."""
    out = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], norm.weight.float(), norm.bias.float(), norm.eps)
    return out.to(x.dtype)


def rope_ref(x: torch.Tensor, positions: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x [n, D] or [n, H, D] with dims ``[0, rope.dim)`` rotated at ``positions`` [n], as vLLM's
    rotary kernel computes it (cos / sin in x's dtype, a pair in fp32, rounded once)."""
    dtype, half = x.dtype, rope.dim // 2
    pair = torch.arange(half, device=x.device)
    first, second = (pair, pair + half) if rope.neox else (2 * pair, 2 * pair + 1)
    rows = rope.cos_sin.to(dtype)[positions.long()]
    if x.dim() == 3:
        rows = rows[:, None]
    cos, sin = rows[..., :half].float(), rows[..., half : rope.dim].float()
    a, b = x[..., first].float(), x[..., second].float()

    out = x.clone()
    out[..., first] = (a * cos - b * sin).to(dtype)
    out[..., second] = (b * cos + a * sin).to(dtype)
    return out


def latent_prologue_ref(q_c, kv_c, k_pe, key, head_weights, head_weights_scale, positions, q_norm: Norm,
                        kv_norm: Norm, key_norm: Norm, mla_rope: Rope, key_rope: Rope,
                        write: TokenCacheWrite | None = None):  # fmt: skip
    """Reference of :func:`latent_prologue`: (q_c normed, kv_c normed, k_pe roped, key normed
    and roped, head weights times their scale in fp32), and ``write``'s cache writes."""
    outs = (rms_norm_ref(q_c, q_norm), rms_norm_ref(kv_c, kv_norm), rope_ref(k_pe, positions, mla_rope),
            rope_ref(layer_norm_ref(key, key_norm), positions, key_rope),
            head_weights.float() * head_weights_scale.float())  # fmt: skip
    if write is not None:
        m = write.slot_mapping.shape[0]
        kv_cache_ref.write_latent_cache(write.latent_cache, outs[1][:m], outs[2][:m], write.slot_mapping,
                                        write.kv_cache_dtype)  # fmt: skip
        kv_cache_ref.write_indexer_cache(write.index_cache, outs[3][:m], write.slot_mapping, write.block_size,
                                         write.index_fp8)  # fmt: skip
    return outs


def query_rope_ref(q_pe, index_q, positions, mla_rope: Rope, key_rope: Rope, q_pe_copy=None, head_weights=None,
                   quantized: QuantizedIndexerQuery | None = None) -> None:  # fmt: skip
    """Reference of :func:`query_rope` (in place)."""
    q_pe.copy_(rope_ref(q_pe, positions, mla_rope))
    index_q.copy_(rope_ref(index_q, positions, key_rope))
    if q_pe_copy is not None:
        q_pe_copy.copy_(q_pe)
    if quantized is not None:
        q8, w8 = quantize_indexer_queries(index_q, head_weights, quantized.q.shape[1])
        quantized.q.copy_(q8)
        quantized.weights.copy_(w8)


def _check_rope(name: str, rope: Rope, width: int) -> None:
    cs = rope.cos_sin
    if cs.dim() != 2 or cs.stride(-1) != 1 or rope.dim % 2 or not 0 < rope.dim <= min(width, cs.shape[-1]):
        raise ValueError(f"{name}: a rope needs cos_sin [P, >= dim] with unit last stride and an even dim <= the "
                         f"row width {width}; got cos_sin {tuple(cs.shape)} stride {cs.stride()}, dim {rope.dim}")


def _check_rows(name: str, x: torch.Tensor, num_rows: int, ndim: int) -> None:
    if x.dim() != ndim or x.shape[0] != num_rows or x.stride(-1) != 1:
        raise ValueError(f"{name}: expected {ndim}-D rows [{num_rows}, ...] with unit last stride; got "
                         f"{tuple(x.shape)} stride {x.stride()}")


def latent_prologue(q_c, kv_c, k_pe, key, head_weights, head_weights_scale, positions, q_norm: Norm,
                    kv_norm: Norm, key_norm: Norm, mla_rope: Rope, key_rope: Rope,
                    write: TokenCacheWrite | None = None, use_triton: bool | None = None):  # fmt: skip
    """Rows [n, ...] (strided slices of the projections are fine) -> contiguous
    (q_c RMSNormed [n, Q], kv_c RMSNormed [n, KV], k_pe roped [n, R], key LayerNormed and roped
    over its first ``key_rope.dim`` dims [n, K], in q_c's dtype; the indexer heads' weights
    [n, Hi] times ``head_weights_scale`` (a 1-element fp32 tensor) in fp32); with ``write``,
    the first ``len(write.slot_mapping)`` rows' tokens also into both caches (V3.2's dims:
    KV 512, R 64, K 128). Triton for CUDA tensors (capturable), :func:`latent_prologue_ref`
    otherwise; ``use_triton=True`` runs the kernel anyway (the CPU interpreter in tests)."""
    n = positions.shape[0]
    for name, x in (("q_c", q_c), ("kv_c", kv_c), ("k_pe", k_pe), ("key", key), ("head_weights", head_weights)):
        _check_rows(f"latent_prologue {name}", x, n, 2)
    if head_weights_scale.numel() != 1 or head_weights_scale.dtype != torch.float32:
        raise ValueError(f"latent_prologue: head_weights_scale must be a 1-element fp32 tensor; got "
                         f"{head_weights_scale.dtype} {tuple(head_weights_scale.shape)}")
    for name, x, norm in (("q_c", q_c, q_norm), ("kv_c", kv_c, kv_norm), ("key", key, key_norm)):
        if norm.weight.shape != x.shape[-1:] or (norm.bias is not None and norm.bias.shape != x.shape[-1:]):
            raise ValueError(f"latent_prologue: {name}'s norm needs weight / bias [{x.shape[-1]}]; got weight "
                             f"{tuple(norm.weight.shape)}, bias {None if norm.bias is None else tuple(norm.bias.shape)}")
    if q_norm.bias is not None or kv_norm.bias is not None or key_norm.bias is None:
        raise ValueError("latent_prologue: q_c / kv_c take RMSNorms (no bias), the key a LayerNorm (a bias)")
    if len({q_c.dtype, kv_c.dtype, k_pe.dtype, key.dtype}) != 1:
        raise ValueError(f"latent_prologue: rows of one dtype; got {q_c.dtype}, {kv_c.dtype}, {k_pe.dtype}, {key.dtype}")
    _check_rope("latent_prologue mla_rope", mla_rope, k_pe.shape[-1])
    _check_rope("latent_prologue key_rope", key_rope, key.shape[-1])
    if mla_rope.dim != k_pe.shape[-1]:
        raise ValueError(f"latent_prologue: MLA's rope covers all of k_pe ({k_pe.shape[-1]}); got dim {mla_rope.dim}")
    caches = None if write is None else _cache_write_args(write, kv_c, k_pe, key)
    if not (q_c.is_cuda if use_triton is None else use_triton) or n == 0:
        return latent_prologue_ref(q_c, kv_c, k_pe, key, head_weights, head_weights_scale, positions, q_norm,
                                   kv_norm, key_norm, mla_rope, key_rope, write)  # fmt: skip
    slots = positions if write is None else write.slot_mapping  # unread placeholder without a write
    (l_kind, (la, lb, lc)), (i_kind, (ia, ib)) = caches or ((0, (q_c, q_c, q_c)), (0, (q_c, q_c)))
    outs = tuple(torch.empty(x.shape, dtype=q_c.dtype, device=q_c.device) for x in (q_c, kv_c, k_pe, key))
    outs += (torch.empty(head_weights.shape, dtype=torch.float32, device=q_c.device),)
    q_dim, kv_dim, key_dim = q_c.shape[-1], kv_c.shape[-1], key.shape[-1]
    _latent_prologue_kernel[(n, 3)](
        positions.contiguous(),
        q_c, q_norm.weight.contiguous(), outs[0], q_c.stride(0), q_norm.eps,
        kv_c, kv_norm.weight.contiguous(), outs[1], kv_c.stride(0), kv_norm.eps,
        k_pe, outs[2], k_pe.stride(0), mla_rope.cos_sin, mla_rope.cos_sin.stride(0),
        key, key_norm.weight.float().contiguous(), key_norm.bias.float().contiguous(), outs[3], key.stride(0),
        key_norm.eps, key_rope.cos_sin, key_rope.cos_sin.stride(0),
        head_weights, head_weights_scale, outs[4], head_weights.stride(0), NUM_HW=head_weights.shape[-1],
        HW_BLOCK=next_pow2(head_weights.shape[-1]),
        latent_a_ptr=la, latent_b_ptr=lb, latent_c_ptr=lc, index_a_ptr=ia, index_b_ptr=ib, slot_ptr=slots,
        num_slots=slots.shape[0] if write is not None else 0, block_size=1 if write is None else write.block_size,
        Q_DIM=q_dim, Q_BLOCK=next_pow2(q_dim), KV_DIM=kv_dim, KV_BLOCK=next_pow2(kv_dim),
        PE_HALF=mla_rope.dim // 2, PE_PAIRS=next_pow2(mla_rope.dim // 2), MLA_NEOX=mla_rope.neox,
        KEY_DIM=key_dim, KEY_BLOCK=next_pow2(key_dim), KEY_HALF=key_rope.dim // 2,
        KEY_PAIRS=next_pow2(key_rope.dim // 2), KEY_NEOX=key_rope.neox, LATENT=l_kind, INDEX=i_kind, num_warps=4,
    )  # fmt: skip
    return outs


def _cache_write_args(write: TokenCacheWrite, kv_c, k_pe, key):
    """kv_cache.py's checks and cache views for ``write`` (its rows: the first of kv_c / k_pe / key)."""
    m = write.slot_mapping.shape[0]
    if (write.slot_mapping.dtype != torch.int64 or write.slot_mapping.dim() != 1 or not write.slot_mapping.is_contiguous()
            or m > kv_c.shape[0]):  # fmt: skip
        raise ValueError(f"latent_prologue: write.slot_mapping must be contiguous int64 [<= {kv_c.shape[0]}]; got "
                         f"{write.slot_mapping.dtype} {tuple(write.slot_mapping.shape)}")
    return (_latent_args(write.latent_cache, kv_c[:m], k_pe[:m], m, write.kv_cache_dtype),
            _index_args(write.index_cache, key[:m], m, write.block_size, write.index_fp8))


def query_rope(q_pe, index_q, positions, mla_rope: Rope, key_rope: Rope, q_pe_copy=None, head_weights=None,
               quantized: QuantizedIndexerQuery | None = None, use_triton: bool | None = None) -> None:  # fmt: skip
    """MLA's rope over q_pe [n, H, R] and the indexer's over the first ``key_rope.dim`` dims of
    index_q [n, Hi, K], in place (strided views of the projections: unit last stride); the
    roped q_pe also into ``q_pe_copy`` [n, H, R] when given (the tail of the attention's
    [n, H, 512 + R] latent query, so nothing copies it there later). With ``quantized``
    (K = 128) the roped index_q also goes to fp8 with the heads' weights ``head_weights``
    [n, Hi] (fp32) folded, as :func:`kv_cache_ref.quantize_indexer_queries` makes it, into
    ``quantized``'s buffers: the quantization the fp8 indexer would otherwise run as its own
    pass. Triton for CUDA tensors (capturable), :func:`query_rope_ref` otherwise."""
    n = positions.shape[0]
    _check_rows("query_rope q_pe", q_pe, n, 3)
    _check_rows("query_rope index_q", index_q, n, 3)
    if index_q.dtype != q_pe.dtype:
        raise ValueError(f"query_rope: q_pe and index_q of one dtype; got {q_pe.dtype}, {index_q.dtype}")
    if q_pe_copy is not None and (q_pe_copy.shape != q_pe.shape or q_pe_copy.dtype != q_pe.dtype
                                  or q_pe_copy.stride(-1) != 1):  # fmt: skip
        raise ValueError(f"query_rope: q_pe_copy must match q_pe {tuple(q_pe.shape)} {q_pe.dtype} with unit last "
                         f"stride; got {tuple(q_pe_copy.shape)} {q_pe_copy.dtype} stride {q_pe_copy.stride()}")
    if quantized is not None:
        _check_quantized(quantized, index_q, head_weights)
    _check_rope("query_rope mla_rope", mla_rope, q_pe.shape[-1])
    _check_rope("query_rope key_rope", key_rope, index_q.shape[-1])
    if mla_rope.dim != q_pe.shape[-1]:
        raise ValueError(f"query_rope: MLA's rope covers all of q_pe ({q_pe.shape[-1]}); got dim {mla_rope.dim}")
    if not (q_pe.is_cuda if use_triton is None else use_triton) or n == 0:
        query_rope_ref(q_pe, index_q, positions, mla_rope, key_rope, q_pe_copy, head_weights, quantized)
        return
    copy = q_pe if q_pe_copy is None else q_pe_copy
    q8_heads = 0 if quantized is None else quantized.q.shape[1]
    hw, q8, w8 = (index_q, index_q, index_q) if quantized is None else (
        head_weights, quantized.q.view(torch.uint8), quantized.weights)  # unread placeholders without QUANT
    grid = (n, 2, triton.cdiv(max(q_pe.shape[1], index_q.shape[1], q8_heads), _QUERY_HEADS_PER_PROGRAM))
    _query_rope_kernel[grid](
        positions.contiguous(),
        q_pe, q_pe.stride(0), q_pe.stride(1), q_pe.shape[1], mla_rope.cos_sin, mla_rope.cos_sin.stride(0),
        copy, copy.stride(0), copy.stride(1),
        index_q, index_q.stride(0), index_q.stride(1), index_q.shape[1], key_rope.cos_sin,
        key_rope.cos_sin.stride(0),
        hw, hw.stride(0), q8, w8, q8_heads,
        Q_DIM=q_pe.shape[-1], Q_BLOCK=next_pow2(q_pe.shape[-1]), MLA_HALF=mla_rope.dim // 2, MLA_NEOX=mla_rope.neox,
        IQ_DIM=index_q.shape[-1], IQ_BLOCK=next_pow2(index_q.shape[-1]), KEY_HALF=key_rope.dim // 2,
        KEY_NEOX=key_rope.neox, BLOCK_H=_QUERY_HEADS_PER_PROGRAM, COPY=q_pe_copy is not None,
        QUANT=quantized is not None, num_warps=4,
    )  # fmt: skip


def _check_quantized(quantized: QuantizedIndexerQuery, index_q: torch.Tensor, head_weights) -> None:
    n, heads, dim = index_q.shape
    q8, w8 = quantized
    if (dim != INDEX_HEAD_DIM or head_weights is None or head_weights.shape != (n, heads)
            or head_weights.dtype != torch.float32 or head_weights.stride(-1) != 1):  # fmt: skip
        raise ValueError(f"query_rope: quantizing takes index_q [n, Hi, {INDEX_HEAD_DIM}] and fp32 head_weights "
                         f"[n, Hi] with unit last stride; got index_q {tuple(index_q.shape)}, head_weights "
                         f"{None if head_weights is None else (tuple(head_weights.shape), head_weights.dtype)}")
    if (q8.dtype != torch.float8_e4m3fn or q8.dim() != 3 or q8.shape[0] != n or q8.shape[1] < heads
            or q8.shape[2] != dim or not q8.is_contiguous() or w8.dtype != torch.float32
            or w8.shape != q8.shape[:2] or not w8.is_contiguous()):  # fmt: skip
        raise ValueError(f"query_rope: quantized needs contiguous fp8 q [{n}, >= {heads}, {dim}] and fp32 weights "
                         f"of its first two dims; got q {tuple(q8.shape)} {q8.dtype}, weights "
                         f"{tuple(w8.shape)} {w8.dtype}")
