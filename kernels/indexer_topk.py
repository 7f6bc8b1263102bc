"""Triton lightning-indexer scores + top-k over the paged indexer key cache.

Semantics are those of :func:`attention_ref.indexer_topk_paged` (the oracle): row ``m``
scores the keys at request-local positions ``[0, row_kv_len[m])`` of request
``row_req[m]`` with ``score = sum_h relu(q[m,h] . k) * weights[m,h]`` (k dequantised) and
returns the ``topk`` best positions, best first, ties to the lower position, ``-1`` padded.

Two kernels per chunk of rows (the fp32 logits buffer of a chunk stays under
``max_logits_bytes``):

1. ``_indexer_logits_kernel``: one program = a group of up to ``G`` consecutive rows of the
   same request x one range of keys. The rows' queries (``G*H x 128``) stay in shared
   memory while the key tiles (``BLOCK_N x 128``, gathered through the block table, fp8
   with a per-key power-of-two scale or plain rows) stream through one tensor-core product
   each (keys on M, (row, head) on N, so the weighted sum over heads stays within a thread
   and its quad), then ``relu``, the per-head weights and the head sum. Only each row's
   causal range is computed and written. Products are bf16 x bf16 (fp8 keys and fp8
   queries are exact in bf16) with fp32 accumulation: Hopper's fp8 products accumulate
   with reduced precision and reorder near-ties against the fp32 reference.
2. ``_topk_kernel``: one program per row. Rows with ``kv_len <= topk`` sort all their keys.
   Longer rows run an exact radix select on the order-preserving int32 image of the fp32
   scores (4 passes of 8-bit histograms) to find the k-th score ``T``, keep every key
   ``> T`` and the lowest-position keys ``== T`` (deterministic ties), and sort the kept
   ``topk`` keys by (score desc, position asc) with a bitonic sort of packed int64 keys.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_utils import interpreting, load_fp8_as_f32, native_fp8, next_pow2, num_sms
from .budgets import MAX_LOGITS_BYTES
from .forward_cache import SameTensorsCache
from .kv_cache_ref import INDEX_HEAD_DIM, INDEXER_FP8_SLOT_BYTES


@triton.jit
def _indexer_logits_kernel(
    q_ptr,
    stride_qm,
    stride_qh,
    w_ptr,
    stride_wm,
    k_ptr,  # uint8 (fp8 layout) or float rows of the indexer cache
    k_scale_ptr,  # fp32 view of the fp8 cache (scales); unused for plain caches
    bt_ptr,
    stride_bt,
    row_req_ptr,
    row_len_ptr,
    group_start_ptr,  # [chunk rows] first row (chunk-local) of each group
    group_id_ptr,  # [chunk rows] group of each row
    num_groups_ptr,  # [1]
    logits_ptr,
    stride_lm,
    row0,  # first row of the chunk
    chunk_rows,
    num_heads,
    block_size,
    keys_per_split,
    G: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    FP8: tl.constexpr,
    NATIVE_FP8: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    TRANS: tl.constexpr,
):
    gid = tl.program_id(0)
    split = tl.program_id(1)
    if gid >= tl.load(num_groups_ptr):
        return
    start_row = tl.load(group_start_ptr + gid)  # chunk-local
    offs_g = start_row + tl.arange(0, G)
    g_in = offs_g < chunk_rows
    g_ok = g_in & (tl.load(group_id_ptr + offs_g, mask=g_in, other=-1) == gid)
    rows = row0 + offs_g
    lens = tl.load(row_len_ptr + rows, mask=g_ok, other=0)
    req = tl.load(row_req_ptr + row0 + start_row)
    max_len = tl.max(lens, 0)
    k_begin = split * keys_per_split
    if k_begin >= max_len:
        return
    k_end = tl.minimum(max_len, k_begin + keys_per_split)

    # queries of the group: rows g*BLOCK_H + h
    offs_gh = tl.arange(0, G * BLOCK_H)
    g_of = offs_gh // BLOCK_H
    h_of = offs_gh % BLOCK_H
    qrow = row0 + start_row + g_of
    q_ok = (h_of < num_heads) & ((start_row + g_of) < chunk_rows)
    offs_d = tl.arange(0, 128)
    q = tl.load(
        q_ptr + qrow.to(tl.int64)[:, None] * stride_qm + h_of[:, None] * stride_qh
        + offs_d[None, :],
        mask=q_ok[:, None],
        other=0.0,
    )
    w = tl.load(w_ptr + qrow.to(tl.int64) * stride_wm + h_of, mask=q_ok, other=0.0)
    kdt: tl.constexpr = q.dtype  # fp8 q only comes with an fp8 cache (the wrapper checks)

    bt_row = bt_ptr + req.to(tl.int64) * stride_bt
    out_rows = logits_ptr + offs_g.to(tl.int64) * stride_lm
    for start in range(k_begin, k_end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        p_ok = pos < k_end
        blk = tl.load(bt_row + pos // block_size, mask=p_ok, other=0).to(tl.int64)
        off = pos % block_size
        if FP8:
            base = blk * block_size * 132
            if kdt == tl.float8e4nv:
                kt = tl.load(
                    k_ptr + (base + off * 128)[:, None] + offs_d[None, :],
                    mask=p_ok[:, None],
                    other=0,
                ).to(tl.float8e4nv, bitcast=True)
            else:
                kt = load_fp8_as_f32(
                    k_ptr + (base + off * 128)[:, None] + offs_d[None, :],
                    p_ok[:, None],
                    NATIVE_FP8,
                ).to(kdt)
            ks = tl.load(k_scale_ptr + blk * block_size * 33 + block_size * 32 + off, mask=p_ok,
                         other=0.0)
        else:
            kt = tl.load(
                k_ptr + ((blk * block_size + off) * 128)[:, None] + offs_d[None, :],
                mask=p_ok[:, None],
                other=0.0,
            ).to(kdt)
        if TRANS:
            # keys on M, (row, head) on N: the head sum stays inside each thread / quad
            if UPCAST:
                st = tl.dot(kt.to(tl.float32), tl.trans(q.to(tl.float32)))
            elif IEEE:
                st = tl.dot(kt, tl.trans(q), input_precision="tf32x3")
            else:
                st = tl.dot(kt, tl.trans(q))
            st = tl.maximum(st, 0.0) * w[None, :]
            logit_t = tl.sum(tl.reshape(st, (BLOCK_N, G, BLOCK_H)), 2)  # [BLOCK_N, G]
            if FP8:
                logit_t = logit_t * ks[:, None]
            logit = tl.trans(logit_t)
        else:
            if UPCAST:
                s = tl.dot(q.to(tl.float32), tl.trans(kt.to(tl.float32)))
            elif IEEE:
                s = tl.dot(q, tl.trans(kt), input_precision="tf32x3")
            else:
                s = tl.dot(q, tl.trans(kt))
            s = tl.maximum(s, 0.0) * w[:, None]
            logit = tl.sum(tl.reshape(s, (G, BLOCK_H, BLOCK_N)), 1)  # [G, BLOCK_N]
            if FP8:
                logit = logit * ks[None, :]
        tl.store(
            out_rows[:, None] + pos[None, :],
            logit,
            mask=g_ok[:, None] & (pos[None, :] < lens[:, None]),
        )


@triton.jit
def _ordered_key(x):
    """fp32 -> int32 with the same order (``-0.0`` mapped to ``+0.0``)."""
    bits = x.to(tl.int32, bitcast=True)
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return tl.where(x == 0.0, 0, key)


@triton.jit
def _topk_kernel(
    logits_ptr,
    stride_lm,
    row_len_ptr,
    row_req_ptr,
    out_ptr,
    stride_om,
    key_scratch_ptr,
    stride_sm,
    row0,
    topk,
    KP: tl.constexpr,  # next power of two >= topk
    BLOCK: tl.constexpr,
    RADIX_BITS: tl.constexpr = 8,
):
    r = tl.program_id(0)
    row = row0 + r
    n = tl.load(row_len_ptr + row)
    n = tl.where(tl.load(row_req_ptr + row) >= 0, n, 0)
    n = tl.maximum(n, 0)
    lrow = logits_ptr + r.to(tl.int64) * stride_lm
    orow = out_ptr + row.to(tl.int64) * stride_om
    srow = key_scratch_ptr + r.to(tl.int64) * stride_sm
    offs_k = tl.arange(0, KP)
    NBINS: tl.constexpr = 1 << RADIX_BITS
    NPASS: tl.constexpr = (32 + RADIX_BITS - 1) // RADIX_BITS
    if n > topk:
        # ---- exact radix select of the topk-th largest key, RADIX_BITS per pass
        prefix = 0
        remaining = topk
        bins = tl.arange(0, NBINS)
        for p in tl.static_range(NPASS):
            hi = 32 - RADIX_BITS * p  # bits [lo, hi) of the key are decided in this pass
            lo = hi - RADIX_BITS if hi > RADIX_BITS else 0
            hist = tl.zeros([NBINS], dtype=tl.int32)
            for start in range(0, n, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                ok = cols < n
                key = _ordered_key(tl.load(lrow + cols, mask=ok, other=0.0))
                if p == 0:
                    digit = (key >> lo) + (1 << (hi - lo - 1))  # signed top bits -> 0..
                else:
                    digit = (key >> lo) & ((1 << (hi - lo)) - 1)
                    ok = ok & ((key >> hi) == prefix)
                hist += tl.histogram(digit, NBINS, mask=ok)
            above = tl.sum(hist, 0) - tl.cumsum(hist, 0)  # count strictly above each bin
            b_sel = tl.max(tl.where(above + hist >= remaining, bins, -1), 0)
            remaining -= tl.sum(tl.where(bins == b_sel, above, 0), 0)
            if p == 0:
                prefix = b_sel - (1 << (hi - lo - 1))
            else:
                prefix = (prefix << (hi - lo)) | b_sel
        # ---- keep keys > T and the first `remaining` keys == T (in position order)
        thr = prefix
        count = 0
        eq_seen = 0
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < n
            key = _ordered_key(tl.load(lrow + cols, mask=ok, other=0.0))
            gt = ok & (key > thr)
            eq = ok & (key == thr)
            eq_i = eq.to(tl.int32)
            eq_rank = eq_seen + tl.cumsum(eq_i, 0) - eq_i
            sel = gt | (eq & (eq_rank < remaining))
            sel_i = sel.to(tl.int32)
            dst = count + tl.cumsum(sel_i, 0) - sel_i
            tl.store(orow + dst, cols, mask=sel)
            tl.store(srow + dst, key, mask=sel)
            count += tl.sum(sel_i, 0)
            eq_seen += tl.sum(eq_i, 0)
        tl.debug_barrier()
        k_ok = offs_k < topk
        cols = tl.load(orow + offs_k, mask=k_ok, other=0)
        key = tl.load(srow + offs_k, mask=k_ok, other=0)
        tl.debug_barrier()
    else:
        k_ok = offs_k < n
        cols = offs_k
        key = _ordered_key(tl.load(lrow + offs_k, mask=k_ok, other=0.0))
    # ---- sort the kept keys: score desc, then position asc
    packed = (key.to(tl.int64) << 32) | (0x7FFFFFFF - cols).to(tl.int64)
    packed = tl.where(k_ok, packed, -9223372036854775807 - 1)
    packed = tl.sort(packed, descending=True)
    out_cols = 0x7FFFFFFF - (packed & 0xFFFFFFFF).to(tl.int32)
    n_out = tl.minimum(n, topk)
    tl.store(orow + offs_k, tl.where(offs_k < n_out, out_cols, -1), mask=offs_k < topk)


# ----------------------------------------------------------------------- wrapper
def _row_groups(row_req: torch.Tensor, row_len: torch.Tensor, group: int):
    """Groups of up to ``group`` consecutive rows of the same request (no host sync).

    Returns (group_start [M] int32: chunk-local first row of group g, group_id [M] int32,
    num_groups [1] int32). Padding rows (``row_req < 0`` or no keys) get group -1.
    """
    m = row_req.shape[0]
    dev = row_req.device
    idx = torch.arange(m, device=dev)
    active = (row_req >= 0) & (row_len > 0)
    prev_req = torch.cat([row_req.new_full((1,), -2), row_req[:-1]])
    prev_act = torch.cat([active.new_zeros(1), active[:-1]])
    run_start = (row_req != prev_req) | (active != prev_act)
    run_first = torch.cummax(torch.where(run_start, idx, torch.zeros_like(idx)), 0).values
    is_start = active & (((idx - run_first) % group) == 0)
    gid = torch.cumsum(is_start.to(torch.int32), 0) - 1
    # deterministic scatter: the first row of group g writes starts[g]; other rows write
    # to a dump slot m that is dropped
    target = torch.where(is_start, gid.long(), torch.full_like(idx, m))
    starts = torch.zeros(m + 1, dtype=torch.int32, device=dev)
    starts = starts.scatter(0, target, idx.to(torch.int32))
    group_id = torch.where(active, gid, torch.full_like(gid, -1)).to(torch.int32)
    num_groups = (is_start.sum().to(torch.int32)).view(1)
    return starts[:m].contiguous(), group_id.contiguous(), num_groups


def _row_prep(row_req, row_kv_len, block_table, group: int, chunk: int):
    """The int32 row / block-table tensors and each chunk's row groups. Built once per
    forward (``_ROW_PREP``): about 20 small device ops per chunk, each a kernel launch on
    the host's critical path, that every layer would otherwise repeat."""
    table = block_table.to(torch.int32).contiguous()
    req = row_req.to(torch.int32).contiguous()
    length = row_kv_len.to(torch.int32).contiguous()
    groups = [_row_groups(req[row0 : row0 + chunk], length[row0 : row0 + chunk], group)
              for row0 in range(0, req.shape[0], chunk)]  # fmt: skip
    return table, req, length, groups


_ROW_PREP: SameTensorsCache = SameTensorsCache()


def _index_cache_views(index_cache: torch.Tensor, block_size: int, fp8: bool):
    if not index_cache.is_contiguous():
        raise ValueError("indexer cache must be contiguous")
    flat = index_cache.view(-1)
    if fp8:
        if index_cache.dtype != torch.uint8:
            raise ValueError(f"fp8 indexer cache must be uint8, got {index_cache.dtype}")
        if flat.numel() % (block_size * INDEXER_FP8_SLOT_BYTES):
            raise ValueError(
                f"fp8 indexer cache bytes must be a multiple of {block_size}*"
                f"{INDEXER_FP8_SLOT_BYTES}; got shape {tuple(index_cache.shape)}"
            )
        return flat, flat.view(torch.float32)
    if not index_cache.dtype.is_floating_point or flat.numel() % INDEX_HEAD_DIM:
        raise ValueError(f"plain indexer cache must be float [..., 128], got {index_cache.dtype}")
    return flat, flat


def _launch_config(num_rows: int, block_h: int, width: int, max_logits_bytes: int, dev: torch.device,
                   q_dtype: torch.dtype, on_gpu: bool) -> dict[str, int]:
    """Launch parameters of the two kernels (``eval/bench_kernels.py`` sweeps them).

    H200 sweeps (eval/kernel_notes.md, run 2): keys on M / (row, head) on N with 4 rows per
    program (N = 256) was the fastest logits layout; the top-k kernel is latency bound per
    row: 4 warps / 2048-key blocks (3 programs per SM) for many rows, 16 warps / 8192-key
    blocks when the rows cannot fill the GPU (decode). The interpreter gets tiny tiles."""
    if not on_gpu:
        return dict(group=2, block_n=16, num_warps=1, num_stages=1, keys_per_split=64, topk_block=64,
                    topk_warps=1, trans=1, radix_bits=8)  # fmt: skip
    many_rows = min(num_rows, max_logits_bytes // (4 * width)) >= 2 * num_sms(dev)
    group = 4 if block_h <= 64 else 1
    config = dict(
        group=group, block_n=128, num_warps=8 if group * block_h >= 128 else 4, num_stages=3,
        keys_per_split=4096 if many_rows else 1024, topk_block=2048 if many_rows else 8192,
        topk_warps=4 if many_rows else 16, trans=1, radix_bits=8,
    )  # fmt: skip
    if q_dtype == torch.float32:  # 3xTF32 products: smaller tiles to fit shared memory
        config.update(group=min(group, 2), block_n=64, num_stages=2)
    return config


def indexer_topk(
    q: torch.Tensor,
    weights: torch.Tensor,
    index_cache: torch.Tensor,
    block_table: torch.Tensor,
    row_req: torch.Tensor,
    row_kv_len: torch.Tensor,
    topk: int,
    block_size: int,
    index_cache_fp8: bool,
    max_kv_len: int | None = None,
    max_logits_bytes: int = MAX_LOGITS_BYTES,
) -> torch.Tensor:
    """Triton version of :func:`attention_ref.indexer_topk_paged`.

    ``max_kv_len`` (optional, an upper bound of ``row_kv_len``) narrows the logits buffer;
    without it the bound is ``block_table.shape[1] * block_size`` (no host sync either way).
    Returns ``[M, topk]`` int32 request-local positions, best first, ``-1`` padded.
    """
    if q.dim() != 3 or q.shape[2] != INDEX_HEAD_DIM:
        raise ValueError(f"q must be [M, H, {INDEX_HEAD_DIM}], got {tuple(q.shape)}")
    num_rows, num_heads, _ = q.shape
    if weights.shape != (num_rows, num_heads):
        raise ValueError(f"weights must be [{num_rows}, {num_heads}], got {tuple(weights.shape)}")
    if row_req.shape != (num_rows,) or row_kv_len.shape != (num_rows,):
        raise ValueError("row_req and row_kv_len must be [M]")
    if block_table.dim() != 2:
        raise ValueError(f"block_table must be [R, B], got {tuple(block_table.shape)}")
    if topk <= 0:
        raise ValueError("topk must be positive")
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn):
        raise ValueError(f"unsupported q dtype {q.dtype}")
    dev = q.device
    out = torch.full((num_rows, topk), -1, dtype=torch.int32, device=dev)
    if num_rows == 0:
        return out
    if q.stride(2) != 1:
        q = q.contiguous()
    weights = weights.float()
    if weights.stride(1) != 1:
        weights = weights.contiguous()
    k_flat, k_scale = _index_cache_views(index_cache, block_size, index_cache_fp8)
    if q.dtype == torch.float8_e4m3fn:
        # exact in bf16; fp8 x fp8 tensor-core products accumulate with reduced precision on
        # Hopper, which reorders near-ties against the fp32 reference
        q = q.to(torch.bfloat16) if dev.type == "cuda" else q.float()

    width = max_kv_len if max_kv_len is not None else block_table.shape[1] * block_size
    width = max(1, int(width))
    on_gpu = dev.type == "cuda" and not interpreting()
    block_h = max(16, next_pow2(num_heads)) if on_gpu else next_pow2(num_heads)
    cfg = _launch_config(num_rows, block_h, width, max_logits_bytes, dev, q.dtype, on_gpu)
    group, kps = max(1, cfg["group"]), cfg["keys_per_split"]
    kp = next_pow2(topk)
    width_pad = triton.cdiv(width, 16) * 16
    chunk = max(1, min(num_rows, max_logits_bytes // (4 * width_pad)))
    logits = torch.empty(chunk, width_pad, dtype=torch.float32, device=dev)
    scratch = torch.empty(chunk, kp, dtype=torch.int32, device=dev)
    num_splits = triton.cdiv(width, kps)
    ieee = q.dtype == torch.float32
    block_table, row_req, row_len, groups = _ROW_PREP.get(
        (row_req, row_kv_len, block_table), (group, chunk),
        lambda: _row_prep(row_req, row_kv_len, block_table, group, chunk),
    )
    for row0, (g_start, g_id, n_groups) in zip(range(0, num_rows, chunk), groups):
        rows = min(chunk, num_rows - row0)
        _indexer_logits_kernel[(rows, num_splits)](
            q, q.stride(0), q.stride(1), weights, weights.stride(0),
            k_flat, k_scale, block_table, block_table.stride(0),
            row_req, row_len, g_start, g_id, n_groups,
            logits, logits.stride(0), row0, rows, num_heads, block_size, kps,
            G=group, BLOCK_H=block_h, BLOCK_N=cfg["block_n"], FP8=index_cache_fp8,
            NATIVE_FP8=native_fp8(dev), UPCAST=not on_gpu, IEEE=ieee and on_gpu, TRANS=bool(cfg["trans"]),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
        _topk_kernel[(rows,)](
            logits, logits.stride(0), row_len, row_req, out, out.stride(0),
            scratch, scratch.stride(0), row0, topk, KP=kp, BLOCK=cfg["topk_block"],
            RADIX_BITS=cfg["radix_bits"], num_warps=cfg["topk_warps"],
        )  # fmt: skip
    return out
