"""The adapter's expert-parallel MoE (``moe: scattered``) on 2 and 4 gloo ranks against HF
transformers' DeepseekV32MoE (independent: HF's router and experts, run unsplit).

``CpNsaExpertParallelMoE`` is built from vLLM's layers inside vLLM's parallel state over the
gloo group, with the HF module's weights; each rank feeds a different number of its own rows
(uneven all-to-all splits). Routing uses everything DeepSeek-V3.2's router has: sigmoid
scores, ``e_score_correction_bias`` for the choice, ``n_group`` > 1 with ``topk_group``,
renormalized weights times ``routed_scaling_factor``; one test checks that the bias and the
groups change the experts picked here, so a router that ignored them would fail. The
reference model's router (the gloo layer-stack tests' MoE) is checked against HF's too.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from cp_gloo_harness import free_port, run_ranks

pytestmark = pytest.mark.distributed

HIDDEN, INTER, EXPERTS, PER_TOKEN, GROUPS, TOPK_GROUPS = 64, 32, 8, 2, 4, 2


def _hf_moe():
    from transformers import DeepseekV32Config
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32MoE

    config = DeepseekV32Config(hidden_size=HIDDEN, moe_intermediate_size=INTER, n_routed_experts=EXPERTS,
                               num_experts_per_tok=PER_TOKEN, n_group=GROUPS, topk_group=TOPK_GROUPS,
                               n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
                               hidden_act="silu")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    moe = DeepseekV32MoE(config)
    with torch.no_grad():
        for _, param in sorted(moe.named_parameters()):
            param.copy_(torch.randn(param.shape, generator=gen) * param.shape[-1] ** -0.5)
        moe.gate.e_score_correction_bias.copy_(torch.randn(EXPERTS, generator=gen) * 0.1)
    return config, moe


def _plain_topk(moe, x):
    scores = torch.nn.functional.linear(x, moe.gate.weight).sigmoid()
    return scores.topk(PER_TOKEN, dim=-1)[1].sort(-1).values


def _rows(rank: int) -> torch.Tensor:
    return torch.randn(5 + 3 * rank, HIDDEN, generator=torch.Generator().manual_seed(10 + rank))


def _run_ep_moe(group, run_id: str):
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import destroy_model_parallel, init_distributed_environment, initialize_model_parallel

    from vllm_cp_nsa.adapter.ep_moe import CpNsaExpertParallelMoE

    config, hf = _hf_moe()
    vllm_config = VllmConfig()
    object.__setattr__(vllm_config, "model_config", SimpleNamespace(dtype=torch.float32, is_moe=True))
    os.environ["VLLM_DIST_IDENT"] = run_id  # names the CPU shared-memory group of this run's ranks
    with set_current_vllm_config(vllm_config):
        # the harness already joined the gloo world; vLLM builds its TP group over it
        init_distributed_environment(world_size=group.world_size, rank=group.rank, local_rank=group.rank,
                                     distributed_init_method=f"tcp://127.0.0.1:{free_port()}", backend="gloo")
        initialize_model_parallel(group.world_size, 1)
        try:
            config.scoring_func, config.topk_method = "sigmoid", "noaux_tc"
            moe = CpNsaExpertParallelMoE(vllm_config, config, "model.layers.1.mlp", group)
            _load_hf_weights(moe, hf)
            x = _rows(group.rank)
            with torch.no_grad():
                out = moe(x)
            return {"out": out, "local_experts": sorted(int(e) for e in moe.experts)}
        finally:
            destroy_model_parallel()


def _load_hf_weights(moe, hf) -> None:
    """HF's stacked expert tensors into vLLM's per-expert MLPs (gate_up_proj = [gate; up])."""
    with torch.no_grad():
        moe.gate.weight.copy_(hf.gate.weight)
        moe.gate.e_score_correction_bias.copy_(hf.gate.e_score_correction_bias)
        for e, mlp in moe.experts.items():
            mlp.gate_up_proj.weight.copy_(hf.experts.gate_up_proj[int(e)])
            mlp.down_proj.weight.copy_(hf.experts.down_proj[int(e)])
        shared = hf.shared_experts
        moe.shared_experts.gate_up_proj.weight.copy_(torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        moe.shared_experts.down_proj.weight.copy_(shared.down_proj.weight)
    _process_weights_after_loading(moe)


def _process_weights_after_loading(module) -> None:
    """What vLLM's loader runs after the weights are in: each quant method's post-processing."""
    for sub in module.modules():
        method = getattr(sub, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(sub)


def test_routing_config_exercises_groups_and_bias():
    _, hf = _hf_moe()
    x = torch.cat([_rows(r) for r in range(4)])
    with torch.no_grad():
        _, _, chosen = hf.gate(x)
    differs = (chosen.sort(-1).values != _plain_topk(hf, x)).any(-1)
    assert differs.sum() >= 5, "bias / groups must change some rows' experts"


def test_reference_router_is_hfs():
    """reference_model's router (the gloo layer-stack tests' MoE) picks and weights the
    experts as HF's DeepSeek-V3.2 router does."""
    from vllm_cp_nsa.reference_model import Dims, ShardedMoe

    _, hf = _hf_moe()
    dims = Dims(hidden=HIDDEN, experts=EXPERTS, experts_per_token=PER_TOKEN, expert_groups=GROUPS,
                topk_groups=TOPK_GROUPS, routed_scaling=2.5)  # fmt: skip
    ref = ShardedMoe(dims, torch.Generator().manual_seed(0), 0, 1, torch.float32)
    with torch.no_grad():
        ref.router.copy_(hf.gate.weight)
        ref.bias.copy_(hf.gate.e_score_correction_bias)
        x = torch.cat([_rows(r) for r in range(4)])
        _, hf_weights, hf_ids = hf.gate(x)
        weights, ids = ref.route(x)
    order, hf_order = ids.argsort(-1), hf_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
    assert torch.allclose(weights.gather(1, order), hf_weights.gather(1, hf_order), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("world_size", [2, 4])
def test_scattered_moe_equals_hf_moe(world_size):
    results = run_ranks(_run_ep_moe, world_size, f"cpnsa-ep-moe-{os.getpid()}-{world_size}", timeout=240)
    _, hf = _hf_moe()
    owned = sorted(e for r in results for e in r["local_experts"])
    assert owned == list(range(EXPERTS))  # every expert on exactly one rank
    for rank, result in enumerate(results):
        with torch.no_grad():
            expected = hf(_rows(rank).unsqueeze(0)).squeeze(0)
        err = ((result["out"] - expected).norm() / expected.norm()).item()
        assert err <= 1e-5, f"rank {rank}: relative error {err:.2e}"
