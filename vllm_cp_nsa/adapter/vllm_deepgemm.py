"""Kernel provider ``vllm-deepgemm``: the ``vllm`` provider plus vLLM's DeepGEMM prefill
indexer, chosen per batch. ``kernels: auto`` picks it wherever vLLM ships DeepGEMM's MQA
logits, its gather and its top-k for this GPU (priority 30, above ``vllm``); elsewhere ``auto``
falls to ``vllm`` (FlashMLA, Triton indexer), then ``triton``, then ``torch``.

Per batch (``IndexerPolicy``, from shapes only, no host read): DeepGEMM when the batch's keys
are long or its rows x keys are many, the Triton indexer otherwise and always inside a CUDA
graph; the thresholds and the measurements behind them are in ``IndexerPolicy``, and the
startup line (``startup_detail``) states them.

Sparse MLA, the dense prefill of whole prompts and the cache writes are the ``vllm`` provider's
(FA3 / FlashMLA, Triton).

``indexer_topk`` over an fp8 indexer cache runs the call sequence of vLLM's own V3.2
prefill indexer (``sparse_attn_indexer``, prefill branch, in
``vllm/model_executor/layers/sparse_attn_indexer.py``), for every local CP row (any
request, any position, in any order):

0. queries to fp8 with vLLM's recipe (its ``_fused_q_kernel``; here the layer's query rope,
   ``kernels/mla_prologue.query_rope``, asked for it by ``indexer_query_fp8_heads``, else the
   Triton kernel ``kernels/indexer_q_quant.py``): one power-of-two scale per row and head,
   folded into that head's weight, heads zero-padded to 32 or 64;
1. per chunk of requests, ``vllm._custom_ops.cp_gather_indexer_k_quant_cache``: each
   request's keys ``[0, max kv_len of its rows)`` from the paged cache into one contiguous
   fp8 buffer + fp32 scales;
2. ``vllm.utils.deep_gemm.fp8_fp4_mqa_logits`` over the chunk's rows, row ``m`` scoring
   the buffer's keys ``[ks[m], ke[m]) = [request offset, request offset + kv_len[m])``.
   Two signatures, told apart by inspecting it (``logits_api``): vLLM 0.32's
   ``(..., ks, ke, clean_logits)`` returns logits over the whole buffer (row ``m``'s keys at
   columns ``[ks, ke)``); 0.33 / 0.34's ``(..., ks, ke, max_seqlen_k)`` returns compressed
   logits ``[rows, max_seqlen_k]`` (row ``m``'s keys from column 0), and on SM100 wants MX
   scales the plugin's fp8 indexer cache does not store, so there the Triton indexer runs;
3. ``vllm._custom_ops.top_k_per_row_prefill``: the ``topk`` best keys of each row over its
   columns (``[ks, ke)``, or ``[0, ke - ks)`` for compressed logits), as positions relative to
   the row's first column (= request-local positions), unordered, ``-1`` padded. They go to
   the sparse attention in that order, as in vLLM's own model: attention is a sum over the
   set, and re-sorting them best first (two radix sorts per chunk) cost 5.2 of the 14.4 ms
   of kernel time the plugin spent over vLLM's own 16K prefill at -tp 1 (one H200, vLLM 0.34,
   ``eval/results/profile_h200_n1_v034_prefill16K_1204.md``).

Rows are ordered by (request, kv_len) first, as vLLM's are, and chunked the way vLLM's
indexer metadata builder chunks prefill (``_split_indexer_prefill_chunks``): whole
requests while the gathered keys fit ``MAX_GATHER_KEYS`` and the fp32 logits
``MAX_LOGITS_BYTES``; a request too large alone is split on its rows.

Everything else goes to the ``vllm`` provider's indexer (Triton): a bf16 indexer cache,
more than 64 indexer heads, ``topk > 2048``, block sizes that break the gather kernel's
16-byte loads, and any vLLM / GPU without these kernels (``deepgemm_indexer_unsupported``).

CUDA graphs: sizing the gather and the logits reads ``row_req`` / ``row_kv_len`` on the
host, which a graph cannot replay. So a forward being captured takes the Triton indexer,
except uniform decode / verify batches (``indexer_topk_decode``): they run vLLM's own decode
indexer (DeepGEMM's paged MQA logits over each request's pages, then
``top_k_per_row_decode``), whose shapes are fixed by the batch size and which reads nothing
on the host, so FULL decode graphs capture it.

vLLM is imported only inside functions, so this module imports on any vLLM and without one.
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..kernels.budgets import MAX_LOGITS_BYTES
from ..kernels.forward_cache import SameTensorsCache
from ..kernels.kv_cache_ref import INDEX_HEAD_DIM, INDEXER_FP8_SLOT_BYTES, QuantizedIndexerQuery
from .vllm_kernels import VllmKernelOps, dense_prefill_detail

MAX_GATHER_KEYS = 2 * 1024 * 1024
"""Bound of the keys gathered for one chunk (132 bytes each, so 264 MiB)."""

logger = logging.getLogger("vllm.cp_nsa")

_LOGITS_PAD = 256  # DeepGEMM allocates each logits row with 256 spare columns
_DEEPGEMM_HEADS = (32, 64)
_MAX_TOPK = 2048  # vLLM's top-k kernel keeps 2048 final candidates

LOGITS_WHOLE_BUFFER = "whole-buffer logits (vLLM 0.32 signature: clean_logits)"
LOGITS_COMPRESSED = "compressed logits (vLLM 0.33+ signature: max_seqlen_k)"


@dataclass(frozen=True)
class IndexerPolicy:
    """Which indexer scores a batch's rows: DeepGEMM (eager forwards only) or Triton.

    Decided from shapes the call already has, so it costs no host read: ``rows`` = the
    rank's query rows, ``key_width`` = block-table columns x block size, i.e. the batch's
    longest sequence for a batch with a prefill piece (its table is narrowed to it) and
    max_model_len for a decode / verify batch. DeepGEMM when ``key_width >= min_key_width``
    or ``rows * key_width >= min_row_keys``; Triton otherwise.

    The measurements behind the thresholds (TTFT ms, Triton ``vllm`` vs DeepGEMM
    ``vllm-deepgemm``; rows x key_width per rank in brackets):
    - N=1, H200, fp8 weights (issue 18): 1K 23.5 vs 26.5 [1M]; 4K 47.9 vs 46.7 [16M];
      8x1K 82.3 vs 80.6 [8M]; 4x4K 169.1 vs 166.3 [64M]; 16K 186.7 vs 169.5 [256M];
      64K 1044 vs 760. bf16 weights: 1K 16.7 vs 17.8, 4K 49.4 vs 51.7 [16M], 16K 210 vs 196.
    - N=4, 4x H100, bf16 (eval/compare_notes.md, older DeepGEMM code that read its plan in
      every layer): 1K 25.7 vs 28.7 [0.25M]; 4K 32.6 vs 34.3 [4M]; 8x1K 49.3 vs 55.3 [2M];
      4x4K 82.2 vs 89.3 [16M]; 16K 89.3 vs 89.2 [64M]; 32K 181 vs 169; 64K 402 vs 361.
    - Kernels, H200 (eval/kernel_notes.md): decode-shaped rows (64 rows, 32K keys) 0.945 ms
      Triton logits + top-k vs 0.083 ms DeepGEMM logits; 4096 rows x 16K keys 5.13 vs 2.30 ms.
    So, then: at or below 16M row-keys Triton was faster in 7 of 9 comparisons (by 5-13 %),
    DeepGEMM in 2; from 64M DeepGEMM won or tied in all 6, and the threshold sat at 32M.
    Since then whole prompts within the top-k skip the indexer (dense prefill: the 1K and 8x1K
    points above), the DeepGEMM path plans its chunks once per forward from host rows, and
    vLLM 0.34's top-k returns unsorted picks. The 4K prefill profile on one H200 (vLLM 0.34,
    bf16 KV, 2026-12-04, ``eval/results/compare_h200_n1_v034_release_logits_1204f.md``) then
    showed the Triton indexer at 2.72 ms of GPU time (logits 1.43 + top-k 1.29, 3 layers) where
    vLLM's own DeepGEMM sequence took 0.62 ms, the plugin's 4K TTFT 40.1 ms against vLLM's 36.4:
    so DeepGEMM from 4M row-keys (a 2K prompt; below that, short chunks beside a context).
    From a 16K-key range DeepGEMM won or tied everywhere, and for few long rows (decode
    shapes) the Triton top-k cannot fill the GPU. Re-measure when the kernels change:
    ``kernels: vllm`` (the Triton indexer for every batch) against the default (this policy)
    in ``eval/gpu_compare.py``.
    """

    min_key_width: int = 16 * 1024
    min_row_keys: int = 4 * 1024**2

    def use_deepgemm(self, rows: int, key_width: int) -> bool:
        return key_width >= self.min_key_width or rows * key_width >= self.min_row_keys

    def describe(self) -> str:
        return (f"longest key range >= {self.min_key_width} or rows x key range >= "
                f"{self.min_row_keys // 1024**2}Mi")  # fmt: skip


INDEXER_POLICY = IndexerPolicy()


class VllmDeepGemmOps(VllmKernelOps):
    """The ``vllm`` provider with vLLM's DeepGEMM prefill indexer for the batches
    ``IndexerPolicy`` gives it."""

    name = "vllm-deepgemm"
    priority = 30
    supports_cuda_graphs = True
    """Captured forwards take the Triton indexer (see the module docstring)."""
    reads_fp8_indexer_cache = True

    def __init__(self, policy: IndexerPolicy = INDEXER_POLICY):
        self.policy = policy
        self._plans = ForwardPlanCache()
        self._decode_schedules: SameTensorsCache[DecodeSchedule] = SameTensorsCache()

    def supports(self, device, dtype=None, num_heads: int = 0) -> bool:
        return super().supports(device, dtype, num_heads) and _deepgemm_indexer_available()

    def unsupported_reason(self, device, dtype=None, num_heads: int = 0) -> str:
        if not super().supports(device, dtype, num_heads):
            return super().unsupported_reason(device, dtype, num_heads)
        return deepgemm_indexer_unsupported_here() or ""

    def startup_detail(self) -> str:
        reason = deepgemm_indexer_unsupported_here()
        if reason:
            return f"{super().startup_detail()} (no DeepGEMM indexer: {reason})"
        return (f"{self._attention_detail()}; {dense_prefill_detail()}; indexer per batch: DeepGEMM fp8 MQA "
                f"logits + vLLM top-k over the fp8 indexer cache ({logits_api_here()}; queries to fp8 in "
                f"the layer's query rope) when "
                f"{self.policy.describe()}, Triton otherwise and inside CUDA graphs; uniform decode / "
                f"verify batches of {' or '.join(map(str, PAGED_DECODE_NEXT_N))} rows per request: DeepGEMM "
                f"paged MQA logits + vLLM decode top-k, graphs included; cache writes: Triton")  # fmt: skip

    def indexer_query_fp8_heads(self, num_heads: int, index_cache_fp8: bool) -> int:
        """DeepGEMM's head count for the model's indexer heads where its indexer can serve (an
        fp8 indexer cache, at most 64 heads, DeepGEMM here): the layer's query rope then
        quantizes the query for it, as vLLM's own ``fused_q`` does (one launch a layer fewer)."""
        if not (index_cache_fp8 and 0 < num_heads <= max(_DEEPGEMM_HEADS) and _deepgemm_indexer_available()):
            return 0
        return _deepgemm_heads(num_heads)

    def indexer_topk_decode(self, q, weights, index_cache, block_table, row_req, row_kv_len, next_n, topk,
                            block_size, index_cache_fp8, quantized=None):  # fmt: skip
        """DeepGEMM's paged MQA logits + vLLM's decode top-k (``_deepgemm_decode_indexer_topk``)
        where they apply, graph captures included; ``indexer_topk`` otherwise."""
        if not (_deepgemm_applies(q, index_cache, topk, block_size, index_cache_fp8)
                and _paged_decode_applies(q.shape[0], next_n, block_table.shape[1] * block_size, block_size)
                and _deepgemm_indexer_available() and _paged_decode_available()):  # fmt: skip
            return self.indexer_topk(q, weights, index_cache, block_table, row_req, row_kv_len, topk, block_size,
                                     index_cache_fp8, quantized=quantized)  # fmt: skip
        _say_first_batch("DeepGEMM paged decode indexer", "%d rows, %d per request", q.shape[0], next_n)
        return _deepgemm_decode_indexer_topk(q, weights, index_cache, block_table, row_kv_len, next_n, topk,
                                             block_size, self._decode_schedules, quantized)  # fmt: skip

    def indexer_topk(self, q, weights, index_cache, block_table, row_req, row_kv_len, topk,
                     block_size, index_cache_fp8, host_rows=None, quantized=None):  # fmt: skip
        key_width = block_table.shape[1] * block_size
        if not (_deepgemm_applies(q, index_cache, topk, block_size, index_cache_fp8)
                and not torch.cuda.is_current_stream_capturing()
                and self.policy.use_deepgemm(q.shape[0], key_width)
                and _deepgemm_indexer_available()):  # fmt: skip
            return super().indexer_topk(
                q, weights, index_cache, block_table, row_req, row_kv_len, topk, block_size,
                index_cache_fp8,
            )  # fmt: skip
        _say_first_batch("DeepGEMM indexer", "%d rows, key range %d", q.shape[0], key_width)
        return _deepgemm_indexer_topk(
            q, weights, index_cache, block_table, row_req, row_kv_len, topk, block_size, self._plans, host_rows,
            quantized,
        )  # fmt: skip


_paths_served: set[str] = set()


def _say_first_batch(path: str, detail: str, *args) -> None:
    """Say once per process that ``path`` served (or was captured for) a batch: a run's log then
    shows which indexer ran."""
    if path not in _paths_served:
        _paths_served.add(path)
        logger.info(f"vllm_cp_nsa: {path} serving its first batch ({detail})", *args)


# ------------------------------------------------------------ what this vLLM / GPU has
@functools.cache
def logits_api(fn) -> str | None:
    """Which ``fp8_fp4_mqa_logits`` signature ``fn`` has (None: one this module does not know)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if "max_seqlen_k" in params:
        return LOGITS_COMPRESSED
    if "clean_logits" in params:
        return LOGITS_WHOLE_BUFFER
    return None


def deepgemm_indexer_unsupported(capability: tuple[int, int] | None, api: str | None,
                                 has_deep_gemm: bool, has_ops: bool) -> str | None:  # fmt: skip
    """Why the DeepGEMM indexer cannot run with these capabilities (None: it can).

    ``capability``: the CUDA device's (major, minor), None without one; ``api``:
    ``logits_api`` of vLLM's ``fp8_fp4_mqa_logits`` (None: absent or unknown); ``has_deep_gemm``:
    vLLM finds the DeepGEMM package; ``has_ops``: vLLM's gather and top-k ops are built."""
    if capability is None:
        return "no CUDA device"
    if capability[0] not in (9, 10):
        return f"DeepGEMM's MQA logits need SM90 / SM100, this GPU is SM{capability[0]}{capability[1]}"
    if api is None:
        return "this vLLM has no fp8_fp4_mqa_logits of a known signature"
    if not has_deep_gemm:
        return "DeepGEMM is not installed"
    if not has_ops:
        return "this vLLM build lacks cp_gather_indexer_k_quant_cache / top_k_per_row_prefill"
    if api == LOGITS_COMPRESSED and capability[0] == 10:
        return "vLLM 0.33+'s MQA logits on SM100 need MX-scaled keys, the plugin's fp8 cache has fp32 scales"
    return None


def _probe() -> tuple[tuple[int, int] | None, str | None, bool, bool]:
    """The real inputs of ``deepgemm_indexer_unsupported``."""
    # vLLM's platform reads the capability through NVML: the config hook probes in the API
    # server, which must not start a CUDA context (vLLM would then have to spawn its workers)
    from vllm.platforms import current_platform

    found = current_platform.get_device_capability() if current_platform.is_cuda() else None
    capability = (found.major, found.minor) if found is not None else None
    try:
        from vllm.utils.deep_gemm import fp8_fp4_mqa_logits
        from vllm.utils.import_utils import has_deep_gemm
    except ImportError:
        return capability, None, False, False
    try:
        from vllm._custom_ops import cp_gather_indexer_k_quant_cache  # noqa: F401
        from vllm._custom_ops import top_k_per_row_prefill  # noqa: F401

        has_ops = (hasattr(torch.ops._C, "top_k_per_row_prefill")
                   and hasattr(torch.ops._C_cache_ops, "cp_gather_indexer_k_quant_cache"))  # fmt: skip
    except (ImportError, AttributeError, RuntimeError):
        has_ops = False
    return capability, logits_api(fp8_fp4_mqa_logits), bool(has_deep_gemm()), has_ops


@functools.cache
def deepgemm_indexer_unsupported_here() -> str | None:
    """``deepgemm_indexer_unsupported`` for this process's GPU and vLLM (probed once)."""
    return deepgemm_indexer_unsupported(*_probe())


def _deepgemm_indexer_available() -> bool:
    return deepgemm_indexer_unsupported_here() is None


def logits_api_here() -> str | None:
    return _probe()[1]


def _deepgemm_applies(q, index_cache, topk, block_size, index_cache_fp8) -> bool:
    return (
        index_cache_fp8
        and q.is_cuda
        and q.dim() == 3
        and q.shape[2] == INDEX_HEAD_DIM
        and 0 < q.shape[1] <= max(_DEEPGEMM_HEADS)
        and q.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
        and 0 < topk <= _MAX_TOPK
        # the gather kernel moves 16-byte vectors: block stride block_size * 132 and the
        # cache base must be 16-byte aligned
        and block_size % 4 == 0
        and index_cache.is_contiguous()
        and index_cache.data_ptr() % 16 == 0
        and index_cache.numel() % (block_size * INDEXER_FP8_SLOT_BYTES) == 0
    )


# ------------------------------------------------------------------ host-side plan
@dataclass(frozen=True)
class Chunk:
    req_lo: int
    req_hi: int
    """Requests ``[req_lo, req_hi)`` of the plan whose keys this chunk gathers."""
    row_lo: int
    row_hi: int
    """Rows ``plan.rows[row_lo:row_hi]`` it scores."""
    max_keys: int = 0
    """Longest key range of its requests (a bound of its rows' ``ke - ks``: the width of
    compressed logits)."""


@dataclass(frozen=True)
class GatherPlan:
    """Which keys to gather and which ``[ks, ke)`` each row scores (CPU tensors)."""

    reqs: torch.Tensor
    """[R] requests with at least one row with keys, ascending."""
    key_lens: torch.Tensor
    """[R] keys gathered per request: the largest kv_len among its rows."""
    key_starts: torch.Tensor
    """[R + 1] offset of each request's keys in the buffer of all R requests."""
    rows: torch.Tensor
    """[A] rows with keys, ordered by (request, kv_len); the others stay all -1."""
    ks: torch.Tensor
    ke: torch.Tensor
    """[A] each row's key range in that buffer (a chunk subtracts its first offset)."""
    chunks: list[Chunk]


def plan_gather(row_req: torch.Tensor, row_kv_len: torch.Tensor, max_logits_bytes: int,
                max_gather_keys: int) -> GatherPlan:  # fmt: skip
    """The gather / chunk plan of ``indexer_topk``'s rows, on the host: device tensors are
    read there in one sync, host ones (``host_rows``) are taken as they are."""
    row_req, kv_len = torch.stack([row_req.long(), row_kv_len.long()]).cpu()
    rows = torch.nonzero((row_req >= 0) & (kv_len > 0)).flatten()
    reqs, req_of_row = torch.unique(row_req[rows], return_inverse=True)
    kv_len = kv_len[rows]
    key_lens = torch.zeros(len(reqs), dtype=torch.long).scatter_reduce(
        0, req_of_row, kv_len, reduce="amax", include_self=False
    )
    key_starts = F.pad(torch.cumsum(key_lens, 0), (1, 0))
    ks = key_starts[req_of_row]
    ke = ks + kv_len
    # Requests own disjoint, ascending ranges of the buffer and kv_len >= 1, so sorting
    # by ke sorts by (request, kv_len): vLLM's row order (rows of a request contiguous,
    # so DeepGEMM's per-block key ranges stay tight).
    order = torch.argsort(ke, stable=True)
    rows, ks, ke, req_of_row = rows[order], ks[order], ke[order], req_of_row[order]
    rows_per_req = torch.bincount(req_of_row, minlength=len(reqs))
    chunks = split_chunks(key_lens.tolist(), rows_per_req.tolist(), max_logits_bytes,
                          max_gather_keys)  # fmt: skip
    return GatherPlan(reqs, key_lens, key_starts, rows, ks, ke, chunks)


def split_chunks(key_lens: list[int], row_counts: list[int], max_logits_bytes: int,
                 max_gather_keys: int) -> list[Chunk]:  # fmt: skip
    """vLLM's ``_split_indexer_prefill_chunks`` on requests in plan order: whole requests
    while the keys fit ``max_gather_keys`` and rows x (keys + DeepGEMM's row padding) fp32
    logits fit ``max_logits_bytes``; a request that alone does not fit is split on rows."""
    max_elems = max_logits_bytes // 4
    chunks: list[Chunk] = []
    end = row0 = 0
    while end < len(key_lens):
        start, rows, keys = end, 0, 0
        while end < len(key_lens):
            new_rows, new_keys = rows + row_counts[end], keys + key_lens[end]
            if new_keys > max_gather_keys or new_rows * (new_keys + _LOGITS_PAD) > max_elems:
                break
            rows, keys, end = new_rows, new_keys, end + 1
        if end == start:
            rows, keys, end = row_counts[end], key_lens[end], end + 1
        step = max(1, max_elems // (keys + _LOGITS_PAD))
        longest = max(key_lens[start:end])
        for lo in range(0, rows, step):
            chunks.append(Chunk(start, end, row0 + lo, row0 + min(lo + step, rows), longest))
        row0 += rows
    return chunks


class ForwardPlanCache:
    """The last gather plan (and its device copies), reused while the same row tensors
    come back: every layer of a forward passes the same ``local_req``, ``kv_len`` (see
    ``NsaForwardMetadata.local_kv_len``) and block table objects, so a forward reads them on
    the host once instead of once per layer (each read drains the GPU queue), and every
    layer's chunks start from device inputs built once."""

    def __init__(self):
        self._cache: SameTensorsCache[DevicePlan] = SameTensorsCache()

    def get(self, row_req, row_kv_len, block_table, api: str, host_rows=None) -> "DevicePlan":
        """``host_rows`` (the same rows' ``(row_req, row_kv_len)`` on the host, exact) spares
        the plan its read of the device tensors."""
        return self._cache.get((row_req, row_kv_len, block_table), (MAX_LOGITS_BYTES, MAX_GATHER_KEYS, api),
                               lambda: DevicePlan.build(*(host_rows or (row_req, row_kv_len)), block_table,
                                                        api))  # fmt: skip


@dataclass(frozen=True)
class DeviceChunk:
    """One chunk's device inputs, the same for every layer of the forward."""

    chunk: Chunk
    key_count: int
    """Keys its requests gather (the size of its gather buffer)."""
    cu_seq_lens: torch.Tensor
    """[requests + 1] int32 offsets of its requests' keys in its own gather buffer."""
    ks: torch.Tensor
    ke: torch.Tensor
    """[rows] int32 key range each row scores in that buffer (the logits kernel's input)."""
    starts: torch.Tensor
    ends: torch.Tensor
    """[rows] int32 each row's columns in the logits (the top-k kernel's input)."""
    rows: slice | torch.Tensor
    """Its rows of ``q`` / the output: a slice when they are one ascending run (as for a single
    request's prefill), so the queries and the picks need no gather / scatter copy."""


@dataclass(frozen=True)
class DevicePlan:
    """A ``GatherPlan`` with each chunk's tensors already on the device."""

    host: GatherPlan
    tables: torch.Tensor
    """[R, blocks] int32 block tables of the plan's requests."""
    chunks: list[DeviceChunk]

    @classmethod
    def build(cls, row_req, row_kv_len, block_table, api: str) -> "DevicePlan":
        host = plan_gather(row_req, row_kv_len, MAX_LOGITS_BYTES, MAX_GATHER_KEYS)
        dev = block_table.device
        tables = block_table.index_select(0, host.reqs.to(dev)).to(torch.int32).contiguous()
        if not host.chunks:
            return cls(host=host, tables=tables, chunks=[])
        # every chunk's int32 inputs in one host buffer, one copy to the device
        parts: list[torch.Tensor] = []
        row_parts: list[torch.Tensor] = []
        specs = []
        for c in host.chunks:
            key_lo, key_hi = int(host.key_starts[c.req_lo]), int(host.key_starts[c.req_hi])
            ks = host.ks[c.row_lo : c.row_hi] - key_lo
            ke = host.ke[c.row_lo : c.row_hi] - key_lo
            starts, ends = (torch.zeros_like(ks), ke - ks) if api == LOGITS_COMPRESSED else (ks, ke)
            parts += [host.key_starts[c.req_lo : c.req_hi + 1] - key_lo, ks, ke, starts, ends]
            rows = host.rows[c.row_lo : c.row_hi]
            first = int(rows[0])
            if torch.equal(rows, torch.arange(first, first + len(rows))):
                rows = slice(first, first + len(rows))
            else:
                row_parts.append(rows)
            specs.append((c, key_hi - key_lo, rows))
        views = iter(torch.cat(parts).to(dev, torch.int32).split([len(p) for p in parts]))
        row_views = iter(torch.cat(row_parts).to(dev).split([len(r) for r in row_parts])) if row_parts else iter(())
        chunks = [DeviceChunk(c, count, *(next(views) for _ in range(5)),
                              rows if isinstance(rows, slice) else next(row_views))
                  for c, count, rows in specs]  # fmt: skip
        return cls(host=host, tables=tables, chunks=chunks)


# -------------------------------------------------------------------- device path
def _deepgemm_heads(num_heads: int) -> int:
    """The head count DeepGEMM's MQA logits run for ``num_heads`` indexer heads (zero-padded)."""
    return next(h for h in _DEEPGEMM_HEADS if h >= num_heads)


def _fp8_queries(q, weights, quantized: QuantizedIndexerQuery | None):
    """(fp8 queries, folded weights) at DeepGEMM's head count: the layer's (``quantized``, made
    by its query rope) or quantized here."""
    heads = _deepgemm_heads(q.shape[1])
    if quantized is not None:
        if quantized.q.shape != (q.shape[0], heads, INDEX_HEAD_DIM):
            raise ValueError(f"quantized indexer query {tuple(quantized.q.shape)} for {tuple(q.shape)} queries: "
                             f"expected [{q.shape[0]}, {heads}, {INDEX_HEAD_DIM}]")
        return quantized
    from ..kernels.indexer_q_quant import quantize_indexer_queries  # imports triton: lazily

    return quantize_indexer_queries(q, weights, heads)


def _deepgemm_indexer_topk(q, weights, index_cache, block_table, row_req, row_kv_len, topk,
                           block_size, plans: ForwardPlanCache | None = None, host_rows=None,
                           quantized: QuantizedIndexerQuery | None = None):  # fmt: skip
    from vllm._custom_ops import cp_gather_indexer_k_quant_cache, top_k_per_row_prefill
    from vllm.utils.deep_gemm import fp8_fp4_mqa_logits

    dev = q.device
    api = logits_api(fp8_fp4_mqa_logits)
    if api is None:
        raise RuntimeError("vllm.utils.deep_gemm.fp8_fp4_mqa_logits has an unknown signature")
    device_plan = (plans or ForwardPlanCache()).get(row_req, row_kv_len, block_table, api, host_rows)
    # rows without keys (padding) stay -1; when the chunks cover every row, the top-k writes all
    covered = device_plan.host.rows.numel() == q.shape[0]
    out = (torch.empty((q.shape[0], topk), dtype=torch.int32, device=dev) if covered
           else torch.full((q.shape[0], topk), -1, dtype=torch.int32, device=dev))
    if not device_plan.chunks:
        return out
    q_fp8, weights = _fp8_queries(q, weights, quantized)
    cache = index_cache.view(-1, block_size, INDEXER_FP8_SLOT_BYTES)  # vLLM's 3-D view

    gathered = None  # (requests, fp8 keys, fp32 scales), reused by the row chunks of one request
    for dc in device_plan.chunks:
        c = dc.chunk
        if gathered is None or gathered[0] != (c.req_lo, c.req_hi):
            keys = torch.empty((dc.key_count, INDEX_HEAD_DIM), dtype=torch.float8_e4m3fn, device=dev)
            scales = torch.empty((dc.key_count, 4), dtype=torch.uint8, device=dev)
            cp_gather_indexer_k_quant_cache(cache, keys, scales, device_plan.tables[c.req_lo : c.req_hi],
                                            dc.cu_seq_lens)  # fmt: skip
            gathered = ((c.req_lo, c.req_hi), keys, scales.view(torch.float32).squeeze(-1))
        _, keys, k_scale = gathered
        if isinstance(dc.rows, slice):
            q_rows, w_rows, picks = q_fp8[dc.rows], weights[dc.rows], out[dc.rows]
        else:
            q_rows, w_rows = q_fp8.index_select(0, dc.rows), weights.index_select(0, dc.rows)
            picks = torch.empty((c.row_hi - c.row_lo, topk), dtype=torch.int32, device=dev)
        if api == LOGITS_COMPRESSED:  # vLLM 0.33+: row m's keys from column 0
            logits = fp8_fp4_mqa_logits((q_rows, None), (keys, k_scale), w_rows, dc.ks, dc.ke,
                                        max_seqlen_k=c.max_keys)  # fmt: skip
        else:  # vLLM 0.32: row m's keys at columns [ks, ke) of the whole buffer
            logits = fp8_fp4_mqa_logits((q_rows, None), (keys, k_scale), w_rows, dc.ks, dc.ke, clean_logits=False)
        top_k_per_row_prefill(logits, dc.starts, dc.ends, picks, picks.shape[0], logits.stride(0),
                              logits.stride(1), topk)  # fmt: skip
        if not isinstance(dc.rows, slice):
            out[dc.rows] = picks
    return out


# ------------------------------------------------------------- uniform decode batches
PAGED_DECODE_NEXT_N = (1, 2)
"""Rows per request DeepGEMM's paged MQA logits takes on every GPU it runs on (SM90 also takes
4, with another schedule size; vLLM flattens other counts to one row per request)."""
PAGED_DECODE_BLOCK_SIZE = 64
"""The paged logits kernel's key block: vLLM's indexer cache block for V3.2."""


def _paged_decode_applies(rows: int, next_n: int, key_width: int, block_size: int) -> bool:
    """Shapes the paged decode path takes: whole requests of a supported ``next_n``, vLLM's
    block size, and fp32 logits ``rows x key_width`` within ``MAX_LOGITS_BYTES``."""
    return (next_n in PAGED_DECODE_NEXT_N and rows % next_n == 0 and rows > 0
            and block_size == PAGED_DECODE_BLOCK_SIZE and rows * key_width * 4 <= MAX_LOGITS_BYTES)  # fmt: skip


@functools.cache
def _paged_decode_available() -> bool:
    """This vLLM has the paged logits, its scheduler and the decode top-k."""
    try:
        from vllm._custom_ops import top_k_per_row_decode  # noqa: F401
        from vllm.utils.deep_gemm import fp8_fp4_paged_mqa_logits, get_paged_mqa_logits_metadata  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.ops._C, "top_k_per_row_decode")


@functools.cache
def paged_logits_takes_clean_logits(fn) -> bool:
    """vLLM 0.32's ``fp8_fp4_paged_mqa_logits`` requires ``clean_logits``; 0.33 / 0.34 replaced it
    by ``logits_dtype`` (fp32 by default)."""
    try:
        return "clean_logits" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class DecodeSchedule:
    """A decode forward's inputs of the paged logits, the same for every layer."""

    context_lens: torch.Tensor
    """[requests, next_n] int32 keys of each row (its kv_len; 0 for padding rows)."""
    block_table: torch.Tensor
    """[requests, blocks] int32, padding requests' rows zero."""
    schedule: torch.Tensor
    """DeepGEMM's split of the work over the SMs (``get_paged_mqa_logits_metadata``)."""


def _decode_schedule(row_kv_len: torch.Tensor, block_table: torch.Tensor, next_n: int, block_size: int):
    """Built on the device (no host read), so a captured graph recomputes it on replay."""
    from vllm.utils.deep_gemm import get_paged_mqa_logits_metadata

    requests = row_kv_len.shape[0] // next_n
    context_lens = row_kv_len.view(requests, next_n).to(torch.int32)
    table = block_table[:requests].to(torch.int32)
    if table.shape[0] < requests:  # graph padding of an eagerly run padded batch: rows of no keys
        table = torch.cat([table, table.new_zeros(requests - table.shape[0], table.shape[1])])
    num_sms = torch.cuda.get_device_properties(row_kv_len.device).multi_processor_count
    schedule = get_paged_mqa_logits_metadata(context_lens, block_size, num_sms)
    return DecodeSchedule(context_lens, table.contiguous(), schedule)


def _capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s stream is being captured (CPU builds of torch cannot ask)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def _deepgemm_decode_indexer_topk(q, weights, index_cache, block_table, row_kv_len, next_n, topk, block_size,
                                  schedules: SameTensorsCache | None = None,
                                  quantized: QuantizedIndexerQuery | None = None):  # fmt: skip
    """vLLM's own V3.2 decode indexer (``sparse_attn_indexer``, decode branch): queries to fp8
    (vLLM's recipe, as for prefill), DeepGEMM's paged MQA logits of every row over its
    request's pages (``[rows, key_width]`` fp32, columns past a row's keys not cleaned), then
    ``top_k_per_row_decode`` over each row's ``[0, kv_len)``: request-local positions,
    unordered, -1 padded. No host read and fixed shapes per batch size: CUDA graphs capture it.
    The top-k gets one length per row (its ``next_n = 1`` form), which every vLLM version reads
    the same way."""
    from vllm._custom_ops import top_k_per_row_decode
    from vllm.utils.deep_gemm import fp8_fp4_paged_mqa_logits

    rows = q.shape[0]
    key_width = block_table.shape[1] * block_size
    # Never across a capture's edge: a schedule built before the capture (a warm-up on the same
    # tensors) is not in the graph, so a replay would read its stale lengths.
    capturing = _capturing(q)
    sched = (schedules or SameTensorsCache()).get(
        (row_kv_len, block_table), (next_n, block_size, capturing),
        lambda: _decode_schedule(row_kv_len, block_table, next_n, block_size),
    )  # fmt: skip
    q_fp8, weights = _fp8_queries(q, weights, quantized)
    heads = q_fp8.shape[1]
    cache = index_cache.view(-1, block_size, 1, INDEXER_FP8_SLOT_BYTES)  # vLLM's 4-D view
    extra = {"clean_logits": False} if paged_logits_takes_clean_logits(fp8_fp4_paged_mqa_logits) else {}
    logits = fp8_fp4_paged_mqa_logits((q_fp8.view(rows // next_n, next_n, heads, INDEX_HEAD_DIM), None), cache,
                                      weights, sched.context_lens, sched.block_table, sched.schedule, key_width,
                                      **extra)  # fmt: skip
    out = torch.empty((rows, topk), dtype=torch.int32, device=q.device)
    top_k_per_row_decode(logits, 1, sched.context_lens.view(-1), out, rows, logits.stride(0), logits.stride(1), topk)
    return out
