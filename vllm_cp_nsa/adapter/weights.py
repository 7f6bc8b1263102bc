"""Load HF-format DeepSeek-V3.2 checkpoints (real tensor names) into the plugin's models.

Handles the official release's format too: fp8 block weights with their
``weight_scale_inv`` go to the parameters vLLM's fp8 linear / fused-MoE methods
create, and an fp8 indexer ``wk`` with its scale is dequantized at load into the
plugin's unquantized fused ``wk_weights_proj`` (as vLLM's
``deepseek_v2.py:_try_load_fp8_indexer_wk`` does). Every tensor handed to the loader must land in a parameter and every
parameter must be loaded: the load fails naming the tensors it could not place and
the parameters left at their init values (vLLM only checks quantized layers, so a
missing unquantized tensor would otherwise pass silently).
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.model_executor.layers.fused_moe import fused_moe_make_expert_params_mapping
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from .ep_moe import CpNsaExpertParallelMoE

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
# (fused parameter, checkpoint part, shard): vLLM's layers that hold several checkpoint
# tensors, as vLLM's own V3.2 fuses them (one GEMM each)
STACKED_PARAMS = (
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
    ("fused_qkv_a_proj", "q_a_proj", 0),
    ("fused_qkv_a_proj", "kv_a_proj_with_mqa", 1),
    ("wk_weights_proj", "wk", 0),
    ("wk_weights_proj", "weights_proj", 1),
)
PACKED_MODULES = {
    fused: [part for name, part, _ in STACKED_PARAMS if name == fused] for fused, _, _ in STACKED_PARAMS
}
"""The models' ``packed_modules_mapping`` (what a quantization config reads for fused layers)."""
_INDEXER_WK = ".indexer.wk.weight"
_INDEXER_WK_FUSED = ".indexer.wk_weights_proj.weight"
SCALE_INV = "_scale_inv"
# Parameters no checkpoint of this model carries: the fp8 KV-cache scales vLLM's
# quantization methods add to the attention layer (they stay at their "no scale" value).
_NOT_IN_CHECKPOINTS = (".attn.k_scale", ".attn.v_scale", ".attn.q_scale", ".attn.prob_scale")


def load_deepseek_v32_weights(module: nn.Module, weights, config, num_main_layers: int | None) -> set[str]:
    """Load HF-format DeepSeek-V3.2 tensors (real names) into ``module``.

    The parts of a fused layer (``STACKED_PARAMS``: dense / shared-expert ``gate_proj`` +
    ``up_proj``, ``q_a_proj`` + ``kv_a_proj_with_mqa``, the indexer's ``wk`` +
    ``weights_proj``; weights and scales) are stacked into it; routed experts go through FusedMoE's expert
    mapping, or into the ``scattered`` MoE's per-expert MLPs (experts another rank
    owns are skipped). With ``num_main_layers``, layers past it (the MTP layers,
    loaded by the draft model) are skipped. Raises naming every tensor that found no
    parameter and every parameter (or part of a stacked / per-expert parameter) no
    tensor filled.
    """
    stacked = STACKED_PARAMS
    expert_mapping = fused_moe_make_expert_params_mapping(
        module, ckpt_gate_proj_name="gate_proj", ckpt_down_proj_name="down_proj",
        ckpt_up_proj_name="up_proj", num_experts=config.n_routed_experts,
    )
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    stacked_parts: dict[str, set[int]] = {}
    expert_tensors: set[str] = set()
    unplaced: list[str] = []
    fp8_wk = Fp8IndexerWk()
    for name, tensor in weights:
        layer = _layer_index(name)
        if num_main_layers is not None and layer is not None and layer >= num_main_layers:
            continue
        if fp8_wk.accepts(name, tensor, params):
            done = fp8_wk.add(name, tensor, params[Fp8IndexerWk.target(name)].dtype)
            if done is not None:
                target, weight = done
                params[target].weight_loader(params[target], weight, 0)
                stacked_parts.setdefault(target, set()).add(0)
                loaded.add(target)
            continue
        target, shard_id = _stacked_name(name, stacked)
        if shard_id is not None and target in params:  # dense MLP, shared / EP-local expert
            params[target].weight_loader(params[target], tensor, shard_id)
            stacked_parts.setdefault(target, set()).add(shard_id)
            loaded.add(target)
            continue
        if ".mlp.experts." in name and name not in params:
            if _load_expert(params, expert_mapping, name, tensor, loaded) or _other_ranks_expert(module, name):
                expert_tensors.add(name)
            else:
                unplaced.append(name)
            continue
        if name not in params:
            unplaced.append(name)
            continue
        _load(params[name], tensor)
        loaded.add(name)
    unplaced += fp8_wk.unpaired()
    missing = [p for p in set(params) - loaded if not p.endswith(_NOT_IN_CHECKPOINTS)]
    for target, parts in stacked_parts.items():
        missing += [target.replace(f".{param_name}.", f".{weight_name}.") for param_name, weight_name, shard_id
                    in stacked if f".{param_name}." in target and shard_id not in parts]
    missing += _missing_expert_tensors(params, loaded, expert_mapping, expert_tensors)
    if unplaced or missing:
        problems = []
        if unplaced:
            problems.append(f"checkpoint tensors with no matching parameter: {', '.join(sorted(unplaced))}")
        if missing:
            problems.append(f"parameters (or their parts) the checkpoint has no tensor for: "
                            f"{', '.join(sorted(missing))}")
        raise ValueError("vllm_cp_nsa: the checkpoint does not match the model; " + "; ".join(problems))
    return loaded


def _load(param: nn.Parameter, tensor: torch.Tensor) -> None:
    getattr(param, "weight_loader", default_weight_loader)(param, tensor)


def _load_expert(params, expert_mapping, name: str, tensor: torch.Tensor, loaded: set[str]) -> bool:
    """Route one routed-expert tensor (weight or scale) into FusedMoE's parameters.
    False when no FusedMoE parameter takes it; an expert another rank owns under
    FusedMoE's expert parallelism is refused by its loader and counts as placed."""
    for param_name, weight_name, expert_id, expert_shard in expert_mapping:
        if weight_name not in name:
            continue
        mapped = name.replace(weight_name, param_name)
        if mapped not in params:
            return False
        if params[mapped].weight_loader(params[mapped], tensor, mapped, shard_id=expert_shard,
                                        expert_id=expert_id, return_success=True):
            loaded.add(mapped)
        return True
    return False


def _other_ranks_expert(module: nn.Module, name: str) -> bool:
    """A routed expert the ``scattered`` MoE (per-expert MLPs) leaves to another rank."""
    moe_path, rest = name.split(".mlp.experts.", 1)
    try:
        moe = module.get_submodule(moe_path + ".mlp")
    except AttributeError:
        return False
    return isinstance(moe, CpNsaExpertParallelMoE) and rest.split(".")[0] not in moe.experts


def _missing_expert_tensors(params, loaded: set[str], expert_mapping, expert_tensors: set[str]) -> list[str]:
    """Checkpoint names of routed-expert tensors a loaded FusedMoE parameter still
    expects (one parameter holds every expert, so one tensor marks it loaded)."""
    missing = []
    for param in loaded:
        for param_name, weight_name, _, _ in expert_mapping:
            if param_name in param and ".mlp." in param:
                expected = param.replace(param_name, weight_name)
                if expected not in expert_tensors:
                    missing.append(expected)
    return missing


class Fp8IndexerWk:
    """Pairs an fp8 indexer ``wk`` weight with its block scale and dequantizes it into the
    unquantized fused ``wk_weights_proj`` (shard 0), as vLLM's own V3.2 does
    (``deepseek_v2.py:_try_load_fp8_indexer_wk``)."""

    def __init__(self) -> None:
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    @staticmethod
    def target(name: str) -> str:
        """The fused parameter a ``wk`` weight or scale goes to."""
        return name.removesuffix(SCALE_INV).removesuffix(_INDEXER_WK) + _INDEXER_WK_FUSED

    @staticmethod
    def accepts(name: str, tensor: torch.Tensor, params: dict) -> bool:
        """An fp8 ``wk`` weight or a ``wk`` scale, for an unquantized fused parameter."""
        weight_name = name.removesuffix(SCALE_INV)
        if not weight_name.endswith(_INDEXER_WK) or Fp8IndexerWk.target(name) not in params:
            return False
        if name != weight_name:  # the scale
            return True
        return tensor.dtype in FP8_DTYPES and params[Fp8IndexerWk.target(name)].dtype not in FP8_DTYPES

    def add(self, name: str, tensor: torch.Tensor, dtype: torch.dtype) -> tuple[str, torch.Tensor] | None:
        """Keep ``tensor``; once both halves are here: (fused parameter name, dequantized ``wk``)."""
        weight_name = name.removesuffix(SCALE_INV)
        entry = self.pending.setdefault(weight_name, {})
        entry["scale" if name.endswith(SCALE_INV) else "weight"] = tensor
        if len(entry) < 2:
            return None
        del self.pending[weight_name]
        return self.target(name), dequantize_blocks(entry["weight"], entry["scale"], dtype)

    def unpaired(self) -> list[str]:
        """Names of the halves still waiting for their other half."""
        return [name + (SCALE_INV if "scale" in entry else "") for name, entry in self.pending.items()]


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 [N, K] times its per-block scale [ceil(N/bn), ceil(K/bk)] (or per row [N])
    -> ``dtype``; the block shape follows from the two shapes, as in vLLM's loader."""
    rows, cols = weight.shape
    scale = scale_inv.float()
    if scale.ndim == 1:
        scale = scale[:, None]
    block_rows = -(-rows // scale.shape[0])
    block_cols = -(-cols // scale.shape[1])
    full = scale.repeat_interleave(block_rows, 0)[:rows].repeat_interleave(block_cols, 1)[:, :cols]
    return (weight.float() * full).to(dtype)


def _stacked_name(name: str, stacked) -> tuple[str, int | None]:
    """The fused parameter and shard a checkpoint tensor goes to (its module name matched
    whole: ``wk`` is not ``wk_weights_proj``), else (name, None)."""
    for param_name, weight_name, shard_id in stacked:
        part = f".{weight_name}."
        if part in name:
            return name.replace(part, f".{param_name}."), shard_id
    return name, None


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None
