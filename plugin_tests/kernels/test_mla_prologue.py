"""kernels/mla_prologue.py: the layer's norms and ropes in two launches, Triton vs the torch
reference vs the rule written out here with plain float math.

CPU: the Triton interpreter. GPU (``-m gpu``): against the path it replaces, vLLM's RMSNorm,
LayerNorm and rotary kernel, then the indexer's own fp8 quantization of the query.
"""

from __future__ import annotations

import math

import pytest
import torch

from kernels import mla_prologue as mp  # noqa: E402  (conftest set TRITON_INTERPRET)
from kernels.mla_prologue import Norm, Rope

Q_RANK, KV_RANK, PE, KEY, INDEX_HEADS = 1536, 512, 64, 128, 8
NOPE, HEADS = 128, 4


def _table(dtype=torch.bfloat16) -> torch.Tensor:
    """A [4096, 64] cos / sin table (cos first, then sin), YaRN-like magnitudes."""
    freqs = torch.outer(torch.arange(4096).float(), 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64)))
    return (torch.cat([freqs.cos(), freqs.sin()], dim=-1) * 1.1).to(dtype)


def _latent_inputs(rows: int, gen, dtype=torch.bfloat16):
    """Strided slices of the fused q_a / kv_a output [rows, 1536 + 512 + 64] and of the indexer's
    wk + weights_proj output [rows, 128 + 8], as the model hands them; the norms' parameters."""
    qkv = (torch.randn(rows, Q_RANK + KV_RANK + PE, generator=gen) * 3 + 0.5).to(dtype)
    key_w = (torch.randn(rows, KEY + INDEX_HEADS, generator=gen) * 3 + 0.5).to(dtype)
    q_c, kv_c, k_pe = qkv.split([Q_RANK, KV_RANK, PE], dim=-1)
    norms = (Norm((torch.rand(Q_RANK, generator=gen) + 0.5).to(dtype), None, 1e-6),
             Norm((torch.rand(KV_RANK, generator=gen) + 0.5).to(dtype), None, 1e-6),
             Norm(torch.rand(KEY, generator=gen) + 0.5, torch.randn(KEY, generator=gen) * 0.1, 1e-6))  # fmt: skip
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    return (q_c, kv_c, k_pe, key_w[:, :KEY], key_w[:, KEY:], positions) + norms


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two bf16 tensors in bf16 steps at their magnitude."""
    a, b = a.float(), b.float()
    step = torch.maximum(a.abs(), b.abs()).clamp(min=2.0**-126).log2().floor().exp2() * 2.0**-7
    return float(((a - b).abs() / step).max())


def _steps_at(a: torch.Tensor, b: torch.Tensor, size: torch.Tensor) -> float:
    """Largest difference of a and b in bf16 steps at the magnitudes ``size``."""
    step = size.float().clamp(min=2.0**-126).log2().floor().exp2() * 2.0**-7
    return float(((a.float() - b.float()).abs() / step).max())


def _pair_columns(rope_dim: int, neox: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns a rope rotates together: halves (neox) or neighbours (interleaved)."""
    pair = torch.arange(rope_dim // 2)
    return (pair, pair + rope_dim // 2) if neox else (2 * pair, 2 * pair + 1)


def _bf(v: float) -> float:
    return torch.tensor(v).to(torch.bfloat16).float().item()


def _f32(v: float) -> float:
    return torch.tensor(v, dtype=torch.float64).float().item()


def _rope_rule(vals: list[float], table_row: list[float], rope_dim: int, neox: bool) -> list[float]:
    """vLLM 0.34's rotary kernel on one row of bf16 values, in Python floats: the pair's sum in
    fp32 (the bf16 products are exact in Python's doubles and in fp32), then rounded to bf16."""
    out = list(vals)
    half = rope_dim // 2
    for i in range(half):
        j, k = (i, i + half) if neox else (2 * i, 2 * i + 1)
        c, s = _bf(table_row[i]), _bf(table_row[half + i])
        out[j] = _bf(_f32(vals[j] * c - vals[k] * s))
        out[k] = _bf(_f32(vals[k] * c + vals[j] * s))
    return out


@pytest.mark.parametrize("key_neox", [True, False], ids=["key-neox", "key-interleaved"])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_latent_prologue_equals_reference_and_the_rule(key_neox, rows, device):
    gen = torch.Generator().manual_seed(rows + key_neox)
    q_c, kv_c, k_pe, key, head_w, positions, q_norm, kv_norm, key_norm = _latent_inputs(rows, gen)
    mla_rope, key_rope = Rope(_table(), PE, False), Rope(_table(), PE, key_neox)
    scale = torch.tensor([INDEX_HEADS**-0.5 * KEY**-0.5])
    want = mp.latent_prologue_ref(q_c, kv_c, k_pe, key, head_w, scale, positions, q_norm, kv_norm, key_norm, mla_rope,
                                  key_rope)  # fmt: skip

    def dev(t):
        return t.to(device)

    got = mp.latent_prologue(dev(q_c), dev(kv_c), dev(k_pe), dev(key), dev(head_w), dev(scale), dev(positions),
                             *(Norm(dev(n.weight), None if n.bias is None else dev(n.bias), n.eps)
                               for n in (q_norm, kv_norm, key_norm)),
                             Rope(dev(mla_rope.cos_sin), PE, False), Rope(dev(key_rope.cos_sin), PE, key_neox),
                             use_triton=True)  # fmt: skip
    for g, w, src in zip(got, want, (q_c, kv_c, k_pe, key)):
        assert g.dtype == src.dtype and g.shape == src.shape and g.is_contiguous()
        assert _ulps(g.cpu(), w) <= 1  # the norms' fp32 reduction order
    assert torch.equal(got[2].cpu(), want[2])  # k_pe: no reduction, bit-exact
    assert got[4].dtype == torch.float32 and got[4].shape == head_w.shape and torch.equal(got[4].cpu(), want[4])
    assert want[4][-1, -1].item() == head_w[-1, -1].item() * scale.item()  # fp32 product of a bf16 and an fp32
    # the rule, for a few rows, in plain Python floats
    for m in range(min(rows, 2)):
        pos = int(positions[m])
        vals = q_c[m].float().tolist()
        rstd = 1 / math.sqrt(sum(v * v for v in vals) / Q_RANK + 1e-6)
        rule = [_bf(_bf(v * rstd) * w) for v, w in zip(vals, q_norm.weight.float().tolist())]
        assert _ulps(torch.tensor(rule).bfloat16(), want[0][m]) <= 1
        table_row = _table()[pos].float().tolist()
        assert want[2][m].float().tolist() == _rope_rule(k_pe[m].float().tolist(), table_row, PE, False)
        vals = key[m].float().tolist()
        mean = sum(vals) / KEY
        var = sum((v - mean) ** 2 for v in vals) / KEY
        normed = [_bf((v - mean) / math.sqrt(var + 1e-6) * w + b)
                  for v, w, b in zip(vals, key_norm.weight.tolist(), key_norm.bias.tolist())]  # fmt: skip
        assert _ulps(torch.tensor(_rope_rule(normed, table_row, PE, key_neox)).bfloat16(), want[3][m]) <= 1
        assert _ulps(torch.tensor(normed[PE:]).bfloat16(), want[3][m, PE:]) <= 1  # unroped dims: the norm


@pytest.mark.parametrize("kv_cache_dtype,index_fp8", [("auto", False), ("fp8_ds_mla", True), ("auto", True)])
@pytest.mark.parametrize("rows,tokens", [(1, 1), (9, 6)])
def test_latent_prologue_writes_the_tokens_as_the_cache_writes_do(kv_cache_dtype, index_fp8, rows, tokens, device):
    """With ``write`` the same launch also puts the first ``tokens`` rows (an unsplit batch's
    tokens; later rows: graph padding) into both caches: byte for byte what
    ``write_token_caches`` writes from its outputs (a negative slot skipped, every other slot
    untouched), the reference likewise; the outputs are those without ``write``."""
    from kernels import kv_cache

    gen = torch.Generator().manual_seed(rows * 10 + tokens + index_fp8)
    q_c, kv_c, k_pe, key, head_w, positions, q_norm, kv_norm, key_norm = _latent_inputs(rows, gen)
    ropes = Rope(_table(), PE, False), Rope(_table(), PE, True)
    scale = torch.tensor([0.125])
    block_size, blocks = 16, 3
    fp8_latent = kv_cache_dtype == "fp8_ds_mla"
    latent_shape = (blocks, block_size, 656 if fp8_latent else 576)
    index_shape = (blocks, block_size * 132) if index_fp8 else (blocks, block_size, 128)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    if tokens > 1:
        slots[1] = -1  # a token of the batch not written

    def caches(dev):
        """Both caches filled with a pattern, so untouched bytes show."""
        latent = (torch.arange(math.prod(latent_shape)) % 251).view(latent_shape)
        index = (torch.arange(math.prod(index_shape)) % 241).view(index_shape)
        return (latent.to(torch.uint8 if fp8_latent else torch.bfloat16).to(dev),
                index.to(torch.uint8 if index_fp8 else torch.bfloat16).to(dev))  # fmt: skip

    def dev(t):
        return t.to(device)

    norms = [Norm(dev(n.weight), None if n.bias is None else dev(n.bias), n.eps) for n in (q_norm, kv_norm, key_norm)]
    inputs = [dev(t) for t in (q_c, kv_c, k_pe, key, head_w, scale, positions)]
    dev_ropes = Rope(dev(ropes[0].cos_sin), PE, False), Rope(dev(ropes[1].cos_sin), PE, True)
    plain = mp.latent_prologue(*inputs, *norms, *dev_ropes, use_triton=True)
    latent, index = caches(device)
    got = mp.latent_prologue(*inputs, *norms, *dev_ropes, use_triton=True,
                             write=mp.TokenCacheWrite(latent, kv_cache_dtype, index, index_fp8, dev(slots), block_size))
    want_latent, want_index = caches(device)  # the separate launch, from the outputs
    kv_cache.write_token_caches(want_latent, plain[1][:tokens], plain[2][:tokens], kv_cache_dtype, want_index,
                                plain[3][:tokens], index_fp8, dev(slots), block_size)  # fmt: skip
    ref_out = mp.latent_prologue_ref(q_c, kv_c, k_pe, key, head_w, scale, positions, q_norm, kv_norm, key_norm, *ropes)
    ref_latent, ref_index = caches("cpu")  # the reference writes what the separate launch writes from its outputs
    mp.latent_prologue_ref(q_c, kv_c, k_pe, key, head_w, scale, positions, q_norm, kv_norm, key_norm, *ropes,
                           mp.TokenCacheWrite(ref_latent, kv_cache_dtype, ref_index, index_fp8, slots, block_size))
    sep_latent, sep_index = caches(device)
    kv_cache.write_token_caches(sep_latent, dev(ref_out[1][:tokens]), dev(ref_out[2][:tokens]), kv_cache_dtype,
                                sep_index, dev(ref_out[3][:tokens]), index_fp8, dev(slots), block_size)  # fmt: skip
    for g, w in zip(got, plain):
        assert torch.equal(g, w)
    before_latent, before_index = caches("cpu")
    for cache, want, ref, sep, before in ((latent, want_latent, ref_latent, sep_latent, before_latent),
                                          (index, want_index, ref_index, sep_index, before_index)):  # fmt: skip
        as_bytes = [t.cpu().contiguous().view(torch.uint8) for t in (cache, want, ref, sep, before)]
        assert torch.equal(as_bytes[0], as_bytes[1])  # the kernel's writes = the separate launch's
        assert torch.equal(as_bytes[2], as_bytes[3])  # the reference's = the separate launch's on its outputs
        assert not torch.equal(as_bytes[0], as_bytes[4])  # something was written


@pytest.mark.parametrize("key_neox", [True, False], ids=["key-neox", "key-interleaved"])
@pytest.mark.parametrize("rows,heads", [(1, 4), (5, 20)])
def test_query_rope_equals_reference_and_the_rule(key_neox, rows, heads, device):
    """In place on the projections' views; nothing outside the rope dims moves; bit-exact (no reduction)."""
    gen = torch.Generator().manual_seed(rows * heads + key_neox)
    q = (torch.randn(rows, heads, NOPE + PE, generator=gen) * 2).bfloat16()
    index_q = (torch.randn(rows, INDEX_HEADS, KEY, generator=gen) * 2).bfloat16()
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    mla_rope, key_rope = Rope(_table(), PE, False), Rope(_table(), PE, key_neox)
    want_q, want_iq = q.clone(), index_q.clone()
    mp.query_rope_ref(want_q[..., NOPE:], want_iq, positions, mla_rope, key_rope)
    got_q, got_iq = q.clone().to(device), index_q.clone().to(device)
    latent = torch.full((rows, heads, 512 + PE), float("nan"), dtype=q.dtype, device=device)  # the latent query
    mp.query_rope(got_q[..., NOPE:], got_iq, positions.to(device), Rope(mla_rope.cos_sin.to(device), PE, False),
                  Rope(key_rope.cos_sin.to(device), PE, key_neox), latent[..., 512:], use_triton=True)  # fmt: skip
    assert torch.equal(got_q.cpu(), want_q) and torch.equal(got_iq.cpu(), want_iq)
    assert torch.equal(latent[..., 512:].cpu(), want_q[..., NOPE:]) and latent[..., :512].isnan().all()
    assert torch.equal(want_q[..., :NOPE], q[..., :NOPE]) and torch.equal(want_iq[..., PE:], index_q[..., PE:])
    assert not torch.equal(want_q[..., NOPE:], q[..., NOPE:])
    table_row = _table()[int(positions[-1])].float().tolist()
    for h in (0, heads - 1):
        assert want_q[-1, h, NOPE:].float().tolist() == _rope_rule(q[-1, h, NOPE:].float().tolist(), table_row, PE, False)
    rule = _rope_rule(index_q[-1, 3].float().tolist(), table_row, PE, key_neox)
    assert want_iq[-1, 3].float().tolist() == rule


@pytest.mark.parametrize("key_neox", [True, False], ids=["key-neox", "key-interleaved"])
@pytest.mark.parametrize("rows,index_heads,out_heads", [(1, 8, 32), (6, 32, 32), (3, 20, 64)])
def test_query_rope_quantizes_the_indexer_query(key_neox, rows, index_heads, out_heads, device):
    """With ``quantized`` the same pass writes the roped indexer query as fp8 MQA logits take it:
    the bytes and folded weights of kv_cache_ref.quantize_indexer_queries on the roped query
    (and of the indexer's own Triton quantization, kernels/indexer_q_quant.py), padding heads
    zero with weight zero; the bf16 ropes unchanged by it; and for one head the rule in plain
    floats (a power-of-two scale >= amax / 448, values / scale within fp8's half step)."""
    from kernels.indexer_q_quant import quantize_indexer_queries
    from kernels.kv_cache_ref import QuantizedIndexerQuery

    gen = torch.Generator().manual_seed(rows * index_heads + key_neox)
    q = (torch.randn(rows, HEADS, NOPE + PE, generator=gen) * 2).bfloat16()
    index_q = (torch.randn(rows, index_heads, KEY, generator=gen) * torch.rand(1, index_heads, 1, generator=gen)
               * 8).bfloat16()  # fmt: skip
    head_w = torch.randn(rows, index_heads, generator=gen) * 0.1
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    mla_rope, key_rope = Rope(_table(), PE, False), Rope(_table(), PE, key_neox)
    want_q, want_iq = q.clone(), index_q.clone()
    mp.query_rope_ref(want_q[..., NOPE:], want_iq, positions, mla_rope, key_rope)
    want_q8, want_w8 = quantize_indexer_queries(want_iq, head_w, out_heads, use_triton=False)
    unfused_q8, unfused_w8 = quantize_indexer_queries(want_iq.to(device), head_w.to(device), out_heads,
                                                      use_triton=True)  # the indexer's own pass  # fmt: skip
    assert torch.equal(unfused_q8.cpu().view(torch.uint8), want_q8.view(torch.uint8))
    assert torch.equal(unfused_w8.cpu(), want_w8)

    got_q, got_iq = q.clone().to(device), index_q.clone().to(device)
    quantized = QuantizedIndexerQuery.empty(rows, out_heads, device)
    quantized.q.view(torch.uint8).fill_(0x7F)  # NaN bytes: every byte must be written
    quantized.weights.fill_(float("nan"))
    mp.query_rope(got_q[..., NOPE:], got_iq, positions.to(device), Rope(mla_rope.cos_sin.to(device), PE, False),
                  Rope(key_rope.cos_sin.to(device), PE, key_neox), head_weights=head_w.to(device),
                  quantized=quantized, use_triton=True)  # fmt: skip
    assert torch.equal(got_q.cpu(), want_q) and torch.equal(got_iq.cpu(), want_iq)
    assert torch.equal(quantized.q.cpu().view(torch.uint8), want_q8.view(torch.uint8))
    assert torch.equal(quantized.weights.cpu(), want_w8)
    assert not quantized.q.view(torch.uint8)[:, index_heads:].any() and not quantized.weights[:, index_heads:].any()
    ref = QuantizedIndexerQuery.empty(rows, out_heads, "cpu")
    mp.query_rope(q.clone()[..., NOPE:], index_q.clone(), positions, mla_rope, key_rope, head_weights=head_w,
                  quantized=ref)  # CPU tensors: the reference  # fmt: skip
    assert torch.equal(ref.q.view(torch.uint8), want_q8.view(torch.uint8)) and torch.equal(ref.weights, want_w8)
    # the rule for the last row's last head
    vals = want_iq[-1, -1].float().tolist()
    amax = max(abs(v) for v in vals)
    scale = 2.0 ** math.ceil(math.log2(max(amax, 1e-4) / 448))
    got_scale = want_w8[-1, index_heads - 1].item() / head_w[-1, -1].item()
    assert got_scale == scale and amax / scale <= 448
    for v, b in zip(vals, want_q8[-1, index_heads - 1].float().tolist()):
        assert abs(v / scale - b) <= max(abs(v / scale), 2.0**-6) * 2.0**-4 + 2.0**-10  # e4m3: 3 mantissa bits


def test_shape_errors_and_cpu_dispatch():
    gen = torch.Generator().manual_seed(3)
    q_c, kv_c, k_pe, key, head_w, positions, q_norm, kv_norm, key_norm = _latent_inputs(4, gen)
    ropes = Rope(_table(), PE, False), Rope(_table(), PE, True)
    scale = torch.tensor([0.5])
    got = mp.latent_prologue(q_c, kv_c, k_pe, key, head_w, scale, positions, q_norm, kv_norm, key_norm, *ropes)
    want = mp.latent_prologue_ref(q_c, kv_c, k_pe, key, head_w, scale, positions, q_norm, kv_norm, key_norm, *ropes)
    assert all(torch.equal(g, w) for g, w in zip(got, want))  # CPU: the reference
    empty = mp.latent_prologue(q_c[:0], kv_c[:0], k_pe[:0], key[:0], head_w[:0], scale, positions[:0], q_norm, kv_norm,
                               key_norm, *ropes, use_triton=True)  # no rows (a DP rank's dummy batch): no launch  # fmt: skip
    assert [t.shape for t in empty] == [(0, Q_RANK), (0, KV_RANK), (0, PE), (0, KEY), (0, INDEX_HEADS)]
    mp.query_rope(torch.zeros(0, 2, PE).bfloat16(), torch.zeros(0, 2, KEY).bfloat16(), positions[:0], *ropes,
                  use_triton=True)  # fmt: skip
    with pytest.raises(ValueError, match="latent_prologue"):
        mp.latent_prologue(q_c, kv_c, k_pe, key, head_w, scale, positions[:3], q_norm, kv_norm, key_norm, *ropes)
    with pytest.raises(ValueError, match="LayerNorm"):
        mp.latent_prologue(q_c, kv_c, k_pe, key, head_w, scale, positions, q_norm, kv_norm,
                           Norm(key_norm.weight, None, 1e-6), *ropes)  # fmt: skip
    with pytest.raises(ValueError, match="rope"):
        mp.latent_prologue(q_c, kv_c, k_pe, key, head_w, scale, positions, q_norm, kv_norm, key_norm,
                           Rope(_table(), 32, False), ropes[1])  # fmt: skip
    cache_write = mp.TokenCacheWrite(torch.zeros(2, 16, 576).bfloat16(), "auto", torch.zeros(2, 16, 128).bfloat16(),
                                     False, torch.arange(4, dtype=torch.int32), 16)  # fmt: skip
    with pytest.raises(ValueError, match="int64"):  # the persistent slot buffer is int64: no cast launch
        mp.latent_prologue(q_c, kv_c, k_pe, key, head_w, scale, positions, q_norm, kv_norm, key_norm, *ropes,
                           write=cache_write)  # fmt: skip
    with pytest.raises(ValueError, match="int64"):  # more tokens than rows
        mp.latent_prologue(q_c, kv_c, k_pe, key, head_w, scale, positions, q_norm, kv_norm, key_norm, *ropes,
                           write=cache_write._replace(slot_mapping=torch.arange(5)))  # fmt: skip
    with pytest.raises(ValueError, match="fp8_ds_mla cache"):  # the cache's own checks (kv_cache.py)
        mp.latent_prologue(q_c, kv_c, k_pe, key, head_w, scale, positions, q_norm, kv_norm, key_norm, *ropes,
                           write=cache_write._replace(slot_mapping=torch.arange(4), kv_cache_dtype="fp8_ds_mla"))
    with pytest.raises(ValueError, match="1-element fp32"):
        mp.latent_prologue(q_c, kv_c, k_pe, key, head_w, scale.bfloat16(), positions, q_norm, kv_norm, key_norm, *ropes)
    with pytest.raises(ValueError, match="query_rope"):
        mp.query_rope(torch.zeros(4, 2, PE).bfloat16(), torch.zeros(4, 2, KEY).bfloat16(), positions,
                      Rope(_table(), 62, False), ropes[1])  # fmt: skip
    from kernels.kv_cache_ref import QuantizedIndexerQuery

    q_pe, index_q = torch.zeros(4, 2, PE).bfloat16(), torch.zeros(4, 2, KEY).bfloat16()
    with pytest.raises(ValueError, match="head_weights"):  # quantizing needs the heads' weights
        mp.query_rope(q_pe, index_q, positions, *ropes, quantized=QuantizedIndexerQuery.empty(4, 32, "cpu"))
    with pytest.raises(ValueError, match="quantized needs"):  # fewer output heads than the query's
        mp.query_rope(q_pe, index_q, positions, *ropes, head_weights=torch.zeros(4, 2),
                      quantized=QuantizedIndexerQuery.empty(4, 1, "cpu"))  # fmt: skip
    with pytest.raises(ValueError, match="one dtype"):
        mp.query_rope(q_pe, index_q.float(), positions, *ropes)
    with pytest.raises(ValueError, match="q_pe_copy"):
        mp.query_rope(torch.zeros(4, 2, PE).bfloat16(), torch.zeros(4, 2, KEY).bfloat16(), positions, *ropes,
                      torch.zeros(4, 3, PE).bfloat16())  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("key_neox", [True, False], ids=["key-neox", "key-interleaved"])
def test_gpu_equals_vllms_norms_and_rotary_kernel(key_neox):
    """The path it replaces on CUDA: vLLM's RMSNorms on the fused projection's strided slices,
    its LayerNorm (fp32 weights) on the key slice, its rotary kernel in place on k_pe / the key,
    then on q_pe / the indexer query. The same arithmetic (vLLM 0.34's rotary kernel: fp32,
    rounded once; the kernel's per-product rounding before it left k_pe 1 step apart in 34 % of
    the elements on an H200, 2026-12-05), so the ropes of the queries and k_pe are bit-exact;
    the norms' row statistics come out of a different fp32 reduction, which moves
    a rounding of the normed row by one step now and then (under 1 % of the elements). Through
    the RMSNorm's weight that step can land as two steps of a product in a lower binade (seen on
    an H200, 2026-12-05); where outputs cancel (the key's rope, its LayerNorm's bias) it is
    bounded by the steps of the terms summed, not of the output (a torch emulation with the
    row statistics moved by 1e-6: 2 steps on the RMSNorms, up to 64 steps of the roped key's
    outputs but 2 of its pairs, 6 of the LayerNorm's outputs but 1 of its terms)."""
    from vllm._custom_ops import rotary_embedding
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import LayerNorm, RMSNorm

    gen = torch.Generator().manual_seed(11)
    q_c, kv_c, k_pe, key, head_w, positions, q_norm, kv_norm, key_norm = (
        t.cuda() if isinstance(t, torch.Tensor) else t for t in _latent_inputs(4096, gen))
    scale = torch.tensor([INDEX_HEADS**-0.5 * KEY**-0.5], device="cuda")
    with set_current_vllm_config(VllmConfig()):  # a CustomOp picks its forward from the config
        q_layer, kv_layer = (RMSNorm(Q_RANK, eps=1e-6, dtype=torch.bfloat16).cuda(),
                             RMSNorm(KV_RANK, eps=1e-6, dtype=torch.bfloat16).cuda())
        key_layer = LayerNorm(KEY, eps=1e-6, dtype=torch.float32).cuda()
    for layer, norm in ((q_layer, q_norm), (kv_layer, kv_norm), (key_layer, key_norm)):
        layer.weight.data = norm.weight.cuda().to(layer.weight.dtype)
        if norm.bias is not None:
            layer.bias.data = norm.bias.cuda()
    table = _table().cuda()
    want_q, want_kv, want_key = q_layer(q_c), kv_layer(kv_c), key_layer(key)
    key_normed = want_key.clone()  # before the rope
    want_pe = k_pe.clone()
    rotary_embedding(positions, want_key[:, None, :PE], None, PE, table, key_neox)
    rotary_embedding(positions, want_pe[:, None], None, PE, table, False)
    got = mp.latent_prologue(q_c, kv_c, k_pe, key, head_w, scale, positions, Norm(q_layer.weight, None, 1e-6),
                             Norm(kv_layer.weight, None, 1e-6), Norm(key_layer.weight, key_layer.bias, 1e-6),
                             Rope(table, PE, False), Rope(table, PE, key_neox))  # fmt: skip
    for name, g, w in zip(("q", "kv", "k_pe", "key"), got, (want_q, want_kv, want_pe, want_key)):
        assert (g != w).float().mean().item() < 0.01, name
    assert _ulps(got[0], want_q) <= 2 and _ulps(got[1], want_kv) <= 2
    assert torch.equal(got[2], want_pe)
    # the LayerNorm alone (rounded once on both sides): its bias can cancel the normed term, so
    # one flipped rounding is bounded by the terms' magnitude, not the output's
    centered = key.float() - key.float().mean(-1, keepdim=True)
    terms = (centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + 1e-6) * key_layer.weight.detach()).abs()
    assert _steps_at(got[3][:, PE:], want_key[:, PE:], (terms + key_layer.bias.detach().abs())[:, PE:]) <= 1
    pair_first, pair_second = _pair_columns(PE, key_neox)
    pair_size = torch.maximum(key_normed[:, pair_first].abs(), key_normed[:, pair_second].abs()).float() * 1.1
    for cols in (pair_first, pair_second):  # 1.1: the table's largest |cos| / |sin|
        assert _steps_at(got[3][:, cols], want_key[:, cols], pair_size) <= 3
    assert torch.equal(got[4], head_w * scale)  # the model's unfused weights: bf16 times the fp32 scale
    q = (torch.randn(4096, 16, NOPE + PE, generator=gen) * 2).bfloat16().cuda()
    index_q = (torch.randn(4096, INDEX_HEADS, KEY, generator=gen) * 2).bfloat16().cuda()
    want_q, want_iq = q.clone(), index_q.clone()
    rotary_embedding(positions, want_q[..., NOPE:], None, PE, table, False)
    rotary_embedding(positions, want_iq[..., :PE], None, PE, table, key_neox)
    from kernels.indexer_q_quant import quantize_indexer_queries
    from kernels.kv_cache_ref import QuantizedIndexerQuery

    head_w = torch.randn(4096, INDEX_HEADS, generator=gen).cuda()
    quantized = QuantizedIndexerQuery.empty(4096, 32, "cuda")
    mp.query_rope(q[..., NOPE:], index_q, positions, Rope(table, PE, False), Rope(table, PE, key_neox),
                  head_weights=head_w, quantized=quantized)  # fmt: skip
    assert torch.equal(q, want_q) and torch.equal(index_q, want_iq)
    want_q8, want_w8 = quantize_indexer_queries(want_iq, head_w, 32)  # the indexer's own pass on vLLM's rope
    assert torch.equal(quantized.q.view(torch.uint8), want_q8.view(torch.uint8))
    assert torch.equal(quantized.weights, want_w8)
