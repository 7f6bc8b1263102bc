"""``joined_last_dim``: the dense prefill's query as a view of the projection it was split from,
and the copy it falls back to otherwise."""

import torch

from vllm_cp_nsa.nsa_attention import joined_last_dim


def test_adjacent_parts_of_one_projection_join_without_a_copy():
    q = torch.randn(5, 4, 192)
    nope, pe = q.split([128, 64], dim=-1)
    joined = joined_last_dim(nope[:3], pe[:3])
    assert joined is not None and joined.data_ptr() == q.data_ptr()
    assert torch.equal(joined, torch.cat([nope[:3], pe[:3]], dim=-1))
    pe.mul_(2)  # the rope written in place shows through the view
    assert torch.equal(joined, q[:3])


def test_parts_that_do_not_lie_side_by_side_are_not_joined():
    q = torch.randn(5, 4, 192)
    nope, pe = q.split([128, 64], dim=-1)
    assert joined_last_dim(nope, pe.clone()) is None  # rope returned a new tensor (CPU path)
    assert joined_last_dim(pe, nope) is None  # wrong order
    assert joined_last_dim(nope[:, :, :96], pe) is None  # a gap between them
    assert joined_last_dim(nope[:4], pe[1:]) is None  # different rows
    assert joined_last_dim(nope.double(), pe.double()) is None  # copies
    other = torch.randn(5, 4, 192)
    assert joined_last_dim(nope, other[..., 128:]) is None  # another buffer
