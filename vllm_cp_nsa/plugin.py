"""Entry point (``vllm.general_plugins``: ``cp_nsa``), loaded by vLLM in every process."""

from __future__ import annotations

import logging
import os

from .touchpoints import check_touchpoints, check_vllm_version

logger = logging.getLogger("vllm.cp_nsa")

ARCHITECTURE = "DeepseekV32ForCausalLM"
MODEL_CLASS = "vllm_cp_nsa.adapter.model:CpNsaDeepseekV32ForCausalLM"
MTP_ARCHITECTURE = "DeepseekV32MTPModel"
MTP_CLASS = "vllm_cp_nsa.adapter.mtp:CpNsaDeepseekV32MTP"
# Set once the version warning was printed, so the engine and worker processes
# this process starts do not print it again.
_VERSION_WARNED_ENV = "CP_NSA_VERSION_WARNED"

_registered = False


def register() -> None:
    """Register the V3.2 model class and config hook. Idempotent; changes nothing
    for other architectures."""
    global _registered
    if _registered:
        return
    if not os.environ.get(_VERSION_WARNED_ENV):
        if not check_vllm_version():
            os.environ[_VERSION_WARNED_ENV] = "1"
    check_touchpoints()

    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.platforms import current_platform

    from .adapter.config_hook import CpNsaV32ConfigHook

    ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)
    ModelRegistry.register_model(MTP_ARCHITECTURE, MTP_CLASS)
    if MODELS_CONFIG_MAP.get(ARCHITECTURE) is not CpNsaV32ConfigHook:
        CpNsaV32ConfigHook.previous = MODELS_CONFIG_MAP.get(ARCHITECTURE)
        MODELS_CONFIG_MAP[ARCHITECTURE] = CpNsaV32ConfigHook
    if current_platform.is_cpu():
        from .adapter.cpu_platform import keep_chunked_prefill_for_plugin_model

        keep_chunked_prefill_for_plugin_model()
    _registered = True
