"""The release-format checkpoint (fp8 block weights + scales, fp8 indexer wk, grouped routing,
MTP layer) through the real vLLM CPU engine and the plugin's loader.

The accuracy reference is the same weights dequantized to bf16 (no quantization_config): the
fp8 run goes through vLLM's fp8 block linears / fused-MoE on CPU and the plugin's wk
dequantization, the reference through plain bf16 layers.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import SPLIT_EVERY_BATCH, VllmRunFailed, run_vllm
from make_tiny_model import build_tiny_model
from release_checkpoint import dequantize_checkpoint

# vLLM's CPU fp8 block-scaled GEMMs (every fp8 linear of this checkpoint) exist only on hosts
# with AMX tiles: elsewhere vLLM refuses the checkpoint while building the layers, with or
# without the plugin ("Failed to find a kernel that can implement the ScaledMM linear layer").
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(
    not torch.cpu._is_amx_tile_supported(),
    reason="vLLM's CPU fp8 block GEMMs need AMX tiles (Sapphire Rapids or newer); this CPU has none")]

PROMPTS = [[0] + [5 + (7 * i) % 300 for i in range(95)], [0, 17, 18, 19, 20, 21, 22, 23]]
# fp8 W8A16 vs bf16 weights: the weights are the same numbers, only the GEMMs' rounding differs.
# Ignoring a scale (or a wrong block layout) moves prompt logprobs by nats, not hundredths.
MAX_MEAN_ABS_LOGPROB_DELTA = 0.06


def _spec(model, tp: int = 1, **llm) -> dict:
    return {
        "llm": {"model": str(model), "dtype": "bfloat16", "max_model_len": 512, "enforce_eager": True,
                "tensor_parallel_size": tp, **llm},
        "prompts": PROMPTS,
        "sampling": {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True, "prompt_logprobs": 0},
    }


@pytest.fixture(scope="module")
def release_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("release") / "v32", seed=0, preset="release")


@pytest.fixture(scope="module")
def reference_run(release_model, tmp_path_factory):
    deq = dequantize_checkpoint(release_model, tmp_path_factory.mktemp("release-bf16") / "v32")
    return run_vllm(_spec(deq))


def _mean_abs_delta(run, ref) -> float:
    deltas = [abs(a - b) for out, ref_out in zip(run["outputs"], ref["outputs"])
              for a, b in zip(out["prompt_logprobs"][1:], ref_out["prompt_logprobs"][1:])]
    return sum(deltas) / len(deltas)


def test_release_checkpoint_loads_and_matches_its_bf16_copy(release_model, reference_run):
    result = run_vllm(_spec(release_model))
    assert result["info"]["model_class"] == "vllm_cp_nsa.adapter.model.CpNsaDeepseekV32ForCausalLM"
    assert "Fp8" in result["log"]  # vLLM's fp8 linear / MoE methods built the layers
    assert all(len(out["token_ids"]) == 4 for out in result["outputs"])
    delta = _mean_abs_delta(result, reference_run)
    assert delta < MAX_MEAN_ABS_LOGPROB_DELTA, delta
    assert [o["token_ids"][0] for o in result["outputs"]] == [o["token_ids"][0] for o in reference_run["outputs"]]


@pytest.mark.slow
@pytest.mark.ci
def test_release_checkpoint_at_tp2_round_robin(release_model, reference_run):
    """-tp 2 with CP: fused-MoE fp8 experts sharded over the ranks, attention replicated."""
    result = run_vllm(_spec(release_model, tp=2, additional_config={"cp_nsa": {"mode": "round-robin-split", **SPLIT_EVERY_BATCH}}))
    delta = _mean_abs_delta(result, reference_run)
    assert delta < MAX_MEAN_ABS_LOGPROB_DELTA, delta


@pytest.mark.slow
@pytest.mark.ci
def test_release_checkpoint_mtp_draft_loads_its_fp8_layer(release_model):
    """The draft loads the MTP layer's tensors (fp8 decoder block + scales, bf16 enorm / hnorm /
    eh_proj / shared_head / embed_tokens) and proposes; the loader fails on any it cannot place."""
    spec = _spec(release_model, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
    spec["sampling"] = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}
    result = run_vllm(spec)
    assert all(len(out["token_ids"]) == 8 for out in result["outputs"])
    assert result["info"]["spec_decode"].get("drafts", 0) > 0, result["info"]["spec_decode"]


def test_unknown_and_missing_tensors_fail_naming_them(tmp_path):
    """One checkpoint with an extra tensor (a static activation scale the model has no
    parameter for) and a missing one (one expert's scale: its FusedMoE parameter is still
    filled by the other experts, so only per-expert accounting sees it)."""
    missing = "model.layers.1.mlp.experts.5.up_proj.weight_scale_inv"
    extra = "model.layers.1.self_attn.q_a_proj.input_scale"
    model = build_tiny_model(tmp_path / "v32", seed=0, preset="release", drop_tensor=[missing],
                             num_nextn_predict_layers=0)
    tensors = load_file(str(model / "model.safetensors"))
    tensors[extra] = torch.ones((), dtype=torch.float32)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(VllmRunFailed) as err:
        run_vllm(_spec(model), timeout=300)
    message = str(err.value)
    assert "the checkpoint does not match the model" in message
    assert f"checkpoint tensors with no matching parameter: {extra}" in message
    assert f"no tensor for: {missing}" in message
