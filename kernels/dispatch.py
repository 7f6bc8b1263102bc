"""Kernel providers: the op set the NSA attention path calls, by implementation.

``NsaOps`` is the interface; ``torch`` (the references) runs everywhere,
``triton`` on CUDA devices. ``get_ops(name)`` picks one; ``builtin_providers()``
lists the instances the plugin registers as pluggy hook implementations.
"""

from __future__ import annotations

import torch

from . import attention_ref, kv_cache_ref


class NsaOps:
    """Torch reference provider (also the base class: one method per op)."""

    name = "torch"
    priority = 0

    def supports(self, device, dtype, num_heads: int) -> bool:
        return True

    def indexer_topk(self, q, weights, index_cache, block_table, row_req, row_kv_len,
                     topk, block_size, index_cache_fp8):
        return attention_ref.indexer_topk_paged(
            q, weights, index_cache, block_table, row_req, row_kv_len, topk, block_size,
            index_cache_fp8,
        )

    def sparse_mla_prefill(self, q, kv_cache, indices, sm_scale, d_v=512, kv_cache_dtype="auto"):
        return attention_ref.sparse_mla(q, kv_cache, indices, sm_scale, d_v, kv_cache_dtype)

    def sparse_mla_decode(self, q, kv_cache, indices, sm_scale, d_v=512, kv_cache_dtype="auto"):
        batch, rows = q.shape[:2]
        out, lse = attention_ref.sparse_mla(
            q.flatten(0, 1), kv_cache, indices.flatten(0, 1), sm_scale, d_v, kv_cache_dtype
        )
        return out.view(batch, rows, *out.shape[1:]), lse.view(batch, rows, -1)

    def write_latent_cache(self, cache, kv_c, k_pe, slot_mapping, kv_cache_dtype):
        kv_cache_ref.write_latent_cache(cache, kv_c, k_pe, slot_mapping, kv_cache_dtype)

    def write_indexer_cache(self, cache, k, slot_mapping, block_size, fp8):
        kv_cache_ref.write_indexer_cache(cache, k, slot_mapping, block_size, fp8)


def builtin_providers() -> list[NsaOps]:
    return [NsaOps()]


def get_ops(name: str = "auto", device: torch.device | str | None = None) -> NsaOps:
    providers = {p.name: p for p in builtin_providers()}
    if name == "auto":
        ranked = sorted(providers.values(), key=lambda p: -p.priority)
        return next(p for p in ranked if p.supports(device, None, 0))
    return providers[name]
