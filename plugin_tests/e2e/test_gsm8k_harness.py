"""The GSM8K harness (eval/gsm8k) in comparison mode on real GSM8K questions, -tp 2: a cheap
smoke check (off vs round-robin-split, 3 questions, tiny random checkpoint). The accuracy gates
over every configuration (in-seq, fp8 KV, MTP too) run on the trained checkpoint in
test_accuracy_gates.py, through the same server and lm-eval machinery.

lm-eval runs from its own venv (.venv-lmeval); the harness creates it through
eval/gsm8k/setup_lmeval.sh when it is missing (CI starts from a fresh machine), in
the background while the first server starts.
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
DATA_DIR = REPO / "eval" / "gsm8k" / "data"
CONFIGS = ["off", "round-robin-split"]
LIMIT = 3

sys.path.insert(0, str(REPO))
from eval.gsm8k.run import compare, markdown  # noqa: E402


def test_comparison_flags_a_differing_configuration():
    """compare() / markdown() on hand-made samples: a changed generation is reported."""
    def samples(texts):
        return {i: {"doc_id": i, "question": f"q{i}", "target": "7", "prompt_hash": f"h{i}", "text": t,
                    "extracted": {"strict-match": "[invalid]", "flexible-extract": t.split()[-1]},
                    "exact_match": {}} for i, t in enumerate(texts)}
    runs = {"off": {"samples": samples(["a 1", "b 2"])}, "round-robin-split": {"samples": samples(["a 1", "b 2"])},
            "fp8": {"samples": samples(["a 1", "b 3"])}, "mtp": {"samples": samples(["a 1 ", "b 2"])}}
    result = compare(runs, "off")
    assert result["per_config"]["round-robin-split"]["agree"]
    assert result["per_config"]["fp8"]["text_mismatch_doc_ids"] == [1]
    assert result["per_config"]["fp8"]["extracted_mismatch_doc_ids"] == [1]
    assert result["per_config"]["mtp"]["same_text"] == 1 and result["per_config"]["mtp"]["same_extracted"] == 2
    assert not result["all_agree"]
    report = {"date": "d", "wall_s": 1.0, "versions": {"vllm": "0", "vllm_distribution": "x", "vllm_cp_nsa": "0",
              "lm_eval": "0", "torch": "0", "python": "3", "platform": "p", "git": {"commit": None, "dirty": False}},
              "settings": {"model": "m", "tp": 2, "dtype": "float32", "server": "started", "server_args": [],
                           "dataset": "local", "task": "t", "data_dir": "d", "limit": 2, "num_fewshot": 1,
                           "max_gen_toks": 4, "concurrency": 2}, "configs": [], "comparison": result}
    md = markdown(report)
    assert "| fp8 | 1/2 | 1/2 | yes | **DISAGREE** |" in md
    assert "≠text ≠answer" in md and "All configurations agree with `off`: NO" in md


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.timeout(900)
def test_gsm8k_comparison_all_configurations_agree_with_off(tiny_model, tmp_path):
    assert (DATA_DIR / "test.jsonl").is_file(), f"GSM8K data missing at {DATA_DIR}"
    out = tmp_path / "gsm8k"
    cmd = [sys.executable, "-m", "eval.gsm8k", "--model", str(tiny_model), "--tp", "2", "--dtype", "float32",
           "--compare", ",".join(CONFIGS), "--limit", str(LIMIT),
           "--num-fewshot", "1", "--max-gen-toks", "24", "--max-num-batched-tokens", "128", "--out", str(out)]
    lmeval_was_there = (REPO / ".venv-lmeval" / "bin" / "lm_eval").exists()
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"

    report = json.loads((out / "results.json").read_text())
    summary = (out / "summary.md").read_text()
    # Config and versions are recorded.
    assert report["versions"]["vllm"] == "0.32.0"
    assert report["versions"]["vllm_cp_nsa"] and report["versions"]["lm_eval"] == "0.4.13"
    settings = report["settings"]
    assert (settings["tp"], settings["dtype"], settings["dataset"], settings["limit"]) == (2, "float32", "local", LIMIT)
    assert settings["data_dir"] == str(DATA_DIR)  # the default: the in-repo copy
    assert [c["name"] for c in report["configs"]] == CONFIGS
    by_name = {c["name"]: c for c in report["configs"]}
    # every batch of >= 2 tokens splits (the split policy's auto would run these short ones unsplit)
    assert by_name["round-robin-split"]["cp_nsa"] == {"mode": "round-robin-split", "decode_attention": "split",
                                                      "min_tokens_for_cp": 0}
    assert by_name["round-robin-split"]["kv_cache_dtype"] == "auto"
    for c in report["configs"]:
        assert c["accuracy"]["n"] == LIMIT
        mode = c["cp_nsa"]["mode"]
        server_log = (out / c["name"] / "server.log").read_text(errors="replace")
        assert f"vllm_cp_nsa: mode={mode}" in server_log, c["name"]
        assert "kv cache fp8_ds_mla" not in server_log, c["name"]

    # Question by question: every configuration generated exactly what off generated.
    comparison = report["comparison"]
    assert comparison["baseline"] == "off" and len(comparison["per_question"]) == LIMIT
    for name in CONFIGS[1:]:
        c = comparison["per_config"][name]
        assert c["same_prompts"], name
        assert (c["same_text"], c["same_extracted"]) == (LIMIT, LIMIT), (name, c)
    assert comparison["all_agree"]
    # The generations are real (not empty) and the questions are GSM8K's first test questions.
    first = comparison["per_question"][0]
    assert first["question"].startswith("Janet") and first["target"] == "18"
    assert all(row["off"]["text"].strip() for row in comparison["per_question"])

    for needle in ("vLLM 0.32.0", "vllm-cp-nsa", "lm-eval 0.4.13", "-tp 2", "float32",
                   "All configurations agree with `off`: yes", *(f"| {n} |" for n in CONFIGS)):
        assert needle in summary, needle
    assert (REPO / ".venv-lmeval" / "bin" / "lm_eval").exists()
    setup = "reused" if lmeval_was_there else f"set up in {report['lmeval_setup_s']:.0f}s, overlapping the servers"
    print(f"\ngsm8k harness: {len(CONFIGS)} configurations x {LIMIT} questions in {wall:.0f}s "
          f"(lm-eval venv {setup})")
    print(summary)
