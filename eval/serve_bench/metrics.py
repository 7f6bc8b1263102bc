"""Per-request stream accounting and per-rate statistics (stdlib only).

Definitions follow ``vllm bench serve`` so numbers compare with what operators already run:
TTFT = send -> first streamed chunk carrying a choice; E2E latency = send -> last such chunk;
ITL = gaps between consecutive chunks (one chunk may carry several tokens, e.g. with MTP);
TPOT = (E2E - TTFT) / (output tokens - 1) per request; throughputs divide by the span from the
first send to the last response of the rate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between order statistics (numpy's
    default, as ``vllm bench serve`` reports); None for no values."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside [0, 100]")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def distribution(values: list[float]) -> dict:
    """mean and p50 / p90 / p99 (None where there is no value)."""
    out = {"mean": sum(values) / len(values) if values else None}
    out.update({f"p{q}": percentile(values, q) for q in PERCENTILES})
    return out


class SseParser:
    """Splits a server-sent-event byte stream (arriving in arbitrary pieces) into ``data:``
    payloads; comments (``:`` lines, pings) and other fields are dropped."""

    def __init__(self):
        self._buffer = b""

    def feed(self, data: bytes) -> list[str]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        payloads = []
        for raw in lines:
            line = raw.rstrip(b"\r").decode("utf-8", errors="replace")
            if line.startswith("data:"):
                payloads.append(line[5:].lstrip(" "))
        return payloads


@dataclass
class StreamStats:
    """What one streamed completion yielded."""

    ttft_s: float | None = None
    latency_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    chunks: int = 0
    output_tokens: int | None = None
    prompt_tokens: int | None = None  # as the server's usage reports it
    usage_reported: bool = False
    finish_reason: str | None = None


def stream_stats(events: list[tuple[float, str]]) -> StreamStats:
    """Accounting over ``(seconds since send, data payload)`` events of one completion stream.

    Output tokens come from the final ``usage`` chunk (``stream_options.include_usage``); a
    server that sends none gets its chunk count (one token per chunk) and ``usage_reported``
    False."""
    stats = StreamStats()
    last = None
    for t, payload in events:
        if payload == "[DONE]":
            break
        data = json.loads(payload)
        if "error" in data and not data.get("choices"):
            raise StreamError(str(data["error"])[:500])
        if data.get("choices"):
            if stats.ttft_s is None:
                stats.ttft_s = t
            else:
                stats.itl_s.append(t - last)
            last = t
            stats.chunks += 1
            stats.finish_reason = data["choices"][0].get("finish_reason") or stats.finish_reason
        usage = data.get("usage")
        if usage:
            stats.usage_reported = True
            stats.output_tokens = usage.get("completion_tokens", stats.output_tokens)
            stats.prompt_tokens = usage.get("prompt_tokens", stats.prompt_tokens)
    stats.latency_s = last
    if not stats.usage_reported:
        stats.output_tokens = stats.chunks
    return stats


class StreamError(RuntimeError):
    """An error object inside an HTTP 200 stream."""


@dataclass
class RequestRecord:
    """One request of a rate: what was sent, when, and what came back."""

    index: int
    prompt_tokens: int
    max_tokens: int
    scheduled_s: float  # planned send offset from the rate's start
    sent_s: float | None = None  # actual send offset (None: not sent)
    done_s: float | None = None  # offset of the response's end (or failure)
    ttft_s: float | None = None
    latency_s: float | None = None
    output_tokens: int | None = None
    reported_prompt_tokens: int | None = None
    usage_reported: bool = True
    error: str | None = None
    itl_s: list[float] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        return self.sent_s is not None and self.error is None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)

    def compact(self) -> list:
        """One JSON row: see REQUEST_COLUMNS."""
        r = lambda x: None if x is None else round(x, 6)  # noqa: E731
        return [self.index, self.prompt_tokens, self.output_tokens, r(self.scheduled_s), r(self.sent_s),
                r(self.ttft_s), r(self.latency_s), self.error]


REQUEST_COLUMNS = ["index", "prompt_tokens", "output_tokens", "scheduled_s", "sent_s", "ttft_s", "latency_s", "error"]


def check_accounting(record: RequestRecord, stats: StreamStats, ignore_eos: bool) -> str | None:
    """Why a 200 response still counts as failed (None: it does not)."""
    if stats.ttft_s is None:
        return "no token chunk in the stream"
    if ignore_eos and stats.usage_reported and stats.output_tokens != record.max_tokens:
        return f"output tokens {stats.output_tokens} != max_tokens {record.max_tokens} (ignore_eos)"
    return None


def peak_in_flight(intervals: list[tuple[float, float]]) -> int:
    """Most requests open at once over [start, end) intervals."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    peak = now = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def short_reason(error: str) -> str:
    """An error reduced to a countable reason: its first line, at most 80 characters."""
    return error.splitlines()[0][:80] if error else error


def summarize_rate(rate: float, records: list[RequestRecord]) -> dict:
    """Per-rate summary of the records of one rate."""
    sent = [r for r in records if r.sent_s is not None]
    ok = [r for r in sent if r.ok]
    failed = [r for r in sent if not r.ok]
    if sent:
        start = min(r.sent_s for r in sent)
        end = max(r.done_s for r in sent if r.done_s is not None)
        duration = end - start
    else:
        duration = None
    reasons: dict[str, int] = {}
    for r in failed:
        reasons[short_reason(r.error)] = reasons.get(short_reason(r.error), 0) + 1
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    per_s = (lambda x: x / duration) if duration else (lambda x: None)
    spread = [r.sent_s - r.scheduled_s for r in sent]
    return {
        "rate": "inf" if math.isinf(rate) else rate,
        "scheduled": len(records),
        "sent": len(sent),
        "not_sent": len(records) - len(sent),
        "completed": len(ok),
        "failed": len(failed),
        "failure_reasons": reasons,
        "duration_s": duration,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(out_tokens),
        "input_throughput": per_s(in_tokens),
        "total_token_throughput": per_s(in_tokens + out_tokens),
        "total_output_tokens": out_tokens,
        "total_input_tokens": in_tokens,
        "mean_prompt_tokens": in_tokens / len(ok) if ok else None,
        "ttft_s": distribution([r.ttft_s for r in ok]),
        "tpot_s": distribution([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": distribution([x for r in ok for x in r.itl_s]),
        "e2e_s": distribution([r.latency_s for r in ok]),
        "peak_in_flight": peak_in_flight([(r.sent_s, r.done_s) for r in sent if r.done_s is not None]),
        "max_send_lag_s": max(spread) if spread else None,
        # sends per second actually made (a Poisson schedule's own spread included)
        "achieved_rate": ((len(sent) - 1) / (max(r.sent_s for r in sent) - min(r.sent_s for r in sent))
                          if len(sent) > 1 and max(r.sent_s for r in sent) > min(r.sent_s for r in sent) else None),
        "usage_missing": sum(not r.usage_reported for r in ok),
        "prompt_token_mismatches": sum(r.reported_prompt_tokens is not None and r.reported_prompt_tokens != r.prompt_tokens
                                       for r in ok),
    }
