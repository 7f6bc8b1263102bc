"""kernels.dispatch: provider names, capability checks, and the triton
provider's five ops equal the torch provider's on the same inputs."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels import dispatch, indexer_topk, kv_cache, sparse_mla  # noqa: F401  (import under the interpreter)


def test_provider_names_and_capabilities():
    """The package's two providers; choosing among providers (``auto``) is not this module's
    job (``extensions.resolve_kernel_provider``, tested in plugin_tests/extensions)."""
    assert [p.name for p in dispatch.builtin_providers()] == ["torch", "triton"]
    assert kernels.get_ops("torch").name == "torch"
    assert isinstance(kernels.get_ops("torch"), kernels.NsaOps)
    assert kernels.get_ops("torch") is kernels.get_ops("torch")  # shared instances
    for name in ("nope", "auto"):
        with pytest.raises(ValueError, match="this package has: torch, triton"):
            kernels.get_ops(name)
    triton_ops = dispatch._instance("triton")
    assert triton_ops.priority > kernels.get_ops("torch").priority
    assert not triton_ops.supports("cpu", torch.bfloat16, 128)
    assert kernels.get_ops("torch").supports("cpu", torch.float32, 4)
    assert kernels.get_ops("torch").supports(None, None, 0)
    assert not kernels.get_ops("torch").supports("cpu", torch.int8, 4)
    assert triton_ops.supports("cuda", torch.bfloat16, 128) == torch.cuda.is_available()


def test_triton_provider_equals_torch_provider(device):
    """All the ops through the two providers on one small batch."""
    gen = torch.Generator().manual_seed(0)
    tops = kernels.get_ops("torch")
    xops = kernels.get_ops("triton", device)
    block_size, num_blocks, tokens = 8, 6, 40
    for kv_dtype in ("fp8_ds_mla", "auto"):
        row = 656 if kv_dtype == "fp8_ds_mla" else 576
        dt = torch.uint8 if kv_dtype == "fp8_ds_mla" else torch.bfloat16
        caches = [torch.zeros(num_blocks, block_size, row, dtype=dt, device=device) for _ in range(2)]
        kv_c = torch.randn(tokens, 512, generator=gen).to(torch.bfloat16).to(device)
        k_pe = torch.randn(tokens, 64, generator=gen).to(torch.bfloat16).to(device)
        slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(device)
        tops.write_latent_cache(caches[0], kv_c, k_pe, slots, kv_dtype)
        xops.write_latent_cache(caches[1], kv_c, k_pe, slots, kv_dtype)
        assert torch.equal(caches[0], caches[1])
        q = torch.randn(2, 3, 4, 576, generator=gen).to(torch.bfloat16).to(device)
        idx = slots[torch.randint(0, tokens, (2, 3, 20), generator=gen).to(device)].int()
        ro, rl = tops.sparse_mla_decode(q, caches[0], idx, 0.05, 512, kv_dtype)
        xo, xl = xops.sparse_mla_decode(q, caches[0], idx, 0.05, 512, kv_dtype)
        assert ((xo.float() - ro.float()).norm() / ro.float().norm()).item() < 1e-2
        assert (xl - rl).abs().max().item() < 1e-3
        po, pl = xops.sparse_mla_prefill(q.flatten(0, 1), caches[0], idx.flatten(0, 1), 0.05, 512, kv_dtype)
        assert ((po.float() - ro.flatten(0, 1).float()).norm() / ro.float().norm()).item() < 1e-2
    for fp8 in (True, False):
        if fp8:
            icaches = [torch.zeros(num_blocks, block_size * 132, dtype=torch.uint8, device=device) for _ in range(2)]
        else:
            icaches = [torch.zeros(num_blocks, block_size, 128, dtype=torch.bfloat16, device=device) for _ in range(2)]
        k = torch.randn(tokens, 128, generator=gen).to(torch.bfloat16).to(device)
        slots = torch.arange(tokens, device=device)
        tops.write_indexer_cache(icaches[0], k, slots, block_size, fp8)
        xops.write_indexer_cache(icaches[1], k, slots, block_size, fp8)
        assert torch.equal(icaches[0], icaches[1])
        # both caches in one call: the interface's two writes (torch) vs one launch (Triton)
        latents = [torch.zeros(num_blocks, block_size, 656, dtype=torch.uint8, device=device) for _ in range(2)]
        both = [torch.zeros_like(icaches[0]) for _ in range(2)]
        kv_c = torch.randn(tokens, 512, generator=gen).to(torch.bfloat16).to(device)
        k_pe = torch.randn(tokens, 64, generator=gen).to(torch.bfloat16).to(device)
        for ops, latent, index in zip((tops, xops), latents, both):
            ops.write_token_caches(latent, kv_c, k_pe, "fp8_ds_mla", index, k, fp8, slots, block_size)
        assert torch.equal(latents[0], latents[1]) and torch.equal(both[0], both[1]) and torch.equal(both[0], icaches[0])
        bt = torch.arange(num_blocks, dtype=torch.int32, device=device)[None]
        qi = torch.randn(3, 4, 128, generator=gen).to(torch.bfloat16).to(device)
        w = torch.randn(3, 4, generator=gen).to(device)
        rreq = torch.tensor([0, 0, -1], dtype=torch.int32, device=device)
        rlen = torch.tensor([tokens, 7, 0], dtype=torch.int32, device=device)
        a = tops.indexer_topk(qi, w, icaches[0], bt, rreq, rlen, 16, block_size, fp8)
        b = xops.indexer_topk(qi, w, icaches[0], bt, rreq, rlen, 16, block_size, fp8)
        for m in range(3):  # sets equal (random data: no ties)
            assert set(a[m].tolist()) == set(b[m].tolist())


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_prefill_over_positions_is_prefill_over_their_slots(name, device):
    """The default ``sparse_mla_prefill_positions``: the positions' slots through the
    provider's ``sparse_mla_prefill`` (padding rows and -1 picks attend to nothing)."""
    gen = torch.Generator().manual_seed(6)
    block_size, topk = 4, 6
    table = torch.tensor([[5, 2, 7], [0, 3, 1]], dtype=torch.int32)
    cache = torch.randn(8, block_size, 576, generator=gen).to(torch.bfloat16)
    positions = torch.randint(0, 12, (5, topk), generator=gen, dtype=torch.int32)
    positions[0, :2] = -1
    row_req = torch.tensor([0, 1, -1, 1, 0])
    q = torch.randn(5, 2, 576, generator=gen).to(torch.bfloat16)
    ops = dispatch.get_ops(name, device)
    to = (lambda t: t.to(device))
    out, lse = ops.sparse_mla_prefill_positions(to(q), to(cache), to(positions), to(row_req), to(table), block_size,
                                                0.05, 512, "auto")  # fmt: skip
    slots = torch.where((row_req >= 0)[:, None] & (positions >= 0),
                        table[row_req.clamp(min=0)].gather(1, (positions.clamp(min=0) // block_size).long())
                        * block_size + positions % block_size, -1).int()  # fmt: skip
    want_out, want_lse = ops.sparse_mla_prefill(to(q), to(cache), to(slots), 0.05, 512, "auto")
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    assert bool(torch.isinf(lse[2]).all()) and bool((out[2] == 0).all())
