"""Bounds of the kernels' transient buffers: one definition each, importable without Triton.

vLLM's startup memory profile does not run the plugin's attention (its dummy forwards return
before it), so these buffers are not in vLLM's KV-cache sizing: they must fit the headroom
``gpu_memory_utilization`` leaves, and stay small next to it.
"""

from __future__ import annotations

MAX_LOGITS_BYTES = 256 * 1024**2
"""One chunk of fp32 indexer logits, for every indexer path (the Triton kernels and the DeepGEMM
one). 256 MiB, not vLLM's 512 MiB default (``VLLM_SPARSE_INDEXER_MAX_LOGITS_MB``): vLLM's own
indexer allocates its logits inside the profiled forward, the plugin's are unprofiled, and a
chunk this size already holds 4096 query rows of 16K keys (1024 of 64K), enough to keep the
kernels at full rate (eval/kernel_notes.md); more rows only split into more chunks."""

MAX_WORKSPACE_BYTES = 256 * 1024**2
"""Largest bf16 latent workspace an fp8 prefill dequantizes into (1152 bytes per block-table
slot: about 233K tokens); larger batches keep FlashMLA's fp8 kernel over the cache."""
