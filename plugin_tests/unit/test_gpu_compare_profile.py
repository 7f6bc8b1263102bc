"""eval/gpu_compare.py's profiled prefill can be a batch (``--profile-prompts``): the 8x1K
point of issue 18 is the one furthest behind vLLM's own model, and one prompt cannot show it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

import gpu_compare  # noqa: E402


def test_profiled_batch_labels():
    assert gpu_compare.profile_shape_label(1, 16 * 1024) == "16K"
    assert gpu_compare.profile_shape_label(8, 1024) == "8x1K"
    assert gpu_compare._profiled_batch({"profile_length": 1024, "profile_prompts": 8}) == \
        "One batch of 8 prompts of 1K tokens"
    # reports written before the option: one prompt
    assert gpu_compare._profiled_batch({"profile_length": 16384}) == "One prompt of 16K tokens"


@pytest.mark.parametrize("prompts", ["0", "17"])
def test_a_profiled_batch_must_fit_one_forward(tmp_path, prompts, capsys):
    """17 x 1K tokens do not fit --max-num-batched-tokens 16384: refused before anything runs."""
    with pytest.raises(SystemExit) as stop:
        gpu_compare.main(["drive", "--n", "1", "--out", str(tmp_path), "--configs", "native-tp",
                          "--phases", "warmup,profile", "--profile-length", "1K", "--profile-prompts", prompts])
    assert "--profile-prompts" in str(stop.value) and "one batch" in str(stop.value)
    assert not any((tmp_path / "logs").iterdir())  # no run started


def test_profiler_config_takes_stacks_and_activities_when_asked(tmp_path):
    def config(activities=None, with_stack=False):
        args = argparse.Namespace(profile_activities=activities, profile_with_stack=with_stack)
        return gpu_compare.profiler_config(args, tmp_path / "p")

    plain = config()
    assert plain["torch_profiler_with_stack"] is False and plain["torch_profiler_dir"] == str(tmp_path / "p")
    assert "torch_profiler_activities" not in plain
    stacked = config("CPU,CUDA", with_stack=True)
    assert stacked["torch_profiler_with_stack"] is True
    assert stacked["torch_profiler_activities"] == ["CPU", "CUDA"]
    assert gpu_compare.PROFILER_CONFIG["torch_profiler_with_stack"] is False  # the shared default untouched
