"""Load test: 200+ concurrent completions against a -tp 2 round-robin-split server.

Mixed prompt lengths (short, medium, longer than the 128-token chunked-prefill budget,
shared prefixes, duplicates) and mixed ``max_tokens`` go to the CP server 48 at a time,
together with malformed requests. Every good request must succeed with the same greedy
text as the same request sent alone to an ``off`` server (-tp 1, fp32); every malformed
one must get a 4xx; the server must stay healthy. Traffic goes to 127.0.0.1 only, and
every loop is bounded in count and time.
"""

from __future__ import annotations

import json
import random
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import SPLIT_EVERY_BATCH
from server import start_server

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.ci]

NUM_GOOD = 200
CONCURRENCY = 48
MAX_BATCHED_TOKENS = 128
MAX_MODEL_LEN = 2048  # eval/server.py's --max-model-len
REQUEST_TIMEOUT = 240.0

_WORDS = (
    "the model reads a long sequence of tokens and keeps only the most relevant ones for each query "
    "river mountain ocean island desert valley forest city village road bridge tower castle market "
    "school teacher student doctor farmer baker painter apple banana cherry grape lemon mango orange "
    "dog cat horse cow sheep red green blue yellow quickly slowly carefully run walk jump swim read write "
    "one two three four five six seven eight nine ten 12 42 100 256 1024 question answer what how why"
).split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(n_words)).capitalize() + "."


def _good_requests(tokenizer, model: str) -> list[dict]:
    """NUM_GOOD completion bodies with prompts from 1 to ~1500 tokens."""
    rng = random.Random(20261127)
    shared = _text(rng, 260)  # a long common prefix (prefix caching + chunked prefill under CP)
    bodies = []
    for i in range(NUM_GOOD):
        kind = i % 10
        if kind < 4:
            prompt = _text(rng, rng.randint(1, 30))
        elif kind < 6:
            prompt = _text(rng, rng.randint(40, 140))
        elif kind < 8:
            prompt = _text(rng, rng.randint(220, 500))  # ~300-700 tokens: chunked prefill
        elif kind == 8:
            prompt = shared + " " + _text(rng, rng.randint(1, 60))
        else:
            prompt = _text(rng, rng.randint(700, 1000)) if i % 20 == 9 else bodies[rng.randrange(len(bodies))]["prompt"]
        bodies.append({"model": model, "prompt": prompt, "max_tokens": rng.randint(4, 8), "temperature": 0.0,
                       "ignore_eos": True})
    lengths = [len(tokenizer(b["prompt"]).input_ids) for b in bodies]
    assert sum(n > 300 for n in lengths) >= 40, sorted(lengths)[-50:]
    assert min(lengths) < 16 and MAX_BATCHED_TOKENS * 8 < max(lengths) < MAX_MODEL_LEN - 8, (min(lengths), max(lengths))
    return bodies


def _bad_requests(model: str) -> list[tuple[str, bytes]]:
    too_long = "one two three " * 1200  # ~3600 tokens > max_model_len
    cases = [
        ("bad JSON body", b'{"model": "' + model.encode() + b'", "prompt": "Hello", "max_tokens": 4'),
        ("negative max_tokens", json.dumps({"model": model, "prompt": "Hello there", "max_tokens": -3}).encode()),
        ("prompt longer than max_model_len", json.dumps({"model": model, "prompt": too_long, "max_tokens": 4}).encode()),
        ("missing prompt", json.dumps({"model": model, "max_tokens": 4, "temperature": 0.0}).encode()),
    ]
    return cases * 4


def _post(base_url: str, data: bytes, timeout: float = REQUEST_TIMEOUT) -> tuple[int, dict, float]:
    request = urllib.request.Request(f"{base_url}/v1/completions", data=data,
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    elapsed = time.perf_counter() - started
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        body = {"raw": raw[:500].decode(errors="replace")}
    return status, body, elapsed


def _health(base_url: str) -> int:
    with urllib.request.urlopen(f"{base_url}/health", timeout=10) as r:
        return r.status


def test_concurrent_mixed_load_matches_sequential_off(tiny_model, tokenizer, tmp_path):
    model = str(tiny_model)
    good = _good_requests(tokenizer, model)
    bad = _bad_requests(model)
    t0 = time.perf_counter()
    ref_server = start_server(tiny_model, tp=1, dtype="float32", cp_nsa={"mode": "off"},
                              log_path=tmp_path / "off.log")
    cp_server = start_server(tiny_model, tp=2, dtype="float32", cp_nsa={"mode": "round-robin-split", **SPLIT_EVERY_BATCH},
                             extra_args=["--max-num-batched-tokens", str(MAX_BATCHED_TOKENS)],
                             log_path=tmp_path / "cp.log", env={"CP_NSA_TRACE_PLANS": str(tmp_path / "plans")})
    with ref_server, cp_server:
        # Reference: every good request alone, one at a time, on the off server.
        ref_ready = ref_server.wait_ready()
        t_ref = time.perf_counter()
        reference = []
        for body in good:
            status, out, _ = _post(ref_server.base_url, json.dumps(body).encode())
            assert status == 200, out
            reference.append(out["choices"][0]["text"])
        ref_wall = time.perf_counter() - t_ref
        ref_server.stop()

        cp_ready = cp_server.wait_ready()
        cp_ready_total = time.perf_counter() - t0
        # Good and malformed requests interleaved, CONCURRENCY in flight.
        jobs = [("good", i, json.dumps(b).encode()) for i, b in enumerate(good)]
        jobs += [("bad", name, data) for name, data in bad]
        random.Random(7).shuffle(jobs)
        t_load = time.perf_counter()
        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(lambda job: (job, _post(cp_server.base_url, job[2])), jobs))
        load_wall = time.perf_counter() - t_load

        latencies, mismatches = [], []
        for (kind, key, _), (status, out, elapsed) in results:
            if kind == "good":
                assert status == 200, (key, out)
                latencies.append(elapsed)
                text = out["choices"][0]["text"]
                assert out["usage"]["completion_tokens"] == good[key]["max_tokens"], out["usage"]
                if text != reference[key]:
                    mismatches.append((key, out["usage"]["prompt_tokens"], text, reference[key]))
            else:
                assert 400 <= status < 500, (key, status, out)
        assert not mismatches, f"{len(mismatches)} concurrent outputs differ from sequential off: {mismatches[:5]}"

        # Still healthy, and one more request works and matches.
        assert _health(cp_server.base_url) == 200
        status, out, _ = _post(cp_server.base_url, json.dumps(good[6]).encode())
        assert status == 200 and out["choices"][0]["text"] == reference[6], out
        log = cp_server.log_tail(2_000_000)

    assert "vllm_cp_nsa: mode=round-robin-split over the 2 TP ranks" in log
    plans = [[json.loads(line) for line in open(tmp_path / f"plans.rank{r}")] for r in range(2)]
    assert plans[0] == plans[1], "both ranks must take the same split decisions"
    split = [p for p in plans[0] if p["skip_reason"] is None]
    assert split and all(p["strategy"] == "round-robin-split" for p in split)
    assert max(p["num_tokens"] for p in plans[0]) <= MAX_BATCHED_TOKENS
    max_batch = max(p["num_reqs"] for p in plans[0])
    assert max_batch >= 8, f"the server never batched many requests (max {max_batch})"

    lat = sorted(latencies)
    n_prompt_tokens = sum(len(tokenizer(b["prompt"]).input_ids) for b in good)
    print(f"\nload test: {len(good)} good + {len(bad)} malformed requests, concurrency {CONCURRENCY}, "
          f"{n_prompt_tokens} prompt tokens, max_num_batched_tokens {MAX_BATCHED_TOKENS}")
    print(f"  off -tp 1 ready {ref_ready:.0f}s; sequential reference {ref_wall:.1f}s "
          f"({ref_wall / len(good) * 1000:.0f} ms/request)")
    print(f"  round-robin -tp 2 ready {cp_ready_total:.0f}s after start (waited {cp_ready:.0f}s more); "
          f"concurrent load {load_wall:.1f}s ({len(jobs) / load_wall:.1f} req/s); latency p50 "
          f"{statistics.median(lat):.2f}s p95 {lat[int(0.95 * (len(lat) - 1))]:.2f}s max {lat[-1]:.2f}s; "
          f"{len(plans[0])} forwards, {len(split)} split, largest batch {max_batch} requests")
    print(f"  whole test {time.perf_counter() - t0:.0f}s")
