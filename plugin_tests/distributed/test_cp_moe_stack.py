"""A two-layer stack (dense, then MoE) and the MoE communicators under CP on 2-4 gloo ranks.

- stack under CP == stack without CP (<= 1e-5), FULL and SCATTERED communicators,
  and both == a single-process full-weight oracle (so a bug shared by the CP and the
  no-CP path of a communicator cannot hide);
- FULL-mode MoE (all-gather -> MoE without all-reduce -> reduce-scatter) == MoE on
  all tokens with its all-reduce, sliced to the local rows;
- fewer real tokens than ranks, ranks with no real token, odd lengths: correct, no hang.

Run: .venv/bin/python -m pytest plugin_tests/distributed/test_cp_moe_stack.py -q
"""

from __future__ import annotations

import pytest
import torch

from cp_checks import COMMUNICATORS, DIMS, SEED, STRATEGIES, TOL, full_moe_errors, oracle_stack, run_stack
from cp_gloo_harness import LocalGroup, rel_err, run_ranks
from vllm_cp_nsa.communicator import FullMoeCommunicator
from vllm_cp_nsa.reference_model import LayerStack
from vllm_cp_nsa.split_plan import build_split_plan

pytestmark = pytest.mark.distributed

STACK_BATCHES = [
    ([23, 1, 1, 3, 13], [9, 30, 5, 0, 40]),  # T = 41, mixed
    ([37, 1, 5, 60, 2], [0, 20, 3, 10, 7]),  # T = 105
    ([1, 1, 1, 1, 1], [5, 9, 1, 17, 33]),  # decodes only
]


# --------------------------------------------------------------------------- stack: CP == no-CP
def _stack_outputs(group, batches):
    oracle = oracle_stack()
    out = {"oracle": [run_stack(oracle, LocalGroup(), q, c, None, seed=b) for b, (q, c) in enumerate(batches)]}
    for comm_name, comm_cls in COMMUNICATORS.items():
        stack = LayerStack(DIMS, 2, SEED, group, comm_cls())
        out[f"{comm_name}/layer_types"] = [type(layer.mlp).__name__ for layer in stack.layers]
        for mode, strategy in STRATEGIES.items():
            out[f"{comm_name}/{mode}"] = [
                run_stack(stack, group, q, c, strategy, seed=b) for b, (q, c) in enumerate(batches)
            ]
    return out


def test_two_layer_moe_stack_cp_equals_no_cp(world):
    results = run_ranks(_stack_outputs, world, STACK_BATCHES)
    for rank, res in enumerate(results):
        assert res["full/layer_types"] == ["ShardedMlp", "ShardedMoe"]
        assert res["scattered/layer_types"] == ["ShardedMlp", "ExpertParallelMoe"]
        for comm in COMMUNICATORS:
            for b, (q, _) in enumerate(STACK_BATCHES):
                oracle = res["oracle"][b]
                no_cp = res[f"{comm}/off"][b]
                assert no_cp.shape == (sum(q), DIMS.hidden) and torch.isfinite(no_cp).all()
                err = rel_err(no_cp, oracle)
                assert err <= TOL, f"{comm} no-CP vs oracle, batch {q}, rank {rank}/{world}: {err:.2e}"
                for mode in ("round-robin-split", "in-seq-split"):
                    err = rel_err(res[f"{comm}/{mode}"][b], no_cp)
                    assert err <= TOL, f"{comm} {mode} vs no-CP, batch {q}, rank {rank}/{world}: {err:.2e}"


# --------------------------------------------------------------------------- FULL MoE == all-reduced MoE
def _full_moe_body(group, dense):
    return full_moe_errors(group, FullMoeCommunicator(), dense=dense)


@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense-mlp"])
def test_full_moe_equals_all_reduced_moe_sliced(world, dense):
    results = run_ranks(_full_moe_body, world, dense)
    for rank, rows in enumerate(results):
        assert {r["is_split"] for r in rows} == {True, False}  # both paths exercised
        for r in rows:
            where = f"batch {r['batch']} {r['mode']} rank {rank}/{world}"
            assert r["oracle_err"] <= TOL, f"{where}: sum of TP partials != full MoE ({r['oracle_err']:.2e})"
            assert r["shape_ok"] and r["finite"], where
            assert r["mlp_saw_expected_rows"], f"{where}: the MLP did not get the gathered real tokens once"
            assert r["err"] <= TOL, f"{where}: FULL MoE differs from all-reduced MoE ({r['err']:.2e})"


# --------------------------------------------------------------------------- tiny / odd batches
SMALL_BATCHES = [
    ([1], [6]),  # T = 1 < N
    ([1, 1], [3, 0]),  # T = 2
    ([2, 1], [0, 4]),  # T = 3
    ([1, 1, 1, 1, 1], [4, 2, 7, 1, 9]),  # in-seq: every decode on rank 0, other ranks empty
    ([3, 5, 7], [0, 1, 2]),  # odd lengths, T = 15
    ([5], [0]),  # one request just above N (N <= 4)
]


def _small_batches(group):
    oracle = oracle_stack()
    out = {"oracle": [run_stack(oracle, LocalGroup(), q, c, None, seed=b) for b, (q, c) in enumerate(SMALL_BATCHES)]}
    out["real_rows"] = {
        mode: [int((build_split_plan(q, group.world_size, group.rank, s).local_token_idx >= 0).sum()) if s else None
               for q, _ in SMALL_BATCHES]
        for mode, s in STRATEGIES.items()
    }
    for comm_name, comm_cls in COMMUNICATORS.items():
        stack = LayerStack(DIMS, 2, SEED, group, comm_cls())
        for mode in ("round-robin-split", "in-seq-split"):
            out[f"{comm_name}/{mode}"] = [
                run_stack(stack, group, q, c, STRATEGIES[mode], seed=b) for b, (q, c) in enumerate(SMALL_BATCHES)
            ]
    return out


def test_tiny_batches_empty_ranks_odd_lengths(world):
    results = run_ranks(_small_batches, world, timeout=60)
    # Ranks with no real token really occurred (in-seq, decode-only batch).
    assert any(results[r]["real_rows"]["in-seq-split"][3] == 0 for r in range(world))
    for rank, res in enumerate(results):
        for comm in COMMUNICATORS:
            for mode in ("round-robin-split", "in-seq-split"):
                for b, (q, _) in enumerate(SMALL_BATCHES):
                    out = res[f"{comm}/{mode}"][b]
                    assert bool(torch.isfinite(out).all())
                    err = rel_err(out, res["oracle"][b])
                    assert err <= TOL, f"{comm} {mode} batch {q} rank {rank}/{world}: {err:.2e}"


def test_run_ranks_reports_a_hang():
    """The harness itself: a collective that one rank never joins fails by timeout
    instead of hanging the suite."""

    def one_rank_skips(group):
        if group.rank == 0:
            torch.distributed.recv(torch.zeros(1), src=1)  # rank 1 never sends
        return group.rank

    with pytest.raises(TimeoutError):
        run_ranks(one_rank_skips, 2, timeout=5)
