"""The vLLM architecture names the plugin serves (leaf: no imports).

One definition for the entry point, the config hook and the CPU platform wrap.
"""

ARCHITECTURE = "DeepseekV32ForCausalLM"
"""``config.json`` ``architectures`` of DeepSeek-V3.2; also the ``MODELS_CONFIG_MAP`` key."""
MTP_ARCHITECTURE = "DeepseekV32MTPModel"
"""The architecture vLLM gives the V3.2 MTP draft model."""
