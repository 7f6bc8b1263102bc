"""The plugin installed on a vLLM it cannot run on (a touchpoint missing) never breaks a
launch of a model it does not serve and fails a cp_nsa launch with the reason; on CPU,
where vLLM cannot run DeepSeek-V3.2, the plugin serves it without cp_nsa and says so.
Real vLLM CPU engine, one fresh process per launch."""

import json
import re
import subprocess
import sys

import pytest
import torch

from conftest import RUNNER, VllmRunFailed, run_vllm, small_spec, vllm_env

pytestmark = pytest.mark.e2e

MISSING = "NoSuchSymbolForStepAsideTest"
# Runs vllm_runner.py in a process whose vLLM "lacks" one symbol the plugin needs: the
# touchpoint list gains one that does not resolve before vLLM loads the plugin.
WITHOUT_A_SYMBOL = f"""
import runpy, sys
from vllm_cp_nsa import touchpoints
touchpoints.TOUCHPOINTS += (touchpoints.Touchpoint("vllm.config", "{MISSING}", "test a vLLM without it"),)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_without_a_symbol(spec: dict, tmp_path) -> dict:
    wrapper = tmp_path / "without_a_symbol.py"
    wrapper.write_text(WITHOUT_A_SYMBOL)
    proc = subprocess.run([sys.executable, str(wrapper), str(RUNNER), json.dumps(spec)],
                          capture_output=True, text=True, timeout=900, env=vllm_env())
    log = proc.stdout + proc.stderr
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "log": log}
    raise VllmRunFailed(f"vLLM run failed (rc={proc.returncode}).\n{log[-8000:]}")




def test_missing_symbol_leaves_other_models_running(tiny_llama, tmp_path):
    """register() logs why and does not raise; a Llama launch (even one carrying cp_nsa,
    which only concerns V3.2) runs through vLLM's own model."""
    result = run_without_a_symbol(small_spec(tiny_llama, additional_config={"cp_nsa": {"mode": "round-robin-split"}}),
                                  tmp_path)
    assert result["info"]["model_class"].startswith("vllm.model_executor.models.llama.")
    assert len(result["outputs"][0]["token_ids"]) == 4
    reason = [line for line in result["log"].splitlines() if f"vllm.config.{MISSING}" in line]
    assert len(reason) == 1 and "The plugin stays inactive" in reason[0], reason


def test_missing_symbol_fails_a_cp_nsa_launch_with_the_reason(tiny_model, tmp_path):
    with pytest.raises(VllmRunFailed) as err:
        run_without_a_symbol(small_spec(tiny_model, additional_config={"cp_nsa": {}}), tmp_path)
    message = str(err.value)
    assert f"vllm.config.{MISSING} (needed to test a vLLM without it)" in message
    assert "cp_nsa was requested in --additional-config but the plugin cannot run on this vLLM" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour (on CUDA vLLM's own V3.2 runs)")
def test_cpu_serves_v32_without_cp_nsa_and_says_so(tiny_model):
    result = run_vllm(small_spec(tiny_model))
    assert result["info"]["model_class"] == "vllm_cp_nsa.adapter.model.CpNsaDeepseekV32ForCausalLM"
    assert len(result["outputs"][0]["token_ids"]) == 4
    says = [line for line in result["log"].splitlines()
            if "no cp_nsa in --additional-config, but vLLM cannot run DeepSeek-V3.2 on cpu" in line]
    assert len(says) == 1 and "the plugin serves it" in says[0]
    assert "installed but not active" not in result["log"]


def _cudagraph_mode(log: str) -> str:
    """The cudagraph_mode of vLLM's own engine-config line."""
    modes = set(re.findall(r"'cudagraph_mode': <CUDAGraphMode\.(\w+)", log))
    assert len(modes) == 1, modes
    return modes.pop()


@pytest.mark.gpu
def test_on_cuda_without_cp_nsa_vllms_own_v32_runs_unchanged(tiny_model):
    """With the plugin installed and no cp_nsa, the launch is vLLM's own: its model class,
    CUDA-graph mode, KV dtype and greedy tokens equal a launch with plugins disabled;
    cp_nsa (even empty) switches to the plugin's model."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    spec = small_spec(tiny_model, dtype="bfloat16", enforce_eager=False)
    installed = run_vllm(spec)
    without = run_vllm(spec, VLLM_PLUGINS="")
    assert installed["info"]["model_class"].startswith("vllm.models.deepseek_v32.nvidia.")
    assert installed["info"]["model_class"] == without["info"]["model_class"]
    assert installed["info"]["kv_cache_dtype"] == without["info"]["kv_cache_dtype"]
    assert _cudagraph_mode(installed["log"]) == _cudagraph_mode(without["log"])
    assert installed["outputs"] == without["outputs"]
    not_active = [line for line in installed["log"].splitlines() if "vllm_cp_nsa: installed but not active" in line]
    assert len(not_active) == 1 and "no cp_nsa in --additional-config" in not_active[0]
    asked = run_vllm(small_spec(tiny_model, dtype="bfloat16", additional_config={"cp_nsa": {}}))
    assert asked["info"]["model_class"] == "vllm_cp_nsa.adapter.model.CpNsaDeepseekV32ForCausalLM"
