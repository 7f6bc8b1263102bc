"""DP x CP with ``scattered`` riding vLLM's own expert-parallel MoE (issue 20), 4 gloo ranks:
``--data-parallel-size 2 -tp 2 --enable-expert-parallel``, all2all backend
``allgather_reducescatter``.

``VllmExpertParallelMoE`` is vLLM's DeepseekV2MoE: its FusedMoE with the expert map, its
all2all manager sizing the collectives from the forward context's DP metadata, its runner's
sequence-parallel chunking. Each rank feeds the rows a CP plan gives it -- round-robin (the
rows are vLLM's chunk as they are), in-seq over uneven requests (more rows than the chunk:
the whole batch goes in and vLLM chunks it), unsplit (the replica's rows on both ranks) --
under a forward context whose token counts differ per replica and include graph padding.
Every rank's outputs must equal HF transformers' DeepseekV32MoE on the same rows.

vLLM's CPU build cannot run this path by itself (``runtime.vllm_expert_parallel_moe`` keeps
the torch all-to-all there), for two reasons the test fills in, in the test process only:
its CPU communicator has no ``all_gatherv`` / ``reduce_scatterv`` (given here over gloo, as
the CUDA communicator does over NCCL), and its CPU fused-MoE kernel ignores the expert map
(given here by mapping global expert ids to local ones and zeroing the weights of the
experts other ranks own, as the GPU kernels do). Everything else is vLLM's code.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from cp_gloo_harness import run_ranks
from test_cp_dp_ep_moe import DP, TP, dp_tp_parallel_state
from test_cp_ep_moe_adapter import EXPERTS, HIDDEN, _hf_moe, _process_weights_after_loading

pytestmark = pytest.mark.distributed

# per replica: the requests' query lengths and the rows vLLM hands the model (graph padding)
ROUND_ROBIN = {0: ([7], 10), 1: ([5], 5)}  # replica 0: 3 padding rows, a chunk more than its tokens need
IN_SEQ_UNEVEN = {0: ([9, 1], 10), 1: ([2, 3], 5)}


def _install_cpu_ep_shims() -> None:
    """The two pieces vLLM's CPU build lacks for expert parallelism (module docstring)."""
    from vllm.distributed.device_communicators.cpu_communicator import CpuCommunicator
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe
    from vllm.platforms import current_platform

    class GlooVCommunicator(CpuCommunicator):
        def all_gatherv(self, input_, dim=0, sizes=None):
            tensors = input_ if isinstance(input_, list) else [input_]
            gathered = []
            for t in tensors:
                padded = t.new_zeros((max(sizes), *t.shape[1:]))
                padded[: t.shape[0]] = t
                parts = [torch.empty_like(padded) for _ in range(self.world_size)]
                dist.all_gather(parts, padded, group=self.device_group)
                gathered.append(torch.cat([p[:n] for p, n in zip(parts, sizes)]))
            return gathered if isinstance(input_, list) else gathered[0]

        def reduce_scatterv(self, input_, dim=-1, sizes=None):
            total = input_.clone()
            dist.all_reduce(total, group=self.device_group)
            start = sum(sizes[: self.rank_in_group])
            return total[start: start + sizes[self.rank_in_group]]

    apply = cpu_moe.CPUUnquantizedExperts.apply

    def apply_with_expert_map(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                              global_num_experts, expert_map, **kwargs):
        if expert_map is not None:
            local = expert_map[topk_ids.long()]
            topk_weights = torch.where(local >= 0, topk_weights, torch.zeros_like(topk_weights))
            topk_ids = local.clamp(min=0).to(topk_ids.dtype)
        return apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation,
                     global_num_experts, None, **kwargs)

    cpu_moe.CPUUnquantizedExperts.apply = apply_with_expert_map
    globals()["GlooVCommunicator"] = GlooVCommunicator
    type(current_platform).get_device_communicator_cls = classmethod(lambda cls: f"{__name__}.GlooVCommunicator")


def _replica_tokens(replica: int, num_input_tokens: int) -> torch.Tensor:
    return torch.randn(num_input_tokens, HIDDEN, generator=torch.Generator().manual_seed(60 + replica))


def _checkpoint(hf) -> list[tuple[str, torch.Tensor]]:
    """HF's MoE as checkpoint tensors (per-expert names, as the release stores them)."""
    tensors = [(f"model.layers.1.mlp.{k}", v) for k, v in hf.state_dict().items() if not k.startswith("experts.")]
    for e in range(EXPERTS):
        gate, up = hf.experts.gate_up_proj[e].chunk(2)
        tensors += [(f"model.layers.1.mlp.experts.{e}.gate_proj.weight", gate),
                    (f"model.layers.1.mlp.experts.{e}.up_proj.weight", up),
                    (f"model.layers.1.mlp.experts.{e}.down_proj.weight", hf.experts.down_proj[e])]
    return tensors


def _run_vllm_ep_moe(group, run_id: str):
    from torch import nn
    from vllm.distributed import get_tp_group
    from vllm.forward_context import set_forward_context

    from vllm_cp_nsa.adapter.ep_moe import VllmExpertParallelMoE
    from vllm_cp_nsa.adapter.runtime import VllmTpGroup
    from vllm_cp_nsa.adapter.weights import load_deepseek_v32_weights
    from vllm_cp_nsa.communicator import ScatteredMoeCommunicator
    from vllm_cp_nsa.split_plan import InSeqSplit, RoundRobinSplit, build_split_plan, unsplit_plan

    _install_cpu_ep_shims()
    config, hf = _hf_moe()
    config.scoring_func, config.topk_method, config.first_k_dense_replace = "sigmoid", "noaux_tc", 0
    replica, tp_rank = divmod(group.rank, TP)
    with dp_tp_parallel_state(group, run_id, data_parallel_rank=replica,
                              all2all_backend="allgather_reducescatter") as vllm_config:
        cp_group = VllmTpGroup(get_tp_group())
        root = nn.Module()
        root.model = nn.Module()
        root.model.layers = nn.ModuleList([nn.Module(), nn.Module()])
        moe = VllmExpertParallelMoE(vllm_config, config, "model.layers.1.mlp", cp_group)
        root.model.layers[1].mlp = moe
        load_deepseek_v32_weights(root, _checkpoint(hf), config, None)
        _process_weights_after_loading(moe)
        results = {}
        cases = {"round_robin": (ROUND_ROBIN, RoundRobinSplit()), "in_seq_uneven": (IN_SEQ_UNEVEN, InSeqSplit()),
                 "unsplit": (ROUND_ROBIN, None)}
        for name, (batches, strategy) in cases.items():
            query_lens, num_input_tokens = batches[replica]
            plan = (build_split_plan(query_lens, TP, tp_rank, strategy, num_input_tokens=num_input_tokens)
                    if strategy is not None else unsplit_plan(sum(query_lens), TP, tp_rank, "test"))
            tokens = _replica_tokens(replica, num_input_tokens)
            x_local = plan.take_local(tokens[: plan.num_tokens])
            across_dp = torch.tensor([batches[d][1] for d in range(DP)])
            with torch.no_grad(), set_forward_context(None, vllm_config, num_tokens=num_input_tokens,
                                                      num_tokens_across_dp=across_dp):
                out = ScatteredMoeCommunicator().forward(moe, x_local, plan, cp_group)
            results[name] = {"out": out, "local_token_idx": plan.local_token_idx, "is_split": plan.is_split,
                             "rows": x_local.shape[0], "chunk": -(-num_input_tokens // TP)}
        return results


def test_dp_times_cp_scattered_rides_vllms_expert_parallel_moe():
    results = run_ranks(_run_vllm_ep_moe, DP * TP, f"cpnsa-dp-vllm-ep-{os.getpid()}", timeout=300)
    _, hf = _hf_moe()
    for rank, by_case in enumerate(results):
        replica = rank // TP
        assert by_case["round_robin"]["rows"] == by_case["round_robin"]["chunk"]  # rows go in as vLLM's chunk
        assert by_case["unsplit"]["is_split"] is False
        for name, result in by_case.items():
            num_input_tokens = (IN_SEQ_UNEVEN if name == "in_seq_uneven" else ROUND_ROBIN)[replica][1]
            tokens = _replica_tokens(replica, num_input_tokens)
            idx = result["local_token_idx"]
            with torch.no_grad():
                expected = hf(tokens.unsqueeze(0)).squeeze(0)[idx.clamp(min=0)]
            real = idx >= 0
            assert result["out"].shape == (result["rows"], HIDDEN), f"rank {rank} {name}"
            err = ((result["out"][real] - expected[real]).norm() / expected[real].norm()).item()
            assert err <= 1e-5, f"rank {rank} {name}: relative error {err:.2e}"
    # the uneven in-seq case must have taken the whole-batch path on some rank (more rows than the chunk)
    assert any(r["in_seq_uneven"]["rows"] > r["in_seq_uneven"]["chunk"] for r in results)
