"""DeepSeek-V3.2's MTP draft (registered over ``DeepseekV32MTPModel``), CP-aware.

The draft runs the plugin's decoder layer (its own indexer and caches) over the
rows of its own split plan: embeddings, the target's hidden states **and the
positions** are split with that plan (SGLang #19367 split the hidden states but
not the positions), and both outputs the proposer needs are gathered back in
token order.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.platforms import current_platform

from ..communicator import gather_token_rows, pad_rows
from .model import CpNsaDecoderLayer, embedding_kernel_applies, forward_metadata_for, fused_embedding_available
from .runtime import CpNsaRuntime
from .weights import PACKED_MODULES, load_deepseek_v32_weights


class CpNsaSharedHead(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                   quant_config=vllm_config.quant_config, prefix=f"{prefix}.head")


class CpNsaMtpLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, config, prefix: str, layer_idx: int, runtime: CpNsaRuntime):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = ReplicatedLinear(2 * config.hidden_size, config.hidden_size, bias=False,
                                        quant_config=None, prefix=f"{prefix}.eh_proj")
        self.shared_head = CpNsaSharedHead(config, vllm_config, f"{prefix}.shared_head")
        self.mtp_block = CpNsaDecoderLayer(vllm_config, config, prefix, layer_idx, runtime)

    def forward(self, embeds, positions, previous_hidden, meta, plan, normed_inputs=None):
        """``normed_inputs``: ``cat([enorm(embeds zeroed at position 0), hnorm(previous_hidden)])``
        already made (by vLLM's fused gather + norms); ``embeds`` / ``previous_hidden`` unused then."""
        if normed_inputs is None:
            embeds = torch.where(positions.unsqueeze(-1) == 0, 0, embeds)  # position 0 has no previous token
            normed_inputs = torch.cat([self.enorm(embeds), self.hnorm(previous_hidden)], dim=-1)
        x = self.eh_proj(normed_inputs)[0]
        x, residual = self.mtp_block(positions, x, None, meta, plan)
        hidden = x + residual
        return hidden, self.shared_head.norm(hidden)


class CpNsaMtpPredictor(nn.Module):
    def __init__(self, vllm_config: VllmConfig, config, prefix: str):
        super().__init__()
        self.runtime = CpNsaRuntime.from_vllm_config(
            vllm_config, torch.device(current_platform.device_type), config.num_attention_heads
        )
        self.mtp_start_layer_idx = config.num_hidden_layers
        self.num_mtp_layers = config.num_nextn_predict_layers
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        self.layers = nn.ModuleDict({
            str(idx): CpNsaMtpLayer(vllm_config, config, f"{prefix}.layers.{idx}", idx, self.runtime)
            for idx in range(self.mtp_start_layer_idx, self.mtp_start_layer_idx + self.num_mtp_layers)
        })
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.fused_embedding = fused_embedding_available(self.embed_tokens)

    def layer(self, spec_step_idx: int) -> CpNsaMtpLayer:
        return self.layers[str(self.mtp_start_layer_idx + spec_step_idx % self.num_mtp_layers)]


class CpNsaDeepseekV32MTP(nn.Module):
    """Registered over ``DeepseekV32MTPModel``; returns (hidden for logits, hidden
    recycled into the next draft step), like vLLM's DeepSeek MTP."""

    packed_modules_mapping = PACKED_MODULES

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = vllm_config.speculative_config.draft_model_config.hf_config
        self.model = CpNsaMtpPredictor(vllm_config, self.config, f"{prefix}.model" if prefix else "model")

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, hidden_states, intermediate_tensors=None, inputs_embeds=None,
                spec_step_idx: int = 0):
        layer = self.model.layer(spec_step_idx)
        runtime = self.model.runtime
        num_input_tokens = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        meta, plan = forward_metadata_for(layer.mtp_block.self_attn.mla_attn.layer_name, num_input_tokens,
                                          runtime.group)
        take = lambda t: plan.take_local(t[: plan.num_tokens])  # noqa: E731
        if inputs_embeds is None and self.model.fused_embedding and embedding_kernel_applies(input_ids):
            # vLLM's own V3.2 MTP input: gather, zero at position 0, enorm / hnorm and their concat in
            # one launch (five before: the small-index gather, where, two RMSNorms, cat)
            from vllm.model_executor.layers.fused_embed_norm import fused_embed_eh_norm  # imports triton: lazily

            normed = fused_embed_eh_norm(take(positions), take(input_ids), self.model.embed_tokens.weight,
                                         take(hidden_states), layer.enorm.weight, layer.hnorm.weight,
                                         layer.enorm.variance_epsilon)  # fmt: skip
            hidden, recycled = layer(None, take(positions), None, meta, plan, normed)
        else:
            embeds = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            hidden, recycled = layer(take(embeds), take(positions), take(hidden_states), meta, plan)
        return (pad_rows(gather_token_rows(hidden, plan, runtime.group), num_input_tokens),
                pad_rows(gather_token_rows(recycled, plan, runtime.group), num_input_tokens))

    def compute_logits(self, hidden_states: torch.Tensor, spec_step_idx: int = 0) -> torch.Tensor | None:
        layer = self.model.layer(spec_step_idx)
        return self.model.logits_processor(layer.shared_head.head, layer.shared_head.norm(hidden_states))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        first = self.model.mtp_start_layer_idx
        last = first + self.model.num_mtp_layers

        def mtp_weights():
            for name, tensor in weights:
                parts = name.split(".")
                if name.startswith("model.layers.") and first <= int(parts[2]) < last:
                    rest = ".".join(parts[3:])
                    if rest.startswith("embed_tokens."):
                        yield f"model.{rest}", tensor
                    elif rest.split(".")[0] in ("enorm", "hnorm", "eh_proj", "shared_head"):
                        yield name, tensor
                    else:
                        yield f"model.layers.{parts[2]}.mtp_block.{rest}", tensor

        return load_deepseek_v32_weights(self, mtp_weights(), self.config, num_main_layers=None)
