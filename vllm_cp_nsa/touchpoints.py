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

CHECKED_AGAINST = "0.32.0"
TESTED_RANGE = ">=0.32.0,<0.33"


@dataclass(frozen=True)
class Touchpoint:
    module: str
    symbol: str
    """Attribute path inside ``module`` (dots for class attributes)."""
    why: str
    patched: bool = False
    """True only for the one place the plugin wraps a vLLM attribute (see plugin.py)."""
    optional: bool = False
    """True for the kernels only the ``vllm`` / ``vllm-deepgemm`` kernel providers call
    (lazily): without one the plugin still starts, and those providers leave the op to
    Triton."""


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
    Touchpoint("vllm.v1.attention.backend", "CommonAttentionMetadata", "query_start_loc_cpu, slot_mapping, block_table_tensor, max_seq_len"),
    Touchpoint("vllm.v1.attention.backend", "MLAAttentionImpl", "impl base class"),
    Touchpoint("vllm.v1.attention.backend", "MultipleOf", "kernel block sizes"),
    Touchpoint("vllm.platforms.interface", "Platform._preferred_block_size_for_backends", "vLLM keeps 16-token blocks unless a backend rejects 16: why the backends declare MultipleOf(64) on CUDA"),
    Touchpoint("vllm.v1.kv_cache_interface", "MLAAttentionSpec", "indexer cache spec"),
    Touchpoint("vllm.v1.kv_cache_interface", "SparseCacheRole", "indexer cache role"),
    Touchpoint("vllm.forward_context", "get_forward_context", "attention metadata of the current forward"),
    # distributed
    Touchpoint("vllm.distributed", "get_tp_group", "the TP group is the CP group"),
    # model layers
    Touchpoint("vllm.model_executor.layers.fused_moe", "fused_moe_make_expert_params_mapping", "routed expert weight loading"),
    Touchpoint("vllm.model_executor.layers.layernorm", "LayerNorm", "indexer k_norm"),
    Touchpoint("vllm.model_executor.layers.layernorm", "RMSNorm", "norms"),
    Touchpoint("vllm.model_executor.layers.linear", "ReplicatedLinear", "replicated attention / indexer projections"),
    Touchpoint("vllm.model_executor.layers.linear", "UnquantizedLinearMethod", "decode_attention=tp slices unquantized attention weights by head"),
    Touchpoint("vllm.model_executor.layers.logits_processor", "LogitsProcessor", "logits"),
    Touchpoint("vllm.model_executor.layers.rotary_embedding", "get_rope", "MLA and indexer rotary"),
    Touchpoint("vllm.model_executor.layers.vocab_parallel_embedding", "ParallelLMHead", "lm head"),
    Touchpoint("vllm.model_executor.layers.vocab_parallel_embedding", "VocabParallelEmbedding", "embedding"),
    Touchpoint("vllm.model_executor.model_loader.weight_utils", "default_weight_loader", "plain weight loading"),
    Touchpoint("vllm.model_executor.models.deepseek_v2", "DeepseekV2MLP", "dense MLP (TP-sharded, no all-reduce)"),
    Touchpoint("vllm.model_executor.models.deepseek_v2", "DeepseekV2MoE", "FusedMoE + shared experts (TP-sharded, no all-reduce)"),
    Touchpoint("vllm.model_executor.models.deepseek_v2", "yarn_get_mscale", "yarn softmax scale"),
    Touchpoint("vllm.sequence", "IntermediateTensors", "model forward signature"),
    # kernels of the `vllm` kernel provider (adapter/vllm_kernels.py)
    Touchpoint("vllm.v1.attention.ops.flashmla", "is_flashmla_sparse_supported", "check FlashMLA sparse on this GPU", optional=True),
    Touchpoint("vllm.v1.attention.ops.flashmla", "flash_mla_sparse_fwd", "sparse MLA over a bf16 latent cache", optional=True),
    Touchpoint("vllm.v1.attention.ops.flashmla", "flash_mla_with_kvcache", "sparse MLA over an fp8_ds_mla latent cache", optional=True),
    Touchpoint("vllm.v1.attention.ops.flashmla", "get_mla_metadata", "FlashMLA tile scheduler metadata", optional=True),
    # kernels of the opt-in `vllm-deepgemm` kernel provider (adapter/vllm_deepgemm.py)
    Touchpoint("vllm.utils.import_utils", "has_deep_gemm", "check DeepGEMM is installed", optional=True),
    Touchpoint("vllm._custom_ops", "cp_gather_indexer_k_quant_cache", "gather fp8 indexer keys into a contiguous buffer", optional=True),
    Touchpoint("vllm.utils.deep_gemm", "fp8_fp4_mqa_logits", "DeepGEMM fp8 indexer logits over per-row key ranges", optional=True),
    Touchpoint("vllm._custom_ops", "top_k_per_row_prefill", "per-row indexer top-k over [ks, ke)", optional=True),
)


class VllmTouchpointError(RuntimeError):
    """The installed vLLM lacks a symbol the plugin hooks."""


def _installed_vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_touchpoints() -> tuple[Touchpoint, ...]:
    """The required touchpoints the installed vLLM lacks (empty when every one resolves).

    Never raises: the entry point stays inactive on a vLLM without one, so other models
    still launch, and only a launch that asks for ``cp_nsa`` fails (with
    ``unavailable_reason``). A missing optional one is logged: the vLLM kernel providers
    leave that op to Triton.
    """
    missing = []
    for point in TOUCHPOINTS:
        try:
            obj = importlib.import_module(point.module)
            for part in point.symbol.split("."):
                obj = getattr(obj, part)
        except Exception:  # noqa: BLE001 - any failure to resolve it means the same: absent
            if point.optional:
                logger.warning(
                    "vllm_cp_nsa: vLLM %s has no %s.%s (needed to %s); the vLLM kernel providers "
                    "leave that op to Triton", _installed_vllm_version(), point.module, point.symbol,
                    point.why,
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
