"""kernels/latent_workspace.py: an fp8_ds_mla cache's blocks dequantized into a bf16
workspace, Triton vs the torch reference (identical bytes), and the position -> workspace row
map that replaces slots for it.

CPU: the Triton interpreter. GPU (``-m gpu``): a real prefill shape.
"""

from __future__ import annotations

import pytest
import torch

from kernels import kv_cache_ref, latent_workspace  # noqa: E402  (conftest set TRITON_INTERPRET)


def _fp8_cache(num_blocks, block_size, gen):
    tokens = num_blocks * block_size
    kv_c = torch.randn(tokens, 512, generator=gen) * torch.rand(tokens, 1, generator=gen) * 4
    k_pe = torch.randn(tokens, 64, generator=gen)
    cache = torch.zeros(num_blocks, block_size, 656, dtype=torch.uint8)
    kv_cache_ref.write_latent_cache(cache, kv_c, k_pe, torch.randperm(tokens, generator=gen), "fp8_ds_mla")
    return cache


@pytest.mark.parametrize("num_reqs,cols,block_size", [(3, 4, 16), (1, 2, 64), (2, 3, 1)])
def test_kernel_equals_reference(num_reqs, cols, block_size, device):
    gen = torch.Generator().manual_seed(num_reqs * cols * block_size)
    cache = _fp8_cache(11, block_size, gen)
    table = torch.randint(0, 11, (num_reqs, cols), generator=gen, dtype=torch.int32)
    want = latent_workspace.latent_workspace_ref(cache, table, block_size)
    got = latent_workspace.latent_workspace(cache.to(device), table.to(device), block_size, use_triton=True)
    assert got.dtype == torch.bfloat16 and got.shape == (num_reqs * cols * block_size, 576)
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))
    # row r * width + p is request r's position p: the dequantized cache row of its slot
    r, p = num_reqs - 1, cols * block_size - 1
    slot = int(table[r, p // block_size]) * block_size + p % block_size
    row = kv_cache_ref.dequantize_fp8_ds_mla(cache.view(-1, 656)[slot : slot + 1])[0]
    assert torch.equal(want[r * cols * block_size + p], row.to(torch.bfloat16))


def test_workspace_rows_and_errors(device):
    positions = torch.tensor([[0, 5, -1], [3, -1, 7], [1, 2, 3]], dtype=torch.int32)
    row_req = torch.tensor([1, 0, -1])
    rows = latent_workspace.workspace_rows(positions.to(device), row_req.to(device), 8)
    assert rows.dtype == torch.int32
    assert rows.cpu().tolist() == [[8, 13, -1], [3, -1, 7], [-1, -1, -1]]
    cache = torch.zeros(4, 16, 656, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        latent_workspace.latent_workspace(cache.float(), torch.zeros(1, 1, dtype=torch.int32), 16)
    with pytest.raises(ValueError, match="block_table"):
        latent_workspace.latent_workspace(cache, torch.zeros(3, dtype=torch.int32), 16)
    # CPU tensors without use_triton: the reference
    table = torch.tensor([[3, 0]], dtype=torch.int32)
    assert torch.equal(latent_workspace.latent_workspace(cache, table, 16),
                       latent_workspace.latent_workspace_ref(cache, table, 16))


@pytest.mark.gpu
def test_gpu_real_prefill_shape():
    gen = torch.Generator().manual_seed(5)
    cache = _fp8_cache(600, 64, gen)
    table = torch.randint(0, 600, (4, 257), generator=gen, dtype=torch.int32)  # 4 requests, 16K+ tokens
    got = latent_workspace.latent_workspace(cache.cuda(), table.cuda(), 64)  # CUDA: Triton
    want = latent_workspace.latent_workspace_ref(cache, table, 64)
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))
