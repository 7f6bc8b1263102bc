"""vLLM attention backends for the plugin's NSA layers.

``CpNsaBackend`` is passed explicitly to vLLM's ``MLAAttention`` (so the platform
selector, which refuses sparse attention on CPU, is never asked). Its builder
turns vLLM's per-step ``CommonAttentionMetadata`` into the plugin's
``NsaForwardMetadata`` (split plan included) once per forward. The indexer key
cache is a second cache-owning layer, ``CpNsaIndexerCache``, whose backend only
exists so vLLM can group and allocate it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import ClassVar

import torch
from torch import nn

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_tp_group
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionMetadataBuilder,
    CommonAttentionMetadata,
    MLAAttentionImpl,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import MLAAttentionSpec, SparseCacheRole

from ..config import CpNsaConfig
from ..extensions import resolve_split_strategy
from ..kernels.kv_cache_ref import INDEX_HEAD_DIM, INDEXER_FP8_SLOT_BYTES
from ..nsa_attention import MetadataBuffers, NsaForwardMetadata, build_forward_metadata
from .runtime import attention_split_policy, cuda_graph_support, num_speculative_tokens

logger = logging.getLogger("vllm.cp_nsa")

GPU_BLOCK_ALIGNMENT = 64
CPU_BLOCK_ALIGNMENT = 16
# Set to a path prefix to have every rank append one JSON line per forward with
# the split decision (``<prefix>.rank<r>``): observability for tests and debugging.
TRACE_PLANS_ENV = "CP_NSA_TRACE_PLANS"


def trace_file(cp_rank: int) -> str | None:
    """This rank's trace file (``<CP_NSA_TRACE_PLANS>.rank<r>``), None when not tracing."""
    trace = os.environ.get(TRACE_PLANS_ENV)
    return f"{trace}.rank{cp_rank}" if trace else None


def append_trace(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def trace_piecewise_replay(cp_rank: int, rows: int, padded_rows: int) -> None:
    """One trace line for a forward a piecewise CUDA graph replayed padded: the attention's
    eager break got ``padded_rows`` input rows for the batch's ``rows``. The builder never
    sees such a batch padded, so only the break can count them."""
    path = trace_file(cp_rank)
    if path:
        append_trace(path, {"piecewise_padded": True, "rows": rows, "padded_rows": padded_rows})


class CpNsaMetadataBuilder(AttentionMetadataBuilder[NsaForwardMetadata]):
    """Builds the split plan once per forward into persistent buffers.

    CUDA graphs: FULL graphs of uniform decode / verify batches (every request
    1 + k tokens) when the kernels and the MoE communicator are capturable;
    mixed and prefill batches run eagerly (the model is not torch-compiled).
    """

    reorder_batch_threshold = None

    @classmethod
    def get_cudagraph_support(cls, vllm_config: VllmConfig, kv_cache_spec) -> AttentionCGSupport:
        supported, reason = cuda_graph_support(vllm_config)
        _log_graph_decision(supported, reason)
        return AttentionCGSupport.UNIFORM_BATCH if supported else AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        options = CpNsaConfig.from_additional_config(vllm_config.additional_config)
        tp = get_tp_group()
        self.cp_size, self.cp_rank = tp.world_size, tp.rank_in_group
        self.strategy = resolve_split_strategy(options.mode) if self.cp_size > 1 else None
        policy = attention_split_policy(vllm_config)
        self.min_tokens_for_cp, self.decode_min_tokens = policy.min_tokens_for_cp, policy.decode_min_tokens
        self.split_decode = policy.split_decode
        self.max_decode_query_len = 1 + num_speculative_tokens(vllm_config)
        self.block_size = kv_cache_spec.block_size
        scheduler = vllm_config.scheduler_config
        self.buffers = MetadataBuffers(
            scheduler.max_num_batched_tokens + scheduler.max_num_seqs * self.max_decode_query_len, device
        )
        self.trace_path = trace_file(self.cp_rank)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> NsaForwardMetadata:
        cm = common_attn_metadata
        query_start = cm.query_start_loc_cpu[: cm.num_reqs + 1]
        query_lens = (query_start[1:] - query_start[:-1]).tolist()
        # Only FULL CUDA-graph batches reach the builder padded (vLLM adds requests
        # with no tokens and slot -1 for the padding tokens).
        graph_padded = cm.num_actual_tokens > sum(query_lens)
        meta = build_forward_metadata(
            query_lens=query_lens,
            slot_mapping=cm.slot_mapping,
            block_table=cm.block_table_tensor,
            block_size=self.block_size,
            cp_size=self.cp_size,
            cp_rank=self.cp_rank,
            strategy=self.strategy,
            min_tokens_for_cp=self.min_tokens_for_cp,
            max_decode_query_len=self.max_decode_query_len,
            device=self.device,
            num_input_tokens=cm.num_actual_tokens,
            graph_padded=graph_padded,
            buffers=self.buffers,
            max_seq_len=cm.max_seq_len,
            split_decode=self.split_decode,
            decode_min_tokens=self.decode_min_tokens,
            seq_lens=_seq_lens(cm),
        )
        if self.trace_path:
            plan = meta.plan
            append_trace(self.trace_path, {
                "strategy": plan.strategy, "num_tokens": plan.num_tokens,
                "rows_per_rank": plan.rows_per_rank, "skip_reason": plan.skip_reason,
                "num_reqs": len(query_lens), "decode_kernel": meta.use_decode_kernel,
                "num_input_tokens": cm.num_actual_tokens, "graph_padded": graph_padded,
                "whole_prompts": meta.whole_prompts is not None, "max_seq_len": cm.max_seq_len,
            })
        return meta


def _seq_lens(cm: CommonAttentionMetadata) -> list[int] | None:
    """Each request's sequence length, where vLLM states it on the host: its upper bound is
    exact for prefill rows, and a row whose bound equals its query length has no context
    (the bound is at least the length). None where the runner does not fill it."""
    bound = cm.seq_lens_cpu_upper_bound
    return None if bound is None else bound[: cm.num_reqs].tolist()


def kernel_block_sizes() -> list[MultipleOf]:
    """Block sizes the plugin's caches take: multiples of 64 tokens on CUDA.

    The ``vllm`` provider reads an fp8_ds_mla cache through FlashMLA's sparse fp8 kernel
    in 64-slot pages (vLLM's FLASHMLA_SPARSE declares the same). vLLM 0.32 starts from
    16-token blocks and keeps 16 when every backend accepts it, which left the cache's slot
    count a multiple of 64 only by the parity of the block count: on 2x H200 one run's
    cache qualified and the next's did not, and that run's prefill attention fell back to
    Triton (30 ms slower at 16K). Declaring 64 makes vLLM pick 64."""
    return [MultipleOf(GPU_BLOCK_ALIGNMENT if current_platform.is_cuda() else CPU_BLOCK_ALIGNMENT)]


@functools.cache
def _log_graph_decision(supported: bool, reason: str) -> None:
    if supported:
        logger.info("vllm_cp_nsa: CUDA graphs FULL for uniform decode / verify batches (%s)", reason)
    else:
        logger.info("vllm_cp_nsa: CUDA graphs off for the NSA layers: %s", reason)


class CpNsaImpl(MLAAttentionImpl[NsaForwardMetadata]):
    """Holds the layer's static attention parameters for vLLM.

    The NSA computation is driven by ``CpNsaAttention.forward`` (it needs the
    indexer's top-k and the CP collectives), so vLLM's ``MLAAttention.forward``
    path, and with it ``forward_mqa``, is never entered.
    """

    is_sparse: ClassVar[bool] = True
    supports_dense_mha_prefill = False
    supports_pcp = False

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name,
                 **mla_args) -> None:
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_lora_rank = mla_args["kv_lora_rank"]

    def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
        raise RuntimeError(
            "vllm_cp_nsa runs NSA attention from CpNsaAttention.forward; "
            "MLAAttention.forward must not be called for its layers"
        )


class CpNsaBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "bfloat16", "fp8_ds_mla"]

    @staticmethod
    def get_name() -> str:
        return "CP_NSA_SPARSE_MLA"

    @staticmethod
    def get_impl_cls():
        return CpNsaImpl

    @staticmethod
    def get_builder_cls():
        return CpNsaMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return kernel_block_sizes()

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [576]

    @classmethod
    def is_mla(cls) -> bool:
        return True

    @classmethod
    def is_sparse(cls) -> bool:
        return True


class CpNsaIndexerMetadataBuilder(AttentionMetadataBuilder[None]):
    """The indexer cache needs no metadata of its own: its layer reads the NSA
    layer's ``NsaForwardMetadata`` (same KV-cache group, same block table);
    having none, it never limits CUDA graphs."""

    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.ALWAYS
    reorder_batch_threshold = None

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len, common_attn_metadata, fast_build=False):
        return None


class CpNsaIndexerBackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]

    @staticmethod
    def get_name() -> str:
        return "CP_NSA_INDEXER"

    @staticmethod
    def get_impl_cls():
        raise NotImplementedError("the indexer cache layer has no attention impl")

    @staticmethod
    def get_builder_cls():
        return CpNsaIndexerMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return kernel_block_sizes()

    @classmethod
    def is_mla(cls) -> bool:
        return True


class CpNsaIndexerCache(nn.Module, AttentionLayerBase):
    """Cache-owning pseudo-layer for the indexer keys (128 per token).

    ``fp8``: 132 bytes per token (128 fp8 + one fp32 scale, DeepGEMM paged layout);
    otherwise the keys are kept unquantized in the model dtype.
    """

    def __init__(self, prefix: str, fp8: bool, dtype: torch.dtype):
        super().__init__()
        self.prefix = prefix
        self.fp8 = fp8
        self.dtype = torch.uint8 if fp8 else dtype
        self.head_size = INDEXER_FP8_SLOT_BYTES if fp8 else INDEX_HEAD_DIM
        self.kv_cache = torch.tensor([])
        forward_context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        forward_context[prefix] = self

    def bind_kv_cache(self, kv_cache: torch.Tensor) -> None:
        self.kv_cache = kv_cache.squeeze(1)

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> MLAAttentionSpec:
        return MLAAttentionSpec(
            block_size=vllm_config.cache_config.block_size,
            num_kv_heads=1,
            max_tp_shards=1,
            head_size=self.head_size,
            dtype=self.dtype,
            cache_role=SparseCacheRole.INDEXER,
        )

    def get_attn_backend(self) -> type[AttentionBackend]:
        return CpNsaIndexerBackend
