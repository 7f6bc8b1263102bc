"""kernels/kernel_indices.py: FlashMLA's index form (int32, -1 outside the cache, -1 padded
to whole tiles) and FA3's compacted form (the indices inside the cache first, in order, -1
after them, and their count), Triton vs the torch reference vs the rule written out here.

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


def _indices_with_holes(shape, num_slots, dtype, gen):
    """Indices whose rows hold anywhere from none to all of their entries inside the cache
    (row 0 none, row 1 all), the others -1, below -1, just past the cache, or (int64)
    ``>= 2**31``, scattered through the row."""
    k = shape[-1]
    rows = torch.randint(0, num_slots, (int(torch.tensor(shape[:-1]).prod()), k), generator=gen).to(dtype)
    keep = torch.rand(rows.shape, generator=gen) < torch.rand(rows.shape[0], 1, generator=gen)
    keep[0], keep[min(1, rows.shape[0] - 1)] = False, True
    bad = [-1, -3, num_slots, num_slots + 7] + ([2**31 + 5, 2**32 + 1] if dtype == torch.int64 else [])
    bad = torch.tensor(bad, dtype=dtype)[torch.randint(0, len(bad), rows.shape, generator=gen)]
    return torch.where(keep, rows, bad).view(shape)


def _check_compacted(idx, got_idx, got_counts, num_slots):
    """The rule, row by row: the entries inside the cache in their order, then -1; their count."""
    k = idx.shape[-1]
    assert got_idx.dtype == got_counts.dtype == torch.int32 and got_idx.is_contiguous()
    assert got_idx.shape == idx.shape and got_counts.shape == idx.shape[:-1]
    rows_in, rows_out = idx.reshape(-1, k).tolist(), got_idx.reshape(-1, k).tolist()
    for row_in, row_out, count in zip(rows_in, rows_out, got_counts.reshape(-1).tolist()):
        kept = [v for v in row_in if 0 <= v < num_slots]
        assert row_out == kept + [-1] * (k - len(kept)) and count == len(kept)


@pytest.mark.parametrize("shape", [(9, 1), (7, 40), (5, 2048), (3, 2, 2050)])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_compact_kernel_equals_reference_and_the_rule(shape, dtype, device):
    gen = torch.Generator().manual_seed(sum(shape) + dtype.itemsize)
    num_slots = 500
    idx = _indices_with_holes(shape, num_slots, dtype, gen)
    want_idx, want_counts = ki.compact_kernel_indices_ref(idx, num_slots)
    _check_compacted(idx, want_idx, want_counts, num_slots)
    got_idx, got_counts = ki.compact_kernel_indices(idx.to(device), num_slots, use_triton=True)
    assert torch.equal(got_idx.cpu(), want_idx) and torch.equal(got_counts.cpu(), want_counts)


def test_compact_strided_input_and_errors(device):
    gen = torch.Generator().manual_seed(5)
    wide = _indices_with_holes((6, 80), 300, torch.int64, gen)
    strided = wide[:, ::2]  # stride 2 along the top-k
    got_idx, got_counts = ki.compact_kernel_indices(strided.to(device), 300, use_triton=True)
    _check_compacted(strided, got_idx.cpu(), got_counts.cpu(), 300)
    # CPU tensors without use_triton: the reference
    for got, want in zip(ki.compact_kernel_indices(strided, 300), ki.compact_kernel_indices_ref(strided, 300)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="integer indices"):
        ki.compact_kernel_indices(strided.float(), 300)


@pytest.mark.gpu
def test_gpu_compact_real_prefill_shape():
    gen = torch.Generator().manual_seed(6)
    idx = _indices_with_holes((16384, 2048), 1 << 20, torch.int32, gen)
    got_idx, got_counts = ki.compact_kernel_indices(idx.cuda(), 1 << 20)  # CUDA: Triton
    want_idx, want_counts = ki.compact_kernel_indices_ref(idx, 1 << 20)
    assert torch.equal(got_idx.cpu(), want_idx) and torch.equal(got_counts.cpu(), want_counts)


def _paged_positions(rows: int, topk: int, block_size: int, gen):
    """Request-local positions (-1 holes, some past a request's pages) for rows of three
    requests and a padding row (request -1), with a shuffled block table of 6 pages each."""
    table = torch.randperm(24, generator=gen)[:18].view(3, 6).to(torch.int32)
    row_req = torch.randint(0, 3, (rows,), generator=gen).to(torch.int32)
    row_req[rows // 2] = -1
    positions = torch.randint(-2, 6 * block_size, (rows, topk), generator=gen).to(torch.int32)
    return positions, row_req, table


def _slot_rule(positions, row_req, table, block_size):
    """The positions -> slots rule, element by element: page * block_size + offset, -1 for a
    negative position or a row without a request."""
    out = []
    for req, row in zip(row_req.tolist(), positions.tolist()):
        out.append([table[req][p // block_size].item() * block_size + p % block_size if p >= 0 and req >= 0 else -1
                    for p in row])  # fmt: skip
    return torch.tensor(out, dtype=torch.int64)


@pytest.mark.parametrize("topk,block_size,num_slots", [(40, 16, 24 * 16), (130, 64, 10 * 64), (2048, 64, 24 * 64)])
def test_positions_map_to_slots_in_the_same_pass(topk, block_size, num_slots, device):
    """Both forms from request-local positions (``Paging``) equal the forms of the slots the
    positions -> slots rule gives; slots past ``num_slots`` (pages beyond a smaller cache)
    become -1 as any index outside the cache does."""
    gen = torch.Generator().manual_seed(topk + block_size)
    positions, row_req, table = _paged_positions(9, topk, block_size, gen)
    slots = _slot_rule(positions, row_req, table, block_size)
    paging = ki.Paging(row_req, table, block_size)
    want = ki.kernel_indices_ref(slots, num_slots, 64)
    assert torch.equal(ki.kernel_indices_ref(positions, num_slots, 64, paging), want)
    on_device = ki.Paging(row_req.to(device), table.to(device), block_size)
    got = ki.kernel_indices(positions.to(device), num_slots, 64, use_triton=True, paging=on_device)
    assert torch.equal(got.cpu(), want)
    want_idx, want_counts = ki.compact_kernel_indices_ref(slots, num_slots)
    ref_idx, ref_counts = ki.compact_kernel_indices_ref(positions, num_slots, paging)
    assert torch.equal(ref_idx, want_idx) and torch.equal(ref_counts, want_counts)
    got_idx, got_counts = ki.compact_kernel_indices(positions.to(device), num_slots, use_triton=True, paging=on_device)
    assert torch.equal(got_idx.cpu(), want_idx) and torch.equal(got_counts.cpu(), want_counts)
    with pytest.raises(ValueError, match="paging"):
        ki.kernel_indices(positions.to(device), num_slots, 64, use_triton=True,
                          paging=ki.Paging(row_req[:3].to(device), table.to(device), block_size))  # fmt: skip
