"""The plugin's one wrap of a vLLM attribute: ``CpuPlatform.check_and_update_config``.

Why: on hosts without AMX, vLLM's CPU platform turns chunked prefill and prefix
caching off for *every* MLA model (its CPU_MLA reference backend supports
neither) and nothing configurable runs after that platform hook. The plugin's
NSA backend supports both.
What: for DeepSeek-V3.2 only (installed only on CPU, where the plugin always serves it:
``plugin.register``), the wrapper restores the scheduler's
``enable_chunked_prefill`` / ``max_num_batched_tokens`` and the cache's
``enable_prefix_caching`` to what they were before the platform hook ran.
When it can go: once vLLM asks the attention backend (or the model) whether it
supports chunked prefill on CPU instead of deciding per platform.
"""

from __future__ import annotations

import logging

from ..architectures import ARCHITECTURE

logger = logging.getLogger("vllm.cp_nsa")


def keep_chunked_prefill_for_plugin_model() -> None:
    from vllm.platforms.cpu import CpuPlatform

    original = CpuPlatform.__dict__["check_and_update_config"].__func__
    if getattr(original, "_cp_nsa_wrapped", False):
        return

    def check_and_update_config(cls, vllm_config) -> None:
        model_config = vllm_config.model_config
        if model_config is None or model_config.architecture != ARCHITECTURE:
            return original(cls, vllm_config)
        scheduler, cache = vllm_config.scheduler_config, vllm_config.cache_config
        saved = (scheduler.enable_chunked_prefill, scheduler.max_num_batched_tokens,
                 cache.enable_prefix_caching)
        original(cls, vllm_config)
        after = (scheduler.enable_chunked_prefill, scheduler.max_num_batched_tokens,
                 cache.enable_prefix_caching)
        if after != saved:
            (scheduler.enable_chunked_prefill, scheduler.max_num_batched_tokens,
             cache.enable_prefix_caching) = saved
            logger.info(
                "vllm_cp_nsa: keeping chunked prefill=%s (max_num_batched_tokens=%s) and prefix "
                "caching=%s on CPU: the plugin's NSA backend supports them",
                *saved,
            )

    check_and_update_config._cp_nsa_wrapped = True
    CpuPlatform.check_and_update_config = classmethod(check_and_update_config)
