"""Bad configuration and inputs fail clearly; other models are left alone."""


import pytest

from conftest import VllmRunFailed, run_vllm, small_spec
from make_tiny_model import build_tiny_model

pytestmark = pytest.mark.e2e




def test_non_v32_model_is_untouched(tiny_llama):
    result = run_vllm(small_spec(tiny_llama, additional_config={"cp_nsa": {"mode": "round-robin-split"}}))
    assert result["info"]["architecture"] == "LlamaForCausalLM"
    assert result["info"]["model_class"].startswith("vllm.model_executor.models.llama.")
    assert len(result["outputs"][0]["token_ids"]) == 4


BAD_CONFIGS = [
    ({"mdoe": "round-robin-split"}, "unknown key 'mdoe'; allowed keys: mode, moe, kernels, min_tokens_for_cp"),
    ({"mode": "zigzag"}, "allowed values: off, round-robin-split, in-seq-split"),
    ({"moe": "deepep"}, "allowed values: auto, full, scattered"),
    ({"kernels": "cuda"}, "allowed values: auto, vllm-deepgemm, vllm, torch, triton"),
    ({"min_tokens_for_cp": -1}, "'min_tokens_for_cp'] must be 'auto' or a non-negative integer, got -1"),
    ({"decode_attention": "heads"}, "'decode_attention'] = 'heads'; allowed values: auto, split, tp"),
]


def test_malformed_config_fails_engine_startup(tiny_model):
    """A real engine start (own process) fails with the message."""
    cp_nsa, expected = BAD_CONFIGS[0]
    with pytest.raises(VllmRunFailed) as err:
        run_vllm(small_spec(tiny_model, additional_config={"cp_nsa": cp_nsa}))
    assert expected in str(err.value)


@pytest.mark.parametrize("cp_nsa,expected", BAD_CONFIGS)
def test_malformed_config_rejected_by_vllm_config(tiny_model, cp_nsa, expected):
    """vLLM's own config construction (where the engine fails) names key and values."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(tiny_model), max_model_len=1024, additional_config={"cp_nsa": cp_nsa})
    with pytest.raises(Exception) as err:
        args.create_engine_config()
    assert expected in str(err.value)


def test_missing_indexer_weight_names_the_tensor(tmp_path):
    missing = "model.layers.1.self_attn.indexer.wk.weight"
    model = build_tiny_model(tmp_path / "broken", seed=0, drop_tensor=[missing])
    with pytest.raises(VllmRunFailed) as err:
        run_vllm(small_spec(model))
    assert missing in str(err.value)


def test_cp_mode_with_one_rank_warns_and_runs_unsplit(tiny_model, tmp_path):
    result = run_vllm(small_spec(tiny_model, additional_config={"cp_nsa": {"mode": "round-robin-split"}}),
                      CP_NSA_TRACE_PLANS=str(tmp_path / "plans"))
    plans = (tmp_path / "plans.rank0").read_text().splitlines()
    assert plans and all('"skip_reason": "mode off"' in line for line in plans)
    assert result["log"].count("vllm_cp_nsa: mode=round-robin-split needs >= 2 ranks (-tp N); running unsplit") == 1
    assert len(result["outputs"][0]["token_ids"]) == 4


def test_full_moe_with_data_parallel_is_refused(tiny_model):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(tiny_model), max_model_len=1024, tensor_parallel_size=2, data_parallel_size=2,
                      additional_config={"cp_nsa": {"mode": "round-robin-split", "moe": "full"}})
    with pytest.raises(Exception) as err:
        args.create_engine_config()
    assert "moe='full' cannot run with data parallelism (--data-parallel-size 2)" in str(err.value)
    # Without CP the same topology is left alone.
    EngineArgs(model=str(tiny_model), max_model_len=1024, tensor_parallel_size=2, data_parallel_size=2,
               additional_config={"cp_nsa": {"mode": "off"}}).create_engine_config()
    # With expert parallelism the scattered MoE spans all DP x TP ranks: accepted (issue 20).
    EngineArgs(model=str(tiny_model), max_model_len=1024, tensor_parallel_size=2, data_parallel_size=2,
               enable_expert_parallel=True,
               additional_config={"cp_nsa": {"mode": "round-robin-split"}}).create_engine_config()
