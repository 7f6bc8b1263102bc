"""eval/gpu_compare.py --rounds: each config run again in a second engine process (A B A B),
each round compared with its own reference, and all rounds pooled. At -tp 1 two engines doing
the same work (plugin-off, plugin-rr) differed by 16 % at 1K on one H100 (12-05): one engine per
config cannot tell a 1K gap from that."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

import gpu_compare  # noqa: E402


def test_a_round_is_part_of_the_variant():
    assert gpu_compare.run_name("plugin-off", "auto", False) == "plugin-off"
    assert gpu_compare.run_name("plugin-off", "fp8", True, 2) == "plugin-off+fp8+mtp@2"
    assert gpu_compare.variant_suffix("plugin-off+fp8+mtp@2") == "+fp8+mtp@2"
    assert gpu_compare.variant_suffix("native-tp@3") == "@3"
    assert gpu_compare.variant_suffix("plugin-off-bf16") == ""
    assert gpu_compare.without_round("plugin-off+fp8@2") == "plugin-off+fp8"


def _run(ttft_ms: list[float], decode_ms: list[float]) -> dict:
    return {"status": "ok",
            "ttft": {"1K": {"times_s": [t / 1e3 for t in ttft_ms], "median_s": sorted(ttft_ms)[1] / 1e3}},
            "decode": {"1": {"ms_per_token_reps": decode_ms, "ms_per_token": sorted(decode_ms)[1]}}}


def test_rounds_pool_every_sample_and_keep_each_rounds_reference():
    runs = {"native-tp": _run([10, 11, 12], [2.0, 2.1, 2.2]), "plugin-off": _run([12, 13, 14], [2.4, 2.5, 2.6]),
            "native-tp@2": _run([14, 15, 16], [2.8, 2.9, 3.0]), "plugin-off@2": _run([12, 13, 14], [2.4, 2.5, 2.6])}
    pooled = gpu_compare.pooled_rounds(runs)
    assert pooled["native-tp"]["rounds"] == 2
    median, lowest, highest = pooled["native-tp"]["ttft"]["1K"]
    assert (median, lowest, highest) == (pytest.approx(0.013), pytest.approx(0.011), pytest.approx(0.015))
    assert pooled["plugin-off"]["decode"]["1"] == (pytest.approx(2.5), 2.5, 2.5)

    meta = {"gpu": "H100", "n": 1, "date": "d", "model_dir": "m", "build_s": 0.0, "budget_s": 1, "reps": 3,
            "workload": gpu_compare.DRY_RUN_WORKLOAD, "max_model_len": 256, "max_num_batched_tokens": 256,
            "gpu_memory_utilization": 0.9, "capture_sizes": [], "cpu_dry_run": False,
            "model_config": {"num_hidden_layers": 3, "hidden_size": 7168, "num_attention_heads": 128,
                             "index_topk": 2048, "n_routed_experts": 32, "num_experts_per_tok": 8,
                             "num_nextn_predict_layers": 1}}
    text = gpu_compare.render_markdown({"meta": meta, "runs": runs})
    # per round: round 1 plugin 13 ms vs native 11 (0.85), round 2 plugin 13 vs 15 (1.15)
    speed = text.split("## TTFT speed-up vs native-tp")[1].split("\n## ")[0]
    assert "| 1K | 1.00 | 0.85 | 1.00 | 1.15 |" in speed
    # pooled: 13 ms each, ratio 1.00; decode 2.5 / 2.5
    pooled_text = text.split("## All rounds pooled")[1]
    assert "| 1K | 13.0 [11.0, 15.0] | 13.0 [13.0, 13.0] |" in pooled_text
    assert "| native-tp (2 rounds) | plugin-off (2 rounds) |" in pooled_text.replace("decode ms per token", "TTFT ms")
    ratio_rows = [line for line in pooled_text.splitlines() if line.startswith("| 1K |") or line.startswith("| 1 |")]
    assert "| 1K | 1.00 | 1.00 |" in ratio_rows and "| 1 | 1.00 | 1.00 |" in ratio_rows
    # one round: no pooled section
    one_round = {k: v for k, v in runs.items() if "@" not in k}
    assert "All rounds pooled" not in gpu_compare.render_markdown({"meta": meta, "runs": one_round})


def test_drive_alternates_the_rounds_and_profiles_only_the_first(tmp_path, monkeypatch):
    """A B A B, each its own engine (worker); the profilers in round 1 only."""
    started = []

    def fake_worker(name, spec, env, timeout_s, logs, n):
        started.append((name, spec["phases"], spec["profile"] is not None))
        log = logs / f"{name}.log"
        log.write_text("")
        return {"name": name, "status": "ok", "log": str(log), "wall_s": 1.0, "ttft": {}, "decode": {}}

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    monkeypatch.setattr(gpu_compare, "ensure_model", lambda args: (model, 0.0))
    monkeypatch.setattr(gpu_compare, "nvidia_smi", lambda query: [["NVIDIA H100 80GB HBM3", "81559"]])
    monkeypatch.setattr(gpu_compare, "run_worker", fake_worker)
    monkeypatch.setattr(gpu_compare, "write_report", lambda report, stem: None)
    monkeypatch.setattr(gpu_compare, "KEEP_DIR", tmp_path / "kept")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # no PNG
    gpu_compare.main(["drive", "--n", "1", "--out", str(tmp_path / "out"), "--configs", "native-tp,plugin-off",
                      "--rounds", "2", "--phases", "warmup,ttft,profile", "--profile-length", "1K",
                      "--lengths", "1K"])
    assert [name for name, _, _ in started] == ["native-tp", "plugin-off", "native-tp@2", "plugin-off@2"]
    assert [(phases, profiled) for _, phases, profiled in started] == [
        (["warmup", "ttft", "profile"], True)] * 2 + [(["warmup", "ttft"], False)] * 2
