"""The plugin's user configuration: ``--additional-config '{"cp_nsa": {...}}'``.

A leaf module (no vLLM import): parsed from the plain dict vLLM carries in
``VllmConfig.additional_config`` so every process reads the same options.
Names of strategies, MoE communicators and kernel providers are checked against
the pluggy registries when the plugin resolves them (see ``extensions``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

from .split_policy import AUTO, DECODE_ATTENTION_CHOICES, is_min_tokens_option

CONFIG_KEY = "cp_nsa"

INDEXER_CACHE_CHOICES = ("auto", "fp8")


class CpNsaConfigError(ValueError):
    """Bad ``cp_nsa`` configuration; the message names the key and allowed values."""


@dataclass(frozen=True)
class CpNsaConfig:
    mode: str = "off"
    """Token split for attention: ``off``, ``round-robin-split``, ``in-seq-split``
    or a strategy registered by an extension."""
    moe: str = "auto"
    """MoE communicator under CP: ``auto``, ``full``, ``scattered`` or an extension's."""
    kernels: str = "auto"
    """Kernel provider: ``auto`` (the fastest this GPU and vLLM support, see
    ``extensions.resolve_kernel_provider``), ``vllm-deepgemm`` (vLLM's FlashMLA sparse
    attention; per batch vLLM's DeepGEMM indexer over an fp8 indexer cache or the Triton
    indexer, Triton inside CUDA graphs), ``vllm`` (FlashMLA, Triton indexer), ``triton``,
    ``torch`` (the references) or an extension's."""
    min_tokens_for_cp: int | str = "auto"
    """Batches with fewer real tokens than this run unsplit (adaptive skip); ``auto``: the
    crossover measured for this CP size and KV dtype (``split_policy``)."""
    indexer_cache: str = "auto"
    """Indexer key cache: ``auto`` = 132-byte fp8 with an ``fp8_ds_mla`` KV cache or a kernel
    provider whose indexer reads fp8 keys (``vllm-deepgemm``, which ``kernels: auto`` picks
    where DeepGEMM runs), the model dtype otherwise; ``fp8`` = always fp8, as vLLM's own V3.2
    stores it."""
    decode_attention: str = "auto"
    """``split``: decode / verify rows are split over the ranks like prefill rows, each rank
    running all heads with the replicated attention weights. ``tp``: decode / verify batches
    run unsplit and their attention (that of every unsplit batch) splits the heads over the
    ranks as vLLM's TP does, reading 1/N of the attention weights per rank (SGLang's
    ``--enable-cp-decode-attn-tp``); needs unquantized attention projections and heads
    divisible by the ranks. ``auto``: whichever was measured faster for this CP size and KV
    dtype (``split_policy``), ``split`` where the heads cannot be split."""

    @classmethod
    def from_additional_config(cls, additional_config: Any) -> "CpNsaConfig":
        """Parse ``additional_config[CONFIG_KEY]``; absent means all defaults."""
        if additional_config is None:
            return cls()
        if not isinstance(additional_config, Mapping):
            return cls()
        raw = additional_config.get(CONFIG_KEY)
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise CpNsaConfigError(
                f"additional_config['{CONFIG_KEY}'] must be a JSON object, got "
                f"{type(raw).__name__}: {raw!r}"
            )
        allowed = [f.name for f in fields(cls)]
        for key in raw:
            if key not in allowed:
                raise CpNsaConfigError(
                    f"additional_config['{CONFIG_KEY}']: unknown key '{key}'; "
                    f"allowed keys: {', '.join(allowed)}"
                )
        values = dict(raw)
        for key in ("mode", "moe", "kernels", "indexer_cache", "decode_attention"):
            if key in values and not isinstance(values[key], str):
                raise CpNsaConfigError(
                    f"additional_config['{CONFIG_KEY}']['{key}'] must be a string, "
                    f"got {values[key]!r}"
                )
        min_tokens = values.get("min_tokens_for_cp", AUTO)
        if not is_min_tokens_option(min_tokens):
            raise CpNsaConfigError(
                f"additional_config['{CONFIG_KEY}']['min_tokens_for_cp'] must be '{AUTO}' or a "
                f"non-negative integer, got {min_tokens!r}"
            )
        if values.get("indexer_cache", "auto") not in INDEXER_CACHE_CHOICES:
            raise CpNsaConfigError(
                f"additional_config['{CONFIG_KEY}']['indexer_cache'] = "
                f"'{values['indexer_cache']}'; allowed values: {', '.join(INDEXER_CACHE_CHOICES)}"
            )
        if values.get("decode_attention", AUTO) not in DECODE_ATTENTION_CHOICES:
            raise CpNsaConfigError(
                f"additional_config['{CONFIG_KEY}']['decode_attention'] = "
                f"'{values['decode_attention']}'; allowed values: {', '.join(DECODE_ATTENTION_CHOICES)}"
            )
        return cls(**values)

    def indexer_cache_fp8(self, kv_cache_dtype: str, provider_reads_fp8: bool = False) -> bool:
        """Whether the indexer keys are stored as 132-byte fp8: asked for, an ``fp8_ds_mla``
        KV cache, or (``auto``) a kernel provider whose indexer reads fp8 keys."""
        return self.indexer_cache == "fp8" or kv_cache_dtype == "fp8_ds_mla" or provider_reads_fp8

    def check_choice(self, key: str, registered: list[str]) -> None:
        """Fail with the registered names when ``key``'s value is not one of them."""
        value = getattr(self, key)
        if value not in registered:
            raise CpNsaConfigError(
                f"additional_config['{CONFIG_KEY}']['{key}'] = '{value}' is not "
                f"registered; allowed values: {', '.join(registered)}"
            )
