"""The classes the plugin registers for DeepSeek-V3.2 and its MTP draft.

Each subclasses vLLM's own class for this platform (``vllm.models.deepseek_v32`` picks
the CUDA, ROCm or generic one), so the model info vLLM reads from the registered class
(``_ModelInfo.from_model_cls``: pipeline parallelism, interfaces, ...) is exactly vLLM's.
Which model is built is decided at model build, the first point where the launch's config
exists (vLLM calls ``model_class(vllm_config=..., prefix=...)`` in the worker):
``__new__`` returns vLLM's own model when the plugin is not active
(``plugin.plugin_active``), the plugin's when it is. Either object is not an instance of
the hand-over class, so Python does not run the hand-over's (vLLM's) ``__init__`` on it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.models.deepseek_v32 import DeepseekV32ForCausalLM as VllmDeepseekV32ForCausalLM
from vllm.models.deepseek_v32 import DeepseekV32MTP as VllmDeepseekV32MTP

from .. import plugin

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def build(vllm_model_cls: type, plugin_model_cls: str, vllm_config: VllmConfig, prefix: str):
    """vLLM's model, or the plugin's (``"module:Class"`` under ``vllm_cp_nsa.adapter``,
    imported only when it is built) when the plugin is active."""
    if not plugin.plugin_active(vllm_config.additional_config):
        return vllm_model_cls(vllm_config=vllm_config, prefix=prefix)
    import importlib

    module_name, class_name = plugin_model_cls.split(":")
    model_cls = getattr(importlib.import_module(module_name), class_name)
    packed = getattr(model_cls, "packed_modules_mapping", None)
    if vllm_config.quant_config is not None and packed is not None:
        # vLLM's loader handed the quantization config the hand-over's (vLLM's) packed
        # modules (model_loader.utils.configure_quant_config); the plugin's model packs its own.
        vllm_config.quant_config.packed_modules_mapping = packed
    return model_cls(vllm_config=vllm_config, prefix=prefix)


class DeepseekV32ForCausalLM(VllmDeepseekV32ForCausalLM):
    """Registered over ``DeepseekV32ForCausalLM``: vLLM's own model, or
    ``CpNsaDeepseekV32ForCausalLM`` when the plugin is active."""

    def __new__(cls, *, vllm_config: VllmConfig, prefix: str = ""):
        return build(VllmDeepseekV32ForCausalLM, "vllm_cp_nsa.adapter.model:CpNsaDeepseekV32ForCausalLM",
                     vllm_config, prefix)


class DeepseekV32MTP(VllmDeepseekV32MTP):
    """Registered over ``DeepseekV32MTPModel``: vLLM's own MTP draft, or
    ``CpNsaDeepseekV32MTP`` when the plugin is active."""

    def __new__(cls, *, vllm_config: VllmConfig, prefix: str = ""):
        return build(VllmDeepseekV32MTP, "vllm_cp_nsa.adapter.mtp:CpNsaDeepseekV32MTP", vllm_config, prefix)
