"""Triton indexer-query quantization (kernels/indexer_q_quant.py) vs its torch reference
(kv_cache_ref.quantize_indexer_queries): identical fp8 bytes and folded weights.

CPU: the Triton interpreter at small shapes. GPU (``-m gpu``): a real prefill shape on the
device against the reference computed on the CPU from the same inputs.
"""

from __future__ import annotations

import pytest
import torch

from kernels import indexer_q_quant, kv_cache_ref  # noqa: E402  (conftest set TRITON_INTERPRET)


def _inputs(n, heads, dtype, gen):
    mag = torch.exp2(torch.randint(-14, 8, (n, heads, 1), generator=gen)).float()
    q = torch.randn(n, heads, 128, generator=gen) * mag  # scales over many binades
    if n > 3:
        q[0, 0] = 0  # all-zero head: the scale floor
        q[1, -1] = 1e-7  # tiny: floor, fp8 subnormals
        q[2, 0, 5] = 448.0 * 4  # amax exactly 448 * 2^k: scale exactly 2^k
        q[3, -1, 77] = -3000.0
    weights = torch.randn(n, heads, generator=gen)
    return q.to(dtype), weights


def _check(got, want):
    (q8, w8), (q8_ref, w8_ref) = got, want
    assert q8.dtype == torch.float8_e4m3fn and q8.is_contiguous() and q8.shape == q8_ref.shape
    assert w8.dtype == torch.float32 and w8.shape == w8_ref.shape
    assert torch.equal(q8.cpu().view(torch.uint8), q8_ref.view(torch.uint8))
    assert torch.equal(w8.cpu(), w8_ref)


@pytest.mark.parametrize("n", [1, 37])
@pytest.mark.parametrize("heads,heads_out", [(16, 32), (3, 32), (8, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_kernel_bytes_equal_the_reference(n, heads, heads_out, dtype, device):
    gen = torch.Generator().manual_seed(n * 100 + heads)
    q, weights = _inputs(n, heads, dtype, gen)
    if dtype == torch.float16:
        q = q.clamp(-60000, 60000)
    got = indexer_q_quant.quantize_indexer_queries(q.to(device), weights.to(device), heads_out, True)
    _check(got, kv_cache_ref.quantize_indexer_queries(q, weights, heads_out))
    assert bool((got[1][:, heads:] == 0).all()) and bool((got[0][:, heads:].float() == 0).all())


def test_strided_queries_and_special_inputs(device):
    gen = torch.Generator().manual_seed(5)
    q, weights = _inputs(9, 4, torch.bfloat16, gen)
    wide = torch.randn(9, 4, 256, generator=gen).to(torch.bfloat16)
    wide[..., 64:192] = q  # a strided [9, 4, 128] view, as a slice of a projection output
    view = wide.to(device)[..., 64:192]
    _check(indexer_q_quant.quantize_indexer_queries(view, weights.to(device), 32, True),
           kv_cache_ref.quantize_indexer_queries(q, weights, 32))  # fmt: skip
    empty = indexer_q_quant.quantize_indexer_queries(q[:0].to(device), weights[:0].to(device), 32, True)
    assert empty[0].shape == (0, 32, 128) and empty[1].shape == (0, 32)
    q8 = q.float().clamp(-448, 448).to(torch.float8_e4m3fn)  # fp8 queries: padded, not requantized
    got = indexer_q_quant.quantize_indexer_queries(q8.to(device), weights.to(device), 32, True)
    assert torch.equal(got[0][:, :4].cpu().view(torch.uint8), q8.view(torch.uint8))
    assert torch.equal(got[1][:, :4].cpu(), weights)


def test_the_reference_is_the_key_recipe_with_scales_folded():
    gen = torch.Generator().manual_seed(3)
    q, weights = _inputs(6, 5, torch.bfloat16, gen)
    q8, w8 = kv_cache_ref.quantize_indexer_queries(q, weights, 8)
    values, scales = kv_cache_ref.quantize_indexer_fp8(q.reshape(30, 128))
    assert torch.equal(q8[:, :5].reshape(30, 128).view(torch.uint8), values.view(torch.uint8))
    assert torch.equal(w8[:, :5], weights * scales.view(6, 5))
    # the fold keeps the scores: relu(q) . k * w == relu(q8 * s) . k * w
    keys = torch.randn(40, 128, generator=gen)
    exact = (torch.relu(q.float() @ keys.T) * weights[..., None]).sum(1)
    folded = (torch.relu(q8[:, :5].float() @ keys.T) * w8[:, :5, None]).sum(1)
    assert ((folded - exact).norm() / exact.norm()).item() < 0.06


@pytest.mark.parametrize("args,message", [
    ((torch.zeros(2, 4, 64), torch.zeros(2, 4), 32), r"q must be \[n, heads, 128\]"),
    ((torch.zeros(2, 4, 128), torch.zeros(2, 3), 32), r"weights must be \[2, 4\]"),
    ((torch.zeros(2, 40, 128), torch.zeros(2, 40), 32), r"num_heads_out=32 < 40"),
])
def test_shape_errors(args, message):
    with pytest.raises(ValueError, match=message):
        indexer_q_quant.quantize_indexer_queries(*args)


@pytest.mark.gpu
def test_gpu_real_prefill_shape():
    gen = torch.Generator().manual_seed(11)
    q, weights = _inputs(8192, 64, torch.bfloat16, gen)
    got = indexer_q_quant.quantize_indexer_queries(q.cuda(), weights.cuda(), 64)
    torch.cuda.synchronize()
    _check(got, kv_cache_ref.quantize_indexer_queries(q, weights, 64))
