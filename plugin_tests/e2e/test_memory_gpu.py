"""vLLM's memory profile sees the attention scratch (GPU only, one GPU).

The profile forward skips the attention (no metadata, no cache yet), so the plugin holds the
scratch the largest batch needs for a moment there (vllm_cp_nsa/scratch.py); the KV cache is
then sized around it. Here DeepSeek-V3.2's real per-token dimensions (128 heads, 64 indexer
heads, top-2048; 2 layers) run at ``gpu_memory_utilization`` 0.92 with a prompt of
``max_model_len`` tokens prefilled in one chunk beside a full batch of shorter requests:
without the reservation the attention of that chunk needs about 19 GiB vLLM never budgeted
(absorbed query, output and indexer buffers of 64K rows), past the 8 % (11 GiB) vLLM leaves
free.

    (device) TEST_PATHS=plugin_tests/e2e/test_memory_gpu.py bash eval/gpu_tests.sh
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import run_vllm
from make_tiny_model import build_tiny_model

from vllm_cp_nsa.scratch import AttentionShape, BatchBounds, IndexerLimits, attention_scratch_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.gpu]

MAX_MODEL_LEN = 65536
MAX_BATCHED_TOKENS = 65536  # the longest prompt prefills in one chunk: the largest scratch
MAX_NUM_SEQS = 32
MAX_TOKENS = 8
MIB = 1024**2


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "auto"])
def test_longest_prompt_and_largest_batch_fit_at_092(kv_cache_dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = build_tiny_model("/tmp/tiny_v32_real_2l", real_dims=True, num_layers=2, num_nextn_predict_layers=0,
                             device="cuda")
    # ids inside the built model's vocabulary (vLLM refuses others before any forward runs)
    vocab_size = json.loads((model / "config.json").read_text())["vocab_size"]
    gen = torch.Generator().manual_seed(0)
    longest = torch.randint(5, vocab_size, (MAX_MODEL_LEN - MAX_TOKENS,), generator=gen).tolist()
    others = [torch.randint(5, vocab_size, (2048,), generator=gen).tolist() for _ in range(MAX_NUM_SEQS - 1)]
    result = run_vllm({
        "llm": {"model": str(model), "dtype": "bfloat16", "max_model_len": MAX_MODEL_LEN,
                "max_num_batched_tokens": MAX_BATCHED_TOKENS, "max_num_seqs": MAX_NUM_SEQS,
                "gpu_memory_utilization": 0.92, "kv_cache_dtype": kv_cache_dtype, "seed": 0,
                "additional_config": {"cp_nsa": {"mode": "off"}}},
        "prompts": [longest, *others],
        "sampling": {"temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True},
    }, timeout=560, VLLM_LOGGING_LEVEL="DEBUG")
    assert [len(o["token_ids"]) for o in result["outputs"]] == [MAX_TOKENS] * MAX_NUM_SEQS
    # vLLM's profile saw at least the scratch the plugin reserved for one layer
    scratch = attention_scratch_bytes(
        BatchBounds(MAX_BATCHED_TOKENS, MAX_NUM_SEQS, MAX_MODEL_LEN, 64),
        AttentionShape(num_heads=128, v_head_dim=128, index_heads=64, topk=2048, dtype_bytes=2,
                       fp8_latent_cache=kv_cache_dtype == "fp8"),
        IndexerLimits(256 * MIB, 0, 256 * MIB),
    )
    peak = re.search(r"torch peak memory increase: ([0-9.]+)GiB", result["log"])
    assert peak, "vLLM's memory profile line (DEBUG) is missing"
    print(f"kv={kv_cache_dtype}: profile torch peak increase {peak.group(1)} GiB, attention scratch "
          f"{scratch / 1024**3:.2f} GiB; " + "; ".join(re.findall(r"GPU KV cache size: [^\n]*", result["log"])[:1]))
    assert float(peak.group(1)) * 1024**3 >= scratch * 0.99
