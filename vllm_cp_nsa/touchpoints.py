"""Every vLLM symbol the plugin depends on, and the vLLM version it was checked against.

A leaf: importing this module imports nothing from vLLM. ``check_touchpoints``
resolves each symbol: on a vLLM without one the plugin stays inactive and says why, and a
launch that asks for ``cp_nsa`` fails naming it (an optional one,
used only by the ``vllm`` / ``vllm-deepgemm`` kernel providers, is logged instead); ``check_vllm_version``
warns once on an untested vLLM. A test keeps this list in sync with the adapter's imports.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

logger = logging.getLogger("vllm.cp_nsa")

CHECKED_VERSIONS = ("0.32.0", "0.33.0", "0.34.0")
"""vLLM releases every touchpoint and called signature was resolved against (scripts/compat_matrix.sh)."""
CHECKED_AGAINST = ", ".join(CHECKED_VERSIONS)
TESTED_RANGE = ">=0.32.0,<0.35"


@dataclass(frozen=True)
class Touchpoint:
    module: str
    symbol: str
    """Attribute path inside ``module`` (dots for class attributes)."""
    why: str
    patched: bool = False
    """True only for the one place the plugin wraps a vLLM attribute (see plugin.py)."""
    optional: bool = False
    """True for kernels the plugin calls lazily where they apply (mostly the ``vllm`` /
    ``vllm-deepgemm`` kernel providers'): without one the plugin still starts and does
    ``without`` instead."""
    without: str = "the vLLM kernel providers leave that op to Triton"
    """What runs when an optional one is missing (the log line says it)."""
    versions: tuple[str, ...] = CHECKED_VERSIONS
    """vLLM releases it resolved against (symbol and called signature), by compat_check.py."""
    branch: str = ""
    """The adapter's version branch for it, if any: where, what differs, its test."""


TOUCHPOINTS: tuple[Touchpoint, ...] = (
    # registration and configuration
    Touchpoint("vllm.model_executor.models", "ModelRegistry", "register the V3.2 model class over the architecture"),
    Touchpoint("vllm.models.deepseek_v32", "DeepseekV32ForCausalLM", "subclass vLLM's own V3.2 for this platform in the hand-over class (adapter/handover.py)"),
    Touchpoint("vllm.models.deepseek_v32", "DeepseekV32MTP", "subclass vLLM's own V3.2 MTP draft for this platform in the MTP hand-over class"),
    Touchpoint("vllm.model_executor.models.config", "MODELS_CONFIG_MAP", "config hook keyed on the architecture name"),
    Touchpoint("vllm.model_executor.models.config", "VerifyAndUpdateConfig", "base class of the config hook"),
    Touchpoint("vllm.config", "VllmConfig", "additional_config, cache/parallel/scheduler configs"),
    Touchpoint("vllm.config", "get_current_vllm_config", "register cache layers in static_forward_context"),
    Touchpoint("vllm.config", "CUDAGraphMode", "FULL_DECODE_ONLY CUDA graphs (config hook)"),
    Touchpoint("vllm.platforms", "current_platform", "device type; CPU platform detection"),
    Touchpoint("vllm.platforms.cpu", "CpuPlatform.check_and_update_config", "keep chunked prefill / prefix caching for the plugin's V3.2 on CPU", patched=True),
    # attention backend and caches
    Touchpoint("vllm.model_executor.layers.attention", "MLAAttention", "cache-owning MLA layer, backend passed explicitly; W_UK_T / W_UV"),
    Touchpoint("vllm.model_executor.layers.attention_layer_base", "AttentionLayerBase", "indexer key cache pseudo-layer"),
    Touchpoint("vllm.v1.attention.backend", "AttentionBackend", "backend classes"),
    Touchpoint("vllm.v1.attention.backend", "AttentionMetadataBuilder", "per-step metadata (split plan)"),
    Touchpoint("vllm.v1.attention.backend", "AttentionCGSupport", "CUDA-graph support level"),
    Touchpoint("vllm.v1.attention.backend", "CommonAttentionMetadata", "query_start_loc_cpu, slot_mapping, block_table_tensor, max_seq_len, seq_lens_cpu_upper_bound"),
    Touchpoint("vllm.v1.attention.backend", "MLAAttentionImpl", "impl base class"),
    Touchpoint("vllm.v1.attention.backend", "MultipleOf", "kernel block sizes"),
    Touchpoint("vllm.platforms.interface", "Platform._preferred_block_size_for_backends", "vLLM keeps 16-token blocks unless a backend rejects 16: why the backends declare MultipleOf(64) on CUDA"),
    Touchpoint("vllm.v1.kv_cache_interface", "MLAAttentionSpec", "indexer cache spec"),
    Touchpoint("vllm.v1.kv_cache_interface", "SparseCacheRole", "indexer cache role"),
    Touchpoint("vllm.forward_context", "get_forward_context", "attention metadata of the current forward"),
    Touchpoint("vllm.forward_context", "in_piecewise_cudagraph",
               "a piecewise graph's forward leaves the cache writes to the attention's eager break",
               versions=("0.32.0", "0.34.0")),
    # distributed
    Touchpoint("vllm.distributed", "get_tp_group", "the TP group is the CP group"),
    Touchpoint("vllm.distributed", "get_ep_group",
               "under --data-parallel-size > 1 the scattered MoE spreads its experts over the EP group "
               "(all DP x TP ranks)"),
    # model layers
    Touchpoint("vllm.model_executor.layers.fused_moe", "fused_moe_make_expert_params_mapping", "routed expert weight loading"),
    Touchpoint("vllm.model_executor.layers.layernorm", "LayerNorm", "indexer k_norm"),
    Touchpoint("vllm.model_executor.layers.layernorm", "RMSNorm", "norms"),
    Touchpoint("vllm.model_executor.layers.linear", "ReplicatedLinear", "replicated attention / indexer projections"),
    Touchpoint("vllm.model_executor.layers.linear", "MergedColumnParallelLinear", "the indexer's fused wk + weights_proj (disable_tp)"),
    Touchpoint("vllm.model_executor.layers.logits_processor", "LogitsProcessor", "logits"),
    Touchpoint("vllm.model_executor.layers.rotary_embedding", "get_rope", "MLA and indexer rotary"),
    Touchpoint("vllm.model_executor.layers.vocab_parallel_embedding", "ParallelLMHead", "lm head"),
    Touchpoint("vllm.model_executor.layers.vocab_parallel_embedding", "VocabParallelEmbedding", "embedding"),
    Touchpoint("vllm.model_executor.model_loader.weight_utils", "default_weight_loader", "plain weight loading"),
    Touchpoint("vllm.model_executor.models.deepseek_v2", "DeepseekV2MLP", "dense MLP (TP-sharded, no all-reduce)"),
    Touchpoint("vllm.model_executor.models.deepseek_v2", "DeepSeekV2FusedQkvAProjLinear", "fused q_a + kv_a projection (replicated; small-batch GEMM)"),
    Touchpoint("vllm.model_executor.models.deepseek_v2", "DeepseekV2MoE", "FusedMoE + shared experts (TP-sharded, no all-reduce)"),
    Touchpoint("vllm.model_executor.models.deepseek_v2", "yarn_get_mscale", "yarn softmax scale"),
    Touchpoint("vllm.sequence", "IntermediateTensors", "model forward signature"),
    Touchpoint("vllm.model_executor.layers.fused_embed_norm", "fused_embed_norm",
               "gather the embedding rows and the first layer's input RMSNorm in one launch (as vLLM's own V3.2)",
               optional=True, versions=("0.32.0", "0.34.0"),
               without="the embedding gather and the first norm run as two launches"),
    Touchpoint("vllm.model_executor.layers.fused_embed_norm", "fused_embed_eh_norm",
               "the MTP draft's input in one launch: gather, zero at position 0, enorm / hnorm, concat (as vLLM's own)",
               optional=True, versions=("0.32.0", "0.34.0"),
               without="the MTP draft's input takes five launches"),
    Touchpoint("vllm.model_executor.layers.fused_embed_norm", "has_full_vocab_on_rank",
               "whether the fused embedding kernel can read the whole table on this rank",
               optional=True, versions=("0.32.0", "0.34.0"),
               without="the embedding gather and the first norm run as two launches"),
    Touchpoint("vllm.compilation.breakable_cudagraph", "eager_break_during_capture", "run the NSA attention as an eager break of vLLM's breakable CUDA graphs (adapter/model.py eager_break); 0.33+ wraps even when breakable graphs are off (a plain call outside a capture)"),
    # kernels of the `vllm` kernel provider (adapter/vllm_kernels.py)
    Touchpoint("vllm.v1.attention.ops.flashmla", "is_flashmla_sparse_supported", "check FlashMLA sparse on this GPU", optional=True),
    Touchpoint("vllm.v1.attention.ops.flashmla", "flash_mla_sparse_fwd", "sparse MLA over a bf16 latent cache", optional=True),
    Touchpoint("vllm.v1.attention.ops.flashmla", "flash_mla_with_kvcache", "sparse MLA over an fp8_ds_mla latent cache", optional=True),
    Touchpoint("vllm.v1.attention.ops.flashmla", "get_mla_metadata", "FlashMLA tile scheduler metadata", optional=True),
    Touchpoint("vllm.vllm_flash_attn.flash_attn_interface", "is_fa_version_supported", "check FA3 on this GPU",
               optional=True),
    Touchpoint("vllm.vllm_flash_attn.flash_attn_interface", "flash_attn_varlen_func",
               "sparse MLA over a bf16 latent cache and whole prompts' dense prefill on Hopper (FA3, as vLLM calls it)",
               optional=True),
    # kernels of the opt-in `vllm-deepgemm` kernel provider (adapter/vllm_deepgemm.py)
    Touchpoint("vllm.utils.import_utils", "has_deep_gemm", "check DeepGEMM is installed", optional=True),
    Touchpoint("vllm._custom_ops", "cp_gather_indexer_k_quant_cache", "gather fp8 indexer keys into a contiguous buffer", optional=True),
    Touchpoint("vllm.utils.deep_gemm", "fp8_fp4_mqa_logits", "DeepGEMM fp8 indexer logits over per-row key ranges", optional=True,
               branch="adapter/vllm_deepgemm.py logits_api: 0.32 takes clean_logits and returns [M, N] logits over the "
                      "whole key buffer; 0.33/0.34 take max_seqlen_k and return [M, max_seqlen_k] from each row's ks "
                      "(0.34 adds logits_dtype=fp32 by default); told apart by inspecting the signature "
                      "(plugin_tests/kernels/test_vllm_deepgemm_provider.py::test_logits_api_by_signature)"),
    Touchpoint("vllm._custom_ops", "top_k_per_row_prefill", "per-row indexer top-k over [ks, ke)", optional=True),
    # the same provider's decode indexer for uniform decode / verify batches (graph-captured)
    Touchpoint("vllm.utils.deep_gemm", "get_paged_mqa_logits_metadata", "DeepGEMM's SM schedule of the paged MQA logits",
               optional=True, versions=("0.32.0", "0.34.0")),
    Touchpoint("vllm.utils.deep_gemm", "fp8_fp4_paged_mqa_logits", "DeepGEMM fp8 indexer logits of decode rows over their pages",
               optional=True, versions=("0.32.0", "0.34.0"),
               branch="adapter/vllm_deepgemm.py paged_logits_takes_clean_logits: 0.32 requires clean_logits, 0.34 "
                      "replaced it by logits_dtype (fp32 by default); told apart by inspecting the signature "
                      "(plugin_tests/kernels/test_vllm_deepgemm_provider.py::test_decode_glue_with_kernel_stand_ins_is_the_reference)"),
    Touchpoint("vllm._custom_ops", "top_k_per_row_decode", "per-row indexer top-k of decode rows over [0, kv_len)",
               optional=True, versions=("0.32.0", "0.34.0")),
)


@dataclass(frozen=True)
class CalledSignature:
    """Keywords the adapter passes to a vLLM callable (``kind="params"``: a function, or a
    class's constructor), or attributes it reads on a vLLM class (``kind="fields"``).
    Checked statically against each vLLM wheel's source by ``scripts/compat_check.py``
    (``check_touchpoints`` resolves only ``TOUCHPOINTS`` at run time)."""

    module: str
    callable: str
    names: tuple[str, ...]
    where: str
    kind: str = "params"
    optional: bool = False
    versions: tuple[str, ...] = CHECKED_VERSIONS


CALLED_SIGNATURES: tuple[CalledSignature, ...] = (
    # constructors of vLLM layers (adapter/model.py, mtp.py, ep_moe.py)
    CalledSignature("vllm.model_executor.layers.attention", "MLAAttention",
                    ("num_heads", "scale", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "q_lora_rank",
                     "kv_lora_rank", "kv_b_proj", "cache_config", "quant_config", "prefix", "attn_backend",
                     "use_sparse"), "adapter/model.py"),
    CalledSignature("vllm.model_executor.layers.attention", "MLAAttention",
                    ("W_UK_T", "W_UV", "kv_cache", "kv_cache_dtype", "layer_name"), "adapter/model.py", kind="fields"),
    CalledSignature("vllm.v1.attention.backend", "MLAAttentionImpl.__init__",
                    ("num_heads", "head_size", "scale", "num_kv_heads", "alibi_slopes", "sliding_window",
                     "kv_cache_dtype", "logits_soft_cap", "attn_type", "kv_sharing_target_layer_name"),
                    "adapter/backend.py CpNsaImpl (vLLM calls it with these)"),
    CalledSignature("vllm.model_executor.layers.rotary_embedding", "get_rope",
                    ("max_position", "rope_parameters", "is_neox_style"), "adapter/model.py"),
    CalledSignature("vllm.model_executor.layers.rotary_embedding.base", "RotaryEmbeddingBase",
                    ("cos_sin_cache", "is_neox_style"), "adapter/model.py DeepseekRope (its table for kernels/mla_prologue.py)", kind="fields",
                    versions=("0.32.0", "0.34.0")),
    CalledSignature("vllm.model_executor.layers.linear", "ReplicatedLinear",
                    ("input_size", "output_size", "bias", "quant_config", "prefix"), "adapter/model.py, mtp.py, ep_moe.py"),
    CalledSignature("vllm.model_executor.layers.linear", "MergedColumnParallelLinear",
                    ("input_size", "output_sizes", "bias", "quant_config", "disable_tp", "prefix"), "adapter/model.py"),
    CalledSignature("vllm.model_executor.models.deepseek_v2", "DeepSeekV2FusedQkvAProjLinear",
                    ("input_size", "output_size", "quant_config", "prefix"), "adapter/model.py"),
    CalledSignature("vllm.model_executor.layers.layernorm", "LayerNorm", ("eps", "dtype"), "adapter/model.py"),
    CalledSignature("vllm.model_executor.layers.layernorm", "LayerNorm", ("weight", "bias", "eps"),
                    "adapter/model.py CpNsaIndexer (its key's LayerNorm in kernels/mla_prologue.py)", kind="fields"),
    CalledSignature("vllm.model_executor.layers.layernorm", "RMSNorm", ("hidden_size", "eps"), "adapter/model.py, mtp.py"),
    CalledSignature("vllm.model_executor.layers.layernorm", "RMSNorm", ("weight", "variance_epsilon"),
                    "adapter/model.py CpNsaAttention (q_a / kv_a norms in kernels/mla_prologue.py)", kind="fields"),
    CalledSignature("vllm.model_executor.models.deepseek_v2", "DeepseekV2MLP",
                    ("hidden_size", "intermediate_size", "hidden_act", "quant_config", "reduce_results",
                     "is_sequence_parallel", "prefix"), "adapter/model.py, ep_moe.py"),
    CalledSignature("vllm.model_executor.models.deepseek_v2", "DeepseekV2MoE",
                    ("config", "parallel_config", "quant_config", "reduce_results", "prefix",
                     "apply_routed_scale_to_output"), "adapter/model.py, ep_moe.py"),
    CalledSignature("vllm.model_executor.models.deepseek_v2", "DeepseekV2MoE.forward",
                    ("hidden_states", "already_sequence_parallel"), "adapter/ep_moe.py VllmExpertParallelMoE"),
    CalledSignature("vllm.model_executor.models.deepseek_v2", "DeepseekV2MoE", ("is_sequence_parallel",),
                    "adapter/ep_moe.py VllmExpertParallelMoE", kind="fields"),
    CalledSignature("vllm.forward_context", "DPMetadata", ("num_tokens_across_dp_cpu",),
                    "adapter/ep_moe.py VllmExpertParallelMoE", kind="fields"),
    CalledSignature("vllm.model_executor.models.deepseek_v2", "yarn_get_mscale", ("scale", "mscale"), "adapter/model.py"),
    CalledSignature("vllm.model_executor.layers.vocab_parallel_embedding", "VocabParallelEmbedding",
                    ("num_embeddings", "embedding_dim", "quant_config", "prefix"), "adapter/model.py, mtp.py"),
    CalledSignature("vllm.model_executor.layers.fused_embed_norm", "fused_embed_norm",
                    ("input_ids", "embed_table", "chain_weight", "eps"), "adapter/model.py (passed positionally)",
                    optional=True, versions=("0.32.0", "0.34.0")),
    CalledSignature("vllm.model_executor.layers.fused_embed_norm", "fused_embed_eh_norm",
                    ("positions", "input_ids", "embed_table", "previous_hidden", "enorm_w", "hnorm_w", "eps"),
                    "adapter/mtp.py (passed positionally)", optional=True, versions=("0.32.0", "0.34.0")),
    CalledSignature("vllm.model_executor.layers.vocab_parallel_embedding", "ParallelLMHead",
                    ("num_embeddings", "embedding_dim", "quant_config", "prefix"), "adapter/model.py, mtp.py"),
    CalledSignature("vllm.model_executor.layers.logits_processor", "LogitsProcessor", ("vocab_size",), "adapter/model.py, mtp.py"),
    CalledSignature("vllm.model_executor.layers.fused_moe", "fused_moe_make_expert_params_mapping",
                    ("model", "ckpt_gate_proj_name", "ckpt_down_proj_name", "ckpt_up_proj_name", "num_experts"),
                    "adapter/weights.py"),
    CalledSignature("vllm.model_executor.model_loader.weight_utils", "default_weight_loader",
                    ("param", "loaded_weight"), "adapter/weights.py"),
    CalledSignature("vllm.compilation.breakable_cudagraph", "eager_break_during_capture", ("fn",), "adapter/model.py"),
    # attention metadata, caches, block sizes (adapter/backend.py)
    CalledSignature("vllm.v1.attention.backend", "CommonAttentionMetadata",
                    ("query_start_loc_cpu", "num_reqs", "slot_mapping", "block_table_tensor", "num_actual_tokens",
                     "max_seq_len", "seq_lens_cpu_upper_bound"), "adapter/backend.py", kind="fields"),
    CalledSignature("vllm.v1.attention.backend", "AttentionMetadataBuilder.__init__",
                    ("kv_cache_spec", "layer_names", "vllm_config", "device"), "adapter/backend.py"),
    CalledSignature("vllm.v1.attention.backend", "AttentionMetadataBuilder.build",
                    ("common_prefix_len", "common_attn_metadata", "fast_build"), "adapter/backend.py (overridden)"),
    CalledSignature("vllm.v1.attention.backend", "AttentionCGSupport", ("UNIFORM_BATCH", "NEVER", "ALWAYS"),
                    "adapter/backend.py", kind="fields"),
    CalledSignature("vllm.v1.attention.backend", "AttentionBackend.get_supported_kernel_block_sizes", (),
                    "adapter/backend.py (overridden)"),
    CalledSignature("vllm.v1.kv_cache_interface", "MLAAttentionSpec",
                    ("block_size", "num_kv_heads", "max_tp_shards", "head_size", "dtype", "cache_role"),
                    "adapter/backend.py"),
    CalledSignature("vllm.v1.kv_cache_interface", "SparseCacheRole", ("INDEXER",), "adapter/backend.py", kind="fields"),
    CalledSignature("vllm.forward_context", "ForwardContext", ("attn_metadata", "dp_metadata"),
                    "adapter/model.py, ep_moe.py", kind="fields"),
    # configuration read by the config hook and the runtime (adapter/config_hook.py, runtime.py)
    CalledSignature("vllm.config", "VllmConfig",
                    ("additional_config", "model_config", "cache_config", "parallel_config", "scheduler_config",
                     "speculative_config", "compilation_config", "lora_config", "quant_config"),
                    "adapter/*", kind="fields"),
    CalledSignature("vllm.config", "CompilationConfig",
                    ("cudagraph_mode", "cudagraph_capture_sizes", "max_cudagraph_capture_size", "static_forward_context"),
                    "adapter/config_hook.py, backend.py", kind="fields"),
    CalledSignature("vllm.config", "CUDAGraphMode", ("NONE", "FULL_DECODE_ONLY"), "adapter/config_hook.py", kind="fields"),
    CalledSignature("vllm.config", "ParallelConfig",
                    ("tensor_parallel_size", "data_parallel_size", "data_parallel_rank", "enable_expert_parallel",
                     "all2all_backend", "use_sequence_parallel_moe"),
                    "adapter/config_hook.py, runtime.py, ep_moe.py",
                    kind="fields"),
    CalledSignature("vllm.config", "SchedulerConfig", ("max_num_seqs", "max_num_batched_tokens"),
                    "adapter/config_hook.py, backend.py", kind="fields"),
    CalledSignature("vllm.config", "CacheConfig", ("cache_dtype", "block_size"), "adapter/*", kind="fields"),
    CalledSignature("vllm.config", "ModelConfig", ("dtype", "hf_config", "max_model_len", "architecture", "enforce_eager"),
                    "adapter/*", kind="fields"),
    CalledSignature("vllm.config", "SpeculativeConfig", ("num_speculative_tokens",), "adapter/runtime.py", kind="fields"),
    CalledSignature("vllm.distributed.parallel_state", "GroupCoordinator",
                    ("world_size", "rank_in_group", "device_group", "all_gather", "reduce_scatter", "all_reduce"),
                    "adapter/runtime.py VllmTpGroup", kind="fields"),
    CalledSignature("vllm.distributed.parallel_state", "GroupCoordinator.all_gather", ("input_", "dim"), "adapter/runtime.py"),
    CalledSignature("vllm.distributed.parallel_state", "GroupCoordinator.reduce_scatter", ("input_", "dim"), "adapter/runtime.py"),
    CalledSignature("vllm.platforms.interface", "Platform", ("device_type", "is_cuda", "is_cpu"), "adapter/*", kind="fields"),
    CalledSignature("vllm.model_executor.models.config", "VerifyAndUpdateConfig.verify_and_update_config",
                    ("vllm_config",), "adapter/config_hook.py (overridden)"),
    # kernels of the vllm / vllm-deepgemm providers (adapter/vllm_kernels.py, vllm_deepgemm.py)
    CalledSignature("vllm.v1.attention.ops.flashmla", "flash_mla_with_kvcache",
                    ("q", "k_cache", "block_table", "cache_seqlens", "head_dim_v", "tile_scheduler_metadata",
                     "softmax_scale", "is_fp8_kvcache", "indices"), "adapter/vllm_kernels.py", optional=True),
    CalledSignature("vllm.v1.attention.ops.flashmla", "flash_mla_sparse_fwd", ("q", "kv", "indices", "sm_scale"),
                    "adapter/vllm_kernels.py", optional=True),
    CalledSignature("vllm.vllm_flash_attn.flash_attn_interface", "flash_attn_varlen_func",
                    ("q", "k", "v", "q_v", "max_seqlen_q", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_k", "seqused_k",
                     "block_table", "softmax_scale", "causal", "return_softmax_lse", "fa_version"), "adapter/vllm_kernels.py",
                    optional=True),
    CalledSignature("vllm._custom_ops", "cp_gather_indexer_k_quant_cache",
                    ("kv_cache", "dst_k", "dst_scale", "block_table", "cu_seq_lens"), "adapter/vllm_deepgemm.py",
                    optional=True),
    CalledSignature("vllm._custom_ops", "top_k_per_row_prefill",
                    ("logits", "cu_seqlen_ks", "cu_seqlen_ke", "raw_topk_indices", "num_rows", "stride0", "stride1",
                     "topk_tokens"), "adapter/vllm_deepgemm.py", optional=True),
    CalledSignature("vllm.utils.deep_gemm", "get_paged_mqa_logits_metadata", ("context_lens", "block_size", "num_sms"),
                    "adapter/vllm_deepgemm.py (passed positionally)", optional=True, versions=("0.32.0", "0.34.0")),
    CalledSignature("vllm.utils.deep_gemm", "fp8_fp4_paged_mqa_logits",
                    ("q", "kv_cache", "weights", "context_lens", "block_tables", "schedule_metadata", "max_model_len"),
                    "adapter/vllm_deepgemm.py (passed positionally; clean_logits told apart at run time)",
                    optional=True, versions=("0.32.0", "0.34.0")),
    CalledSignature("vllm._custom_ops", "top_k_per_row_decode",
                    ("logits", "next_n", "seq_lens", "raw_topk_indices", "num_rows", "stride0", "stride1", "topk_tokens"),
                    "adapter/vllm_deepgemm.py (passed positionally)", optional=True, versions=("0.32.0", "0.34.0")),
    CalledSignature("vllm.utils.deep_gemm", "fp8_fp4_mqa_logits", ("q", "kv", "weights", "cu_seqlen_ks", "cu_seqlen_ke"),
                    "adapter/vllm_deepgemm.py (the keyword that differs is told apart at run time: logits_api)",
                    optional=True),
)


class VllmTouchpointError(RuntimeError):
    """The installed vLLM lacks a symbol the plugin hooks."""


def _installed_vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def _cuda_present() -> bool:
    import torch

    return torch.cuda.is_available()


def check_touchpoints() -> tuple[Touchpoint, ...]:
    """The required touchpoints the installed vLLM lacks (empty when every one resolves).

    Never raises: the entry point stays inactive on a vLLM without one, so other models
    still launch, and only a launch that asks for ``cp_nsa`` fails (with
    ``unavailable_reason``). A missing optional one is logged (a warning where CUDA is
    present, else at debug level): the vLLM kernel providers leave that op to Triton.
    """
    missing = []
    for point in TOUCHPOINTS:
        try:
            obj = importlib.import_module(point.module)
            for part in point.symbol.split("."):
                obj = getattr(obj, part)
        except Exception:  # noqa: BLE001 - any failure to resolve it means the same: absent
            if point.optional:
                # only CUDA runs use optional symbols: elsewhere their absence is no news
                logger.log(
                    logging.WARNING if _cuda_present() else logging.DEBUG,
                    "vllm_cp_nsa: vLLM %s has no %s.%s (needed to %s); %s", _installed_vllm_version(),
                    point.module, point.symbol, point.why, point.without,
                )
                continue
            missing.append(point)
    return tuple(missing)


def unavailable_reason(missing: tuple[Touchpoint, ...]) -> str:
    """Why the plugin cannot run on this vLLM, naming every missing symbol."""
    names = "; ".join(f"{p.module}.{p.symbol} (needed to {p.why})" for p in missing)
    return (
        f"vllm_cp_nsa: vLLM {_installed_vllm_version()} has no {names}; the plugin was checked "
        f"against vLLM {CHECKED_AGAINST}"
    )


def check_vllm_version() -> bool:
    """Warn once when the installed vLLM is outside the tested range; True if inside."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    installed = _installed_vllm_version()
    try:
        release = Version(Version(installed).base_version)
    except InvalidVersion:
        release = None
    if release is not None and release in SpecifierSet(TESTED_RANGE):
        return True
    logger.warning(
        "vllm_cp_nsa: vLLM %s is untested; the plugin is tested with vLLM %s (checked against %s)",
        installed, TESTED_RANGE, CHECKED_AGAINST,
    )
    return False
