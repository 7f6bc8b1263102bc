"""kernels/indexer_key.py: the indexer key (fp32 LayerNorm, then rope over its first dims) in
one pass, Triton vs the torch reference vs the rule written out here with plain float math.

CPU: the Triton interpreter. GPU (``-m gpu``): against the path it replaces, vLLM's LayerNorm
and vLLM's rotary kernel.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels import indexer_key as ik  # noqa: E402  (conftest set TRITON_INTERPRET)


def _inputs(rows: int, gen, dtype=torch.bfloat16):
    """A strided [rows, 128] key slice of a [rows, 192] projection, fp32 weight / bias, int64
    positions, a [4096, 64] cos / sin table (cos first, then sin)."""
    proj = (torch.randn(rows, 192, generator=gen) * 3 + 0.5).to(dtype)
    weight = torch.rand(128, generator=gen) + 0.5
    bias = torch.randn(128, generator=gen) * 0.1
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    freqs = torch.outer(torch.arange(4096).float(), 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64)))
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)
    return proj[:, :128], weight, bias, positions, cos_sin


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two bf16 tensors in bf16 steps at their magnitude."""
    a, b = a.float(), b.float()
    step = torch.maximum(a.abs(), b.abs()).clamp(min=2.0**-126).log2().floor().exp2() * 2.0**-7
    return float(((a - b).abs() / step).max())


@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_kernel_equals_reference_and_the_rule(neox, rows, device):
    gen = torch.Generator().manual_seed(rows + neox)
    x, weight, bias, positions, cos_sin = _inputs(rows, gen)
    want = ik.indexer_key_ref(x, weight, bias, 1e-6, positions, cos_sin, 64, neox)
    got = ik.indexer_key(x.to(device), weight.to(device), bias.to(device), 1e-6, positions.to(device),
                         cos_sin.to(device), 64, neox, use_triton=True)  # fmt: skip
    assert got.dtype == x.dtype and got.shape == x.shape and got.is_contiguous()
    assert _ulps(got.cpu(), want) <= 1  # the LayerNorm's fp32 reduction order
    # the rule, for a few rows, in plain Python floats
    for m in range(min(rows, 3)):
        vals = x[m].float().tolist()
        mean = sum(vals) / 128
        var = sum((v - mean) ** 2 for v in vals) / 128
        normed = [(v - mean) / math.sqrt(var + 1e-6) * w + b for v, w, b in zip(vals, weight.tolist(), bias.tolist())]
        normed_t = torch.tensor(normed).to(torch.bfloat16).float().tolist()
        table = cos_sin[positions[m]].to(torch.bfloat16).float().tolist()
        expected = list(normed_t)
        for i in range(32):
            j, k = (i, i + 32) if neox else (2 * i, 2 * i + 1)
            c, s = table[i], table[32 + i]

            def bf(v):
                return torch.tensor(v).to(torch.bfloat16).float().item()

            expected[j] = bf(bf(normed_t[j] * c) - bf(normed_t[k] * s))
            expected[k] = bf(bf(normed_t[k] * c) + bf(normed_t[j] * s))
        assert _ulps(torch.tensor(expected).to(torch.bfloat16), want[m]) <= 1
        assert torch.equal(want[m, 64:].float(), torch.tensor(normed_t[64:]))  # the unroped dims: the norm


def test_shape_errors_and_cpu_dispatch():
    gen = torch.Generator().manual_seed(3)
    x, weight, bias, positions, cos_sin = _inputs(4, gen)
    assert torch.equal(ik.indexer_key(x, weight, bias, 1e-6, positions, cos_sin, 64, True),
                       ik.indexer_key_ref(x, weight, bias, 1e-6, positions, cos_sin, 64, True))  # CPU: the reference
    with pytest.raises(ValueError, match="indexer_key"):
        ik.indexer_key(x, weight, bias, 1e-6, positions[:3], cos_sin, 64, True)
    with pytest.raises(ValueError, match="indexer_key"):
        ik.indexer_key(x, weight, bias, 1e-6, positions, cos_sin, 63, True)


@pytest.mark.gpu
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "interleaved"])
def test_gpu_equals_vllms_layernorm_and_rotary_kernel(neox):
    """The path it replaces on CUDA: vLLM's LayerNorm (fp32 weights) on the strided slice, then
    vLLM's rotary kernel in place; equal up to one bf16 step (the LayerNorm's reduction order)."""
    from vllm._custom_ops import rotary_embedding
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import LayerNorm

    gen = torch.Generator().manual_seed(11)
    x, weight, bias, positions, cos_sin = (t.cuda() for t in _inputs(4096, gen))
    with set_current_vllm_config(VllmConfig()):  # a CustomOp picks its forward from the config
        norm = LayerNorm(128, eps=1e-6, dtype=torch.float32).cuda()
    norm.weight.data.copy_(weight)
    norm.bias.data.copy_(bias)
    want = norm(x)
    cache = cos_sin.to(torch.bfloat16)
    rotary_embedding(positions, want[:, None, :64], None, 64, cache, neox)
    got = ik.indexer_key(x, norm.weight, norm.bias, 1e-6, positions, cache, 64, neox)
    assert _ulps(got, want) <= 1
    assert (got != want).float().mean().item() < 0.01
