"""The kernel package's two providers: one small object per provider.

``get_ops(name, device=None) -> NsaOps``:
- ``"torch"``: the references (:mod:`attention_ref`, :mod:`kv_cache_ref`); any device;
- ``"triton"``: the Triton kernels of this package; CUDA devices (or any device while
  ``TRITON_INTERPRET=1``, which is how CI tests them on CPU).

Every provider exposes the same ops with the references' semantics, a ``name``, a
``priority`` and a capability check ``supports(device, dtype, num_heads)``. They reach the
plugin as pluggy hook implementations (``vllm_cp_nsa.builtins``); choosing among all
registered providers (``kernels: auto``) is ``vllm_cp_nsa.extensions.resolve_kernel_provider``'s
job alone. Triton is imported lazily, so this module (and the package) import without it.
"""

from __future__ import annotations

import torch

from . import attention_ref, kv_cache_ref

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


class NsaOps:
    """Torch reference provider, also the interface: one method per op."""

    name: str = "torch"
    priority: int = 0
    supports_cuda_graphs: bool = False
    """True when no op syncs with the host (capturable in a CUDA graph)."""
    reads_fp8_indexer_cache: bool = False
    """True when the fast indexer path needs the 132-byte fp8 indexer cache: with
    ``indexer_cache: auto`` the plugin then stores the indexer keys as fp8."""

    def startup_detail(self) -> str:
        """What this provider will run here, for the startup log line."""
        return ""

    def supports(self, device, dtype=None, num_heads: int = 0) -> bool:
        """Capability check; ``dtype=None`` / ``num_heads=0`` mean "any"."""
        return dtype is None or dtype in _FLOAT_DTYPES

    def unsupported_reason(self, device, dtype=None, num_heads: int = 0) -> str:
        """Why ``supports`` refuses the call (for the startup error), "" when it does not."""
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            return f"model dtype {dtype} is not one of {', '.join(map(str, _FLOAT_DTYPES))}"
        return ""

    # 0. what the indexer takes
    def indexer_query_fp8_heads(self, num_heads: int, index_cache_fp8: bool) -> int:
        """Heads of an fp8 indexer query (``kv_cache_ref.QuantizedIndexerQuery``) this provider's
        indexer scores, so the layer's query rope makes it in the same pass as the rope (0:
        the indexer takes the model-dtype query only). A provider answering > 0 also gets that
        query as ``quantized=`` in ``indexer_topk`` / ``indexer_topk_decode``, beside ``q`` and
        ``weights`` for whatever batch its fp8 path does not take."""
        return 0

    # 1. indexer scores + top-k over the paged indexer cache
    def indexer_topk(
        self,
        q: torch.Tensor,
        weights: torch.Tensor,
        index_cache: torch.Tensor,
        block_table: torch.Tensor,
        row_req: torch.Tensor,
        row_kv_len: torch.Tensor,
        topk: int,
        block_size: int,
        index_cache_fp8: bool,
        host_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
        quantized: kv_cache_ref.QuantizedIndexerQuery | None = None,
    ) -> torch.Tensor:
        """``host_rows``: ``(row_req, row_kv_len)`` on the host where the batch states them
        exactly (``NsaForwardMetadata.local_rows_host``); a provider that plans its work on
        the host reads them instead of the device tensors (no sync). This reference checks
        them against the device values where both live on the host (every CPU run then
        tests the contract the host-planning providers rely on). ``quantized``: see
        ``indexer_query_fp8_heads``."""
        if host_rows is not None and row_kv_len.device.type == "cpu":
            if not (torch.equal(host_rows[0].long(), row_req.long())
                    and torch.equal(host_rows[1].long(), row_kv_len.long())):  # fmt: skip
                raise ValueError("indexer_topk: host_rows differ from row_req / row_kv_len")
        return attention_ref.indexer_topk_paged(
            q, weights, index_cache, block_table, row_req, row_kv_len, topk, block_size,
            index_cache_fp8,
        )  # fmt: skip

    # 1b. the same for the rows of a uniform decode / verify batch
    def indexer_topk_decode(
        self,
        q: torch.Tensor,
        weights: torch.Tensor,
        index_cache: torch.Tensor,
        block_table: torch.Tensor,
        row_req: torch.Tensor,
        row_kv_len: torch.Tensor,
        next_n: int,
        topk: int,
        block_size: int,
        index_cache_fp8: bool,
        quantized: kv_cache_ref.QuantizedIndexerQuery | None = None,
    ) -> torch.Tensor:
        """``indexer_topk`` for rows laid out as ``len(q) // next_n`` requests of ``next_n``
        consecutive rows each (``NsaForwardMetadata.decode_next_n``): request ``b``'s rows are
        ``b * next_n ..``, with ``row_req`` ``b`` or -1 (graph padding, kv_len 0, possibly
        past ``block_table``'s rows). A provider with a paged decode kernel uses the layout;
        the answer is ``indexer_topk``'s."""
        return self.indexer_topk(q, weights, index_cache, block_table, row_req, row_kv_len, topk, block_size,
                                 index_cache_fp8)  # fmt: skip

    # 2. sparse MLA, prefill rows [M, H, 576] / indices [M, K]
    def sparse_mla_prefill(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        indices: torch.Tensor,
        sm_scale: float,
        d_v: int = 512,
        kv_cache_dtype: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return attention_ref.sparse_mla(q, kv_cache, indices, sm_scale, d_v, kv_cache_dtype)

    # 2b. sparse MLA for prefill rows given request-local top-k positions [M, K]
    def sparse_mla_prefill_positions(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        positions: torch.Tensor,
        row_req: torch.Tensor,
        block_table: torch.Tensor,
        block_size: int,
        sm_scale: float,
        d_v: int = 512,
        kv_cache_dtype: str = "auto",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``sparse_mla_prefill`` over the cache slots of ``positions`` of request
        ``row_req[m]`` (-1: no key / no request). A provider may attend without slots (the
        ``vllm`` provider reads an fp8 cache through a bf16 workspace of the batch's blocks)."""
        from .slots import positions_to_slots  # imports triton: lazily, like every kernel module

        slots = positions_to_slots(positions, row_req, block_table, block_size)
        return self.sparse_mla_prefill(q, kv_cache, slots, sm_scale, d_v, kv_cache_dtype)

    # 3. sparse MLA, decode / verify rows [B, S, H, 576] / indices [B, S, K]
    def sparse_mla_decode(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        indices: torch.Tensor,
        sm_scale: float,
        d_v: int = 512,
        kv_cache_dtype: str = "auto",
        forward_state: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``forward_state``: one dict per forward, the same for every layer: a provider may keep
        work there that every layer's call shares (FlashMLA's tile schedule); None keeps nothing."""
        b, s, h, d = q.shape
        out, lse = self.sparse_mla_prefill(
            q.reshape(b * s, h, d), kv_cache, indices.reshape(b * s, -1), sm_scale, d_v,
            kv_cache_dtype,
        )  # fmt: skip
        return out.view(b, s, h, -1), lse.view(b, s, h)

    def sparse_mla_decode_positions(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        positions: torch.Tensor,
        row_req: torch.Tensor,
        block_table: torch.Tensor,
        block_size: int,
        sm_scale: float,
        d_v: int = 512,
        kv_cache_dtype: str = "auto",
        forward_state: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``sparse_mla_decode`` over the cache slots of request-local ``positions`` [B, S, K]
        of request ``row_req[m]`` (row ``m`` = b * S + s; -1: no key / no request). A provider
        may map them to slots inside its own index pass (the ``vllm`` providers do)."""
        from .slots import positions_to_slots  # imports triton: lazily, like every kernel module

        slots = positions_to_slots(positions.flatten(0, 1), row_req, block_table, block_size)
        return self.sparse_mla_decode(q, kv_cache, slots.view(positions.shape), sm_scale, d_v, kv_cache_dtype,
                                      forward_state)  # fmt: skip

    # 4. latent cache write (656-byte fp8_ds_mla rows or plain rows)
    def write_latent_cache(
        self,
        cache: torch.Tensor,
        kv_c: torch.Tensor,
        k_pe: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_cache_dtype: str,
    ) -> None:
        kv_cache_ref.write_latent_cache(cache, kv_c, k_pe, slot_mapping, kv_cache_dtype)

    # 5. indexer key cache write (132-byte fp8 layout or plain rows)
    def write_indexer_cache(
        self,
        cache: torch.Tensor,
        k: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_size: int,
        fp8: bool,
    ) -> None:
        kv_cache_ref.write_indexer_cache(cache, k, slot_mapping, block_size, fp8)

    # 4 + 5 in one call: a layer's new tokens into both caches (same slots)
    def write_token_caches(
        self,
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
        """``write_latent_cache`` then ``write_indexer_cache`` of the same tokens; a provider
        may write both in one launch (the Triton one does)."""
        self.write_latent_cache(latent_cache, kv_c, k_pe, slot_mapping, kv_cache_dtype)
        self.write_indexer_cache(index_cache, k, slot_mapping, block_size, index_fp8)

    # 6. dense causal attention of whole prompts (MLA's MHA form: q / k [n, H, 192], v [n, H, 128])
    def dense_causal_attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        sm_scale: float,
    ) -> torch.Tensor:
        """Each sequence ``[cu_seqlens[i], cu_seqlens[i+1])`` (int32 [R+1]) attends causally to
        itself -> [n, H, Dv]. Used outside CUDA graphs only (this reference reads
        ``cu_seqlens`` on the host)."""
        return attention_ref.dense_causal_attention(q, k, v, cu_seqlens, sm_scale)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class TritonOps(NsaOps):
    """Triton kernels. ``supports`` is true on CUDA devices only; the CPU interpreter
    (``TRITON_INTERPRET=1``) is a test mode reached through ``get_ops("triton", cpu)``."""

    name = "triton"
    priority = 10
    supports_cuda_graphs = True

    def supports(self, device, dtype=None, num_heads: int = 0) -> bool:
        if device is None or torch.device(device).type != "cuda":
            return False
        if not (torch.cuda.is_available() and _triton_importable()):
            return False
        return super().supports(device, dtype, num_heads)

    def unsupported_reason(self, device, dtype=None, num_heads: int = 0) -> str:
        if device is None or torch.device(device).type != "cuda":
            return f"the Triton kernels need a CUDA device, got {device}"
        if not (torch.cuda.is_available() and _triton_importable()):
            return "CUDA or triton is not available in this process"
        return super().unsupported_reason(device, dtype, num_heads)

    def indexer_topk(self, q, weights, index_cache, block_table, row_req, row_kv_len, topk,
                     block_size, index_cache_fp8, host_rows=None, quantized=None, **kw):  # fmt: skip
        from .indexer_topk import indexer_topk

        return indexer_topk(
            q, weights, index_cache, block_table, row_req, row_kv_len, topk, block_size,
            index_cache_fp8, **kw,
        )  # fmt: skip

    def sparse_mla_prefill(self, q, kv_cache, indices, sm_scale, d_v=512, kv_cache_dtype="auto"):
        from .sparse_mla import sparse_mla_prefill

        return sparse_mla_prefill(q, kv_cache, indices, sm_scale, d_v, kv_cache_dtype)

    def sparse_mla_decode(self, q, kv_cache, indices, sm_scale, d_v=512, kv_cache_dtype="auto", forward_state=None):
        from .sparse_mla import sparse_mla_decode

        return sparse_mla_decode(q, kv_cache, indices, sm_scale, d_v, kv_cache_dtype)

    def write_latent_cache(self, cache, kv_c, k_pe, slot_mapping, kv_cache_dtype) -> None:
        from .kv_cache import write_latent_cache

        write_latent_cache(cache, kv_c, k_pe, slot_mapping, kv_cache_dtype)

    def write_indexer_cache(self, cache, k, slot_mapping, block_size, fp8) -> None:
        from .kv_cache import write_indexer_cache

        write_indexer_cache(cache, k, slot_mapping, block_size, fp8)

    def write_token_caches(self, latent_cache, kv_c, k_pe, kv_cache_dtype, index_cache, k, index_fp8, slot_mapping,
                           block_size) -> None:  # fmt: skip
        from .kv_cache import write_token_caches

        write_token_caches(latent_cache, kv_c, k_pe, kv_cache_dtype, index_cache, k, index_fp8, slot_mapping,
                           block_size)  # fmt: skip


def builtin_providers() -> list[NsaOps]:
    """The provider instances the plugin registers (as pluggy hook implementations)."""
    return [_instance("torch"), _instance("triton")]


_INSTANCES: dict[str, NsaOps] = {}
_CLASSES: dict[str, type[NsaOps]] = {"torch": NsaOps, "triton": TritonOps}


def _instance(name: str) -> NsaOps:
    ops = _INSTANCES.get(name)
    if ops is None:
        ops = _INSTANCES[name] = _CLASSES[name]()
    return ops


def get_ops(name: str, device: torch.device | str | None = None) -> NsaOps:
    """The ops of this package's provider ``name`` (``torch`` | ``triton``), shared instances.

    ``triton`` on a CPU device is allowed only while ``TRITON_INTERPRET=1`` (tests).
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown kernel provider {name!r}; this package has: {', '.join(_CLASSES)}")
    ops = _instance(name)
    if name == "triton" and device is not None and not ops.supports(device):
        from ._triton_utils import interpreting

        if not (_triton_importable() and interpreting()):
            raise RuntimeError(
                f"the triton provider cannot run on {device}: it needs a CUDA device "
                f"(or TRITON_INTERPRET=1 for the CPU interpreter)"
            )
    return ops


__all__ = ["NsaOps", "TritonOps", "builtin_providers", "get_ops"]
