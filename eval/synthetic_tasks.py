"""Synthetic tasks, tokenizer and lm-eval task files for the trained tiny DeepSeek-V3.2.

Three tasks whose answers are right or wrong, all in GSM8K's answer format
(``#### N``) so lm-eval's GSM8K filters score them:

- ``retrieval``: key -> value lookup among 12-32 facts (``facts : apple 47 , pear 12 , ... .
  pear ?`` -> ``pear 12 #### 12``); the prompt (40-100 tokens) is several times ``index_topk`` (16),
  so the answer survives only if the indexer selects the right fact.
- ``copy``: a 8-12 digit code at the start, 8-20 facts of filler, then ``copy ?`` ->
  ``#### <code>``: the source is further back than ``index_topk`` tokens.
- ``arithmetic``: 2-4 step word problems with a chain of thought
  (``Tom has 5 apples . On Monday he buys 7 . ...`` ->
  ``Monday 5 + 7 = 12 . Tuesday 12 - 3 = 9 . #### 9``).

Problems are drawn from ``random.Random(seed)``: training uses ``TRAIN_SEED``, the
held-out evaluation sets ``EVAL_SEED``; on top of the different streams, a question
is either held out (CRC32 % 8 == 0: evaluation only) or not (training only).

The tokenizer is word-level (tokenizers' ``WordLevel`` in an HF ``tokenizer.json``):
a piece is an optional leading space plus a word, one or two digits, ``####`` or
one punctuation mark, and decoding concatenates pieces, so text round-trips
exactly. Special tokens and ids 0-4 are make_tiny_model's (BOS=0, EOS=1, PAD=2).
"""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path

TASKS = ("retrieval", "copy", "arithmetic")
TRAIN_SEED = 1
EVAL_SEED = 20261203
# A piece: optional space + (#### | word | 1-2 digits | one punctuation mark), or a newline.
PIECE_PATTERN = r" ?####| ?[A-Za-z]+| ?[0-9][0-9]?| ?[^ \nA-Za-z0-9#]|\n"
UNK_TOKEN = "<unk>"

KEYS = """apple pear plum fig lime kiwi mango melon grape peach lemon berry cherry olive onion
carrot potato tomato pepper garlic bean corn rice bread cheese butter honey sugar salt milk tea coffee
river lake ocean island forest desert valley mountain hill road bridge tower castle market school
garden kitchen window door table chair book paper pen lamp clock bell drum flute piano violin guitar
lion tiger bear wolf fox deer eagle owl whale shark horse sheep goat duck mouse rabbit""".split()
NAMES = "Tom Ann Bob Eve Sam Mia Joe Zoe Max Amy Leo Ivy".split()
OBJECTS = "apples pens coins books cards stamps shells marbles candies stickers".split()
GAIN_VERBS = ("buys", "finds", "gets", "wins")
LOSS_VERBS = ("eats", "loses", "sells", "gives")
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
WORDS = ["facts", "copy", "has", "On", "he", "she", "How", "many", "now"] + KEYS + NAMES + OBJECTS + list(
    GAIN_VERBS + LOSS_VERBS) + DAYS
PUNCTUATION = list(".,?:;=+-*!")
ARITH_MAX = 30


# --------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------

MAX_FACTS = 32


def _facts(rng: random.Random, n: int) -> tuple[list[str], list[int], str]:
    keys = rng.sample(KEYS, n)
    values = [rng.randint(10, 99) for _ in keys]
    return keys, values, " , ".join(f"{k} {v}" for k, v in zip(keys, values))


def retrieval(rng: random.Random, num_queries: int = 1, max_facts: int = MAX_FACTS) -> dict:
    """The answer restates the key (``pear 12 #### 12``). ``num_queries`` > 1 (training)
    appends further queries after the first answer; ``max_facts`` < 32: a training curriculum."""
    keys, values, facts = _facts(rng, rng.randint(min(12, max_facts // 2), max_facts))
    picks = rng.sample(range(len(keys)), min(num_queries, len(keys)))
    answer = "\n ".join(f"{keys[i]} ? {keys[i]} {values[i]} #### {values[i]}" for i in picks)
    answer = answer.split(" ? ", 1)[1]  # the first query is the question's last words
    return {"task": "retrieval", "question": f"facts : {facts} . {keys[picks[0]]} ?", "answer": answer}


def copy(rng: random.Random, max_facts: int = MAX_FACTS) -> dict:
    """Chunks of two digits drawn without repeats, so each next chunk has one source."""
    code = "".join(f"{c:02d}" for c in rng.sample(range(100), rng.randint(4, 6)))
    if code.startswith("0"):  # keep the number's first piece two digits wide
        code = str(rng.randint(1, 9)) + code[1:]
    _, _, facts = _facts(rng, rng.randint(min(8, max_facts // 2), min(20, max_facts)))
    return {"task": "copy", "question": f"copy {code} . {facts} . copy ?", "answer": f"#### {code}"}


def arithmetic(rng: random.Random) -> dict:
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    pronoun = "he" if NAMES.index(name) % 2 == 0 else "she"
    total = rng.randint(1, 20)
    sentences, steps = [f"{name} has {total} {obj} ."], []
    for day in DAYS[: rng.randint(2, 4)]:
        delta = rng.randint(1, 9)
        gain = rng.random() < 0.5
        if total + delta > ARITH_MAX:
            gain = False
        if total - delta < 0:
            gain = True
        verb = rng.choice(GAIN_VERBS if gain else LOSS_VERBS)
        new = total + delta if gain else total - delta
        sentences.append(f"On {day} {pronoun} {verb} {delta} .")
        steps.append(f"{day} {total} {'+' if gain else '-'} {delta} = {new} .")
        total = new
    return {"task": "arithmetic", "question": " ".join(sentences) + f" How many {obj} now ?",
            "answer": " ".join(steps) + f" #### {total}"}


def repeat(rng: random.Random, max_facts: int = MAX_FACTS) -> dict:
    """Training only: a random word / number sequence, then the same again. Every token of
    the repeat is an induction target (find the token's earlier occurrence, copy what
    followed), the circuit that retrieval and copy need, at a far denser signal."""
    pieces = [rng.choice(KEYS) if rng.random() < 0.5 else str(rng.randint(10, 99))
              for _ in range(rng.randint(max(4, max_facts // 2), 2 * max_facts))]
    text = " ".join(pieces)
    return {"task": "repeat", "question": f"copy {text} . copy", "answer": f"{text} ."}


GENERATORS = {"retrieval": retrieval, "copy": copy, "arithmetic": arithmetic}


def answer_number(doc: dict) -> int:
    """The number after the first ``####`` (what lm-eval's strict-match extracts)."""
    return int(doc["answer"].split("#### ", 1)[1].split()[0])


def generated_answer(text: str) -> int | None:
    """The number after the first ``#### `` of a generated answer, None if there is none."""
    try:
        return int(text.split("#### ", 1)[1].split()[0])
    except (IndexError, ValueError):
        return None


def is_held_out(question: str) -> bool:
    """One question in eight (by CRC32) is reserved for evaluation; training never sees them."""
    return zlib.crc32(question.encode()) % 8 == 0


def training_problem(task: str, rng: random.Random, retrieval_queries: int = 1, max_facts: int = MAX_FACTS) -> dict:
    while True:
        if task == "retrieval":
            doc = retrieval(rng, retrieval_queries, max_facts)
        elif task == "copy":
            doc = copy(rng, max_facts)
        elif task == "repeat":
            doc = repeat(rng, max_facts)
        else:
            doc = GENERATORS[task](rng)
        if not is_held_out(doc["question"]):
            return doc


def eval_problems(task: str, n: int, seed: int = EVAL_SEED) -> list[dict]:
    """``n`` distinct held-out problems of ``task``."""
    rng = random.Random(f"{seed}:{task}")
    out, seen = [], set()
    while len(out) < n:
        doc = GENERATORS[task](rng)
        if is_held_out(doc["question"]) and doc["question"] not in seen:
            seen.add(doc["question"])
            out.append(doc)
    return out


def write_eval_sets(out_dir: Path, n: int, seed: int = EVAL_SEED) -> dict[str, Path]:
    """``<task>.jsonl`` per task (fields question / answer, as GSM8K)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task in TASKS:
        paths[task] = out_dir / f"{task}.jsonl"
        paths[task].write_text("".join(json.dumps(d) + "\n" for d in eval_problems(task, n, seed)))
    return paths


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------

def vocabulary() -> list[str]:
    """Every piece the tasks produce, each with and without a leading space."""
    from make_tiny_model import SPECIAL_TOKENS

    numbers = [str(i) for i in range(100)] + [f"{i:02d}" for i in range(10)]
    bases = WORDS + numbers + PUNCTUATION + ["####"]
    pieces = list(SPECIAL_TOKENS) + [UNK_TOKEN, "\n"]
    for base in bases:
        for piece in (base, " " + base):
            if piece not in pieces:
                pieces.append(piece)
    return pieces


def build_tokenizer():
    from make_tiny_model import BOS_TOKEN, SPECIAL_TOKENS
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = vocabulary()
    tok = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token=UNK_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PIECE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1", special_tokens=[(BOS_TOKEN, 0)])
    return tok


# --------------------------------------------------------------------------
# lm-eval task files
# --------------------------------------------------------------------------

GROUP = "cpnsa_synth"

# GSM8K's two filters (lm-eval's gsm8k.yaml), so run.py's accuracy / sample readers apply.
_FILTERS = """filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)"
      - function: "take_first"
"""


def write_lmeval_tasks(task_dir: Path, data_files: dict[str, Path], max_gen_toks: int = 48) -> Path:
    """One lm-eval task per synthetic task (``cpnsa_synth_<task>``), all tagged ``cpnsa_synth``.

    Prompt = the question, target = the answer; generation stops at a newline;
    exact match after GSM8K's filters and ``regexes_to_ignore``.
    """
    task_dir.mkdir(parents=True, exist_ok=True)
    for task, path in data_files.items():
        (task_dir / f"{GROUP}_{task}.yaml").write_text(
            f"task: {GROUP}_{task}\n"
            f"tag: [{GROUP}]\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            f"dataset_kwargs: {json.dumps({'data_files': {'test': str(Path(path).resolve())}})}\n"
            "test_split: test\n"
            "output_type: generate_until\n"
            'doc_to_text: "{{question}}"\n'
            'doc_to_target: "{{answer}}"\n'
            'target_delimiter: " "\n'
            "generation_kwargs:\n"
            '  until: ["\\n"]\n'
            "  do_sample: false\n"
            "  temperature: 0.0\n"
            f"  max_gen_toks: {max_gen_toks}\n"
            "metric_list:\n"
            "  - metric: exact_match\n"
            "    aggregation: mean\n"
            "    higher_is_better: true\n"
            "    ignore_case: true\n"
            "    ignore_punctuation: false\n"
            "    regexes_to_ignore: [\",\", \"\\\\$\", \"(?s).*#### \", \"\\\\.$\"]\n"
            + _FILTERS
            + "metadata:\n  version: 1.0\n"
        )
    return task_dir
