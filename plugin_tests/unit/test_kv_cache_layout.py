"""Byte layouts of the FP8 caches, decoded from raw bytes independently of torch's fp8."""

import struct

import pytest
import torch

from vllm_cp_nsa.kernels import kv_cache_ref as ref
from vllm_cp_nsa.nsa_attention import build_forward_metadata, select_topk_positions, NsaCaches
from vllm_cp_nsa.split_plan import RoundRobinSplit
from vllm_cp_nsa.kernels.dispatch import get_ops


def e4m3(byte: int) -> float:
    """Decode one float8_e4m3fn byte by hand (bias 7, no infinities)."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp, man = (byte >> 3) & 0xF, byte & 0x7
    if exp == 0:
        return sign * man / 8 * 2.0**-6
    return sign * (1 + man / 8) * 2.0 ** (exp - 7)


def test_fp8_ds_mla_known_values_decode_from_raw_bytes():
    kv_c = torch.zeros(1, 512)
    kv_c[0, :128] = 56.0                 # amax 56 -> scale 56/448 = 2^-3 exactly -> 448 = 0x7E
    kv_c[0, 128:256] = 1.0               # amax 1 -> 1/448 rounded up to 2^-8 -> 256 = 0x78
    kv_c[0, 256:384] = 0.0               # amax 0 -> floor 1e-4 rounded up to 2^-13
    kv_c[0, 384:512] = torch.linspace(-3.5, 3.5, 128)  # amax 3.5 -> 2^-7; -3.5 -> -448 = 0xFE
    k_pe = torch.tensor([[1.5, -2.0] * 32])
    cache = torch.zeros(2, 4, 656, dtype=torch.uint8)
    ref.write_latent_cache(cache, kv_c, k_pe, torch.tensor([5]), "fp8_ds_mla")
    raw = bytes(cache.view(-1, 656)[5].tolist())
    assert len(raw) == ref.FP8_DS_MLA_ROW_BYTES == 656
    scales = struct.unpack("<4f", raw[512:528])
    assert scales == (2.0**-3, 2.0**-8, 2.0**-13, 2.0**-7)
    assert raw[0] == 0x7E and e4m3(raw[0]) * scales[0] == 56.0
    assert raw[128] == 0x78 and e4m3(raw[128]) * scales[1] == 1.0
    assert set(raw[256:384]) == {0}
    assert raw[384] == 0xFE and e4m3(raw[384]) * scales[3] == -3.5
    rope = [struct.unpack("<f", b"\x00\x00" + raw[528 + 2 * i : 530 + 2 * i])[0] for i in range(64)]
    assert rope == [1.5, -2.0] * 32          # bf16, unquantized
    # Every other slot is untouched.
    assert int(cache.view(-1, 656)[torch.arange(8) != 5].count_nonzero()) == 0


def test_fp8_ds_mla_round_trip_error_bounds():
    gen = torch.Generator().manual_seed(0)
    kv_c = torch.randn(300, 512, generator=gen) * torch.rand(300, 1, generator=gen) * 10
    k_pe = torch.randn(300, 64, generator=gen).to(torch.bfloat16).float()
    rows = ref.quantize_fp8_ds_mla(kv_c, k_pe)
    back = ref.dequantize_fp8_ds_mla(rows)
    scales = rows[:, 512:528].contiguous().view(torch.float32).repeat_interleave(128, dim=1)
    err = (back[:, :512] - kv_c).abs()
    normal = kv_c.abs() >= scales * 2.0**-6    # representable as a normal e4m3 value
    assert bool((err[normal] <= kv_c.abs()[normal] * 2.0**-3).all())
    assert bool((err[~normal] <= scales[~normal] * 2.0**-9).all())   # subnormal step
    assert torch.equal(back[:, 512:], k_pe)                            # rope exact
    assert float(err[normal].div(kv_c.abs()[normal]).max()) <= 2.0**-4  # e4m3: 3 mantissa bits
    # Scales are powers of two covering the tile's amax.
    tile_scales = rows[:, 512:528].contiguous().view(torch.float32)
    assert torch.equal(torch.exp2(torch.log2(tile_scales).round()), tile_scales)
    assert bool((kv_c.abs().view(300, 4, 128).amax(-1) <= tile_scales * 448).all())


def test_indexer_fp8_block_layout_values_then_scales():
    block_size = 4
    cache = torch.zeros(3, block_size * 132, dtype=torch.uint8)
    k = torch.zeros(2, 128)
    k[0, :] = 56.0        # scale 2^-3, bytes 0x7E
    k[1, :] = -1.0        # scale 2^-8, bytes 0xF8
    ref.write_indexer_cache(cache, k, torch.tensor([1 * block_size + 3, 2 * block_size + 0]), block_size, True)
    block1, block2 = bytes(cache[1].tolist()), bytes(cache[2].tolist())
    assert set(block1[3 * 128 : 4 * 128]) == {0x7E} and set(block1[: 3 * 128]) == {0}
    assert struct.unpack("<f", block1[block_size * 128 + 3 * 4 : block_size * 128 + 4 * 4])[0] == 2.0**-3
    assert set(block2[:128]) == {0xF8}
    assert struct.unpack("<f", block2[block_size * 128 : block_size * 128 + 4])[0] == 2.0**-8
    assert int(cache[0].count_nonzero()) == 0
    got = ref.gather_indexer_keys(cache, torch.tensor([7, 8]), block_size, True)
    assert torch.equal(got, k)


def test_indexer_fp8_round_trip():
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(64, 128, generator=gen) * 3
    cache = torch.zeros(4, 16 * 132, dtype=torch.uint8)
    slots = torch.randperm(64, generator=gen)
    ref.write_indexer_cache(cache, k, slots, 16, True)
    back = ref.gather_indexer_keys(cache, slots, 16, True)
    rel = (back - k).abs() / k.abs().amax(-1, keepdim=True)
    assert float(rel.max()) <= 2.0**-4


@pytest.mark.parametrize("cp_rank", [0, 1, 2])
def test_padding_rule_per_row_arrays(cp_rank):
    """T % N != 0: per-row arrays have the rank's padded row count; padded rows get
    kv length 0 and top-k rows of -1, and never appear in the write slots."""
    query_lens = [5, 3, 6]                 # T = 14, N = 3 -> 5 rows per rank, ranks 2 has a pad
    block_size = 16
    block_table = torch.arange(3, dtype=torch.int32)[:, None]
    slots = torch.cat([r * block_size + torch.arange(q) for r, q in enumerate(query_lens)])
    meta = build_forward_metadata(query_lens, slots, block_table, block_size, 3, cp_rank,
                                  RoundRobinSplit(), 0, 1, "cpu")
    rows = meta.plan.rows_per_rank
    assert rows == 5 and meta.local_req.shape == (rows,) and meta.slot_mapping.shape == (14,)
    pad = meta.plan.local_padding_mask
    assert int(pad.sum()) == (1 if cp_rank == 2 else 0)
    assert bool((meta.local_req[pad] == -1).all())
    caches = NsaCaches(
        latent=torch.zeros(3, block_size, 656, dtype=torch.uint8),
        index=torch.zeros(3, block_size * 132, dtype=torch.uint8),
        kv_cache_dtype="fp8_ds_mla", index_fp8=True,
    )
    positions = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5])
    local_pos = meta.plan.take_local(positions)
    topk = select_topk_positions(torch.randn(rows, 2, 128), torch.rand(rows, 2), local_pos, meta, caches, 4,
                             get_ops("torch"))
    assert topk.shape == (rows, 4)
    assert bool((topk[pad] == -1).all())
    assert bool((topk[~pad] >= 0).any(1).all())


@pytest.mark.parametrize("query_lens,sliced", [([5, 3, 6], True), ([1, 1, 1], False)])
def test_prefill_batches_keep_only_the_block_table_columns_they_need(query_lens, sliced):
    """With max_seq_len a batch with a prefill piece narrows the block table to
    ceil(max_seq_len / block_size) columns (the indexer's work follows the batch); a
    decode batch keeps every column (graphs captured on it must fit later batches). The
    top-k picks are the same either way."""
    block_size, context = 4, [7, 2, 30]  # request 2 is the longest: 30 + 6 tokens
    seq_lens = [c + q for c, q in zip(context, query_lens)]
    gen = torch.Generator().manual_seed(len(query_lens))
    block_table = torch.randperm(60, generator=gen)[:48].view(3, 16).int()  # room for 64 tokens
    slots = torch.arange(sum(query_lens))
    kwargs = dict(block_size=block_size, cp_size=2, cp_rank=1, strategy=RoundRobinSplit(),
                  min_tokens_for_cp=0, max_decode_query_len=1, device="cpu")  # fmt: skip
    full = build_forward_metadata(query_lens, slots, block_table, **kwargs)
    narrow = build_forward_metadata(query_lens, slots, block_table, max_seq_len=max(seq_lens), **kwargs)
    assert full.block_table.shape == (3, 16)
    assert narrow.block_table.shape == ((3, 9) if sliced else (3, 16))  # ceil(36 / 4) = 9
    assert torch.equal(narrow.block_table, block_table[:, : narrow.block_table.shape[1]])
    caches = NsaCaches(latent=torch.zeros(60, block_size, 576), index=torch.randn(60, block_size, 128),
                       kv_cache_dtype="auto", index_fp8=False)  # fmt: skip
    positions = torch.cat([c + torch.arange(q) for c, q in zip(context, query_lens)])
    local_pos = full.plan.take_local(positions)
    rows = full.plan.rows_per_rank
    q, w = torch.randn(rows, 2, 128, generator=gen), torch.rand(rows, 2, generator=gen)
    picks = [select_topk_positions(q, w, local_pos, meta, caches, 8, get_ops("torch")) for meta in (full, narrow)]
    assert torch.equal(picks[0], picks[1]) and bool((picks[0] >= 0).any())
