"""Accuracy gates on the trained tiny DeepSeek-V3.2 (eval/trained_tiny), -tp 2, fp32, CPU.

eval/synthetic_eval.py serves the checkpoint with vLLM's OpenAI server and the plugin
for off, round-robin-split, in-seq-split, fp8 KV (round-robin) and MTP k=1
(round-robin), and scores held-out retrieval / copy / arithmetic problems with
lm-eval. Gates: off reaches the stated accuracy per task (synthetic_eval.DEFAULT_MIN_ACCURACY);
every configuration is within one problem of off per task; the fp32 configurations generate
exactly off's text; MTP drafts are accepted at the trained MTP layer's rate.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

import synthetic_eval  # noqa: E402
import synthetic_tasks  # noqa: E402

CONFIGS = ["off", "round-robin-split", "in-seq-split", "fp8", "mtp1"]
N = 20
# The shipped checkpoint's MTP k=1 acceptance is 268/410 = 0.65 on these problems
# (eval/trained_tiny/README.md); random draft tokens would be accepted ~1/vocab of the time.
MIN_MTP_ACCEPTANCE = 0.5


def test_gates_flag_a_configuration_off_by_two_and_a_weak_baseline():
    def run(retrieval, copy, arithmetic):
        return {"per_task": {t: {"correct": c, "n": N, "accuracy": c / N}
                             for t, c in zip(synthetic_tasks.TASKS, (retrieval, copy, arithmetic))}, "error": None}
    runs = {"off": run(20, 19, 15), "rr": run(19, 19, 16), "fp8": run(20, 17, 15)}
    failed = synthetic_eval.gates(runs, "off", {"retrieval": 0.95, "copy": 0.9, "arithmetic": 0.6}, 1)
    assert failed == ["fp8 copy: 17 correct vs off 19 (more than 1 apart)"]
    failed = synthetic_eval.gates(runs, "off", {"retrieval": 1.0, "copy": 0.9, "arithmetic": 0.8}, 2)
    assert failed == ["off arithmetic: 15/20 < 80%"]


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.timeout(900)
def test_accuracy_gates_on_held_out_problems(tmp_path):
    out = tmp_path / "synth"
    cmd = [sys.executable, str(REPO / "eval" / "synthetic_eval.py"), "--tp", "2", "--n", str(N),
           "--configs", ",".join(CONFIGS), "--out", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    report_path = out / "results.json"
    assert report_path.is_file(), f"rc={proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    report = json.loads(report_path.read_text())
    summary = (out / "summary.md").read_text()
    print(f"\naccuracy gates: {len(CONFIGS)} configurations x {N} problems x {len(synthetic_tasks.TASKS)} tasks "
          f"in {wall:.0f}s\n{summary}")
    assert proc.returncode == 0, f"rc={proc.returncode}\n{summary}\n{proc.stderr[-4000:]}"
    assert report["failed_gates"] == []

    runs = report["runs"]
    assert list(runs) == CONFIGS
    for name, run in runs.items():
        assert run["error"] is None, name
        assert all(run["per_task"][t]["n"] == N for t in synthetic_tasks.TASKS), name
        mode = run["config"]["cp_nsa"]["mode"]
        assert run["plugin_line"] and run["plugin_line"].startswith(f"vllm_cp_nsa: mode={mode}"), name
        server_log = (out / name / "server.log").read_text(errors="replace")
        assert ("kv cache fp8_ds_mla" in server_log) == (name == "fp8"), name
    off = runs["off"]["per_task"]
    for task, floor in synthetic_eval.DEFAULT_MIN_ACCURACY.items():
        assert off[task]["accuracy"] >= floor, (task, off[task])
    for name in CONFIGS[1:]:
        for task in synthetic_tasks.TASKS:
            assert abs(runs[name]["per_task"][task]["correct"] - off[task]["correct"]) <= 1, (name, task)
    # fp32 greedy: CP splits and MTP verification change no generated token.
    for name in ("round-robin-split", "in-seq-split", "mtp1"):
        agree = report["comparison"]["per_config"][name]
        assert agree["same_prompts"] and agree["same_text"] == agree["n"] == N * len(synthetic_tasks.TASKS), (
            name, agree["text_mismatch_doc_ids"])
    spec = runs["mtp1"]["spec_decode"]
    assert spec["draft_tokens"] > 0
    assert spec["accepted_tokens"] / spec["draft_tokens"] >= MIN_MTP_ACCEPTANCE, spec
