"""eval/gpu_compare.py's host probe: fixed host work timed before every timed sample, so a
report tells an engine that is slower from a host that was slower while it ran (one engine's
1K TTFT was 1.5-2.5x another's for the same work on shared H200 hosts)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

import gpu_compare  # noqa: E402


def test_probe_times_its_loop_and_names_the_cpu():
    probe = gpu_compare.host_probe()
    assert probe["python_us"] > 0
    assert probe["launch_us"] is None  # no CUDA here: no launch figure, no failure
    cpu = gpu_compare.current_cpu()
    assert cpu is not None and 0 <= cpu < 4096
    assert probe["load1"] >= 0


def test_probe_slows_down_with_the_host(monkeypatch):
    """A host twice as slow (every perf_counter interval doubled) doubles the loop figure."""
    real = time.perf_counter
    ticks = iter(range(10**9))
    monkeypatch.setattr(gpu_compare.time, "perf_counter", lambda: next(ticks) * 1e-3)
    fast = gpu_compare.host_probe()["python_us"]
    monkeypatch.setattr(gpu_compare.time, "perf_counter", lambda: next(ticks) * 2e-3)
    slow = gpu_compare.host_probe()["python_us"]
    monkeypatch.setattr(gpu_compare.time, "perf_counter", real)
    assert slow == 2 * fast == 2000.0


def _run(ttft_ms, probes):
    return {"status": "ok", "ttft": {"1K": {"times_s": [t / 1e3 for t in ttft_ms], "median_s": ttft_ms[1] / 1e3,
                                            "host_probe": probes}}}


def test_report_lists_each_runs_host_speed():
    fast = [{"python_us": 900.0, "launch_us": 4.0, "cpu": 3, "load1": 1.0}] * 3
    slow = [{"python_us": 1800.0, "launch_us": 9.5, "cpu": 40, "load1": 12.0},
            {"python_us": 1700.0, "launch_us": 8.5, "cpu": 41, "load1": 12.0},
            {"python_us": 1900.0, "launch_us": None, "cpu": None, "load1": None}]
    runs = {"native-tp": _run([12, 12, 12], fast), "plugin-off": _run([19, 19, 19], slow),
            "old": {"status": "ok", "ttft": {"1K": {"times_s": [0.01], "median_s": 0.01}}}}
    m = gpu_compare.probe_medians(slow)
    assert (m["python_us"], m["launch_us"], m["cpus"], m["samples"]) == (1800.0, 9.0, [40, 41], 3)
    lines = gpu_compare._host_probe_section(runs)
    # the plugin's samples ran on a host twice as slow as native-tp's
    assert "| native-tp | 3 | 900 | 4.00 | 1.00 | 3 | 1.0 |" in lines
    assert "| plugin-off | 3 | 1800 | 9.00 | 2.00 | 40, 41 | 12.0 |" in lines
    assert not any(line.startswith("| old |") for line in lines)  # reports from before the probe
    assert gpu_compare._host_probe_section({"old": runs["old"]}) == []
    # a round is compared with its own round's native-tp; no reference: no ratio
    alone = gpu_compare._host_probe_section({"plugin-off@2": _run([19, 19, 19], slow)})
    assert "| plugin-off@2 | 3 | 1800 | 9.00 | – | 40, 41 | 12.0 |" in alone
