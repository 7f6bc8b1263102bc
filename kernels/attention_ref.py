"""Torch reference implementations of the NSA attention ops.

These are the oracle every faster kernel is tested against. They favour clarity
over speed, compute in fp32, and run on any device.

Conventions shared by all kernels of this package:
- indexer scores of query row m against key row n:
  ``score[m, n] = sum_h relu(q[m, h] . k[n]) * weights[m, h]`` for ``ks[m] <= n < ke[m]``
  (``weights`` already hold every scale: head scale, softmax scale, q/k quant scales);
  keys outside ``[ks[m], ke[m])`` are never selected;
- top-k rows hold absolute key-row indices, best first (higher score, then lower
  index on ties), ``-1`` padded when a row has fewer than ``topk`` candidates;
- sparse MLA reads ``indices`` as slots of the paged latent cache; ``-1`` (or any
  slot outside the cache) is skipped; a row with no valid index outputs zeros and
  ``lse = -inf``; ``lse`` is the natural log of the sum of exp(scaled scores).
"""

from __future__ import annotations

import torch

from .kv_cache_ref import LATENT_ROW_DIM, gather_indexer_keys, gather_latent_rows

INVALID_INDEX = -1


def indexer_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
) -> torch.Tensor:
    """Masked indexer logits ``[M, N]`` (fp32, ``-inf`` outside ``[ks, ke)``).

    q: [M, H, D]; k: [N, D] (dequantized); weights: [M, H]; ks, ke: [M].
    """
    _check_indexer_shapes(q, k, weights, ks, ke)
    dots = torch.einsum("mhd,nd->mhn", q.float(), k.float()).relu_()
    logits = torch.einsum("mhn,mh->mn", dots, weights.float())
    cols = torch.arange(k.shape[0], device=k.device)
    in_range = (cols[None, :] >= ks[:, None].long()) & (cols[None, :] < ke[:, None].long())
    return logits.masked_fill_(~in_range, float("-inf"))


def topk_from_logits(
    logits: torch.Tensor, ks: torch.Tensor, ke: torch.Tensor, topk: int
) -> torch.Tensor:
    """Top-``topk`` columns per row of masked logits, best first, ``-1`` padded."""
    num_rows, num_cols = logits.shape
    out = torch.full((num_rows, topk), INVALID_INDEX, dtype=torch.int32, device=logits.device)
    if num_rows == 0 or num_cols == 0:
        return out
    # A stable sort of the negated scores keeps equal scores in ascending column
    # order, which is the documented tie rule.
    order = torch.sort(-logits, dim=1, stable=True).indices[:, :topk].to(torch.int32)
    width = order.shape[1]
    num_valid = (ke.long() - ks.long()).clamp(min=0, max=topk)
    keep = torch.arange(width, device=logits.device)[None, :] < num_valid[:, None]
    out[:, :width] = torch.where(keep, order, torch.full_like(order, INVALID_INDEX))
    return out


def indexer_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    weights: torch.Tensor,
    ks: torch.Tensor,
    ke: torch.Tensor,
    topk: int,
) -> torch.Tensor:
    """Indexer scores fused with top-k selection: ``[M, topk]`` int32 key rows."""
    return topk_from_logits(indexer_logits(q, k, weights, ks, ke), ks, ke, topk)


def indexer_topk_paged(
    q: torch.Tensor,
    weights: torch.Tensor,
    index_cache: torch.Tensor,
    block_table: torch.Tensor,
    row_req: torch.Tensor,
    row_kv_len: torch.Tensor,
    topk: int,
    block_size: int,
    index_cache_fp8: bool,
) -> torch.Tensor:
    """Indexer top-k for query rows reading keys from the paged indexer cache.

    Row m scores the keys at request-local positions ``[0, row_kv_len[m])`` of
    request ``row_req[m]`` (a row with ``row_req < 0`` or no keys is all ``-1``).
    Returns ``[M, topk]`` int32 request-local positions, best first.
    """
    out = torch.full((q.shape[0], topk), INVALID_INDEX, dtype=torch.int32, device=q.device)
    active = (row_req >= 0) & (row_kv_len > 0)
    for req in torch.unique(row_req[active]).tolist():
        rows = torch.nonzero(active & (row_req == req)).flatten()
        kv_len = row_kv_len[rows].long()
        positions = torch.arange(int(kv_len.max()), device=q.device)
        slots = slots_from_positions(block_table[req][None], positions[None], block_size)[0]
        keys = gather_indexer_keys(index_cache, slots, block_size, index_cache_fp8)
        ks = torch.zeros_like(kv_len)
        out[rows] = indexer_topk(q[rows], keys, weights[rows], ks, kv_len, topk)
    return out


def slots_from_positions(
    block_table_rows: torch.Tensor, positions: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Cache slots ``[M, K]`` of request-local ``positions`` ``[M, K]`` given each
    row's block-table row ``[M, B]``; ``-1`` stays ``-1``."""
    safe = positions.long().clamp(min=0)
    blocks = torch.gather(block_table_rows.long(), 1, safe // block_size)
    slots = blocks * block_size + safe % block_size
    return torch.where(positions >= 0, slots, torch.full_like(slots, INVALID_INDEX))


def sparse_mla(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int = 512,
    kv_cache_dtype: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse MQA attention in the absorbed MLA form.

    q: [M, H, 576]; kv_cache: latent cache, any shape whose last dim is one slot
    row (576 values, or 656 bytes for ``fp8_ds_mla``); indices: [M, K] int32
    slots. Returns ``(out [M, H, d_v] in q.dtype, lse [M, H] fp32)``.
    """
    if q.dim() != 3 or indices.dim() != 2 or q.shape[0] != indices.shape[0]:
        raise ValueError(
            f"sparse_mla expects q [M,H,D] and indices [M,K]; got "
            f"{tuple(q.shape)}, {tuple(indices.shape)}"
        )
    if q.shape[2] != LATENT_ROW_DIM:
        raise ValueError(f"sparse_mla expects q head dim {LATENT_ROW_DIM}, got {q.shape[2]}")
    num_slots = kv_cache.numel() // kv_cache.shape[-1]
    valid = (indices >= 0) & (indices < num_slots)
    safe = torch.where(valid, indices, torch.zeros_like(indices))
    selected = gather_latent_rows(kv_cache, safe, kv_cache_dtype)  # [M, K, 576]
    # Zero what invalid indices read (slot 0 may hold anything, even NaN).
    selected = selected.masked_fill(~valid[..., None], 0.0)
    scores = torch.einsum("mhd,mkd->mhk", q.float(), selected) * sm_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # -inf where a row has no valid key
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    probs = probs.masked_fill(~valid[:, None, :], 0.0)
    out = torch.einsum("mhk,mkv->mhv", probs, selected[..., :d_v])
    return out.to(q.dtype), lse


def dense_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, sm_scale: float
) -> torch.Tensor:
    """Causal softmax attention within each sequence ``[cu_seqlens[i], cu_seqlens[i+1])`` of
    q / k [n, H, D], v [n, H, Dv] -> [n, H, Dv] (rows past the last sequence: 0). torch's
    SDPA per sequence: on CUDA its memory-efficient kernel, so a 2K-token prompt does not
    materialise [H, 2K, 2K] scores."""
    out = q.new_zeros((q.shape[0], q.shape[1], v.shape[-1]))
    bounds = cu_seqlens.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            heads_first = [t[lo:hi].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]  # [1, H, L, D]
            attn = torch.nn.functional.scaled_dot_product_attention(*heads_first, is_causal=True, scale=sm_scale)
            out[lo:hi] = attn[0].transpose(0, 1)
    return out


def _check_indexer_shapes(q, k, weights, ks, ke) -> None:
    if q.dim() != 3 or k.dim() != 2 or q.shape[2] != k.shape[1]:
        raise ValueError(
            f"indexer expects q [M,H,D] and k [N,D]; got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if weights.shape != q.shape[:2]:
        raise ValueError(f"weights must be [M,H]={tuple(q.shape[:2])}, got {tuple(weights.shape)}")
    if ks.shape != (q.shape[0],) or ke.shape != (q.shape[0],):
        raise ValueError("ks and ke must be [M]")
