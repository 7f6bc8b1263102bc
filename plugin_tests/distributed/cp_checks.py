"""Model builders and checks shared by the distributed test modules."""

from __future__ import annotations

import torch

from cp_gloo_harness import LocalGroup, fill_context, num_cache_blocks, paged_batch, rel_err
from vllm_cp_nsa.communicator import FullMoeCommunicator, ScatteredMoeCommunicator
from vllm_cp_nsa.kernels.dispatch import get_ops
from vllm_cp_nsa.reference_model import Dims, LayerStack, ShardedMlp, ShardedMoe, make_caches, random_hidden
from vllm_cp_nsa.split_plan import InSeqSplit, RoundRobinSplit, build_split_plan

DIMS = Dims(topk=16)
TOL = 1e-5
SEED = 3
STRATEGIES = {"off": None, "round-robin-split": RoundRobinSplit(), "in-seq-split": InSeqSplit()}
COMMUNICATORS = {"full": FullMoeCommunicator, "scattered": ScatteredMoeCommunicator}


def run_stack(stack, group, query_lens, context_lens, strategy, seed=0, min_tokens_for_cp=0):
    batch = paged_batch(query_lens, context_lens)
    caches = make_caches(DIMS, len(stack.layers), num_cache_blocks(batch), batch.block_size, "auto",
                         torch.float32, "cpu")
    fill_context(caches, batch, seed=100 + seed)
    hidden = random_hidden(sum(query_lens), DIMS.hidden, seed=200 + seed)
    return stack(hidden, batch, caches, group, strategy, get_ops("torch"), min_tokens_for_cp=min_tokens_for_cp)


def oracle_stack() -> LayerStack:
    """Same weights, one process, no sharding, no CP."""
    return LayerStack(DIMS, 2, SEED, LocalGroup(), FullMoeCommunicator())


MOE_BATCHES = [[23, 1, 1, 3, 13], [37, 1, 5, 60, 2], [1, 1, 1, 1, 1], [2, 1], [1], [9]]


def full_moe_errors(group, communicator, batches=MOE_BATCHES, dense=False):
    """For each batch and mode: the communicator's local rows vs MoE on all tokens with
    its all-reduce, sliced to the local rows (max relative error over real rows), plus
    facts about the rows the MLP saw and the padding rows."""
    gen = lambda: torch.Generator().manual_seed(SEED)  # noqa: E731
    if dense:
        sharded = ShardedMlp(DIMS.hidden, DIMS.dense_inter, gen(), group.rank, group.world_size, torch.float32)
        full = ShardedMlp(DIMS.hidden, DIMS.dense_inter, gen(), 0, 1, torch.float32)
    else:
        sharded = ShardedMoe(DIMS, gen(), group.rank, group.world_size, torch.float32)
        full = ShardedMoe(DIMS, gen(), 0, 1, torch.float32)
    rows = []
    for b, q in enumerate(batches):
        x = random_hidden(sum(q), DIMS.hidden, seed=300 + b)
        reference_all = group.all_reduce(sharded(x).clone())  # MoE on all tokens + its all-reduce
        oracle_err = rel_err(reference_all, full(x))  # the partials really sum to the full MoE
        for mode, strategy in STRATEGIES.items():
            plans = [build_split_plan(q, group.world_size, r, strategy) for r in range(group.world_size)]
            plan = plans[group.rank]
            seen = []

            def mlp(h):
                seen.append(h.clone())
                return sharded(h)

            y = communicator.forward(mlp, plan.take_local(x), plan, group)
            want = plan.take_local(reference_all)
            real = ~plan.local_padding_mask
            # Unpadded splits feed the rank-major all-gather as it is; with padding rows the
            # MLP gets only the real tokens (token order); unsplit batches all of them.
            unpadded_split = plan.is_split and plan.padded_num_tokens == plan.num_tokens
            expected_input = torch.cat([p.take_local(x) for p in plans]) if unpadded_split else x
            rows.append(dict(
                batch=q, mode=mode, is_split=plan.is_split,
                err=rel_err(y[real], want[real]) if y.shape == want.shape else float("inf"),
                shape_ok=y.shape == want.shape,
                finite=bool(torch.isfinite(y).all()),
                mlp_saw_expected_rows=len(seen) == 1 and torch.equal(seen[0], expected_input),
                oracle_err=oracle_err,
            ))
    return rows
