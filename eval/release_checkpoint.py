"""The official DeepSeek-V3.2 release's checkpoint format, for the test checkpoint builder.

``make_tiny_model.py --preset release`` writes random weights the way the release
stores them, so the loaders (vLLM's own and the plugin's) meet the same tensors:

* ``quantization_config`` ``{quant_method: fp8, fmt: e4m3, activation_scheme: dynamic,
  weight_block_size: [128, 128]}``;
* fp8 e4m3 weights plus a float32 ``<name>_scale_inv`` (``...weight_scale_inv``), one
  scale per 128x128 block (dequantized weight = fp8 value x its block's scale), on the
  attention projections (``q_a_proj``, ``q_b_proj``, ``kv_a_proj_with_mqa``,
  ``kv_b_proj``, ``o_proj``), the indexer's ``wq_b`` and ``wk`` (``wk`` in fp8 as in
  DeepSeek-V3.2-Exp's and GLM-5's FP8 releases, ``F32 [1, hidden/128]`` scale; vLLM
  dequantizes it at load, ``deepseek_v2.py:_try_load_fp8_indexer_wk``;
  ``indexer_wk_fp8=False`` keeps it bf16 like other exports), and the dense-MLP,
  routed- and shared-expert ``gate_proj`` / ``up_proj`` / ``down_proj`` of every
  decoder layer, the MTP layer's decoder block included;
* bf16 (the checkpoint dtype) everywhere else: embeddings, ``lm_head``, norms, the
  router ``gate.weight``, the indexer's ``weights_proj`` and ``k_norm``, the MTP
  layer's ``embed_tokens`` / ``enorm`` / ``hnorm`` / ``eh_proj`` / ``shared_head``;
  the router's ``e_score_correction_bias`` stays float32;
* grouped routing with a bias: ``noaux_tc``, ``n_group`` 8, ``topk_group`` 4, top-8,
  ``routed_scaling_factor`` 2.5;
* at real dimensions, YaRN as released (``rope_scaling`` ``{type: yarn, factor: 40,
  original_max_position_embeddings: 4096, beta_fast: 32, beta_slow: 1, mscale: 1.0,
  mscale_all_dim: 1.0}``, ``rope_theta`` 10000, ``max_position_embeddings`` 163840);
  the tiny preset keeps the tiny default rope (``make_config``'s), which issue 16.1
  makes a scaled-down YaRN.

Tensor names and which ones carry scales follow the released
``model.safetensors.index.json`` of DeepSeek-V3 / V3.2 (layer 61 = the MTP layer:
``embed_tokens``, ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm``,
``shared_head.head`` in BF16, its decoder block quantized like any other layer).

Tiny dimensions change where vLLM's fp8 block linears need whole 128-blocks:
``q_lora_rank`` 128 (vLLM fuses ``q_a_proj`` with ``kv_a_proj_with_mqa``, and every
part of a merged fp8 linear but the last must be a multiple of 128; also every input
dimension a multiple of 128 for the CPU kernel) and ``moe_intermediate_size`` 256
(fused-MoE needs the per-rank intermediate size a multiple of 128, at -tp 2 too).

``dequantize_checkpoint(src, dst)`` writes the same weights in bf16 without
``quantization_config``: the accuracy reference for the fp8 runs.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

BLOCK = 128
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
SCALE_SUFFIX = "_scale_inv"

QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [BLOCK, BLOCK],
}
RELEASE_ROPE_SCALING = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 40,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
    "original_max_position_embeddings": 4096,
    "type": "yarn",
}
RELEASE_MAX_POSITIONS = 163840
# Grouped routing as released (256 experts there; any count with 8 equal groups works).
RELEASE_ROUTING = {
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "routed_scaling_factor": 2.5,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
}
DEFAULT_NUM_EXPERTS = 32
# Tiny dimensions that fp8 128x128 blocks need (see the module docstring).
TINY_BLOCK_DIMS = {"q_lora_rank": 128, "moe_intermediate_size": 256}

_LAYER = r"model\.layers\.\d+\."
_QUANTIZED = re.compile(
    _LAYER + r"(self_attn\.(q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|indexer\.wq_b)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight"
)
_INDEXER_WK = re.compile(_LAYER + r"self_attn\.indexer\.wk\.weight")


def release_config(cfg: dict, *, real_dims: bool, num_experts: int | None = None) -> dict:
    """``cfg`` (make_config's) turned into the release's format: quantization, routing,
    and at real dimensions the released rope; ``num_experts`` routed experts
    (default 32; a multiple of ``n_group`` 8 with at least 2 per group for top-8)."""
    num_experts = DEFAULT_NUM_EXPERTS if num_experts is None else num_experts
    groups = RELEASE_ROUTING["n_group"]
    if num_experts % groups or num_experts // groups * RELEASE_ROUTING["topk_group"] < RELEASE_ROUTING[
            "num_experts_per_tok"]:
        raise ValueError(f"num_experts must be a multiple of {groups} and at least 16 (top-8 out of the "
                         f"best 4 of 8 groups), got {num_experts}")
    out = dict(cfg)
    out.update(RELEASE_ROUTING)
    out["n_routed_experts"] = num_experts
    if not real_dims:
        out.update(TINY_BLOCK_DIMS)
    else:
        out.pop("rope_parameters", None)  # the release spells it rope_scaling + rope_theta
        out["rope_scaling"] = dict(RELEASE_ROPE_SCALING)
        out["rope_theta"] = 10000
        out["max_position_embeddings"] = RELEASE_MAX_POSITIONS
    out["dtype"] = out["torch_dtype"] = "bfloat16"
    out["quantization_config"] = dict(QUANTIZATION_CONFIG)
    check_block_dims(out)
    return out


def check_block_dims(cfg: dict) -> None:
    """Refuse dimensions vLLM's fp8 block linears cannot take (input dims, and all
    but the last part of a merged linear, must be whole 128-blocks)."""
    need = {
        "hidden_size": cfg["hidden_size"],
        "q_lora_rank": cfg["q_lora_rank"],
        "kv_lora_rank": cfg["kv_lora_rank"],
        "num_attention_heads * v_head_dim": cfg["num_attention_heads"] * cfg["v_head_dim"],
        "intermediate_size": cfg["intermediate_size"],
        "moe_intermediate_size": cfg["moe_intermediate_size"],
    }
    bad = {k: v for k, v in need.items() if v % BLOCK}
    if bad:
        raise ValueError(f"fp8 {BLOCK}x{BLOCK} block weights need these dimensions to be multiples of {BLOCK}: {bad}")


def is_quantized(name: str, indexer_wk_fp8: bool = True) -> bool:
    """Whether the release stores checkpoint tensor ``name`` in fp8 with a block scale."""
    return bool(_QUANTIZED.fullmatch(name) or (indexer_wk_fp8 and _INDEXER_WK.fullmatch(name)))


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def tensor_names(names, indexer_wk_fp8: bool = True) -> list[str]:
    """Checkpoint tensor names in file order, each quantized weight followed by its scale."""
    out = []
    for name in names:
        out.append(name)
        if is_quantized(name, indexer_wk_fp8):
            out.append(scale_name(name))
    return out


def quantize_block_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] -> (fp8 e4m3 [N, K], float32 scale_inv [ceil(N/128), ceil(K/128)]) with
    ``weight ~= fp8 * scale_inv`` blockwise (DeepSeek's convention: scale_inv multiplies)."""
    n, k = weight.shape
    nb, kb = -(-n // BLOCK), -(-k // BLOCK)
    padded = torch.zeros(nb * BLOCK, kb * BLOCK, dtype=torch.float32, device=weight.device)
    padded[:n, :k] = weight.float()
    blocks = padded.view(nb, BLOCK, kb, BLOCK)
    scale_inv = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / FP8_MAX
    quant = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return quant.view(nb * BLOCK, kb * BLOCK)[:n, :k].contiguous(), scale_inv.contiguous()


def dequantize_block_fp8(weight: torch.Tensor, scale_inv: torch.Tensor,
                         dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of ``quantize_block_fp8`` (each block times its scale)."""
    n, k = weight.shape
    scale = scale_inv.float().repeat_interleave(BLOCK, 0)[:n].repeat_interleave(BLOCK, 1)[:, :k]
    return (weight.float() * scale).to(dtype)


def quantize_weights(named_tensors, indexer_wk_fp8: bool = True):
    """Stream (name, tensor) -> the release's tensors: quantized weights are replaced by
    their fp8 value followed by ``<name>_scale_inv``; everything else passes through."""
    for name, tensor in named_tensors:
        if is_quantized(name, indexer_wk_fp8):
            quant, scale_inv = quantize_block_fp8(tensor)
            yield name, quant
            yield scale_name(name), scale_inv
        else:
            yield name, tensor


def shard_plan(specs, dtype: torch.dtype, names: set[str], shard_bytes: int,
               indexer_wk_fp8: bool = True) -> tuple[dict[str, int], int]:
    """Shard index per tensor of the release stream (scales go with their weight)."""
    plan, shard, size = {}, 0, 0
    for name, shape, kind, _ in specs:
        numel = 1
        for d in shape:
            numel *= d
        quantized = is_quantized(name, indexer_wk_fp8)
        nbytes = numel * (1 if quantized else (4 if kind == "normal_fp32" else dtype.itemsize))
        if name in names:
            if size and size + nbytes > shard_bytes:
                shard, size = shard + 1, 0
            plan[name] = shard
            size += nbytes
        if quantized and scale_name(name) in names:
            plan[scale_name(name)] = shard  # ~1/16384 of the weight's bytes
    return plan, shard + 1


def dequantize_checkpoint(src, dst, dtype: torch.dtype = torch.bfloat16, device: str = "cpu") -> Path:
    """Write ``src``'s weights with every fp8 block weight dequantized to ``dtype`` and
    no ``quantization_config`` to ``dst`` (same shards, tokenizer and other files);
    ``device`` runs the dequantization (cuda for real dimensions)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    config = json.loads((src / "config.json").read_text())
    if config.pop("quantization_config", None) is None:
        raise ValueError(f"{src} has no quantization_config: nothing to dequantize")
    files = sorted(src.glob("*.safetensors"))
    index = None
    if (src / "model.safetensors.index.json").exists():
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["weight_map"] = {n: f for n, f in index["weight_map"].items() if not n.endswith(SCALE_SUFFIX)}
    # Weight and scale may sit in different shards; read scales up front (small).
    scales = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            scales.update({n: f.get_tensor(n) for n in f.keys() if n.endswith(SCALE_SUFFIX)})
    used_scales = set()
    for path in files:
        out = {}
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                if name.endswith(SCALE_SUFFIX):
                    continue
                tensor = f.get_tensor(name)
                if tensor.dtype == FP8_DTYPE:
                    if scale_name(name) not in scales:
                        raise ValueError(f"{src}: fp8 tensor {name} has no {scale_name(name)}")
                    tensor = dequantize_block_fp8(tensor.to(device), scales[scale_name(name)].to(device),
                                                  dtype).cpu()
                    used_scales.add(scale_name(name))
                out[name] = tensor
        save_file(out, str(dst / path.name), metadata={"format": "pt"})
    unused = sorted(set(scales) - used_scales)
    if unused:
        raise ValueError(f"{src}: scales without an fp8 weight: {unused[:5]}")
    for path in src.iterdir():
        if path.is_file() and path.suffix != ".safetensors" and path.name not in (
                "config.json", "model.safetensors.index.json"):
            shutil.copy(path, dst / path.name)
    if index is not None:
        (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    (dst / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return dst
