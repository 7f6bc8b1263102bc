"""Split plans (``vllm_cp_nsa.split_plan``): properties every plan keeps, for both modes.

The all-gather is simulated on one process: build the plan of every rank, stack
their ``take_local`` outputs rank-major (what ``all_gather_into_tensor`` yields)
and restore token order. DESIGN.md §2 / §4, sglang_nsa_cp.md §1.2-1.3.

Run: .venv/bin/python -m pytest plugin_tests/unit/test_split_plan.py -q
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_cp_nsa.nsa_attention import build_forward_metadata
from vllm_cp_nsa.split_plan import (
    PADDING,
    InSeqSplit,
    RoundRobinSplit,
    build_split_plan,
    split_skip_reason,
)

CP_SIZES = (2, 3, 4, 8)
STRATEGIES = {"round-robin-split": RoundRobinSplit(), "in-seq-split": InSeqSplit()}


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Thousands of tiny tensor ops: intra-op threads only add sync overhead (10x
    slower on a loaded 2-core host). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- helpers
def _token_tensor(num_tokens: int) -> torch.Tensor:
    """[T, 2] int64, every entry non-zero and every row distinct (so zero-fill and
    any permutation are visible)."""
    t = torch.arange(1, num_tokens + 1, dtype=torch.long)
    return torch.stack([t, -3 * t], dim=1)


def _expected_in_seq(query_lens, cp_size: int) -> list[torch.Tensor]:
    """Zigzag spec (SGLang PR #12065, per request): 2·N contiguous chunks, the first
    ``L % 2N`` one token longer; rank r owns chunk r then chunk 2N-1-r."""
    segments = 2 * cp_size
    owned: list[list[torch.Tensor]] = [[] for _ in range(cp_size)]
    offset = 0
    for length in query_lens:
        sizes = [length // segments + (1 if i < length % segments else 0) for i in range(segments)]
        bounds = [offset + b for b in itertools.accumulate([0, *sizes])]
        for rank in range(cp_size):
            for i in (rank, segments - 1 - rank):
                owned[rank].append(torch.arange(bounds[i], bounds[i + 1]))
        offset += length
    return [torch.cat(parts) for parts in owned]


def _runs(tokens: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers as (start, length)."""
    runs: list[tuple[int, int]] = []
    for t in tokens:
        if runs and runs[-1][0] + runs[-1][1] == t:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((t, 1))
    return runs


def check_batch(query_lens: list[int], cp_size: int, mode: str, min_tokens_for_cp: int = 0) -> None:
    """Every invariant of the plans of all ranks for one batch."""
    strategy = STRATEGIES[mode]
    num_tokens = sum(query_lens)
    plans = [build_split_plan(query_lens, cp_size, r, strategy, min_tokens_for_cp) for r in range(cp_size)]
    x = _token_tensor(num_tokens)

    # The split / no-split decision is a function of the batch alone: identical on all ranks.
    reasons = {p.skip_reason for p in plans}
    assert len(reasons) == 1, f"ranks disagree on the split decision: {reasons}"
    assert {p.is_split for p in plans} == {plans[0].is_split}
    reason = split_skip_reason(strategy, num_tokens, cp_size, min_tokens_for_cp)
    assert plans[0].skip_reason == reason
    must_split = num_tokens >= cp_size and num_tokens >= min_tokens_for_cp
    assert plans[0].is_split == must_split, (query_lens, cp_size, min_tokens_for_cp, reason)

    for rank, plan in enumerate(plans):
        assert plan.cp_rank == rank and plan.cp_size == cp_size and plan.num_tokens == num_tokens

    if not must_split:
        # Unsplit: every rank holds every token, in order; nothing to gather.
        for plan in plans:
            assert plan.strategy == "off"
            assert plan.rows_per_rank == num_tokens == plan.padded_num_tokens
            assert torch.equal(plan.local_token_idx, torch.arange(num_tokens))
            assert not bool(plan.local_padding_mask.any())
            assert torch.equal(plan.take_local(x), x)
            assert torch.equal(plan.restore_token_order(x), x)
        return

    # rows_per_rank is equal on all ranks (plain all-gather / reduce-scatter need it).
    rows = plans[0].rows_per_rank
    assert all(p.rows_per_rank == rows for p in plans)
    assert all(p.local_token_idx.shape == (rows,) and p.local_token_idx.dtype == torch.long for p in plans)
    assert all(p.padded_num_tokens == rows * cp_size >= num_tokens for p in plans)
    assert all(p.strategy == mode and p.interleaved == strategy.interleaved for p in plans)

    # Each real token on exactly one rank.
    all_idx = torch.cat([p.local_token_idx for p in plans])
    assert bool((all_idx >= PADDING).all())
    real = all_idx[all_idx >= 0]
    assert torch.equal(real.sort().values, torch.arange(num_tokens)), "tokens lost or duplicated"

    counts = []
    pieces = []
    for rank, plan in enumerate(plans):
        idx = plan.local_token_idx
        pad = idx == PADDING
        # Padding rows are exactly the -1 entries, and they are the trailing rows.
        assert torch.equal(plan.local_padding_mask, pad)
        n_real = int((~pad).sum())
        assert not bool(pad[:n_real].any()) and bool(pad[n_real:].all()), f"rank {rank}: padding not trailing"
        counts.append(n_real)
        local = plan.take_local(x)
        assert local.shape == (rows, 2)
        assert bool((local[pad] == 0).all()), f"rank {rank}: padding rows not zero-filled"
        assert torch.equal(local[~pad], x[idx[~pad]])
        pieces.append(local)
    # No more padding than needed: the fullest rank has none.
    assert max(counts) == rows

    # Split then (rank-major) gather is the identity, whichever rank restores.
    gathered = torch.cat(pieces)
    for plan in plans:
        assert torch.equal(plan.restore_token_order(gathered), x)
    # ...also for trailing feature dims of any rank (the latent is [T, 576], MoE rows [T, H]).
    y = x.double()[:, :, None] * torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    gathered_y = torch.cat([p.take_local(y) for p in plans])
    assert torch.equal(plans[-1].restore_token_order(gathered_y), y)

    if mode == "round-robin-split":
        assert max(counts) - min(counts) <= 1
        assert rows == math.ceil(num_tokens / cp_size)
        for rank, plan in enumerate(plans):
            mine = plan.local_token_idx[: counts[rank]]
            assert torch.equal(mine, torch.arange(rank, num_tokens, cp_size)), f"rank {rank}"
            assert plan.token_to_gathered_row is None
    else:
        expected = _expected_in_seq(query_lens, cp_size)
        for rank, plan in enumerate(plans):
            assert torch.equal(plan.local_token_idx[: counts[rank]], expected[rank]), f"rank {rank}"
        if len(query_lens) == 1:
            # Single request: rank r holds at most two contiguous runs, chunk r first,
            # and chunk r lies before chunk 2N-1-r in the sequence.
            for rank, plan in enumerate(plans):
                runs = _runs(plan.local_token_idx[: counts[rank]].tolist())
                assert 1 <= len(runs) <= 2 or counts[rank] == 0, (rank, runs)
                if len(runs) == 2:
                    assert runs[0][0] < runs[1][0]


def random_batch(rng: random.Random) -> list[int]:
    """1-64 requests, mixing 1-token decodes and prefill chunks of 1-5000 tokens
    (log-uniform, so short chunks and long prefills both show up)."""
    num_reqs = rng.randint(1, 64)
    decode_share = rng.choice([0.0, 0.3, 0.7, 1.0])
    lens = []
    for _ in range(num_reqs):
        if rng.random() < decode_share:
            lens.append(1)
        else:
            lens.append(min(5000, max(1, int(math.exp(rng.uniform(0, math.log(5000)))))))
    if rng.random() < 0.1:  # a few batches of exactly one long request
        lens = [rng.randint(1, 5000)]
    return lens


# --------------------------------------------------------------------------- properties
@pytest.mark.parametrize("cp_size", CP_SIZES)
def test_random_batches_seeded(cp_size: int) -> None:
    """Thousands of random batches (both modes per batch), seeded."""
    rng = random.Random(1000 + cp_size)
    for _ in range(500):
        lens = random_batch(rng)
        for mode in STRATEGIES:
            check_batch(lens, cp_size, mode)


@pytest.mark.parametrize("cp_size", CP_SIZES)
def test_small_batches_exhaustive(cp_size: int) -> None:
    """Every composition of up to 2 requests of length 1..2N+1 (3 requests: 1..N+1): the corner cases
    (T < N, T just above N, requests shorter than N, T mod N != 0) all appear."""
    for num_reqs in (1, 2, 3):
        lengths = range(1, (2 * cp_size if num_reqs < 3 else cp_size) + 2)
        for lens in itertools.product(lengths, repeat=num_reqs):
            for mode in STRATEGIES:
                check_batch(list(lens), cp_size, mode)


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    query_lens=st.lists(
        st.one_of(st.just(1), st.integers(1, 5000), st.integers(1, 40)), min_size=1, max_size=64
    ),
    cp_size=st.sampled_from(CP_SIZES),
    mode=st.sampled_from(sorted(STRATEGIES)),
    min_tokens=st.one_of(st.just(0), st.integers(0, 400)),
)
def test_split_properties_hypothesis(query_lens, cp_size, mode, min_tokens) -> None:
    check_batch(query_lens, cp_size, mode, min_tokens)


@pytest.mark.parametrize("mode", sorted(STRATEGIES))
@pytest.mark.parametrize("cp_size", CP_SIZES)
def test_fewer_tokens_than_ranks_and_min_tokens(cp_size: int, mode: str) -> None:
    strategy = STRATEGIES[mode]
    # Fewer real tokens than ranks -> unsplit, on every rank, whatever the batch shape.
    for lens in ([1], [1] * (cp_size - 1), [cp_size - 1]):
        for rank in range(cp_size):
            plan = build_split_plan(lens, cp_size, rank, strategy)
            assert not plan.is_split and plan.skip_reason and "ranks" in plan.skip_reason
    # Exactly N tokens -> split.
    assert all(build_split_plan([1] * cp_size, cp_size, r, strategy).is_split for r in range(cp_size))
    # min_tokens_for_cp: unsplit strictly below, split at the threshold.
    for threshold in (cp_size + 1, 17, 256):
        below, at = [threshold - 1], [threshold]
        for rank in range(cp_size):
            plan = build_split_plan(below, cp_size, rank, strategy, min_tokens_for_cp=threshold)
            assert not plan.is_split and "min_tokens_for_cp" in plan.skip_reason
            assert build_split_plan(at, cp_size, rank, strategy, min_tokens_for_cp=threshold).is_split
    # No strategy (mode off) and a single rank never split.
    assert build_split_plan([100], cp_size, 0, None).skip_reason == "mode off"
    assert not build_split_plan([100], 1, 0, strategy).is_split


def test_split_skip_reason_depends_only_on_batch() -> None:
    """The decision never looks at the rank, nor at how tokens are spread over
    requests: only (strategy, T, N, min_tokens_for_cp)."""
    rng = random.Random(7)
    for _ in range(500):
        cp_size = rng.choice(CP_SIZES)
        min_tokens = rng.choice([0, 0, rng.randint(0, 100)])
        lens = [rng.randint(1, 12) for _ in range(rng.randint(1, 6))]
        shuffled = lens[:]
        rng.shuffle(shuffled)
        for strategy in STRATEGIES.values():
            decisions = {
                build_split_plan(q, cp_size, r, strategy, min_tokens).skip_reason
                for q in (lens, shuffled, [sum(lens)])
                for r in range(cp_size)
            }
            assert len(decisions) == 1, (lens, cp_size, min_tokens, decisions)


# --------------------------------------------------------------------------- worked examples
def test_sglang_round_robin_worked_example() -> None:
    """sglang_nsa_cp.md §1.3: cp=4, extend lengths [5, 3, 6] (T=14, Tp=16)."""
    lens, cp = [5, 3, 6], 4
    expected_idx = [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, PADDING], [3, 7, 11, PADDING]]
    expected_per_seq = [[2, 0, 2], [1, 1, 2], [1, 1, 1], [1, 1, 1]]
    slot_mapping = torch.arange(14)
    block_table = torch.zeros(3, 1, dtype=torch.int32)
    for rank in range(cp):
        plan = build_split_plan(lens, cp, rank, RoundRobinSplit())
        assert plan.is_split and plan.rows_per_rank == 4 and plan.padded_num_tokens == 16
        assert plan.local_token_idx.tolist() == expected_idx[rank]
        assert plan.local_padding_mask.tolist() == [i == PADDING for i in expected_idx[rank]]
        # The per-row request of the attention metadata gives SGLang's per-seq counts.
        meta = build_forward_metadata(lens, slot_mapping, block_table, 16, cp, rank, RoundRobinSplit(), 0, 1, "cpu")
        local_req = meta.local_req
        assert local_req.shape == (4,)
        assert [int((local_req == b).sum()) for b in range(3)] == expected_per_seq[rank]
        assert int((local_req == -1).sum()) == expected_idx[rank].count(PADDING)


def test_in_seq_worked_example_single_request() -> None:
    """sglang_nsa_cp.md §1.2: T=37, cp=4 -> 8 segments [5,5,5,5,5,4,4,4]."""
    plans = [build_split_plan([37], 4, r, InSeqSplit()) for r in range(4)]
    bounds = [0, 5, 10, 15, 20, 25, 29, 33, 37]
    seg = lambda i: list(range(bounds[i], bounds[i + 1]))  # noqa: E731
    for r, plan in enumerate(plans):
        real = plan.local_token_idx[plan.local_token_idx >= 0].tolist()
        assert real == seg(r) + seg(7 - r)
    assert plans[0].rows_per_rank == 10  # 5 + 5 on rank 0, 5 + 4 elsewhere
    x = _token_tensor(37)
    assert torch.equal(plans[2].restore_token_order(torch.cat([p.take_local(x) for p in plans])), x)


# --------------------------------------------------------------------------- bad strategies
class _BadStrategy:
    interleaved = False

    def __init__(self, name, fn):
        self.name = name
        self._fn = fn

    def assign_tokens(self, query_lens, cp_size):
        return self._fn(int(sum(query_lens)), cp_size)


def _rr(total, cp):
    return [torch.arange(r, total, cp) for r in range(cp)]


NON_PARTITIONS = {
    "duplicate-token": lambda T, n: [torch.cat([t, torch.tensor([0])]) if r == n - 1 else t for r, t in enumerate(_rr(T, n))],
    "missing-token": lambda T, n: [t[t != T - 1] for t in _rr(T, n)],
    "everything-on-rank-0": lambda T, n: [torch.arange(T)] * n,
    "out-of-range-token": lambda T, n: [torch.where(t == T - 1, T, t) for t in _rr(T, n)],
    "too-few-ranks": lambda T, n: _rr(T, n)[:-1],
    "too-many-ranks": lambda T, n: _rr(T, n) + [torch.empty(0, dtype=torch.long)],
}


@pytest.mark.parametrize("bad", sorted(NON_PARTITIONS))
def test_non_partitioning_strategy_rejected(bad: str) -> None:
    name = f"broken-{bad}"
    strategy = _BadStrategy(name, NON_PARTITIONS[bad])
    for rank in range(3):
        with pytest.raises(ValueError) as excinfo:
            build_split_plan([7, 1, 5], 3, rank, strategy)
        assert name in str(excinfo.value), f"error does not name the strategy: {excinfo.value}"


def test_partitioning_custom_strategy_accepted() -> None:
    """Control for the rejection test: a valid non-built-in partition is accepted."""
    strategy = _BadStrategy("reverse-contiguous", lambda T, n: [torch.arange(T).flip(0)[r::n].flip(0) for r in range(n)])
    plans = [build_split_plan([7, 1, 5], 3, r, strategy) for r in range(3)]
    x = _token_tensor(13)
    assert torch.equal(plans[0].restore_token_order(torch.cat([p.take_local(x) for p in plans])), x)


def test_negative_token_index_rejected_clearly() -> None:
    strategy = _BadStrategy("pads-with-minus-one", lambda T, n: [torch.cat([t, torch.tensor([PADDING])]) for t in _rr(T, n)])
    with pytest.raises(ValueError, match="pads-with-minus-one"):
        build_split_plan([7, 1, 5], 3, 0, strategy)


def test_false_interleaved_claim_rejected() -> None:
    class ContiguousClaimsInterleaved:
        name = "contiguous-but-claims-interleaved"
        interleaved = True

        def assign_tokens(self, query_lens, cp_size):
            return list(torch.arange(int(sum(query_lens))).chunk(cp_size))

    strategy = ContiguousClaimsInterleaved()
    x = _token_tensor(12)
    try:
        plans = [build_split_plan([12], 3, r, strategy) for r in range(3)]
    except ValueError:
        return  # rejected up front: fine
    restored = plans[0].restore_token_order(torch.cat([p.take_local(x) for p in plans]))
    assert torch.equal(restored, x)
