"""kernels/slots.py: top-k positions -> cache slots, Triton vs the torch reference
(identical int32 slots), padding rows and -1 picks anywhere in a row.

CPU: the Triton interpreter. GPU (``-m gpu``): a real prefill shape.
"""

from __future__ import annotations

import pytest
import torch

from kernels import slots  # noqa: E402  (conftest set TRITON_INTERPRET)


def _case(rows, topk, num_reqs, max_blocks, block_size, gen):
    table = torch.randint(0, 5000, (num_reqs, max_blocks), generator=gen, dtype=torch.int32)
    positions = torch.randint(0, max_blocks * block_size, (rows, topk), generator=gen, dtype=torch.int32)
    positions[torch.rand(rows, topk, generator=gen) < 0.2] = -1
    row_req = torch.randint(-1, num_reqs, (rows,), generator=gen, dtype=torch.int32)
    return positions, row_req, table


@pytest.mark.parametrize("rows,topk,block_size", [(7, 40, 16), (20, 1030, 64), (1, 3, 1)])
def test_kernel_equals_reference(rows, topk, block_size, device):
    gen = torch.Generator().manual_seed(rows * topk)
    positions, row_req, table = _case(rows, topk, 4, 9, block_size, gen)
    want = slots.positions_to_slots_ref(positions, row_req, table, block_size)
    got = slots.positions_to_slots(positions.to(device), row_req.to(device), table.to(device), block_size,
                                   use_triton=True)
    assert got.dtype == torch.int32 and torch.equal(got.cpu(), want)
    assert bool((want[row_req < 0] == -1).all()) and bool((want[positions < 0] == -1).all())
    # a hand-checked entry
    m = int(torch.nonzero((row_req >= 0)[:, None] & (positions >= 0))[0, 0])
    k = int(torch.nonzero(positions[m] >= 0)[0, 0])
    p, r = int(positions[m, k]), int(row_req[m])
    assert int(want[m, k]) == int(table[r, p // block_size]) * block_size + p % block_size


def test_int64_positions_strided_table_and_errors(device):
    gen = torch.Generator().manual_seed(1)
    positions, row_req, table = _case(5, 33, 3, 6, 8, gen)
    wide = torch.zeros(3, 12, dtype=torch.int32)
    wide[:, ::2] = table  # a strided block table
    got = slots.positions_to_slots(positions.long().to(device), row_req.long().to(device),
                                   wide[:, ::2].to(device), 8, use_triton=True)  # fmt: skip
    assert torch.equal(got.cpu(), slots.positions_to_slots_ref(positions, row_req, table, 8))
    # CPU tensors without use_triton: the reference
    assert torch.equal(slots.positions_to_slots(positions, row_req, table, 8),
                       slots.positions_to_slots_ref(positions, row_req, table, 8))
    with pytest.raises(ValueError, match="positions"):
        slots.positions_to_slots(positions, row_req[:4], table, 8)


@pytest.mark.gpu
def test_gpu_real_prefill_shape():
    gen = torch.Generator().manual_seed(3)
    positions, row_req, table = _case(8192, 2048, 8, 1024, 64, gen)
    got = slots.positions_to_slots(positions.cuda(), row_req.cuda(), table.cuda(), 64)  # CUDA: Triton
    assert torch.equal(got.cpu(), slots.positions_to_slots_ref(positions, row_req, table, 64))
