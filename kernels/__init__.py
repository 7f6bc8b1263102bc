"""NSA attention kernels: torch references, Triton kernels and the op dispatcher.

Installed as ``vllm_cp_nsa.kernels`` (tests also import it as ``kernels`` from the repo
root). Only torch is needed to import this package; triton is imported lazily.
"""

from . import attention_ref, kv_cache_ref
from .dispatch import NsaOps, TritonOps, builtin_providers, get_ops

__all__ = ["attention_ref", "kv_cache_ref", "NsaOps", "TritonOps", "builtin_providers", "get_ops"]
