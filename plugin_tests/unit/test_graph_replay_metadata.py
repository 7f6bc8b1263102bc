"""FULL CUDA-graph batches: the metadata of a padded replay has the layout captured
for its size, at the captured addresses, and marks the padding as padding.

A graph replays the kernels captured for a size S with the shapes and buffer
addresses of the capture batch (S / (1+k) requests of 1+k tokens, all real). vLLM
hands the builder a padded replay batch as its real requests, requests with no
tokens, ``num_actual_tokens = S`` and slot -1 for the padding tokens.
"""

from __future__ import annotations

import pytest
import torch

from vllm_cp_nsa.graph_sizing import cp_capture_sizes
from vllm_cp_nsa.nsa_attention import MetadataBuffers, build_forward_metadata
from vllm_cp_nsa.split_plan import InSeqSplit, RoundRobinSplit

BLOCK_SIZE = 16
STRATEGIES = {"round-robin": RoundRobinSplit(), "in-seq": InSeqSplit(), "off": None}


def _metadata(query_lens, num_reqs_padded, num_input_tokens, cp, rank, strategy, k, buffers,
              min_tokens_for_cp=0):
    """Builder inputs the way vLLM's runner lays them out for a FULL graph."""
    num_real = sum(query_lens)
    lens = list(query_lens) + [0] * (num_reqs_padded - len(query_lens))
    slots = torch.full((num_input_tokens,), -1, dtype=torch.int64)
    slots[:num_real] = torch.randperm(4096)[:num_real] + BLOCK_SIZE  # block 0 is vLLM's null block
    block_table = torch.randint(1, 300, (num_reqs_padded, 8), dtype=torch.int32)
    block_table[len(query_lens):] = 0
    return build_forward_metadata(
        lens, slots, block_table, BLOCK_SIZE, cp, rank, strategy, min_tokens_for_cp, 1 + k, "cpu",
        num_input_tokens=num_input_tokens, graph_padded=num_input_tokens > num_real, buffers=buffers,
    ), slots


def _signature(meta):
    """Everything a captured graph fixes: Python-level decisions, shapes and addresses."""
    plan = meta.plan
    gathered = plan.token_to_gathered_row
    return (
        plan.strategy, plan.is_split, plan.num_tokens, plan.rows_per_rank, plan.interleaved,
        meta.use_decode_kernel,
        tuple(plan.local_token_idx.shape), plan.local_token_idx.data_ptr(),
        None if gathered is None else (tuple(gathered.shape), gathered.data_ptr()),
        tuple(meta.local_req.shape), meta.local_req.data_ptr(),
        tuple(meta.slot_mapping.shape), meta.slot_mapping.data_ptr(),
    )


@pytest.mark.parametrize("strategy_name", list(STRATEGIES))
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_replays_match_the_capture_layout(strategy_name, cp, k):
    torch.manual_seed(cp * 10 + k)
    strategy = STRATEGIES[strategy_name]
    q = 1 + k
    sizes = cp_capture_sizes(cp_size=cp, num_speculative_tokens=k, max_num_seqs=16,
                             max_num_batched_tokens=2048, decode_only=True).sizes
    for size in sizes[:6]:
        max_reqs = size // q
        for rank in range(cp):
            buffers = MetadataBuffers(64, "cpu")
            captured, _ = _metadata([q] * max_reqs, max_reqs, size, cp, rank, strategy, k, buffers)
            want = _signature(captured)
            for num_reqs in range(1, max_reqs + 1):
                meta, slots = _metadata([q] * num_reqs, max_reqs, size, cp, rank, strategy, k, buffers)
                assert _signature(meta) == want, (size, num_reqs)
                num_real = num_reqs * q
                idx, req = meta.plan.local_token_idx, meta.local_req
                # Real tokens keep their request; padding tokens belong to none.
                assert torch.equal(req >= 0, (idx >= 0) & (idx < num_real))
                assert torch.equal(req[req >= 0], idx[req >= 0] // q)
                assert torch.equal(meta.slot_mapping, slots)  # padding tokens write nothing (-1)


@pytest.mark.parametrize("cp", [2, 3, 4])
@pytest.mark.parametrize("strategy_name", ["round-robin", "in-seq"])
def test_every_real_token_is_on_exactly_one_rank(cp, strategy_name):
    k, q = 1, 2
    size = cp_capture_sizes(cp_size=cp, num_speculative_tokens=k, max_num_seqs=16,
                            max_num_batched_tokens=2048, decode_only=True).sizes[2]
    for num_reqs in range(1, size // q + 1):
        owned = []
        for rank in range(cp):
            meta, _ = _metadata([q] * num_reqs, size // q, size, cp, rank, STRATEGIES[strategy_name], k,
                                MetadataBuffers(64, "cpu"))
            owned.append(meta.plan.local_token_idx[meta.local_req >= 0])
        assert torch.equal(torch.cat(owned).sort().values, torch.arange(num_reqs * q))


def test_skip_decision_is_a_function_of_the_graph_size():
    """min_tokens_for_cp compares the padded size, so a replay never changes the
    captured split / no-split path."""
    buffers = MetadataBuffers(64, "cpu")
    captured, _ = _metadata([1] * 16, 16, 16, 2, 0, RoundRobinSplit(), 0, buffers, min_tokens_for_cp=12)
    replay, _ = _metadata([1] * 5, 16, 16, 2, 0, RoundRobinSplit(), 0, buffers, min_tokens_for_cp=12)
    assert captured.plan.is_split and _signature(replay) == _signature(captured)


def test_eager_batches_keep_their_own_layout():
    """Not graph-padded (vLLM's eager / piecewise batches): the plan covers the real
    tokens only, as before."""
    meta, _ = _metadata([7, 3], 2, 10, 2, 1, RoundRobinSplit(), 0, MetadataBuffers(64, "cpu"))
    assert meta.plan.num_tokens == 10 and meta.plan.rows_per_rank == 5
    meta = build_forward_metadata([7, 3], torch.arange(10), torch.zeros(2, 4, dtype=torch.int32), BLOCK_SIZE,
                                  2, 1, RoundRobinSplit(), 0, 1, "cpu", num_input_tokens=16)
    assert meta.plan.num_tokens == 10 and meta.plan.rows_per_rank == 8
    assert (meta.local_req[5:] == -1).all()


def test_buffers_grow_only_past_their_capacity():
    buffers = MetadataBuffers(8, "cpu")
    small, _ = _metadata([1] * 8, 8, 8, 2, 0, RoundRobinSplit(), 0, buffers)
    again, _ = _metadata([1] * 3, 8, 8, 2, 0, RoundRobinSplit(), 0, buffers)
    assert small.local_req.data_ptr() == again.local_req.data_ptr()
    large, _ = _metadata([1] * 20, 20, 20, 1, 0, None, 0, buffers)
    assert large.local_req.shape == (20,) and torch.equal(large.local_req, torch.arange(20))


def test_unsplit_rows_are_staged_once_and_rewritten_after_a_split():
    """An unsplit plan's rows are 0, 1, 2, ...: staged with a copy the first time, then read
    from the buffer as it is (one host-to-device copy a decode step fewer); a split plan's
    rows overwrite it, so the next unsplit plan copies again. Every returned view holds the
    plan's own rows at the buffer's address."""
    buffers = MetadataBuffers(64, "cpu")
    copies = []
    put = buffers._put
    buffers._put = lambda name, values, key=None: copies.append(name) or put(name, values, key)
    first, _ = _metadata([1] * 8, 8, 8, 1, 0, None, 0, buffers)
    again, _ = _metadata([1] * 6, 6, 6, 1, 0, None, 0, buffers)
    assert copies.count("local_token_idx") == 1
    assert torch.equal(again.plan.local_token_idx, torch.arange(6))
    assert again.plan.local_token_idx.data_ptr() == first.plan.local_token_idx.data_ptr()
    split, _ = _metadata([1] * 8, 8, 8, 2, 1, RoundRobinSplit(), 0, buffers)
    assert torch.equal(split.plan.local_token_idx, torch.arange(1, 8, 2))
    after, _ = _metadata([1] * 8, 8, 8, 1, 0, None, 0, buffers)
    assert copies.count("local_token_idx") == 3 and torch.equal(after.plan.local_token_idx, torch.arange(8))
    longer, _ = _metadata([2] * 8, 8, 16, 1, 0, None, 1, buffers)
    assert copies.count("local_token_idx") == 4 and torch.equal(longer.plan.local_token_idx, torch.arange(16))


@pytest.mark.parametrize("query_lens,num_tokens", [([1] * 8, 8), ([3, 0, 2], 6), ([300, 212], 512), ([300, 213], 520),
                                                   ([1000, 1, 0, 7], 1010)])
def test_token_requests_built_from_a_list_or_by_torch_agree(query_lens, num_tokens):
    from vllm_cp_nsa.nsa_attention import _token_requests

    want = [r for r, n in enumerate(query_lens) for _ in range(n)]
    want += [-1] * (num_tokens - len(want))
    got = _token_requests(query_lens, num_tokens)
    assert got.dtype == torch.long and got.tolist() == want


def test_an_unsplit_request_map_repeated_is_not_copied_again():
    """Decode steps of one batch have the same request map: staged once, then read where it
    lies; another batch's map (or a split plan's) is copied, and every view holds its own map."""
    buffers = MetadataBuffers(64, "cpu")

    def staged(lens, padded_reqs, tokens, cp=1, strategy=None):
        return _metadata(lens, padded_reqs, tokens, cp, 0, strategy, 0, buffers)[0]

    first = staged([1] * 8, 8, 8)
    assert torch.equal(first.local_req, torch.arange(8))
    buffers._buffers["local_req"][:8] = -7  # what a skipped copy leaves visible
    again = staged([1] * 8, 8, 8)
    assert (again.local_req == -7).all() and again.local_req.data_ptr() == first.local_req.data_ptr()
    buffers._buffers["local_req"][:8] = torch.arange(8)
    other = staged([1] * 5, 8, 8)  # a padded replay of the same size: another map
    assert other.local_req.tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    split = staged([1] * 8, 8, 8, cp=2, strategy=RoundRobinSplit())
    assert split.local_req.tolist() == [0, 2, 4, 6]
    back = staged([1] * 5, 8, 8)  # the same map as two steps ago, but the split plan wrote over it
    assert back.local_req.tolist() == [0, 1, 2, 3, 4, -1, -1, -1]
    grown = staged([1] * 80, 80, 80)  # past the capacity: a new buffer, copied
    assert torch.equal(grown.local_req, torch.arange(80))
