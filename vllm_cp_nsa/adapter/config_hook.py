"""Startup configuration for DeepSeek-V3.2 under the plugin.

``CpNsaV32ConfigHook`` replaces vLLM's ``MODELS_CONFIG_MAP`` entry for the
``DeepseekV32ForCausalLM`` architecture (vLLM runs it in
``VllmConfig.__post_init__`` before CUDA-graph sizes are computed). It keeps
vLLM's own checks, validates ``additional_config["cp_nsa"]``, canonicalizes the
KV-cache dtype and logs what the plugin decided, once.
"""

from __future__ import annotations

import logging

from vllm.config import CUDAGraphMode, VllmConfig
from vllm.model_executor.models.config import VerifyAndUpdateConfig

from ..config import CpNsaConfig, CpNsaConfigError
from ..extensions import (
    kernel_providers,
    resolve_moe_communicator,
    resolve_split_strategy,
)
from ..graph_sizing import cp_capture_sizes
from .runtime import expert_all_to_all_configured, num_speculative_tokens

logger = logging.getLogger("vllm.cp_nsa")

ARCHITECTURE = "DeepseekV32ForCausalLM"
# --kv-cache-dtype values the plugin accepts, and the cache format each selects.
KV_CACHE_DTYPES = {
    "auto": "auto",
    "bfloat16": "auto",
    "fp8": "fp8_ds_mla",
    "fp8_e4m3": "fp8_ds_mla",
    "fp8_ds_mla": "fp8_ds_mla",
}


def canonical_kv_cache_dtype(requested: str) -> str:
    if requested not in KV_CACHE_DTYPES:
        raise CpNsaConfigError(
            f"vllm_cp_nsa: --kv-cache-dtype {requested} is not supported for DeepSeek-V3.2; "
            f"supported values: {', '.join(KV_CACHE_DTYPES)} (fp8 selects the 656-byte "
            f"fp8_ds_mla latent cache and the 132-byte fp8 indexer cache)"
        )
    return KV_CACHE_DTYPES[requested]


def describe_decision(vllm_config: VllmConfig, options: CpNsaConfig) -> str:
    parallel = vllm_config.parallel_config
    tp = parallel.tensor_parallel_size
    all_to_all = expert_all_to_all_configured(vllm_config)
    moe = resolve_moe_communicator(options.moe, all_to_all).name
    if options.mode == "off":
        split = "mode=off: attention runs unsplit on every rank"
    elif tp < 2:
        split = f"mode={options.mode} requested but -tp {tp}: CP needs >= 2 ranks, running unsplit"
    else:
        split = (
            f"mode={options.mode} over the {tp} TP ranks "
            f"(batches with < {max(tp, options.min_tokens_for_cp)} real tokens run unsplit)"
        )
    moe_why = (
        "expert parallelism with an all-to-all backend is configured"
        if all_to_all
        else "fused MoE stays TP-sharded"
    )
    return (
        f"vllm_cp_nsa: {split}; moe={moe} (requested {options.moe}: {moe_why}); "
        f"kernels={options.kernels}; kv cache {vllm_config.cache_config.cache_dtype}"
        + ("; decode_attention=tp: decode / verify batches run unsplit with the attention heads "
           "split over the ranks" if options.decode_attention == "tp" and tp > 1 else "")
    )


class CpNsaV32ConfigHook(VerifyAndUpdateConfig):
    previous: type[VerifyAndUpdateConfig] | None = None

    @classmethod
    def verify_and_update_config(cls, vllm_config: VllmConfig) -> None:
        if cls.previous is not None:
            cls.previous.verify_and_update_config(vllm_config)
        options = CpNsaConfig.from_additional_config(vllm_config.additional_config)
        resolve_split_strategy(options.mode)
        if options.kernels != "auto":
            options.check_choice("kernels", ["auto", *kernel_providers()])
        parallel = vllm_config.parallel_config
        communicator = resolve_moe_communicator(options.moe, expert_all_to_all_configured(vllm_config))
        if communicator.name == "full" and parallel.data_parallel_size > 1 and options.mode != "off":
            raise CpNsaConfigError(
                "vllm_cp_nsa: moe='full' cannot run with data parallelism "
                f"(--data-parallel-size {parallel.data_parallel_size}): its all-gather and "
                "reduce-scatter span only the CP (= TP) group, so the TP-sharded MoE would miss "
                "the other DP groups' tokens and their partial sums. Use DP=1, or expert "
                "parallelism with an all-to-all backend and moe='scattered'."
            )
        cache_config = vllm_config.cache_config
        cache_config.cache_dtype = canonical_kv_cache_dtype(cache_config.cache_dtype)
        if options.mode != "off" and parallel.tensor_parallel_size < 2:
            logger.warning(
                "vllm_cp_nsa: mode=%s needs >= 2 ranks (-tp N); running unsplit", options.mode
            )
        set_cudagraph_mode(vllm_config)
        if options.mode != "off" and parallel.tensor_parallel_size >= 2:
            set_cp_capture_sizes(vllm_config, split_decode=options.decode_attention != "tp")
        logger.info(describe_decision(vllm_config, options))


# Modes that capture only uniform decode / verify batches (FULL) or nothing.
_DECODE_ONLY_MODES = (CUDAGraphMode.NONE, CUDAGraphMode.FULL_DECODE_ONLY)


def set_cudagraph_mode(vllm_config: VllmConfig) -> None:
    """FULL graphs for uniform decode / verify batches only.

    The model is not torch-compiled and vLLM enables breakable CUDA graphs for
    this architecture, so a PIECEWISE mode would capture the whole forward of a
    mixed batch, split plan included, and replay it for other batches of that
    size. A user's NONE or FULL_DECODE_ONLY is kept; other modes are changed with
    a warning.
    """
    compilation = vllm_config.compilation_config
    requested = compilation.cudagraph_mode
    if requested in _DECODE_ONLY_MODES:
        return
    if requested is not None:
        logger.warning(
            "vllm_cp_nsa: cudagraph_mode %s -> FULL_DECODE_ONLY: mixed and prefill batches of the "
            "plugin's DeepSeek-V3.2 run eagerly (their split plan depends on the batch)",
            requested.name,
        )
    compilation.cudagraph_mode = CUDAGraphMode.FULL_DECODE_ONLY


def set_cp_capture_sizes(vllm_config: VllmConfig, split_decode: bool = True) -> None:
    """Capture sizes usable under CP and MTP, set before vLLM computes its own
    (explicit sizes win there, so vLLM keeps ours); a user's explicit sizes are
    kept but rounded, with a warning listing every change. With FULL_DECODE_ONLY graphs
    and ``decode_attention: tp`` (decode batches never split) only 1+k matters."""
    compilation = vllm_config.compilation_config
    requested = compilation.cudagraph_capture_sizes
    decode_only = compilation.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY
    cp_size = vllm_config.parallel_config.tensor_parallel_size
    sizes = cp_capture_sizes(
        cp_size=cp_size if split_decode or not decode_only else 1,
        num_speculative_tokens=num_speculative_tokens(vllm_config),
        max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
        max_num_batched_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
        max_capture_size=compilation.max_cudagraph_capture_size,
        requested_sizes=list(requested) if requested else None,
        decode_only=decode_only,
    )
    if sizes.changes:
        logger.warning(
            "vllm_cp_nsa: CUDA-graph capture sizes rounded for CP-%d: %s",
            vllm_config.parallel_config.tensor_parallel_size,
            ", ".join(f"{a}->{b if b is not None else 'dropped'}" for a, b in sizes.changes),
        )
    compilation.cudagraph_capture_sizes = sizes.sizes
    compilation.max_cudagraph_capture_size = sizes.max_size
