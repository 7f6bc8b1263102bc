"""The core's own extensions, registered as ordinary pluggy hook implementations (entry point
``builtin``): the split strategies, the MoE communicators and the torch / Triton kernel
providers. The kernel providers that call vLLM's kernels (``vllm``, ``vllm-deepgemm``) are the
adapter's and register from ``vllm_cp_nsa.adapter.builtins`` (entry point ``builtin_vllm``):
the core never imports the adapter.
"""

from __future__ import annotations

from .communicator import FullMoeCommunicator, ScatteredMoeCommunicator
from .hookspecs import hookimpl
from .kernels.dispatch import builtin_providers
from .split_plan import InSeqSplit, RoundRobinSplit


@hookimpl
def cp_nsa_split_strategies() -> list:
    return [RoundRobinSplit(), InSeqSplit()]


@hookimpl
def cp_nsa_moe_communicators() -> list:
    return [FullMoeCommunicator(), ScatteredMoeCommunicator()]


@hookimpl
def cp_nsa_kernel_providers() -> list:
    return builtin_providers()
