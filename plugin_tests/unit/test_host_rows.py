"""``NsaForwardMetadata.local_rows_host``: each local row's request and key count on the host,
for kernel providers that plan on the host (the DeepGEMM indexer glue) without reading the
device. They must equal what the layers compute on the device from vLLM's positions
(``local_kv_len``), and exist only where vLLM's host sequence lengths are exact."""

from __future__ import annotations

import pytest
import torch

from vllm_cp_nsa.nsa_attention import build_forward_metadata
from vllm_cp_nsa.split_plan import InSeqSplit, RoundRobinSplit

BLOCK = 4


def _meta(query_lens, seq_lens, strategy, cp_size, cp_rank, num_input_tokens=None, max_decode_query_len=1):
    slots = torch.arange(sum(query_lens))
    table = torch.arange(len(query_lens) * 8, dtype=torch.int32).view(len(query_lens), 8)
    return build_forward_metadata(query_lens, slots, table, BLOCK, cp_size, cp_rank, strategy, 0,
                                  max_decode_query_len, "cpu", num_input_tokens=num_input_tokens,
                                  seq_lens=seq_lens)  # fmt: skip


def _vllm_positions(query_lens, seq_lens, num_input_tokens=None) -> torch.Tensor:
    """Positions as vLLM's runner hands them: each request's cached tokens onward, then
    padding (position 0) up to the padded batch."""
    pos = torch.cat([torch.arange(s - n, s) for n, s in zip(query_lens, seq_lens)])
    return torch.cat([pos, torch.zeros(max(0, (num_input_tokens or 0) - len(pos)), dtype=torch.long)])


@pytest.mark.parametrize("strategy,cp_size", [(None, 1), (RoundRobinSplit(), 2), (InSeqSplit(), 2),
                                              (RoundRobinSplit(), 3)])
@pytest.mark.parametrize("query_lens,seq_lens,num_input_tokens", [
    ([5, 7, 3], [12, 7, 20], 16),  # chunked prefill with cached prefixes, padded to a graph size
    ([9, 4], [9, 4], None),        # whole prompts
    ([6, 2, 11], [30, 2, 11], 24),
])
def test_host_rows_equal_the_device_computation(strategy, cp_size, query_lens, seq_lens, num_input_tokens):
    positions = _vllm_positions(query_lens, seq_lens, num_input_tokens)
    for rank in range(cp_size):
        meta = _meta(query_lens, seq_lens, strategy, cp_size, rank, num_input_tokens)
        local_positions = meta.plan.take_local(positions[: meta.plan.num_tokens])
        host_req, host_kv_len = meta.local_rows_host
        assert torch.equal(host_req, meta.local_req)
        assert torch.equal(host_kv_len, meta.local_kv_len(local_positions)), f"rank {rank}"
        assert host_kv_len.device.type == "cpu" and (host_kv_len[host_req < 0] == 0).all()


@pytest.mark.parametrize("query_lens,seq_lens,max_decode_query_len,exact", [
    ([5, 9], [15, 9], 3, True),    # speculative decoding on, every request a prefill chunk: exact
    ([2, 9], [15, 9], 3, False),   # a request of <= 1 + k tokens may extend by drafts: a bound only
    ([1, 9], [15, 9], 1, True),    # no speculative decoding: a decode row's length is exact
    ([5, 9], None, 1, False),      # the runner did not state the lengths
])
def test_host_rows_only_where_the_host_lengths_are_exact(query_lens, seq_lens, max_decode_query_len, exact):
    meta = _meta(query_lens, seq_lens, RoundRobinSplit(), 2, 0, max_decode_query_len=max_decode_query_len)
    assert (meta.local_rows_host is not None) is exact


def test_decode_batches_state_no_host_rows():
    """Decode / verify batches may be captured in a CUDA graph, whose replays cannot repeat
    host work; their indexer never plans on the host."""
    meta = _meta([1, 1, 1], [40, 9, 17], RoundRobinSplit(), 2, 1)
    assert meta.use_decode_kernel and meta.local_rows_host is None


def test_the_reference_indexer_checks_host_rows_against_the_device_values():
    """Every CPU run (the e2e tests on vLLM included) passes through this check, so host rows
    that disagree with vLLM's positions fail there instead of misplanning a GPU indexer."""
    from vllm_cp_nsa.kernels.dispatch import get_ops

    gen = torch.Generator().manual_seed(0)
    q, weights = torch.randn(3, 2, 128, generator=gen), torch.randn(3, 2, generator=gen)
    cache, table = torch.randn(8, BLOCK, 128, generator=gen), torch.arange(4, dtype=torch.int32).view(2, 2)
    row_req, kv_len = torch.tensor([0, 1, 1]), torch.tensor([3, 1, 2])
    args = (q, weights, cache, table, row_req, kv_len, 2, BLOCK, False)
    ops = get_ops("torch")
    expected = ops.indexer_topk(*args)
    assert torch.equal(ops.indexer_topk(*args, host_rows=(row_req.clone(), kv_len.clone())), expected)
    with pytest.raises(ValueError, match="host_rows differ"):
        ops.indexer_topk(*args, host_rows=(row_req, kv_len + 1))
