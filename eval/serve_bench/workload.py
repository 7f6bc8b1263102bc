"""What is sent: prompt lengths, random-token prompts and Poisson arrival times.

Everything is a pure function of (seed, workload, rate label, request index), so every
server configuration gets byte-identical requests, and each rate of a sweep gets its own
prompts (a repeated prompt would hit the server's prefix cache).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass

K = 1024
LENGTH_DISTRIBUTIONS = ("uniform", "log-uniform")
# Named prompt-length ranges (inclusive bounds, tokens).
WORKLOAD_PRESETS = {"2k-64k": (2 * K, 64 * K), "1k-8k": (1 * K, 8 * K)}


@dataclass(frozen=True)
class Workload:
    """Prompt lengths drawn from [min_tokens, max_tokens] (inclusive) by ``distribution``."""

    name: str
    min_tokens: int
    max_tokens: int
    distribution: str = "uniform"

    def __post_init__(self):
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"workload {self.name!r}: need 1 <= min <= max, got {self.min_tokens}-{self.max_tokens}")
        if self.distribution not in LENGTH_DISTRIBUTIONS:
            raise ValueError(f"workload {self.name!r}: distribution {self.distribution!r} "
                             f"not one of {', '.join(LENGTH_DISTRIBUTIONS)}")


def parse_tokens(text: str) -> int:
    """'2048', '2K', '2k', '64K' -> tokens (K = 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not match:
        raise ValueError(f"not a token count: {text!r} (use e.g. 512, 2K, 64K)")
    return int(match.group(1)) * (K if match.group(2) else 1)


def parse_workload(spec: str, distribution: str = "uniform") -> Workload:
    """A preset name (``2k-64k``, ``1k-8k``) or ``MIN-MAX`` such as ``64-512`` or ``4K-16K``."""
    name = spec.strip()
    if name.lower() in WORKLOAD_PRESETS:
        lo, hi = WORKLOAD_PRESETS[name.lower()]
        return Workload(name.lower(), lo, hi, distribution)
    parts = name.split("-")
    if len(parts) != 2:
        raise ValueError(f"workload {spec!r}: use a preset ({', '.join(WORKLOAD_PRESETS)}) or MIN-MAX, e.g. 64-512")
    return Workload(name, parse_tokens(parts[0]), parse_tokens(parts[1]), distribution)


def parse_rate(text: str) -> float:
    """'0.5' -> 0.5 requests/s; 'inf' -> every request at t=0 (saturation)."""
    value = float(text)
    if not value > 0:
        raise ValueError(f"request rate must be > 0 or inf, got {text!r}")
    return value


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def _rng(*key) -> random.Random:
    # str seeds are hashed with SHA-512 by random.Random: stable across runs and Python builds.
    return random.Random("serve_bench/" + "/".join(str(k) for k in key))


def prompt_lengths(workload: Workload, n: int, seed: int, stream: str) -> list[int]:
    """``n`` prompt lengths for one rate (``stream`` names it, e.g. the rate label)."""
    rng = _rng(seed, workload.name, stream, "lengths")
    lo, hi = workload.min_tokens, workload.max_tokens
    if workload.distribution == "uniform":
        return [rng.randint(lo, hi) for _ in range(n)]
    log_lo, log_hi = math.log(lo), math.log(hi + 1)  # hi+1: the top value gets its share
    return [min(hi, max(lo, int(math.exp(rng.uniform(log_lo, log_hi))))) for _ in range(n)]


def random_prompt(token_pool: list[int], length: int, seed: int, stream: str, index: int) -> list[int]:
    """``length`` token ids drawn uniformly from ``token_pool``."""
    rng = _rng(seed, stream, index, "tokens")
    return rng.choices(token_pool, k=length)


def poisson_arrivals(n: int, rate: float, seed: int, stream: str) -> list[float]:
    """Send offsets (s) of ``n`` requests: first at 0, then exponential gaps of mean 1/rate
    (a Poisson process); all at 0 for an infinite rate."""
    if math.isinf(rate):
        return [0.0] * n
    rng = _rng(seed, stream, rate, "arrivals")
    times, t = [], 0.0
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        times.append(t)
    return times


def token_pool_from_tokenizer(tokenizer) -> list[int]:
    """Ids of the tokenizer's ordinary tokens: every id below its length that is neither a
    special nor an added token (so no control token lands in a prompt)."""
    excluded = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    pool = [i for i in range(len(tokenizer)) if i not in excluded]
    if len(pool) < 2:
        raise ValueError(f"tokenizer has {len(pool)} ordinary tokens: cannot draw random prompts")
    return pool


def load_token_pool(tokenizer_dir: str) -> list[int]:
    from transformers import AutoTokenizer

    return token_pool_from_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=False))
