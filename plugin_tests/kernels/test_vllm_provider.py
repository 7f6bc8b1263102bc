"""Kernel provider ``vllm`` (adapter/vllm_kernels.py): vLLM's FA3 (bf16 cache on Hopper) and
FlashMLA sparse, Triton indexer.

CPU: it is registered, refuses CPU devices (``auto`` stays on torch, ``kernels='vllm'``
fails naming the device), hands every op FlashMLA cannot take (CPU tensors among them) and
the cache writes to the Triton provider (results checked against the torch references), and
its ``indexer_topk`` picks the best keys by scores the test computes itself (fp8 and bf16
indexer caches). With a torch stand-in for FA3's ``flash_attn_varlen_func`` (FA3's contract
and its argument checks), the bf16-cache ops reach FA3 where it serves the GPU and equal the
torch reference, and stay on FlashMLA where it does not.

GPU (``-m gpu``, vLLM GPU build on the path): both sparse MLA ops against the torch
reference on fresh random inputs, with the Triton fallback disabled so FlashMLA / FA3 must
serve them (the bf16 cache on each of the two kernels); ``indexer_topk`` against the test's
own scores at the model's shapes; the fallbacks where these kernels do not apply; and
CUDA-graph captures of the decode ops (FlashMLA, FA3 with new indices replayed, and the
Triton indexer).
"""

from __future__ import annotations

import pytest
import torch

from vllm_cp_nsa import extensions
from vllm_cp_nsa.adapter import vllm_kernels
from vllm_cp_nsa.adapter.vllm_kernels import VllmKernelOps
from vllm_cp_nsa.config import CpNsaConfigError
from vllm_cp_nsa.kernels import attention_ref, dispatch, kv_cache_ref
from vllm_cp_nsa.kernels.slots import positions_to_slots_ref
from vllm_cp_nsa.kernels import indexer_topk, kv_cache, sparse_mla  # noqa: F401  (import under the interpreter)

SCALE = 576**-0.5


pytestmark = pytest.mark.usefixtures("fresh_registry")


# --------------------------------------------------------------------------- CPU
def test_registry_lists_the_vllm_provider():
    providers = extensions.kernel_providers()
    assert {"torch", "triton", "vllm"} <= set(providers)
    vllm_ops = providers["vllm"]
    assert isinstance(vllm_ops, VllmKernelOps) and isinstance(vllm_ops, dispatch.NsaOps)
    assert vllm_ops.priority > providers["triton"].priority > providers["torch"].priority
    assert vllm_ops.supports_cuda_graphs


def test_vllm_provider_refuses_cpu():
    ops = VllmKernelOps()
    assert not ops.supports("cpu", torch.bfloat16, 128)
    assert not ops.supports(torch.device("cpu"))
    assert not ops.supports(None, None, 0)
    assert not ops.supports("cuda", torch.float32, 128)  # FlashMLA is bf16-only
    assert not ops.supports("cuda", torch.bfloat16, 256)


def test_kernels_vllm_on_cpu_is_a_clear_error():
    with pytest.raises(CpNsaConfigError, match=r"kernel provider 'vllm' does not support device=cpu"):
        extensions.resolve_kernel_provider("vllm", torch.device("cpu"), torch.bfloat16, 128)


def test_auto_on_cpu_still_picks_torch():
    assert extensions.resolve_kernel_provider("auto", torch.device("cpu"), torch.bfloat16, 128).name == "torch"
    assert extensions.resolve_kernel_provider("auto", torch.device("cpu"), torch.float32, 4).name == "torch"


class _RecordingTriton:
    """The Triton provider, noting which ops reached it."""

    def __init__(self, device):
        self.ops, self.calls = dispatch.get_ops("triton", device), []

    def __getattr__(self, name):
        self.calls.append(name)
        return getattr(self.ops, name)


def test_ops_the_vllm_kernels_cannot_take_go_to_triton(device, monkeypatch):
    """Each sparse MLA op on inputs FlashMLA does not take (CPU tensors; on a GPU block
    size 8 and 32 slots), and each cache write, reaches the Triton provider, and gives the
    torch references' results."""
    triton_ops = _RecordingTriton(device)
    monkeypatch.setattr(vllm_kernels, "_triton", lambda: triton_ops)
    gen = torch.Generator().manual_seed(2)
    vops = VllmKernelOps()
    block_size, num_blocks, tokens = 8, 4, 24
    latent = torch.zeros(num_blocks, block_size, 656, dtype=torch.uint8, device=device)
    kv_c = torch.randn(tokens, 512, generator=gen).to(torch.bfloat16).to(device)
    k_pe = torch.randn(tokens, 64, generator=gen).to(torch.bfloat16).to(device)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(device)
    vops.write_latent_cache(latent, kv_c, k_pe, slots, "fp8_ds_mla")
    expected = torch.zeros_like(latent)
    kv_cache_ref.write_latent_cache(expected, kv_c, k_pe, slots, "fp8_ds_mla")
    assert torch.equal(latent, expected)
    q = torch.randn(2, 3, 4, 576, generator=gen).to(torch.bfloat16).to(device)
    idx = slots[torch.randint(0, tokens, (2, 3, 10), generator=gen).to(device)].int()
    ref_out, ref_lse = attention_ref.sparse_mla(q.flatten(0, 1), latent, idx.flatten(0, 1), SCALE, 512,
                                                "fp8_ds_mla")  # fmt: skip
    out, lse = vops.sparse_mla_decode(q, latent, idx, SCALE, 512, "fp8_ds_mla")
    assert _rel(out.flatten(0, 1), ref_out) <= 1e-2 and (lse.flatten(0, 1) - ref_lse).abs().max() <= 1e-3
    out, lse = vops.sparse_mla_prefill(q[0], latent, idx[0], SCALE, 512, "fp8_ds_mla")
    assert _rel(out, ref_out[:3]) <= 1e-2 and (lse - ref_lse[:3]).abs().max() <= 1e-3
    keys = torch.randn(tokens, 128, generator=gen).to(torch.bfloat16).to(device)
    for fp8 in (True, False):
        shape = (num_blocks, block_size * 132) if fp8 else (num_blocks, block_size, 128)
        dtype = torch.uint8 if fp8 else torch.bfloat16
        index = torch.zeros(shape, dtype=dtype, device=device)
        expected = torch.zeros_like(index)
        vops.write_indexer_cache(index, keys, slots, block_size, fp8)
        kv_cache_ref.write_indexer_cache(expected, keys, slots, block_size, fp8)
        assert torch.equal(index, expected)
    both = torch.zeros_like(latent), torch.zeros(num_blocks, block_size * 132, dtype=torch.uint8, device=device)
    vops.write_token_caches(both[0], kv_c, k_pe, "fp8_ds_mla", both[1], keys, True, slots, block_size)
    assert torch.equal(both[0], latent)
    want_index = torch.zeros_like(both[1])
    kv_cache_ref.write_indexer_cache(want_index, keys, slots, block_size, True)
    assert torch.equal(both[1], want_index)
    assert triton_ops.calls == ["write_latent_cache", "sparse_mla_decode", "sparse_mla_prefill",
                                "write_indexer_cache", "write_indexer_cache", "write_token_caches"]  # fmt: skip


def test_fp8_cache_off_whole_pages_falls_back_with_a_warning(monkeypatch, caplog):
    """FlashMLA's fp8 kernel pages the cache in 64 slots; a cache whose slot count is not a
    multiple of 64 goes to Triton, and the log says so once (it was silent, and cost a run
    its FlashMLA prefill on 2x H200)."""
    monkeypatch.setattr(vllm_kernels, "_flashmla_common_applies", lambda q, kv_cache, d_v: True)
    vllm_kernels._warn_unpaged_fp8_cache.cache_clear()
    q = torch.zeros(2, 4, 576, dtype=torch.bfloat16)
    paged = torch.zeros(3, 64, 656, dtype=torch.uint8)
    unpaged = torch.zeros(13, 16, 656, dtype=torch.uint8)
    with caplog.at_level("WARNING", logger="vllm.cp_nsa"):
        assert vllm_kernels._fp8_kernel_applies(q, paged, 512, "fp8_ds_mla")
        assert not caplog.records
        assert not vllm_kernels._fp8_kernel_applies(q, unpaged, 512, "fp8_ds_mla")
        assert not vllm_kernels._fp8_kernel_applies(q, unpaged, 512, "fp8_ds_mla")
        assert not vllm_kernels._fp8_kernel_applies(q, paged, 512, "auto")
    assert [r.getMessage() for r in caplog.records] == [
        "vllm_cp_nsa: the fp8_ds_mla cache holds 208 slots, not a multiple of FlashMLA's 64-slot "
        "pages: sparse attention runs on the slower Triton kernels (use a --block-size that is a "
        "multiple of 64)"
    ]


def _fa3_stand_in(calls):
    """A torch stand-in for vLLM's ``flash_attn_varlen_func`` on FA3's paged varlen ``q_v``
    path: it asserts what FA3 checks (``mha_fwd``, hopper/flash_api.cpp) and computes what
    FA3 computes, row ``m`` one query whose keys are ``block_table[m, :seqused_k[m]]`` (1-slot
    pages; what follows is never read). Rows without keys get 0 / -inf, as FA3 writes them
    (its epilogue's ``store_zero``; the split combine skips -inf splits); the GPU test checks
    the real kernel does."""

    def flash_attn_varlen_func(*, q, k, v, q_v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k, block_table,
                               softmax_scale, causal, return_softmax_lse, fa_version):  # fmt: skip
        rows, heads = q.shape[:2]
        assert fa_version == 3 and return_softmax_lse and max_seqlen_q == 1
        assert q.dtype == k.dtype == v.dtype == q_v.dtype == torch.bfloat16
        assert all(t.stride(-1) == 1 for t in (q, k, v, q_v)), "FA3 takes only a contiguous last dim"
        assert q.shape == (rows, heads, 64) and q_v.shape == (rows, heads, 512)
        assert k.shape == (k.shape[0], 1, 1, 64) and v.shape == (k.shape[0], 1, 1, 512)
        assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.is_contiguous()
        assert torch.equal(cu_seqlens_q, torch.arange(rows + 1, dtype=torch.int32))
        assert seqused_k.dtype == torch.int32 and seqused_k.is_contiguous() and seqused_k.shape == (rows,)
        assert block_table.dtype == torch.int32 and block_table.stride(-1) == 1
        assert block_table.shape == (rows, max_seqlen_k)
        calls.append(rows)
        out = torch.zeros((rows, heads, 512), dtype=q.dtype)
        lse = torch.full((heads, rows), float("-inf"))
        for m in range(rows):
            pages = block_table[m, : int(seqused_k[m])].long()
            assert bool(((pages >= 0) & (pages < k.shape[0])).all()), f"row {m}: a page outside the cache"
            if pages.numel():
                keys, values = k[pages, 0, 0].float(), v[pages, 0, 0].float()
                scores = (q[m].float() @ keys.T + q_v[m].float() @ values.T) * softmax_scale  # [H, n]
                lse[:, m] = scores.logsumexp(-1)
                out[m] = (scores.softmax(-1) @ values).to(out.dtype)
        return out, lse

    return flash_attn_varlen_func


def _must_not_run(name):
    def kernel(*args):
        raise AssertionError(f"{name} served a bf16-cache op")

    return kernel


def test_bf16_cache_ops_run_on_fa3_where_it_serves(monkeypatch):
    """Where FA3 serves the GPU, both bf16-cache ops call it (as vLLM's FlashAttnMLASparse
    backend does; here the torch stand-in) and equal the torch reference: rows with -1 and
    slots outside the cache in the middle, rows of one key, rows with none (out 0, lse -inf),
    and an odd head count (FA3 takes any)."""
    monkeypatch.setattr(vllm_kernels, "_flashmla_common_applies", lambda q, kv_cache, d_v: True)
    monkeypatch.setattr(vllm_kernels, "_fa3_supported", lambda: True)
    calls = []
    monkeypatch.setattr(vllm_kernels, "_flash_attn_varlen_func", lambda: _fa3_stand_in(calls))
    monkeypatch.setattr(vllm_kernels, "_flashmla_bf16", _must_not_run("FlashMLA"))
    gen = torch.Generator().manual_seed(11)
    num_slots, topk, heads = 96, 24, 3
    cache = torch.empty(6, 16, 576, dtype=torch.bfloat16)
    kv_c, k_pe = torch.randn(num_slots, 512, generator=gen), torch.randn(num_slots, 64, generator=gen)
    kv_cache_ref.write_latent_cache(cache, kv_c, k_pe, torch.arange(num_slots), "auto")
    idx = torch.randint(0, num_slots, (8, topk), generator=gen, dtype=torch.int32)
    idx[1, 3:20:4] = -1
    idx[2] = -1  # no keys
    idx[3, ::3] = num_slots + 4  # outside the cache: skipped like -1
    idx[4, torch.randperm(topk, generator=gen)[:20]] = -1
    idx[5, 1:] = -1  # one key, first
    idx[6] = torch.where(torch.arange(topk) % 2 == 0, -1, num_slots)  # none inside the cache
    idx[7, :-1] = -1  # one key, last
    q = torch.randn(8, heads, 576, generator=gen).to(torch.bfloat16)
    ref_out, ref_lse = attention_ref.sparse_mla(q, cache, idx, SCALE, 512, "auto")

    out, lse = VllmKernelOps().sparse_mla_prefill(q, cache, idx, SCALE, 512, "auto")
    _check_attention(out, lse, ref_out, ref_lse)
    assert bool((out[[2, 6]] == 0).all()) and bool((lse[[2, 6]] == float("-inf")).all())
    out, lse = VllmKernelOps().sparse_mla_decode(q.view(2, 4, heads, 576), cache, idx.view(2, 4, topk), SCALE, 512,
                                                 "auto")  # fmt: skip
    assert out.shape == (2, 4, heads, 512) and lse.shape == (2, 4, heads)
    _check_attention(out.flatten(0, 1), lse.flatten(0, 1), ref_out, ref_lse)
    assert calls == [8, 8]


def _dense_inputs(lens, heads, gen, device="cpu"):
    n = sum(lens)
    q, k = (torch.randn(n, heads, 192, generator=gen).to(torch.bfloat16).to(device) for _ in range(2))
    v = torch.randn(n, heads, 128, generator=gen).to(torch.bfloat16).to(device)
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(device)
    return q, k, v, cu


def test_dense_prefill_runs_on_fa3_where_it_serves(monkeypatch):
    """Whole prompts' dense causal prefill goes to FA3's varlen kernel with vLLM's MLA-prefill
    arguments (here a torch stand-in that checks them and computes causal attention per
    sequence), and equals the SDPA reference; without FA3 the reference serves."""
    calls = []

    def varlen(*, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, fa_version):
        assert fa_version == 3 and causal and cu_seqlens_q is cu_seqlens_k and max_seqlen_q == max_seqlen_k
        assert cu_seqlens_q.dtype == torch.int32 and max_seqlen_q == int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        calls.append(cu_seqlens_q.tolist())
        out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype)
        for lo, hi in zip(cu_seqlens_q.tolist()[:-1], cu_seqlens_q.tolist()[1:]):
            scores = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), k[lo:hi].float()) * softmax_scale
            scores = scores.masked_fill(~torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril(), float("-inf"))
            out[lo:hi] = torch.einsum("hqk,khv->qhv", scores.softmax(-1), v[lo:hi].float()).to(q.dtype)
        return out

    gen = torch.Generator().manual_seed(12)
    q, k, v, cu = _dense_inputs([7, 1, 30], 3, gen)
    ref = attention_ref.dense_causal_attention(q, k, v, cu, 0.1)
    monkeypatch.setattr(vllm_kernels, "_fa3_supported", lambda: True)
    monkeypatch.setattr(vllm_kernels, "_flash_attn_varlen_func", lambda: varlen)
    assert not vllm_kernels._fa3_dense_applies(q, k, v)  # CPU tensors
    with monkeypatch.context() as cuda:  # the inputs as if on the GPU, for the routing only
        cuda.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
        assert vllm_kernels._fa3_dense_applies(q, k, v)
        assert not vllm_kernels._fa3_dense_applies(q.float(), k.float(), v.float())
        assert not vllm_kernels._fa3_dense_applies(q, k, torch.cat([v, v, v], -1))  # v wider than q
        # head dims FA3 refuses (a small model's 96 / 64: "Q/K headdim in (128, 192] and V in (96, 128]")
        assert not vllm_kernels._fa3_dense_applies(q[..., :96], k[..., :96], v[..., :64])
        out = VllmKernelOps().dense_causal_attention(q, k, v, cu, 30, 0.1)
    assert calls == [[0, 7, 8, 38]]
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    monkeypatch.setattr(vllm_kernels, "_fa3_supported", lambda: False)
    assert torch.equal(VllmKernelOps().dense_causal_attention(q, k, v, cu, 30, 0.1), ref) and len(calls) == 1


@pytest.mark.parametrize("qk_dim,v_dim,takes", [
    (192, 128, True), (128, 128, True), (256, 256, True), (64, 512, True),  # V3.2, equal dims, the MLA decode shape
    (96, 64, False), (192, 96, False), (256, 128, False), (320, 320, False), (128, 64, False),
])
def test_fa3_head_dims_follow_its_own_check(qk_dim, v_dim, takes):
    """What FA3's forward accepts (flash_api.cpp): a dense prefill on other dims (the tiny
    test model's) goes to the Triton / torch path instead of failing in FA3."""
    assert vllm_kernels._fa3_takes_head_dims(qk_dim, v_dim) is takes


def test_bf16_cache_ops_stay_on_flashmla_without_fa3(monkeypatch):
    monkeypatch.setattr(vllm_kernels, "_flashmla_common_applies", lambda q, kv_cache, d_v: True)
    monkeypatch.setattr(vllm_kernels, "_fa3_supported", lambda: False)
    monkeypatch.setattr(vllm_kernels, "_fa3_sparse", _must_not_run("FA3"))
    served = []

    def flashmla(q, kv_cache, indices, sm_scale, paging=None):
        assert paging is None  # slots, not positions
        served.append(q.shape[0])
        return attention_ref.sparse_mla(q, kv_cache, indices, sm_scale, 512, "auto")

    monkeypatch.setattr(vllm_kernels, "_flashmla_bf16", flashmla)
    cache = torch.zeros(2, 16, 576, dtype=torch.bfloat16)
    q = torch.zeros(6, 4, 576, dtype=torch.bfloat16)
    idx = torch.zeros(6, 8, dtype=torch.int32)
    VllmKernelOps().sparse_mla_prefill(q, cache, idx, SCALE, 512, "auto")
    VllmKernelOps().sparse_mla_decode(q.view(3, 2, 4, 576), cache, idx.view(3, 2, 8), SCALE, 512, "auto")
    assert served == [6, 6]


def test_startup_line_names_the_bf16_cache_kernel(monkeypatch):
    monkeypatch.setattr(vllm_kernels, "_fa3_supported", lambda: True)
    detail = VllmKernelOps().startup_detail()
    assert "FA3's paged varlen kernel over each row's valid slots for the bf16 cache" in detail
    assert "sparse attention: FlashMLA for the fp8_ds_mla cache" in detail
    monkeypatch.setattr(vllm_kernels, "_fa3_supported", lambda: False)
    detail = VllmKernelOps().startup_detail()
    assert "FlashMLA's sparse prefill kernel for the bf16 cache" in detail and "FA3" not in detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="the probe's answer on a GPU depends on it")
def test_fa3_probe_says_no_without_cuda():
    assert vllm_kernels._fa3_supported() is False


def test_cu_seqlens_q_grows_and_keeps_what_graphs_hold(monkeypatch):
    """FA3's ``cu_seqlens_q`` is a view of one arange per device, replaced by a longer one
    only when too short; the old ones stay alive (a captured graph holds their address). A
    capture that finds it too short gets an arange of its own and leaves the cache as it was
    (its values exist only once the graph replays)."""
    monkeypatch.setattr(vllm_kernels, "_CU_SEQLENS_Q", {})
    cpu = torch.device("cpu")
    first = vllm_kernels._cu_seqlens_q(5, cpu, False)
    assert torch.equal(first, torch.arange(6, dtype=torch.int32))
    again = vllm_kernels._cu_seqlens_q(3, cpu, True)
    assert torch.equal(again, torch.arange(4, dtype=torch.int32)) and again.data_ptr() == first.data_ptr()
    captured = vllm_kernels._cu_seqlens_q(9, cpu, True)
    assert torch.equal(captured, torch.arange(10, dtype=torch.int32)) and len(vllm_kernels._CU_SEQLENS_Q[cpu]) == 1
    longer = vllm_kernels._cu_seqlens_q(40, cpu, False)
    assert torch.equal(longer, torch.arange(41, dtype=torch.int32)) and longer.data_ptr() != first.data_ptr()
    held = vllm_kernels._CU_SEQLENS_Q[cpu]
    assert len(held) == 2 and held[0].data_ptr() == first.data_ptr()
    assert vllm_kernels._cu_seqlens_q(12, cpu, False).data_ptr() == longer.data_ptr()


def _positions(rows, topk, gen):
    """[M, topk] int32 request-local positions: each row's distinct random picks of its
    request's ``kv_len`` keys, -1 for the rest (shuffled in); rows of request -1 get none."""
    pos = torch.full((len(rows), topk), -1, dtype=torch.int32)
    for m, (req, kv_len) in enumerate(rows):
        if req >= 0:
            n = min(kv_len, topk)
            pos[m, :n] = torch.randperm(kv_len, generator=gen)[:n].int()
            pos[m] = pos[m][torch.randperm(topk, generator=gen)]
    return pos


def test_fp8_prefill_reads_the_batchs_blocks_through_a_bf16_workspace(monkeypatch):
    """With an fp8_ds_mla cache, prefill rows attend over the batch's blocks dequantized into
    a bf16 workspace (row = request * width + position) with FlashMLA's bf16 kernel: here a
    torch stand-in for that kernel, so the mapping is checked on CPU against the torch
    provider over slots of the fp8 cache (same values: an fp8 value times a power-of-two
    scale is exact in bf16)."""
    monkeypatch.setattr(vllm_kernels, "_flashmla_common_applies", lambda q, kv_cache, d_v: True)
    seen = {}

    def bf16_kernel(q, kv, indices, sm_scale):
        seen["kv"] = (kv.dtype, tuple(kv.shape))
        return attention_ref.sparse_mla(q, kv, indices, sm_scale, 512, "auto")

    monkeypatch.setattr(vllm_kernels, "_flashmla_bf16", bf16_kernel)
    gen = torch.Generator().manual_seed(4)
    block_size, topk = 8, 24
    lens_req = [40, 13, 30]
    table = _paged_requests(lens_req, block_size, 16, gen)
    cache = torch.zeros(16, block_size, 656, dtype=torch.uint8)
    kv_cache_ref.write_latent_cache(cache, torch.randn(128, 512, generator=gen), torch.randn(128, 64, generator=gen),
                                    torch.arange(128), "fp8_ds_mla")  # fmt: skip
    rows = [(0, 40), (2, 30), (-1, 0), (1, 13), (1, 1), (0, topk + 3), (2, 0)]
    positions = _positions(rows, topk, gen)
    row_req = torch.tensor([r for r, _ in rows])
    q = torch.randn(len(rows), 4, 576, generator=gen).to(torch.bfloat16)

    ops = VllmKernelOps()
    out, lse = ops.sparse_mla_prefill_positions(q, cache, positions, row_req, table, block_size, SCALE, 512,
                                                "fp8_ds_mla")  # fmt: skip
    assert seen["kv"] == (torch.bfloat16, (3 * table.shape[1] * block_size, 576))
    slots = attention_ref.slots_from_positions(table[row_req.clamp(min=0)], positions, block_size)
    slots = torch.where((row_req >= 0)[:, None], slots, -1)
    ref_out, ref_lse = dispatch.get_ops("torch").sparse_mla_prefill(q, cache, slots, SCALE, 512, "fp8_ds_mla")
    assert _rel(out, ref_out) <= 1e-5
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and bool(torch.isinf(lse[2]).all())
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max().item() <= 1e-5
    # Past the workspace cap, or with a bf16 cache, the op keeps the slot path.
    assert vllm_kernels._workspace_applies(q, cache, table, block_size, 512, "fp8_ds_mla")
    monkeypatch.setattr(vllm_kernels, "MAX_WORKSPACE_BYTES", table.numel() * block_size * 1152 - 1)
    assert not vllm_kernels._workspace_applies(q, cache, table, block_size, 512, "fp8_ds_mla")
    assert not vllm_kernels._workspace_applies(q, cache, table, block_size, 512, "auto")


def test_fp8_prefill_past_the_row_limit_runs_in_pieces(monkeypatch):
    """FlashMLA's fp8 kernel takes int32 strides, so prefill rows go to it at most
    ``FP8_KERNEL_MAX_ROWS`` per call (a 64K-row batch failed in one). A torch stand-in for
    that kernel (its [B, S, H, 576] contract, the row limit asserted) on CPU: the pieces
    put together equal the torch provider over all rows, padding rows included."""
    monkeypatch.setattr(vllm_kernels, "_flashmla_common_applies", lambda q, kv_cache, d_v: True)
    monkeypatch.setattr(vllm_kernels, "FP8_KERNEL_MAX_ROWS", 5)
    calls = []

    def fp8_kernel(q, kv_cache, indices, sm_scale):
        assert q.dim() == 4 and q.shape[0] == 1 and indices.shape == (*q.shape[:2], indices.shape[-1])
        assert q.shape[1] <= 5, "more rows than the kernel's limit in one call"
        calls.append(q.shape[1])
        out, lse = attention_ref.sparse_mla(q[0], kv_cache, indices[0], SCALE, 512, "fp8_ds_mla")
        return out[None], lse[None]

    monkeypatch.setattr(vllm_kernels, "_flashmla_fp8", fp8_kernel)
    gen = torch.Generator().manual_seed(9)
    cache = torch.zeros(8, 64, 656, dtype=torch.uint8)
    kv_cache_ref.write_latent_cache(cache, torch.randn(512, 512, generator=gen), torch.randn(512, 64, generator=gen),
                                    torch.arange(512), "fp8_ds_mla")  # fmt: skip
    q = torch.randn(17, 4, 576, generator=gen).to(torch.bfloat16)
    idx = torch.randint(0, 512, (17, 32), generator=gen, dtype=torch.int32)
    idx[3] = -1  # a padding row
    out, lse = VllmKernelOps().sparse_mla_prefill(q, cache, idx, SCALE, 512, "fp8_ds_mla")
    assert calls == [5, 5, 5, 2]
    ref_out, ref_lse = dispatch.get_ops("torch").sparse_mla_prefill(q, cache, idx, SCALE, 512, "fp8_ds_mla")
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype and lse.shape == ref_lse.shape
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    calls.clear()
    VllmKernelOps().sparse_mla_prefill(q[:5], cache, idx[:5], SCALE, 512, "fp8_ds_mla")
    assert calls == [5]  # within the limit: one call, as before


def test_fp8_decode_layers_of_one_forward_share_flashmlas_schedule(monkeypatch):
    """vLLM's own backend builds FlashMLA's tile schedule once per batch; the plugin's layers
    get one per forward through ``forward_state`` (the metadata kernel ran once per layer:
    24 against vLLM's 8 in the 1204j fp8 decode profile). FlashMLA stand-ins on CPU record
    what each call gets: one schedule (and placeholder tensors) per forward and shape, none
    shared across forwards or without a state."""
    import vllm.v1.attention.ops.flashmla as flashmla

    built, used = [], []

    def get_mla_metadata():
        built.append(object())
        return built[-1], None

    def flash_mla_with_kvcache(*, q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                               is_fp8_kvcache, indices, softmax_scale):  # fmt: skip
        assert block_table.shape == (q.shape[0], 1) and cache_seqlens.tolist() == [k_cache.shape[0] * 64] * q.shape[0]
        used.append((tile_scheduler_metadata, block_table, cache_seqlens))
        return q.new_zeros(*q.shape[:3], head_dim_v), q.new_zeros(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float)

    monkeypatch.setattr(flashmla, "get_mla_metadata", get_mla_metadata)
    monkeypatch.setattr(flashmla, "flash_mla_with_kvcache", flash_mla_with_kvcache)
    monkeypatch.setattr(vllm_kernels, "_kernel_indices", lambda indices, num_slots, paging=None: indices.int())
    monkeypatch.setattr(vllm_kernels, "_empty_rows", lambda: type("Rows", (), {
        "zero_rows_without_keys": staticmethod(lambda out, lse, idx: (out, lse))}))
    cache = torch.zeros(4, 64, 656, dtype=torch.uint8)
    q = torch.zeros(3, 1, 64, 576, dtype=torch.bfloat16)
    idx = torch.zeros(3, 1, 2048, dtype=torch.int32)

    forward = {}
    for _ in range(3):  # three layers of one forward
        vllm_kernels._flashmla_fp8(q, cache, idx, SCALE, forward)
    assert len(built) == 1 and all(call == used[0] for call in used)
    vllm_kernels._flashmla_fp8(q[:2], cache, idx[:2], SCALE, forward)  # another shape: its own
    assert len(built) == 2 and used[-1][0] is built[-1] and len(forward) == 2
    vllm_kernels._flashmla_fp8(q, cache, idx, SCALE, {})  # the next forward
    vllm_kernels._flashmla_fp8(q, cache, idx, SCALE, None)  # no state: nothing kept
    assert len(built) == 4 and used[-1][0] is not used[-2][0] is not used[0][0]


@pytest.mark.parametrize("kv_cache_dtype", ["fp8_ds_mla", "auto"])
def test_decode_from_positions_hands_the_kernels_their_paging(monkeypatch, kv_cache_dtype):
    """Decode rows from request-local positions reach the vLLM kernels (torch stand-ins on CPU)
    as positions + ``Paging`` — no separate positions -> slots pass — and attend to the same
    keys as the slots the rule gives (the torch provider over those slots)."""
    from vllm_cp_nsa.kernels import kernel_indices as ki

    handed = []

    def stand_in(q, kv_cache, indices, sm_scale, *rest):
        paging = rest[-1]
        handed.append(paging)
        assert isinstance(paging, ki.Paging)
        rows_q = q.reshape(-1, *q.shape[-2:])
        num_slots = kv_cache.shape[0] * kv_cache.shape[1]
        slots = ki.kernel_indices_ref(indices.reshape(rows_q.shape[0], -1), num_slots, 1, paging)
        out, lse = attention_ref.sparse_mla(rows_q, kv_cache, slots, sm_scale, 512, kv_cache_dtype)
        return out.view(*q.shape[:-1], 512), lse.view(q.shape[:-1])

    fp8 = kv_cache_dtype == "fp8_ds_mla"
    monkeypatch.setattr(vllm_kernels, "_fp8_kernel_applies", lambda *args: fp8)
    monkeypatch.setattr(vllm_kernels, "_bf16_kernel_applies", lambda *args: not fp8)
    monkeypatch.setattr(vllm_kernels, "_flashmla_fp8", stand_in)
    monkeypatch.setattr(vllm_kernels, "_bf16_cache_kernel", lambda: stand_in)
    gen = torch.Generator().manual_seed(21)
    block_size, num_blocks, topk = 16, 12, 24
    table = _paged_requests([70, 40, 9], block_size, num_blocks, gen)
    kv_c, k_pe = torch.randn(num_blocks * block_size, 512, generator=gen), torch.randn(num_blocks * block_size, 64,
                                                                                      generator=gen)  # fmt: skip
    cache = torch.zeros(num_blocks, block_size, 656 if fp8 else 576, dtype=torch.uint8 if fp8 else torch.bfloat16)
    kv_cache_ref.write_latent_cache(cache, kv_c, k_pe, torch.arange(num_blocks * block_size), kv_cache_dtype)
    positions, row_req = _sparse_positions([(0, 70), (-1, 0), (1, 40), (2, 9), (0, 3), (1, 1)], topk, gen)
    q = torch.randn(3, 2, 4, 576, generator=gen).to(torch.bfloat16)
    out, lse = VllmKernelOps().sparse_mla_decode_positions(q, cache, positions.view(3, 2, topk), row_req, table,
                                                           block_size, SCALE, 512, kv_cache_dtype)  # fmt: skip
    assert len(handed) == 1
    slots = positions_to_slots_ref(positions, row_req, table, block_size)
    want_out, want_lse = dispatch.get_ops("torch").sparse_mla_decode(q, cache, slots.view(3, 2, topk), SCALE, 512,
                                                                      kv_cache_dtype)  # fmt: skip
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


@pytest.mark.parametrize("fp8", [True, False], ids=["fp8_cache", "bf16_cache"])
def test_indexer_topk_picks_the_best_scoring_keys(device, fp8):
    """``indexer_topk`` (the Triton indexer) against scores computed here in float64 from
    the keys as stored: every row gets its ``min(kv_len, topk)`` best keys, best first."""
    gen = torch.Generator().manual_seed(3)
    block_size, topk = 8, 16
    rows = [(0, 40), (0, 39), (-1, 0), (1, 13), (1, 1), (0, topk), (1, 0), (0, topk + 1)]
    q, w, cache, table, rreq, rlen = _indexer_inputs([40, 13], rows, 4, block_size, torch.bfloat16,
                                                     gen, fp8, device)  # fmt: skip
    got = VllmKernelOps().indexer_topk(q, w, cache, table, rreq, rlen, topk, block_size, fp8)
    _check_best_keys(got, q, w, cache, table, rows, topk, block_size, fp8)
    assert bool((got[2] == -1).all()) and bool((got[6] == -1).all())  # no keys


def _stored_keys(cache, table, req, n, block_size, fp8):
    """[n, 128] float64 keys of request ``req`` as the indexer cache holds them: plain rows,
    or (fp8 layout) per block ``block_size`` 128-byte fp8 keys, then their fp32 scales."""
    pos = torch.arange(n)
    blocks, offsets = table[req, pos // block_size].long(), pos % block_size
    if not fp8:
        return cache[blocks, offsets].double()
    raw = cache.view(cache.shape[0], -1)
    values = raw[:, : block_size * 128].view(torch.float8_e4m3fn).view(-1, block_size, 128)
    scales = raw[:, block_size * 128 :].view(torch.float32)
    return values[blocks, offsets].double() * scales[blocks, offsets].double()[:, None]


def _check_best_keys(got, q, w, cache, table, rows, topk, block_size, fp8):
    q, w, cache, table, got = (t.cpu() for t in (q, w, cache, table, got))
    for m, (req, kv_len) in enumerate(rows):
        n = min(max(kv_len, 0), topk) if req >= 0 else 0
        assert bool((got[m, n:] == -1).all()), f"row {m}: padding"
        if n == 0:
            continue
        keys = _stored_keys(cache, table, req, kv_len, block_size, fp8)
        scores = (torch.relu(q[m].double() @ keys.T) * w[m].double()[:, None]).sum(0)  # [kv_len]
        picks = got[m, :n].long()
        assert bool((picks >= 0).all()) and bool((picks < kv_len).all()) and picks.unique().numel() == n
        kth = scores.topk(n).values[-1]
        tol = 1e-3 * scores.abs().max().item() + 1e-9
        assert bool((scores[picks] >= kth - tol).all()), f"row {m}: a pick scores below the k-th best"
        assert bool((scores[picks][1:] <= scores[picks][:-1] + tol).all()), f"row {m}: not best first"


# --------------------------------------------------------------------------- GPU
@pytest.fixture
def vllm_ops():
    pytest.importorskip("vllm.v1.attention.ops.flashmla")
    ops = VllmKernelOps()
    if not ops.supports("cuda", torch.bfloat16, 128):
        pytest.skip("vLLM's FlashMLA sparse kernels are not available on this GPU")
    return ops


@pytest.fixture
def no_triton_fallback(monkeypatch):
    """Make any sparse MLA op (or cache write) that would leave FlashMLA fail loudly;
    ``indexer_topk`` still reaches the Triton provider, where it always runs."""
    triton_ops = dispatch.get_ops("triton", "cuda")

    class IndexerOnly:
        def __init__(self):
            self.indexer_topk = triton_ops.indexer_topk

        def __getattr__(self, name):
            raise AssertionError(f"{name} fell back to the Triton provider")

    indexer_only = IndexerOnly()
    monkeypatch.setattr(vllm_kernels, "_triton", lambda: indexer_only)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def _paged_requests(lens_req, block_size, num_blocks, gen):
    """Block table [R, B] int32 of requests of ``lens_req`` tokens on shuffled blocks."""
    blocks_per_req = [-(-n // block_size) for n in lens_req]
    assert sum(blocks_per_req) <= num_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(lens_req), max(blocks_per_req), dtype=torch.int32)
    used = 0
    for r, nb in enumerate(blocks_per_req):
        table[r, :nb] = perm[used : used + nb].int()
        used += nb
    return table


def _latent_cache(num_blocks, block_size, kv_cache_dtype, gen):
    num_slots = num_blocks * block_size
    kv_c = torch.randn(num_slots, 512, generator=gen)
    k_pe = torch.randn(num_slots, 64, generator=gen)
    if kv_cache_dtype == "fp8_ds_mla":
        cache = torch.empty(num_blocks, block_size, 656, dtype=torch.uint8)
    else:
        cache = torch.empty(num_blocks, block_size, 576, dtype=torch.bfloat16)
    kv_cache_ref.write_latent_cache(cache, kv_c, k_pe, torch.arange(num_slots), kv_cache_dtype)
    return cache.cuda()


def _sparse_rows(table, rows, topk, block_size, num_slots, gen):
    """[M, topk] int32 slots: each row's distinct random positions of its request (-1 rest,
    shuffled in); a request of -1 is a fully padded row."""
    idx = torch.full((len(rows), topk), -1, dtype=torch.int32)
    for m, (req, kv_len) in enumerate(rows):
        if req < 0:
            continue
        n = min(kv_len, topk)
        pos = torch.randperm(kv_len, generator=gen)[:n]
        slots = attention_ref.slots_from_positions(table[req][None], pos[None], block_size)[0]
        idx[m, :n] = slots.int()
        idx[m] = idx[m][torch.randperm(topk, generator=gen)]
    idx[1, ::7] = num_slots + 5  # outside the cache: skipped like -1
    return idx.cuda()


def _sparse_positions(rows, topk, gen):
    """([M, topk] int32 request-local positions, [M] int32 requests): each row's distinct
    random positions of its request, -1 shuffled in; request -1: a padding row (its
    positions must not count)."""
    positions = torch.full((len(rows), topk), -1, dtype=torch.int32)
    for m, (req, kv_len) in enumerate(rows):
        n = min(kv_len, topk)
        if n:
            positions[m, :n] = torch.randperm(kv_len, generator=gen)[:n].int()
        positions[m] = positions[m][torch.randperm(topk, generator=gen)]
    row_req = torch.tensor([req for req, _ in rows], dtype=torch.int32)
    return positions, row_req


def _check_attention(out, lse, ref_out, ref_lse):
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype and lse.shape == ref_lse.shape
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert _rel(out, ref_out) <= 1e-2
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max().item() <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8_ds_mla"])
@pytest.mark.parametrize("heads,topk", [(128, 2048), (8, 100)])
@pytest.mark.parametrize("block_size", [64, 16])
def test_gpu_sparse_mla_matches_reference(vllm_ops, no_triton_fallback, monkeypatch, kv_cache_dtype, heads,
                                          topk, block_size):  # fmt: skip
    gen = torch.Generator().manual_seed(heads + block_size + len(kv_cache_dtype))
    num_blocks = 4096 // block_size
    lens_req = [3000, 700, 90]
    table = _paged_requests(lens_req, block_size, num_blocks, gen)
    cache = _latent_cache(num_blocks, block_size, kv_cache_dtype, gen)
    rows = [(0, 3000), (0, 2999), (-1, 0), (1, 700), (2, 90), (2, 1), (0, 2048), (1, 650)] * 4
    idx = _sparse_rows(table, rows, topk, block_size, num_blocks * block_size, gen)
    q = torch.randn(len(rows), heads, 576, generator=gen).to(torch.bfloat16).cuda()

    out, lse = vllm_ops.sparse_mla_prefill(q, cache, idx, SCALE, 512, kv_cache_dtype)
    ref_out, ref_lse = attention_ref.sparse_mla(q, cache, idx, SCALE, 512, kv_cache_dtype)
    _check_attention(out, lse, ref_out, ref_lse)
    assert bool((out[2] == 0).all()) and bool((lse[2] == float("-inf")).all())  # fully padded row
    if kv_cache_dtype == "fp8_ds_mla":  # the fp8 kernel in pieces of 7 rows (its int32-stride limit)
        limit = vllm_kernels.FP8_KERNEL_MAX_ROWS
        monkeypatch.setattr(vllm_kernels, "FP8_KERNEL_MAX_ROWS", 7)
        _check_attention(*vllm_ops.sparse_mla_prefill(q, cache, idx, SCALE, 512, kv_cache_dtype), ref_out, ref_lse)
        monkeypatch.setattr(vllm_kernels, "FP8_KERNEL_MAX_ROWS", limit)

    batch, s_q = 8, 4  # decode / verify rows
    dec_out, dec_lse = vllm_ops.sparse_mla_decode(
        q.view(batch, s_q, heads, 576), cache, idx.view(batch, s_q, topk), SCALE, 512, kv_cache_dtype
    )
    assert dec_out.shape == (batch, s_q, heads, 512) and dec_lse.shape == (batch, s_q, heads)
    _check_attention(dec_out.flatten(0, 1), dec_lse.flatten(0, 1), ref_out, ref_lse)
    # two layers of one forward (one state): FlashMLA's schedule is built by the first and
    # reused by the second, whose indices differ; each equals its reference
    other_idx = _sparse_rows(table, rows, topk, block_size, num_blocks * block_size, gen)
    other_ref = attention_ref.sparse_mla(q, cache, other_idx, SCALE, 512, kv_cache_dtype)
    state = {}
    for layer_idx, (want_out, want_lse) in ((idx, (ref_out, ref_lse)), (other_idx, other_ref)):
        got_out, got_lse = vllm_ops.sparse_mla_decode(
            q.view(batch, s_q, heads, 576), cache, layer_idx.view(batch, s_q, topk), SCALE, 512, kv_cache_dtype,
            forward_state=state,
        )
        _check_attention(got_out.flatten(0, 1), got_lse.flatten(0, 1), want_out, want_lse)
    assert len(state) == (1 if kv_cache_dtype == "fp8_ds_mla" else 0)
    # decode rows from request-local positions: the kernels' own index pass maps them to slots
    positions, row_req = _sparse_positions(rows, topk, gen)
    slots = positions_to_slots_ref(positions, row_req, table, block_size)
    pos_ref_out, pos_ref_lse = attention_ref.sparse_mla(q, cache, slots.cuda(), SCALE, 512, kv_cache_dtype)
    pos_out, pos_lse = vllm_ops.sparse_mla_decode_positions(
        q.view(batch, s_q, heads, 576), cache, positions.view(batch, s_q, topk).cuda(), row_req.cuda(), table.cuda(),
        block_size, SCALE, 512, kv_cache_dtype,
    )  # fmt: skip
    _check_attention(pos_out.flatten(0, 1), pos_lse.flatten(0, 1), pos_ref_out, pos_ref_lse)


def _record_bf16_kernels(monkeypatch):
    """The names of the bf16-cache kernels (FA3's or FlashMLA's) as they serve, in order."""
    served = []

    def recording(name):
        kernel = getattr(vllm_kernels, name)

        def run(*args):
            served.append(name)
            return kernel(*args)

        return run

    for name in ("_fa3_sparse", "_flashmla_bf16"):
        monkeypatch.setattr(vllm_kernels, name, recording(name))
    return served


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [128, 16])
@pytest.mark.parametrize("bf16_kernel", ["_fa3_sparse", "_flashmla_bf16"])
def test_gpu_bf16_cache_kernels_match_reference(vllm_ops, no_triton_fallback, monkeypatch, bf16_kernel, heads):
    """Each bf16-cache kernel (FA3 where it serves this GPU; FlashMLA, which serves the bf16
    cache elsewhere) on both ops at top-2048: rows of 1 to 2048 valid slots with -1 shuffled
    in, slots outside the cache, rows with no keys."""
    if bf16_kernel == "_fa3_sparse" and not vllm_kernels._fa3_supported():
        pytest.skip("vLLM's FA3 does not serve this GPU")
    monkeypatch.setattr(vllm_kernels, "_fa3_supported", lambda: bf16_kernel == "_fa3_sparse")
    served = _record_bf16_kernels(monkeypatch)
    gen = torch.Generator().manual_seed(heads + len(bf16_kernel))
    block_size, topk = 64, 2048
    num_blocks = 8192 // block_size
    lens_req = [5000, 700, 90, 2048]
    table = _paged_requests(lens_req, block_size, num_blocks, gen)
    cache = _latent_cache(num_blocks, block_size, "auto", gen)
    rows = [(0, 5000), (1, 700), (-1, 0), (2, 90), (2, 1), (3, 2048), (0, 2047), (1, 3)] * 32
    idx = _sparse_rows(table, rows, topk, block_size, num_blocks * block_size, gen)
    q = torch.randn(len(rows), heads, 576, generator=gen).to(torch.bfloat16).cuda()
    ref_out, ref_lse = attention_ref.sparse_mla(q, cache, idx, SCALE, 512, "auto")

    out, lse = vllm_ops.sparse_mla_prefill(q, cache, idx, SCALE, 512, "auto")
    _check_attention(out, lse, ref_out, ref_lse)
    assert bool((out[2::8] == 0).all()) and bool((lse[2::8] == float("-inf")).all())  # no keys
    batch, s_q = 64, 4
    dec_out, dec_lse = vllm_ops.sparse_mla_decode(
        q.view(batch, s_q, heads, 576), cache, idx.view(batch, s_q, topk), SCALE, 512, "auto"
    )
    assert dec_out.shape == (batch, s_q, heads, 512) and dec_lse.shape == (batch, s_q, heads)
    _check_attention(dec_out.flatten(0, 1), dec_lse.flatten(0, 1), ref_out, ref_lse)
    assert served == [bf16_kernel, bf16_kernel]


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [128, 16])
def test_gpu_dense_prefill_matches_reference(vllm_ops, heads):
    """FA3's dense causal prefill (q / k 192, v 128, whole prompts of 1 to 2048 tokens)
    against the SDPA reference."""
    if not vllm_kernels._fa3_supported():
        pytest.skip("vLLM's FA3 does not serve this GPU")
    gen = torch.Generator().manual_seed(heads)
    q, k, v, cu = _dense_inputs([1000, 1, 2048, 37, 513], heads, gen, "cuda")
    scale = 192**-0.5
    out = vllm_ops.dense_causal_attention(q, k, v, cu, 2048, scale)
    ref = attention_ref.dense_causal_attention(q.float(), k.float(), v.float(), cu, scale)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert _rel(out.float(), ref) <= 1e-2


def _capture(step):
    """``step`` warmed up twice on a side stream (JIT, allocator), then captured: (graph, its outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


@pytest.mark.gpu
def test_gpu_fa3_decode_replays_new_indices_in_a_cuda_graph(vllm_ops, no_triton_fallback, monkeypatch):
    """FA3's decode path captures (compaction, counts and ``cu_seqlens_q`` on the device, no
    host read), and a replay after new indices (other valid counts: rows that had no keys get
    some, and the reverse) and new queries are written into the captured buffers equals an
    eager run and the torch reference."""
    if not vllm_kernels._fa3_supported():
        pytest.skip("vLLM's FA3 does not serve this GPU")
    served = _record_bf16_kernels(monkeypatch)
    gen = torch.Generator().manual_seed(12)
    block_size, heads, topk = 64, 128, 2048
    num_blocks = 8192 // block_size
    lens_req = [4000, 2500, 300]
    table = _paged_requests(lens_req, block_size, num_blocks, gen)
    cache = _latent_cache(num_blocks, block_size, "auto", gen)
    rows = [(0, 4000), (1, 2500), (-1, 0), (2, 300), (0, 5), (1, 1), (-1, 0), (2, 299)]
    new_rows = [(-1, 0), (2, 300), (0, 4000), (1, 3), (1, 2500), (-1, 0), (0, 2048), (2, 17)]
    idx = _sparse_rows(table, rows, topk, block_size, num_blocks * block_size, gen).view(4, 2, topk)
    new_idx = _sparse_rows(table, new_rows, topk, block_size, num_blocks * block_size, gen).view(4, 2, topk)
    q = torch.randn(4, 2, heads, 576, generator=gen).to(torch.bfloat16).cuda()

    def step():
        return vllm_ops.sparse_mla_decode(q, cache, idx, SCALE, 512, "auto")

    graph, (out, lse) = _capture(step)
    idx.copy_(new_idx)
    q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype).cuda())
    graph.replay()
    torch.cuda.synchronize()
    eager_out, eager_lse = step()
    assert torch.equal(out, eager_out) and torch.equal(lse, eager_lse)
    ref_out, ref_lse = attention_ref.sparse_mla(q.flatten(0, 1), cache, idx.flatten(0, 1), SCALE, 512, "auto")
    _check_attention(out.flatten(0, 1), lse.flatten(0, 1), ref_out, ref_lse)
    assert bool((lse[0, 0] == float("-inf")).all()) and bool(torch.isfinite(lse[1, 0]).all())  # emptied, filled
    assert set(served) == {"_fa3_sparse"}


@pytest.mark.gpu
@pytest.mark.parametrize("heads,topk,block_size", [(128, 2048, 64), (8, 100, 16)])
def test_gpu_fp8_prefill_positions_matches_reference(vllm_ops, no_triton_fallback, heads, topk, block_size):
    """FlashMLA's bf16 prefill kernel over the dequantized workspace (Triton dequant kernel)
    against the torch reference over the fp8 cache's slots."""
    gen = torch.Generator().manual_seed(heads + topk)
    num_blocks = 4096 // block_size
    lens_req = [3000, 700, 90]
    table = _paged_requests(lens_req, block_size, num_blocks, gen)
    cache = _latent_cache(num_blocks, block_size, "fp8_ds_mla", gen)
    rows = [(0, 3000), (0, 2999), (-1, 0), (1, 700), (2, 90), (2, 1), (0, 2048), (1, 650)] * 4
    positions = _positions(rows, topk, gen)
    row_req = torch.tensor([r for r, _ in rows])
    q = torch.randn(len(rows), heads, 576, generator=gen).to(torch.bfloat16).cuda()
    slots = attention_ref.slots_from_positions(table[row_req.clamp(min=0)], positions, block_size)
    slots = torch.where((row_req >= 0)[:, None], slots, -1).int().cuda()

    out, lse = vllm_ops.sparse_mla_prefill_positions(
        q, cache, positions.cuda(), row_req.cuda(), table.cuda(), block_size, SCALE, 512, "fp8_ds_mla"
    )
    ref_out, ref_lse = attention_ref.sparse_mla(q, cache, slots, SCALE, 512, "fp8_ds_mla")
    _check_attention(out, lse, ref_out, ref_lse)
    assert bool((out[2] == 0).all()) and bool((lse[2] == float("-inf")).all())  # fully padded row


def _indexer_inputs(lens_req, rows, heads, block_size, q_dtype, gen, fp8=True, device="cuda"):
    """(q, weights, indexer cache, block table, row_req, row_len) on ``device``: requests of
    ``lens_req`` random keys on shuffled blocks of an fp8 (``fp8``) or bf16 indexer cache."""
    num_blocks = sum(-(-n // block_size) for n in lens_req) + 5
    table = _paged_requests(lens_req, block_size, num_blocks, gen)
    if fp8:
        cache = torch.zeros(num_blocks, block_size * 132, dtype=torch.uint8)
    else:
        cache = torch.zeros(num_blocks, block_size, 128, dtype=torch.bfloat16)
    for r, n in enumerate(lens_req):
        pos = torch.arange(n)
        slots = attention_ref.slots_from_positions(table[r][None], pos[None], block_size)[0]
        keys = torch.randn(n, 128, generator=gen).to(torch.bfloat16)
        kv_cache_ref.write_indexer_cache(cache, keys, slots, block_size, fp8)
    q = torch.randn(len(rows), heads, 128, generator=gen)
    q = (q * 8).to(q_dtype) if q_dtype == torch.float8_e4m3fn else q.to(q_dtype)
    weights = torch.randn(len(rows), heads, generator=gen) * heads**-0.5
    row_req = torch.tensor([r for r, _ in rows], dtype=torch.int32)
    row_len = torch.tensor([n for _, n in rows], dtype=torch.int64)
    return [t.to(device) for t in (q, weights, cache, table, row_req, row_len)]


@pytest.mark.gpu
@pytest.mark.parametrize("fp8,q_dtype", [(True, torch.bfloat16), (True, torch.float8_e4m3fn),
                                         (False, torch.bfloat16)], ids=["fp8", "fp8_q8", "bf16"])  # fmt: skip
@pytest.mark.parametrize("heads,topk", [(64, 2048), (16, 64)])
@pytest.mark.parametrize("block_size", [64, 32])
def test_gpu_indexer_topk_picks_the_best_scoring_keys(fp8, q_dtype, heads, topk, block_size):
    """At the model's shapes (64 heads, top-2048, 64-token blocks) and smaller ones,
    ``indexer_topk`` against float64 scores of the stored keys computed in the test: rows
    longer and shorter than ``topk``, rows whose kv_len is their request's whole length,
    rows without keys."""
    gen = torch.Generator().manual_seed(heads + topk + block_size)
    lens_req = [5000, 1200, 3000]
    rows = [(0, 5000), (0, 4999), (0, topk), (0, topk + 1), (1, 1200), (1, 1), (-1, 0), (2, 0),
            (2, 3000), (0, topk - 1)] + [(2, 2500 + 17 * i) for i in range(20)]  # fmt: skip
    q, w, cache, table, rreq, rlen = _indexer_inputs(lens_req, rows, heads, block_size, q_dtype,
                                                     gen, fp8)  # fmt: skip
    out = VllmKernelOps().indexer_topk(q, w, cache, table, rreq, rlen, topk, block_size, fp8)
    _check_best_keys(out, q.float(), w, cache, table, rows, topk, block_size, fp8)
    assert bool((out[6] == -1).all()) and bool((out[7] == -1).all())  # padding row, no keys
    assert out[5, 0].item() == 0 and bool((out[5, 1:] == -1).all())


@pytest.mark.gpu
def test_gpu_falls_back_to_triton_where_vllm_kernels_do_not_apply(vllm_ops, monkeypatch):
    """float32 queries, and an fp8_ds_mla cache whose slot count is not a multiple of 64,
    reach the Triton provider and match the torch reference."""
    triton_ops = _RecordingTriton("cuda")
    monkeypatch.setattr(vllm_kernels, "_triton", lambda: triton_ops)
    gen = torch.Generator().manual_seed(7)
    idx = torch.randint(-1, 48, (5, 40), generator=gen, dtype=torch.int32).cuda()
    for q_mla, cache, kv_dtype in (
        (torch.randn(5, 8, 576, generator=gen).cuda(), _latent_cache(3, 16, "auto", gen).float(), "auto"),
        (torch.randn(5, 8, 576, generator=gen).to(torch.bfloat16).cuda(), _latent_cache(3, 16, "fp8_ds_mla", gen),
         "fp8_ds_mla"),
    ):  # fmt: skip
        out, lse = vllm_ops.sparse_mla_prefill(q_mla, cache, idx, SCALE, 512, kv_dtype)
        _check_attention(out, lse, *attention_ref.sparse_mla(q_mla, cache, idx, SCALE, 512, kv_dtype))
    assert triton_ops.calls == ["sparse_mla_prefill", "sparse_mla_prefill"]


@pytest.mark.gpu
def test_gpu_ops_capture_in_a_cuda_graph(vllm_ops, no_triton_fallback):
    """supports_cuda_graphs: the (Triton) indexer and the sparse MLA kernels of both caches
    (bf16: FA3 where it serves the GPU, else FlashMLA; fp8_ds_mla: FlashMLA) capture (no
    host sync) and a replay on new inputs equals an eager run."""
    gen = torch.Generator().manual_seed(8)
    block_size, heads, topk = 64, 128, 2048
    lens_req = [4000, 2500]
    rows = [(0, 4000), (1, 2500), (-1, 0), (0, 100)]
    iq, iw, icache, table, row_req, row_len = _indexer_inputs(lens_req, rows, 64, block_size,
                                                              torch.bfloat16, gen)  # fmt: skip
    num_blocks = icache.shape[0]  # the latent caches share the indexer cache's block table
    caches = {dt: _latent_cache(num_blocks, block_size, dt, gen) for dt in ("auto", "fp8_ds_mla")}
    q = torch.randn(len(rows), 1, heads, 576, generator=gen).to(torch.bfloat16).cuda()
    idx = _sparse_rows(table.cpu(), rows, topk, block_size, num_blocks * block_size, gen)
    idx = idx.view(len(rows), 1, topk)

    def step():
        picks = vllm_ops.indexer_topk(iq, iw, icache, table, row_req, row_len, topk, block_size, True)
        return [picks] + [t for dt, c in caches.items()
                          for t in vllm_ops.sparse_mla_decode(q, c, idx, SCALE, 512, dt)]  # fmt: skip

    graph, captured = _capture(step)
    iq.copy_(torch.randn(iq.shape, generator=gen).to(iq.dtype).cuda())
    q.copy_(torch.randn(q.shape, generator=gen).to(q.dtype).cuda())
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        assert torch.equal(got, want)
