"""eval/gpu_compare.py's SGLang runs (issue 21, item 1): the same engine settings as the vLLM
runs, SGLang's results read the way the vLLM phases read theirs, SGLang's own stack on the path.
SGLang itself only runs on the GPU hosts (a CUDA torch 2.14.1 stack)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

import gpu_compare  # noqa: E402


def _args(**overrides):
    base = dict(n=4, max_num_batched_tokens=16384, gpu_memory_utilization=0.85, eager=False, cpu_dry_run=False,
                plugin_path=None, sglang_path="/tmp/ssite")
    return argparse.Namespace(**{**base, **overrides})


@pytest.mark.parametrize("kv_dtype,mtp", [("auto", False), ("fp8", True)])
def test_engine_arguments_follow_the_vllm_runs(kv_dtype, mtp):
    config = gpu_compare.CONFIGS["sglang-cp"]
    llm = gpu_compare.llm_kwargs(config, _args(), Path("/m"), kv_dtype, mtp, 66560)
    kwargs = gpu_compare.sglang_engine_kwargs(llm, config)
    assert kwargs["model_path"] == "/m" and kwargs["tp_size"] == 4 and kwargs["context_length"] == 66560
    assert kwargs["chunked_prefill_size"] == 16384 and kwargs["max_running_requests"] == llm["max_num_seqs"]
    assert kwargs["disable_radix_cache"] is True and kwargs["mem_fraction_static"] == 0.85
    assert kwargs["kv_cache_dtype"] == ("fp8_e4m3" if kv_dtype == "fp8" else "auto")
    assert kwargs["enable_prefill_cp"] is True and kwargs["cp_strategy"] == "interleave"
    assert kwargs["disable_cuda_graph"] is False and kwargs["skip_tokenizer_init"] is True
    assert ("speculative_algorithm" in kwargs) == mtp
    if mtp:
        assert kwargs["speculative_num_steps"] == 1 and kwargs["speculative_num_draft_tokens"] == 2
    tp = gpu_compare.sglang_engine_kwargs(llm, gpu_compare.CONFIGS["sglang-tp"])
    assert "enable_prefill_cp" not in tp


def test_results_read_like_vllm_request_outputs():
    prompt = [5, 6, 7]
    out = {"output_ids": [9, 10], "meta_info": {"input_token_logprobs": [(None, 5, None), (-1.5, 6, None),
                                                                         (-0.25, 7, None)]}}
    done = gpu_compare._Completion(prompt, out)
    assert list(done.outputs[0].token_ids) == [9, 10]
    # what Worker.phase_agreement computes from it
    got = [None if entry is None else entry[token].logprob
           for entry, token in zip(done.prompt_logprobs, done.prompt_token_ids)]
    assert got == [None, -1.5, -0.25]
    assert gpu_compare._Completion(prompt, {"output_ids": [1]}).prompt_logprobs is None


def test_sglang_runs_get_sglangs_stack_not_vllms(monkeypatch):
    monkeypatch.setenv("VSITE", "/tmp/vsite")
    env = {"PYTHONPATH": "/tmp/vsite:/tmp/vsite/nvidia_cutlass_dsl/dsl_packages:/x", "VLLM_PLUGINS": ""}
    got = gpu_compare.sglang_env(env, _args())
    assert got["PYTHONPATH"].split(":") == ["/tmp/ssite", "/x"]
    assert "VLLM_PLUGINS" not in got
    with pytest.raises(SystemExit, match="--sglang-path"):
        gpu_compare.sglang_env(env, _args(sglang_path=None))
