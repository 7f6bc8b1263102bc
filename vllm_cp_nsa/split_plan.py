"""Split plans: which rows of the flattened batch each CP rank owns for attention.

A ``SplitPlan`` is built once per forward from the batch (the query lengths of its
requests in flattened order) and consumed by every layer. Every rank computes the
same decision from the same batch, so the split / no-split path is identical on
all ranks. vLLM-free: only torch.

Row layout: each rank holds ``rows_per_rank`` local rows (equal on all ranks so
plain all-gather / reduce-scatter work); rows past a rank's real tokens are
padding (``local_token_idx == -1``). An all-gather of local rows is rank-major
``[cp_size * rows_per_rank, ...]``; ``restore_token_order`` turns it back into
token order. Round-robin needs no index for that (a transpose).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

PADDING = -1


class SplitStrategy(Protocol):
    """A token-split strategy (built-ins and extensions implement this)."""

    name: str
    interleaved: bool
    """True when rank r owns exactly the flat tokens t with t % cp_size == r, in
    ascending order: the gathered buffer then restores by a transpose."""

    def assign_tokens(self, query_lens: Sequence[int], cp_size: int) -> list[torch.Tensor]:
        """Per rank, the flat token indices it owns, in local row order.

        Together the lists must partition ``range(sum(query_lens))``.
        """
        ...


class RoundRobinSplit:
    """Token t of the flattened batch goes to rank ``t % cp_size`` (SGLang #13959)."""

    name = "round-robin-split"
    interleaved = True

    def assign_tokens(self, query_lens: Sequence[int], cp_size: int) -> list[torch.Tensor]:
        total = int(sum(query_lens))
        return [torch.arange(rank, total, cp_size) for rank in range(cp_size)]


class InSeqSplit:
    """Zigzag: each request is cut into 2·cp chunks; rank r owns chunks r and 2·cp−1−r."""

    name = "in-seq-split"
    interleaved = False

    def assign_tokens(self, query_lens: Sequence[int], cp_size: int) -> list[torch.Tensor]:
        num_segments = 2 * cp_size
        owned: list[list[torch.Tensor]] = [[] for _ in range(cp_size)]
        offset = 0
        for length in query_lens:
            length = int(length)
            base, rem = divmod(length, num_segments)
            seg_lens = [base + (1 if i < rem else 0) for i in range(num_segments)]
            seg_starts = [offset + sum(seg_lens[:i]) for i in range(num_segments)]
            for rank in range(cp_size):
                for seg in (rank, num_segments - 1 - rank):
                    if seg_lens[seg]:
                        owned[rank].append(torch.arange(seg_starts[seg], seg_starts[seg] + seg_lens[seg]))
            offset += length
        return [torch.cat(parts) if parts else torch.empty(0, dtype=torch.long) for parts in owned]


@dataclass(frozen=True)
class SplitPlan:
    strategy: str
    """Name of the strategy that produced the plan, ``off`` when unsplit."""
    cp_size: int
    cp_rank: int
    num_tokens: int
    """Real tokens of the batch (T)."""
    rows_per_rank: int
    local_token_idx: torch.Tensor
    """[rows_per_rank] int64 flat token index of each local row, -1 for padding."""
    token_to_gathered_row: torch.Tensor | None
    """[T] row of each token in the rank-major gathered buffer; None when interleaved."""
    interleaved: bool
    skip_reason: str | None = None
    """Why the batch runs unsplit (None when split)."""

    @property
    def is_split(self) -> bool:
        return self.skip_reason is None

    @property
    def padded_num_tokens(self) -> int:
        return self.rows_per_rank * self.cp_size if self.is_split else self.num_tokens

    @property
    def local_padding_mask(self) -> torch.Tensor:
        return self.local_token_idx < 0

    def to(self, device: torch.device | str) -> "SplitPlan":
        gathered = self.token_to_gathered_row
        return SplitPlan(
            strategy=self.strategy,
            cp_size=self.cp_size,
            cp_rank=self.cp_rank,
            num_tokens=self.num_tokens,
            rows_per_rank=self.rows_per_rank,
            local_token_idx=self.local_token_idx.to(device, non_blocking=True),
            token_to_gathered_row=None if gathered is None else gathered.to(device, non_blocking=True),
            interleaved=self.interleaved,
            skip_reason=self.skip_reason,
        )

    def take_local(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a token-ordered tensor ``[>= T, ...]``; padding rows are 0."""
        if not self.is_split:
            return x
        idx = self.local_token_idx
        rows = x.index_select(0, idx.clamp(min=0))
        if self.rows_per_rank * self.cp_size != self.num_tokens:  # some rank has padding
            rows = rows.masked_fill((idx < 0).view(-1, *([1] * (x.dim() - 1))), 0)
        return rows

    def restore_token_order(self, gathered: torch.Tensor) -> torch.Tensor:
        """Rank-major gathered rows ``[cp_size * rows_per_rank, ...]`` -> ``[T, ...]``."""
        if not self.is_split:
            return gathered
        if self.interleaved:
            rest = gathered.shape[1:]
            ordered = gathered.view(self.cp_size, self.rows_per_rank, *rest).transpose(0, 1)
            return ordered.reshape(self.cp_size * self.rows_per_rank, *rest)[: self.num_tokens]
        return gathered.index_select(0, self.token_to_gathered_row)

    def token_rows_in_gathered(self) -> torch.Tensor:
        """[T] row of each token in the rank-major gathered buffer (split plans)."""
        if self.interleaved:
            tokens = torch.arange(self.num_tokens, device=self.local_token_idx.device)
            return (tokens % self.cp_size) * self.rows_per_rank + tokens // self.cp_size
        return self.token_to_gathered_row


def unsplit_plan(num_tokens: int, cp_size: int, cp_rank: int, reason: str) -> SplitPlan:
    return SplitPlan(
        strategy="off",
        cp_size=cp_size,
        cp_rank=cp_rank,
        num_tokens=num_tokens,
        rows_per_rank=num_tokens,
        local_token_idx=torch.arange(num_tokens),
        token_to_gathered_row=None,
        interleaved=False,
        skip_reason=reason,
    )


def split_skip_reason(
    strategy: SplitStrategy | None, num_tokens: int, cp_size: int, min_tokens_for_cp: int
) -> str | None:
    """Why a batch must run unsplit, or None. A pure function of the batch."""
    if strategy is None:
        return "mode off"
    if cp_size < 2:
        return "fewer than 2 ranks"
    if num_tokens < cp_size:
        return f"{num_tokens} real tokens < {cp_size} ranks"
    if num_tokens < min_tokens_for_cp:
        return f"{num_tokens} real tokens < min_tokens_for_cp={min_tokens_for_cp}"
    return None


def build_split_plan(
    query_lens: Sequence[int],
    cp_size: int,
    cp_rank: int,
    strategy: SplitStrategy | None,
    min_tokens_for_cp: int = 0,
    num_input_tokens: int | None = None,
) -> SplitPlan:
    """Plan for a batch whose requests have ``query_lens`` tokens in flattened order.

    ``num_input_tokens`` (>= the real tokens) is the row count vLLM hands the model,
    e.g. padded up to a CUDA-graph capture size; every rank then holds at least
    ``ceil(num_input_tokens / cp_size)`` rows and the rows past the real tokens
    are padding (no KV write, no effect on real rows).
    """
    num_tokens = int(sum(query_lens))
    reason = split_skip_reason(strategy, num_tokens, cp_size, min_tokens_for_cp)
    if reason is not None:
        return unsplit_plan(num_tokens, cp_size, cp_rank, reason)
    assert strategy is not None
    owned = [t.long() for t in strategy.assign_tokens(query_lens, cp_size)]
    _check_partition(strategy, owned, num_tokens, cp_size)
    rows_per_rank = max(max(len(t) for t in owned), -(-(num_input_tokens or 0) // cp_size))
    mine = owned[cp_rank]
    local_token_idx = torch.full((rows_per_rank,), PADDING, dtype=torch.long)
    local_token_idx[: len(mine)] = mine
    token_to_gathered_row = None
    if not strategy.interleaved:
        token_to_gathered_row = torch.empty(num_tokens, dtype=torch.long)
        for rank, tokens in enumerate(owned):
            token_to_gathered_row[tokens] = rank * rows_per_rank + torch.arange(len(tokens))
    return SplitPlan(
        strategy=strategy.name,
        cp_size=cp_size,
        cp_rank=cp_rank,
        num_tokens=num_tokens,
        rows_per_rank=rows_per_rank,
        local_token_idx=local_token_idx,
        token_to_gathered_row=token_to_gathered_row,
        interleaved=strategy.interleaved,
    )


def _check_partition(strategy: SplitStrategy, owned: list[torch.Tensor], num_tokens: int,
                     cp_size: int) -> None:
    """Reject strategies (possibly third-party) whose assignment the plan cannot use."""
    name = strategy.name
    if len(owned) != cp_size:
        raise ValueError(f"split strategy '{name}' returned {len(owned)} ranks, expected {cp_size}")
    tokens = torch.cat(owned)
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= num_tokens):
        raise ValueError(f"split strategy '{name}' returned token indices outside [0, {num_tokens})")
    counts = torch.bincount(tokens, minlength=num_tokens)
    if len(tokens) != num_tokens or not bool((counts == 1).all()):
        raise ValueError(f"split strategy '{name}' does not assign every token to exactly one rank")
    if strategy.interleaved:
        for rank, mine in enumerate(owned):
            if not torch.equal(mine, torch.arange(rank, num_tokens, cp_size)):
                raise ValueError(
                    f"split strategy '{name}' claims interleaved=True but rank {rank} does not own "
                    f"exactly the tokens t % {cp_size} == {rank} in ascending order"
                )
