"""eval/serve_bench's driver against a real vLLM server on CPU: it starts the configuration,
warms it up, sweeps two request rates, stops the server and writes the report, and the
report's token accounting matches what was asked (exact prompt lengths as the server counted
them, exactly --output-len tokens per request)."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

from serve_bench import cli  # noqa: E402

pytestmark = pytest.mark.e2e

OUTPUT_LEN = 4
NUM_REQUESTS = 4


@pytest.mark.timeout(600)
def test_driver_sweeps_a_started_server(tiny_model, tmp_path):
    stem = tmp_path / "sb"
    rc = cli.main(["run", "--configs", "round-robin-split", "--model", str(tiny_model), "--n", "1",
                   "--dtype", "float32", "--enforce-eager", "--workloads", "16-96", "--rates", "2,inf",
                   "--output-len", str(OUTPUT_LEN), "--num-requests", str(NUM_REQUESTS), "--warmup-requests", "1",
                   "--max-duration-s", "10", "--request-timeout-s", "120", "--out", str(stem), "--no-plots"])
    report = json.loads(Path(f"{stem}.json").read_text())
    (config,) = report["configs"]
    assert rc == 0, config["error"]
    assert config["error"] is None and config["served_model"] == str(Path(tiny_model).resolve())
    assert "--additional-config" in config["server_command"] and "round-robin-split" in config["server_command"]
    rates = config["results"]["16-96"]
    assert [r["rate"] for r in rates] == [2.0, "inf"]
    columns = report["settings"]["request_columns"]
    for summary in rates:
        assert (summary["completed"], summary["failed"], summary["prompt_token_mismatches"], summary["usage_missing"]) \
            == (NUM_REQUESTS, 0, 0, 0)
        assert summary["total_output_tokens"] == NUM_REQUESTS * OUTPUT_LEN
        rows = [dict(zip(columns, row)) for row in summary["requests"]]
        assert all(16 <= row["prompt_tokens"] <= 96 and row["output_tokens"] == OUTPUT_LEN for row in rows)
        assert all(0 < row["ttft_s"] <= row["latency_s"] for row in rows)
        assert summary["output_throughput"] > 0 and summary["ttft_s"]["p50"] <= summary["ttft_s"]["p99"]
    assert rates[1]["max_send_lag_s"] < 1.0  # rate inf: all four sent at once
    md = Path(f"{stem}.md").read_text()
    assert "| round-robin-split | inf | 4 | 4 | 0 |" in md
    # the driver stopped its server: nothing listens on its port any more
    port = int(config["server_command"].split("--port ")[1].split()[0])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
