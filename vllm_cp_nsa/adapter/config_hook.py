"""Startup configuration for DeepSeek-V3.2 with the plugin installed.

``CpNsaV32ConfigHook`` holds vLLM's ``MODELS_CONFIG_MAP`` entry for the architecture
(vLLM runs it once, in ``VllmConfig.__post_init__`` of the process that builds the
config, before CUDA-graph sizes are computed) and always runs vLLM's own hook first.
When the plugin is not active (``plugin.plugin_active``) that is all it does, and it says
so in one line. When active it validates ``additional_config["cp_nsa"]``, refuses at
startup what the plugin's model does not support (the model info vLLM checks is that of
its own V3.2 class, see ``handover``), canonicalizes the KV-cache dtype, resolves the
attention split policy (``runtime.attention_split_policy``), sets the CUDA-graph mode and
sizes by it, and logs what it decided, once.

Imports only ``VerifyAndUpdateConfig`` from vLLM at module level, so the entry point can
install the hook, and refuse a ``cp_nsa`` launch with the reason, on a vLLM that lacks
other symbols the plugin needs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vllm.model_executor.models.config import VerifyAndUpdateConfig

from .. import plugin
from ..config import CpNsaConfig, CpNsaConfigError
from ..extensions import (
    kernel_providers,
    resolve_kernel_provider,
    resolve_moe_communicator,
    resolve_split_strategy,
)
from ..graph_sizing import cp_capture_sizes, piecewise_graph_decision
from ..split_policy import AttentionSplitPolicy

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = logging.getLogger("vllm.cp_nsa")

# --kv-cache-dtype values the plugin accepts, and the cache format each selects.
KV_CACHE_DTYPES = {
    "auto": "auto",
    "bfloat16": "auto",
    "fp8": "fp8_ds_mla",
    "fp8_e4m3": "fp8_ds_mla",
    "fp8_ds_mla": "fp8_ds_mla",
}
# Speculative methods whose drafter reads the target's auxiliary hidden states (vLLM's
# SupportsEagle3 interface), which the plugin's model does not expose.
AUX_HIDDEN_STATE_METHODS = ("eagle3", "dflash", "extract_hidden_states")
# The plugin's MoE communicators whose collectives span only the CP (= TP) group
# ("scattered" spreads its experts over vLLM's EP group under DP: runtime.moe_group_coordinator).
TP_GROUP_MOE_COMMUNICATORS = ("full",)


def canonical_kv_cache_dtype(requested: str) -> str:
    if requested not in KV_CACHE_DTYPES:
        raise CpNsaConfigError(
            f"vllm_cp_nsa: --kv-cache-dtype {requested} is not supported for DeepSeek-V3.2; "
            f"supported values: {', '.join(KV_CACHE_DTYPES)} (fp8 selects the 656-byte "
            f"fp8_ds_mla latent cache and the 132-byte fp8 indexer cache)"
        )
    return KV_CACHE_DTYPES[requested]


def describe_moe(vllm_config: VllmConfig, options: CpNsaConfig, communicator, all_to_all: bool) -> str:
    """What the MoE runs and why: ``auto`` names the setting it followed, ``scattered``
    says it moves rows with torch all-to-all (never the configured EP backend), and a
    communicator that cannot be captured says CUDA graphs are off."""
    backend = vllm_config.parallel_config.all2all_backend
    if options.moe == "auto":
        why = ("data parallelism with expert parallelism is set" if all_to_all
               and vllm_config.parallel_config.data_parallel_size > 1
               else f"expert parallelism with the all-to-all backend '{backend}' is set" if all_to_all
               else "no expert-parallel all-to-all backend is set: fused MoE stays TP-sharded")
        line = f"moe={communicator.name} (auto: {why})"
    else:
        line = f"moe={communicator.name}"
    if communicator.name == "scattered":
        vllm_ep, path = _vllm_expert_parallel_moe(vllm_config)
        if vllm_ep:
            line += f", moving token rows through {path}"
        else:
            ranks = ("the TP ranks" if vllm_config.parallel_config.data_parallel_size == 1
                     else "vLLM's EP group (all DP x TP ranks)")
            line += (f", moving token rows with torch all-to-all over {ranks}"
                     + (f" (not with '{backend}')" if all_to_all else ""))
    if not getattr(communicator, "supports_cuda_graphs", False):
        line += ", CUDA graphs off (its collective sizes follow the routing)"
    return line


def describe_decision(vllm_config: VllmConfig, options: CpNsaConfig, policy: AttentionSplitPolicy, kernels,
                      moe: str) -> str:
    """The startup line: split and the split policy's thresholds (``policy.describe()``),
    MoE (``describe_moe``), the kernel provider that resolved and the KV cache."""
    tp = vllm_config.parallel_config.tensor_parallel_size
    if options.mode == "off":
        split = "mode=off: attention runs unsplit on every rank" + (
            ", the attention heads split over the ranks (decode_attention=tp)" if policy.heads_split else "")
    elif tp < 2:
        split = f"mode={options.mode} requested but -tp {tp}: CP needs >= 2 ranks, running unsplit"
    else:
        split = f"mode={options.mode} over the {tp} TP ranks: {policy.describe(tp)}"
    requested = "" if options.kernels == kernels.name else f" (requested {options.kernels})"
    return (
        f"vllm_cp_nsa: {split}; {moe}; kernels={kernels.name}{requested}; "
        f"kv cache {vllm_config.cache_config.cache_dtype}"
    )


def refuse_unsupported(vllm_config: VllmConfig, options: CpNsaConfig) -> None:
    """Fail at startup, naming the fix, on what vLLM's own V3.2 accepts (its model info is
    what vLLM checks) but the plugin's model does not support."""
    parallel = vllm_config.parallel_config
    refused = []
    if parallel.pipeline_parallel_size > 1:
        refused.append(f"pipeline parallelism (--pipeline-parallel-size {parallel.pipeline_parallel_size}): "
                       "use 1 and put the ranks in -tp (CP runs over the TP ranks)")
    for flag, size in (("--prefill-context-parallel-size", parallel.prefill_context_parallel_size),
                       ("--decode-context-parallel-size", parallel.decode_context_parallel_size)):
        if size > 1:
            refused.append(f"vLLM's own context parallelism ({flag} {size}): use 1; the plugin's CP "
                           "runs over the -tp ranks (cp_nsa mode)")
    if vllm_config.lora_config is not None:
        refused.append("LoRA (--enable-lora): serve without LoRA adapters")
    if parallel.enable_eplb:
        refused.append("expert load balancing (--enable-eplb): drop the flag")
    spec = vllm_config.speculative_config
    if spec is not None and spec.method in AUX_HIDDEN_STATE_METHODS:
        refused.append(f"speculative method '{spec.method}' (its drafter reads the target's auxiliary "
                       "hidden states): use method 'mtp'")
    if parallel.data_parallel_size > 1 and options.mode != "off":
        dp_refusal, dp_line = data_parallel_decision(vllm_config, options)
        if dp_refusal:
            refused.append(dp_refusal)
        else:
            _log_once(dp_line)
    if refused:
        alternative = ("; or remove cp_nsa from --additional-config to run vLLM's own DeepSeek-V3.2"
                       if plugin.vllm_serves_v32_here() else "")
        raise CpNsaConfigError(
            "vllm_cp_nsa: the plugin's DeepSeek-V3.2 does not support " + "; ".join(refused) + alternative
        )


def data_parallel_decision(vllm_config: VllmConfig, options: CpNsaConfig) -> tuple[str, str]:
    """(refusal naming the fix, or "", the startup line) for ``--data-parallel-size D > 1``
    with CP on.

    CP runs inside each DP replica's TP group; the MoE must then reach the other replicas'
    experts. Only ``scattered`` does: its experts are spread over vLLM's EP group (all D x N
    ranks) and rows travel by all-to-all. ``full`` (all-gather / reduce-scatter over the TP
    group) sees only its own replica's tokens. ``--enable-expert-parallel`` is required so that
    the experts are spread the way vLLM's own DP + EP serving spreads them."""
    parallel = vllm_config.parallel_config
    dp, tp = parallel.data_parallel_size, parallel.tensor_parallel_size
    communicator = resolve_moe_communicator(options.moe, _expert_all_to_all(vllm_config)).name
    fix = ("add --enable-expert-parallel and set cp_nsa moe to 'scattered' (or 'auto'), or use "
           "--data-parallel-size 1 and put the ranks in -tp")
    if communicator != "scattered":
        return (f"moe='{communicator}' cannot run with data parallelism (--data-parallel-size {dp}): its collectives "
                f"span only one replica's CP (= TP) group, so the MoE would miss the other replicas' "
                f"experts; {fix}"), ""
    if not parallel.enable_expert_parallel:
        return (f"moe='scattered' cannot run with data parallelism (--data-parallel-size {dp}) without "
                f"--enable-expert-parallel: the experts are spread over all {dp * tp} DP x TP ranks only "
                f"under expert parallelism; {fix}"), ""
    vllm_ep, why = _vllm_expert_parallel_moe(vllm_config)
    line = (f"vllm_cp_nsa: data parallelism {dp} x -tp {tp}: CP (mode={options.mode}) inside each replica's "
            f"{tp} TP ranks, moe={communicator} with the routed experts spread over vLLM's EP group "
            f"(all {dp * tp} ranks), rows moved by "
            + (f"{why}, each rank's CP rows as its sequence-parallel chunk" if vllm_ep
               else f"torch all-to-all over that group ({why})"))
    return "", line


def resolve_kernels(vllm_config: VllmConfig, options: CpNsaConfig):
    """The kernel provider the workers will resolve (the same call with the same arguments
    as ``runtime.resolve_ops_and_communicator``), so a provider that cannot run the model
    fails here, at startup, and the startup line names the provider that runs."""
    import torch
    from vllm.platforms import current_platform

    return resolve_kernel_provider(
        options.kernels, torch.device(current_platform.device_type), vllm_config.model_config.dtype,
        vllm_config.model_config.hf_config.num_attention_heads,
    )


def _expert_all_to_all(vllm_config: VllmConfig) -> bool:
    from .runtime import expert_all_to_all_configured

    return expert_all_to_all_configured(vllm_config)


def _vllm_expert_parallel_moe(vllm_config: VllmConfig) -> tuple[bool, str]:
    from .runtime import vllm_expert_parallel_moe

    return vllm_expert_parallel_moe(vllm_config)


def _attention_split_policy(vllm_config: VllmConfig) -> AttentionSplitPolicy:
    from .runtime import attention_split_policy

    return attention_split_policy(vllm_config)


_logged_lines: set[str] = set()


def _log_once(line: str) -> None:
    if line not in _logged_lines:
        _logged_lines.add(line)
        logger.info(line)


class CpNsaV32ConfigHook(VerifyAndUpdateConfig):
    previous: type[VerifyAndUpdateConfig] | None = None

    @classmethod
    def verify_and_update_config(cls, vllm_config: VllmConfig) -> None:
        if cls.previous is not None:
            cls.previous.verify_and_update_config(vllm_config)
        if not plugin.plugin_active(vllm_config.additional_config):
            _log_once(plugin.inactive_line())
            return
        if not plugin.cp_nsa_requested(vllm_config.additional_config):
            _log_once(plugin.serves_without_cp_nsa_line())
        options = CpNsaConfig.from_additional_config(vllm_config.additional_config)
        resolve_split_strategy(options.mode)
        if options.kernels != "auto":
            options.check_choice("kernels", ["auto", *kernel_providers()])
        refuse_unsupported(vllm_config, options)
        kernels = resolve_kernels(vllm_config, options)
        all_to_all = _expert_all_to_all(vllm_config)
        communicator = resolve_moe_communicator(options.moe, all_to_all)
        cache_config = vllm_config.cache_config
        cache_config.cache_dtype = canonical_kv_cache_dtype(cache_config.cache_dtype)
        policy = _attention_split_policy(vllm_config)
        parallel = vllm_config.parallel_config
        if options.mode != "off" and parallel.tensor_parallel_size < 2:
            logger.warning(
                "vllm_cp_nsa: mode=%s needs >= 2 ranks (-tp N); running unsplit", options.mode
            )
        piecewise, why = piecewise_graph_decision(
            cp_size=parallel.tensor_parallel_size, mode=options.mode, heads_split=policy.heads_split,
            moe_capturable=getattr(communicator, "supports_cuda_graphs", False))
        set_cudagraph_mode(vllm_config, piecewise, why, split=options.mode != "off")
        if options.mode != "off" and parallel.tensor_parallel_size >= 2:
            set_cp_capture_sizes(vllm_config, split_decode=policy.split_decode)
        logger.info(describe_decision(
            vllm_config, options, policy, kernels, describe_moe(vllm_config, options, communicator, all_to_all)))


def set_cudagraph_mode(vllm_config: VllmConfig, piecewise: bool, why: str, split: bool = True) -> None:
    """CUDA graphs the plugin's model can replay.

    ``piecewise`` (``graph_sizing.piecewise_graph_decision``: the row layout depends on the
    padded token count alone): vLLM's own mode stays, as for vLLM's own V3.2 (breakable
    piecewise graphs for prefill / mixed batches around the attention's eager break, FULL
    graphs for uniform decode). Otherwise FULL graphs for uniform decode / verify batches
    only: a piecewise graph would replay the split layout it captured for another batch of
    that size. A user's NONE or FULL_DECODE_ONLY is kept; other modes are changed with a
    warning that says why.
    """
    from vllm.config import CUDAGraphMode

    from vllm.platforms import current_platform

    compilation = vllm_config.compilation_config
    requested = compilation.cudagraph_mode
    if piecewise:
        if not current_platform.is_cuda() or vllm_config.model_config.enforce_eager:
            return  # no graphs at all: the backend's own line says so, this one would contradict it
        _log_once(f"vllm_cp_nsa: CUDA graphs as vLLM's own V3.2: breakable piecewise graphs for "
                  f"prefill / mixed batches ({why}), FULL graphs for uniform decode")
        return
    if requested in (CUDAGraphMode.NONE, CUDAGraphMode.FULL_DECODE_ONLY):
        return
    if requested is not None:
        logger.warning(
            "vllm_cp_nsa: cudagraph_mode %s -> FULL_DECODE_ONLY: mixed and prefill batches of the "
            "plugin's DeepSeek-V3.2 run eagerly (%s%s)",
            requested.name, why, "; a graph captured for one mixed batch would replay its split "
            "layout for another" if split else "",
        )
    compilation.cudagraph_mode = CUDAGraphMode.FULL_DECODE_ONLY


def set_cp_capture_sizes(vllm_config: VllmConfig, split_decode: bool = True) -> None:
    """Capture sizes usable under CP and MTP, set before vLLM computes its own
    (explicit sizes win there, so vLLM keeps ours); a user's explicit sizes are
    kept but rounded, with a warning listing every change. With FULL_DECODE_ONLY graphs
    and decode batches that never split (``split_decode`` False: the split policy's
    ``decode_attention: tp``, explicit or resolved from ``auto``) only 1+k matters."""
    from vllm.config import CUDAGraphMode

    from .runtime import num_speculative_tokens

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
