"""CUDA-graph capture sizes that work under CP and MTP (vLLM-free).

A capture size is a token count the model is padded to. Under CP-N the padded
token stream is split N ways, so sizes should be multiples of N; a uniform
decode / target-verify batch has 1+k tokens per request (k speculative tokens),
so decode sizes should be multiples of both: lcm(N, 1+k) (SGLang #16961 made
the same change: ``bs * draft_tokens % attn_tp == 0``). Padded rows are treated
as padding by the split plan (``num_input_tokens``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def _default_ladder(limit: int) -> list[int]:
    """vLLM's default shape of capture sizes: 1, 2, 4, 8..248 by 8, 256.. by 16."""
    return [s for s in [1, 2, 4, *range(8, 256, 8), *range(256, limit + 1, 16)] if s <= limit]


@dataclass(frozen=True)
class CaptureSizes:
    sizes: list[int]
    """Sorted, unique: every size usable under CP (multiple of N)."""
    decode_sizes: list[int]
    """The subset meant for uniform decode batches (multiples of lcm(N, 1+k))."""
    max_size: int
    changes: list[tuple[int, int | None]]
    """(requested, used) for each explicitly requested size that was changed (None = dropped)."""


def cp_capture_sizes(
    *,
    cp_size: int,
    num_speculative_tokens: int,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_capture_size: int | None = None,
    requested_sizes: list[int] | None = None,
    decode_only: bool = False,
) -> CaptureSizes:
    """Capture sizes for CP-N with k speculative tokens.

    ``max_capture_size`` defaults like vLLM's, min(max_num_seqs * (1+k) * 2, 512),
    raised to lcm(N, 1+k) so one CP-usable decode size always exists. Every size
    is <= min(max_capture_size, max_num_batched_tokens). Requested
    sizes are kept but rounded up to a multiple of N (or dropped when the
    rounded size exceeds the limit); the changes are reported. ``decode_only``
    (FULL_DECODE_ONLY graphs: every size serves uniform decode batches) rounds
    every size to lcm(N, 1+k) instead.
    """
    if cp_size < 1 or num_speculative_tokens < 0 or max_num_seqs < 1:
        raise ValueError("cp_size and max_num_seqs must be >= 1, num_speculative_tokens >= 0")
    query_len = 1 + num_speculative_tokens
    decode_multiple = math.lcm(cp_size, query_len)
    multiple = decode_multiple if decode_only else cp_size
    if max_capture_size is None:
        max_capture_size = max(min(max_num_seqs * query_len * 2, 512), decode_multiple)
    limit = min(max_capture_size, max_num_batched_tokens)
    changes: list[tuple[int, int | None]] = []
    if requested_sizes is not None:
        kept = set()
        for size in sorted(set(requested_sizes)):
            used = _round_up(size, multiple)
            used = used if used <= limit else None
            if used != size:
                changes.append((size, used))
            if used is not None:
                kept.add(used)
        decode = {s for s in kept if s % decode_multiple == 0}
    else:
        kept = {_round_up(s, multiple) for s in _default_ladder(limit)}
        kept = {s for s in kept if s <= limit}
        decode = {s for s in kept if s % decode_multiple == 0}
        num_reqs = 1
        while num_reqs <= max_num_seqs:
            size = _round_up(num_reqs * query_len, decode_multiple)
            if size <= limit:
                decode.add(size)
            num_reqs *= 2
    sizes = sorted(kept | decode)
    if not sizes:
        raise ValueError(
            f"no CUDA-graph capture size fits under {limit} tokens for CP-{cp_size} "
            f"with {num_speculative_tokens} speculative tokens"
        )
    return CaptureSizes(sizes=sizes, decode_sizes=sorted(decode), max_size=sizes[-1], changes=changes)


def piecewise_graph_decision(*, cp_size: int, mode: str, heads_split: bool, moe_capturable: bool) -> tuple[bool, str]:
    """Whether prefill and mixed batches can replay vLLM's breakable piecewise CUDA graphs,
    and why (for the startup line).

    A piecewise graph replays, for every batch padded to its size, the row layout it
    captured; only the attention's eager break (cache writes, indexer, sparse MLA) reads
    the batch. So the layout may depend on the padded token count alone: true when rows
    are never split (one rank, or ``mode: off``) and every rank runs all heads. A split
    plan picks rows from the batch (and runs unsplit below its thresholds), and a head split
    of unsplit batches (the split policy's ``heads_split``) picks heads per batch: those
    batches run eagerly, decode batches keep FULL graphs. A MoE communicator with
    data-dependent collective sizes cannot sit inside a graph segment at all.
    """
    if not moe_capturable:
        return False, "the MoE communicator's all-to-all sizes depend on the batch"
    if cp_size > 1 and mode != "off":
        return False, f"mode={mode} picks each rank's rows from the batch"
    if heads_split:
        return False, "decode_attention=tp picks the heads per batch"
    return True, ("rows never split: graphs hold everything but the attention's eager break "
                  "(cache writes, indexer, sparse MLA)")
