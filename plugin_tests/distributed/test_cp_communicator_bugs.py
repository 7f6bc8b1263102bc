"""Regression guards for the three communicator bugs of SGLang #20360 (DESIGN.md §4).

Each test runs a deliberately broken ``FullMoeCommunicator`` next to the real one,
through the same checks the rest of the suite uses, and asserts that the checks
FAIL for the broken variant and PASS for the real one, i.e. that a re-introduction
of the bug would be caught:

(a) a missing reduction before a norm: the TP (unsplit) path returns the MLP's
    TP-partial sums; the next layer's RMSNorm (and the final norm) normalise a
    partial sum;
(b) the MoE skipping its reduction under CP: the reduce-scatter is replaced by
    plain rank-major slicing of the un-reduced output;
(c) a reduce-scatter that returns the wrong rows: (c1) another rank's chunk,
    (c2) token-ordered slicing instead of rank-major.

Run: .venv/bin/python -m pytest plugin_tests/distributed/test_cp_communicator_bugs.py -q
"""

from __future__ import annotations

import pytest
import torch.nn.functional as F

from cp_checks import DIMS, SEED, TOL, full_moe_errors, oracle_stack, run_stack
from cp_gloo_harness import LocalGroup, rel_err, run_ranks
from vllm_cp_nsa.communicator import FullMoeCommunicator
from vllm_cp_nsa.reference_model import LayerStack
from vllm_cp_nsa.split_plan import InSeqSplit, RoundRobinSplit

pytestmark = pytest.mark.distributed


class MissingAllReduceBeforeNorm(FullMoeCommunicator):
    """(a) Unsplit (TP) path: MLP partial sums go on un-reduced."""

    def forward(self, mlp, x_local, plan, group):
        if not plan.is_split:
            return mlp(x_local)
        return super().forward(mlp, x_local, plan, group)


class MoeSkipsReductionUnderCp(FullMoeCommunicator):
    """(b) All-gather -> MoE (no all-reduce) -> own rank-major rows, never reduced."""

    def forward(self, mlp, x_local, plan, group):
        if not plan.is_split:
            return super().forward(mlp, x_local, plan, group)
        out = mlp(group.all_gather(x_local))
        return out.chunk(group.world_size)[group.rank].contiguous()


class ReduceScatterOtherRanksChunk(FullMoeCommunicator):
    """(c1) Reduced correctly, but hands back the next rank's chunk."""

    def forward(self, mlp, x_local, plan, group):
        if not plan.is_split:
            return super().forward(mlp, x_local, plan, group)
        out = group.all_reduce(mlp(group.all_gather(x_local)))
        return out.chunk(group.world_size)[(group.rank + 1) % group.world_size].contiguous()


class ReduceScatterTokenOrder(FullMoeCommunicator):
    """(c2) Gathered rows put back in token order before the MoE, so the
    reduce-scatter's contiguous chunks are token ranges, not this rank's rows."""

    def forward(self, mlp, x_local, plan, group):
        if not plan.is_split:
            return super().forward(mlp, x_local, plan, group)
        tokens = plan.restore_token_order(group.all_gather(x_local))
        tokens = F.pad(tokens, (0, 0, 0, plan.padded_num_tokens - plan.num_tokens))
        return group.reduce_scatter(mlp(tokens))


VARIANTS = {
    "real": FullMoeCommunicator,
    "a-missing-allreduce": MissingAllReduceBeforeNorm,
    "b-moe-skips-reduction": MoeSkipsReductionUnderCp,
    "c1-other-ranks-chunk": ReduceScatterOtherRanksChunk,
    "c2-token-order": ReduceScatterTokenOrder,
}

SPLIT_BATCH = ([23, 1, 1, 3, 13], [9, 30, 5, 0, 40])  # T = 41, split on 2-4 ranks
UNSPLIT_BATCH = ([1], [12])  # T = 1 < N: the TP path


def _bug_checks(group):
    """Per variant, the error of every check the suite uses."""
    oracle = oracle_stack()
    ref_split = run_stack(oracle, LocalGroup(), *SPLIT_BATCH, None)
    ref_unsplit = run_stack(oracle, LocalGroup(), *UNSPLIT_BATCH, None, seed=1)
    out = {}
    for name, cls in VARIANTS.items():
        comm = cls()
        stack = LayerStack(DIMS, 2, SEED, group, comm)
        no_cp = run_stack(stack, group, *SPLIT_BATCH, None)
        checks = {
            # FULL MoE == all-reduced MoE sliced to the local rows (split + unsplit batches)
            "full_moe": max(r["err"] for r in full_moe_errors(group, comm)),
            "full_moe_dense": max(r["err"] for r in full_moe_errors(group, comm, dense=True)),
            # the stack on an unsplit (TP-path) batch vs the full-weight oracle
            "stack_unsplit_vs_oracle": rel_err(run_stack(stack, group, *UNSPLIT_BATCH, None, seed=1), ref_unsplit),
            "stack_no_cp_vs_oracle": rel_err(no_cp, ref_split),
        }
        for mode, strategy in (("rr", RoundRobinSplit()), ("inseq", InSeqSplit())):
            cp = run_stack(stack, group, *SPLIT_BATCH, strategy)
            checks[f"stack_{mode}_vs_oracle"] = rel_err(cp, ref_split)
            checks[f"stack_{mode}_vs_no_cp"] = rel_err(cp, no_cp)
        out[name] = checks
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"cp{n}")
def bug_checks(request):
    world = request.param
    results = run_ranks(_bug_checks, world)
    # Worst over ranks: a check fails if it fails on any rank.
    merged = {
        name: {check: max(r[name][check] for r in results) for check in results[0][name]}
        for name in VARIANTS
    }
    return world, merged


def _fails(errors: dict, checks: list[str]) -> dict:
    return {c: errors[c] for c in checks if not errors[c] <= TOL}


def test_real_communicator_passes_every_check(bug_checks):
    world, merged = bug_checks
    failing = _fails(merged["real"], list(merged["real"]))
    assert not failing, f"real FullMoeCommunicator fails on {world} ranks: {failing}"


def test_bug_a_missing_allreduce_before_norm_is_caught(bug_checks):
    world, merged = bug_checks
    assert not _fails(merged["real"], list(merged["real"]))
    errors = merged["a-missing-allreduce"]
    # The TP-partial MLP output reaches layer 2's RMSNorm and the final norm un-reduced:
    caught_by = ["stack_unsplit_vs_oracle", "stack_no_cp_vs_oracle", "stack_rr_vs_no_cp",
                 "stack_inseq_vs_no_cp", "full_moe", "full_moe_dense"]
    assert _fails(errors, caught_by).keys() == set(caught_by), (world, errors)


def test_bug_b_moe_skips_reduction_under_cp_is_caught(bug_checks):
    world, merged = bug_checks
    assert not _fails(merged["real"], list(merged["real"]))
    errors = merged["b-moe-skips-reduction"]
    caught_by = ["full_moe", "full_moe_dense", "stack_rr_vs_oracle", "stack_inseq_vs_oracle",
                 "stack_rr_vs_no_cp", "stack_inseq_vs_no_cp"]
    assert _fails(errors, caught_by).keys() == set(caught_by), (world, errors)


@pytest.mark.parametrize("variant", ["c1-other-ranks-chunk", "c2-token-order"])
def test_bug_c_wrong_reduce_scatter_rows_is_caught(bug_checks, variant):
    world, merged = bug_checks
    assert not _fails(merged["real"], list(merged["real"]))
    errors = merged[variant]
    caught_by = ["full_moe", "full_moe_dense", "stack_rr_vs_oracle", "stack_inseq_vs_oracle",
                 "stack_rr_vs_no_cp", "stack_inseq_vs_no_cp"]
    assert _fails(errors, caught_by).keys() == set(caught_by), (world, errors)
