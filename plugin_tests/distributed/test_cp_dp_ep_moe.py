"""DP x CP with the ``scattered`` MoE on 4 gloo ranks: 2 DP replicas x 2 TP (= CP) ranks,
``--enable-expert-parallel`` (issue 20).

vLLM's parallel state is built over the gloo world exactly as for
``--data-parallel-size 2 -tp 2`` (world 4, DP outermost), and the MoE group is the one the
runtime picks (``moe_group_coordinator``): vLLM's EP group, all 4 ranks. Each rank feeds
its own rows (CP split: distinct rows, uneven counts) or, for an unsplit batch, the rows its
replica shares; the outputs must equal HF transformers' DeepseekV32MoE run unsplit on the
same rows (the no-CP, no-DP result), and every routed expert must live on exactly one of the
4 ranks (a MoE over one replica's TP group would hold each expert twice and never reach the
other replica).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from cp_gloo_harness import free_port, run_ranks
from test_cp_ep_moe_adapter import EXPERTS, HIDDEN, _hf_moe, _load_hf_weights

pytestmark = pytest.mark.distributed

DP, TP = 2, 2


def _split_rows(rank: int) -> torch.Tensor:
    return torch.randn(3 + 2 * rank, HIDDEN, generator=torch.Generator().manual_seed(40 + rank))


def _replica_rows(rank: int) -> torch.Tensor:
    return torch.randn(6, HIDDEN, generator=torch.Generator().manual_seed(80 + rank // TP))


@contextmanager
def dp_tp_parallel_state(group, run_id: str, **parallel_fields):
    """vLLM's parallel state over the harness's gloo world, built as ``--data-parallel-size DP
    -tp TP --enable-expert-parallel`` builds it (DP outermost), with ``parallel_fields`` set on
    the parallel config as well; yields the ``VllmConfig``."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import destroy_model_parallel, init_distributed_environment, initialize_model_parallel

    vllm_config = VllmConfig()
    object.__setattr__(vllm_config, "model_config", SimpleNamespace(dtype=torch.float32, is_moe=True))
    os.environ["VLLM_DIST_IDENT"] = run_id
    with set_current_vllm_config(vllm_config):
        # join as one world of DP x TP (DP 1 here: the harness already numbered the ranks
        # globally), then build the groups as the DP launch does
        init_distributed_environment(world_size=group.world_size, rank=group.rank, local_rank=group.rank,
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}", backend="gloo")
        parallel = vllm_config.parallel_config
        parallel.data_parallel_size, parallel.tensor_parallel_size = DP, TP
        parallel.enable_expert_parallel = True
        for name, value in parallel_fields.items():
            setattr(parallel, name, value)
        initialize_model_parallel(TP, 1)
        try:
            yield vllm_config
        finally:
            destroy_model_parallel()


def _run_dp_ep_moe(group, run_id: str):
    from vllm.distributed import get_tp_group

    from vllm_cp_nsa.adapter.ep_moe import CpNsaExpertParallelMoE
    from vllm_cp_nsa.adapter.runtime import VllmTpGroup, moe_group_coordinator
    from vllm_cp_nsa.communicator import ScatteredMoeCommunicator

    config, hf = _hf_moe()
    with dp_tp_parallel_state(group, run_id) as vllm_config:
        tp = get_tp_group()
        moe_coordinator = moe_group_coordinator(vllm_config)
        moe_group = VllmTpGroup(moe_coordinator)
        config.scoring_func, config.topk_method = "sigmoid", "noaux_tc"
        moe = CpNsaExpertParallelMoE(vllm_config, config, "model.layers.1.mlp", moe_group)
        _load_hf_weights(moe, hf)
        communicator, plan = ScatteredMoeCommunicator(), SimpleNamespace(is_split=True)
        with torch.no_grad():
            split = communicator.forward(moe, _split_rows(group.rank), plan, VllmTpGroup(tp))
            unsplit = communicator.forward(moe, _replica_rows(group.rank), plan, VllmTpGroup(tp))
            empty = moe(torch.empty(0, HIDDEN)) if group.rank == 1 else moe(_split_rows(group.rank))
        return {"split": split, "unsplit": unsplit, "empty_rank_ok": empty.shape,
                "local_experts": sorted(int(e) for e in moe.experts),
                "tp_ranks": list(tp.ranks), "moe_ranks": list(moe_coordinator.ranks)}


def _err(out, expected) -> float:
    return ((out - expected).norm() / expected.norm()).item()


def test_dp_times_cp_scattered_moe_equals_no_cp():
    results = run_ranks(_run_dp_ep_moe, DP * TP, f"cpnsa-dp-ep-{os.getpid()}", timeout=240)
    _, hf = _hf_moe()
    assert [r["tp_ranks"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]  # CP inside each replica
    assert all(r["moe_ranks"] == [0, 1, 2, 3] for r in results)  # experts over all D x N ranks
    owned = [r["local_experts"] for r in results]
    assert sorted(e for rank in owned for e in rank) == list(range(EXPERTS))  # each on exactly one rank
    assert all(len(rank) == EXPERTS // (DP * TP) for rank in owned)
    for rank, result in enumerate(results):
        with torch.no_grad():
            split = hf(_split_rows(rank).unsqueeze(0)).squeeze(0)
            unsplit = hf(_replica_rows(rank).unsqueeze(0)).squeeze(0)
        assert _err(result["split"], split) <= 1e-5, f"rank {rank} split rows"
        assert _err(result["unsplit"], unsplit) <= 1e-5, f"rank {rank} replica rows"
    assert results[1]["empty_rank_ok"] == (0, HIDDEN)  # a rank with no rows (a DP dummy batch) still joins
