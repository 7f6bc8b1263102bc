"""Serving benchmark: Poisson request-rate sweeps against OpenAI-compatible completion servers.

Random-token prompts (token-id lists, so prompt lengths are exact) with lengths drawn from a
range, a fixed number of output tokens (``ignore_eos``), request rates from light to saturation;
per rate p50/p99 TTFT, TPOT, ITL and E2E latency, output tokens/s, requests/s and failures.
The same client measures vLLM (native or with the plugin) and SGLang. See
``eval/serve_bench_notes.md`` and ``python -m eval.serve_bench run --help``.

Modules: ``workload`` (lengths, prompts, arrival schedules), ``metrics`` (stream accounting,
percentiles, per-rate summaries), ``client`` (aiohttp streaming client, one rate at a time),
``report`` (JSON / markdown / PNG; stdlib + matplotlib only), ``cli`` (driver and entry point).
"""
