"""kernels/kernel_indices.py: FlashMLA's index form (int32, -1 outside the cache, -1 padded
to whole tiles), Triton vs the torch reference vs the rule written out here.

CPU: the Triton interpreter. GPU (``-m gpu``): a real prefill shape.
"""

from __future__ import annotations

import pytest
import torch

from kernels import kernel_indices as ki  # noqa: E402  (conftest set TRITON_INTERPRET)


def _indices(shape, num_slots, dtype, gen):
    idx = torch.randint(-3, num_slots + 4, shape, generator=gen).to(dtype)
    idx.view(-1)[:: 7] = num_slots  # just past the cache
    if dtype == torch.int64:
        idx.view(-1)[1:: 11] = 2**31 + 5  # wraps to a small int32: must still be -1
    return idx


@pytest.mark.parametrize("shape,multiple", [((7, 40), 128), ((20, 2048), 128), ((3, 2, 130), 64), ((1, 1), 1)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_kernel_equals_reference_and_the_rule(shape, multiple, dtype, device):
    gen = torch.Generator().manual_seed(sum(shape) + multiple)
    num_slots = 500
    idx = _indices(shape, num_slots, dtype, gen)
    want = ki.kernel_indices_ref(idx, num_slots, multiple)
    got = ki.kernel_indices(idx.to(device), num_slots, multiple, use_triton=True)
    assert got.dtype == torch.int32 and got.is_contiguous() and torch.equal(got.cpu(), want)
    k = shape[-1]
    padded = -(-k // multiple) * multiple
    assert want.shape == (*shape[:-1], padded)
    # the rule, element by element
    flat_in, flat_out = idx.reshape(-1, k).tolist(), want.reshape(-1, padded).tolist()
    for row_in, row_out in zip(flat_in, flat_out):
        assert row_out[:k] == [v if 0 <= v < num_slots else -1 for v in row_in]
        assert row_out[k:] == [-1] * (padded - k)


def test_strided_input_and_errors(device):
    gen = torch.Generator().manual_seed(2)
    wide = _indices((6, 80), 300, torch.int32, gen)
    strided = wide[:, ::2]  # stride 2 along the top-k
    got = ki.kernel_indices(strided.to(device), 300, 128, use_triton=True)
    assert torch.equal(got.cpu(), ki.kernel_indices_ref(strided, 300, 128))
    # CPU tensors without use_triton: the reference
    assert torch.equal(ki.kernel_indices(strided, 300, 128), ki.kernel_indices_ref(strided, 300, 128))
    with pytest.raises(ValueError, match="integer indices"):
        ki.kernel_indices(strided.float(), 300, 128)


@pytest.mark.gpu
def test_gpu_real_prefill_shape():
    gen = torch.Generator().manual_seed(3)
    idx = _indices((16384, 2048), 1 << 20, torch.int32, gen)
    got = ki.kernel_indices(idx.cuda(), 1 << 20, 128)  # CUDA: Triton
    assert torch.equal(got.cpu(), ki.kernel_indices_ref(idx, 1 << 20, 128))
