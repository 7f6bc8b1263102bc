"""vLLM end to end on CPU with ``--data-parallel-size 2 -tp 2 --enable-expert-parallel``
(issue 20): CP inside each DP replica's two TP ranks, the ``scattered`` MoE's experts over all
four ranks. Each replica is its own ``LLM`` process (vLLM's offline data-parallel launch:
``VLLM_DP_RANK`` / ``VLLM_DP_SIZE`` / ``VLLM_DP_MASTER_*``) with its own prompts, one replica
with more requests than the other so it runs steps the other joins with dummy batches. The
greedy tokens and prompt logprobs must equal HF transformers' (the no-CP, no-DP model).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import RUNNER, SPLIT_EVERY_BATCH, VllmRunFailed, kill_process_group, mixed_prompts, vllm_env
from hf_oracle import greedy_generate, load_hf_model, prompt_logprobs
from server import free_port

pytestmark = pytest.mark.e2e

DP, TP = 2, 2
MAX_TOKENS = 6


def _run_replicas(tiny_model, prompts_per_replica, tmp_path, timeout: int = 900) -> list[dict]:
    """One vLLM process per DP replica, started together (they join one world of DP x TP)."""
    port, procs = free_port(), []
    for rank, prompts in enumerate(prompts_per_replica):
        spec = {
            "llm": {"model": str(tiny_model), "dtype": "float32", "tensor_parallel_size": TP, "max_model_len": 1024,
                    "enforce_eager": True, "enable_expert_parallel": True, "max_num_batched_tokens": 128,
                    "additional_config": {"cp_nsa": {"mode": "round-robin-split", **SPLIT_EVERY_BATCH}}},
            "prompts": prompts,
            "sampling": {"temperature": 0.0, "max_tokens": MAX_TOKENS, "ignore_eos": True, "prompt_logprobs": 0},
        }
        env = vllm_env(TP, VLLM_DP_RANK=str(rank), VLLM_DP_RANK_LOCAL=str(rank), VLLM_DP_SIZE=str(DP),
                       VLLM_DP_MASTER_IP="127.0.0.1", VLLM_DP_MASTER_PORT=str(port),
                       CP_NSA_TRACE_PLANS=str(tmp_path / f"plans-dp{rank}"))
        log = open(tmp_path / f"dp{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(RUNNER), json.dumps(spec)], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc, log in procs:
            kill_process_group(proc.pid)  # the runner and any vLLM worker it left behind
            log.close()
    results = []
    for rank in range(DP):
        text = (tmp_path / f"dp{rank}.log").read_text()
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        if not lines:
            raise VllmRunFailed(f"DP replica {rank} failed:\n{text[-6000:]}")
        result = json.loads(lines[-1][len("RESULT "):])
        result["log"] = text
        result["plans"] = [[json.loads(line) for line in open(tmp_path / f"plans-dp{rank}.rank{r}")]
                           for r in range(TP)]
        results.append(result)
    return results


def test_dp_times_cp_with_scattered_moe_equals_hf(tiny_model, tokenizer, tmp_path):
    prompts = mixed_prompts(tokenizer, index_topk=64)
    per_replica = [[prompts[4]], [prompts[3], prompts[6]]]  # 1 request vs 2: uneven replicas
    results = _run_replicas(tiny_model, per_replica, tmp_path)
    log = results[0]["log"]
    assert ("data parallelism 2 x -tp 2: CP (mode=round-robin-split) inside each replica's 2 TP ranks, "
            "moe=scattered with the routed experts spread over vLLM's EP group (all 4 ranks)") in log
    assert "rank 2 in world size 4 is assigned as DP rank 1" in results[1]["log"]  # one world of DP x TP
    for rank, result in enumerate(results):
        plans = result["plans"]
        assert plans[0] == plans[1], f"replica {rank}: both CP ranks must take the same split decisions"
        assert any(p["skip_reason"] is None and p["strategy"] == "round-robin-split" for p in plans[0])
    hf = load_hf_model(tiny_model)
    for rank, (result, replica_prompts) in enumerate(zip(results, per_replica)):
        tokens = [o["token_ids"] for o in result["outputs"]]
        assert tokens == [greedy_generate(hf, p, MAX_TOKENS) for p in replica_prompts], f"replica {rank}"
        for out, prompt in zip(result["outputs"], replica_prompts):
            expected = prompt_logprobs(hf, prompt)
            worst = max(abs(g - e) / max(abs(e), 1e-6) for g, e in zip(out["prompt_logprobs"][1:], expected[1:]))
            assert worst <= 2e-5, f"replica {rank}: prompt-logprob rel err {worst:.1e}"


def test_two_nodes_on_one_host_through_vllms_multinode_launch(tiny_model, tmp_path):
    """vLLM's multi-node DP launch (``vllm serve`` on node 0, ``--headless
    --data-parallel-start-rank 1`` on node 1, one world over ``--data-parallel-address``):
    concurrent greedy requests through node 0's API server equal HF's."""
    from multinode_dp import main

    out = tmp_path / "multinode.json"
    cp_nsa = json.dumps({"mode": "round-robin-split", **SPLIT_EVERY_BATCH})
    assert main(["--model", str(tiny_model), "--cp-nsa", cp_nsa, "--requests", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["equal_to_hf"] == [True] * 4
    assert result["dp_ranks"] == ["rank 0 in world size 4 is assigned as DP rank 0",
                                  "rank 2 in world size 4 is assigned as DP rank 1"]  # one world over both nodes
    assert any("data parallelism 2 x -tp 2" in line for line in result["plugin_lines"])
