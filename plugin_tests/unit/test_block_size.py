"""The KV block size vLLM picks for the plugin's two cache backends.

On CUDA it must be a multiple of 64 tokens: the ``vllm`` provider reads an fp8_ds_mla
cache in 64-slot FlashMLA pages and falls back to Triton when the slot count is not a
multiple of 64 (2x H200, 2026-11-28: vLLM kept 16-token blocks and one run of two lost
FlashMLA by the parity of its block count)."""

import pytest

from vllm.config import VllmConfig
from vllm.platforms.interface import Platform

from vllm_cp_nsa.adapter import backend


class _Platform:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def is_cuda(self) -> bool:
        return self.cuda


@pytest.mark.parametrize("cuda, expected", [(True, 64), (False, 16)])
def test_vllm_picks_the_block_size_the_caches_need(monkeypatch, cuda, expected):
    monkeypatch.setattr(backend, "current_platform", _Platform(cuda))
    backends = [backend.CpNsaBackend, backend.CpNsaIndexerBackend]
    picked = Platform._preferred_block_size_for_backends(backends, 16, VllmConfig())
    assert picked == expected
    assert all(b.supports_block_size(128) for b in backends)
    assert all(b.supports_block_size(16) is (not cuda) for b in backends)
