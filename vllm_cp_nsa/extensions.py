"""Registries of split strategies, MoE communicators and kernel providers.

Everything is collected through pluggy from the ``vllm_cp_nsa.extensions``
entry-point group (``hookspecs``), built-ins included: the core's (``builtin``:
``vllm_cp_nsa.builtins``) and the adapter's vLLM kernel providers (``builtin_vllm``:
``vllm_cp_nsa.adapter.builtins``). Unknown names fail with the list of registered ones.
``resolve_kernel_provider`` holds the one ``auto`` rule of the plugin.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import pluggy

from .config import CpNsaConfigError
from .hookspecs import ENTRY_POINT_GROUP, PROJECT, CpNsaHookSpecs

ADAPTER_ENTRY_POINT = "builtin_vllm"
"""Name of the entry point that registers the adapter's vLLM kernel providers."""

logger = logging.getLogger("vllm.cp_nsa")


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(CpNsaHookSpecs)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    from . import builtins

    # Only reached when the package runs from a source tree without its distribution
    # metadata: register the core's built-ins the way the entry point would have. The
    # adapter's providers need their entry point (the core does not import the adapter);
    # eval/gpu_env.sh writes both into the metadata it lays out on the GPU hosts.
    if not pm.is_registered(builtins):
        pm.register(builtins, name="builtin")
    if pm.get_plugin(ADAPTER_ENTRY_POINT) is None:
        logger.warning(
            "vllm_cp_nsa: no '%s' entry point in group %s: the vLLM kernel providers (vllm, "
            "vllm-deepgemm) are not registered and kernels='auto' stops at triton; reinstall the "
            "plugin (pip install) so its distribution metadata lists %s = vllm_cp_nsa.adapter.builtins",
            ADAPTER_ENTRY_POINT, ENTRY_POINT_GROUP, ADAPTER_ENTRY_POINT,
        )  # fmt: skip
    return pm


def _collect(hook_name: str, kind: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for batch in getattr(plugin_manager().hook, hook_name)():
        for obj in batch:
            if obj.name in found:
                raise CpNsaConfigError(f"two {kind}s are registered under the name '{obj.name}'")
            found[obj.name] = obj
    return found


def split_strategies() -> dict[str, Any]:
    return _collect("cp_nsa_split_strategies", "split strategy")


def moe_communicators() -> dict[str, Any]:
    return _collect("cp_nsa_moe_communicators", "MoE communicator")


def kernel_providers() -> dict[str, Any]:
    return _collect("cp_nsa_kernel_providers", "kernel provider")


def resolve_split_strategy(name: str):
    """The strategy for ``mode`` (None for ``off``)."""
    if name == "off":
        return None
    strategies = split_strategies()
    if name not in strategies:
        raise CpNsaConfigError(
            f"additional_config['cp_nsa']['mode'] = '{name}' is not registered; "
            f"allowed values: {', '.join(['off', *strategies])}"
        )
    return strategies[name]


def resolve_moe_communicator(name: str, expert_all_to_all: bool):
    """The communicator for ``moe``; ``auto`` picks ``scattered`` when expert
    parallelism with an all-to-all backend is configured, else ``full``."""
    communicators = moe_communicators()
    if name == "auto":
        name = "scattered" if expert_all_to_all else "full"
    if name not in communicators:
        raise CpNsaConfigError(
            f"additional_config['cp_nsa']['moe'] = '{name}' is not registered; "
            f"allowed values: {', '.join(['auto', *communicators])}"
        )
    return communicators[name]


def resolve_kernel_provider(name: str, device, dtype, num_heads: int):
    """The kernel provider for ``kernels``.

    ``auto`` (the plugin's only automatic choice): the registered provider with the highest
    ``priority`` whose ``supports(device, dtype, num_heads)`` accepts, i.e. on the built-ins
    ``vllm-deepgemm`` (30: FlashMLA sparse attention, DeepGEMM or Triton indexer per batch)
    where vLLM ships both kernels for this GPU, else ``vllm`` (20: FlashMLA, Triton indexer),
    else ``triton`` (10) on CUDA, else ``torch`` (0, the references). A name: that provider,
    refused here (at startup) when it does not support the call.
    """
    providers = kernel_providers()
    if name == "auto":
        ranked = sorted(providers.values(), key=lambda p: -getattr(p, "priority", 0))
        for provider in ranked:
            if provider.supports(device, dtype, num_heads):
                return provider
        raise CpNsaConfigError(
            f"no registered kernel provider supports device={device} dtype={dtype} heads={num_heads}; "
            f"registered: {', '.join(providers)}"
        )
    if name not in providers:
        raise CpNsaConfigError(
            f"additional_config['cp_nsa']['kernels'] = '{name}' is not registered; "
            f"allowed values: {', '.join(['auto', *providers])}"
        )
    provider = providers[name]
    if not provider.supports(device, dtype, num_heads):
        reason = getattr(provider, "unsupported_reason", lambda *a: "")(device, dtype, num_heads)
        raise CpNsaConfigError(
            f"kernel provider '{name}' does not support device={device} dtype={dtype} "
            f"heads={num_heads}{f' ({reason})' if reason else ''}; use kernels='auto'"
        )
    return provider
