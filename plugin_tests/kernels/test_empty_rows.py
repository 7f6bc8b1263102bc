"""kernels/empty_rows.py: rows without a valid index get out = 0 and lse = -inf in place,
every other value untouched; the same as the torch reference, on the layouts the vllm
provider hands it (heads sliced from a padded output, [B, S, H] lse from a transpose).

CPU: the Triton interpreter. GPU (``-m gpu``): a real prefill shape.
"""

from __future__ import annotations

import pytest
import torch

from kernels import empty_rows  # noqa: E402  (conftest set TRITON_INTERPRET)


def _case(rows, heads, padded_heads, topk, gen, dtype=torch.bfloat16):
    out = torch.randn(rows, padded_heads, 64, generator=gen).to(dtype)
    lse = torch.randn(rows, padded_heads, generator=gen)
    idx = torch.randint(-1, 50, (rows, topk), generator=gen, dtype=torch.int32)
    empty = torch.rand(rows, generator=gen) < 0.3
    idx[empty] = -1
    out[empty] = float("inf")  # what FlashMLA may leave there
    lse[empty] = float("nan")
    return out, lse, idx, empty


def _check(out, lse, idx, empty, heads, device):
    want_out, want_lse = empty_rows.rows_without_keys_ref(out[:, :heads], lse[:, :heads], idx)
    o, l = out.clone().to(device), lse.clone().to(device)  # clones: on CPU .to() would alias
    got_out, got_lse = empty_rows.zero_rows_without_keys(o[:, :heads], l[:, :heads], idx.to(device), True)
    assert got_out.data_ptr() == o.data_ptr()  # in place
    assert torch.equal(got_out.cpu(), want_out) and torch.equal(got_lse.cpu(), want_lse)
    assert torch.equal(o[:, heads:].cpu(), out[:, heads:])  # padded heads untouched
    assert bool(torch.isneginf(got_lse.cpu()[empty]).all()) and bool((got_out.cpu()[empty] == 0).all())


@pytest.mark.parametrize("rows,heads,padded_heads,topk", [(9, 4, 8, 40), (33, 16, 16, 1030), (1, 3, 4, 7)])
def test_zeroes_exactly_the_rows_without_keys(rows, heads, padded_heads, topk, device):
    gen = torch.Generator().manual_seed(rows + topk)
    out, lse, idx, empty = _case(rows, heads, padded_heads, topk, gen)
    _check(out, lse, idx, empty, heads, device)


def test_decode_layout_and_fallbacks(device):
    gen = torch.Generator().manual_seed(2)
    out, lse, idx, empty = _case(6, 4, 8, 20, gen)
    # the fp8 decode path: out [B, 1, H, D], lse [B, H, 1] transposed to [B, 1, H]
    o4 = out.clone().to(device).unsqueeze(1)
    l4 = lse.clone().to(device).unsqueeze(-1)
    got_out, got_lse = empty_rows.zero_rows_without_keys(o4[:, :, :4], l4[:, :4].transpose(1, 2),
                                                         idx.to(device).unsqueeze(1), True)  # fmt: skip
    want_out, want_lse = empty_rows.rows_without_keys_ref(out[:, :4], lse[:, :4], idx)
    assert torch.equal(got_out.cpu()[:, 0], want_out) and torch.equal(got_lse.cpu()[:, 0], want_lse)
    assert got_out.data_ptr() == o4.data_ptr()
    # the fp8 prefill path: [1, M, H, D] and lse [1, H, M] transposed (head stride M), in place
    o1, l1 = out.clone().to(device).unsqueeze(0), lse.t().contiguous().to(device).unsqueeze(0)
    got_out, got_lse = empty_rows.zero_rows_without_keys(o1[:, :, :4], l1[:, :4].transpose(1, 2),
                                                         idx.to(device).unsqueeze(0), True)  # fmt: skip
    assert torch.equal(got_out.cpu()[0], want_out) and torch.equal(got_lse.cpu()[0], want_lse)
    assert got_lse.data_ptr() == l1.data_ptr()
    # a layout the kernel does not take (heads not contiguous in a row): the reference, out of place
    out_t = out.transpose(1, 2).contiguous().transpose(1, 2)
    got_out, got_lse = empty_rows.zero_rows_without_keys(out_t, lse, idx, True)
    want_out, want_lse = empty_rows.rows_without_keys_ref(out, lse, idx)
    assert torch.equal(got_out, want_out) and torch.equal(got_lse, want_lse)
    assert got_out.data_ptr() != out_t.data_ptr()
    with pytest.raises(ValueError, match="must share their leading dims"):
        empty_rows.zero_rows_without_keys(out, lse, idx[:5])


@pytest.mark.gpu
def test_gpu_real_prefill_shape():
    gen = torch.Generator().manual_seed(8)
    out, lse, idx, empty = _case(8192, 128, 128, 2048, gen)
    out = out.repeat(1, 1, 8)  # [8192, 128, 512]
    _check(out, lse, idx, empty, 128, "cuda")
