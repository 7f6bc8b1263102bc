"""DeepSeek-V3.2 for vLLM with the plugin's NSA attention and CP communication.

Reuses vLLM's layers (embedding, linear layers, FusedMoE via ``DeepseekV2MoE``,
RMSNorm, rotary, logits processor, weight loaders). Attention projections and
the indexer are replicated on every rank (each rank runs all heads for its own
rows); dense MLP and MoE stay TP-sharded and are reached through the MoE
communicator. The residual stream stays local between layers; the model gathers
the rows back in token order once, after the final norm.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, in_piecewise_cudagraph
from vllm.model_executor.layers.attention import MLAAttention
from vllm.model_executor.layers.layernorm import LayerNorm, RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.deepseek_v2 import (
    DeepseekV2MLP,
    DeepseekV2MoE,
    DeepSeekV2FusedQkvAProjLinear,
    yarn_get_mscale,
)
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from ..communicator import gather_token_rows, pad_rows
from ..config import CpNsaConfigError
from ..kernels.kv_cache_ref import INDEXER_FP8_SLOT_BYTES, QuantizedIndexerQuery
from ..nsa_attention import NsaCaches, NsaForwardMetadata, nsa_attention
from ..scratch import AttentionShape, BatchBounds, IndexerLimits, attention_scratch_bytes
from ..split_plan import SplitPlan, unsplit_plan
from .backend import CpNsaBackend, CpNsaIndexerCache, trace_piecewise_replay
from .ep_moe import CpNsaExpertParallelMoE, VllmExpertParallelMoE
from .runtime import CpNsaRuntime
from .weights import PACKED_MODULES, load_deepseek_v32_weights

logger = logging.getLogger("vllm.cp_nsa")


# The rope types vLLM's own DeepSeek-V2/V3.2 attention maps every scaled rope to
# (deepseek_v2.py); get_rope builds DeepseekScalingRotaryEmbedding for both.
DEEPSEEK_SCALED_ROPE_TYPES = ("deepseek_yarn", "deepseek_llama_scaling")


def deepseek_rope_parameters(config) -> dict:
    """``config.rope_parameters`` as vLLM's own V3.2 hands them to ``get_rope`` for MLA
    and the indexer: ``default`` stays; any other type becomes DeepSeek's YaRN,
    ``deepseek_llama_scaling`` where ``attention_factor`` is 1.0, else ``deepseek_yarn``.

    A copy: vLLM's model rewrites the config's own dict in place.
    """
    params = dict(config.rope_parameters)
    if params["rope_type"] == "default":
        return params
    missing = [key for key in ("factor", "original_max_position_embeddings") if key not in params]
    if missing:
        raise CpNsaConfigError(
            f"vllm_cp_nsa: rope type '{params['rope_type']}' runs as DeepSeek YaRN (as in vLLM's own "
            f"DeepSeek-V3.2), which needs {' and '.join(missing)} in the checkpoint's "
            "rope_parameters / rope_scaling; add them, or use rope_type 'default'."
        )
    params["rope_type"] = (
        "deepseek_llama_scaling" if params.get("attention_factor") == 1.0 else "deepseek_yarn"
    )
    return params


def mla_softmax_scale(qk_head_dim: int, rope_parameters: dict) -> float:
    """``1 / sqrt(qk_head_dim)``, times ``mscale(factor, mscale_all_dim) ** 2`` under
    ``deepseek_yarn`` (vLLM's own V3.2; ``deepseek_llama_scaling`` keeps the plain scale)."""
    scale = qk_head_dim**-0.5
    if rope_parameters["rope_type"] == "deepseek_yarn":
        mscale = yarn_get_mscale(rope_parameters["factor"], float(rope_parameters.get("mscale_all_dim", 0)))
        scale *= mscale * mscale
    return scale


class DeepseekRope(nn.Module):
    """vLLM's rotary for one of V3.2's ropes, built as vLLM's own V3.2 builds it (MLA's:
    interleaved; the indexer's: NeoX unless the checkpoint says interleaved)."""

    def __init__(self, config, rope_dim: int, is_neox_style: bool):
        super().__init__()
        rope_parameters = deepseek_rope_parameters(config)
        self.rotary_emb = get_rope(rope_dim, max_position=config.max_position_embeddings,
                                   rope_parameters=rope_parameters, is_neox_style=is_neox_style)
        self.heads_axis = rope_parameters["rope_type"] in DEEPSEEK_SCALED_ROPE_TYPES
        self.rope_dim = rope_dim
        self.converted_cache: torch.Tensor | None = None

    def check_covers(self, max_model_len: int) -> None:
        """vLLM's rotary caches cos/sin for a fixed number of positions (DeepSeek YaRN's:
        ``original_max_position_embeddings * factor``, whatever ``max_position_embeddings``
        says); a position past them would index outside the cache."""
        positions = self.rotary_emb.cos_sin_cache.shape[0]
        if max_model_len > positions:
            raise CpNsaConfigError(
                f"vllm_cp_nsa: max_model_len {max_model_len} exceeds the {positions} positions this "
                "checkpoint's rope covers (YaRN: original_max_position_embeddings x factor); pass "
                f"--max-model-len {positions} or less, or fix the checkpoint's max_position_embeddings."
            )

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """Rotate ``q`` [n, H, D] and ``k`` [n, D] -> same shapes, with vLLM's rotary classes (on
        CUDA the layer runs kernels/mla_prologue.py instead: ``prologue_kernels_apply``).

        They take different shapes. DeepSeek's YaRN class (``heads_axis``) broadcasts cos/sin
        over a heads axis: ``q`` [n, H, D], ``k`` [n, 1, D], as vLLM's own MLA passes them. The
        plain class (``default``) gets contiguous 2-D ``[n, H * D]`` / ``[n, D]``: vLLM 0.32's
        CPU rotary kernel mis-rotates a 3-D multi-head query.
        """
        num_rows, num_heads, dim = q.shape
        if self.heads_axis:
            q2, k2 = self.rotary_emb(positions, q, k.unsqueeze(1))
        else:
            q2, k2 = self.rotary_emb(positions, q.reshape(num_rows, num_heads * dim).contiguous(),
                                     k.reshape(num_rows, dim).contiguous())
        return q2.reshape(num_rows, num_heads, dim), k2.reshape(num_rows, dim)

    def kernel_rope(self, like: torch.Tensor):
        """This rope for kernels/mla_prologue.py: vLLM's cos/sin table in ``like``'s dtype."""
        from ..kernels.mla_prologue import Rope  # imports triton: lazily, like every kernel module

        return Rope(self.cos_sin_cache(like), self.rope_dim, self.rotary_emb.is_neox_style)

    def cos_sin_cache(self, q: torch.Tensor) -> torch.Tensor:
        """vLLM's cos/sin table in the query's dtype and device (its rotary classes keep it so,
        except with FlashInfer, which keeps fp32), converted once: the table its rotary kernel
        would read."""
        cache = self.rotary_emb.cos_sin_cache
        if cache.dtype != q.dtype or cache.device != q.device:
            if self.converted_cache is None or self.converted_cache.dtype != q.dtype:
                self.converted_cache = cache.to(device=q.device, dtype=q.dtype)
            return self.converted_cache
        return cache


def prologue_kernels_apply(positions: torch.Tensor, *rows: torch.Tensor) -> bool:
    """Whether kernels/mla_prologue.py takes the layer's norms and ropes: CUDA rows with a unit
    last stride (the projections' slices as they lie), vLLM's int64 positions."""
    return rows[0].is_cuda and positions.dtype == torch.int64 and all(t.stride(-1) == 1 for t in rows)


def write_back(dst: torch.Tensor, rotated: torch.Tensor) -> None:
    """Put rotated dims back into ``dst``, unless vLLM's rotary already rotated ``dst`` itself
    in place (its in-place CPU kernels do when no copy was made: a contiguous slice, e.g. one
    row, on the plain class's 2-D path)."""
    if rotated.data_ptr() != dst.data_ptr():
        dst.copy_(rotated.view(dst.shape))


class CpNsaIndexer(nn.Module):
    """Lightning indexer projections (replicated); keys live in ``k_cache``."""

    def __init__(self, vllm_config: VllmConfig, config, prefix: str, fp8_cache: bool):
        super().__init__()
        self.n_heads = config.index_n_heads
        self.head_dim = config.index_head_dim
        self.rope_dim = config.qk_rope_head_dim
        quant_config = vllm_config.quant_config
        self.wq_b = ReplicatedLinear(config.q_lora_rank, self.n_heads * self.head_dim, bias=False,
                                     quant_config=quant_config, prefix=f"{prefix}.wq_b")
        # ``wk`` and ``weights_proj`` as one unquantized GEMM [hidden -> 128 + Hi], as in vLLM's
        # own V3.2 (one launch instead of two); an fp8 ``wk`` + scale (the release) is
        # dequantized at load (weights.Fp8IndexerWk).
        self.wk_weights_proj = MergedColumnParallelLinear(
            input_size=config.hidden_size, output_sizes=[self.head_dim, self.n_heads], bias=False,
            quant_config=None, disable_tp=True, prefix=f"{prefix}.wk_weights_proj")
        self.k_norm = LayerNorm(self.head_dim, eps=1e-6, dtype=torch.float32)
        # The indexer rotates the first rope_dim dims with MLA's rope parameters, NeoX
        # style unless the checkpoint says interleaved (as vLLM's own V3.2 indexer).
        self.rotary_emb = DeepseekRope(config, self.rope_dim,
                                       is_neox_style=not getattr(config, "indexer_rope_interleave", False))
        # the heads' weights' scale as a 1-element fp32 tensor (not a Python float): bf16 weights
        # times it come out fp32 in one kernel (a float scalar needs ``.float()`` first: two),
        # and kernels/mla_prologue.py reads it from memory
        self.register_buffer("weight_scale", torch.tensor([self.n_heads**-0.5 * self.head_dim**-0.5],
                                                          dtype=torch.float32), persistent=False)
        self.k_cache = CpNsaIndexerCache(
            prefix=f"{prefix}.k_cache",
            fp8=fp8_cache,
            dtype=vllm_config.model_config.dtype,
        )

    def key_and_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the key's projection [n, 128], the heads' weights [n, Hi] before ``weight_scale``):
        strided slices of one GEMM's output."""
        k_and_weights = self.wk_weights_proj(x)[0]
        return k_and_weights[:, : self.head_dim], k_and_weights[:, self.head_dim :]

    def query(self, q_c: torch.Tensor) -> torch.Tensor:
        """The query's projection [n, Hi, 128], rope not applied yet."""
        return self.wq_b(q_c)[0].view(-1, self.n_heads, self.head_dim)

    def key_norm(self):
        """``k_norm``'s parameters for kernels/mla_prologue.py."""
        from ..kernels.mla_prologue import Norm  # imports triton: lazily, like every kernel module

        return Norm(self.k_norm.weight, self.k_norm.bias, self.k_norm.eps)

    def norm_and_rotate(self, positions: torch.Tensor, q: torch.Tensor, key: torch.Tensor):
        """The unfused path (vLLM's LayerNorm and rotary classes): (q roped, key normed and roped)."""
        k = self.k_norm(key)
        q_pe, k_pe = self.rotary_emb(positions, q[..., : self.rope_dim], k[:, : self.rope_dim])
        write_back(q[..., : self.rope_dim], q_pe)  # q and k are this layer's own outputs
        write_back(k[:, : self.rope_dim], k_pe)
        return q, k


class CpNsaAttention(nn.Module):
    """MLA + lightning indexer + sparse attention, all heads, this rank's rows."""

    def __init__(self, vllm_config: VllmConfig, config, prefix: str, runtime: CpNsaRuntime):
        super().__init__()
        self.runtime = runtime
        quant_config = vllm_config.quant_config
        self.num_heads = config.num_attention_heads
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.kv_lora_rank = config.kv_lora_rank
        self.topk = config.index_topk
        hidden = config.hidden_size

        def linear(name, n_in, n_out, quant=quant_config):
            return ReplicatedLinear(n_in, n_out, bias=False, quant_config=quant, prefix=f"{prefix}.{name}")

        # q_a_proj and kv_a_proj_with_mqa as one GEMM (replicated), vLLM's own V3.2 layer: one
        # launch and one activation quantization instead of two (its small-batch bf16 GEMM too)
        self.q_lora_rank = config.q_lora_rank
        self.fused_qkv_a_proj = DeepSeekV2FusedQkvAProjLinear(
            input_size=hidden, output_size=[self.q_lora_rank, self.kv_lora_rank + self.qk_rope_head_dim],
            quant_config=quant_config, prefix=f"{prefix}.fused_qkv_a_proj")
        self.q_a_layernorm = RMSNorm(config.q_lora_rank, eps=config.rms_norm_eps)
        self.q_b_proj = linear("q_b_proj", config.q_lora_rank, self.num_heads * self.qk_head_dim)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = linear("kv_b_proj", self.kv_lora_rank,
                                self.num_heads * (self.qk_nope_head_dim + self.v_head_dim))
        self.o_proj = linear("o_proj", self.num_heads * self.v_head_dim, hidden)

        # MLA's rope is interleaved (GPT-J style) and its softmax scale carries YaRN's
        # mscale, as in vLLM's own V3.2.
        rope_parameters = deepseek_rope_parameters(config)
        self.scaling = mla_softmax_scale(self.qk_head_dim, rope_parameters)
        self.rotary_emb = DeepseekRope(config, self.qk_rope_head_dim, is_neox_style=False)
        self.rotary_emb.check_covers(vllm_config.model_config.max_model_len)
        self.indexer = CpNsaIndexer(vllm_config, config, f"{prefix}.indexer", runtime.indexer_cache_fp8)
        # heads of the fp8 indexer query the provider's indexer takes (0: none), made by the
        # query rope on CUDA (kernels/mla_prologue.py); decided once here, not per forward
        self.index_q_fp8_heads = runtime.ops.indexer_query_fp8_heads(config.index_n_heads,
                                                                     runtime.indexer_cache_fp8)  # fmt: skip
        self.mla_attn = MLAAttention(
            num_heads=self.num_heads,
            scale=self.scaling,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            q_lora_rank=config.q_lora_rank,
            kv_lora_rank=self.kv_lora_rank,
            kv_b_proj=self.kv_b_proj,
            cache_config=vllm_config.cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
            attn_backend=CpNsaBackend,
            use_sparse=True,
        )
        # vLLM's breakable CUDA graphs capture the layer around this call (as vLLM's own
        # V3.2 does around its indexer + sparse attention)
        self.attend_into = eager_break(self._attend_into)
        self.profile_scratch_bytes = attention_scratch_bytes_for(vllm_config, config, runtime.ops)

    def _head_slice(self, meta: NsaForwardMetadata | None) -> slice | None:
        """This rank's heads when the batch runs unsplit and the split policy splits the heads
        (``AttentionSplitPolicy.heads_split``: every rank holds every row, so the heads are
        what gets split); None: all heads."""
        group = self.runtime.group
        if not self.runtime.heads_split or meta is None or meta.plan.is_split:
            return None
        per_rank = self.num_heads // group.world_size
        return slice(group.rank * per_rank, (group.rank + 1) * per_rank)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: NsaForwardMetadata | None) -> torch.Tensor:
        num_rows = x.shape[0]
        heads = self._head_slice(meta)
        (q_nope, q_pe, q_latent, kv_c, k_pe, index_q, index_weights, index_k, index_q_fp8,
         caches_written) = self._project(positions, x, heads, meta)
        values = q_nope.new_empty((num_rows, q_nope.shape[1] * self.v_head_dim), dtype=self.mla_attn.W_UV.dtype)
        # plain tensors through the eager break (it holds tensors weakly across a capture); a
        # replayed piecewise graph passes its capture's flag, always False (_prologue_cache_write)
        index_q8, index_w8 = (None, None) if index_q_fp8 is None else index_q_fp8
        self.attend_into(values, q_nope, q_pe, q_latent, kv_c, k_pe, index_q, index_weights, index_k, positions,
                         index_q8, index_w8, caches_written)  # fmt: skip
        if heads is None:
            return self.o_proj(values.to(x.dtype))[0]
        # this rank's heads' share of o_proj, then the sum over ranks (as vLLM's TP does)
        return self.runtime.group.all_reduce(self._o_proj_partial(values.to(x.dtype), heads))

    def _project(self, positions: torch.Tensor, x: torch.Tensor, heads: slice | None,
                 meta: NsaForwardMetadata | None = None):  # fmt: skip
        """Projections, norms and ropes of this forward's rows: (q_nope, q_pe, q_latent, kv_c,
        k_pe, index_q, index_weights, index_k, index_q_fp8, caches_written). On CUDA the norms
        and ropes are kernels/mla_prologue.py's two launches (vLLM's own V3.2 also runs two); the
        first also writes the new tokens into both caches when the batch runs unsplit
        (``_prologue_cache_write``; ``caches_written``), the query rope also writes q_pe into the
        tail of ``q_latent``, the attention's [n, H, 512 + 64] latent query, and where the
        provider's indexer scores fp8 queries, the indexer query quantized (``index_q_fp8``, a
        ``QuantizedIndexerQuery``); elsewhere vLLM's RMSNorm, LayerNorm and rotary classes, the
        same arithmetic, ``q_latent`` and ``index_q_fp8`` None (the indexer quantizes for
        itself), ``caches_written`` False (the attention writes them)."""
        q_c, kv_c, k_pe = self.fused_qkv_a_proj(x)[0].split(
            [self.q_lora_rank, self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        key, index_weights = self.indexer.key_and_weights(x)
        fused = prologue_kernels_apply(positions, q_c, kv_c, k_pe, key, index_weights)
        cache_write = self._prologue_cache_write(meta) if fused else None
        if fused:
            from ..kernels.mla_prologue import Norm, latent_prologue, query_rope  # imports triton: lazily

            mla_rope, key_rope = self.rotary_emb.kernel_rope(q_c), self.indexer.rotary_emb.kernel_rope(q_c)
            q_c, kv_c, k_pe, index_k, index_weights = latent_prologue(
                q_c, kv_c, k_pe, key, index_weights, self.indexer.weight_scale, positions,
                Norm(self.q_a_layernorm.weight, None, self.q_a_layernorm.variance_epsilon),
                Norm(self.kv_a_layernorm.weight, None, self.kv_a_layernorm.variance_epsilon),
                self.indexer.key_norm(), mla_rope, key_rope, cache_write)  # fmt: skip
        else:
            q_c = self.q_a_layernorm(q_c)  # vLLM's RMSNorm reads strided rows: no copy (as its own MLA)
            kv_c = self.kv_a_layernorm(kv_c)
            # a 1-element fp32 tensor, not a Python float: fp32 out in one kernel, the same values
            index_weights = index_weights * self.indexer.weight_scale
        q = self._q_b(q_c, heads).view(x.shape[0], -1, self.qk_head_dim)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        index_q = self.indexer.query(q_c)
        q_latent = index_q_fp8 = None
        if fused:
            q_latent = q.new_empty((x.shape[0], q.shape[1], self.kv_lora_rank + self.qk_rope_head_dim))
            if self.index_q_fp8_heads:
                index_q_fp8 = QuantizedIndexerQuery.empty(x.shape[0], self.index_q_fp8_heads, x.device)
            query_rope(q_pe, index_q, positions, mla_rope, key_rope, q_latent[..., self.kv_lora_rank :],
                       index_weights, index_q_fp8)  # fmt: skip
        else:
            q_pe, k_pe = self.rotary_emb(positions, q_pe, k_pe)
            index_q, index_k = self.indexer.norm_and_rotate(positions, index_q, key)
        return (q_nope, q_pe, q_latent, kv_c, k_pe, index_q, index_weights, index_k, index_q_fp8,
                cache_write is not None)

    def _prologue_cache_write(self, meta: NsaForwardMetadata | None):
        """The new tokens' cache writes the prologue kernel does itself (as vLLM's own V3.2
        writes both caches in its norm-rope kernel): an unsplit batch, whose rows are its tokens
        in order, with its metadata and allocated caches, run eagerly or as a FULL graph (whose
        capture and replays stage the slots of all its rows). Otherwise None, and the attention's
        eager break writes them (``nsa_attention``): a split batch after its all-gather, and any
        batch of a piecewise graph, whose captured pieces replay what the capture did for every
        batch of that size (vLLM's V2 model runner captures them with a dummy batch's metadata)."""
        if meta is None or meta.plan.is_split or in_piecewise_cudagraph():
            return None
        caches = self._caches()
        if caches.latent.numel() == 0:
            return None
        from ..kernels.mla_prologue import TokenCacheWrite  # imports triton: lazily

        return TokenCacheWrite(caches.latent, caches.kv_cache_dtype, caches.index, caches.index_fp8,
                               meta.slot_mapping, meta.block_size)  # fmt: skip

    def _caches(self) -> NsaCaches:
        """The layer's latent and indexer caches, as the attention and the prologue write them."""
        return NsaCaches(latent=self.mla_attn.kv_cache, index=self.indexer.k_cache.kv_cache,
                         kv_cache_dtype=self.mla_attn.kv_cache_dtype, index_fp8=self.indexer.k_cache.fp8)

    def _attend_into(self, values, q_nope, q_pe, q_latent, kv_c, k_pe, index_q, index_weights, index_k,
                     positions, index_q8=None, index_w8=None, caches_written=False) -> None:  # fmt: skip
        """NSA attention of this forward's rows written into ``values`` [rows, heads * V]: cache
        writes (KV all-gather under CP), indexer top-k, sparse MLA, W_UV.

        The batch-dependent part of the layer, so the eager break of a breakable CUDA graph
        (``attend_into`` wraps it in vLLM's ``eager_break_during_capture``): it reads the batch
        from the forward context, never from capture-time arguments, and writes the
        caller's buffer. A piecewise graph replays padded rows past the batch's own: they get
        zeros. Profile and dummy runs (and the V1 model runner's piecewise captures) carry no batch:
        zeros; vLLM's V2 model runner captures piecewise graphs with a dummy batch's metadata,
        which runs here eagerly like any batch (the capture records only the call)."""
        meta = batch_metadata(self.mla_attn.layer_name)
        latent_cache = self.mla_attn.kv_cache
        if meta is None or latent_cache.numel() == 0:
            if latent_cache.numel() == 0:
                # vLLM's memory profile (no cache yet): hold the attention's scratch for the
                # largest batch for a moment, so the KV cache is sized around it (scratch.py)
                scratch = torch.empty(self.profile_scratch_bytes, dtype=torch.uint8, device=values.device)
                del scratch
            values.zero_()
            return
        heads = self._head_slice(meta)
        index_q_fp8 = None if index_q8 is None else QuantizedIndexerQuery(index_q8, index_w8)
        rows = meta.num_local_rows
        if rows < values.shape[0]:  # a piecewise graph replaying this batch padded to its size
            meta.per_forward_value("piecewise_traced", lambda: trace_piecewise_replay(
                self.runtime.group.rank, rows, values.shape[0]))
            values[rows:].zero_()
            values, q_nope, q_pe, kv_c, k_pe, index_q, index_weights, index_k = (
                t[:rows] for t in (values, q_nope, q_pe, kv_c, k_pe, index_q, index_weights, index_k))
            q_latent = None if q_latent is None else q_latent[:rows]
            index_q_fp8 = None if index_q_fp8 is None else index_q_fp8.rows(rows)
            # every layer gets the same positions view, so per-forward caches keyed on it hit
            positions = meta.per_forward_value("positions", lambda: positions[:rows])
        caches = self._caches()
        nsa_attention(
            q_nope=q_nope,
            q_pe=q_pe,
            kv_c=kv_c,
            k_pe=k_pe,
            index_q=index_q,
            index_weights=index_weights,
            index_k=index_k,
            local_positions=positions,
            w_uk_t=self.mla_attn.W_UK_T if heads is None else self.mla_attn.W_UK_T[heads],
            w_uv=self.mla_attn.W_UV if heads is None else self.mla_attn.W_UV[heads],
            meta=meta,
            caches=caches,
            topk=self.topk,
            sm_scale=self.scaling,
            group=self.runtime.group,
            ops=self.runtime.ops,
            out=values,
            kv_up_proj=self._kv_up_proj if heads is None else None,
            q_latent=q_latent,
            index_q_fp8=index_q_fp8,
            caches_written=caches_written,
        )

    def _kv_up_proj(self, kv_c: torch.Tensor) -> torch.Tensor:
        """kv_b_proj (vLLM's linear: its fp8 block GEMM for the release weights), the keys and
        values of a whole-prompt batch's dense prefill."""
        return self.kv_b_proj(kv_c)[0]

    def _q_b(self, q_c: torch.Tensor, heads: slice | None) -> torch.Tensor:
        """q_b_proj for all heads, or for ``heads`` through a view of its weight's rows."""
        if heads is None:
            return self.q_b_proj(q_c)[0]
        weight = _dense_weight(self.q_b_proj)
        if weight is None:  # vLLM's CPU build repacks the weight: project all heads, keep ours
            return self.q_b_proj(q_c)[0].view(q_c.shape[0], self.num_heads, -1)[:, heads].flatten(1)
        return F.linear(q_c, weight[heads.start * self.qk_head_dim : heads.stop * self.qk_head_dim])

    def _o_proj_partial(self, out: torch.Tensor, heads: slice) -> torch.Tensor:
        """``out`` [n, len(heads) * V] through the o_proj columns of ``heads``: this rank's
        partial sum of the full projection."""
        cols = slice(heads.start * self.v_head_dim, heads.stop * self.v_head_dim)
        weight = _dense_weight(self.o_proj)
        if weight is None:  # vLLM's CPU build repacks the weight: zeros for the other heads
            full = out.new_zeros(out.shape[0], self.num_heads * self.v_head_dim)
            full[:, cols] = out
            return self.o_proj(full)[0]
        return F.linear(out, weight[:, cols])


def attention_scratch_bytes_for(vllm_config: VllmConfig, config, ops) -> int:
    """Peak transient bytes of one attention layer at the engine's largest batch, with the
    caps of the kernel provider ``ops`` (vllm_cp_nsa.scratch)."""
    from ..kernels.indexer_topk import MAX_LOGITS_BYTES as TRITON_MAX_LOGITS_BYTES
    from . import vllm_deepgemm, vllm_kernels

    if isinstance(ops, vllm_deepgemm.VllmDeepGemmOps):
        limits = IndexerLimits(max(vllm_deepgemm.MAX_LOGITS_BYTES, TRITON_MAX_LOGITS_BYTES),
                               vllm_deepgemm.MAX_GATHER_KEYS * INDEXER_FP8_SLOT_BYTES,
                               vllm_kernels.MAX_WORKSPACE_BYTES)
    elif isinstance(ops, vllm_kernels.VllmKernelOps):
        limits = IndexerLimits(TRITON_MAX_LOGITS_BYTES, 0, vllm_kernels.MAX_WORKSPACE_BYTES)
    else:
        limits = IndexerLimits(TRITON_MAX_LOGITS_BYTES)
    model_config, cache_config = vllm_config.model_config, vllm_config.cache_config
    bounds = BatchBounds(
        max_rows=vllm_config.scheduler_config.max_num_batched_tokens,
        max_reqs=vllm_config.scheduler_config.max_num_seqs,
        max_model_len=model_config.max_model_len,
        # CUDA backends may raise the block size to 64 after the model is built
        block_size=max(cache_config.block_size or 64, 64),
    )
    shape = AttentionShape(
        num_heads=config.num_attention_heads, v_head_dim=config.v_head_dim, index_heads=config.index_n_heads,
        topk=config.index_topk, dtype_bytes=model_config.dtype.itemsize,
        fp8_latent_cache=str(cache_config.cache_dtype).startswith("fp8"), qk_nope_head_dim=config.qk_nope_head_dim,
    )
    return attention_scratch_bytes(bounds, shape, limits)


def eager_break(fn):
    """``fn`` as an eager break of vLLM's breakable CUDA graphs: run eagerly on the capture
    stream and replayed as a call between graph segments. Applied when the layer is built
    (in the worker, after vLLM 0.32 read ``VLLM_USE_BREAKABLE_CUDAGRAPH``)."""
    from vllm.compilation.breakable_cudagraph import eager_break_during_capture

    return eager_break_during_capture(fn)


def _dense_weight(layer: nn.Module) -> torch.Tensor | None:
    """The layer's [out, in] weight, or None where vLLM moved it into a packed form (its
    CPU build does, after loading)."""
    weight = getattr(layer, "weight", None)
    return weight if weight is not None and weight.dim() == 2 and weight.numel() > 0 else None


def _scattered_mlp(vllm_config: VllmConfig, config, prefix: str, runtime: CpNsaRuntime, is_moe: bool) -> nn.Module:
    """The ``scattered`` communicator's MLP, complete outputs for this rank's rows: routed
    experts owned by ranks behind vLLM's expert-parallel FusedMoE or the plugin's torch
    all-to-all (``runtime.vllm_expert_parallel``); a dense MLP replicated."""
    if is_moe and runtime.vllm_expert_parallel:
        return VllmExpertParallelMoE(vllm_config, config, prefix, runtime.group)
    if is_moe:
        return CpNsaExpertParallelMoE(vllm_config, config, prefix, runtime.expert_group)
    return DeepseekV2MLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                         hidden_act=config.hidden_act, quant_config=vllm_config.quant_config,
                         reduce_results=False, is_sequence_parallel=True, prefix=prefix)


class CpNsaDecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, config, prefix: str, layer_idx: int, runtime: CpNsaRuntime):
        super().__init__()
        self.runtime = runtime
        self.self_attn = CpNsaAttention(vllm_config, config, f"{prefix}.self_attn", runtime)
        is_moe = config.n_routed_experts is not None and layer_idx >= config.first_k_dense_replace and (
            layer_idx % getattr(config, "moe_layer_freq", 1) == 0
        )
        quant_config = vllm_config.quant_config
        if not runtime.communicator.mlp_returns_partial_sums:
            self.mlp = _scattered_mlp(vllm_config, config, f"{prefix}.mlp", runtime, is_moe)
        elif is_moe:
            # reduce_results=False: the MoE communicator does the TP reduction
            # (all-reduce unsplit, reduce-scatter under CP).
            self.mlp = DeepseekV2MoE(config=config, parallel_config=vllm_config.parallel_config,
                                     quant_config=quant_config, reduce_results=False,
                                     prefix=f"{prefix}.mlp", apply_routed_scale_to_output=True)
        else:
            self.mlp = DeepseekV2MLP(hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                                     hidden_act=config.hidden_act, quant_config=quant_config,
                                     reduce_results=False, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions, x, residual, meta: NsaForwardMetadata | None, plan: SplitPlan,
                input_normed: bool = False):  # fmt: skip
        """``input_normed``: ``x`` is already this layer's input norm of ``residual`` (the first
        layer after vLLM's fused embedding gather + norm)."""
        if not input_normed:
            if residual is None:
                residual = x
                x = self.input_layernorm(x)
            else:
                x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        x = self.runtime.communicator.forward(self.mlp, x, plan, self.runtime.group)
        return x, residual


class CpNsaModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.runtime = CpNsaRuntime.from_vllm_config(
            vllm_config, torch.device(current_platform.device_type), config.num_attention_heads
        )
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   quant_config=vllm_config.quant_config,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleList(
            CpNsaDecoderLayer(vllm_config, config, f"{prefix}.layers.{i}", i, self.runtime)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.metadata_layer_name = self.layers[0].self_attn.mla_attn.layer_name
        self.fused_embedding = fused_embedding_available(self.embed_tokens)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        num_input_tokens = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        group = self.runtime.group
        meta, plan = forward_metadata_for(self.metadata_layer_name, num_input_tokens, group)
        x, residual = self._embed_local(input_ids, inputs_embeds, plan)
        local_positions = plan.take_local(positions[: plan.num_tokens])
        for i, layer in enumerate(self.layers):
            x, residual = layer(local_positions, x, residual, meta, plan, input_normed=i == 0 and residual is not None)
        x, _ = self.norm(x, residual)
        return pad_rows(gather_token_rows(x, plan, group), num_input_tokens)

    def _embed_local(self, input_ids, inputs_embeds, plan: SplitPlan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's rows of the embedding: ``(rows, None)``, or ``(the first layer's input norm
        of them, rows)`` where vLLM's fused gather + RMSNorm kernel applies (the whole table on
        this rank, unquantized, CUDA ids: as vLLM's own V3.2 starts its forward), one launch for
        torch's small-index gather and the norm's (~10 of the 12 us they took per b8 decode step
        on one H200, 1204j profile)."""
        if inputs_embeds is None and self.fused_embedding and embedding_kernel_applies(input_ids):
            from vllm.model_executor.layers.fused_embed_norm import fused_embed_norm  # imports triton: lazily

            norm = self.layers[0].input_layernorm
            residual, normed = fused_embed_norm(plan.take_local(input_ids[: plan.num_tokens]), self.embed_tokens.weight,
                                                norm.weight, norm.variance_epsilon)  # fmt: skip
            return normed, residual
        hidden = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
        return plan.take_local(hidden[: plan.num_tokens]), None


def fused_embedding_available(embedding: nn.Module) -> bool:
    """vLLM's fused embedding gather + norm exists here and can read ``embedding``'s whole table
    (one TP rank, unquantized: its ``has_full_vocab_on_rank``)."""
    try:
        from vllm.model_executor.layers.fused_embed_norm import has_full_vocab_on_rank
    except ImportError:
        return False
    return has_full_vocab_on_rank(embedding)


def embedding_kernel_applies(input_ids: torch.Tensor) -> bool:
    """The fused embedding's Triton kernel runs on CUDA ids."""
    return input_ids.is_cuda


def batch_metadata(layer_name: str) -> NsaForwardMetadata | None:
    """This forward's metadata for ``layer_name`` (built once by the backend); None in
    profile / dummy runs and the V1 model runner's piecewise CUDA-graph captures (vLLM's V2
    runner captures them with a dummy batch's metadata)."""
    attn_metadata = get_forward_context().attn_metadata
    if isinstance(attn_metadata, list):  # speculative decoding: [0] is the target's
        attn_metadata = attn_metadata[0]
    return attn_metadata.get(layer_name) if attn_metadata else None


def forward_metadata_for(layer_name: str, num_input_tokens: int, group) -> tuple[NsaForwardMetadata | None, SplitPlan]:
    """This forward's metadata and split plan. Without metadata (profile / dummy runs,
    the V1 model runner's piecewise graph captures) every input row runs unsplit."""
    meta = batch_metadata(layer_name)
    if meta is None:
        return None, unsplit_plan(num_input_tokens, group.world_size, group.rank, "no batch metadata")
    return meta, meta.plan


class CpNsaDeepseekV32ForCausalLM(nn.Module):
    """Registered over ``DeepseekV32ForCausalLM``."""

    packed_modules_mapping = PACKED_MODULES

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = CpNsaModel(vllm_config=vllm_config, prefix=_join(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      quant_config=vllm_config.quant_config, prefix=_join(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds=None):
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return load_deepseek_v32_weights(self, weights, self.config, self.config.num_hidden_layers)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
