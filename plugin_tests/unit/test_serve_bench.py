"""eval/serve_bench without a model: percentiles, Poisson schedules, prompt lengths and tokens,
stream token accounting, per-rate summaries, the report, configuration parsing, and the
client against an in-process fake streaming server."""

from __future__ import annotations

import asyncio
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

from serve_bench import cli, report, workload  # noqa: E402
from serve_bench.metrics import (RequestRecord, SseParser, StreamError, check_accounting, distribution,  # noqa: E402
                                 peak_in_flight, percentile, stream_stats, summarize_rate)


# --------------------------------------------------------------------------- percentiles

@pytest.mark.parametrize("n", [2, 3, 10, 101, 257])
def test_percentile_matches_statistics_inclusive_quantiles(n):
    rng = random.Random(n)
    values = [rng.lognormvariate(0, 1) for _ in range(n)]
    # statistics' "inclusive" method is the same linear interpolation numpy uses by default
    reference = statistics.quantiles(values, n=100, method="inclusive")
    for q in range(1, 100):
        assert percentile(values, q) == pytest.approx(reference[q - 1], rel=1e-12), q


def test_percentile_edges():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    values = [5.0, 1.0, 4.0, 2.0]
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 5.0
    assert percentile(values, 50) == 3.0  # halfway between 2 and 4
    with pytest.raises(ValueError):
        percentile(values, 101)
    d = distribution([1.0, 2.0, 3.0, 10.0])
    assert d["mean"] == 4.0 and d["p50"] == 2.5 and d["p99"] == pytest.approx(3 + 7 * 0.97)
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


# --------------------------------------------------------------------------- schedules

def test_poisson_schedule_is_deterministic_and_poisson():
    a = workload.poisson_arrivals(20000, 4.0, seed=7, stream="w/4")
    assert a == workload.poisson_arrivals(20000, 4.0, seed=7, stream="w/4")
    assert a != workload.poisson_arrivals(20000, 4.0, seed=8, stream="w/4")
    assert a != workload.poisson_arrivals(20000, 4.0, seed=7, stream="other")
    assert a[0] == 0.0 and all(x < y for x, y in zip(a, a[1:]))
    gaps = [y - x for x, y in zip(a, a[1:])]
    mean = statistics.fmean(gaps)
    assert mean == pytest.approx(0.25, rel=0.05)
    # exponential gaps: coefficient of variation 1 (evenly spaced sends would give 0)
    assert statistics.pstdev(gaps) / mean == pytest.approx(1.0, abs=0.05)
    # memorylessness: P(gap > 2/rate) = e^-2
    assert sum(g > 0.5 for g in gaps) / len(gaps) == pytest.approx(math.exp(-2), abs=0.02)


def test_infinite_rate_sends_everything_at_once():
    assert workload.poisson_arrivals(5, math.inf, seed=0, stream="x") == [0.0] * 5


# --------------------------------------------------------------------------- lengths, prompts

def test_uniform_lengths_cover_the_range():
    w = workload.parse_workload("2k-64k")
    assert (w.min_tokens, w.max_tokens) == (2048, 65536)
    lengths = workload.prompt_lengths(w, 5000, seed=0, stream="1")
    assert lengths == workload.prompt_lengths(w, 5000, seed=0, stream="1")
    assert lengths != workload.prompt_lengths(w, 5000, seed=0, stream="2")  # each rate its own prompts
    assert min(lengths) >= 2048 and max(lengths) <= 65536
    assert statistics.fmean(lengths) == pytest.approx((2048 + 65536) / 2, rel=0.03)
    # quartiles of a uniform distribution
    q1, _, q3 = statistics.quantiles(lengths, n=4)
    assert q1 == pytest.approx(2048 + 0.25 * 63488, rel=0.05) and q3 == pytest.approx(2048 + 0.75 * 63488, rel=0.03)
    small = workload.prompt_lengths(workload.parse_workload("3-5"), 300, seed=0, stream="s")
    assert set(small) == {3, 4, 5}  # both ends inclusive


def test_log_uniform_lengths():
    w = workload.parse_workload("1k-8k", distribution="log-uniform")
    lengths = workload.prompt_lengths(w, 5000, seed=1, stream="r")
    assert min(lengths) >= 1024 and max(lengths) <= 8192
    assert statistics.median(lengths) == pytest.approx(math.sqrt(1024 * 8192), rel=0.05)
    # equal mass per octave: 1K-2K, 2K-4K, 4K-8K each about a third
    thirds = [sum(lo <= n < hi for n in lengths) / len(lengths) for lo, hi in ((1024, 2048), (2048, 4096), (4096, 8193))]
    assert all(t == pytest.approx(1 / 3, abs=0.03) for t in thirds), thirds


def test_workload_parsing_errors():
    assert workload.parse_workload("4K-16K").min_tokens == 4096
    assert workload.parse_workload("64-512").max_tokens == 512
    for bad in ("64", "512-64", "a-b", "1-2-3", "0-5"):
        with pytest.raises(ValueError):
            workload.parse_workload(bad)
    with pytest.raises(ValueError):
        workload.parse_workload("1-5", distribution="normal")
    assert workload.parse_rate("inf") == math.inf
    with pytest.raises(ValueError):
        workload.parse_rate("0")


class FakeTokenizer:
    all_special_ids = [0, 1]
    added_tokens_decoder = {0: "<bos>", 1: "<eos>", 9: "<tool>"}

    def __len__(self):
        return 10


def test_random_prompts_have_exact_lengths_and_ordinary_ids():
    pool = workload.token_pool_from_tokenizer(FakeTokenizer())
    assert pool == [2, 3, 4, 5, 6, 7, 8]
    p = workload.random_prompt(pool, 777, seed=3, stream="w/1", index=5)
    assert len(p) == 777 and set(p) <= set(pool) and len(set(p)) == len(pool)
    assert p == workload.random_prompt(pool, 777, seed=3, stream="w/1", index=5)
    assert p != workload.random_prompt(pool, 777, seed=3, stream="w/1", index=6)


# --------------------------------------------------------------------------- stream accounting

def _chunk(text="x", finish=None):
    return json.dumps({"choices": [{"index": 0, "text": text, "finish_reason": finish}]})


def test_sse_parser_handles_split_lines_comments_and_crlf():
    stream = (b": ping\r\n\r\ndata: " + _chunk("a").encode() + b"\r\n\r\ndata: " + _chunk("b").encode()
              + b"\n\nevent: x\ndata: [DONE]\n\n")
    for cut in range(1, len(stream)):
        parser = SseParser()
        payloads = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
        assert payloads == [_chunk("a"), _chunk("b"), "[DONE]"], cut


def test_stream_stats_counts_tokens_from_usage_when_chunks_carry_several():
    # MTP-like: 4 chunks carrying 8 tokens; first chunk at 0.5 s, then every 0.1 s
    events = [(0.5, _chunk("ab")), (0.6, _chunk("cd")), (0.7, _chunk("")), (0.8, _chunk("gh", "length")),
              (0.81, json.dumps({"choices": [], "usage": {"prompt_tokens": 100, "completion_tokens": 8}})),
              (0.82, "[DONE]")]
    s = stream_stats(events)
    assert s.ttft_s == 0.5 and s.latency_s == 0.8 and s.chunks == 4
    assert s.itl_s == pytest.approx([0.1, 0.1, 0.1])
    assert s.output_tokens == 8 and s.prompt_tokens == 100 and s.usage_reported and s.finish_reason == "length"
    r = RequestRecord(0, 100, 8, 0.0, sent_s=0.0, ttft_s=s.ttft_s, latency_s=s.latency_s, output_tokens=s.output_tokens)
    assert r.tpot_s == pytest.approx(0.3 / 7)
    assert check_accounting(r, s, ignore_eos=True) is None
    assert check_accounting(RequestRecord(0, 100, 16, 0.0), s, ignore_eos=True) == \
        "output tokens 8 != max_tokens 16 (ignore_eos)"
    assert check_accounting(RequestRecord(0, 100, 16, 0.0), s, ignore_eos=False) is None


def test_stream_stats_without_usage_counts_chunks_and_flags_it():
    s = stream_stats([(0.2, _chunk()), (0.3, _chunk()), (0.45, _chunk()), (0.5, "[DONE]"), (0.6, _chunk())])
    assert s.output_tokens == 3 and not s.usage_reported and s.latency_s == 0.45
    empty = stream_stats([(0.1, "[DONE]")])
    assert empty.ttft_s is None and check_accounting(RequestRecord(0, 1, 1, 0.0), empty, True) == "no token chunk in the stream"
    with pytest.raises(StreamError):
        stream_stats([(0.1, json.dumps({"error": {"message": "boom"}}))])


# --------------------------------------------------------------------------- per-rate summary

def _record(i, sent, ttft, latency, out=4, prompt=100, error=None):
    return RequestRecord(i, prompt, 4, sent, sent_s=sent, done_s=sent + latency, ttft_s=ttft, latency_s=latency,
                         output_tokens=out, reported_prompt_tokens=prompt, error=error)


def test_summarize_rate():
    records = [_record(0, 0.0, 0.1, 0.4), _record(1, 0.5, 0.2, 0.8), _record(2, 1.0, 0.3, 1.0, prompt=50),
               _record(3, 1.2, None, 0.3, error="HTTP 500: boom"),
               RequestRecord(4, 100, 4, 9.0)]  # scheduled past the duration bound: never sent
    s = summarize_rate(2.0, records)
    assert (s["scheduled"], s["sent"], s["not_sent"], s["completed"], s["failed"]) == (5, 4, 1, 3, 1)
    assert s["failure_reasons"] == {"HTTP 500: boom": 1}
    assert s["duration_s"] == pytest.approx(2.0)  # first send 0.0, last response 1.0 + 1.0
    assert s["request_throughput"] == pytest.approx(1.5)
    assert s["output_throughput"] == pytest.approx(12 / 2.0)
    assert s["total_input_tokens"] == 250 and s["mean_prompt_tokens"] == pytest.approx(250 / 3)
    assert s["ttft_s"]["p50"] == pytest.approx(0.2) and s["ttft_s"]["p99"] == pytest.approx(0.298)
    tpots = [(0.4 - 0.1) / 3, (0.8 - 0.2) / 3, (1.0 - 0.3) / 3]
    assert s["tpot_s"]["mean"] == pytest.approx(statistics.fmean(tpots))
    assert s["peak_in_flight"] == 3  # 0.5-1.3, 1.0-2.0 and 1.2-1.5 overlap
    assert s["achieved_rate"] == pytest.approx(3 / 1.2)  # 4 sends from 0.0 to 1.2 s
    assert s["rate"] == 2.0 and summarize_rate(math.inf, records[:1])["rate"] == "inf"
    none_sent = summarize_rate(1.0, [RequestRecord(0, 10, 4, 5.0)])
    assert none_sent["duration_s"] is None and none_sent["output_throughput"] is None


def test_peak_in_flight_touching_intervals_do_not_overlap():
    assert peak_in_flight([(0, 1), (1, 2), (2, 3)]) == 1
    assert peak_in_flight([(0, 3), (1, 2), (1.5, 4)]) == 3
    assert peak_in_flight([]) == 0


# --------------------------------------------------------------------------- report

def _summary(rate, tput, ttft_p99, failed=0):
    return {"rate": rate, "sent": 4, "completed": 4 - failed, "failed": failed,
            "failure_reasons": {"timeout after 5 s": failed} if failed else {},
            "request_throughput": tput / 10, "output_throughput": tput,
            "ttft_s": {"p50": ttft_p99 / 2, "p99": ttft_p99, "mean": None, "p90": None},
            "tpot_s": {"p50": 0.01, "p99": 0.02}, "itl_s": {"p50": 0.01, "p99": 0.03},
            "e2e_s": {"p50": 1.0, "p99": 2.0}, "peak_in_flight": 3, "usage_missing": 0, "prompt_token_mismatches": 0}


def _report():
    def cfg(name, rows):
        return {"name": name, "server_description": name, "error": None, "ready_s": 10.0,
                "results": {"64-512": rows}}
    return {"title": "t", "date": "2026-12-03", "settings": {"baselines": None, "workloads": []}, "configs": [
        cfg("native-tp", [_summary(1.0, 100.0, 0.5), _summary("inf", 400.0, 4.0)]),
        cfg("native-pcp", [_summary(1.0, 90.0, 0.4), _summary("inf", 500.0, 5.0)]),
        cfg("round-robin-split", [_summary(1.0, 120.0, 0.8), _summary("inf", 450.0, 2.0, failed=1)]),
    ]}


def test_comparison_against_the_best_native_configuration():
    rows = {(r["rate"], r["config"]): r for r in report.comparison_rows(_report(), "64-512")}
    assert set(rows) == {("1", "round-robin-split"), ("inf", "round-robin-split")}
    assert rows[("1", "round-robin-split")]["throughput_vs_best_baseline"] == pytest.approx(1.2)  # 120 / 100
    assert rows[("1", "round-robin-split")]["p99_ttft_speedup_vs_best_baseline"] == pytest.approx(0.5)  # 0.4 / 0.8
    assert rows[("inf", "round-robin-split")]["throughput_vs_best_baseline"] == pytest.approx(0.9)  # 450 / 500
    assert rows[("inf", "round-robin-split")]["p99_ttft_speedup_vs_best_baseline"] == pytest.approx(2.0)  # 4 / 2
    explicit = _report()
    explicit["settings"]["baselines"] = ["round-robin-split"]
    assert {r["config"] for r in report.comparison_rows(explicit, "64-512")} == {"native-tp", "native-pcp"}


def test_markdown_and_merge():
    r = _report()
    md = report.markdown(r)
    table = [line for line in md.splitlines() if line.startswith("| ") and "64-512" not in line]
    assert sum(line.startswith(("| native-tp |", "| native-pcp |", "| round-robin-split |")) for line in table) == 3 + 6
    assert "| round-robin-split | inf | 4 | 3 | 1 | 45.00 | 450.0 | 1000.0 | 2000.0 |" in md
    assert "| inf | round-robin-split | 0.90 | 2.00 | 1 |" in md
    assert "| round-robin-split | 64-512 | inf | timeout after 5 s | 1 |" in md
    other = _report()
    other["configs"] = [dict(other["configs"][2], name="sglang-cp")] + [dict(other["configs"][0], ready_s=99.0)]
    merged = report.merge([r, other])
    assert [c["name"] for c in merged["configs"]] == ["native-tp", "native-pcp", "round-robin-split", "sglang-cp"]
    assert merged["configs"][0]["ready_s"] == 99.0  # the later report's run of the same name wins


def test_write_without_matplotlib_says_how_to_draw(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    out = report.write(_report(), tmp_path / "sb")
    assert "plots" not in out and "report sb.json" in out["plots_note"]
    assert json.loads((tmp_path / "sb.json").read_text())["configs"][2]["name"] == "round-robin-split"
    assert "Plots: not drawn" in (tmp_path / "sb.md").read_text()


def test_plots_one_png_per_metric(tmp_path):
    pytest.importorskip("matplotlib")  # not in the CPU .venv; the dry run's PNGs were drawn elsewhere
    out = report.write(_report(), tmp_path / "sb")
    assert set(out["plots"]) == set(report.PLOT_METRICS)
    for path in out["plots"].values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- configurations, CLI

def test_configurations_become_server_arguments():
    split = {"decode_attention": "split", "min_tokens_for_cp": 0}  # every batch of >= N tokens splits
    rr = cli.parse_config("round-robin-split+fp8+mtp2", mtp_k=1)
    assert rr.plugin and rr.cp_nsa == {"mode": "round-robin-split", **split}
    tp, args = rr.server_args(4)
    assert tp == 4 and args[:2] == ["--kv-cache-dtype", "fp8"]
    assert json.loads(args[3]) == {"method": "mtp", "num_speculative_tokens": 2}
    pcp = cli.parse_config("native-pcp", mtp_k=1)
    assert not pcp.plugin and pcp.server_args(8) == (1, ["--prefill-context-parallel-size", "8"])
    assert cli.parse_config("mtp", mtp_k=3).mtp == 3
    dg = cli.parse_config("round-robin-split+dg+tpdec", mtp_k=1)
    assert dg.cp_nsa == {"mode": "round-robin-split", "kernels": "vllm-deepgemm", "indexer_cache": "fp8",
                         "decode_attention": "tp", "min_tokens_for_cp": 0}
    assert cli.parse_config("in-seq-split+auto", mtp_k=1).cp_nsa == {
        "mode": "in-seq-split", "decode_attention": "auto", "min_tokens_for_cp": "auto"}  # the plugin's defaults
    assert cli.BASE_CONFIGS["round-robin-split"].cp_nsa == {"mode": "round-robin-split", **split}  # presets untouched
    assert rr.plugin_settings({"min_tokens_for_cp": 512}) == {"mode": "round-robin-split", "decode_attention": "split",
                                                             "min_tokens_for_cp": 512}
    assert pcp.plugin_settings({"min_tokens_for_cp": 512}) is None
    assert "min_tokens_for_cp" in rr.describe(4, {"min_tokens_for_cp": 512}) and "-pcp" not in rr.describe(4, {})
    assert pcp.describe(8, {}) == "vLLM native: -tp 1 --prefill-context-parallel-size 8"
    for bad in ("native-tp+dg", "native-tp+auto", "nonsense", "off+bogus"):
        with pytest.raises(SystemExit):
            cli.parse_config(bad, mtp_k=1)


def test_plugin_env(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/a:/tmp/cpnsa")
    assert cli.plugin_env(True, "/tmp/cpnsa") == {"PYTHONPATH": "/tmp/cpnsa:/a"}
    assert cli.plugin_env(False, "/tmp/cpnsa") == {"PYTHONPATH": "/a"}
    assert cli.plugin_env(False, None)["VLLM_PLUGINS"] == ""
    assert "VLLM_PLUGINS" not in cli.plugin_env(True, None)


def test_cli_defaults_rates_and_errors():
    a = cli.parse_args(["run", "--cpu-dry-run", "--output-len", "4"])
    assert (a.n, a.output_len, a.configs, a.build_tiny_model, a.enforce_eager) == (2, 4, "off,round-robin-split", True, True)
    assert [r for _, r in cli.parse_workloads(a)] == [[1.0, 4.0, math.inf]]
    a = cli.parse_args(["run", "--model", "m", "--configs", "native-tp", "--rates", "1k-8k=2,8",
                        "--rates", "0.5,inf"])
    per = {w.name: rates for w, rates in cli.parse_workloads(a)}
    assert per == {"2k-64k": [0.5, math.inf], "1k-8k": [2.0, 8.0]}
    assert cli.parse_args(["run", "--cpu-dry-run", "--base-url", "http://h:1"]).configs is None
    assert cli.parse_named("sglang=http://h:1", "external") == ("sglang", "http://h:1")
    assert cli.parse_named("http://h:1/a=b", "external") == ("external", "http://h:1/a=b")
    for argv in (["run", "--configs", "off"], ["run"], ["run", "--configs", "off", "--base-url", "http://x", "--model", "m"]):
        with pytest.raises(SystemExit):
            cli.parse_args(argv)
    with pytest.raises(SystemExit):
        cli.parse_workloads(cli.parse_args(["run", "--model", "m", "--configs", "off", "--rates", "4k-8k=1"]))


def test_server_command_uses_the_module_where_the_vllm_script_is_missing(monkeypatch):
    """A stack unpacked from wheels (the GPU hosts' staged one) has the vllm distribution but
    no console script: eval/server.py then starts the API server module."""
    import server

    monkeypatch.setattr(server, "version", lambda name: "0.34.0")
    monkeypatch.setattr(server.shutil, "which", lambda name: None)
    assert server.server_command("M", 1, [])[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    monkeypatch.setattr(server.shutil, "which", lambda name: "/usr/bin/vllm")
    assert server.server_command("M", 1, [])[:3] == ["vllm", "serve", "M"]


def test_launch_only_and_named_base_urls_parse():
    a = cli.parse_args(["run", "--configs", "", "--launch", "sg=python3 -m sglang.launch_server --port {port}",
                        "--model", "m"])
    assert a.launch == ["sg=python3 -m sglang.launch_server --port {port}"]
    assert cli.parse_named(a.launch[0], "launched") == ("sg", "python3 -m sglang.launch_server --port {port}")


def test_warmup_lengths_span_each_workload():
    long, short = workload.parse_workload("2k-64k"), workload.parse_workload("1k-8k")
    assert cli.warmup_lengths([long, short], 3) == [2048, 33792, 65536, 1024, 4608, 8192]
    assert cli.warmup_lengths([long], 1) == [65536] and cli.warmup_lengths([long], 0) == []


# --------------------------------------------------------------------------- client vs a fake server

def test_client_against_a_fake_streaming_server():
    """A local aiohttp server streams ``max_tokens`` chunks 20 ms apart (two tokens in the last
    one, like MTP) with usage; prompts of 13 ids get HTTP 400. Checks send times, TTFT,
    token accounting, failures and the duration bound."""
    from aiohttp import web

    from serve_bench.client import RateRun, run_rate_async

    seen = []

    async def completions(request):
        body = await request.json()
        seen.append(body)
        if len(body["prompt"]) == 13:
            return web.json_response({"error": "too long"}, status=400)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(0.05)  # "prefill"
        n = body["max_tokens"]
        for i in range(n - 1):
            if i:
                await asyncio.sleep(0.02)
            await response.write(f"data: {_chunk(str(i))}\n\n".encode())
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
        await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        return response

    async def scenario():
        app = web.Application()
        app.router.add_post("/v1/completions", completions)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            prompts = [[5] * 20, [6] * 13, [7] * 30, [8] * 40]
            run = RateRun(f"http://127.0.0.1:{port}", "m", prompts, [0.0, 0.1, 0.2, 5.0], max_tokens=6,
                          max_duration_s=1.0, request_timeout_s=10.0)
            started = time.perf_counter()
            records = await run_rate_async(run)
            return records, time.perf_counter() - started
        finally:
            await runner.cleanup()

    records, wall = asyncio.run(scenario())
    assert wall < 2.0  # the request scheduled at 5 s was never sent
    assert [r.sent_s is not None for r in records] == [True, True, True, False]
    assert [b["prompt"] for b in seen] == [[5] * 20, [6] * 13, [7] * 30]
    assert all(b["stream"] and b["ignore_eos"] and b["stream_options"] == {"include_usage": True} for b in seen)
    for r in (records[0], records[2]):
        assert r.ok and r.output_tokens == 6 and r.reported_prompt_tokens == r.prompt_tokens
        assert abs(r.sent_s - r.scheduled_s) < 0.05
        assert 0.05 <= r.ttft_s < 0.5 and len(r.itl_s) == 4 and all(0.015 < g < 0.3 for g in r.itl_s)
        assert r.tpot_s == pytest.approx((r.latency_s - r.ttft_s) / 5)
    assert records[1].error.startswith("HTTP 400")
    s = summarize_rate(10.0, records)
    assert (s["completed"], s["failed"], s["not_sent"], s["total_output_tokens"]) == (2, 1, 1, 12)


FAKE_SERVER = """
import asyncio, json, sys
from aiohttp import web

async def completions(request):
    body = await request.json()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await asyncio.sleep(0.002 * len(body["prompt"]) ** 0.5)
    for i in range(body["max_tokens"]):
        chunk = {"choices": [{"index": 0, "text": "t", "finish_reason": None}]}
        await response.write(f"data: {json.dumps(chunk)}\\n\\n".encode())
        await asyncio.sleep(0.002)
    usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"]}
    await response.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\\n\\ndata: [DONE]\\n\\n".encode())
    return response

app = web.Application()
app.router.add_get("/health", lambda r: web.Response(text="ok"))
app.router.add_get("/v1/models", lambda r: web.json_response({"data": [{"id": sys.argv[2]}]}))
app.router.add_post("/v1/completions", completions)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def test_driver_launches_sweeps_and_stops_a_server(tmp_path, monkeypatch):
    """The whole driver path with --launch (as for SGLang): start, /health, warm-up, two workloads
    x two rates, stop, report; against a fake OpenAI server in a subprocess."""
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    monkeypatch.setattr(cli, "load_token_pool", lambda tokenizer: list(range(10, 200)))
    stem = tmp_path / "out" / "sb"
    rc = cli.main(["run", "--configs", "", "--model", str(tmp_path),
                   "--launch", f"fake={sys.executable} {script} {{port}} {{model}}",
                   "--workloads", "8-32,100-200", "--rates", "8-32=20,inf", "--rates", "100-200=50,inf",
                   "--output-len", "5", "--num-requests", "6", "--max-duration-s", "5", "--out", str(stem),
                   "--no-plots", "--ready-timeout", "60"])
    result = json.loads(Path(f"{stem}.json").read_text())
    (config,) = result["configs"]
    assert rc == 0, config["error"]
    assert config["served_model"] == str(tmp_path) and config["ready_s"] > 0 and config["warmup_s"] > 0
    assert [[s["rate"] for s in config["results"][w]] for w in ("8-32", "100-200")] == [[20.0, "inf"], [50.0, "inf"]]
    for per in config["results"].values():
        for s in per:
            assert (s["completed"], s["failed"], s["total_output_tokens"], s["prompt_token_mismatches"]) == (6, 0, 30, 0)
    lengths = [row[1] for row in config["results"]["100-200"][0]["requests"]]
    assert all(100 <= n <= 200 for n in lengths)
    assert lengths != [row[1] for row in config["results"]["100-200"][1]["requests"]]  # fresh prompts per rate
    assert (tmp_path / "out" / "sb_logs" / "fake.log").exists()
    assert "| fake | 50 | 6 | 6 | 0 |" in Path(f"{stem}.md").read_text()


def test_auto_rates_are_fractions_of_saturation():
    assert cli.auto_rates(10.0) == [2.5, 5.0, 7.5, 10.0]
    assert cli.auto_rates(3.333, (0.25, 0.5, 0.75, 1.0)) == [0.83, 1.7, 2.5, 3.3]
    assert cli.auto_rates(1.0, (0.5, 0.5, 1.0)) == [0.5, 1.0]


def test_auto_rates_probe_once_and_apply_to_every_configuration(tmp_path, monkeypatch):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    monkeypatch.setattr(cli, "load_token_pool", lambda tokenizer: list(range(10, 200)))
    stem = tmp_path / "sb"
    launch = f"{sys.executable} {script} {{port}} {{model}}"
    rc = cli.main(["run", "--configs", "", "--model", str(tmp_path), "--launch", f"a={launch}", "--launch", f"b={launch}",
                   "--workloads", "8-32", "--rates", "auto", "--auto-fractions", "0.5,1", "--output-len", "3",
                   "--num-requests", "6", "--max-duration-s", "5", "--warmup-requests", "1", "--out", str(stem),
                   "--no-plots"])
    result = json.loads(Path(f"{stem}.json").read_text())
    a, b = result["configs"]
    assert rc == 0, (a["error"], b["error"])
    probe = a["auto_rates"]["8-32"]
    expected = cli.auto_rates(probe["saturation_rps"], (0.5, 1.0))
    assert len(expected) == 2 and probe["rates"] == expected + ["inf"]
    assert "auto_rates" not in b  # the second configuration reuses the first one's rates
    for config in (a, b):
        assert [s["rate"] for s in config["results"]["8-32"]] == expected + ["inf"]
        assert all(s["completed"] == 6 for s in config["results"]["8-32"])
    assert a["results"]["8-32"][-1]["request_throughput"] == probe["saturation_rps"]
    assert result["settings"]["workloads"][0]["auto_rates"] == expected + ["inf"]
    assert "auto (" in Path(f"{stem}.md").read_text()


def test_base_url_mode_takes_the_tokenizer_from_the_served_model(tmp_path, monkeypatch):
    """--base-url against a running (fake) server: no server started or stopped by the driver;
    the served model id is a local directory, so it is the tokenizer."""
    import subprocess

    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    port = __import__("server").free_port()
    process = subprocess.Popen([sys.executable, str(script), str(port), str(tmp_path)])
    asked = []
    monkeypatch.setattr(cli, "load_token_pool", lambda tokenizer: asked.append(tokenizer) or list(range(10, 200)))
    try:
        rc = cli.main(["run", "--base-url", f"running=http://127.0.0.1:{port}", "--workloads", "8-16",
                       "--rates", "inf", "--output-len", "2", "--num-requests", "3", "--out", str(tmp_path / "sb"),
                       "--no-plots", "--ready-timeout", "30"])
        assert process.poll() is None  # still running: the driver does not stop what it did not start
    finally:
        process.terminate()
        process.wait(10)
    result = json.loads((tmp_path / "sb.json").read_text())
    (config,) = result["configs"]
    assert rc == 0, config["error"]
    assert asked == [str(tmp_path)] and config["name"] == "running" and config["results"]["8-16"][0]["completed"] == 3
