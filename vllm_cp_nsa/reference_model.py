"""A vLLM-free DeepSeek-V3.2 layer stack on the plugin's core.

Used where vLLM is absent or in the way: the multi-process (gloo) CP tests on
CPU and the GPU benchmarks (NCCL). Same data flow as the vLLM adapter: replicated
attention + indexer for this rank's rows, KV gathered and written on every rank,
the MLP reached through a MoE communicator. ``attention_tp=True`` gives the
baseline vLLM's TP uses instead: heads split across ranks, indexer replicated on
all tokens, output all-reduced.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .communicator import CpGroup, MoeCommunicator, expert_parallel_moe, gather_token_rows
from .kernels.kv_cache_ref import FP8_DS_MLA_ROW_BYTES, INDEX_HEAD_DIM, INDEXER_FP8_SLOT_BYTES
from .nsa_attention import NsaCaches, NsaForwardMetadata, build_forward_metadata, nsa_attention
from .split_plan import SplitStrategy


@dataclass(frozen=True)
class Dims:
    hidden: int = 256
    heads: int = 4
    q_lora: int = 64
    kv_lora: int = 512
    nope: int = 32
    rope: int = 64
    v_head: int = 32
    index_heads: int = 16
    index_dim: int = 128
    topk: int = 64
    experts: int = 8
    experts_per_token: int = 2
    expert_groups: int = 2
    """DeepSeek-V3's group-limited routing: experts in ``expert_groups`` groups, each token's
    experts chosen within its best ``topk_groups`` (a group scored by its two best experts)."""
    topk_groups: int = 1
    routed_scaling: float = 2.5
    moe_inter: int = 64
    shared_inter: int = 64
    dense_inter: int = 256
    rope_theta: float = 10000.0

    @staticmethod
    def deepseek_v32(layers_topk: int = 2048, experts: int = 8) -> "Dims":
        """Real per-layer dimensions (fewer experts unless asked)."""
        return Dims(hidden=7168, heads=128, q_lora=1536, nope=128, v_head=128, index_heads=64,
                    topk=layers_topk, experts=experts, experts_per_token=min(8, experts),
                    expert_groups=max(1, min(8, experts // 2)), topk_groups=max(1, min(8, experts // 2) // 2),
                    moe_inter=2048, shared_inter=2048, dense_inter=18432)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    var = x.float().pow(2).mean(-1, keepdim=True)
    return (x.float() * torch.rsqrt(var + eps)).to(x.dtype) * weight


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of ``x`` [n, ..., D] (interleaved pairs or NeoX halves)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32) / dim))
    angles = positions.float()[:, None] * inv_freq[None]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (dim // 2,)
    cos, sin = angles.cos().view(shape), angles.sin().view(shape)
    xf = x.float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    else:
        x1, x2 = xf[..., : dim // 2], xf[..., dim // 2 :]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


def _param(gen: torch.Generator, *shape: int, std: float | None = None, dtype=torch.float32) -> torch.Tensor:
    std = std if std is not None else shape[-1] ** -0.5
    return (torch.randn(*shape, generator=gen) * std).to(dtype)


class NsaLayer(nn.Module):
    """MLA + lightning indexer + sparse attention. Weights identical on every rank."""

    def __init__(self, dims: Dims, gen: torch.Generator, dtype=torch.float32):
        super().__init__()
        d = dims
        self.dims = d
        p = lambda *s, **kw: nn.Parameter(_param(gen, *s, dtype=dtype, **kw), requires_grad=False)
        self.q_a = p(d.q_lora, d.hidden)
        self.q_a_norm = nn.Parameter(torch.ones(d.q_lora, dtype=dtype), requires_grad=False)
        self.q_b = p(d.heads * (d.nope + d.rope), d.q_lora)
        self.kv_a = p(d.kv_lora + d.rope, d.hidden)
        self.kv_a_norm = nn.Parameter(torch.ones(d.kv_lora, dtype=dtype), requires_grad=False)
        kv_b = _param(gen, d.heads * (d.nope + d.v_head), d.kv_lora, dtype=dtype)
        kv_b = kv_b.view(d.heads, d.nope + d.v_head, d.kv_lora)
        self.w_uk_t = nn.Parameter(kv_b[:, : d.nope].contiguous(), requires_grad=False)  # [H, P, 512]
        self.w_uv = nn.Parameter(kv_b[:, d.nope :].transpose(1, 2).contiguous(), requires_grad=False)  # [H, 512, V]
        self.o = p(d.hidden, d.heads * d.v_head)
        self.wq_b = p(d.index_heads * d.index_dim, d.q_lora)
        self.wk = p(d.index_dim, d.hidden)
        self.k_norm_w = nn.Parameter(torch.ones(d.index_dim, dtype=dtype), requires_grad=False)
        self.k_norm_b = nn.Parameter(torch.zeros(d.index_dim, dtype=dtype), requires_grad=False)
        self.weights_proj = p(d.index_heads, d.hidden)
        self.sm_scale = (d.nope + d.rope) ** -0.5

    def project(self, x: torch.Tensor, positions: torch.Tensor):
        d = self.dims
        n = x.shape[0]
        q_c = _rms_norm(F.linear(x, self.q_a), self.q_a_norm)
        q = F.linear(q_c, self.q_b).view(n, d.heads, d.nope + d.rope)
        q_nope, q_pe = q.split([d.nope, d.rope], dim=-1)
        kv_c, k_pe = F.linear(x, self.kv_a).split([d.kv_lora, d.rope], dim=-1)
        kv_c = _rms_norm(kv_c, self.kv_a_norm)
        q_pe = _rope(q_pe, positions, d.rope_theta, interleaved=True)
        k_pe = _rope(k_pe, positions, d.rope_theta, interleaved=True)
        iq = F.linear(q_c, self.wq_b).view(n, d.index_heads, d.index_dim)
        ik = F.layer_norm(F.linear(x, self.wk).float(), (d.index_dim,), self.k_norm_w.float(),
                          self.k_norm_b.float(), 1e-6).to(x.dtype)
        iq = torch.cat([_rope(iq[..., : d.rope], positions, d.rope_theta, False), iq[..., d.rope :]], -1)
        ik = torch.cat([_rope(ik[:, : d.rope], positions, d.rope_theta, False), ik[:, d.rope :]], -1)
        iw = F.linear(x, self.weights_proj).float() * (d.index_heads**-0.5 * d.index_dim**-0.5)
        return q_nope, q_pe, kv_c, k_pe, iq, iw, ik

    def forward(self, x, positions, meta: NsaForwardMetadata, caches: NsaCaches, group: CpGroup, ops):
        q_nope, q_pe, kv_c, k_pe, iq, iw, ik = self.project(x, positions)
        out = nsa_attention(
            q_nope=q_nope, q_pe=q_pe, kv_c=kv_c, k_pe=k_pe, index_q=iq, index_weights=iw,
            index_k=ik, local_positions=positions, w_uk_t=self.w_uk_t, w_uv=self.w_uv, meta=meta,
            caches=caches, topk=self.dims.topk, sm_scale=self.sm_scale, group=group, ops=ops,
        )
        return F.linear(out.to(x.dtype), self.o)


class ShardedMlp(nn.Module):
    """SwiGLU MLP, intermediate dim sharded over ``tp_size``; returns TP partial sums."""

    def __init__(self, hidden: int, inter: int, gen: torch.Generator, tp_rank: int, tp_size: int, dtype):
        super().__init__()
        gate, up, down = (_param(gen, inter, hidden, dtype=dtype), _param(gen, inter, hidden, dtype=dtype),
                          _param(gen, hidden, inter, dtype=dtype))
        shard = slice(tp_rank * inter // tp_size, (tp_rank + 1) * inter // tp_size)
        self.gate_up = nn.Parameter(torch.cat([gate[shard], up[shard]]), requires_grad=False)
        self.down = nn.Parameter(down[:, shard].contiguous(), requires_grad=False)

    def forward(self, x):
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


class ShardedMoe(nn.Module):
    """Routed experts + one shared expert, every expert's intermediate dim sharded over
    ``tp_size``; returns TP partial sums. DeepSeek-V3's router: sigmoid scores plus a
    correction bias pick the experts (group-limited), the unbiased scores of the picks,
    renormalized and scaled by ``routed_scaling``, weight them."""

    def __init__(self, dims: Dims, gen: torch.Generator, tp_rank: int, tp_size: int, dtype):
        super().__init__()
        self.dims = dims
        self.router = nn.Parameter(_param(gen, dims.experts, dims.hidden, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(_param(gen, dims.experts, std=0.05, dtype=torch.float32), requires_grad=False)
        self.experts = nn.ModuleList(
            ShardedMlp(dims.hidden, dims.moe_inter, gen, tp_rank, tp_size, dtype) for _ in range(dims.experts)
        )
        self.shared = ShardedMlp(dims.hidden, dims.shared_inter, gen, tp_rank, tp_size, dtype)

    def route(self, x):
        scores = F.linear(x.float(), self.router).sigmoid()
        choice = scores + self.bias
        groups = choice.view(x.shape[0], self.dims.expert_groups, -1)
        best_groups = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1).topk(self.dims.topk_groups, dim=-1).indices
        allowed = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
        choice = choice.masked_fill(~allowed.repeat_interleave(groups.shape[-1], dim=1), float("-inf"))
        ids = choice.topk(self.dims.experts_per_token, dim=-1).indices
        weights = scores.gather(1, ids)
        return weights / weights.sum(-1, keepdim=True) * self.dims.routed_scaling, ids

    def forward(self, x):
        weights, ids = self.route(x)
        out = self.shared(x).float()
        for e, expert in enumerate(self.experts):
            rows, slot = torch.nonzero(ids == e, as_tuple=True)
            if rows.numel():
                out.index_add_(0, rows, expert(x[rows]).float() * weights[rows, slot, None])
        return out.to(x.dtype)


class ExpertParallelMoe(nn.Module):
    """Same MoE with experts *owned* by ranks (expert e on rank e * size // E) and
    tokens moved by all-to-all (the ``scattered`` layout). The shared expert is
    replicated. Returns complete outputs for exactly the rows it was given."""

    def __init__(self, dims: Dims, gen: torch.Generator, group: CpGroup, dtype):
        super().__init__()
        self.dims = dims
        self.group = group
        full = ShardedMoe(dims, gen, 0, 1, dtype)
        self.router = full.router
        self.owner = [e * group.world_size // dims.experts for e in range(dims.experts)]
        self.local = nn.ModuleDict({str(e): full.experts[e] for e in range(dims.experts)
                                    if self.owner[e] == group.rank})
        self.shared = full.shared
        self._route = full.route

    def forward(self, x):
        weights, ids = self._route(x)
        local = {int(e): expert for e, expert in self.local.items()}
        out = expert_parallel_moe(x, weights, ids, torch.tensor(self.owner), local, self.group)
        return (out + self.shared(x).float()).to(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, dims: Dims, gen: torch.Generator, moe: bool, group: CpGroup,
                 communicator: MoeCommunicator, dtype):
        super().__init__()
        self.attn = NsaLayer(dims, gen, dtype)
        self.ln1 = nn.Parameter(torch.ones(dims.hidden, dtype=dtype), requires_grad=False)
        self.ln2 = nn.Parameter(torch.ones(dims.hidden, dtype=dtype), requires_grad=False)
        self.communicator = communicator
        if not communicator.mlp_returns_partial_sums:
            self.mlp = ExpertParallelMoe(dims, gen, group, dtype) if moe else \
                ShardedMlp(dims.hidden, dims.dense_inter, gen, 0, 1, dtype)
        elif moe:
            self.mlp = ShardedMoe(dims, gen, group.rank, group.world_size, dtype)
        else:
            self.mlp = ShardedMlp(dims.hidden, dims.dense_inter, gen, group.rank, group.world_size, dtype)

    def forward(self, x, residual, positions, meta, caches, group, ops):
        residual = x if residual is None else x + residual
        h = self.attn(_rms_norm(residual, self.ln1), positions, meta, caches, group, ops)
        residual = residual + h
        h = self.communicator.forward(self.mlp, _rms_norm(residual, self.ln2), meta.plan, group)
        return h, residual


@dataclass
class PagedBatch:
    """A batch in vLLM's flattened form with a simple block allocation."""

    query_lens: list[int]
    context_lens: list[int]
    """Tokens already in the cache for each request (prefix / earlier chunks)."""
    block_size: int
    max_blocks_per_req: int
    positions: torch.Tensor = field(init=False)
    slot_mapping: torch.Tensor = field(init=False)
    block_table: torch.Tensor = field(init=False)

    def __post_init__(self):
        positions, slots = [], []
        for r, (q, c) in enumerate(zip(self.query_lens, self.context_lens)):
            pos = torch.arange(c, c + q)
            positions.append(pos)
            slots.append(r * self.max_blocks_per_req * self.block_size + pos)
        self.positions = torch.cat(positions) if positions else torch.empty(0, dtype=torch.long)
        self.slot_mapping = torch.cat(slots) if slots else torch.empty(0, dtype=torch.long)
        nreq = len(self.query_lens)
        self.block_table = (torch.arange(nreq)[:, None] * self.max_blocks_per_req
                            + torch.arange(self.max_blocks_per_req)[None]).to(torch.int32)

    @property
    def num_blocks(self) -> int:
        return len(self.query_lens) * self.max_blocks_per_req


def make_caches(dims: Dims, num_layers: int, num_blocks: int, block_size: int, kv_cache_dtype: str,
                dtype, device) -> list[NsaCaches]:
    fp8 = kv_cache_dtype == "fp8_ds_mla"
    caches = []
    for _ in range(num_layers):
        if fp8:
            latent = torch.zeros(num_blocks, block_size, FP8_DS_MLA_ROW_BYTES, dtype=torch.uint8, device=device)
            index = torch.zeros(num_blocks, block_size * INDEXER_FP8_SLOT_BYTES, dtype=torch.uint8, device=device)
        else:
            latent = torch.zeros(num_blocks, block_size, dims.kv_lora + dims.rope, dtype=dtype, device=device)
            index = torch.zeros(num_blocks, block_size, INDEX_HEAD_DIM, dtype=dtype, device=device)
        caches.append(NsaCaches(latent, index, kv_cache_dtype, fp8))
    return caches


class LayerStack(nn.Module):
    """``num_layers`` decoder layers (first dense, rest MoE) over hidden states."""

    def __init__(self, dims: Dims, num_layers: int, seed: int, group: CpGroup,
                 communicator: MoeCommunicator, dtype=torch.float32, first_dense: bool = True):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.dims = dims
        self.layers = nn.ModuleList(
            DecoderLayer(dims, gen, moe=not (first_dense and i == 0), group=group,
                         communicator=communicator, dtype=dtype)
            for i in range(num_layers)
        )
        self.final_norm = nn.Parameter(torch.ones(dims.hidden, dtype=dtype), requires_grad=False)

    def forward(self, hidden: torch.Tensor, batch: PagedBatch, caches: Sequence[NsaCaches],
                group: CpGroup, strategy: SplitStrategy | None, ops, min_tokens_for_cp: int = 0,
                max_decode_query_len: int = 1, graph_padded: bool = False,
                buffers=None) -> torch.Tensor:
        """Token-ordered ``hidden`` [>= T, hidden] -> token-ordered output [T, hidden].

        Rows of ``hidden`` past the batch's T real tokens are input padding (as for a
        CUDA-graph capture size): the plan treats them as padding rows. With
        ``graph_padded`` they are split like a FULL-graph batch's padding and the
        output keeps every input row (the real tokens first).
        """
        num_rows = hidden.shape[0]
        meta = build_forward_metadata(
            batch.query_lens, batch.slot_mapping.to(hidden.device), batch.block_table.to(hidden.device),
            batch.block_size, group.world_size, group.rank, strategy, min_tokens_for_cp,
            max_decode_query_len, hidden.device, num_input_tokens=num_rows, graph_padded=graph_padded,
            buffers=buffers,
        )
        positions = batch.positions.to(hidden.device)
        positions = torch.cat([positions, positions.new_zeros(num_rows - positions.shape[0])])
        x = meta.plan.take_local(hidden[: meta.plan.num_tokens])
        positions = meta.plan.take_local(positions[: meta.plan.num_tokens])
        residual = None
        for layer, cache in zip(self.layers, caches):
            x, residual = layer(x, residual, positions, meta, cache, group, ops)
        out = _rms_norm(x + residual, self.final_norm)
        return gather_token_rows(out, meta.plan, group)


class MtpLayer(nn.Module):
    """DeepSeek's MTP draft layer: normed token embedding + normed previous hidden
    -> eh_proj -> one MoE decoder layer. Embeddings, previous hidden states and
    positions are all split with the draft batch's plan."""

    def __init__(self, dims: Dims, seed: int, group: CpGroup, communicator: MoeCommunicator,
                 dtype=torch.float32):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.enorm = nn.Parameter(torch.ones(dims.hidden, dtype=dtype), requires_grad=False)
        self.hnorm = nn.Parameter(torch.ones(dims.hidden, dtype=dtype), requires_grad=False)
        self.eh_proj = nn.Parameter(_param(gen, dims.hidden, 2 * dims.hidden, dtype=dtype), requires_grad=False)
        self.block = DecoderLayer(dims, gen, moe=True, group=group, communicator=communicator, dtype=dtype)
        self.final_norm = nn.Parameter(torch.ones(dims.hidden, dtype=dtype), requires_grad=False)

    def forward(self, embeds: torch.Tensor, previous_hidden: torch.Tensor, batch: PagedBatch,
                cache: NsaCaches, group: CpGroup, strategy: SplitStrategy | None, ops,
                max_decode_query_len: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (hidden for logits, normed hidden recycled into the next step), token order."""
        meta = build_forward_metadata(
            batch.query_lens, batch.slot_mapping.to(embeds.device), batch.block_table.to(embeds.device),
            batch.block_size, group.world_size, group.rank, strategy, 0, max_decode_query_len,
            embeds.device, num_input_tokens=embeds.shape[0],
        )
        plan = meta.plan
        positions = plan.take_local(batch.positions.to(embeds.device))
        e = plan.take_local(embeds).masked_fill((positions == 0)[:, None], 0)
        x = F.linear(torch.cat([_rms_norm(e, self.enorm), _rms_norm(plan.take_local(previous_hidden), self.hnorm)],
                               dim=-1), self.eh_proj)
        x, residual = self.block(x, None, positions, meta, cache, group, ops)
        hidden = x + residual
        return (gather_token_rows(hidden, plan, group),
                gather_token_rows(_rms_norm(hidden, self.final_norm), plan, group))


def random_hidden(num_tokens: int, hidden: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, hidden, generator=gen).to(dtype)


__all__ = [
    "Dims", "NsaLayer", "ShardedMlp", "ShardedMoe", "ExpertParallelMoe", "DecoderLayer",
    "PagedBatch", "make_caches", "LayerStack", "MtpLayer", "random_hidden",
]
