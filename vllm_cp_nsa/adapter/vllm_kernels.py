"""Kernel provider ``vllm``: the sparse MLA ops on vLLM's FA3 and FlashMLA kernels.

- ``sparse_mla_prefill`` / ``sparse_mla_decode``, bf16 latent cache, where vLLM's FA3 serves
  the GPU (Hopper): FA3's paged varlen kernel called as vLLM's own bf16-cache sparse backend
  calls it (``FlashAttnMLASparseImpl._forward_mqa_kernel`` in
  ``v1/attention/backends/mla/flashattn_mla_sparse.py``): every query row its own sequence
  whose keys are its valid slots, compacted to the front of its indices
  (``kernels/kernel_indices.py``), on 1-slot pages of the cache. Its cost follows the valid
  keys: for 8 prompts x 1K tokens FlashMLA's sparse kernel, which pays for all 2048 top-k
  slots of every row, took 23.5 ms where vLLM's own model took 2.1 ms (one H200, vLLM 0.34);
- ``dense_causal_attention`` (whole prompts within the top-k, ``nsa_attention.dense_prefill_attention``):
  FA3's dense varlen kernel, causal, as vLLM's MLA prefill calls it on Hopper (q / k 192, v 128);
- the sparse ops, bf16 latent cache, elsewhere: FlashMLA's sparse prefill kernel
  (``flash_mla_sparse_fwd``), every row against the whole cache viewed as ``[slots, 1, 576]``;
- the same ops, ``fp8_ds_mla`` cache: FlashMLA's sparse fp8 decode kernel
  (``flash_mla_with_kvcache(..., is_fp8_kvcache=True, indices=...)``) over the cache viewed
  as 64-slot pages ``[pages, 64, 1, 656]``; prefill rows go in as one batch of ``M`` queries
  (vLLM's "mixed batch" mode), at most ``FP8_KERNEL_MAX_ROWS`` per call (its int32 strides);
- ``sparse_mla_prefill_positions``, ``fp8_ds_mla`` cache: the batch's blocks dequantized into a
  bf16 workspace (``kernels/latent_workspace.py``), then FlashMLA's bf16 sparse prefill kernel
  over it (vLLM's "separate prefill" mode, which it picks for >= 32 heads per rank; CP ranks
  have all heads). Above ``MAX_WORKSPACE_BYTES`` (``kernels/budgets.py``) the fp8 kernel
  over slots.

FlashMLA takes 64 or 128 query heads here, so fewer heads are zero-padded and sliced back
(FA3 takes any number). Everything else goes to the Triton provider: ``indexer_topk``
(always), the cache writes, more than 128 attention heads, non-bf16 queries, an
``fp8_ds_mla`` cache whose slot count is not a multiple of 64, and any op on a vLLM / GPU
without these kernels. A DeepGEMM paged-MQA-logits indexer path was tried and removed
because its GPU test failed (see ``eval/results/gpu_vllm_provider_tests_h100.log`` and, in
git history, the commit "Kernel provider 'vllm': ...").

vLLM is imported only inside functions, so this module imports on any vLLM (the CPU
build has none of these kernels) and without vLLM.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

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


@functools.cache
def _fa3_supported() -> bool:
    """vLLM's FA3 on this GPU: its build and SM 9.x (``is_fa_version_supported(3)``, which
    vLLM's FlashAttnMLASparse backend also asks, through ``fa_utils.flash_attn_supports_mla``).
    Without CUDA (the CPU build) ``vllm.vllm_flash_attn`` does not import."""
    if not torch.cuda.is_available():
        return False
    try:
        from vllm.vllm_flash_attn.flash_attn_interface import (  # noqa: F401
            flash_attn_varlen_func,
            is_fa_version_supported,
        )
    except ImportError:
        return False
    return bool(is_fa_version_supported(3))


class VllmKernelOps(NsaOps):
    """FA3 (Hopper, bf16 cache) and FlashMLA sparse from vLLM for sparse MLA; Triton for the
    indexer, the cache writes and whatever these kernels do not take."""

    name = "vllm"
    priority = 20
    supports_cuda_graphs = True
    """Every path (the FlashMLA kernels with their head / top-k padding, FA3 with its
    compacted indices, per-row counts and cached ``cu_seqlens_q``, and the Triton provider's
    ops for the indexer, the cache writes and the fallbacks) decides on shapes and dtypes
    only and never reads a tensor on the host."""

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
        bf16_kernel = ("FA3's paged varlen kernel over each row's valid slots" if _fa3_supported()
                       else "FlashMLA's sparse prefill kernel")  # fmt: skip
        return (f"sparse attention: FlashMLA for the fp8_ds_mla cache (prefill batches through a bf16 "
                f"workspace of their blocks up to {MAX_WORKSPACE_BYTES // 1024**2} MiB, else and for "
                f"decode the fp8 kernel), {bf16_kernel} for the bf16 cache, Triton beyond these "
                f"kernels' shapes")  # fmt: skip

    def startup_detail(self) -> str:
        return f"{self._attention_detail()}; {dense_prefill_detail()}; indexer: Triton; cache writes: Triton"

    def indexer_topk(self, q, weights, index_cache, block_table, row_req, row_kv_len, topk,
                     block_size, index_cache_fp8, host_rows=None, quantized=None):  # fmt: skip
        return _triton().indexer_topk(
            q, weights, index_cache, block_table, row_req, row_kv_len, topk, block_size,
            index_cache_fp8,
        )  # fmt: skip

    def sparse_mla_prefill(self, q, kv_cache, indices, sm_scale, d_v=512, kv_cache_dtype="auto"):
        if _fp8_kernel_applies(q, kv_cache, d_v, kv_cache_dtype):
            return _flashmla_fp8_prefill(q, kv_cache, indices, sm_scale)
        if _bf16_kernel_applies(q, kv_cache, d_v, kv_cache_dtype):
            return _bf16_cache_kernel()(q, kv_cache, indices, sm_scale)
        return _triton().sparse_mla_prefill(q, kv_cache, indices, sm_scale, d_v, kv_cache_dtype)

    def sparse_mla_prefill_positions(self, q, kv_cache, positions, row_req, block_table, block_size,
                                     sm_scale, d_v=512, kv_cache_dtype="auto"):  # fmt: skip
        if _workspace_applies(q, kv_cache, block_table, block_size, d_v, kv_cache_dtype):
            from ..kernels.latent_workspace import latent_workspace, workspace_rows

            workspace = latent_workspace(kv_cache, block_table, block_size)
            rows = workspace_rows(positions, row_req, block_table.shape[1] * block_size)
            return _bf16_cache_kernel()(q, workspace, rows, sm_scale)
        return super().sparse_mla_prefill_positions(
            q, kv_cache, positions, row_req, block_table, block_size, sm_scale, d_v, kv_cache_dtype,
        )  # fmt: skip

    def sparse_mla_decode(self, q, kv_cache, indices, sm_scale, d_v=512, kv_cache_dtype="auto", forward_state=None):
        served = _vllm_decode(q, kv_cache, indices, None, sm_scale, d_v, kv_cache_dtype, forward_state)
        if served is None:
            return _triton().sparse_mla_decode(q, kv_cache, indices, sm_scale, d_v, kv_cache_dtype)
        return served

    def sparse_mla_decode_positions(self, q, kv_cache, positions, row_req, block_table, block_size, sm_scale,
                                    d_v=512, kv_cache_dtype="auto", forward_state=None):  # fmt: skip
        paging = _paging(row_req, block_table, block_size)
        served = _vllm_decode(q, kv_cache, positions, paging, sm_scale, d_v, kv_cache_dtype, forward_state)
        if served is None:
            return super().sparse_mla_decode_positions(q, kv_cache, positions, row_req, block_table, block_size,
                                                       sm_scale, d_v, kv_cache_dtype, forward_state)  # fmt: skip
        return served

    def dense_causal_attention(self, q, k, v, cu_seqlens, max_seqlen, sm_scale):
        if _fa3_dense_applies(q, k, v):
            return _flash_attn_varlen_func()(
                q=q, k=k, v=v, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
                max_seqlen_k=max_seqlen, softmax_scale=sm_scale, causal=True, fa_version=3,
            )  # fmt: skip
        return super().dense_causal_attention(q, k, v, cu_seqlens, max_seqlen, sm_scale)

    def write_latent_cache(self, cache, kv_c, k_pe, slot_mapping, kv_cache_dtype) -> None:
        _triton().write_latent_cache(cache, kv_c, k_pe, slot_mapping, kv_cache_dtype)

    def write_indexer_cache(self, cache, k, slot_mapping, block_size, fp8) -> None:
        _triton().write_indexer_cache(cache, k, slot_mapping, block_size, fp8)

    def write_token_caches(self, latent_cache, kv_c, k_pe, kv_cache_dtype, index_cache, k, index_fp8, slot_mapping,
                           block_size) -> None:  # fmt: skip
        _triton().write_token_caches(latent_cache, kv_c, k_pe, kv_cache_dtype, index_cache, k, index_fp8,
                                     slot_mapping, block_size)  # fmt: skip


def dense_prefill_detail() -> str:
    kernel = "FA3's dense varlen kernel" if _fa3_supported() else "torch SDPA"
    return f"whole prompts within the top-k: dense causal prefill on {kernel}"


def _triton() -> NsaOps:
    return get_ops("triton")


# ------------------------------------------------------------------------ sparse MLA
def _empty_rows():
    """kernels.empty_rows, imported on first use: kernel modules import triton lazily."""
    from ..kernels import empty_rows

    return empty_rows


def _vllm_decode(q, kv_cache, indices, paging, sm_scale, d_v, kv_cache_dtype, forward_state):
    """Decode rows [B, S, H, 576] over slots, or positions with their ``paging`` (mapped to slots
    in the kernels' own index pass), on the vLLM kernel that takes them; None where none does."""
    if _fp8_kernel_applies(q, kv_cache, d_v, kv_cache_dtype):
        return _flashmla_fp8(q, kv_cache, indices, sm_scale, forward_state, paging)
    if _bf16_kernel_applies(q, kv_cache, d_v, kv_cache_dtype):
        batch, seq = q.shape[:2]
        out, lse = _bf16_cache_kernel()(q.flatten(0, 1), kv_cache, indices.flatten(0, 1), sm_scale, paging)
        return out.reshape(batch, seq, *out.shape[1:]), lse.reshape(batch, seq, -1)
    return None


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


def _kernel_indices(indices: torch.Tensor, num_slots: int, paging=None) -> torch.Tensor:
    """int32 slots with everything outside the cache as -1 (the fp8 kernel skips only -1),
    -1 padded to a whole number of the kernels' top-k tiles: one pass (kernels/kernel_indices.py;
    ``paging``: the indices are positions, mapped to slots in that pass)."""
    from ..kernels.kernel_indices import kernel_indices  # imports triton: lazily

    return kernel_indices(indices, num_slots, _FLASHMLA_TOPK_MULTIPLE, paging=paging)


def _paging(row_req: torch.Tensor, block_table: torch.Tensor, block_size: int):
    """Positions' row -> request -> block table (kernels.kernel_indices.Paging)."""
    from ..kernels.kernel_indices import Paging  # imports triton: lazily

    return Paging(row_req, block_table, block_size)


def _fa3_dense_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """FA3's dense varlen prefill as vLLM's MLA prefill calls it on Hopper: bf16 / fp16, q / k
    head dim at most 256 and v's no larger (192 / 128 for V3.2: FA3 takes the two dims
    natively, vLLM pads v only for other FA versions)."""
    return (
        q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and q.dtype == k.dtype == v.dtype
        and q.shape[-1] == k.shape[-1]
        and _fa3_takes_head_dims(q.shape[-1], v.shape[-1])
        and _fa3_supported()
    )


def _fa3_takes_head_dims(qk_dim: int, v_dim: int) -> bool:
    """The head dims FA3's forward accepts (its ``flash_api.cpp`` check): equal dims up to
    256, or q/k in (128, 192] with v in (96, 128], or q/k <= 64 with v <= 512."""
    if qk_dim == v_dim:
        return qk_dim <= 256
    return (128 < qk_dim <= 192 and 96 < v_dim <= 128) or (qk_dim <= 64 and v_dim <= 512)


def _bf16_cache_kernel():
    """The kernel for rows q [M, H, 576] against a bf16 cache: FA3 where it serves this GPU."""
    return _fa3_sparse if _fa3_supported() else _flashmla_bf16


def _flashmla_bf16(q, kv_cache, indices, sm_scale, paging=None):
    """q [M, H, 576] against the bf16 cache -> (out [M, H, 512], lse [M, H])."""
    from vllm.v1.attention.ops.flashmla import flash_mla_sparse_fwd

    num_heads = q.shape[1]
    kv = kv_cache.view(-1, 1, LATENT_ROW_DIM)
    idx = _kernel_indices(indices, kv.shape[0], paging)
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


@dataclass(frozen=True)
class FlashMlaCall:
    """What every layer's FlashMLA fp8 call of one forward shares: the tile schedule (FlashMLA
    builds it on the call that first gets it: one metadata kernel a forward, not one a layer,
    as vLLM's own backend shares one per batch) and the placeholder block table / lengths."""

    schedule: object
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor


def _flashmla_call(batch: int, num_slots: int, shape_key: tuple, device, forward_state: dict | None) -> FlashMlaCall:
    """This forward's ``FlashMlaCall`` for calls of ``shape_key``, new when there is none yet
    (or no ``forward_state``). FlashMLA may reuse a schedule while the shapes and the lengths'
    values stay the same: they do for every layer of a forward (the lengths are the cache
    size). One forward's state never reaches another, so a schedule built while a CUDA graph
    is captured (its kernel recorded in that graph, not run) serves only that graph's layers."""
    from vllm.v1.attention.ops.flashmla import get_mla_metadata

    key = ("flashmla_fp8", shape_key, num_slots)
    call = None if forward_state is None else forward_state.get(key)
    if call is None:
        call = FlashMlaCall(
            schedule=get_mla_metadata()[0],
            # unused with indices; vLLM passes placeholders of these shapes too
            block_table=torch.zeros((batch, 1), dtype=torch.int32, device=device),
            cache_seqlens=torch.full((batch,), num_slots, dtype=torch.int32, device=device),
        )
        if forward_state is not None:
            forward_state[key] = call
    return call


def _flashmla_fp8(q, kv_cache, indices, sm_scale, forward_state: dict | None = None, paging=None):
    """q [B, S, H, 576] against the fp8_ds_mla cache -> (out [B, S, H, 512], lse [B, S, H])."""
    from vllm.v1.attention.ops.flashmla import flash_mla_with_kvcache

    batch, _, num_heads, _ = q.shape
    pages = kv_cache.view(-1, _FP8_PAGE_SLOTS, 1, FP8_DS_MLA_ROW_BYTES)
    num_slots = pages.shape[0] * _FP8_PAGE_SLOTS
    idx = _kernel_indices(indices, num_slots, paging)
    q = pad_heads(q, _flashmla_heads(num_heads))
    call = _flashmla_call(batch, num_slots, (*q.shape[:3], idx.shape[-1]), q.device, forward_state)
    out, lse = flash_mla_with_kvcache(
        q=q,
        k_cache=pages,
        block_table=call.block_table,
        cache_seqlens=call.cache_seqlens,
        head_dim_v=LATENT_DIM,
        tile_scheduler_metadata=call.schedule,
        is_fp8_kvcache=True,
        indices=idx,
        softmax_scale=sm_scale,
    )
    # lse comes as [B, H, S]
    return _empty_rows().zero_rows_without_keys(out[:, :, :num_heads], lse[:, :num_heads].transpose(1, 2), idx)


def _flash_attn_varlen_func():
    """vLLM's FA wrapper, imported on first use (``vllm.vllm_flash_attn`` needs CUDA)."""
    from vllm.vllm_flash_attn.flash_attn_interface import flash_attn_varlen_func

    return flash_attn_varlen_func


_CU_SEQLENS_Q: dict[torch.device, list[torch.Tensor]] = {}
"""Per device, every int32 arange made so far, the last the longest. All are kept: a captured
CUDA graph holds the address of the one it was captured with."""


def _cu_seqlens_q(rows: int, device: torch.device, capturing: bool) -> torch.Tensor:
    """[0, 1, ..., rows] int32: every query row its own sequence. A view of this device's
    longest arange; an eager call that finds it too short makes one twice as long. A call
    being captured makes its own instead: a capture only records the arange, whose values
    then exist once the graph replays, so no other call may read it."""
    held = _CU_SEQLENS_Q.setdefault(device, [])
    if held and held[-1].numel() > rows:
        return held[-1][: rows + 1]
    if capturing:
        return torch.arange(rows + 1, dtype=torch.int32, device=device)
    held.append(torch.arange(max(rows + 1, 2 * held[-1].numel() if held else 0), dtype=torch.int32, device=device))
    return held[-1][: rows + 1]


def _fa3_sparse(q, kv_cache, indices, sm_scale, paging=None):
    """q [M, H, 576] against the bf16 cache -> (out [M, H, 512], lse [M, H]) by FA3 with the
    arguments of vLLM's own call (flashattn_mla_sparse.py): row ``m`` is a sequence of one
    query and ``counts[m]`` keys, the first entries of its compacted indices as 1-slot pages;
    scores are ``q_rope . k_pe + q_nope . latent`` (``q_v`` is FA3's second query half)."""
    from ..kernels.kernel_indices import compact_kernel_indices  # imports triton: lazily

    cache_rows = kv_cache.view(-1, LATENT_ROW_DIM)
    idx, counts = compact_kernel_indices(indices, cache_rows.shape[0], paging=paging)
    # FA3's checks on this path (mha_fwd in vLLM's flash-attention, hopper/flash_api.cpp): q / k
    # head dim <= 64, v head dim in [256, 512], bf16 / fp16, SM90; q, k, v and q_v need only a
    # contiguous last dim (their other strides are passed on), so the halves of q and of the
    # cache rows go in as views, as vLLM's dense FlashAttnMLA passes its split q; query heads
    # need only be a multiple of the KV heads (1): any head count, none padded. `causal` is
    # vLLM's argument and changes nothing: FA3 turns it off for max_seqlen_q == 1 at head dim 64.
    out, lse = _flash_attn_varlen_func()(
        q=q[..., LATENT_DIM:],
        k=cache_rows[:, None, None, LATENT_DIM:],
        v=cache_rows[:, None, None, :LATENT_DIM],
        q_v=q[..., :LATENT_DIM],
        max_seqlen_q=1,
        cu_seqlens_q=_cu_seqlens_q(q.shape[0], q.device, q.is_cuda and torch.cuda.is_current_stream_capturing()),
        max_seqlen_k=idx.shape[-1],
        seqused_k=counts,
        block_table=idx,
        softmax_scale=sm_scale,
        causal=True,
        return_softmax_lse=True,
        fa_version=3,
    )
    # lse comes as [H, M] (varlen). Rows of no keys (counts 0: padding) come out 0 / -inf from FA3
    # itself, the reference's values: its epilogue's store_zero writes them for an empty key
    # range, and its split combine skips -inf splits (flash-attention hopper/epilogue_fwd.hpp,
    # flash_fwd_combine_kernel.h). So no zero-rows pass here, unlike FlashMLA's kernels.
    return out, lse.t()
