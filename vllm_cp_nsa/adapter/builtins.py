"""The adapter's built-in extensions: the kernel providers that call vLLM's kernels.

Registered through their own entry point (``vllm_cp_nsa.extensions``: ``builtin_vllm =
vllm_cp_nsa.adapter.builtins``), next to the core's ``builtin`` (``vllm_cp_nsa.builtins``:
split strategies, MoE communicators, the torch and Triton providers), so the dependency runs
one way: the adapter imports the core, the core never imports the adapter. The provider
modules import vLLM only inside functions, so this registry imports on any vLLM and without
one.
"""

from __future__ import annotations

from ..hookspecs import hookimpl
from .vllm_deepgemm import VllmDeepGemmOps
from .vllm_kernels import VllmKernelOps


@hookimpl
def cp_nsa_kernel_providers() -> list:
    return [VllmDeepGemmOps(), VllmKernelOps()]
