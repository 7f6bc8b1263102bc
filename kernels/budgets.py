"""Bounds of the kernels' transient buffers: one definition each, importable without Triton.

vLLM's startup memory profile runs no attention (its dummy forwards carry no batch metadata),
so the model allocates the scratch these bounds imply in its profile forward instead
(``vllm_cp_nsa/scratch.py``): the larger a bound, the smaller the KV cache vLLM sizes.
"""

from __future__ import annotations

import os

LOGITS_MB_ENV = "VLLM_SPARSE_INDEXER_MAX_LOGITS_MB"
"""vLLM's own bound of its indexer's prefill logits chunk; when an operator sets it, the plugin's
indexer chunks by it too."""


def _max_logits_bytes() -> int:
    raw = os.environ.get(LOGITS_MB_ENV, "").strip()
    if not raw:
        return 256 * 1024**2
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{LOGITS_MB_ENV}={raw!r}: a positive number of MiB")
    return int(raw) * 1024**2


MAX_LOGITS_BYTES = _max_logits_bytes()
"""One chunk of fp32 indexer logits, for every indexer path (the Triton kernels and the DeepGEMM
one): ``VLLM_SPARSE_INDEXER_MAX_LOGITS_MB`` where set, else 256 MiB, not vLLM's 512 MiB default:
vLLM's own indexer allocates its logits inside the profiled forward, the plugin's are unprofiled
(``scratch.py`` holds this much in the profile forward), and a chunk this size already holds 4096
query rows of 16K keys (1024 of 64K), enough to keep the kernels at full rate
(eval/kernel_notes.md); more rows only split into more chunks."""

MAX_WORKSPACE_BYTES = 256 * 1024**2
"""Largest bf16 latent workspace an fp8 prefill dequantizes into (1152 bytes per block-table
slot: about 233K tokens); larger batches keep FlashMLA's fp8 kernel over the cache."""

FP8_KERNEL_MAX_ROWS = 16 * 1024
"""Prefill rows per call of FlashMLA's fp8 sparse kernel (rows of a batch whose blocks do not fit
``MAX_WORKSPACE_BYTES``). The kernel takes its strides as int32 and gets the rows as one
sequence ``[1, rows, heads, 576]``, whose batch stride passes 2**31 elements from 29,128 rows at
128 heads (a 64K-row batch failed so on one H200: "Stride exceeds int32 limit: 4680327168",
``eval/results/gpu_tests_memory_h200_v034_1204b.log``). 16K rows keep every batch up to vLLM's
usual ``max_num_batched_tokens`` to one call; a larger one is done in pieces, each piece's output
(up to 16K x 128 x 1 KiB = 2 GiB) copied into the whole."""
