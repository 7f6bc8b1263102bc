"""The trace line a piecewise replay leaves (the GPU graph test counts them)."""

from __future__ import annotations

import json

from vllm_cp_nsa.adapter.backend import TRACE_PLANS_ENV, trace_piecewise_replay


def test_piecewise_replay_line_goes_to_the_ranks_trace(tmp_path, monkeypatch):
    prefix = tmp_path / "trace"
    monkeypatch.setenv(TRACE_PLANS_ENV, str(prefix))
    trace_piecewise_replay(1, 5, 8)
    lines = [json.loads(line) for line in open(f"{prefix}.rank1")]
    assert lines == [{"piecewise_padded": True, "rows": 5, "padded_rows": 8}]
    assert not (tmp_path / "trace.rank0").exists()


def test_no_trace_without_the_env(tmp_path, monkeypatch):
    monkeypatch.delenv(TRACE_PLANS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    trace_piecewise_replay(0, 5, 8)
    assert list(tmp_path.iterdir()) == []
