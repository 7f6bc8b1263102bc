"""The load generator: one asyncio event loop, aiohttp, ``POST /v1/completions`` with
``stream: true``; token-id prompts; sends on a Poisson schedule, bounded in requests and time."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from .metrics import RequestRecord, SseParser, StreamError, check_accounting, stream_stats


@dataclass(frozen=True)
class RateRun:
    """One rate of a sweep: what to send and the bounds."""

    base_url: str
    model: str
    prompts: list[list[int]]
    arrivals: list[float]
    max_tokens: int
    max_duration_s: float  # no request is sent after this offset
    request_timeout_s: float  # per request, send to last byte
    max_concurrency: int | None = None
    ignore_eos: bool = True


def completion_body(model: str, prompt: list[int], max_tokens: int, ignore_eos: bool) -> bytes:
    """The request, serialized once before the rate starts (JSON of 64K ids takes ms)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM and SGLang extension: exactly max_tokens come back
    return json.dumps(body, separators=(",", ":")).encode()


async def _one(session: aiohttp.ClientSession, url: str, body: bytes, record: RequestRecord, t0: float,
               timeout_s: float, ignore_eos: bool) -> None:
    start = time.perf_counter()
    record.sent_s = start - t0
    events: list[tuple[float, str]] = []
    try:
        async with session.post(url, data=body, headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if response.status != 200:
                text = (await response.text())[:300].replace("\n", " ")
                record.error = f"HTTP {response.status}: {text}"
                return
            parser = SseParser()
            async for piece in response.content.iter_any():
                now = time.perf_counter() - start
                events.extend((now, payload) for payload in parser.feed(piece))
        stats = stream_stats(events)
        record.ttft_s, record.latency_s, record.itl_s = stats.ttft_s, stats.latency_s, stats.itl_s
        record.output_tokens, record.reported_prompt_tokens = stats.output_tokens, stats.prompt_tokens
        record.usage_reported = stats.usage_reported
        record.error = check_accounting(record, stats, ignore_eos)
    except asyncio.TimeoutError:
        record.error = f"timeout after {timeout_s:g} s"
    except (aiohttp.ClientError, StreamError, ValueError, OSError) as e:
        record.error = f"{type(e).__name__}: {e}"[:300]
    finally:
        record.done_s = time.perf_counter() - t0


async def run_rate_async(run: RateRun) -> list[RequestRecord]:
    url = run.base_url.rstrip("/") + "/v1/completions"
    bodies = [completion_body(run.model, p, run.max_tokens, run.ignore_eos) for p in run.prompts]
    records = [RequestRecord(i, len(p), run.max_tokens, at) for i, (p, at) in enumerate(zip(run.prompts, run.arrivals))]
    limit = asyncio.Semaphore(run.max_concurrency) if run.max_concurrency else None

    async def gated(session, body, record, t0):
        if limit is None:
            return await _one(session, url, body, record, t0, run.request_timeout_s, run.ignore_eos)
        async with limit:
            return await _one(session, url, body, record, t0, run.request_timeout_s, run.ignore_eos)

    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = []
        t0 = time.perf_counter()
        for record, body in zip(records, bodies):
            if record.scheduled_s > run.max_duration_s:
                break  # bounded duration: the rest stay unsent
            delay = t0 + record.scheduled_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(gated(session, body, record, t0)))
        await asyncio.gather(*tasks)
    return records


def run_rate(run: RateRun) -> list[RequestRecord]:
    return asyncio.run(run_rate_async(run))
