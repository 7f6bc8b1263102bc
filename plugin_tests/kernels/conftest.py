"""Kernel tests: Triton kernels vs the torch references.

Without CUDA the Triton kernels run in the CPU interpreter: ``TRITON_INTERPRET=1`` must be
set before triton and the kernel modules are imported, so it is set here, at conftest
import (the test modules import the kernel modules at their top, during collection). Once
collection is over the variable is put back as it was, so that other test packages of the
same pytest process (and the processes they start) do not inherit it; the kernels already
imported stay interpreted.
"""

from __future__ import annotations

import os

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()
_SAVED = os.environ.get("TRITON_INTERPRET")
if not _HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_finish(session):
    if _SAVED is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _SAVED


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped on CPU)")


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if "gpu" in item.keywords and str(item.path).startswith(here):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _triton_interpreter_env(monkeypatch):
    if not _HAS_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


@pytest.fixture
def fresh_registry():
    """The pluggy registry rebuilt before and after the test (provider registration tests)."""
    from vllm_cp_nsa import extensions

    extensions.plugin_manager.cache_clear()
    yield
    extensions.plugin_manager.cache_clear()


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if _HAS_CUDA else "cpu")
