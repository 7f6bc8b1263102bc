"""The plugin inside vLLM against HF transformers' deepseek_v32 (independent oracle)."""

import json

import pytest

from conftest import mixed_prompts, run_vllm
from hf_oracle import greedy_generate, load_hf_model, prompt_logprobs, yarn_original_context

pytestmark = pytest.mark.e2e

MAX_TOKENS = 12


def test_prompt_logprobs_and_greedy_tokens_match_hf(tiny_model, tokenizer):
    prompts = mixed_prompts(tokenizer, index_topk=64)
    # YaRN: the longer prompts run well past the original context
    assert max(len(p) for p in prompts) > 4 * yarn_original_context(tiny_model)
    result = run_vllm({
        "llm": {"model": str(tiny_model), "dtype": "float32", "max_model_len": 2048, "enforce_eager": True},
        "prompts": prompts,
        "sampling": {"temperature": 0.0, "max_tokens": MAX_TOKENS, "prompt_logprobs": 0, "ignore_eos": True},
    })
    assert result["info"]["model_class"].startswith("vllm_cp_nsa.adapter.model.")
    hf = load_hf_model(tiny_model)
    worst = 0.0
    for prompt, out in zip(prompts, result["outputs"]):
        expected = prompt_logprobs(hf, prompt)
        got = out["prompt_logprobs"]
        assert got[0] is None and len(got) == len(expected)
        for g, e in zip(got[1:], expected[1:]):
            worst = max(worst, abs(g - e) / max(abs(e), 1e-6))
        assert out["token_ids"] == greedy_generate(hf, prompt, MAX_TOKENS), f"prompt of {len(prompt)} tokens"
    print(f"prompt lengths {[len(p) for p in prompts]}; max relative prompt-logprob error {worst:.2e}; "
          f"vLLM init {result['init_s']:.1f}s generate {result['generate_s']:.1f}s")
    assert worst <= 1e-4


def test_whole_short_prompts_take_the_dense_prefill_and_match_hf(tiny_model, tokenizer, tmp_path):
    """A batch of prompts all within index_topk and nothing cached: the plugin's dense MHA
    prefill (no indexer, no sparse kernel) must give HF's prompt logprobs and greedy tokens;
    the plan trace shows the batch was taken as whole prompts."""
    prompts = [p for p in mixed_prompts(tokenizer, index_topk=64) if len(p) < 64]
    assert len(prompts) >= 3
    trace = tmp_path / "plans"
    result = run_vllm({
        "llm": {"model": str(tiny_model), "dtype": "float32", "max_model_len": 512, "enforce_eager": True},
        "prompts": prompts,
        "sampling": {"temperature": 0.0, "max_tokens": MAX_TOKENS, "prompt_logprobs": 0, "ignore_eos": True},
    }, CP_NSA_TRACE_PLANS=str(trace))
    records = [json.loads(line) for line in open(f"{trace}.rank0")]
    prefills = [r for r in records if not r["decode_kernel"]]
    assert prefills and all(r["whole_prompts"] and r["max_seq_len"] < 64 for r in prefills), prefills
    hf = load_hf_model(tiny_model)
    worst = 0.0
    for prompt, out in zip(prompts, result["outputs"]):
        expected = prompt_logprobs(hf, prompt)
        for g, e in zip(out["prompt_logprobs"][1:], expected[1:]):
            worst = max(worst, abs(g - e) / max(abs(e), 1e-6))
        assert out["token_ids"] == greedy_generate(hf, prompt, MAX_TOKENS), f"prompt of {len(prompt)} tokens"
    assert worst <= 1e-4, worst
