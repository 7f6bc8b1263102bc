"""Fixtures for end-to-end tests against the real vLLM engine / server (CPU)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

from make_tiny_model import build_tiny_model  # noqa: E402

RUNNER = Path(__file__).with_name("vllm_runner.py")
SPLIT_EVERY_BATCH = {"decode_attention": "split", "min_tokens_for_cp": 0}
"""cp_nsa options under which every batch of >= N tokens splits: these tests' batches lie far
below the thresholds of the split policy's ``auto`` (1024 / 2048 tokens), which would run them
all unsplit."""


def vllm_env(tp: int = 1, **extra: str) -> dict[str, str]:
    """The verified vLLM-on-CPU environment (README: vLLM 0.32 on CPU)."""
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        TOKENIZERS_PARALLELISM="false",
    )
    if tp > 1:
        env.update(VLLM_CPU_OMP_THREADS_BIND="nobind", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


class VllmRunFailed(RuntimeError):
    pass


def run_vllm(spec: dict, timeout: int = 900, **env_extra: str) -> dict:
    """Run one engine configuration in a fresh process; return its RESULT dict.

    The runner's output goes to files, not pipes, and its process group is killed once it
    exits: a vLLM worker that outlives the runner (it leaves with ``os._exit``) would
    otherwise hold the pipes open and block the test until the timeout."""
    tp = spec["llm"].get("tensor_parallel_size", 1)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, str(RUNNER), "-"], stdin=subprocess.PIPE, stdout=out, stderr=err,
                                text=True, env=vllm_env(tp, **env_extra), start_new_session=True)
        try:
            proc.communicate(json.dumps(spec), timeout=timeout)
        finally:
            kill_process_group(proc.pid)
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            result["log"] = stdout + stderr
            return result
    raise VllmRunFailed(
        f"vLLM run failed (rc={proc.returncode}).\n--- stderr tail ---\n{stderr[-6000:]}"
        f"\n--- stdout tail ---\n{stdout[-2000:]}"
    )


def kill_process_group(pgid: int) -> None:
    """SIGKILL whatever is left of a runner's process group (its vLLM workers)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "v32", seed=0)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


def mixed_prompts(tokenizer, index_topk: int) -> list[list[int]]:
    """Eight prompts: some shorter than top-k, some several times longer."""
    texts = [
        "Hello, my name is",
        "a b c",
        "The capital of France is Paris. " * 3,
        "The quick brown fox jumps over the lazy dog. " * 10,
        "Once upon a time there was a tiny model that learned to count. " * 14,
        "1 2 3 4 5 6 7 8 9 10 " * 25,
        "Question: what is two plus two? Answer: four. " * 40,
        "Z",
    ]
    prompts = [tokenizer(t).input_ids for t in texts]
    lengths = sorted(len(p) for p in prompts)
    assert lengths[0] < index_topk and lengths[-1] > 4 * index_topk, lengths
    return prompts


def small_spec(model, **llm):
    """One short greedy request through ``model`` in fp32, eager."""
    return {
        "llm": {"model": str(model), "dtype": "float32", "max_model_len": 1024, "enforce_eager": True, **llm},
        "prompts": [[0, 5, 6, 7, 8]],
        "sampling": {"temperature": 0.0, "max_tokens": 4, "ignore_eos": True},
    }


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tiny_model):
    """A tiny random Llama sharing the V3.2 model's tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1344, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=0, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tiny_model / name, out / name)
    return out
