"""eval/parity_table.py: issue 18's table (the plugin against vLLM's own model at -tp 1) from
gpu_compare.py reports, and its one-command wrapper eval/run_parity_table.sh."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

import parity_table  # noqa: E402


def _run(ttft_ms: dict[str, list[float]], decode_ms: dict[str, list[float]]) -> dict:
    return {"status": "ok", "versions": {"vllm": "0.34.0"},
            "ttft": {lb: {"times_s": [t / 1e3 for t in ts], "median_s": sorted(ts)[len(ts) // 2] / 1e3}
                     for lb, ts in ttft_ms.items()},
            "decode": {b: {"ms_per_token_reps": ms, "ms_per_token": sorted(ms)[len(ms) // 2]}
                       for b, ms in decode_ms.items()}}


def _report(tmp_path: Path, name: str, runs: dict, weights: str | None = None, quantized: bool = True,
            date: str = "2026-12-05 18:32 UTC") -> Path:
    config = {"quantization_config": {"quant_method": "fp8"}} if quantized else {}
    path = tmp_path / name
    path.write_text(json.dumps({"meta": {"gpu": "NVIDIA H100 80GB HBM3", "date": date,
                                         "weights": weights, "model_config": config}, "runs": runs}))
    return path


def _rows(path: Path) -> list[dict]:
    return parity_table.report_rows(json.loads(path.read_text()), path.name)


def test_rows_take_ratios_per_variant_and_pool_the_rounds(tmp_path):
    runs = {
        "native-tp+fp8": _run({"1K": [10, 10, 10], "4K": [40, 40, 40]}, {"1": [2.0, 2.0, 2.0]}),
        "plugin-off+fp8": _run({"1K": [12, 12, 12], "4K": [36, 36, 36]}, {"1": [1.8, 1.8, 1.8]}),
        "plugin-rr+fp8": _run({"1K": [10, 10, 10]}, {}),
        # round 2 of the same variant: pooled with round 1 (native 10,10,10,14,14,14 -> median 12)
        "native-tp+fp8@2": _run({"1K": [14, 14, 14]}, {}),
        "plugin-off+fp8@2": _run({"1K": [12, 12, 12]}, {}),
        "native-tp+fp8+mtp": _run({"1K": [20, 20, 20]}, {"8": [4.0, 4.0, 4.0]}),
        "plugin-off+fp8+mtp": _run({"1K": [25, 25, 25]}, {"8": [4.2, 4.2, 4.2]}),
        "plugin-off+fp8+mtp@2": {"status": "skipped"},  # no native round 2 of MTP: rounds counted 1
    }
    rows = _rows(_report(tmp_path, "compare_h100_n1_x.json", runs))
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == {"fp8 weights, fp8 KV", "fp8 weights, fp8 KV (plugin round-robin)",
                               "fp8 weights, fp8 KV, MTP k=1"}
    plain = by_variant["fp8 weights, fp8 KV"]
    assert plain["rounds"] == 2
    assert plain["points"]["ttft:1K"]["ratio"] == pytest.approx(1.0)  # 12 ms pooled on both sides
    assert plain["points"]["ttft:4K"]["ratio"] == pytest.approx(40 / 36)
    assert plain["points"]["decode:1"]["ratio"] == pytest.approx(0.9)
    # round-robin has no round 2: only its own round counts, against both native rounds
    assert by_variant["fp8 weights, fp8 KV (plugin round-robin)"]["points"]["ttft:1K"]["ratio"] == pytest.approx(1.2)
    mtp = by_variant["fp8 weights, fp8 KV, MTP k=1"]
    assert mtp["points"]["ttft:1K"]["ratio"] == pytest.approx(0.8)
    assert mtp["points"]["decode:8"]["ratio"] == pytest.approx(1.05)

    text = parity_table.render(rows, goal=0.97)
    assert "| fp8 weights, fp8 KV | 1.00 | 1.11 | 0.90× | – |" in text
    assert "| fp8 weights, fp8 KV, MTP k=1 | **0.80 behind** | – | – | **1.05× behind** |" in text
    assert "2 rounds pooled" in text
    assert "| fp8 weights, fp8 KV | 12.0 / 12.0 | 40.0 / 36.0 | 2.00 / 1.80 | – |" in text


def test_weights_come_from_the_report(tmp_path):
    runs = {"native-tp": _run({"1K": [12.5]}, {"8": [2.77]}), "plugin-off": _run({"1K": [14.5]}, {"8": [2.857]})}
    bf16 = _rows(_report(tmp_path, "a.json", runs, weights="bf16", quantized=False))
    assert [r["variant"] for r in bf16] == ["bf16 weights, bf16 KV"]
    # a point just past the goal shows the digit that puts it there
    assert "**1.031× behind**" in parity_table.render(bf16, goal=0.97)
    assert "**0.86 behind**" in parity_table.render(bf16, goal=0.97)
    fp8 = _rows(_report(tmp_path, "b.json", runs))
    assert fp8[0]["variant"] == "fp8 weights, bf16 KV"
    # no native run: nothing to compare with
    alone = {"plugin-off": runs["plugin-off"]}
    assert _rows(_report(tmp_path, "c.json", alone)) == []


def test_latest_takes_each_point_from_the_newest_report_that_measured_it(tmp_path):
    older = {"native-tp": _run({"1K": [12.5], "64K": [850.0]}, {"1": [2.0]}),
             "plugin-off": _run({"1K": [14.5], "64K": [826.0]}, {"1": [2.7]})}
    newer = {"native-tp": _run({"1K": [11.7]}, {"1": [1.57]}), "plugin-off": _run({"1K": [10.9]}, {"1": [1.59]}),
             "native-tp+fp8": _run({"4K": [40.0]}, {}), "plugin-off+fp8": _run({"4K": [44.0]}, {})}
    rows = [row for name, runs, date in (("new.json", newer, "2026-12-05 22:36 UTC"),
                                         ("old.json", older, "2026-12-05 18:32 UTC"))
            for row in _rows(_report(tmp_path, name, runs, date=date))]
    latest = {r["variant"]: r for r in parity_table.latest_rows(rows)}
    assert set(latest) == {"fp8 weights, bf16 KV", "fp8 weights, fp8 KV"}
    row = latest["fp8 weights, bf16 KV"]
    assert row["points"]["ttft:1K"]["ratio"] == pytest.approx(11.7 / 10.9)  # the newer report's, not 12.5 / 14.5
    assert row["points"]["ttft:64K"]["ratio"] == pytest.approx(850 / 826)  # only the older one measured 64K
    assert row["points"]["decode:1"]["ratio"] == pytest.approx(1.59 / 1.57)
    assert "`new.json` (1K b1)" in row["source"] and "`old.json` (64K)" in row["source"]
    text = parity_table.render(list(latest.values()), goal=0.97)
    assert "| fp8 weights, bf16 KV | 1.07 | – | 1.03 | 1.01× |" in text
    assert "| fp8 weights, fp8 KV | – | **0.91 behind** | – | – |" in text


def test_the_wrapper_refuses_an_unknown_part(tmp_path):
    result = subprocess.run(["bash", str(REPO / "eval" / "run_parity_table.sh")], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "PARTS": "fp16w", "OUT": str(tmp_path)}, timeout=60)
    assert result.returncode == 2 and "unknown part 'fp16w'" in result.stdout


def test_pool_takes_back_to_back_calls_as_rounds_of_one_report(tmp_path):
    """Two calls on one machine, each one engine pair: alone 0.90 and 1.10 at 1K; pooled, every
    sample of both engines of each config: 1.00. Another machine, card or checkpoint is refused."""
    machine = {"boot_id": "b1", "gpu_uuids": ["GPU-1"]}
    a = _report(tmp_path, "a.json", {"native-tp": _run({"1K": [9, 9, 9]}, {"1": [2.0, 2.0, 2.0]}),
                                     "plugin-off": _run({"1K": [10, 10, 10]}, {"1": [1.8, 1.8, 1.8]})})
    b = _report(tmp_path, "b.json", {"native-tp": _run({"1K": [11, 11, 11]}, {"1": [2.0, 2.0, 2.0]}),
                                     "plugin-off": _run({"1K": [10, 10, 10]}, {"1": [2.2, 2.2, 2.2]}),
                                     "plugin-off@2": _run({"1K": [10, 10, 10]}, {"1": [2.2, 2.2, 2.2]})},
                date="2026-12-05 18:40 UTC")
    for path in (a, b):
        report = json.loads(path.read_text())
        report["meta"]["machine"] = machine
        path.write_text(json.dumps(report))
    alone = [_rows(p)[0]["points"]["ttft:1K"]["ratio"] for p in (a, b)]
    assert alone == [pytest.approx(0.9), pytest.approx(1.1)]

    report, name = parity_table.pooled_report([a, b])
    assert sorted(report["runs"]) == ["native-tp", "native-tp@c2", "plugin-off", "plugin-off@c2", "plugin-off@c2.2"]
    (row,) = parity_table.report_rows(report, name)
    assert row["points"]["ttft:1K"]["ratio"] == pytest.approx(1.0)  # 10 ms (median of 9 9 9 11 11 11) / 10 ms
    assert row["points"]["decode:1"]["ratio"] == pytest.approx(1.1)  # median of 1.8 x3, 2.2 x6 / 2.0
    assert row["rounds"] == 2 and row["report"] == "a.json + b.json"
    assert row["date"] == "2026-12-05 18:32 UTC … 2026-12-05 18:40 UTC"

    text = subprocess.run([sys.executable, str(REPO / "eval" / "parity_table.py"), "--pool", str(a), str(b)],
                          capture_output=True, text=True, check=True).stdout
    assert "| fp8 weights, bf16 KV | 1.00 | **1.10× behind** |" in text

    other = json.loads(b.read_text())
    other["meta"]["machine"] = {"boot_id": "b2", "gpu_uuids": ["GPU-7"]}
    b.write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="another machine"):
        parity_table.pooled_report([a, b])
    bf16 = _report(tmp_path, "c.json", json.loads(a.read_text())["runs"], quantized=False)
    with pytest.raises(SystemExit, match="card / vLLM / checkpoint"):
        parity_table.pooled_report([a, bf16])


def test_reports_name_their_machine(monkeypatch):
    import gpu_compare

    monkeypatch.setattr(gpu_compare, "nvidia_smi", lambda query: [["GPU-aa"], ["GPU-bb"]] if query == "uuid" else [])
    machine = gpu_compare.machine_id(1)
    assert machine["gpu_uuids"] == ["GPU-aa"]
    assert machine["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
