"""The plugin's own extensions, registered as ordinary pluggy hook implementations.

The ``vllm`` and ``vllm-deepgemm`` kernel providers live in the adapter (they call vLLM's
kernels) but import vLLM only inside their methods, so listing them keeps this registry
importable without vLLM.
"""

from __future__ import annotations

from .communicator import FullMoeCommunicator, ScatteredMoeCommunicator
from .hookspecs import hookimpl
from .split_plan import InSeqSplit, RoundRobinSplit


@hookimpl
def cp_nsa_split_strategies() -> list:
    return [RoundRobinSplit(), InSeqSplit()]


@hookimpl
def cp_nsa_moe_communicators() -> list:
    return [FullMoeCommunicator(), ScatteredMoeCommunicator()]


@hookimpl
def cp_nsa_kernel_providers() -> list:
    from .adapter.vllm_deepgemm import VllmDeepGemmOps
    from .adapter.vllm_kernels import VllmKernelOps
    from .kernels.dispatch import builtin_providers

    return [*builtin_providers(), VllmKernelOps(), VllmDeepGemmOps()]
