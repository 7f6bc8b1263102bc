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


DEFAULT_LOGITS_MB = 512
"""vLLM's own default for its indexer's logits chunk (``envs.VLLM_SPARSE_INDEXER_MAX_LOGITS_MB``)."""


def _max_logits_bytes() -> int:
    raw = os.environ.get(LOGITS_MB_ENV, "").strip()
    if not raw:
        return DEFAULT_LOGITS_MB * 1024**2
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{LOGITS_MB_ENV}={raw!r}: a positive number of MiB")
    return int(raw) * 1024**2


MAX_LOGITS_BYTES = _max_logits_bytes()
"""One chunk of fp32 indexer logits, for every indexer path (the Triton kernels and the DeepGEMM
one): ``VLLM_SPARSE_INDEXER_MAX_LOGITS_MB`` where set, else vLLM's default of 512 MiB. Until
2026-12-04 the plugin kept 256 MiB (it holds this much in vLLM's profile forward, ``scratch.py``,
so the KV cache is sized around it); one H200, vLLM 0.34, -tp 1, release-format checkpoint, bf16
KV, side by side (``eval/results/compare_h200_n1_v034_release_logits_1204f.md``): 64K TTFT
742.3 ms at 256 MiB, 726.5 ms at 512 MiB, vLLM's own 714.9 ms, for 0.5 % fewer KV-cache tokens
(28.88M -> 28.74M): a 64K prompt's rows go in 32 chunks of 2048 instead of 64 of 1024."""

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
