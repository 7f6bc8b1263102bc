"""The release-format checkpoint preset (eval/release_checkpoint.py, make_tiny_model --preset release)
and the loader's fp8 indexer ``wk`` dequantization. CPU only, no engine."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

EVAL_DIR = Path(__file__).resolve().parents[2] / "eval"
if str(EVAL_DIR) not in sys.path:
    sys.path.insert(0, str(EVAL_DIR))

import make_tiny_model as mtm  # noqa: E402
import release_checkpoint as rc  # noqa: E402

# The layers the release stores in fp8 with a weight_scale_inv (per layer, MTP block included).
RELEASED_FP8 = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "indexer.wq_b", "indexer.wk",
                "gate_proj", "up_proj", "down_proj")


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})
    return out


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory) -> Path:
    return mtm.build_tiny_model(tmp_path_factory.mktemp("rel") / "v32", seed=3, preset="release")


def test_block_quantization_round_trip():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(576, 320, generator=g) * torch.logspace(-3, 1, 320)  # partial blocks both ways
    quant, scale_inv = rc.quantize_block_fp8(weight)
    assert quant.dtype == torch.float8_e4m3fn and quant.shape == weight.shape
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (5, 3)
    # Each block's largest magnitude maps to the fp8 maximum (448).
    assert torch.allclose(scale_inv[4, 2], weight[512:, 256:].abs().max() / 448)
    back = rc.dequantize_block_fp8(quant, scale_inv, torch.float32)
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for values in the normal range.
    block_scale = scale_inv.repeat_interleave(128, 0)[:576].repeat_interleave(128, 1)[:, :320]
    normal = weight.abs() >= block_scale * 2**-6
    assert ((back - weight).abs()[normal] <= weight.abs()[normal] * 2**-4 + 1e-12).all()
    # Below the normal range e4m3's spacing is 2^-9 of the block scale.
    assert ((back - weight).abs()[~normal] <= block_scale[~normal] * 2**-9).all()


def test_release_tensors_dtypes_and_scales(release_dir):
    tensors = _tensors(release_dir)
    cfg = json.loads((release_dir / "config.json").read_text())
    L = cfg["num_hidden_layers"]
    fp8 = {n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    scales = {n for n in tensors if n.endswith("weight_scale_inv")}
    assert {n + "_scale_inv" for n in fp8} == scales
    for name in fp8:
        assert re.fullmatch(r"model\.layers\.\d+\.(self_attn|mlp)\..*\.weight", name), name
        assert name.rsplit(".weight", 1)[0].endswith(RELEASED_FP8), name
        rows, cols = tensors[name].shape
        assert tensors[name + "_scale_inv"].shape == (-(-rows // 128), -(-cols // 128))
        assert tensors[name + "_scale_inv"].dtype == torch.float32
    # Every released fp8 layer of every decoder layer (the MTP block L too) is quantized.
    for i in range(L + 1):
        for short in ("self_attn.q_a_proj", "self_attn.kv_b_proj", "self_attn.o_proj", "self_attn.indexer.wq_b",
                      "self_attn.indexer.wk"):
            assert f"model.layers.{i}.{short}.weight" in fp8
    assert "model.layers.0.mlp.gate_proj.weight" in fp8
    for i in (1, L):
        assert f"model.layers.{i}.mlp.experts.{cfg['n_routed_experts'] - 1}.down_proj.weight" in fp8
        assert f"model.layers.{i}.mlp.shared_experts.up_proj.weight" in fp8
    rest = {n: t.dtype for n, t in tensors.items() if n not in fp8 | scales}
    assert {n for n, d in rest.items() if d == torch.float32} == {
        f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in range(1, L + 1)}
    assert {d for n, d in rest.items() if not n.endswith("e_score_correction_bias")} == {torch.bfloat16}
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.1.self_attn.indexer.weights_proj.weight", "model.layers.1.self_attn.indexer.k_norm.weight",
                 f"model.layers.{L}.eh_proj.weight", f"model.layers.{L}.enorm.weight", f"model.layers.{L}.hnorm.weight",
                 f"model.layers.{L}.shared_head.norm.weight", f"model.layers.{L}.shared_head.head.weight",
                 f"model.layers.{L}.embed_tokens.weight"):
        assert rest[name] == torch.bfloat16, name


def test_release_config(release_dir):
    cfg = json.loads((release_dir / "config.json").read_text())
    assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]}
    assert (cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"], cfg["n_routed_experts"]) == (8, 4, 8, 32)
    assert cfg["routed_scaling_factor"] == 2.5 and cfg["topk_method"] == "noaux_tc"
    assert cfg["q_lora_rank"] % 128 == 0 and cfg["moe_intermediate_size"] % 256 == 0
    real = rc.release_config(mtm.make_config(1344, real_dims=True), real_dims=True, num_experts=16)
    assert real["rope_scaling"] == {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                    "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert "rope_parameters" not in real and real["rope_theta"] == 10000
    assert real["max_position_embeddings"] == 163840 and real["n_routed_experts"] == 16
    with pytest.raises(ValueError, match="multiple of 8"):
        rc.release_config(mtm.make_config(1344), real_dims=False, num_experts=12)


def test_release_config_parses_as_yarn_in_transformers(tmp_path):
    """The release's rope_scaling spelling reaches the parsed config as YaRN (what vLLM reads)."""
    from transformers import AutoConfig

    cfg = rc.release_config(mtm.make_config(1344, real_dims=True), real_dims=True)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rope = AutoConfig.from_pretrained(str(tmp_path)).rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 40 and rope["rope_theta"] == 10000


def test_indexer_wk_bf16_option_and_dropping_a_scale(tmp_path):
    dropped = "model.layers.1.mlp.experts.5.up_proj.weight_scale_inv"
    out = mtm.build_tiny_model(tmp_path / "v32", seed=3, preset="release", indexer_wk_fp8=False,
                               num_nextn_predict_layers=0, drop_tensor=[dropped])
    tensors = _tensors(out)
    assert tensors["model.layers.0.self_attn.indexer.wk.weight"].dtype == torch.bfloat16
    assert "model.layers.0.self_attn.indexer.wk.weight_scale_inv" not in tensors
    assert tensors["model.layers.0.self_attn.indexer.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert dropped not in tensors and dropped.removesuffix("_scale_inv") in tensors


def test_dequantized_copy(release_dir, tmp_path):
    deq = rc.dequantize_checkpoint(release_dir, tmp_path / "deq")
    src, out = _tensors(release_dir), _tensors(deq)
    assert "quantization_config" not in json.loads((deq / "config.json").read_text())
    assert set(out) == {n for n in src if not n.endswith("_scale_inv")}
    for name, t in out.items():
        if src[name].dtype == torch.float8_e4m3fn:
            assert t.dtype == torch.bfloat16
            # Independent of the helper: block (i, j) of the weight times scale_inv[i, j].
            scale = src[name + "_scale_inv"]
            assert torch.equal(t[:128, :128], (src[name][:128, :128].float() * scale[0, 0]).bfloat16()), name
            assert torch.equal(t[-1:, -1:], (src[name][-1:, -1:].float() * scale[-1, -1]).bfloat16()), name
        else:
            assert torch.equal(t, src[name]), name
    assert (deq / "tokenizer.json").read_bytes() == (release_dir / "tokenizer.json").read_bytes()


def test_loader_dequantizes_fp8_indexer_wk_like_vllm():
    """The plugin's fp8 wk dequantization equals vLLM's own (scaled_dequantize, as in
    deepseek_v2._try_load_fp8_indexer_wk) for the release's [128, hidden] / [1, hidden/128] layout."""
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape, scaled_dequantize

    from vllm_cp_nsa.adapter.weights import Fp8IndexerWk

    weight = torch.randn(128, 640, generator=torch.Generator().manual_seed(1))
    quant, scale_inv = rc.quantize_block_fp8(weight)
    assert scale_inv.shape == (1, 5)
    name = "model.layers.0.self_attn.indexer.wk.weight"
    fused = "model.layers.0.self_attn.indexer.wk_weights_proj.weight"  # wk rows, then weights_proj's
    params = {fused: torch.nn.Parameter(torch.empty(128 + 16, 640, dtype=torch.bfloat16), requires_grad=False)}
    pairing = Fp8IndexerWk()
    assert pairing.accepts(name + "_scale_inv", scale_inv, params) and pairing.accepts(name, quant, params)
    assert not pairing.accepts(name, weight.bfloat16(), params)  # a bf16 wk loads as a stacked part
    assert not pairing.accepts("model.layers.0.self_attn.indexer.weights_proj.weight", weight.bfloat16(), params)
    assert pairing.add(name + "_scale_inv", scale_inv, torch.bfloat16) is None
    assert pairing.unpaired() == [name + "_scale_inv"]
    loaded_name, loaded = pairing.add(name, quant, torch.bfloat16)
    assert loaded_name == fused and pairing.unpaired() == []
    expected = scaled_dequantize(quant, scale_inv, group_shape=GroupShape(128, 128), out_dtype=torch.bfloat16)
    assert torch.equal(loaded, expected)


def test_gpu_compare_measures_every_run_against_the_bf16_reference():
    import gpu_compare as gc

    assert not gc.run_allowed("native-bf16ref", "fp8", False) and not gc.run_allowed("native-bf16ref", "auto", True)
    assert gc.run_allowed("native-bf16ref", "auto", False) and gc.run_allowed("native-tp", "fp8", True)
    runs = {"native-tp+fp8": {"greedy": {"tokens": [[1]]}}, "native-tp": {"greedy": {"tokens": [[1]]}},
            "plugin-off-bf16": {"greedy": {"tokens": [[1]]}}}
    assert gc.agreement_reference({"runs": runs}, "+fp8") == "plugin-off-bf16"
    runs["native-bf16ref"] = {"greedy": {"tokens": [[1]]}}
    assert gc.agreement_reference({"runs": runs}, "+fp8") == "native-bf16ref"
    del runs["native-bf16ref"], runs["plugin-off-bf16"]
    assert gc.agreement_reference({"runs": runs}, "+fp8") == "native-tp+fp8"
    log = ("(EngineCore pid=1) INFO 12-03 08:50:01 [plugin.py:40] vllm_cp_nsa: installed but not active\n"
           "INFO 12-03 08:50:02 [model.py:1] something else\n")
    assert gc.plugin_log_lines(log) == ["vllm_cp_nsa: installed but not active"]


def test_gpu_compare_weights_bf16_times_every_run_on_the_dequantized_copy(tmp_path, monkeypatch):
    import argparse
    import subprocess

    import gpu_compare as gc

    release, copy = tmp_path / "release", tmp_path / "release-bf16"
    monkeypatch.setattr(gc, "ensure_bf16_copy", lambda model_dir, args: (copy, 2.5))
    args = argparse.Namespace(preset="release", weights="bf16")
    assert gc.checkpoint_dirs(release, args, ["native-tp", "plugin-off"]) == (copy, copy, 2.5)
    assert gc.checkpoint_dirs(release, args, ["native-bf16ref"]) == (copy, copy, 2.5)
    args.weights = "as-built"
    assert gc.checkpoint_dirs(release, args, ["native-tp"]) == (release, None, 0.0)
    assert gc.checkpoint_dirs(release, args, ["native-tp", "native-bf16ref"]) == (release, copy, 2.5)
    with pytest.raises(SystemExit, match="--weights bf16 need --preset release"):
        gc.checkpoint_dirs(release, argparse.Namespace(preset="default", weights="bf16"), ["native-tp"])
    driver_help = subprocess.run([sys.executable, gc.__file__, "drive", "--help"], capture_output=True, text=True)
    assert "--weights {as-built,bf16}" in driver_help.stdout


def test_checkpoint_parts_go_to_vllms_fused_layers_by_whole_module_name():
    """q_a / kv_a into ``fused_qkv_a_proj``, the indexer's wk / weights_proj into
    ``wk_weights_proj`` (weights and block scales), as vLLM's own V3.2 stacks them; a name that
    only contains a part's name (``wk`` in ``wk_weights_proj``, ``q_a_proj`` beside
    ``q_a_layernorm``) is not a part."""
    from vllm_cp_nsa.adapter.weights import PACKED_MODULES, STACKED_PARAMS, _stacked_name

    attn = "model.layers.3.self_attn."
    assert _stacked_name(attn + "q_a_proj.weight_scale_inv", STACKED_PARAMS) == (
        attn + "fused_qkv_a_proj.weight_scale_inv", 0)
    assert _stacked_name(attn + "kv_a_proj_with_mqa.weight", STACKED_PARAMS) == (attn + "fused_qkv_a_proj.weight", 1)
    assert _stacked_name(attn + "indexer.wk.weight", STACKED_PARAMS) == (attn + "indexer.wk_weights_proj.weight", 0)
    assert _stacked_name(attn + "indexer.weights_proj.weight", STACKED_PARAMS) == (
        attn + "indexer.wk_weights_proj.weight", 1)
    for name in (attn + "q_a_layernorm.weight", attn + "indexer.wk_weights_proj.weight", attn + "kv_b_proj.weight"):
        assert _stacked_name(name, STACKED_PARAMS) == (name, None)
    assert PACKED_MODULES == {"gate_up_proj": ["gate_proj", "up_proj"],
                              "fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"],
                              "wk_weights_proj": ["wk", "weights_proj"]}
