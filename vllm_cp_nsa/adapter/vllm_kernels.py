"""Kernel provider ``vllm``: the sparse MLA ops on vLLM's FlashMLA kernels.

- ``sparse_mla_prefill`` / ``sparse_mla_decode``, bf16 latent cache: FlashMLA's sparse
  prefill kernel (``flash_mla_sparse_fwd``), every row against the whole cache viewed as
  ``[slots, 1, 576]``;
- the same ops, ``fp8_ds_mla`` cache: FlashMLA's sparse fp8 decode kernel
  (``flash_mla_with_kvcache(..., is_fp8_kvcache=True, indices=...)``) over the cache viewed
  as 64-slot pages ``[pages, 64, 1, 656]``; prefill rows go in as one batch of ``M`` queries
  (vLLM's "mixed batch" mode), at most ``FP8_KERNEL_MAX_ROWS`` per call (its int32 strides);
- ``sparse_mla_prefill_positions``, ``fp8_ds_mla`` cache: the batch's blocks dequantized into a
  bf16 workspace (``kernels/latent_workspace.py``), then FlashMLA's bf16 sparse prefill kernel
  over it (vLLM's "separate prefill" mode, which it picks for >= 32 heads per rank; CP ranks
  have all heads). Above ``MAX_WORKSPACE_BYTES`` (``kernels/budgets.py``) the fp8 kernel
  over slots.

FlashMLA takes 64 or 128 query heads here, so fewer heads are zero-padded and sliced back.
Everything else goes to the Triton provider: ``indexer_topk`` (always), the cache writes,
more than 128 attention heads, non-bf16 queries, an ``fp8_ds_mla`` cache whose slot count
is not a multiple of 64, and any op on a vLLM / GPU without these kernels. A DeepGEMM
paged-MQA-logits indexer path was tried and removed because its GPU test failed (see
``eval/results/gpu_vllm_provider_tests_h100.log`` and, in git history, the commit
"Kernel provider 'vllm': ...").

vLLM is imported only inside functions, so this module imports on any vLLM (the CPU
build has none of these kernels) and without vLLM.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from ..kernels.budgets import FP8_KERNEL_MAX_ROWS, MAX_WORKSPACE_BYTES
from ..kernels.dispatch import NsaOps, get_ops
from ..kernels.kv_cache_ref import FP8_DS_MLA_ROW_BYTES, LATENT_DIM, LATENT_ROW_DIM

_FLASHMLA_MAX_HEADS = 128
_FLASHMLA_TOPK_MULTIPLE = 128  # the kernels' top-k tile (64 or 128, and at least 128 on SM100)
_FP8_PAGE_SLOTS = 64  # the fp8 decode kernel's page size off SM100

logger = logging.getLogger("vllm.cp_nsa")


@functools.cache
def _flashmla_sparse_supported() -> bool:
    try:
        from vllm.v1.attention.ops.flashmla import is_flashmla_sparse_supported
    except ImportError:
        return False
    return bool(is_flashmla_sparse_supported()[0])


class VllmKernelOps(NsaOps):
    """FlashMLA sparse from vLLM for sparse MLA; Triton for the indexer, the cache writes
    and whatever FlashMLA does not take."""

    name = "vllm"
    priority = 20
    supports_cuda_graphs = True
    """Every path (the FlashMLA kernels with their head / top-k padding, and the Triton
    provider's ops for the indexer, the cache writes and the fallbacks) decides on shapes
    and dtypes only and never reads a tensor on the host."""

    def supports(self, device, dtype=None, num_heads: int = 0) -> bool:
        if device is None or torch.device(device).type != "cuda":
            return False
        if dtype is not None and dtype != torch.bfloat16:
            return False  # FlashMLA is bf16-only
        if num_heads > _FLASHMLA_MAX_HEADS:
            return False
        return _flashmla_sparse_supported() and _triton().supports(device, dtype, num_heads)

    def unsupported_reason(self, device, dtype=None, num_heads: int = 0) -> str:
        if device is None or torch.device(device).type != "cuda":
            return f"FlashMLA sparse needs a CUDA device, got {device}"
        if dtype is not None and dtype != torch.bfloat16:
            return f"FlashMLA sparse is bf16-only, the model dtype is {dtype} (use --dtype bfloat16)"
        if num_heads > _FLASHMLA_MAX_HEADS:
            return f"FlashMLA sparse takes at most {_FLASHMLA_MAX_HEADS} heads, the model has {num_heads}"
        if not _flashmla_sparse_supported():
            return "this vLLM / GPU has no FlashMLA sparse kernels (SM90 / SM100)"
        return _triton().unsupported_reason(device, dtype, num_heads)

    def _attention_detail(self) -> str:
        return (f"sparse attention: FlashMLA (bf16 cache: sparse prefill kernel; fp8_ds_mla cache: "
                f"prefill batches through a bf16 workspace of their blocks up to "
                f"{MAX_WORKSPACE_BYTES // 1024**2} MiB, else and for decode the fp8 kernel), Triton "
                f"beyond FlashMLA's shapes")  # fmt: skip

    def startup_detail(self) -> str:
        return f"{self._attention_detail()}; indexer: Triton; cache writes: Triton"

    def indexer_topk(self, q, weights, index_cache, block_table, row_req, row_kv_len, topk,
                     block_size, index_cache_fp8):  # fmt: skip
        return _triton().indexer_topk(
            q, weights, index_cache, block_table, row_req, row_kv_len, topk, block_size,
            index_cache_fp8,
        )  # fmt: skip

    def sparse_mla_prefill(self, q, kv_cache, indices, sm_scale, d_v=512, kv_cache_dtype="auto"):
        if _fp8_kernel_applies(q, kv_cache, d_v, kv_cache_dtype):
            return _flashmla_fp8_prefill(q, kv_cache, indices, sm_scale)
        if _bf16_kernel_applies(q, kv_cache, d_v, kv_cache_dtype):
            return _flashmla_bf16(q, kv_cache, indices, sm_scale)
        return _triton().sparse_mla_prefill(q, kv_cache, indices, sm_scale, d_v, kv_cache_dtype)

    def sparse_mla_prefill_positions(self, q, kv_cache, positions, row_req, block_table, block_size,
                                     sm_scale, d_v=512, kv_cache_dtype="auto"):  # fmt: skip
        if _workspace_applies(q, kv_cache, block_table, block_size, d_v, kv_cache_dtype):
            from ..kernels.latent_workspace import latent_workspace, workspace_rows

            workspace = latent_workspace(kv_cache, block_table, block_size)
            rows = workspace_rows(positions, row_req, block_table.shape[1] * block_size)
            return _flashmla_bf16(q, workspace, rows, sm_scale)
        return super().sparse_mla_prefill_positions(
            q, kv_cache, positions, row_req, block_table, block_size, sm_scale, d_v, kv_cache_dtype,
        )  # fmt: skip

    def sparse_mla_decode(self, q, kv_cache, indices, sm_scale, d_v=512, kv_cache_dtype="auto"):
        if _fp8_kernel_applies(q, kv_cache, d_v, kv_cache_dtype):
            return _flashmla_fp8(q, kv_cache, indices, sm_scale)
        if _bf16_kernel_applies(q, kv_cache, d_v, kv_cache_dtype):
            batch, seq = q.shape[:2]
            out, lse = _flashmla_bf16(q.flatten(0, 1), kv_cache, indices.flatten(0, 1), sm_scale)
            return out.reshape(batch, seq, *out.shape[1:]), lse.reshape(batch, seq, -1)
        return _triton().sparse_mla_decode(q, kv_cache, indices, sm_scale, d_v, kv_cache_dtype)

    def write_latent_cache(self, cache, kv_c, k_pe, slot_mapping, kv_cache_dtype) -> None:
        _triton().write_latent_cache(cache, kv_c, k_pe, slot_mapping, kv_cache_dtype)

    def write_indexer_cache(self, cache, k, slot_mapping, block_size, fp8) -> None:
        _triton().write_indexer_cache(cache, k, slot_mapping, block_size, fp8)


def _triton() -> NsaOps:
    return get_ops("triton")


# ------------------------------------------------------------------------ sparse MLA
def _empty_rows():
    """kernels.empty_rows, imported on first use: kernel modules import triton lazily."""
    from ..kernels import empty_rows

    return empty_rows


def _flashmla_common_applies(q: torch.Tensor, kv_cache: torch.Tensor, d_v: int) -> bool:
    return (
        q.is_cuda
        and q.dtype == torch.bfloat16
        and q.shape[-1] == LATENT_ROW_DIM
        and d_v == LATENT_DIM
        and 0 < q.shape[-2] <= _FLASHMLA_MAX_HEADS
        and q.numel() > 0
        and kv_cache.is_contiguous()
        and _flashmla_sparse_supported()
    )


def _fp8_cache_applies(q, kv_cache, d_v, kv_cache_dtype) -> bool:
    """An fp8_ds_mla cache and a query FlashMLA takes."""
    return (
        kv_cache_dtype == "fp8_ds_mla"
        and kv_cache.dtype == torch.uint8
        and kv_cache.shape[-1] == FP8_DS_MLA_ROW_BYTES
        and _flashmla_common_applies(q, kv_cache, d_v)
    )


def _fp8_kernel_applies(q, kv_cache, d_v, kv_cache_dtype) -> bool:
    if not _fp8_cache_applies(q, kv_cache, d_v, kv_cache_dtype):
        return False
    num_slots = kv_cache.numel() // FP8_DS_MLA_ROW_BYTES
    if num_slots % _FP8_PAGE_SLOTS:
        _warn_unpaged_fp8_cache(num_slots)
        return False
    return True


@functools.cache
def _warn_unpaged_fp8_cache(num_slots: int) -> None:
    logger.warning(
        "vllm_cp_nsa: the fp8_ds_mla cache holds %d slots, not a multiple of FlashMLA's "
        "%d-slot pages: sparse attention runs on the slower Triton kernels (use a "
        "--block-size that is a multiple of %d)", num_slots, _FP8_PAGE_SLOTS, _FP8_PAGE_SLOTS,
    )  # fmt: skip


def _workspace_applies(q, kv_cache, block_table, block_size, d_v, kv_cache_dtype) -> bool:
    return (
        0 < block_table.numel() * block_size * LATENT_ROW_DIM * 2 <= MAX_WORKSPACE_BYTES
        and _fp8_cache_applies(q, kv_cache, d_v, kv_cache_dtype)
    )


def _bf16_kernel_applies(q, kv_cache, d_v, kv_cache_dtype) -> bool:
    return (
        kv_cache_dtype != "fp8_ds_mla"
        and kv_cache.dtype == torch.bfloat16
        and kv_cache.shape[-1] == LATENT_ROW_DIM
        and _flashmla_common_applies(q, kv_cache, d_v)
    )


def pad_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """Zero-pad the heads dimension (-2) up to ``heads``."""
    missing = heads - t.shape[-2]
    if missing == 0:
        return t
    if t.dtype == torch.float8_e4m3fn:  # no constant pad for fp8: pad the bytes (0 is +0.0)
        return F.pad(t.view(torch.uint8), (0, 0, 0, missing)).view(t.dtype)
    return F.pad(t, (0, 0, 0, missing))


def _flashmla_heads(num_heads: int) -> int:
    return 64 if num_heads <= 64 else 128


def _kernel_indices(indices: torch.Tensor, num_slots: int) -> torch.Tensor:
    """int32 slots with everything outside the cache as -1 (the fp8 kernel skips only -1),
    -1 padded to a whole number of the kernels' top-k tiles: one pass (kernels/kernel_indices.py)."""
    from ..kernels.kernel_indices import kernel_indices  # imports triton: lazily

    return kernel_indices(indices, num_slots, _FLASHMLA_TOPK_MULTIPLE)


def _flashmla_bf16(q, kv_cache, indices, sm_scale):
    """q [M, H, 576] against the bf16 cache -> (out [M, H, 512], lse [M, H])."""
    from vllm.v1.attention.ops.flashmla import flash_mla_sparse_fwd

    num_heads = q.shape[1]
    kv = kv_cache.view(-1, 1, LATENT_ROW_DIM)
    idx = _kernel_indices(indices, kv.shape[0])
    q = pad_heads(q, _flashmla_heads(num_heads))
    out, _, lse = flash_mla_sparse_fwd(q, kv, idx.unsqueeze(1), sm_scale)
    return _empty_rows().zero_rows_without_keys(out[:, :num_heads], lse[:, :num_heads], idx)


def _flashmla_fp8_prefill(q, kv_cache, indices, sm_scale):
    """Prefill rows q [M, H, 576] / indices [M, K] through ``_flashmla_fp8`` as one sequence
    per ``FP8_KERNEL_MAX_ROWS`` rows (its strides are int32) -> (out [M, H, 512], lse [M, H])."""
    max_rows = FP8_KERNEL_MAX_ROWS
    if q.shape[0] <= max_rows:
        out, lse = _flashmla_fp8(q.unsqueeze(0), kv_cache, indices.unsqueeze(0), sm_scale)
        return out.squeeze(0), lse.squeeze(0)
    out = q.new_empty((q.shape[0], q.shape[1], LATENT_DIM))
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    for lo in range(0, q.shape[0], max_rows):
        hi = min(lo + max_rows, q.shape[0])
        piece_out, piece_lse = _flashmla_fp8(q[lo:hi].unsqueeze(0), kv_cache, indices[lo:hi].unsqueeze(0), sm_scale)
        out[lo:hi] = piece_out[0]
        lse[lo:hi] = piece_lse[0]
    return out, lse


def _flashmla_fp8(q, kv_cache, indices, sm_scale):
    """q [B, S, H, 576] against the fp8_ds_mla cache -> (out [B, S, H, 512], lse [B, S, H])."""
    from vllm.v1.attention.ops.flashmla import flash_mla_with_kvcache, get_mla_metadata

    batch, _, num_heads, _ = q.shape
    pages = kv_cache.view(-1, _FP8_PAGE_SLOTS, 1, FP8_DS_MLA_ROW_BYTES)
    num_slots = pages.shape[0] * _FP8_PAGE_SLOTS
    idx = _kernel_indices(indices, num_slots)
    q = pad_heads(q, _flashmla_heads(num_heads))
    schedule, _ = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(
        q=q,
        k_cache=pages,
        # Unused with indices; vLLM passes placeholders of these shapes too.
        block_table=torch.zeros((batch, 1), dtype=torch.int32, device=q.device),
        cache_seqlens=torch.full((batch,), num_slots, dtype=torch.int32, device=q.device),
        head_dim_v=LATENT_DIM,
        tile_scheduler_metadata=schedule,
        is_fp8_kvcache=True,
        indices=idx,
        softmax_scale=sm_scale,
    )
    # lse comes as [B, H, S]
    return _empty_rows().zero_rows_without_keys(out[:, :, :num_heads], lse[:, :num_heads].transpose(1, 2), idx)
