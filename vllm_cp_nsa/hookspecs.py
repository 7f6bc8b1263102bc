"""pluggy hook specifications: the plugin's own extension points.

A third-party package extends vllm_cp_nsa from its own distribution by listing a
module with ``@hookimpl`` functions under the entry-point group
``vllm_cp_nsa.extensions``; the built-ins register exactly that way, the core's
(``vllm_cp_nsa.builtins``) and the adapter's vLLM kernel providers
(``vllm_cp_nsa.adapter.builtins``) as two entry points. Each hook returns a list of objects carrying a ``name``:
selection by name comes from ``additional_config["cp_nsa"]``.
"""

from __future__ import annotations

import pluggy

PROJECT = "vllm_cp_nsa"
ENTRY_POINT_GROUP = "vllm_cp_nsa.extensions"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class CpNsaHookSpecs:
    @hookspec
    def cp_nsa_split_strategies(self) -> list:
        """Split strategies (``vllm_cp_nsa.split_plan.SplitStrategy``)."""

    @hookspec
    def cp_nsa_moe_communicators(self) -> list:
        """MoE communicators (``vllm_cp_nsa.communicator.MoeCommunicator``)."""

    @hookspec
    def cp_nsa_kernel_providers(self) -> list:
        """Kernel providers (``vllm_cp_nsa.kernels.dispatch.NsaOps``-like objects with
        ``name``, ``priority`` (``kernels: auto`` takes the highest that supports the call)
        and ``supports(device, dtype, num_heads)``; optional ``unsupported_reason`` with the
        same arguments, for the startup error)."""
