"""The full MoE communicator runs the MLP on the batch's real tokens only.

An uneven split (in-seq with short requests puts all their tokens on one rank) can
gather many more rows than the batch has tokens; vLLM sizes the fused-MoE workspace
for max_num_batched_tokens, so the MLP must never see more rows than T.
"""

from __future__ import annotations

import pytest
import torch

from vllm_cp_nsa.communicator import FullMoeCommunicator
from vllm_cp_nsa.split_plan import InSeqSplit, RoundRobinSplit, build_split_plan


class StackedRanks:
    """A CP group whose ranks' local rows are all known here (one process)."""

    def __init__(self, world_size: int, rank: int, rows_by_rank: list[torch.Tensor]):
        self.world_size, self.rank, self.rows_by_rank = world_size, rank, rows_by_rank

    def all_gather(self, x):
        return torch.cat(self.rows_by_rank)

    def reduce_scatter(self, x):
        return x.view(self.world_size, -1, *x.shape[1:])[self.rank]

    def all_reduce(self, x):
        return x


@pytest.mark.parametrize("strategy", [InSeqSplit(), RoundRobinSplit()], ids=lambda s: s.name)
@pytest.mark.parametrize("cp", [2, 3, 4])
def test_mlp_sees_only_real_tokens(strategy, cp):
    query_lens = [1] * 9 + [40, 3]  # decodes land on rank 0 under in-seq
    tokens = torch.randn(sum(query_lens), 8)
    plans = [build_split_plan(query_lens, cp, r, strategy) for r in range(cp)]
    local = [p.take_local(tokens) for p in plans]
    seen = []

    def mlp(x):
        seen.append(x.shape[0])
        return 2 * x + 1

    for rank, plan in enumerate(plans):
        out = FullMoeCommunicator().forward(mlp, local[rank], plan, StackedRanks(cp, rank, local))
        real = plan.local_token_idx >= 0
        assert torch.equal(out[real], 2 * tokens[plan.local_token_idx[real]] + 1)
    assert seen == [sum(query_lens)] * cp
