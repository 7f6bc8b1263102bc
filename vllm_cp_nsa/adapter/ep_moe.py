"""Expert-parallel MoEs for the ``scattered`` communicator (tokens stay on their rank).

``VllmExpertParallelMoE``: under vLLM's sequence-parallel MoE (``--data-parallel-size D``,
``-tp N > 1``, ``--enable-expert-parallel``, one of its dispatching all2all backends) the rows
go to vLLM's own DeepseekV2MoE -- its FusedMoE, expert map and all2all manager (DeepEP where
configured) -- exactly as vLLM's own V3.2 hands it each rank's sequence-parallel chunk.

``CpNsaExpertParallelMoE`` (the fallback, and the CPU path): routed expert e is owned by
rank ``e * N // E`` with its full intermediate size; the router and the shared expert are
replicated. Each rank routes its own rows,
sends every (row, expert) pair to the expert's owner with ``all_to_all``,
computes its local experts, and receives the weighted results back. Returns
complete outputs for exactly the rows it was given, so no gather is needed
around it. Routing follows DeepSeek-V3 (sigmoid scores + correction bias for
the choice, group-limited top-k, renormalized, times routed_scaling_factor),
the same rule as vLLM's grouped top-k and HF's router.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.deepseek_v2 import DeepseekV2MLP, DeepseekV2MoE

from ..communicator import CpGroup, expert_parallel_moe, gather_token_rows, pad_rows
from ..split_plan import SplitPlan


def expert_owner(expert: int, num_experts: int, world_size: int) -> int:
    return expert * world_size // num_experts


class CpNsaExpertParallelMoE(nn.Module):
    def __init__(self, vllm_config: VllmConfig, config, prefix: str, group: CpGroup):
        super().__init__()
        if config.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"vllm_cp_nsa scattered MoE: unsupported scoring_func {config.scoring_func}")
        self.group = group
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.num_groups = getattr(config, "n_group", 1) or 1
        self.topk_groups = getattr(config, "topk_group", 1) or 1
        self.renormalize = config.norm_topk_prob
        self.scaling = getattr(config, "routed_scaling_factor", 1.0)
        self.scoring = config.scoring_func
        self.gate = ReplicatedLinear(config.hidden_size, self.num_experts, bias=False, quant_config=None,
                                     prefix=f"{prefix}.gate")
        self.gate.e_score_correction_bias = (
            nn.Parameter(torch.zeros(self.num_experts, dtype=torch.float32), requires_grad=False)
            if getattr(config, "topk_method", None) == "noaux_tc" else None
        )
        self.owner = torch.tensor([expert_owner(e, self.num_experts, group.world_size)
                                   for e in range(self.num_experts)])

        def mlp(name: str, inter: int) -> DeepseekV2MLP:  # full weights on this rank
            return DeepseekV2MLP(config.hidden_size, inter, config.hidden_act, vllm_config.quant_config,
                                 reduce_results=False, is_sequence_parallel=True, prefix=f"{prefix}.{name}")

        self.experts = nn.ModuleDict({
            str(e): mlp(f"experts.{e}", config.moe_intermediate_size)
            for e in range(self.num_experts) if self.owner[e] == group.rank
        })
        self.shared_experts = (mlp("shared_experts", config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts else None)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(x)[0].float()
        scores = logits.sigmoid() if self.scoring == "sigmoid" else logits.softmax(-1)
        choice = scores if self.gate.e_score_correction_bias is None else scores + self.gate.e_score_correction_bias
        if self.num_groups > 1:
            grouped = choice.view(x.shape[0], self.num_groups, self.num_experts // self.num_groups)  # 0 rows too
            group_scores = (grouped.topk(2, dim=-1)[0].sum(-1) if self.gate.e_score_correction_bias is not None
                            else grouped.amax(-1))
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_groups, dim=-1)[1], True)
            choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
        ids = choice.topk(self.top_k, dim=-1)[1]
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        local = {int(e): mlp for e, mlp in self.experts.items()}
        out = expert_parallel_moe(x, weights, ids, self.owner, local, self.group)
        if self.shared_experts is not None:
            out += self.shared_experts(x).float()
        return out.to(x.dtype)


class VllmExpertParallelMoE(DeepseekV2MoE):
    """vLLM's own DeepseekV2MoE (same parameters, same weight loading as ``moe: full``) fed
    the CP split's rows.

    vLLM sizes its sequence-parallel collectives from the forward context: every TP rank of
    DP replica d holds ``ceil(T_d / N)`` rows. A round-robin split holds exactly that many
    (``rows_per_rank`` of a plan built for vLLM's padded batch), so they go in as they are. An
    unsplit batch (the same rows on every rank), or a split with another row count than vLLM's
    chunk (in-seq over uneven requests), goes in whole in token order and vLLM chunks it, at
    the cost of one all-gather over the CP group.
    """

    takes_split_plan = True

    def __init__(self, vllm_config: VllmConfig, config, prefix: str, cp_group: CpGroup):
        super().__init__(config=config, parallel_config=vllm_config.parallel_config,
                         quant_config=vllm_config.quant_config, prefix=prefix,
                         apply_routed_scale_to_output=True)
        if not self.is_sequence_parallel:
            raise ValueError("vllm_cp_nsa: VllmExpertParallelMoE needs vLLM's sequence-parallel MoE "
                             "(parallel_config.use_sequence_parallel_moe)")
        self.cp_group = cp_group
        self.data_parallel_rank = vllm_config.parallel_config.data_parallel_rank

    def forward(self, x_local: torch.Tensor, plan: SplitPlan) -> torch.Tensor:  # type: ignore[override]
        # this DP replica's token count as vLLM sized the forward (its padded batch)
        num_tokens = int(get_forward_context().dp_metadata.num_tokens_across_dp_cpu[self.data_parallel_rank])
        chunk = -(-num_tokens // self.cp_group.world_size)
        if plan.is_split and x_local.shape[0] == chunk:
            return super().forward(x_local, already_sequence_parallel=True)
        tokens = pad_rows(gather_token_rows(x_local, plan, self.cp_group), num_tokens)
        return plan.take_local(super().forward(tokens, already_sequence_parallel=False)[: plan.num_tokens])
