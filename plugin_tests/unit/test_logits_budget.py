"""The indexer's logits chunk follows vLLM's own knob where an operator set it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PRINT_BUDGET = "from vllm_cp_nsa.kernels import budgets; print(budgets.MAX_LOGITS_BYTES)"


def _budget(value: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_SPARSE_INDEXER_MAX_LOGITS_MB"}
    if value is not None:
        env["VLLM_SPARSE_INDEXER_MAX_LOGITS_MB"] = value
    return subprocess.run([sys.executable, "-c", PRINT_BUDGET], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("value,expected", [(None, 512 << 20), ("256", 256 << 20), (" 64 ", 64 << 20)])
def test_logits_budget_default_and_vllm_knob(value, expected):
    done = _budget(value)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == expected


@pytest.mark.parametrize("value", ["0", "1.5", "lots"])
def test_logits_budget_refuses_what_is_not_a_size(value):
    done = _budget(value)
    assert done.returncode != 0 and "VLLM_SPARSE_INDEXER_MAX_LOGITS_MB" in done.stderr
