"""eval/gpu_compare.py --trained-model: the agreement workload is the trained model's held-out
problems and the report scores their answers (issue 22, item 4)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

import gpu_compare  # noqa: E402
import synthetic_tasks  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

TRAINED = REPO / "eval" / "trained_tiny"


def test_workload_prompts_are_the_held_out_problems_in_the_models_tokens():
    workload = gpu_compare.trained_workload(TRAINED, gpu_compare.DRY_RUN_WORKLOAD)
    greedy = workload["greedy"]
    n = gpu_compare.TRAINED_PROBLEMS_PER_TASK
    assert greedy["tasks"] == [t for t in synthetic_tasks.TASKS for _ in range(n)]
    tok = Tokenizer.from_file(str(TRAINED / "tokenizer.json"))
    docs = [d for t in synthetic_tasks.TASKS for d in synthetic_tasks.eval_problems(t, n)]
    for prompt, doc, answer in zip(greedy["prompts"], docs, greedy["answers"]):
        assert tok.decode(prompt, skip_special_tokens=True).split() == doc["question"].split()
        assert answer == synthetic_tasks.answer_number(doc)
        assert synthetic_tasks.is_held_out(doc["question"])
    assert workload["logprobs"]["prompts"] == greedy["prompts"]
    assert greedy["lengths"] == [len(p) for p in greedy["prompts"]]
    # the timing workloads stay the dry run's
    assert workload["batches"] == gpu_compare.DRY_RUN_WORKLOAD["batches"]


def test_answers_scored_from_the_first_line_only():
    greedy = {"tasks": ["retrieval", "retrieval", "copy", "arithmetic"], "answers": [7, 12, 3, 30]}
    tok = Tokenizer.from_file(str(TRAINED / "tokenizer.json"))
    texts = [" #### 7\n", " #### 11\n", " #### 3\n#### 4", " no answer\n #### 30"]
    tokens = [tok.encode(t).ids for t in texts]
    assert gpu_compare.answers_correct(tok, greedy, tokens) == {
        "retrieval": "1/2", "copy": "1/1", "arithmetic": "0/1"}


def test_report_has_the_answers_table_and_the_trained_model_line(tmp_path):
    workload = gpu_compare.trained_workload(TRAINED, gpu_compare.DRY_RUN_WORKLOAD)
    tok = Tokenizer.from_file(str(TRAINED / "tokenizer.json"))
    right = [tok.encode(f" #### {a}\n").ids for a in workload["greedy"]["answers"]]
    wrong = [tok.encode(f" #### {a + 1}\n").ids for a in workload["greedy"]["answers"]]
    config = __import__("json").loads((TRAINED / "config.json").read_text())
    meta = {"gpu": "cpu (dry run)", "n": 2, "date": "d", "model_dir": str(TRAINED), "model_config": config,
            "build_s": 0.0, "budget_s": 1, "reps": 1, "workload": workload, "max_model_len": 256,
            "max_num_batched_tokens": 256, "gpu_memory_utilization": 0.9, "capture_sizes": [],
            "cpu_dry_run": True, "trained_model": True}
    runs = {"plugin-off": {"status": "ok", "greedy": {"tokens": right}},
            "plugin-rr": {"status": "ok", "greedy": {"tokens": wrong}}}
    text = gpu_compare.render_markdown({"meta": meta, "runs": runs})
    n = gpu_compare.TRAINED_PROBLEMS_PER_TASK
    assert "the trained tiny DeepSeek-V3.2" in text
    assert f"| plugin-off | {n}/{n} | {n}/{n} | {n}/{n} |" in text
    assert f"| plugin-rr | 0/{n} | 0/{n} | 0/{n} |" in text
    assert f"| plugin-rr | plugin-off | 0/{3 * n} |" in text
