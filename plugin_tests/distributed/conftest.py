"""Fixtures for the multi-process gloo CP tests (helpers live in cp_gloo_harness.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch.distributed as dist

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # so the test modules can `import cp_gloo_harness`
    sys.path.insert(0, _HERE)


def pytest_collection_modifyitems(config, items):
    if not dist.is_available() or not dist.is_gloo_available():
        skip = pytest.mark.skip(reason="torch.distributed with gloo is not available")
        for item in items:
            if "distributed" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(params=[2, 3, 4], ids=lambda n: f"cp{n}")
def world(request) -> int:
    """CP group size (number of gloo ranks)."""
    return request.param
