"""Triton sparse MLA (prefill and decode / verify rows) vs attention_ref.sparse_mla.

CPU: the Triton interpreter at small shapes. GPU (``-m gpu``): 128 heads, top-k 2048,
4K-64K cache slots, ragged valid counts, bf16 and fp8_ds_mla caches.
"""

from __future__ import annotations

import pytest
import torch

from kernels import attention_ref, kv_cache_ref, sparse_mla  # noqa: E402

SCALE = 576**-0.5


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _make_cache(num_slots, block_size, kv_cache_dtype, dtype, device, gen):
    num_blocks = -(-num_slots // block_size)
    kv_c = torch.randn(num_blocks * block_size, 512, generator=gen)
    k_pe = torch.randn(num_blocks * block_size, 64, generator=gen)
    if kv_cache_dtype == "fp8_ds_mla":
        cache = torch.empty(num_blocks, block_size, 656, dtype=torch.uint8)
    else:
        cache = torch.empty(num_blocks, block_size, 576, dtype=dtype)
    kv_cache_ref.write_latent_cache(
        cache, kv_c, k_pe, torch.arange(num_blocks * block_size), kv_cache_dtype
    )
    return cache.to(device)


def _ref_chunked(q, cache, idx, kv_cache_dtype, rows=16):
    outs, lses = [], []
    for i in range(0, q.shape[0], rows):
        o, l = attention_ref.sparse_mla(q[i : i + rows], cache, idx[i : i + rows], SCALE, 512,
                                        kv_cache_dtype)  # fmt: skip
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses)


def _check(out, lse, ref_out, ref_lse, tol):
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert _rel(out, ref_out) <= tol
    fin = torch.isfinite(ref_lse)
    if fin.any():
        assert (lse[fin] - ref_lse[fin]).abs().max().item() <= 1e-3


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_ds_mla"])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("num_heads", [3, 20])
def test_prefill_matches_reference(kv_cache_dtype, q_dtype, num_heads, device):
    gen = torch.Generator().manual_seed(num_heads * 7 + (kv_cache_dtype == "auto"))
    num_slots, topk, rows = 80, 37, 5
    cache = _make_cache(num_slots, 16, kv_cache_dtype, q_dtype, device, gen)
    q = torch.randn(rows, num_heads, 576, generator=gen).to(q_dtype).to(device)
    idx = torch.randint(0, num_slots, (rows, topk), generator=gen, dtype=torch.int32)
    idx[0, 3:20] = -1  # some invalid
    idx[1, :] = -1  # no valid index: zeros and lse = -inf
    idx[2, 5] = num_slots + 100  # outside the cache: skipped
    idx[3, ::2] = -1
    idx = idx.to(device)
    out, lse = sparse_mla.sparse_mla_prefill(q, cache, idx, SCALE, 512, kv_cache_dtype)
    ref_out, ref_lse = attention_ref.sparse_mla(q, cache, idx, SCALE, 512, kv_cache_dtype)
    tol = 1e-2 if q_dtype == torch.bfloat16 else 1e-4
    _check(out, lse, ref_out, ref_lse, tol)
    assert bool((out[1] == 0).all()) and bool(torch.isinf(lse[1]).all())


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_ds_mla"])
def test_decode_equals_prefill(kv_cache_dtype, device):
    gen = torch.Generator().manual_seed(5)
    batch, s_q, heads, num_slots, topk = 2, 2, 16, 96, 70
    cache = _make_cache(num_slots, 32, kv_cache_dtype, torch.bfloat16, device, gen)
    q = torch.randn(batch, s_q, heads, 576, generator=gen).to(torch.bfloat16).to(device)
    idx = torch.randint(-1, num_slots, (batch, s_q, topk), generator=gen, dtype=torch.int32)
    idx[1, 1, :] = -1
    idx = idx.to(device)
    pre_out, pre_lse = sparse_mla.sparse_mla_prefill(
        q.flatten(0, 1), cache, idx.flatten(0, 1), SCALE, 512, kv_cache_dtype
    )
    # one split: the very same program as prefill
    out1, lse1 = sparse_mla.sparse_mla_decode(q, cache, idx, SCALE, 512, kv_cache_dtype, num_splits=1)
    assert torch.equal(out1.flatten(0, 1), pre_out) and torch.equal(lse1.flatten(0, 1), pre_lse)
    # split-K (flash-decoding) + merge: equal up to rounding
    for splits in (2, 3):
        out, lse = sparse_mla.sparse_mla_decode(
            q, cache, idx, SCALE, 512, kv_cache_dtype, num_splits=splits
        )
        assert out.shape == (batch, s_q, heads, 512) and lse.shape == (batch, s_q, heads)
        _check(out.flatten(0, 1), lse.flatten(0, 1), pre_out, pre_lse, 1e-2)
        assert bool((out[1, 1] == 0).all()) and bool(torch.isinf(lse[1, 1]).all())
    ref_out, ref_lse = attention_ref.sparse_mla(
        q.flatten(0, 1), cache, idx.flatten(0, 1), SCALE, 512, kv_cache_dtype
    )
    _check(pre_out, pre_lse, ref_out, ref_lse, 1e-2)


def test_bad_inputs_raise(device):
    cache = torch.zeros(2, 4, 576, device=device)
    q = torch.zeros(2, 4, 576, device=device)
    with pytest.raises(ValueError):
        sparse_mla.sparse_mla_prefill(q[..., :512], cache, torch.zeros(2, 3, dtype=torch.int32, device=device), SCALE)
    with pytest.raises(ValueError):
        sparse_mla.sparse_mla_prefill(q, cache, torch.zeros(3, 3, dtype=torch.int32, device=device), SCALE)
    with pytest.raises(ValueError):
        sparse_mla.sparse_mla_prefill(q, cache, torch.zeros(2, 3, dtype=torch.int32, device=device), SCALE,
                                      kv_cache_dtype="fp8_ds_mla")  # fmt: skip


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_ds_mla"])
@pytest.mark.parametrize("heads,num_slots", [(128, 4096), (128, 65536), (16, 4096)])
def test_gpu_prefill_real_shapes(kv_cache_dtype, heads, num_slots):
    gen = torch.Generator().manual_seed(num_slots + heads)
    rows, topk = 96, 2048
    cache = _make_cache(num_slots, 64, kv_cache_dtype, torch.bfloat16, "cuda", gen)
    q = torch.randn(rows, heads, 576, generator=gen).to(torch.bfloat16).cuda()
    idx = torch.stack([torch.randperm(num_slots, generator=gen)[:topk] for _ in range(rows)])
    idx = idx.int()
    # ragged: rows with fewer valid keys than top-k, one with none
    for r, valid in ((1, 1), (2, 100), (3, 1000), (4, 2047), (5, 0)):
        idx[r, valid:] = -1
    idx[6, ::3] = num_slots + 7  # outside the cache
    idx = idx.cuda()
    out, lse = sparse_mla.sparse_mla_prefill(q, cache, idx, SCALE, 512, kv_cache_dtype)
    ref_out, ref_lse = _ref_chunked(q, cache, idx, kv_cache_dtype)
    _check(out, lse, ref_out, ref_lse, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_ds_mla"])
@pytest.mark.parametrize("batch,s_q", [(1, 1), (4, 2), (33, 4)])
def test_gpu_decode_real_shapes(kv_cache_dtype, batch, s_q):
    gen = torch.Generator().manual_seed(batch * 10 + s_q)
    heads, topk, num_slots = 128, 2048, 32768
    cache = _make_cache(num_slots, 64, kv_cache_dtype, torch.bfloat16, "cuda", gen)
    q = torch.randn(batch, s_q, heads, 576, generator=gen).to(torch.bfloat16).cuda()
    idx = torch.randint(0, num_slots, (batch, s_q, topk), generator=gen, dtype=torch.int32)
    idx[0, 0, 500:] = -1
    idx = idx.cuda()
    out, lse = sparse_mla.sparse_mla_decode(q, cache, idx, SCALE, 512, kv_cache_dtype)
    pre_out, pre_lse = sparse_mla.sparse_mla_prefill(
        q.flatten(0, 1), cache, idx.flatten(0, 1), SCALE, 512, kv_cache_dtype
    )
    _check(out.flatten(0, 1), lse.flatten(0, 1), pre_out, pre_lse, 1e-2)
    ref_out, ref_lse = _ref_chunked(q.flatten(0, 1), cache, idx.flatten(0, 1), kv_cache_dtype)
    _check(out.flatten(0, 1), lse.flatten(0, 1), ref_out, ref_lse, 1e-2)
