"""MTP speculative decoding on vLLM's CPU engine, with and without CP, against HF
transformers' greedy tokens."""

import pytest

from conftest import SPLIT_EVERY_BATCH, mixed_prompts, run_vllm
from hf_oracle import greedy_generate, load_hf_model, yarn_original_context
from make_tiny_model import build_tiny_model

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def mtp_model(tmp_path_factory):
    """Weak layer outputs + pass-through eh_proj: the random draft is often right."""
    return build_tiny_model(tmp_path_factory.mktemp("mtp") / "v32", seed=0, mtp_friendly=True)

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def prompts(tokenizer, mtp_model):
    prompts = mixed_prompts(tokenizer, index_topk=64)[:6]
    assert max(len(p) for p in prompts) > 4 * yarn_original_context(mtp_model)  # YaRN's range
    return prompts


@pytest.fixture(scope="module")
def hf_tokens(mtp_model, prompts):
    """HF transformers' greedy tokens (the main model; HF has no MTP layer)."""
    hf = load_hf_model(mtp_model)
    return [greedy_generate(hf, p, MAX_TOKENS) for p in prompts]


def _run(model, prompts, tp, cp_nsa, num_spec):
    llm = {"model": str(model), "dtype": "float32", "tensor_parallel_size": tp, "max_model_len": 2048,
           "enforce_eager": True, "max_num_batched_tokens": 128, "additional_config": {"cp_nsa": cp_nsa}}
    if num_spec:
        llm["speculative_config"] = {"method": "mtp", "num_speculative_tokens": num_spec}
    return run_vllm({"llm": llm, "prompts": prompts,
                     "sampling": {"temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True}})


_DRAFT_STATS: dict[str, dict] = {}
"""Spec-decode counters of each configuration run so far in this module (by test id)."""


@pytest.mark.parametrize("tp,cp_nsa", [
    (1, {"mode": "off"}),
    (2, {"mode": "round-robin-split", **SPLIT_EVERY_BATCH}),
    # verify and draft batches unsplit, attention heads split over the ranks
    (2, {"mode": "round-robin-split", **SPLIT_EVERY_BATCH, "decode_attention": "tp"}),
], ids=["tp1-off", "tp2-rr", "tp2-rr-decode-attention-tp"])
def test_greedy_with_mtp_equals_without_and_hf(mtp_model, prompts, hf_tokens, tp, cp_nsa, request):
    """With MTP, every configuration gives HF's greedy tokens, which are what the engine gives
    without MTP (the tp1-off run here; the CP modes without MTP equal off and HF in
    test_cp_modes, so their runs without MTP are not repeated: two engine starts of CI time)."""
    mtp = _run(mtp_model, prompts, tp, cp_nsa, 2)
    if tp == 1:
        base = _run(mtp_model, prompts, tp, cp_nsa, 0)
        assert [o["token_ids"] for o in base["outputs"]] == hf_tokens
    assert [o["token_ids"] for o in mtp["outputs"]] == hf_tokens
    stats = mtp["info"]["spec_decode"]
    # The draft really ran (verify batches of 1+2 tokens); some drafts were accepted and
    # some rejected, so both paths of the verify step ran.
    assert 0 < stats["accepted_tokens"] < stats["draft_tokens"]
    # Greedy tokens come out right whatever the draft proposes (the verify step checks every
    # draft); the draft itself shows in what got accepted. Split the draft's rows (its
    # embeddings, the target's hidden states, positions) wrongly and the acceptance moves
    # away from the unsplit draft's (tp1-off runs first in this module).
    _DRAFT_STATS[request.node.callspec.id] = stats
    if tp > 1 and "tp1-off" in _DRAFT_STATS:
        assert stats == _DRAFT_STATS["tp1-off"], (stats, _DRAFT_STATS["tp1-off"])
    print(f"tp={tp} {cp_nsa}: acceptance {stats['accepted_tokens']}/{stats['draft_tokens']} draft tokens "
          f"({stats['drafts']} drafts); generate {mtp['generate_s']:.1f}s with MTP")


def test_greedy_with_mtp_under_in_seq_split_equals_hf(mtp_model, prompts, hf_tokens):
    """in-seq-split with MTP against HF alone (one engine run: in-seq-split without MTP
    is test_cp_modes', which equals off and HF)."""
    mtp = _run(mtp_model, prompts, 2, {"mode": "in-seq-split", **SPLIT_EVERY_BATCH}, 2)
    assert [o["token_ids"] for o in mtp["outputs"]] == hf_tokens
    stats = mtp["info"]["spec_decode"]
    assert 0 < stats["accepted_tokens"] < stats["draft_tokens"]
