"""Torch reference for the KV-cache byte layouts and their write / read paths.

Latent (MLA) cache, one row per token slot:
- ``auto``: 576 values (512 latent + 64 rope) in the model dtype;
- ``fp8_ds_mla``: 656 bytes = 512 float8_e4m3fn latent values, 4 float32 scales
  (one per 128 values, a power of two: amax/448 rounded up, floored at 1e-4),
  64 bf16 rope values. Same bytes as vLLM's FlashMLA-sparse cache.

Indexer key cache, per block of ``block_size`` slots:
- ``auto``: ``[block_size, 128]`` in the model dtype;
- ``fp8``: 132 bytes per slot laid out as all values then all scales: the block's
  ``block_size * 128`` float8_e4m3fn bytes, then ``block_size`` float32 scales
  (a power of two: max(amax, 1e-4)/448 rounded up; DeepGEMM's paged layout).

Slots are ``block * block_size + offset``; a negative slot writes nothing.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

LATENT_DIM = 512
ROPE_DIM = 64
LATENT_ROW_DIM = LATENT_DIM + ROPE_DIM
FP8_DS_MLA_ROW_BYTES = 656
FP8_TILE = 128
FP8_MAX = 448.0
INDEX_HEAD_DIM = 128
INDEXER_FP8_SLOT_BYTES = INDEX_HEAD_DIM + 4
_SCALE_FLOOR = 1e-4


def pow2_round_up(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x (x > 0), exactly: fp32 log2 can round a value one
    ulp above a power of two down to that power's exponent."""
    mantissa, exponent = torch.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(x), torch.where(mantissa == 0.5, exponent - 1, exponent))


# ----------------------------------------------------------------- latent cache
def quantize_fp8_ds_mla(kv_c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """[T, 512] latent + [T, 64] rope -> [T, 656] uint8 rows."""
    num_tokens = kv_c.shape[0]
    tiles = kv_c.float().view(num_tokens, LATENT_DIM // FP8_TILE, FP8_TILE)
    amax = tiles.abs().amax(dim=-1)
    scales = pow2_round_up(torch.clamp(amax / FP8_MAX, min=_SCALE_FLOOR))
    values = (tiles / scales[..., None]).to(torch.float8_e4m3fn).view(num_tokens, LATENT_DIM)
    out = torch.empty(num_tokens, FP8_DS_MLA_ROW_BYTES, dtype=torch.uint8, device=kv_c.device)
    out[:, :LATENT_DIM] = values.view(torch.uint8)
    out[:, LATENT_DIM : LATENT_DIM + 16] = scales.contiguous().view(torch.uint8)
    out[:, LATENT_DIM + 16 :] = k_pe.to(torch.bfloat16).contiguous().view(torch.uint8)
    return out


def dequantize_fp8_ds_mla(rows: torch.Tensor) -> torch.Tensor:
    """[S, 656] uint8 rows -> [S, 576] fp32 (latent then rope)."""
    rows = rows.contiguous()
    num_rows = rows.shape[0]
    values = rows[:, :LATENT_DIM].view(torch.float8_e4m3fn).float()
    scales = rows[:, LATENT_DIM : LATENT_DIM + 16].contiguous().view(torch.float32)
    latent = values.view(num_rows, -1, FP8_TILE) * scales[..., None]
    rope = rows[:, LATENT_DIM + 16 :].contiguous().view(torch.bfloat16).float()
    return torch.cat([latent.view(num_rows, LATENT_DIM), rope], dim=-1)


def write_latent_cache(
    cache: torch.Tensor,
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    slot_mapping: torch.Tensor,
    kv_cache_dtype: str,
) -> None:
    """Write T tokens into ``cache`` [num_blocks, block_size, row] at their slots."""
    flat = cache.view(-1, cache.shape[-1])
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if slots.numel() == 0:
        return
    kv_c, k_pe = kv_c[keep], k_pe[keep]
    if kv_cache_dtype == "fp8_ds_mla":
        flat[slots] = quantize_fp8_ds_mla(kv_c, k_pe)
    else:
        flat[slots] = torch.cat([kv_c, k_pe], dim=-1).to(flat.dtype)


def gather_latent_rows(
    cache: torch.Tensor, slots: torch.Tensor, kv_cache_dtype: str
) -> torch.Tensor:
    """fp32 ``[*slots.shape, 576]`` rows at ``slots`` (must be valid), dequantized."""
    flat = cache.view(-1, cache.shape[-1])
    rows = flat[slots.reshape(-1).long()]
    if kv_cache_dtype == "fp8_ds_mla":
        rows = dequantize_fp8_ds_mla(rows)
    return rows.float().view(*slots.shape, LATENT_ROW_DIM)


# ---------------------------------------------------------------- indexer cache
def quantize_indexer_fp8(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 128] -> (fp8 values [T, 128], fp32 power-of-two scales [T])."""
    amax = k.float().abs().amax(dim=-1)
    scales = pow2_round_up(torch.clamp(amax, min=_SCALE_FLOOR) / FP8_MAX)
    values = (k.float() / scales[:, None]).to(torch.float8_e4m3fn)
    return values, scales


def quantize_indexer_queries(
    q: torch.Tensor, weights: torch.Tensor, num_heads_out: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer queries for fp8 MQA logits: q [n, H, 128] -> (fp8 [n, num_heads_out, 128],
    fp32 weights [n, num_heads_out]). Each (row, head) is quantized like an indexer key
    (:func:`quantize_indexer_fp8`) and its scale folded into the head's weight
    (``relu(s x) w = relu(x) s w``, ``s > 0``); extra heads are zero with zero weight.
    fp8 queries are taken as they are."""
    n, num_heads, dim = q.shape
    if q.dtype == torch.float8_e4m3fn:
        values, folded = q, weights.float()
    else:
        values, scales = quantize_indexer_fp8(q.reshape(n * num_heads, dim))
        values, folded = values.view(n, num_heads, dim), weights.float() * scales.view(n, num_heads)
    q8 = torch.zeros((n, num_heads_out, dim), dtype=torch.float8_e4m3fn, device=q.device)
    w8 = torch.zeros((n, num_heads_out), dtype=torch.float32, device=q.device)
    q8[:, :num_heads] = values
    w8[:, :num_heads] = folded
    return q8, w8


class QuantizedIndexerQuery(NamedTuple):
    """An indexer query already in the form fp8 MQA logits take (:func:`quantize_indexer_queries`'
    output), made by the layer's query rope in the same pass as the rope (as vLLM's own V3.2
    ``fused_q`` does), so the indexer does not quantize it again."""

    q: torch.Tensor
    """[n, heads, 128] float8_e4m3fn; heads past the model's are zero."""
    weights: torch.Tensor
    """[n, heads] fp32, each (row, head)'s scale folded in; zero past the model's heads."""

    @classmethod
    def empty(cls, rows: int, heads: int, device: torch.device | str) -> "QuantizedIndexerQuery":
        return cls(torch.empty((rows, heads, INDEX_HEAD_DIM), dtype=torch.float8_e4m3fn, device=device),
                   torch.empty((rows, heads), dtype=torch.float32, device=device))

    def rows(self, n: int) -> "QuantizedIndexerQuery":
        """The first ``n`` rows (a piecewise graph's padded batch cut to the real one)."""
        return QuantizedIndexerQuery(self.q[:n], self.weights[:n])


def _indexer_block_views(cache: torch.Tensor, block_size: int):
    """(values [blocks, block_size, 128] fp8, scales [blocks, block_size] fp32)."""
    blocks = cache.view(cache.shape[0], -1)
    values = blocks[:, : block_size * INDEX_HEAD_DIM].view(torch.float8_e4m3fn)
    scales = blocks[:, block_size * INDEX_HEAD_DIM :].view(torch.float32)
    return values.view(-1, block_size, INDEX_HEAD_DIM), scales


def write_indexer_cache(
    cache: torch.Tensor,
    k: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    fp8: bool,
) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if slots.numel() == 0:
        return
    k = k[keep]
    if not fp8:
        cache.view(-1, INDEX_HEAD_DIM)[slots] = k.to(cache.dtype)
        return
    values, scales = _indexer_block_views(cache, block_size)
    q_values, q_scales = quantize_indexer_fp8(k)
    blocks, offsets = slots // block_size, slots % block_size
    values[blocks, offsets] = q_values
    scales[blocks, offsets] = q_scales


def gather_indexer_keys(
    cache: torch.Tensor, slots: torch.Tensor, block_size: int, fp8: bool
) -> torch.Tensor:
    """fp32 ``[len(slots), 128]`` keys at ``slots`` (must be valid), dequantized."""
    slots = slots.long()
    if not fp8:
        return cache.reshape(-1, INDEX_HEAD_DIM)[slots].float()
    values, scales = _indexer_block_views(cache, block_size)
    blocks, offsets = slots // block_size, slots % block_size
    return values[blocks, offsets].float() * scales[blocks, offsets][:, None]
