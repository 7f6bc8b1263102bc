"""CUDA-graph replays inside real vLLM give the eager run's greedy tokens (GPU only).

Each case runs ``eval/gpu_graph_check.py``'s configuration twice in fresh processes
(eager, then FULL_DECODE_ONLY graphs) and checks that the graph run really replayed
padded batches. Skipped without CUDA (and without enough GPUs for TP=2); the same code
ran on 2x H100 through the eval driver (eval/gpu_vllm_notes.md).
"""

from __future__ import annotations

import pytest
import torch

from gpu_graph_check import CONFIGS, compare, run_one, tiny_prompts

pytestmark = [pytest.mark.e2e, pytest.mark.gpu]

CASES = ["tp1-bf16", "tp1-bf16-chunked", "tp1-fp8-chunked", "tp1-bf16-mtp1-chunked", "tp1-fp8-mtp1-chunked",
         "tp2-rr-fp32-mtp1", "tp2-inseq-fp32-mtp1", "tp2-rr-tpdecode-fp32-mtp1"]


@pytest.mark.parametrize("name", CASES)
def test_graph_replays_equal_eager(name, tmp_path):
    tp = CONFIGS[name][0]
    if not torch.cuda.is_available() or torch.cuda.device_count() < tp:
        pytest.skip(f"needs {tp} CUDA GPU(s)")
    prompts = tiny_prompts()
    eager = run_one(name, True, tmp_path, prompts, max_tokens=16, timeout_s=300)
    graph = run_one(name, False, tmp_path, prompts, max_tokens=16, timeout_s=300)
    assert "tokens" in eager and "tokens" in graph, graph.get("error") or eager.get("error")
    assert compare(eager, graph)["equal"]
    assert graph["graph_padded_forwards"] > 0  # padded FULL-graph batches were replayed
    assert "FULL" in (graph["plugin_graph_line"] or "")  # uniform decode batches replay FULL graphs
    # rows never split: prefill / mixed batches replay breakable piecewise graphs
    if name.endswith("-chunked"):
        assert any("PIECEWISE" in mode for mode in graph["vllm_captured_modes"]), graph["vllm_captured_modes"]
        # short mixed batches (a prompt's last chunk beside decodes) replayed them, padded
        assert graph["piecewise_padded_forwards"] > 0


def test_decode_attention_tp_equals_split_decode(tmp_path):
    """decode_attention='tp' (decode / verify batches unsplit, heads split over the ranks,
    views of the replicated weights on a GPU) gives the greedy tokens of the split decode."""
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    prompts = tiny_prompts()
    split = run_one("tp2-rr-fp32-mtp1", True, tmp_path, prompts, max_tokens=16, timeout_s=300)
    heads = run_one("tp2-rr-tpdecode-fp32-mtp1", True, tmp_path, prompts, max_tokens=16, timeout_s=300)
    assert "tokens" in split and "tokens" in heads, heads.get("error") or split.get("error")
    assert compare(split, heads)["equal"]
