"""Triton cache writers vs kernels/kv_cache_ref.py: the written bytes must be identical.

CPU: the Triton interpreter at small shapes. GPU (``-m gpu``): real shapes, reference
bytes computed on the CPU (correctly rounded ``amax / 448``) from the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from kernels import kv_cache, kv_cache_ref  # noqa: E402  (conftest set TRITON_INTERPRET)


def _latent_inputs(num_tokens, num_slots, dtype, device, gen):
    # per-token magnitudes over many binades so that scales differ, plus special rows
    mag = torch.exp2(torch.randint(-14, 8, (num_tokens, 1), generator=gen)).float()
    kv_c = (torch.randn(num_tokens, 512, generator=gen) * mag).to(dtype)
    k_pe = torch.randn(num_tokens, 64, generator=gen).to(dtype)
    if num_tokens > 3:
        kv_c[0, :128] = 0  # all-zero tile: scale floor
        kv_c[1, 128:256] = 1e-7  # tiny tile: floor, fp8 subnormals
        kv_c[2, 5] = 448.0 * 4  # amax exactly 448 * 2^k: scale exactly 2^k
        kv_c[3, 300] = -3000.0
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.1] = -1
    return kv_c.to(device), k_pe.to(device), slots.to(device)


def _poisoned(shape, dtype, device, gen):
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=gen, dtype=torch.uint8).to(device)
    return torch.randn(shape, generator=gen).to(dtype).to(device)


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_ds_mla", "auto"])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
def test_write_latent_cache_bytes(kv_cache_dtype, in_dtype, device):
    gen = torch.Generator().manual_seed(1234)
    num_blocks, block_size, num_tokens = 5, 16, 45
    kv_c, k_pe, slots = _latent_inputs(num_tokens, num_blocks * block_size, in_dtype, device, gen)
    if kv_cache_dtype == "fp8_ds_mla":
        cache = _poisoned((num_blocks, block_size, 656), torch.uint8, device, gen)
    else:
        cache = _poisoned((num_blocks, block_size, 576), in_dtype, device, gen)
    ref = cache.cpu().clone()
    kv_cache_ref.write_latent_cache(ref, kv_c.cpu(), k_pe.cpu(), slots.cpu(), kv_cache_dtype)
    kv_cache.write_latent_cache(cache, kv_c, k_pe, slots, kv_cache_dtype)
    assert torch.equal(cache.cpu().view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("fp8", [True, False])
def test_write_indexer_cache_bytes(fp8, device):
    gen = torch.Generator().manual_seed(99)
    num_blocks, block_size, num_tokens = 4, 16, 50
    k = (torch.randn(num_tokens, 128, generator=gen) * 3).to(torch.bfloat16)
    k[0] = 0
    k[1, 7] = 448.0 * 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::7] = -1
    if fp8:
        cache = _poisoned((num_blocks, block_size * 132), torch.uint8, device, gen)
    else:
        cache = _poisoned((num_blocks, block_size, 128), torch.bfloat16, device, gen)
    ref = cache.cpu().clone()
    kv_cache_ref.write_indexer_cache(ref, k, slots, block_size, fp8)
    kv_cache.write_indexer_cache(cache, k.to(device), slots.to(device), block_size, fp8)
    assert torch.equal(cache.cpu().view(torch.uint8), ref.view(torch.uint8))


def test_write_nothing_for_negative_slots(device):
    cache = torch.full((2, 4, 656), 7, dtype=torch.uint8, device=device)
    kv_c = torch.randn(3, 512, device=device)
    k_pe = torch.randn(3, 64, device=device)
    kv_cache.write_latent_cache(cache, kv_c, k_pe, torch.full((3,), -1, device=device), "fp8_ds_mla")
    assert bool((cache == 7).all())
    kv_cache.write_latent_cache(cache, kv_c[:0], k_pe[:0], torch.empty(0, dtype=torch.int64, device=device), "fp8_ds_mla")


def test_bad_shapes_raise(device):
    cache = torch.zeros(2, 4, 656, dtype=torch.uint8, device=device)
    with pytest.raises(ValueError):
        kv_cache.write_latent_cache(
            cache, torch.randn(3, 500, device=device), torch.randn(3, 64, device=device),
            torch.zeros(3, dtype=torch.int64, device=device), "fp8_ds_mla",
        )  # fmt: skip
    with pytest.raises(ValueError):
        kv_cache.write_latent_cache(
            torch.zeros(2, 4, 576, device=device),
            torch.randn(3, 512, device=device), torch.randn(3, 64, device=device),
            torch.zeros(3, dtype=torch.int64, device=device), "fp8_ds_mla",
        )  # fmt: skip


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["fp8_ds_mla", "auto"])
def test_gpu_write_latent_cache_real_shapes(kv_cache_dtype):
    gen = torch.Generator().manual_seed(7)
    num_blocks, block_size, num_tokens = 2048, 64, 16384
    kv_c, k_pe, slots = _latent_inputs(
        num_tokens, num_blocks * block_size, torch.bfloat16, "cuda", gen
    )
    row = 656 if kv_cache_dtype == "fp8_ds_mla" else 576
    dtype = torch.uint8 if kv_cache_dtype == "fp8_ds_mla" else torch.bfloat16
    cache = _poisoned((num_blocks, block_size, row), dtype, "cuda", gen)
    ref = cache.cpu().clone()
    kv_cache_ref.write_latent_cache(ref, kv_c.cpu(), k_pe.cpu(), slots.cpu(), kv_cache_dtype)
    kv_cache.write_latent_cache(cache, kv_c, k_pe, slots, kv_cache_dtype)
    torch.cuda.synchronize()
    assert torch.equal(cache.cpu().view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [True, False])
def test_gpu_write_indexer_cache_real_shapes(fp8):
    gen = torch.Generator().manual_seed(8)
    num_blocks, block_size, num_tokens = 2048, 64, 16384
    k = (torch.randn(num_tokens, 128, generator=gen) * 2).to(torch.bfloat16)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::11] = -1
    if fp8:
        cache = _poisoned((num_blocks, block_size * 132), torch.uint8, "cuda", gen)
    else:
        cache = _poisoned((num_blocks, block_size, 128), torch.bfloat16, "cuda", gen)
    ref = cache.cpu().clone()
    kv_cache_ref.write_indexer_cache(ref, k, slots, block_size, fp8)
    kv_cache.write_indexer_cache(cache, k.cuda(), slots.cuda(), block_size, fp8)
    torch.cuda.synchronize()
    assert torch.equal(cache.cpu().view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.parametrize("kv_cache_dtype,index_fp8", [("fp8_ds_mla", True), ("auto", False), ("auto", True)])
def test_write_token_caches_one_launch_same_bytes(kv_cache_dtype, index_fp8, device):
    """Both caches' new tokens in one launch: the bytes of the two references, negative slots
    writing nothing in either cache."""
    gen = torch.Generator().manual_seed(7)
    num_blocks, block_size, num_tokens = 4, 16, 37
    kv_c, k_pe, slots = _latent_inputs(num_tokens, num_blocks * block_size, torch.bfloat16, device, gen)
    k = (torch.randn(num_tokens, 128, generator=gen) * 3).to(torch.bfloat16).to(device)
    if kv_cache_dtype == "fp8_ds_mla":
        latent = _poisoned((num_blocks, block_size, 656), torch.uint8, device, gen)
    else:
        latent = _poisoned((num_blocks, block_size, 576), torch.bfloat16, device, gen)
    if index_fp8:
        index = _poisoned((num_blocks, block_size * 132), torch.uint8, device, gen)
    else:
        index = _poisoned((num_blocks, block_size, 128), torch.bfloat16, device, gen)
    want_latent, want_index = latent.cpu().clone(), index.cpu().clone()
    kv_cache_ref.write_latent_cache(want_latent, kv_c.cpu(), k_pe.cpu(), slots.cpu(), kv_cache_dtype)
    kv_cache_ref.write_indexer_cache(want_index, k.cpu(), slots.cpu(), block_size, index_fp8)
    kv_cache.write_token_caches(latent, kv_c, k_pe, kv_cache_dtype, index, k, index_fp8, slots, block_size)
    assert torch.equal(latent.cpu().view(torch.uint8), want_latent.view(torch.uint8))
    assert torch.equal(index.cpu().view(torch.uint8), want_index.view(torch.uint8))
    assert (slots < 0).any()  # the inputs hold slots that must write nothing
