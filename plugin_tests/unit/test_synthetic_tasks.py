"""eval/synthetic_tasks.py (tasks, tokenizer, lm-eval task files) and the shipped trained
checkpoint eval/trained_tiny (hash, config, tokenizer, HF oracle accuracy)."""

from __future__ import annotations

import hashlib
import json
import random
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

import synthetic_tasks as st  # noqa: E402
import train_tiny_model as ttm  # noqa: E402

TRAINED = REPO / "eval" / "trained_tiny"


@pytest.fixture(scope="module")
def tok():
    return st.build_tokenizer()


def _docs(seed, n=30):
    rng = random.Random(seed)
    return [st.GENERATORS[t](rng) for _ in range(n) for t in st.TASKS]


def test_tokenizer_round_trips_every_task_without_unknown_pieces(tok):
    unk = tok.token_to_id(st.UNK_TOKEN)
    for doc in _docs(0):
        text = doc["question"] + " " + doc["answer"]
        ids = tok.encode(text).ids
        assert ids[0] == 0 and unk not in ids, text  # BOS first, every piece known
        assert tok.decode(ids, skip_special_tokens=True) == text
        # The prompt's tokens are a prefix of prompt + answer: generation continues where training did.
        q = tok.encode(doc["question"]).ids
        assert ids[: len(q)] == q
    assert tok.encode("zebra").ids[1:] == [unk]  # a word outside the vocabulary is <unk>, not split


def test_answers_are_right():
    for doc in _docs(1):
        q, ans = doc["question"], doc["answer"]
        n = st.answer_number(doc)
        if doc["task"] == "retrieval":
            key = q.rsplit(" . ", 1)[1].split()[0]
            facts = dict(f.split() for f in q.split(" : ", 1)[1].rsplit(" . ", 1)[0].split(" , "))
            assert int(facts[key]) == n
        elif doc["task"] == "copy":
            assert q.split()[1] == ans.split()[-1] == str(n) and len(str(n)) >= 8
        else:  # every chain-of-thought step is right and starts from the question's number
            total = int(re.search(r" has (\d+) ", q).group(1))
            for a, op, b, c in re.findall(r"(\d+) ([+-]) (\d+) = (\d+)", ans):
                assert int(a) == total and int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))
                total = int(c)
            assert total == n and 0 <= n <= st.ARITH_MAX


def test_retrieval_and_copy_prompts_are_several_times_index_topk(tok):
    for task in ("retrieval", "copy"):
        lengths = [len(tok.encode(d["question"]).ids) for d in st.eval_problems(task, 50)]
        assert min(lengths) > 2 * ttm.INDEX_TOPK and sum(lengths) / len(lengths) > 3 * ttm.INDEX_TOPK, (task, lengths)


def test_eval_problems_are_deterministic_and_held_out():
    for task in st.TASKS:
        a, b = st.eval_problems(task, 40), st.eval_problems(task, 40)
        assert a == b and len({d["question"] for d in a}) == 40
        assert all(st.is_held_out(d["question"]) for d in a)
    # Training draws only questions that are not held out (one in eight is).
    rng = random.Random(st.TRAIN_SEED)
    train = [st.training_problem(t, rng)["question"] for _ in range(300) for t in st.TASKS]
    assert not any(st.is_held_out(q) for q in train)
    drawn = [st.GENERATORS[t](rng)["question"] for _ in range(300) for t in st.TASKS]
    assert 0.05 < sum(map(st.is_held_out, drawn)) / len(drawn) < 0.2


def test_lmeval_task_files(tmp_path):
    data = st.write_eval_sets(tmp_path / "data", 3)
    task_dir = st.write_lmeval_tasks(tmp_path / "tasks", data)
    for task in st.TASKS:
        rows = [json.loads(line) for line in data[task].read_text().splitlines()]
        assert rows == st.eval_problems(task, 3)
        yaml = (task_dir / f"{st.GROUP}_{task}.yaml").read_text()
        assert f"task: {st.GROUP}_{task}\n" in yaml and f"tag: [{st.GROUP}]" in yaml
        assert str(data[task].resolve()) in yaml and '"#### (\\\\-?[0-9\\\\.\\\\,]+)"' in yaml


def test_shipped_checkpoint_matches_its_readme_and_the_training_config(tok):
    readme = (TRAINED / "README.md").read_text()
    digest = hashlib.sha256((TRAINED / "model.safetensors").read_bytes()).hexdigest()
    assert f"`{digest}`" in readme
    config = json.loads((TRAINED / "config.json").read_text())
    assert config == ttm.model_config(config["vocab_size"])
    assert config["index_topk"] == ttm.INDEX_TOPK and config["rope_parameters"]["rope_type"] == "yarn"
    assert config["n_group"] > 1 and config["num_nextn_predict_layers"] == 1
    shipped = json.loads((TRAINED / "tokenizer.json").read_text())
    assert shipped["model"]["vocab"] == json.loads(tok.to_str())["model"]["vocab"]


@pytest.mark.slow
def test_shipped_checkpoint_solves_held_out_problems_in_the_hf_oracle(tok):
    import hf_oracle

    model = hf_oracle.load_hf_model(TRAINED)
    for task, floor in (("retrieval", 0.9), ("copy", 0.9)):  # 20/20 each when shipped (README)
        acc = ttm.greedy_accuracy(model, tok, st.eval_problems(task, 20))
        assert acc >= floor, (task, acc)  # random weights score ~0
