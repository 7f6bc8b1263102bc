"""MTP speculative decoding on vLLM's CPU engine, with and without CP."""

import pytest

from conftest import mixed_prompts, run_vllm
from make_tiny_model import build_tiny_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory):
    """Weak layer outputs + pass-through eh_proj: the random draft is often right."""
    return build_tiny_model(tmp_path_factory.mktemp("mtp") / "v32", seed=0, mtp_friendly=True)

MAX_TOKENS = 12


def _run(model, prompts, tp, cp_nsa, num_spec):
    llm = {"model": str(model), "dtype": "float32", "tensor_parallel_size": tp, "max_model_len": 2048,
           "enforce_eager": True, "max_num_batched_tokens": 128, "additional_config": {"cp_nsa": cp_nsa}}
    if num_spec:
        llm["speculative_config"] = {"method": "mtp", "num_speculative_tokens": num_spec}
    return run_vllm({"llm": llm, "prompts": prompts,
                     "sampling": {"temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True}})


@pytest.mark.parametrize("tp,cp_nsa", [
    (1, {"mode": "off"}),
    (2, {"mode": "round-robin-split"}),
    # verify and draft batches unsplit, attention heads split over the ranks
    (2, {"mode": "round-robin-split", "decode_attention": "tp"}),
], ids=["tp1-off", "tp2-rr", "tp2-rr-decode-attention-tp"])
def test_greedy_with_mtp_equals_without(mtp_model, tokenizer, tp, cp_nsa):
    prompts = mixed_prompts(tokenizer, index_topk=64)[:6]
    base = _run(mtp_model, prompts, tp, cp_nsa, 0)
    mtp = _run(mtp_model, prompts, tp, cp_nsa, 2)
    assert [o["token_ids"] for o in mtp["outputs"]] == [o["token_ids"] for o in base["outputs"]]
    stats = mtp["info"]["spec_decode"]
    # The draft really ran (verify batches of 1+2 tokens); some drafts were accepted and
    # some rejected, so both paths of the verify step ran.
    assert 0 < stats["accepted_tokens"] < stats["draft_tokens"]
    print(f"tp={tp} {cp_nsa}: acceptance {stats['accepted_tokens']}/{stats['draft_tokens']} draft tokens "
          f"({stats['drafts']} drafts); generate {mtp['generate_s']:.1f}s with MTP vs {base['generate_s']:.1f}s")
