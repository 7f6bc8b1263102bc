"""A toy third-party extension of vllm_cp_nsa: one split strategy.

It is what another package would ship: a module with ``@hookimpl`` functions,
listed under the ``vllm_cp_nsa.extensions`` entry-point group of its own
distribution. It imports only the plugin's public hook marker and torch.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vllm_cp_nsa.hookspecs import hookimpl

NAME = "toy-contiguous-split"


class ToyContiguousSplit:
    """Rank r owns the r-th contiguous slice of the flattened batch (the first
    ``T % N`` ranks one token more): not interleaved, so restoring token order
    goes through the plan's gathered-row index."""

    name = NAME
    interleaved = False

    def assign_tokens(self, query_lens: Sequence[int], cp_size: int) -> list[torch.Tensor]:
        total = int(sum(query_lens))
        base, rem = divmod(total, cp_size)
        sizes = [base + (1 if r < rem else 0) for r in range(cp_size)]
        starts = [sum(sizes[:r]) for r in range(cp_size)]
        return [torch.arange(starts[r], starts[r] + sizes[r]) for r in range(cp_size)]


@hookimpl
def cp_nsa_split_strategies() -> list:
    return [ToyContiguousSplit()]
