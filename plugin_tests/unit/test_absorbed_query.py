"""absorbed_query writes bmm(q_nope, W_UK^T) straight into the [n, H, 576] query buffer;
it must equal the plain bmm + concat, also for the strided q_nope slice the model passes."""

import pytest
import torch

from vllm_cp_nsa.nsa_attention import absorbed_query


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_absorbed_query_is_bmm_then_concat(dtype, n):
    gen = torch.Generator().manual_seed(n)
    heads, nope, rope, latent = 4, 16, 8, 32
    q_full = torch.randn(n, heads, nope + rope, generator=gen).to(dtype)  # like q_b_proj's output
    q_nope, q_pe = q_full[..., :nope], q_full[..., nope:]
    w_uk_t = torch.randn(heads, nope, latent, generator=gen).to(dtype)
    expected = torch.cat([torch.bmm(q_nope.transpose(0, 1), w_uk_t).transpose(0, 1), q_pe], dim=-1)
    q = absorbed_query(q_nope, q_pe, w_uk_t)
    assert q.shape == (n, heads, latent + rope) and q.is_contiguous() and q.dtype == dtype
    torch.testing.assert_close(q, expected, rtol=0, atol=0)


def test_a_buffer_holding_q_pe_gets_only_the_matmul():
    """``into``: the CUDA path's query rope already wrote q_pe into the buffer's tail; the
    matmul fills the head and the tail stays as it was (nothing copies q_pe again)."""
    gen = torch.Generator().manual_seed(3)
    n, heads, nope, rope, latent = 5, 4, 16, 8, 32
    q_nope = torch.randn(n, heads, nope, generator=gen)
    q_pe = torch.randn(n, heads, rope, generator=gen)
    w_uk_t = torch.randn(heads, nope, latent, generator=gen)
    buffer = torch.full((n, heads, latent + rope), float("nan"))
    buffer[..., latent:] = q_pe
    q = absorbed_query(q_nope, torch.zeros_like(q_pe), w_uk_t, into=buffer)
    assert q is buffer
    torch.testing.assert_close(q, absorbed_query(q_nope, q_pe, w_uk_t), rtol=0, atol=0)
