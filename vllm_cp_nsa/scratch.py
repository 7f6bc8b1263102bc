"""Transient memory of one layer's NSA attention, for vLLM's startup memory profile.

vLLM sizes the KV cache from the peak of a profile forward over ``max_num_batched_tokens``
dummy tokens. That forward carries no batch metadata and no cache, so the attention layers
skip the attention itself and its scratch would go unseen: the gathered new rows, the
indexer's fp32 logits chunk, an fp8 prefill's bf16 latent workspace, the absorbed query
and the attention output. Under a high ``gpu_memory_utilization`` the first long batch
would then run out of memory. The model allocates :func:`attention_scratch_bytes` in its
profile forward instead, so vLLM's KV sizing leaves room for it.

The bound follows the allocations of ``nsa_attention`` and the GPU providers' ops, phase by
phase (a phase's buffers are freed before the next one's, so the peak is the largest phase,
not the sum). Local rows and gathered tokens are both counted as ``max_num_batched_tokens``
(an unsplit batch holds all its rows on every rank; a split one gathers at most that many).
Every layer allocates and frees the same bytes, so the profile's peak grows by one layer's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .kernels.budgets import FP8_KERNEL_MAX_ROWS
from .kernels.kv_cache_ref import INDEX_HEAD_DIM, LATENT_DIM, LATENT_ROW_DIM, ROPE_DIM

_INT32 = 4
_FP32 = 4
_BF16 = 2
_FLASHMLA_TOPK_TILE = 128  # FlashMLA pads the top-k indices to whole 128-wide tiles
_FLASHMLA_MIN_HEADS = 64  # FlashMLA runs 64 or 128 heads: fewer are zero-padded


@dataclass(frozen=True)
class BatchBounds:
    """The largest batch the engine schedules (vLLM's scheduler and model limits)."""

    max_rows: int
    """Tokens of one forward (``max_num_batched_tokens``)."""
    max_reqs: int
    """Requests of one forward (``max_num_seqs``)."""
    max_model_len: int
    block_size: int


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    v_head_dim: int
    index_heads: int
    topk: int
    dtype_bytes: int
    """Bytes per element of the model dtype (the query and the gathered rows)."""
    fp8_latent_cache: bool
    """``fp8_ds_mla``: prefill reads the batch's blocks through a bf16 workspace."""
    qk_nope_head_dim: int = 128


@dataclass(frozen=True)
class IndexerLimits:
    """A kernel provider's caps on the indexer's per-chunk buffers."""

    max_logits_bytes: int
    """fp32 logits of one chunk of rows (the Triton indexer, vLLM's DeepGEMM path)."""
    max_gathered_key_bytes: int = 0
    """Keys gathered out of the paged cache for one chunk (DeepGEMM path only)."""
    max_workspace_bytes: int = 0
    """bf16 latent workspace of an fp8 prefill (0: the provider has none)."""


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def attention_phase_bytes(bounds: BatchBounds, shape: AttentionShape, limits: IndexerLimits) -> dict[str, int]:
    """Bytes each phase of one layer's attention allocates for the largest batch.

    Local rows and gathered tokens are both counted as ``bounds.max_rows``: an unsplit
    batch holds all its rows on every rank, a split one gathers at most that many."""
    e = shape.dtype_bytes
    rows = tokens = bounds.max_rows
    width = _round_up(bounds.max_model_len, bounds.block_size)  # keys a row may score
    width_pad = _round_up(width, 16)
    new_row = LATENT_DIM + ROPE_DIM + INDEX_HEAD_DIM
    # 1. the new rows packed, gathered over the ranks, and put back in token order
    gather = rows * new_row * e + 2 * tokens * new_row * e
    # 2. indexer: one chunk of fp32 logits (at least one row) and its top-k scratch, the
    #    picks, fp32 weights and a bf16 copy of fp8 queries
    chunk = max(1, min(rows, limits.max_logits_bytes // (_FP32 * width_pad)))
    topk_pow2 = 1 << max(0, shape.topk - 1).bit_length()
    picks = rows * shape.topk * _INT32
    indexer = (picks + chunk * width_pad * _FP32 + chunk * topk_pow2 * _INT32
               + rows * shape.index_heads * (_FP32 + INDEX_HEAD_DIM * _BF16) + limits.max_gathered_key_bytes)
    # 3. sparse MLA: the absorbed query, the picks as int64 slots and int32 kernel indices
    #    (padded to FlashMLA's top-k tile), the fp8 prefill's workspace, the query copied
    #    with zero heads up to FlashMLA's 64 / 128, its output and lse at the padded heads,
    #    and past FP8_KERNEL_MAX_ROWS rows the fp8 kernel's output of one piece beside the whole
    kernel_heads = _FLASHMLA_MIN_HEADS if shape.num_heads <= _FLASHMLA_MIN_HEADS else max(shape.num_heads, 128)
    topk_tiles = _round_up(shape.topk, _FLASHMLA_TOPK_TILE)
    workspace = 0
    if shape.fp8_latent_cache and limits.max_workspace_bytes:
        workspace = min(limits.max_workspace_bytes, bounds.max_reqs * width * LATENT_ROW_DIM * _BF16)
    padded_query = rows * kernel_heads * LATENT_ROW_DIM * e if kernel_heads != shape.num_heads else 0
    output = rows * kernel_heads * (LATENT_DIM * e + _FP32)
    piece = FP8_KERNEL_MAX_ROWS * kernel_heads * (LATENT_DIM * e + _FP32)
    pieces = piece if shape.fp8_latent_cache and rows > FP8_KERNEL_MAX_ROWS else 0
    attention = (picks + rows * shape.num_heads * LATENT_ROW_DIM * e + rows * topk_tiles * (8 + _INT32)
                 + workspace + padded_query + output + pieces)
    # 4. the attention output through W_UV
    values = output + rows * shape.num_heads * shape.v_head_dim * e
    # or, whole prompts within the top-k: keys / values up-projected, q and k with their rope
    #    dims, the attention output per head (dense_prefill_attention)
    nope, v = shape.qk_nope_head_dim, shape.v_head_dim
    dense = rows * shape.num_heads * ((nope + v) + 2 * (nope + ROPE_DIM) + v) * e
    return {"gather": gather, "indexer": indexer, "attention": attention, "values": values, "dense": dense}


def attention_scratch_bytes(bounds: BatchBounds, shape: AttentionShape, limits: IndexerLimits) -> int:
    """Peak transient bytes of one layer's attention for the largest batch."""
    return max(attention_phase_bytes(bounds, shape, limits).values())
