"""CP collectives and the MoE communicators (vLLM-free).

``CpGroup`` is the small collective surface the core needs. The adapter wraps
vLLM's TP ``GroupCoordinator`` in it; tests and GPU benchmarks wrap a
``torch.distributed`` process group (``TorchDistGroup``).

MoE communicators move the residual-stream rows between the attention layout
(each rank holds its ``SplitPlan`` rows) and the MoE / dense-MLP layout:

- ``full``: all-gather local rows (rank-major) -> the TP-sharded MLP *without* its
  all-reduce, on the real tokens only -> reduce-scatter, which both sums the TP
  partials and hands each rank back exactly the rows it contributed (MoE is
  per-token, so rank-major order needs no re-ordering).
- ``scattered``: local rows go straight into an expert-parallel MLP that does its
  own all-to-all dispatch (DeepEP-style); no gather here.

Unsplit batches take the plain TP path in both: MLP then all-reduce.
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

import torch
import torch.distributed as dist

from .split_plan import SplitPlan

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CpGroup(Protocol):
    world_size: int
    rank: int

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Equal-size dim-0 all-gather, rank-major: ``[world * n, ...]``."""
        ...

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, keep this rank's dim-0 chunk: ``[n / world, ...]``."""
        ...

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor: ...

    def all_to_all(
        self, x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int]
    ) -> torch.Tensor: ...


class TorchDistGroup:
    """``CpGroup`` over a ``torch.distributed`` process group (gloo or NCCL)."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((self.world_size * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x, group=self.group)
        return out

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        out = x.new_empty((x.shape[0] // self.world_size, *x.shape[1:]))
        _reduce_scatter_single(out, x, group=self.group)
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, group=self.group)
        return x

    def all_to_all(
        self, x: torch.Tensor, output_split_sizes: list[int], input_split_sizes: list[int]
    ) -> torch.Tensor:
        out = x.new_empty((sum(output_split_sizes), *x.shape[1:]))
        dist.all_to_all_single(
            out, x.contiguous(), output_split_sizes, input_split_sizes, group=self.group
        )
        return out


def gather_token_rows(x_local: torch.Tensor, plan: SplitPlan, group: CpGroup) -> torch.Tensor:
    """Every rank's local rows back in token order: ``[T, ...]`` on every rank."""
    if not plan.is_split:
        return x_local[: plan.num_tokens]
    return plan.restore_token_order(group.all_gather(x_local))


def pad_rows(x: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Zero rows past the real tokens, for inputs vLLM padded (or a collective sized its rows)."""
    if x.shape[0] >= num_rows:
        return x
    return torch.cat([x, x.new_zeros(num_rows - x.shape[0], *x.shape[1:])])


MlpFn = Callable[[torch.Tensor], torch.Tensor]


class MoeCommunicator(Protocol):
    name: str
    mlp_returns_partial_sums: bool
    """True: the MLP is TP-sharded and returns this rank's partial sums (its
    all-reduce removed); False: it returns complete outputs for its own rows."""
    supports_cuda_graphs: bool
    """True when its collectives have static sizes (capturable in a CUDA graph)."""

    def forward(self, mlp: MlpFn, x_local: torch.Tensor, plan: SplitPlan, group: CpGroup) -> torch.Tensor:
        """Run ``mlp`` for this rank's rows and return complete outputs for them."""
        ...


class FullMoeCommunicator:
    """All-gather -> MLP without its all-reduce -> reduce-scatter (fused-MoE layout).

    ``mlp`` returns this rank's TP partial sums (its all-reduce removed).
    """

    name = "full"
    mlp_returns_partial_sums = True
    supports_cuda_graphs = True

    def forward(self, mlp: MlpFn, x_local: torch.Tensor, plan: SplitPlan, group: CpGroup) -> torch.Tensor:
        if not plan.is_split or group.world_size == 1:
            out = mlp(x_local)
            return group.all_reduce(out) if group.world_size > 1 else out
        gathered = group.all_gather(x_local)
        if plan.padded_num_tokens == plan.num_tokens:
            return group.reduce_scatter(mlp(gathered))
        # Only the T real tokens go through the MLP: an uneven split (in-seq with short
        # requests) can gather far more rows than the batch has tokens, more than vLLM
        # sized the fused-MoE workspace for (max_num_batched_tokens).
        token_rows = plan.token_rows_in_gathered()
        partial = mlp(gathered.index_select(0, token_rows))
        rows = partial.new_zeros((gathered.shape[0], *partial.shape[1:]))
        return group.reduce_scatter(rows.index_copy_(0, token_rows, partial))


class ScatteredMoeCommunicator:
    """Local rows go straight into an expert-parallel MLP (it owns its all-to-all).

    ``mlp`` must return complete (reduced) outputs for exactly the rows it gets;
    unsplit batches hold the same rows on every rank and take the same path. An MLP
    whose ``takes_split_plan`` is true also gets the plan (vLLM's sequence-parallel MoE
    sizes its collectives per rank and needs to know whether the rows are split).
    """

    name = "scattered"
    mlp_returns_partial_sums = False
    supports_cuda_graphs = False  # all-to-all split sizes come from the routing (host sync)

    def forward(self, mlp: MlpFn, x_local: torch.Tensor, plan: SplitPlan, group: CpGroup) -> torch.Tensor:
        if getattr(mlp, "takes_split_plan", False):
            return mlp(x_local, plan)
        return mlp(x_local)


def expert_parallel_moe(
    x: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    expert_owner: torch.Tensor,
    local_experts: Mapping[int, MlpFn],
    group: CpGroup,
) -> torch.Tensor:
    """Routed-expert output for this rank's rows, experts owned by ranks (all-to-all).

    x [n, H]; weights / expert_ids [n, k] (routing of this rank's rows);
    expert_owner [E] rank of each expert; local_experts: expert id -> MLP of the
    experts this rank owns. Every (row, expert) pair travels to the owner and its
    output back; returns the fp32 weighted sum ``[n, H]`` (shared experts excluded).
    """
    world = group.world_size
    rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(expert_ids.shape[1])
    flat_ids, flat_weights = expert_ids.flatten(), weights.flatten()
    dest = expert_owner.to(x.device)[flat_ids]
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=world)
    recv_counts = group.all_to_all(send_counts, [1] * world, [1] * world)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    x_in = group.all_to_all(x[rows[order]], recv, send)
    ids_in = group.all_to_all(flat_ids[order], recv, send)
    y = torch.zeros(x_in.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    for expert, mlp in local_experts.items():
        picked = torch.nonzero(ids_in == expert).flatten()
        if picked.numel():
            y[picked] = mlp(x_in[picked]).float()
    y_back = group.all_to_all(y, send, recv)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    out.index_add_(0, rows[order], y_back * flat_weights[order, None])
    return out
