"""Issue 21 item 0: the automatic per-batch choice between the CP split and head-split TP
attention, resolved once at startup per N and KV dtype (``split_policy``)."""

import pytest

from vllm_cp_nsa.nsa_attention import build_forward_metadata
from vllm_cp_nsa.split_plan import RoundRobinSplit
from vllm_cp_nsa.split_policy import AttentionSplitPolicy, kv_kind, resolve_split_policy

import torch


@pytest.mark.parametrize("n, dtype, split_decode, min_tokens", [
    (2, "auto", False, 2048),       # bf16 cache: tp decode, RR loses at 1K (ttft_n2_h200)
    (2, "fp8_ds_mla", False, 2048),  # N=2 fp8 split decode +18 %
    (4, "bfloat16", True, 1024),    # N=4 bf16 split decode -21 %
    (4, "fp8", False, 1024),        # N=4 fp8 split decode +12 %
    (8, "auto", False, 2048),       # unmeasured: conservative
    (8, "fp8_ds_mla", False, 2048),
])
def test_auto_thresholds_per_n_and_dtype(n, dtype, split_decode, min_tokens):
    p = resolve_split_policy("auto", "auto", n, dtype)
    assert (p.split_decode, p.min_tokens_for_cp, p.decode_min_tokens, p.heads_split) == (
        split_decode, min_tokens, 0, True)
    assert f"N={n} {kv_kind(dtype)}" in p.reason
    assert str(min_tokens) in p.describe()


def test_explicit_values_are_honoured():
    p = resolve_split_policy("split", 0, 2, "fp8")
    assert (p.split_decode, p.min_tokens_for_cp, p.heads_split) == (True, 0, False)
    assert "N=2" not in p.reason and "(user)" in p.reason
    p = resolve_split_policy("tp", "auto", 4, "auto")
    assert (p.split_decode, p.min_tokens_for_cp, p.heads_split) == (False, 1024, True)
    p = resolve_split_policy("auto", 300, 4, "auto")
    assert (p.split_decode, p.min_tokens_for_cp, p.decode_min_tokens) == (True, 300, 300) and "min_tokens_for_cp=300 (user)" in p.reason


def test_auto_falls_back_to_split_where_heads_cannot_be_sliced():
    p = resolve_split_policy("auto", "auto", 2, "fp8", heads_split_blocker="o_proj is Fp8LinearMethod")
    assert p.split_decode and not p.heads_split
    assert "falls back to split: o_proj is Fp8LinearMethod" in p.describe()
    # Where auto would split anyway, no fallback is reported.
    p = resolve_split_policy("auto", "auto", 4, "auto", heads_split_blocker="x")
    assert p.split_decode and not p.heads_split and "falls back" not in p.reason


def test_mode_off_keeps_all_heads_unless_tp_is_asked():
    """mode: off splits no rows: auto has nothing to choose, every rank keeps all heads (as
    mode off always ran); an explicit tp still splits the heads of its unsplit batches."""
    p = resolve_split_policy("auto", "auto", 4, "auto", cp_on=False)
    assert (p.split_decode, p.min_tokens_for_cp, p.heads_split) == (True, 0, False) and "mode=off" in p.reason
    p = resolve_split_policy("tp", "auto", 2, "auto", cp_on=False)
    assert (p.split_decode, p.heads_split) == (False, True)


def test_startup_text_counts_the_ranks_bound():
    """Batches with fewer real tokens than ranks never split: the text gives the larger bound."""
    assert "< 4 real tokens" in resolve_split_policy("split", 0, 4, "auto").describe(4)
    assert "< 1024 real tokens" in resolve_split_policy("auto", "auto", 4, "auto").describe(4)


def test_one_rank_and_bad_values():
    assert resolve_split_policy("auto", "auto", 1, "auto") == AttentionSplitPolicy(True, 0, 0, False, "one rank: nothing to split")
    for bad in (-1, True, "8", 1.5):
        with pytest.raises(ValueError, match="min_tokens_for_cp"):
            resolve_split_policy("auto", bad, 2, "auto")
    with pytest.raises(ValueError, match="decode_attention"):
        resolve_split_policy("heads", "auto", 2, "auto")


@pytest.mark.parametrize("n, dtype", [(2, "auto"), (4, "auto"), (4, "fp8")])
@pytest.mark.parametrize("query_lens", [[1] * 8, [2] * 4, [100, 1, 1], [900], [1500, 1, 1], [3000], [1024]])
def test_per_batch_choice_matches_the_plan(n, dtype, query_lens):
    """The policy's rule is the one ``build_forward_metadata`` applies to its numbers:
    below the threshold / pure decode under tp -> unsplit plan, else split."""
    p = resolve_split_policy("auto", "auto", n, dtype)
    total = sum(query_lens)
    max_decode = 2
    is_decode = max(query_lens) <= max_decode
    md = build_forward_metadata(
        query_lens, torch.arange(total), torch.zeros(len(query_lens), 64, dtype=torch.long), 64,
        n, 0, RoundRobinSplit(), p.min_tokens_for_cp, max_decode, "cpu", split_decode=p.split_decode,
        decode_min_tokens=p.decode_min_tokens)
    assert md.plan.is_split == p.splits(total, is_decode, n), (query_lens, p)
    if is_decode:
        assert md.plan.is_split == p.split_decode
    elif total < p.min_tokens_for_cp:
        assert not md.plan.is_split
