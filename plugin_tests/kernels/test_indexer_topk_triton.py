"""Triton indexer scores + top-k vs attention_ref.indexer_topk_paged.

Acceptance: per row, the selected positions are distinct, inside the row's causal range,
exactly ``min(kv_len, topk)`` of them (then ``-1``), best first, and every selected key
scores at least the reference k-th best score (up to float rounding of the sums): the sets
equal the reference's except among (near-)exact ties.

CPU: the Triton interpreter at small shapes. GPU (``-m gpu``): 64 heads, top-k 2048, 4K-64K
keys, ragged batches of several requests, fp8 and bf16 caches, bf16 and fp8 queries.
"""

from __future__ import annotations

import pytest
import torch

from kernels import attention_ref, indexer_topk, kv_cache_ref  # noqa: E402


def _build(lens_req, num_heads, rows, block_size, fp8, q_dtype, device, gen, num_blocks=None):
    blocks_per_req = [-(-n // block_size) for n in lens_req]
    width = max(blocks_per_req)
    total = sum(blocks_per_req)
    num_blocks = num_blocks or total + 3
    perm = torch.randperm(num_blocks, generator=gen)
    block_table = torch.zeros(len(lens_req), width, dtype=torch.int32)
    used = 0
    for r, nb in enumerate(blocks_per_req):
        block_table[r, :nb] = perm[used : used + nb].int()
        used += nb
    if fp8:
        cache = torch.randint(0, 256, (num_blocks, block_size * 132), generator=gen, dtype=torch.uint8)
    else:
        cache = torch.randn(num_blocks, block_size, 128, generator=gen).to(torch.bfloat16)
    for r, n in enumerate(lens_req):
        pos = torch.arange(n)
        slots = block_table[r][pos // block_size].long() * block_size + pos % block_size
        k = torch.randn(n, 128, generator=gen).to(torch.bfloat16)
        kv_cache_ref.write_indexer_cache(cache, k, slots, block_size, fp8)
    row_req = torch.tensor([r for r, _ in rows], dtype=torch.int32)
    row_len = torch.tensor([n for _, n in rows], dtype=torch.int32)
    m = len(rows)
    q = torch.randn(m, num_heads, 128, generator=gen)
    if q_dtype == torch.float8_e4m3fn:
        q = (q * 8).to(q_dtype)
    else:
        q = q.to(q_dtype)
    weights = torch.randn(m, num_heads, generator=gen) * num_heads**-0.5
    to = lambda t: t.to(device)  # noqa: E731
    return (to(q), to(weights), to(cache), to(block_table), to(row_req), to(row_len))


def _check_topk(out, q, weights, cache, block_table, row_req, row_len, topk, block_size, fp8):
    """Validate ``out`` against reference scores; returns the number of rows whose sets
    differ from the reference output (allowed only among near ties)."""
    ref = attention_ref.indexer_topk_paged(
        q, weights, cache, block_table, row_req, row_len, topk, block_size, fp8
    )
    assert out.shape == ref.shape and out.dtype == torch.int32
    differ = 0
    for req in torch.unique(row_req).tolist():
        rows = torch.nonzero(row_req == req).flatten()
        if req < 0:
            assert bool((out[rows] == -1).all())
            continue
        n_max = int(row_len[rows].max())
        if n_max <= 0:
            assert bool((out[rows] == -1).all())
            continue
        pos = torch.arange(n_max, device=q.device)
        slots = attention_ref.slots_from_positions(block_table[req][None], pos[None], block_size)[0]
        keys = kv_cache_ref.gather_indexer_keys(cache, slots, block_size, fp8)
        ks = torch.zeros_like(row_len[rows])
        logits = attention_ref.indexer_logits(q[rows], keys, weights[rows], ks, row_len[rows])
        for i, m in enumerate(rows.tolist()):
            n = int(row_len[m])
            nv = min(max(n, 0), topk)
            sel = out[m, :nv].long()
            assert bool((out[m, nv:] == -1).all()), f"row {m}: padding"
            if nv == 0:
                continue
            assert bool((sel >= 0).all()) and bool((sel < n).all()), f"row {m}: out of range"
            assert sel.unique().numel() == nv, f"row {m}: duplicates"
            sc = logits[i, :n]
            kth = torch.topk(sc, nv).values[-1]
            tol = 1e-5 * sc.abs().max().clamp_min(1e-20) + 1e-30
            got = sc[sel]
            assert bool((got >= kth - tol).all()), f"row {m}: a selected key scores below the k-th"
            assert bool((got[1:] <= got[:-1] + tol).all()), f"row {m}: not best first"
            if set(sel.tolist()) != set(ref[m, :nv].tolist()):
                differ += 1
    return differ


@pytest.mark.parametrize("fp8", [True, False])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float32])
def test_indexer_topk_matches_reference(fp8, q_dtype, device):
    gen = torch.Generator().manual_seed(11 + fp8)
    block_size, heads, topk = 8, 4, 24
    lens_req = [37, 90, 5]
    rows = [(0, 10), (0, 37), (1, 1), (1, 50), (1, 51), (-1, 0), (1, 90), (2, 5), (2, 3),
            (1, 0), (0, 24), (0, 25), (1, 89)]  # fmt: skip
    args = _build(lens_req, heads, rows, block_size, fp8, q_dtype, device, gen)
    out = indexer_topk.indexer_topk(*args, topk, block_size, fp8)
    differ = _check_topk(out, *args, topk, block_size, fp8)
    assert differ <= 1


def test_indexer_topk_small_chunks_and_exact_ties(device):
    """Chunking of the logits buffer, and exact ties (duplicate keys) -> lower position."""
    gen = torch.Generator().manual_seed(3)
    block_size, heads, topk = 4, 2, 8
    rows = [(0, 30), (0, 17), (0, 9), (0, 30)]
    q, w, cache, bt, rreq, rlen = _build([30], heads, rows, block_size, False, torch.float32,
                                         device, gen)  # fmt: skip
    # make positions 0..29 hold only 3 distinct keys: every score is an exact tie x10
    pos = torch.arange(30)
    slots = bt[0].cpu()[pos // block_size].long() * block_size + pos % block_size
    base = torch.randn(3, 128, generator=gen).to(torch.bfloat16)
    cache_cpu = cache.cpu()
    kv_cache_ref.write_indexer_cache(cache_cpu, base[pos % 3], slots, block_size, False)
    cache = cache_cpu.to(device)
    out = indexer_topk.indexer_topk(q, w, cache, bt, rreq, rlen, topk, block_size, False,
                                    max_logits_bytes=2 * 32 * 4)  # fmt: skip
    ref = attention_ref.indexer_topk_paged(q, w, cache, bt, rreq, rlen, topk, block_size, False)
    assert torch.equal(out.cpu(), ref.cpu())  # ties resolved to the lower position, like ref


def test_topk_larger_than_keys_and_padding(device):
    gen = torch.Generator().manual_seed(4)
    rows = [(0, 3), (-1, 5), (0, 0), (1, 7)]
    args = _build([6, 7], 3, rows, 4, True, torch.bfloat16, device, gen)
    out = indexer_topk.indexer_topk(*args, 16, 4, True)
    assert bool((out[1] == -1).all()) and bool((out[2] == -1).all())
    assert int((out[0] >= 0).sum()) == 3 and int((out[3] >= 0).sum()) == 7
    _check_topk(out, *args, 16, 4, True)


def test_layers_of_one_forward_share_the_row_prep(device, monkeypatch):
    """Calls with the same row_req / row_kv_len / block_table objects (every layer of a
    forward) build the row groups once; new objects with the same values (the next forward)
    or new contents behind new objects rebuild them; results equal a fresh build's."""
    gen = torch.Generator().manual_seed(8)
    rows = [(0, 30), (0, 17), (1, 9), (-1, 0), (1, 20), (0, 29)]
    q, w, cache, bt, rreq, rlen = _build([30, 20], 2, rows, 4, False, torch.float32, device, gen)
    calls = []
    real = indexer_topk._row_groups
    monkeypatch.setattr(indexer_topk, "_row_groups", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(indexer_topk, "_ROW_PREP", indexer_topk.SameTensorsCache())
    kw = dict(max_logits_bytes=4 * 32 * 4)  # chunks of 4 rows: two chunks
    first = indexer_topk.indexer_topk(q, w, cache, bt, rreq, rlen, 8, 4, False, **kw)
    assert len(calls) == 2
    second = indexer_topk.indexer_topk(q * 2, w, cache, bt, rreq, rlen, 8, 4, False, **kw)  # next layer
    assert len(calls) == 2
    ref = attention_ref.indexer_topk_paged(q * 2, w, cache, bt, rreq, rlen, 8, 4, False)
    assert torch.equal(second.cpu(), ref.cpu())
    shorter = rlen.clone()
    shorter[0] = 5  # the next forward: new objects
    third = indexer_topk.indexer_topk(q, w, cache, bt, rreq.clone(), shorter, 8, 4, False, **kw)
    assert len(calls) == 4
    assert int((third[0] >= 0).sum()) == 5 and torch.equal(third[1:].cpu(), first[1:].cpu())


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("fp8,q_dtype", [(True, torch.bfloat16), (False, torch.bfloat16),
                                         (True, torch.float8_e4m3fn)])  # fmt: skip
def test_gpu_indexer_topk_real_shapes(fp8, q_dtype):
    gen = torch.Generator().manual_seed(21)
    block_size, heads, topk = 64, 64, 2048
    lens_req = [4096, 65536, 1000, 2049, 16384]
    rows = []
    rows += [(0, n) for n in (1, 2047, 2048, 2049, 3000, 4096, 4095)]
    rows += [(1, n) for n in (65536, 65000, 40000, 2048, 8192)]
    rows += [(-1, 0), (2, 1000), (2, 999), (3, 2049), (3, 2048)]
    rows += [(4, 16384 - i * 37) for i in range(40)]  # a prefill chunk of one request
    rows += [(0, 100), (4, 0)]
    args = _build(lens_req, heads, rows, block_size, fp8, q_dtype, "cuda", gen)
    out = indexer_topk.indexer_topk(*args, topk, block_size, fp8)
    torch.cuda.synchronize()
    differ = _check_topk(out, *args, topk, block_size, fp8)
    assert differ <= len(rows) // 4


@pytest.mark.gpu
def test_gpu_indexer_topk_chunked_rows():
    """Many rows with a small logits budget: several row chunks, same result."""
    gen = torch.Generator().manual_seed(22)
    block_size, heads, topk = 64, 64, 2048
    rows = [(0, 8192 - i) for i in range(300)] + [(1, 5000 - 3 * i) for i in range(100)]
    args = _build([8192, 5000], heads, rows, block_size, True, torch.bfloat16, "cuda", gen)
    out_a = indexer_topk.indexer_topk(*args, topk, block_size, True)
    out_b = indexer_topk.indexer_topk(*args, topk, block_size, True, max_logits_bytes=1 << 22)
    assert torch.equal(out_a, out_b)
    _check_topk(out_a[::37], *[a[::37] if a.shape[0] == len(rows) else a for a in args], topk,
                block_size, True)  # fmt: skip
