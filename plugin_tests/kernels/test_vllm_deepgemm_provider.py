"""Kernel provider ``vllm-deepgemm`` (adapter/vllm_deepgemm.py): vLLM's DeepGEMM prefill
indexer (gather -> fp8_fp4_mqa_logits -> top_k_per_row_prefill) for the batches its
``IndexerPolicy`` gives it, the Triton indexer for the others; what ``kernels: auto`` resolves
to wherever vLLM ships DeepGEMM for the GPU.

CPU: ``auto`` resolution on faked hardware / vLLM capabilities (GPU generation, DeepGEMM
present, the MQA-logits signature of vLLM 0.32 vs 0.33+, FlashMLA, Triton); the per-batch
policy at and around its thresholds, and the provider routing each batch by it; CPU
devices refused with the reason; a forward being captured handed to the Triton indexer;
CPU tensors handed to the Triton provider; the pure-torch gather / chunk plan against
straightforward implementations, the chunk split against
vLLM's own ``_split_indexer_prefill_chunks``; the DeepGEMM glue with torch stand-ins of
vLLM's kernels under both logits signatures (the query quantization kernel has its own test,
test_indexer_q_quant.py).

GPU (``-m gpu``, vLLM GPU build with DeepGEMM on an SM90 / SM100 GPU): ``auto`` resolves to
this provider and routes a short batch to Triton (the Triton provider's picks exactly) and a
long one to DeepGEMM; ``indexer_topk`` against the torch reference ``indexer_topk_paged`` on
fresh random CP-like rows, with the Triton fallback disabled so the DeepGEMM path must serve
them; chunking gives the same picks; the fallbacks where DeepGEMM does not apply; and a
captured CUDA graph (Triton inside) replays the Triton provider's picks for new inputs.
"""

from __future__ import annotations

import random

import pytest
import torch

from vllm_cp_nsa import extensions
from vllm_cp_nsa.adapter import vllm_deepgemm, vllm_kernels
from vllm_cp_nsa.adapter.vllm_deepgemm import (
    LOGITS_COMPRESSED,
    LOGITS_WHOLE_BUFFER,
    IndexerPolicy,
    VllmDeepGemmOps,
    deepgemm_indexer_unsupported,
    logits_api,
    plan_gather,
    split_chunks,
)
from vllm_cp_nsa.adapter.vllm_kernels import VllmKernelOps
from vllm_cp_nsa.config import CpNsaConfigError
from vllm_cp_nsa.kernels import attention_ref, dispatch, kv_cache_ref
from vllm_cp_nsa.kernels import indexer_topk  # noqa: F401  (import under the interpreter)

NAME = "vllm-deepgemm"
ALWAYS_DEEPGEMM = IndexerPolicy(min_key_width=0)
"""A policy that gives DeepGEMM every batch it can take (tests of the DeepGEMM path itself)."""


pytestmark = pytest.mark.usefixtures("fresh_registry")


# --------------------------------------------------------------------------- CPU
def test_registered_first_in_auto_order_and_capturable():
    providers = extensions.kernel_providers()
    ops = providers[NAME]
    assert isinstance(ops, VllmDeepGemmOps) and isinstance(ops, VllmKernelOps)
    order = sorted(providers.values(), key=lambda p: -p.priority)
    assert [p.name for p in order] == [NAME, "vllm", "triton", "torch"]
    assert ops.supports_cuda_graphs and providers["vllm"].supports_cuda_graphs
    # it reads fp8 indexer keys, so `indexer_cache: auto` stores them as fp8 for it
    assert ops.reads_fp8_indexer_cache and not providers["vllm"].reads_fp8_indexer_cache
    assert not providers["triton"].reads_fp8_indexer_cache


def _mqa_logits_0_32(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits):
    """vLLM 0.32's signature of ``fp8_fp4_mqa_logits``."""


def _mqa_logits_0_33(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, max_seqlen_k):
    """vLLM 0.33's signature (0.34 adds ``logits_dtype=torch.float32``)."""


def _mqa_logits_0_34(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, max_seqlen_k, logits_dtype=torch.float32):
    """vLLM 0.34's signature."""


def _mqa_logits_unknown(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke):
    """A signature this module does not know."""


def test_logits_api_by_signature():
    assert logits_api(_mqa_logits_0_32) == LOGITS_WHOLE_BUFFER
    assert logits_api(_mqa_logits_0_33) == LOGITS_COMPRESSED
    assert logits_api(_mqa_logits_0_34) == LOGITS_COMPRESSED
    assert logits_api(_mqa_logits_unknown) is None
    assert logits_api(len) is None or logits_api(len) in (LOGITS_WHOLE_BUFFER, LOGITS_COMPRESSED)
    deep_gemm = pytest.importorskip("vllm.utils.deep_gemm")
    assert logits_api(deep_gemm.fp8_fp4_mqa_logits) == LOGITS_WHOLE_BUFFER  # the venv's vLLM 0.32


H200, B200, A100 = (9, 0), (10, 0), (8, 0)


@pytest.mark.parametrize("capability, api, deep_gemm, ops_built, reason", [
    (H200, LOGITS_WHOLE_BUFFER, True, True, None),
    (H200, LOGITS_COMPRESSED, True, True, None),
    (B200, LOGITS_WHOLE_BUFFER, True, True, None),
    (B200, LOGITS_COMPRESSED, True, True, "MX-scaled"),
    (A100, LOGITS_WHOLE_BUFFER, True, True, "SM90 / SM100"),
    (None, LOGITS_WHOLE_BUFFER, True, True, "no CUDA device"),
    (H200, None, True, True, "known signature"),
    (H200, LOGITS_COMPRESSED, False, True, "not installed"),
    (H200, LOGITS_WHOLE_BUFFER, True, False, "lacks"),
])
def test_deepgemm_indexer_capabilities(capability, api, deep_gemm, ops_built, reason):
    got = deepgemm_indexer_unsupported(capability, api, deep_gemm, ops_built)
    assert (got is None) if reason is None else (reason in got), got


@pytest.fixture
def fake_hardware(monkeypatch):
    """Fake what the providers probe: ``set(capability, api, deep_gemm, flashmla, triton)``."""

    def set_hardware(capability, api=LOGITS_WHOLE_BUFFER, deep_gemm=True, flashmla=True, triton=True):
        monkeypatch.setattr(vllm_deepgemm, "_probe", lambda: (capability, api, deep_gemm, True))
        vllm_deepgemm.deepgemm_indexer_unsupported_here.cache_clear()
        monkeypatch.setattr(vllm_kernels, "_flashmla_sparse_supported", lambda: flashmla and capability in (H200, B200))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: capability is not None)
        monkeypatch.setattr(dispatch, "_triton_importable", lambda: triton)

    yield set_hardware
    vllm_deepgemm.deepgemm_indexer_unsupported_here.cache_clear()


@pytest.mark.parametrize("capability, api, deep_gemm, flashmla, dtype, want", [
    (H200, LOGITS_WHOLE_BUFFER, True, True, torch.bfloat16, NAME),  # vLLM 0.32 on Hopper
    (H200, LOGITS_COMPRESSED, True, True, torch.bfloat16, NAME),  # vLLM 0.33 / 0.34 on Hopper
    (B200, LOGITS_WHOLE_BUFFER, True, True, torch.bfloat16, NAME),
    (B200, LOGITS_COMPRESSED, True, True, torch.bfloat16, "vllm"),  # MX scales: Triton indexer
    (H200, LOGITS_WHOLE_BUFFER, False, True, torch.bfloat16, "vllm"),  # no DeepGEMM package
    (H200, LOGITS_WHOLE_BUFFER, True, False, torch.bfloat16, "triton"),  # no FlashMLA sparse
    (A100, LOGITS_WHOLE_BUFFER, True, True, torch.bfloat16, "triton"),
    (H200, LOGITS_WHOLE_BUFFER, True, True, torch.float16, "triton"),  # FlashMLA is bf16-only
])
def test_auto_resolution_on_faked_hardware(fake_hardware, capability, api, deep_gemm, flashmla, dtype, want):
    fake_hardware(capability, api, deep_gemm, flashmla)
    assert extensions.resolve_kernel_provider("auto", torch.device("cuda"), dtype, 128).name == want
    # the CPU stays on the references whatever the GPU could do
    assert extensions.resolve_kernel_provider("auto", torch.device("cpu"), dtype, 128).name == "torch"


def test_auto_without_triton_falls_to_the_references(fake_hardware):
    fake_hardware(H200, triton=False)
    assert extensions.resolve_kernel_provider("auto", torch.device("cuda"), torch.bfloat16, 128).name == "torch"


def test_explicit_provider_refused_with_the_reason(fake_hardware):
    fake_hardware(B200, LOGITS_COMPRESSED)
    with pytest.raises(CpNsaConfigError, match=rf"'{NAME}' does not support .*MX-scaled.*kernels='auto'"):
        extensions.resolve_kernel_provider(NAME, torch.device("cuda"), torch.bfloat16, 128)
    fake_hardware(H200)
    with pytest.raises(CpNsaConfigError, match="'vllm' does not support .*bf16-only.*--dtype bfloat16"):
        extensions.resolve_kernel_provider("vllm", torch.device("cuda"), torch.float16, 128)
    assert extensions.resolve_kernel_provider(NAME, torch.device("cuda"), torch.bfloat16, 128).name == NAME


def test_startup_detail_says_what_runs_per_batch(fake_hardware):
    fake_hardware(H200, LOGITS_COMPRESSED)
    detail = VllmDeepGemmOps().startup_detail()
    assert "sparse attention: FlashMLA" in detail and "indexer per batch: DeepGEMM" in detail
    assert "longest key range >= 16384 or rows x key range >= 4Mi" in detail
    assert "Triton otherwise and inside CUDA graphs" in detail and LOGITS_COMPRESSED in detail
    assert "queries to fp8 in the layer's query rope" in detail
    fake_hardware(B200, LOGITS_COMPRESSED)
    detail = VllmDeepGemmOps().startup_detail()
    assert "indexer: Triton" in detail and "no DeepGEMM indexer: " in detail and "MX-scaled" in detail
    assert "indexer: Triton" in VllmKernelOps().startup_detail()


@pytest.mark.parametrize("rows, key_width, deepgemm", [
    (256, 1024, False), (1024, 4095, False), (2047, 2048, False),  # < 4Mi
    (1024, 4096, True), (2048, 2048, True), (4096, 4096, True), (1, 16384, True), (64, 65536, True),  # >= 4Mi or long
    (1, 16383, False), (256, 16383, False), (257, 16383, True),
])
def test_policy_thresholds(rows, key_width, deepgemm):
    assert IndexerPolicy().use_deepgemm(rows, key_width) is deepgemm


def _route(monkeypatch, ops, rows, blocks, block_size=64, capturing=False):
    """Which indexer ``ops`` runs for ``rows`` query rows and a block table of ``blocks``
    columns, the DeepGEMM path applicable and available."""
    calls = []
    monkeypatch.setattr(vllm_deepgemm, "_deepgemm_applies", lambda *a: True)
    monkeypatch.setattr(vllm_deepgemm, "_deepgemm_indexer_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(vllm_deepgemm, "_deepgemm_indexer_topk", lambda *a: calls.append("deepgemm"))
    monkeypatch.setattr(VllmKernelOps, "indexer_topk", lambda *a: calls.append("triton"))
    q = torch.empty(rows, 64, 128)
    table = torch.empty(1, blocks, dtype=torch.int32)
    ops.indexer_topk(q, None, None, table, None, None, 2048, block_size, True)
    return calls


def test_each_batch_takes_the_policys_indexer(monkeypatch, caplog):
    ops = VllmDeepGemmOps()
    monkeypatch.setattr(vllm_deepgemm, "_paths_served", set())
    with caplog.at_level("INFO", logger="vllm.cp_nsa"):
        assert _route(monkeypatch, ops, rows=256, blocks=16) == ["triton"]
    assert "DeepGEMM" not in caplog.text
    with caplog.at_level("INFO", logger="vllm.cp_nsa"):
        assert _route(monkeypatch, ops, rows=4096, blocks=512) == ["deepgemm"]
        assert _route(monkeypatch, ops, rows=4096, blocks=512) == ["deepgemm"]
    assert caplog.text.count("DeepGEMM indexer serving its first batch (4096 rows, key range 32768)") == 1
    assert _route(monkeypatch, ops, rows=256, blocks=16) == ["triton"]  # 1K prompt at N=4
    assert _route(monkeypatch, ops, rows=64, blocks=48) == ["triton"]  # a 64-token chunk beside 3K of context
    assert _route(monkeypatch, ops, rows=4096, blocks=64) == ["deepgemm"]  # a 4K prompt at N=1
    assert _route(monkeypatch, ops, rows=4096, blocks=256) == ["deepgemm"]  # 16K
    assert _route(monkeypatch, ops, rows=8, blocks=1024) == ["deepgemm"]  # eager decode, 64K table
    assert _route(monkeypatch, VllmDeepGemmOps(IndexerPolicy(min_key_width=1 << 30, min_row_keys=1 << 40)),
                  rows=8, blocks=1024) == ["triton"]  # fmt: skip


@pytest.mark.parametrize("capturing", [False, True])
def test_a_captured_forward_takes_the_triton_indexer(monkeypatch, capturing):
    """DeepGEMM's path sizes its buffers on the host; under stream capture the call must go
    to the parent (Triton) provider instead, and only then."""
    assert _route(monkeypatch, VllmDeepGemmOps(ALWAYS_DEEPGEMM), 4096, 1024, capturing=capturing) == (
        ["triton"] if capturing else ["deepgemm"])  # fmt: skip


def test_refuses_cpu_and_kernels_option_is_a_clear_error():
    ops = VllmDeepGemmOps()
    assert not ops.supports("cpu", torch.bfloat16, 128)
    assert not ops.supports(torch.device("cpu"))
    assert not ops.supports(None, None, 0)
    with pytest.raises(CpNsaConfigError, match=rf"kernel provider '{NAME}' does not support device=cpu.*CUDA device"):
        extensions.resolve_kernel_provider(NAME, torch.device("cpu"), torch.bfloat16, 128)


def test_cpu_tensors_and_bf16_caches_go_to_triton(device):
    """Inputs DeepGEMM does not take (CPU tensors; on a GPU a bf16 cache) give the Triton
    provider's picks exactly."""
    gen = torch.Generator().manual_seed(3)
    ops, tops = VllmDeepGemmOps(), dispatch.get_ops("triton", device)
    block_size, num_blocks, tokens = 8, 4, 24
    table = torch.arange(num_blocks, dtype=torch.int32, device=device)[None]
    keys = torch.randn(tokens, 128, generator=gen).to(torch.bfloat16).to(device)
    fp8_cache = torch.zeros(num_blocks, block_size * 132, dtype=torch.uint8, device=device)
    bf16_cache = torch.zeros(num_blocks, block_size, 128, dtype=torch.bfloat16, device=device)
    for cache, fp8 in ((fp8_cache, True), (bf16_cache, False)):
        tops.write_indexer_cache(cache, keys, torch.arange(tokens, device=device), block_size, fp8)
    q = torch.randn(3, 4, 128, generator=gen).to(torch.bfloat16).to(device)
    w = torch.randn(3, 4, generator=gen).to(device)
    row_req = torch.tensor([0, -1, 0], dtype=torch.int32, device=device)
    row_len = torch.tensor([tokens, 0, 5], dtype=torch.int32, device=device)
    caches = [(bf16_cache, False)] + ([(fp8_cache, True)] if device.type == "cpu" else [])
    for cache, fp8 in caches:
        got = ops.indexer_topk(q, w, cache, table, row_req, row_len, 8, block_size, fp8)
        assert torch.equal(got, tops.indexer_topk(q, w, cache, table, row_req, row_len, 8, block_size, fp8))


def _write_integer_keys(cache, table, lens_req, block_size, gen) -> None:
    """Request ``r``'s keys at positions ``0 .. lens_req[r] - 1`` into the fp8 indexer ``cache``
    through ``table``: small integers, exact in fp8, so the stand-ins' scores have no rounding."""
    for r, n in enumerate(lens_req):
        slots = attention_ref.slots_from_positions(table[r][None], torch.arange(n)[None], block_size)[0]
        keys = torch.randint(-8, 9, (n, 128), generator=gen).float()
        kv_cache_ref.write_indexer_cache(cache, keys, slots, block_size, True)


def _cp_rows(gen: random.Random, lens_req: list[int], mode: str) -> list[tuple[int, int]]:
    """(request, kv_len) of one CP rank's rows: round-robin (rows of all requests
    interleaved), in-seq (a head and a tail chunk per request) or random, with padding rows
    (request -1) and rows of a request without keys (kv_len 0) sprinkled in."""
    rows: list[tuple[int, int]] = []
    if mode == "round-robin":
        for i in range(max(lens_req)):
            for r, n in enumerate(lens_req):
                if i < n and i % 2 == 1:
                    rows.append((r, i + 1))
    elif mode == "in-seq":
        for r, n in enumerate(lens_req):
            half = n // 4
            rows += [(r, p + 1) for p in range(half)] + [(r, p + 1) for p in range(n - half, n)]
    else:
        rows = [(gen.randrange(len(lens_req)), 0) for _ in range(60)]
        rows = [(r, gen.randint(1, lens_req[r])) for r, _ in rows]
    for _ in range(5):
        rows.insert(gen.randrange(len(rows) + 1), (-1, 0))
    rows.insert(gen.randrange(len(rows) + 1), (gen.randrange(len(lens_req)), 0))
    return rows


def _straightforward_plan(rows: list[tuple[int, int]]):
    """Per request the largest kv_len of its rows, requests ascending, then each active
    row's [ks, ke) in the concatenated buffer, rows ordered by (request, kv_len, index)."""
    active = [(m, r, n) for m, (r, n) in enumerate(rows) if r >= 0 and n > 0]
    reqs = sorted({r for _, r, _ in active})
    key_len = {r: max(n for _, rr, n in active if rr == r) for r in reqs}
    start, offset = {}, 0
    for r in reqs:
        start[r], offset = offset, offset + key_len[r]
    ordered = sorted(active, key=lambda t: (t[1], t[2], t[0]))
    return reqs, [key_len[r] for r in reqs], [(m, start[r], start[r] + n) for m, r, n in ordered]


@pytest.mark.parametrize("mode", ["round-robin", "in-seq", "random"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gather_plan_matches_a_straightforward_one(mode, seed):
    gen = random.Random(seed)
    lens_req = [gen.randint(1, 300) for _ in range(gen.randint(1, 6))]
    rows = _cp_rows(gen, lens_req, mode)
    # requests of the batch that hold no row of this rank: ids above / between
    row_req = torch.tensor([2 * r + 1 if r >= 0 else -1 for r, _ in rows], dtype=torch.int32)
    row_len = torch.tensor([n for _, n in rows])
    budget = gen.choice([1 << 30, 4 * 3000, 4 * 700])
    max_keys = gen.choice([1 << 30, 200])
    plan = plan_gather(row_req, row_len, budget, max_keys)

    reqs, key_lens, ranges = _straightforward_plan([(2 * r + 1 if r >= 0 else -1, n) for r, n in rows])
    assert plan.reqs.tolist() == reqs and plan.key_lens.tolist() == key_lens
    assert plan.key_starts.tolist() == [sum(key_lens[:i]) for i in range(len(reqs) + 1)]
    assert list(zip(plan.rows.tolist(), plan.ks.tolist(), plan.ke.tolist())) == ranges

    # chunks: consecutive row ranges covering every active row once, each row in one of
    # its chunk's requests, within the budgets unless a single request / row cannot be
    assert [c.row_lo for c in plan.chunks[1:]] == [c.row_hi for c in plan.chunks[:-1]]
    assert (plan.chunks[0].row_lo, plan.chunks[-1].row_hi) == (0, len(ranges))
    req_idx = {r: i for i, r in enumerate(reqs)}
    for c in plan.chunks:
        chunk_reqs = [req_idx[int(row_req[m])] for m in plan.rows[c.row_lo : c.row_hi].tolist()]
        assert all(c.req_lo <= i < c.req_hi for i in chunk_reqs)
        keys = sum(key_lens[c.req_lo : c.req_hi])
        if c.req_hi - c.req_lo > 1:
            assert keys <= max_keys
        if c.row_hi - c.row_lo > 1:
            assert (c.row_hi - c.row_lo) * (keys + vllm_deepgemm._LOGITS_PAD) * 4 <= budget


def test_chunk_split_is_vllms(monkeypatch):
    """Without DeepGEMM's row padding the split is vLLM's ``_split_indexer_prefill_chunks``
    (requests = vLLM's prefill requests, rows = their query tokens)."""
    indexer = pytest.importorskip("vllm.v1.attention.backends.mla.indexer")
    split = indexer.DeepseekV32IndexerMetadataBuilder._split_indexer_prefill_chunks
    monkeypatch.setattr(vllm_deepgemm, "_LOGITS_PAD", 0)
    gen = random.Random(7)
    for _ in range(50):
        n = gen.randint(1, 8)
        key_lens = [gen.randint(1, 5000) for _ in range(n)]
        row_counts = [gen.randint(1, 3000) for _ in range(n)]
        budget = gen.choice([4 * 10**5, 4 * 10**6, 4 * 10**7])
        max_keys = gen.choice([3000, 10**4, 10**6])
        first_row = [sum(row_counts[:i]) for i in range(n)]
        want = [
            (rs.start, rs.stop, first_row[rs.start] + qs.start, first_row[rs.start] + qs.stop)
            for rs, qs in split(torch.tensor(key_lens), torch.tensor(row_counts), max_keys, budget)
        ]
        got = [(c.req_lo, c.req_hi, c.row_lo, c.row_hi) for c in split_chunks(key_lens, row_counts, budget, max_keys)]
        assert got == want


class _KernelStandIns:
    """Torch stand-ins of the three vLLM kernels with their documented contracts (input
    checks included): the CUDA gather's byte arithmetic on the ``[blocks, block_size, 132]``
    view, DeepGEMM's logits (garbage outside ``[ks, ke)``, rows padded by 256 columns) and
    the top-k's ``ks``-relative, unordered, ``-1``-padded output (ties to the lower
    position, like the reference, so exact data gives the reference's sets)."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.calls = {"gather": 0, "logits": 0, "topk": 0}

    def gather(self, kv_cache, dst_k, dst_scale, block_table, cu_seq_lens):
        self.calls["gather"] += 1
        assert kv_cache.dim() == 3 and kv_cache.shape[2] == 132 and kv_cache.dtype == torch.uint8
        assert dst_k.dtype == torch.float8_e4m3fn and dst_k.shape[1] == 128 and dst_k.is_contiguous()
        assert dst_scale.shape == (dst_k.shape[0], 4) and dst_scale.dtype == torch.uint8
        assert block_table.dtype == torch.int32 and block_table.is_contiguous()
        assert cu_seq_lens.dtype == torch.int32 and cu_seq_lens.shape == (block_table.shape[0] + 1,)
        assert int(cu_seq_lens[0]) == 0 and int(cu_seq_lens[-1]) == dst_k.shape[0]
        flat, bs, stride = kv_cache.reshape(-1), kv_cache.shape[1], kv_cache.stride(0)
        for b in range(block_table.shape[0]):
            for t in range(int(cu_seq_lens[b + 1] - cu_seq_lens[b])):
                base = int(block_table[b, t // bs]) * stride
                tok = int(cu_seq_lens[b]) + t
                dst_k.view(torch.uint8)[tok] = flat[base + (t % bs) * 128 : base + (t % bs) * 128 + 128]
                dst_scale[tok] = flat[base + bs * 128 + (t % bs) * 4 : base + bs * 128 + (t % bs) * 4 + 4]

    def _exact(self, q, kv, weights, ks, ke):
        self.calls["logits"] += 1
        (q_fp8, q_sf), (k, k_sf) = q, kv
        assert q_sf is None
        assert q_fp8.dtype == torch.float8_e4m3fn and q_fp8.is_contiguous() and q_fp8.shape[1] in (32, 64)
        assert k.is_contiguous() and k_sf.dtype == torch.float32 and k_sf.shape == (k.shape[0],)
        assert weights.dtype == torch.float32 and weights.shape == q_fp8.shape[:2] and weights.stride(1) == 1
        for t in (ks, ke):
            assert t.dtype == torch.int32 and t.is_contiguous() and t.shape == (q_fp8.shape[0],)
        assert bool((0 <= ks).all() and (ks <= ke).all() and (ke <= k.shape[0]).all())
        keys = k.float() * k_sf[:, None]
        return attention_ref.indexer_logits(q_fp8.float(), keys, weights, ks, ke)  # -inf outside [ks, ke)

    def logits_whole_buffer(self, q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, clean_logits):
        """vLLM 0.32: [rows, keys] (rows padded by 256 columns), row m's keys at [ks, ke)."""
        assert not clean_logits
        exact = self._exact(q, kv, weights, cu_seqlen_ks, cu_seqlen_ke)
        out = torch.randn(exact.shape[0], exact.shape[1] + 256, generator=self.gen) * 1e6
        out = out[:, : exact.shape[1]]
        inside = torch.isfinite(exact)
        out[inside] = exact[inside]
        return out

    def logits_compressed(self, q, kv, weights, cu_seqlen_ks, cu_seqlen_ke, max_seqlen_k):
        """vLLM 0.33+: [rows, max_seqlen_k] (aligned row stride), row m's keys from column 0,
        the tail not cleaned."""
        ks, ke = cu_seqlen_ks, cu_seqlen_ke
        assert isinstance(max_seqlen_k, int) and max_seqlen_k >= int((ke - ks).max())
        exact = self._exact(q, kv, weights, ks, ke)
        out = torch.randn(exact.shape[0], max_seqlen_k + 128, generator=self.gen) * 1e6
        out = out[:, :max_seqlen_k]
        for m in range(exact.shape[0]):
            lo, hi = int(ks[m]), int(ke[m])
            out[m, : hi - lo] = exact[m, lo:hi]
        return out

    def topk(self, logits, ks, ke, out, num_rows, stride0, stride1, topk):
        self.calls["topk"] += 1
        assert out.dtype == torch.int32 and out.is_contiguous() and out.shape == (num_rows, topk)
        assert (stride0, stride1) == logits.stride()
        out.fill_(-1)
        for m in range(num_rows):
            lo, hi = int(ks[m]), int(ke[m])
            row = logits[m, lo:hi]
            pick = torch.sort(-row, stable=True).indices[:topk]
            out[m, : len(pick)] = pick[torch.randperm(len(pick), generator=self.gen)].int()


@pytest.mark.parametrize("layout", ["cp-rows", "prefill-runs", "prefill-runs-no-padding"])
@pytest.mark.parametrize("api", ["0.32", "0.33+"])
@pytest.mark.parametrize("budgets", [(1 << 30, 1 << 30), (4 * 900, 250)])
def test_deepgemm_glue_with_kernel_stand_ins_is_the_reference(monkeypatch, budgets, api, layout):
    """The DeepGEMM path's glue (plan, quantization, gather, per-row [ks, ke), scatter back
    to CP row order) with the kernels replaced by stand-ins of either logits signature
    (0.32: whole-buffer logits; 0.33+: compressed): on exactly representable data (integer
    keys and queries, power-of-two weights: exact logits, many ties) each row picks the
    reference's set, tie rule included, one chunk or many. The order within a row is the
    top-k kernel's (the stand-in shuffles it), as vLLM's own model passes it on. Rows of CP
    ranks (any order: gathered and scattered) and plain prefill runs (each chunk's rows one
    ascending run: sliced, the picks written in place)."""
    custom_ops = pytest.importorskip("vllm._custom_ops")
    deep_gemm = pytest.importorskip("vllm.utils.deep_gemm")
    kernels = _KernelStandIns(11)
    monkeypatch.setattr(custom_ops, "cp_gather_indexer_k_quant_cache", kernels.gather)
    monkeypatch.setattr(custom_ops, "top_k_per_row_prefill", kernels.topk)
    logits = kernels.logits_whole_buffer if api == "0.32" else kernels.logits_compressed
    monkeypatch.setattr(deep_gemm, "fp8_fp4_mqa_logits", logits)
    monkeypatch.setattr(vllm_deepgemm, "MAX_LOGITS_BYTES", budgets[0])
    monkeypatch.setattr(vllm_deepgemm, "MAX_GATHER_KEYS", budgets[1])

    gen, rgen = torch.Generator().manual_seed(4), random.Random(4)
    block_size, topk, heads = 8, 16, 12
    lens_req = [70, 9, 0, 40]  # request 2 has no keys in this step
    table = torch.randperm(40, generator=gen)[:36].view(4, 9).int()
    cache = torch.zeros(40, block_size * 132, dtype=torch.uint8)
    _write_integer_keys(cache, table, lens_req, block_size, gen)
    if layout == "cp-rows":
        rows = _cp_rows(rgen, [70, 9, 1, 40], "round-robin")
        rows = [(r, n) if r != 2 else (2, 0) for r, n in rows] + [(0, 70), (3, 40), (0, 16), (0, 17)]
    else:  # two requests' prompts in order (then a padding row): every row written by the top-k
        rows = [(0, n) for n in range(1, 71)] + [(3, n) for n in range(1, 41)]
        rows += [] if layout.endswith("no-padding") else [(-1, 0)]
    q = torch.randint(-8, 9, (len(rows), heads, 128), generator=gen).to(torch.bfloat16)
    weights = torch.exp2(torch.randint(-6, 0, (len(rows), heads), generator=gen).float())
    weights *= torch.randint(0, 2, weights.shape, generator=gen) * 2 - 1
    row_req = torch.tensor([r for r, _ in rows], dtype=torch.int32)
    row_len = torch.tensor([n for _, n in rows])

    plans = vllm_deepgemm.ForwardPlanCache()
    out = vllm_deepgemm._deepgemm_indexer_topk(q, weights, cache, table, row_req, row_len, topk, block_size, plans)
    calls = dict(kernels.calls)
    sliced = [isinstance(dc.rows, slice) for dc in plans.get(row_req, row_len, table, logits_api(logits)).chunks]
    assert all(sliced) if layout.startswith("prefill") else not all(sliced)  # CP rows: some chunk gathers
    q8, w8 = kv_cache_ref.quantize_indexer_queries(q, weights, heads)
    ref = attention_ref.indexer_topk_paged(q8.float(), w8, cache, table, row_req, row_len, topk, block_size, True)
    assert torch.equal(out.sort(dim=1).values, ref.sort(dim=1).values)
    _takes_the_layers_quantized_query(lambda quantized: vllm_deepgemm._deepgemm_indexer_topk(
        q, weights, cache, table, row_req, row_len, topk, block_size, plans, None, quantized), q, weights, ref)
    kernels.calls = calls
    chunks = plan_gather(row_req, row_len, *budgets).chunks
    assert kernels.calls["logits"] == kernels.calls["topk"] == len(chunks)
    assert kernels.calls["gather"] == len({(c.req_lo, c.req_hi) for c in chunks})
    assert (len(chunks) == 1) == (budgets[0] == 1 << 30)


def _takes_the_layers_quantized_query(run, q, weights, ref) -> None:
    """``run(quantized)`` with the query the layer's rope quantized (kv_cache_ref's recipe, 32
    heads) picks the reference's sets; with the same query's weights negated it picks others,
    so the layer's query is what was scored (not one quantized again from ``q``); a head count
    other than DeepGEMM's is refused."""
    q8, w8 = kv_cache_ref.quantize_indexer_queries(q, weights, 32)
    out = run(kv_cache_ref.QuantizedIndexerQuery(q8, w8))
    assert torch.equal(out.sort(dim=1).values, ref.sort(dim=1).values)
    flipped = run(kv_cache_ref.QuantizedIndexerQuery(q8, -w8))
    assert not torch.equal(flipped.sort(dim=1).values, ref.sort(dim=1).values)
    with pytest.raises(ValueError, match="quantized indexer query"):
        run(kv_cache_ref.QuantizedIndexerQuery(*kv_cache_ref.quantize_indexer_queries(q, weights, 64)))


@pytest.mark.parametrize("num_heads, fp8_cache, available, want", [
    (64, True, True, 64), (12, True, True, 32), (32, True, True, 32),  # V3.2's 64; tiny models pad to 32
    (64, False, True, 0), (128, True, True, 0), (64, True, False, 0),  # bf16 cache; > 64 heads; no DeepGEMM
])  # fmt: skip
def test_which_layers_quantize_the_indexer_query(monkeypatch, num_heads, fp8_cache, available, want):
    """The DeepGEMM provider asks the layer's query rope for fp8 queries at DeepGEMM's head count
    wherever its indexer can run; the other providers never do."""
    monkeypatch.setattr(vllm_deepgemm, "_deepgemm_indexer_available", lambda: available)
    assert VllmDeepGemmOps().indexer_query_fp8_heads(num_heads, fp8_cache) == want
    assert VllmKernelOps().indexer_query_fp8_heads(num_heads, fp8_cache) == 0
    assert dispatch.NsaOps().indexer_query_fp8_heads(num_heads, fp8_cache) == 0


def test_gather_plan_is_read_once_per_forward(monkeypatch):
    """Layers of one forward pass the same row tensors: one host read (plan) for all of
    them; new tensors (the next forward), other budgets or a freed tensor: a new plan."""
    builds = []
    real = vllm_deepgemm.plan_gather
    monkeypatch.setattr(vllm_deepgemm, "plan_gather", lambda *a: builds.append(1) or real(*a))
    cache = vllm_deepgemm.ForwardPlanCache()
    row_req = torch.tensor([0, 1, 0, -1], dtype=torch.int32)
    kv_len = torch.tensor([5, 3, 7, 0])
    table = torch.arange(8, dtype=torch.int32).view(2, 4)
    api = vllm_deepgemm.LOGITS_COMPRESSED
    first = cache.get(row_req, kv_len, table, api)
    assert all(cache.get(row_req, kv_len, table, api) is first for _ in range(3)) and len(builds) == 1
    host = first.host
    assert host.rows.tolist() == [0, 2, 1] and host.ke.tolist() == [5, 7, 10]  # (request, kv_len) order
    (chunk,) = first.chunks  # its device inputs: rows 0, 2 of request 0, then row 1 of request 1
    assert chunk.rows.tolist() == [0, 2, 1] and chunk.cu_seq_lens.tolist() == [0, 7, 10]
    assert chunk.ks.tolist() == [0, 0, 7] and chunk.ke.tolist() == [5, 7, 10]
    assert chunk.starts.tolist() == [0, 0, 0] and chunk.ends.tolist() == [5, 7, 3]  # compressed logits
    whole = cache.get(row_req, kv_len, table, vllm_deepgemm.LOGITS_WHOLE_BUFFER).chunks[0]
    assert whole.starts.tolist() == [0, 0, 7] and whole.ends.tolist() == [5, 7, 10] and len(builds) == 2
    same_values = kv_len.clone()  # the next forward's tensor, equal or not
    assert cache.get(row_req, same_values, table, api) is not first and len(builds) == 3
    monkeypatch.setattr(vllm_deepgemm, "MAX_GATHER_KEYS", 4)
    assert cache.get(row_req, same_values, table, api).host.chunks != first.host.chunks and len(builds) == 4
    del same_values  # freed: a weak reference never matches a new tensor at the same address
    cache.get(row_req, kv_len.clone(), table, api)
    assert len(builds) == 5


def test_host_rows_spare_the_plan_its_device_read():
    """With the rows' lengths stated on the host (prefill batches), the plan is built from
    them and never reads the device tensors (here: meta tensors, which cannot be read), and
    it is the plan the device values would give."""
    row_req = torch.tensor([0, 1, 0, -1, 1], dtype=torch.int32)
    kv_len = torch.tensor([5, 3, 7, 0, 4])
    table = torch.arange(8, dtype=torch.int32).view(2, 4)
    api = vllm_deepgemm.LOGITS_COMPRESSED
    unreadable = (torch.empty(5, dtype=torch.int32, device="meta"), torch.empty(5, dtype=torch.long, device="meta"))
    planned = vllm_deepgemm.ForwardPlanCache().get(*unreadable, table, api, host_rows=(row_req, kv_len))
    read = vllm_deepgemm.ForwardPlanCache().get(row_req, kv_len, table, api)
    for field in ("reqs", "key_lens", "key_starts", "rows", "ks", "ke"):
        assert torch.equal(getattr(planned.host, field), getattr(read.host, field)), field
    assert planned.host.chunks == read.host.chunks
    with pytest.raises(NotImplementedError):  # without them the device tensors are read
        vllm_deepgemm.ForwardPlanCache().get(*unreadable, table, api)


def test_every_layer_gets_the_same_kv_len_tensor():
    from vllm_cp_nsa.nsa_attention import build_forward_metadata

    meta = build_forward_metadata([3, 2], torch.arange(5), torch.zeros(2, 4, dtype=torch.int32), 4, 2, 0,
                                  None, 0, 1, "cpu")  # fmt: skip
    positions = torch.tensor([0, 1, 2, 0, 1])
    kv_len = meta.local_kv_len(positions)
    assert kv_len.tolist() == [1, 2, 3, 1, 2] and meta.local_kv_len(positions) is kv_len
    other = meta.local_kv_len(positions + 1)  # other positions (another forward): recomputed
    assert other.tolist() == [2, 3, 4, 2, 3]


class _PagedStandIns:
    """Torch stand-ins of vLLM's decode indexer kernels with their documented contracts:
    DeepGEMM's scheduler (2-D int32 context lengths), its paged MQA logits (``[B, next_n, H,
    128]`` fp8 queries over ``[blocks, 64, 1, 132]`` pages; ``[rows, max_model_len]`` fp32,
    garbage past each row's keys, a padded row stride) and ``top_k_per_row_decode`` (its
    ``next_n = 1`` form: one length per row; unordered, -1 padded; ties to the lower
    position, like the reference)."""

    def __init__(self, seed: int, takes_clean_logits: bool):
        self.gen = torch.Generator().manual_seed(seed)
        self.calls = {"schedule": 0, "logits": 0, "topk": 0}
        self.schedule_of = None
        self.logits = self.logits_0_32 if takes_clean_logits else self.logits_0_34

    def schedule(self, context_lens, block_size, num_sms):
        self.calls["schedule"] += 1
        assert context_lens.dim() == 2 and context_lens.dtype == torch.int32 and block_size == 64 and num_sms > 0
        self.schedule_of = torch.zeros(num_sms + 1, 2, dtype=torch.int32)
        return self.schedule_of

    def _logits(self, q, kv_cache, weights, context_lens, block_tables, schedule_metadata, max_model_len):
        self.calls["logits"] += 1
        q_fp8, q_sf = q
        assert q_sf is None and q_fp8.dtype == torch.float8_e4m3fn and q_fp8.is_contiguous()
        batch, next_n, heads, dim = q_fp8.shape
        assert heads in (32, 64) and dim == 128 and context_lens.shape == (batch, next_n)
        assert kv_cache.dtype == torch.uint8 and kv_cache.shape[1:] == (64, 1, 132)
        assert weights.dtype == torch.float32 and weights.shape == (batch * next_n, heads)
        assert block_tables.dtype == torch.int32 and block_tables.shape[0] == batch and block_tables.stride(-1) == 1
        assert schedule_metadata is self.schedule_of and max_model_len == block_tables.shape[1] * 64
        out = torch.randn(batch * next_n, max_model_len + 64, generator=self.gen)[:, :max_model_len] * 1e6
        flat = kv_cache.view(kv_cache.shape[0], -1)
        lens = context_lens.reshape(-1)
        for m in range(batch * next_n):
            n = int(lens[m])
            if n == 0:
                continue
            slots = attention_ref.slots_from_positions(block_tables[m // next_n][None], torch.arange(n)[None], 64)[0]
            keys = kv_cache_ref.gather_indexer_keys(flat, slots, 64, True)
            zero = torch.zeros(1, dtype=torch.long)
            row = q_fp8.view(-1, heads, dim)[m : m + 1].float()
            out[m, :n] = attention_ref.indexer_logits(row, keys, weights[m : m + 1], zero, zero + n)[0]
        return out

    def logits_0_32(self, q, kv_cache, weights, context_lens, block_tables, schedule_metadata, max_model_len,
                    clean_logits, indices=None):  # fmt: skip
        assert clean_logits is False and indices is None
        return self._logits(q, kv_cache, weights, context_lens, block_tables, schedule_metadata, max_model_len)

    def logits_0_34(self, q, kv_cache, weights, context_lens, block_tables, schedule_metadata, max_model_len,
                    logits_dtype=torch.float32, indices=None):  # fmt: skip
        assert logits_dtype == torch.float32 and indices is None
        return self._logits(q, kv_cache, weights, context_lens, block_tables, schedule_metadata, max_model_len)

    def topk(self, logits, next_n, seq_lens, out, num_rows, stride0, stride1, topk):
        self.calls["topk"] += 1
        assert next_n == 1 and seq_lens.dtype == torch.int32 and seq_lens.shape == (num_rows,)
        assert out.dtype == torch.int32 and out.shape == (num_rows, topk) and (stride0, stride1) == logits.stride()
        out.fill_(-1)
        for m in range(num_rows):
            pick = torch.sort(-logits[m, : int(seq_lens[m])], stable=True).indices[:topk]
            out[m, : len(pick)] = pick[torch.randperm(len(pick), generator=self.gen)].int()


def _decode_rows(lens_req: list[int], next_n: int, padding_requests: int) -> list[tuple[int, int]]:
    """A uniform decode / verify batch: each request's ``next_n`` newest positions in order,
    then graph-padding requests (no request, no keys)."""
    rows = [(r, n - next_n + 1 + j) for r, n in enumerate(lens_req) for j in range(next_n)]
    return rows + [(-1, 0)] * (padding_requests * next_n)


@pytest.mark.parametrize("takes_clean_logits", [True, False], ids=["0.32", "0.33+"])
@pytest.mark.parametrize("next_n", [1, 2])
def test_decode_glue_with_kernel_stand_ins_is_the_reference(monkeypatch, takes_clean_logits, next_n):
    """The paged decode path's glue (rows as [requests, next_n], per-row context lengths,
    padding requests past the block table, the scheduler's output to the logits, one length
    per row to the top-k) with vLLM's kernels replaced by stand-ins of their contracts, on
    exactly representable data: every row picks the reference's set; the schedule is built
    once for all layers of a forward."""
    custom_ops = pytest.importorskip("vllm._custom_ops")
    deep_gemm = pytest.importorskip("vllm.utils.deep_gemm")
    kernels = _PagedStandIns(5, takes_clean_logits)
    monkeypatch.setattr(custom_ops, "top_k_per_row_decode", kernels.topk)
    monkeypatch.setattr(deep_gemm, "fp8_fp4_paged_mqa_logits", kernels.logits)
    monkeypatch.setattr(deep_gemm, "get_paged_mqa_logits_metadata", kernels.schedule)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"multi_processor_count": 8}))

    gen = torch.Generator().manual_seed(next_n)
    block_size, topk, heads = 64, 16, 12
    lens_req = [150, 9, 70]
    table = torch.randperm(12, generator=gen)[:9].view(3, 3).int()
    cache = torch.zeros(12, block_size * 132, dtype=torch.uint8)
    _write_integer_keys(cache, table, lens_req, block_size, gen)
    rows = _decode_rows(lens_req, next_n, padding_requests=1)
    q = torch.randint(-8, 9, (len(rows), heads, 128), generator=gen).to(torch.bfloat16)
    weights = torch.exp2(torch.randint(-6, 0, (len(rows), heads), generator=gen).float())
    row_req = torch.tensor([r for r, _ in rows], dtype=torch.int32)
    row_len = torch.tensor([n for _, n in rows])

    schedules = vllm_deepgemm.SameTensorsCache()
    for _layer in range(2):
        out = vllm_deepgemm._deepgemm_decode_indexer_topk(q, weights, cache, table, row_len, next_n, topk, block_size,
                                                          schedules)  # fmt: skip
        q8, w8 = kv_cache_ref.quantize_indexer_queries(q, weights, 32)
        ref = attention_ref.indexer_topk_paged(q8.float(), w8, cache, table, row_req, row_len, topk, block_size, True)
        assert torch.equal(out.sort(dim=1).values, ref.sort(dim=1).values)
    assert kernels.calls == {"schedule": 1, "logits": 2, "topk": 2}
    _takes_the_layers_quantized_query(lambda quantized: vllm_deepgemm._deepgemm_decode_indexer_topk(
        q, weights, cache, table, row_len, next_n, topk, block_size, schedules, quantized), q, weights, ref)
    assert kernels.calls["schedule"] == 1  # the quantized runs reused the forward's schedule
    # a capture of the same tensors (after a warm-up on them) builds its own schedule, inside the
    # graph, then reuses it; an eager call after the capture builds one again
    for capturing, schedules_built in ((True, 2), (True, 2), (False, 3)):
        monkeypatch.setattr(vllm_deepgemm, "_capturing", lambda t: capturing)
        vllm_deepgemm._deepgemm_decode_indexer_topk(q, weights, cache, table, row_len, next_n, topk, block_size,
                                                    schedules)  # fmt: skip
        assert kernels.calls["schedule"] == schedules_built


@pytest.mark.parametrize("rows, next_n, blocks, block_size, takes", [
    (8, 1, 1024, 64, True), (16, 2, 2560, 64, True),  # decode b8 at 64K; MTP k=1 at 160K
    (3, 2, 16, 64, False), (12, 3, 16, 64, False), (16, 4, 16, 64, False),  # split request; next_n 3, 4
    (8, 1, 16, 16, False), (4096, 1, 65536, 64, False), (0, 1, 16, 64, False),  # block size; logits; empty
])  # fmt: skip
def test_paged_decode_shapes(rows, next_n, blocks, block_size, takes):
    assert vllm_deepgemm._paged_decode_applies(rows, next_n, blocks * block_size, block_size) is takes


def _route_decode(monkeypatch, rows, next_n, block_size=64, capturing=False):
    calls = []
    monkeypatch.setattr(vllm_deepgemm, "_deepgemm_applies", lambda *a: True)
    monkeypatch.setattr(vllm_deepgemm, "_deepgemm_indexer_available", lambda: True)
    monkeypatch.setattr(vllm_deepgemm, "_paged_decode_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    monkeypatch.setattr(vllm_deepgemm, "_deepgemm_decode_indexer_topk", lambda *a: calls.append("paged"))
    monkeypatch.setattr(vllm_deepgemm, "_deepgemm_indexer_topk", lambda *a: calls.append("deepgemm"))
    monkeypatch.setattr(VllmKernelOps, "indexer_topk", lambda *a: calls.append("triton"))
    q = torch.empty(rows, 64, 128)
    VllmDeepGemmOps().indexer_topk_decode(q, None, None, torch.empty(1, 1024, dtype=torch.int32), None, None, next_n,
                                          2048, block_size, True)  # fmt: skip
    return calls


@pytest.mark.parametrize("capturing", [False, True])
def test_uniform_decode_batches_take_the_paged_path_captured_or_not(monkeypatch, capturing):
    """Uniform decode / verify rows go to the paged path, inside a graph capture too (it
    reads nothing on the host); shapes it does not take go where ``indexer_topk`` sends them
    (Triton under capture)."""
    assert _route_decode(monkeypatch, 8, 1, capturing=capturing) == ["paged"]
    assert _route_decode(monkeypatch, 16, 2, capturing=capturing) == ["paged"]
    assert _route_decode(monkeypatch, 12, 3, capturing=capturing) == ["triton" if capturing else "deepgemm"]
    assert _route_decode(monkeypatch, 8, 1, block_size=16, capturing=capturing) == ["triton" if capturing else "deepgemm"]


def test_other_providers_answer_decode_rows_with_indexer_topk(device):
    """The interface's default: ``indexer_topk_decode`` is ``indexer_topk`` (Triton, the
    references, and the DeepGEMM provider on inputs its paged path does not take)."""
    gen = torch.Generator().manual_seed(8)
    rows = _decode_rows([40, 17], 2, padding_requests=1)
    q, w, cache, table, row_req, row_len = [t.to(device) for t in _indexer_inputs([40, 17], rows, 8, 16,
                                                                                    torch.bfloat16, gen)]  # fmt: skip
    for ops in (dispatch.get_ops("torch", device), dispatch.get_ops("triton", device), VllmDeepGemmOps()):
        got = ops.indexer_topk_decode(q, w, cache, table, row_req, row_len, 2, 8, 16, True)
        assert torch.equal(got, ops.indexer_topk(q, w, cache, table, row_req, row_len, 8, 16, True))


# --------------------------------------------------------------------------- GPU
@pytest.fixture
def deepgemm_ops():
    pytest.importorskip("vllm.utils.deep_gemm")
    pytest.importorskip("vllm._custom_ops")
    reason = vllm_deepgemm.deepgemm_indexer_unsupported_here()
    if reason:
        pytest.skip(f"no DeepGEMM indexer here: {reason}")
    return VllmDeepGemmOps(ALWAYS_DEEPGEMM)


@pytest.fixture
def no_triton_fallback(monkeypatch):
    """Make an indexer call that would leave the DeepGEMM path fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("the indexer fell back to the Triton provider")

    monkeypatch.setattr(VllmKernelOps, "indexer_topk", refuse)


def _indexer_inputs(lens_req, rows, heads, block_size, q_dtype, gen):
    """fp8 indexer cache with requests of ``lens_req`` keys on shuffled blocks, its block
    table, and random queries / weights for ``rows`` = [(request, kv_len)] (CPU tensors)."""
    blocks_per_req = [-(-n // block_size) for n in lens_req]
    num_blocks = sum(blocks_per_req) + 5
    perm = torch.randperm(num_blocks, generator=gen)
    table = torch.zeros(len(lens_req), max(blocks_per_req) + 2, dtype=torch.int32)
    cache = torch.zeros(num_blocks, block_size * 132, dtype=torch.uint8)
    used = 0
    for r, (n, nb) in enumerate(zip(lens_req, blocks_per_req)):
        table[r, :nb] = perm[used : used + nb].int()
        used += nb
        slots = attention_ref.slots_from_positions(table[r][None], torch.arange(n)[None], block_size)[0]
        keys = torch.randn(n, 128, generator=gen).to(torch.bfloat16)
        kv_cache_ref.write_indexer_cache(cache, keys, slots, block_size, True)
    q = torch.randn(len(rows), heads, 128, generator=gen)
    q = (q * 8).to(q_dtype) if q_dtype == torch.float8_e4m3fn else q.to(q_dtype)
    weights = torch.randn(len(rows), heads, generator=gen) * heads**-0.5
    row_req = torch.tensor([r for r, _ in rows], dtype=torch.int32)
    row_len = torch.tensor([n for _, n in rows], dtype=torch.int64)
    return q, weights, cache, table, row_req, row_len


def _check_picks(out, q, weights, cache, table, row_req, row_len, topk, block_size, rel_tol):
    """Validate ``out`` (CPU) against the torch reference on (q, weights) (CPU, fp32):
    min(kv_len, topk) picks per row and -1 elsewhere, in range, no duplicates, every row with
    kv_len <= topk holds all its positions, picks may differ from ``indexer_topk_paged``'s
    only among keys scoring within ``rel_tol`` (of the row's largest |score|) of the k-th
    best. The order within a row is free (the top-k kernel's). Returns the share of the
    reference's picks that ``out`` holds."""
    assert out.shape == (q.shape[0], topk) and out.dtype == torch.int32
    ref = attention_ref.indexer_topk_paged(q, weights, cache, table, row_req, row_len, topk, block_size, True)
    kept = total = 0
    for m in range(q.shape[0]):
        req, n = int(row_req[m]), int(row_len[m])
        nv = min(n, topk) if req >= 0 else 0
        sel = out[m][out[m] >= 0].long()
        assert sel.numel() == nv and bool((out[m][out[m] < 0] == -1).all()), f"row {m}: picks / padding"
        if nv == 0:
            continue
        assert bool((sel >= 0).all()) and bool((sel < n).all()), f"row {m}: out of range"
        assert sel.unique().numel() == nv, f"row {m}: duplicates"
        if n <= topk:
            assert sorted(sel.tolist()) == list(range(n)), f"row {m}: a short row must pick all"
        slots = attention_ref.slots_from_positions(table[req][None], torch.arange(n)[None], block_size)[0]
        keys = kv_cache_ref.gather_indexer_keys(cache, slots, block_size, True)
        zero = torch.zeros(1, dtype=torch.long)
        scores = attention_ref.indexer_logits(q[m : m + 1], keys, weights[m : m + 1], zero, zero + n)[0]
        kth = scores[ref[m, nv - 1].long()]
        tol = rel_tol * scores.abs().max().item()
        got = scores[sel]
        assert bool((got >= kth - tol).all()), f"row {m}: a pick scores below the k-th"
        kept += len(set(sel.tolist()) & set(ref[m, :nv].tolist()))
        total += nv
    return kept / max(total, 1)


LENS_REQ = [5000, 1200, 3000]


def _gpu_rows(topk: int) -> list[tuple[int, int]]:
    rows = [(0, 5000), (1, 1200), (2, 3000),  # full-length rows (the paged path's failure)
            (0, topk - 1), (0, topk), (0, topk + 1), (2, topk), (1, 1),
            (-1, 0), (2, 0), (0, 4999)]  # fmt: skip
    rows += [(i % 3, [4000, 1100, 2900][i % 3] - 37 * i) for i in range(24)]  # round-robin
    rows += [(1, 600 + i) for i in range(8)]  # a contiguous in-seq run
    return rows


@pytest.mark.gpu
@pytest.mark.parametrize("heads,topk", [(64, 2048), (16, 64)])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_gpu_indexer_topk_matches_reference(deepgemm_ops, no_triton_fallback, monkeypatch, heads,
                                            topk, q_dtype):  # fmt: skip
    gen = torch.Generator().manual_seed(heads + topk + len(str(q_dtype)))
    block_size = 64
    rows = _gpu_rows(topk)
    inputs = _indexer_inputs(LENS_REQ, rows, heads, block_size, q_dtype, gen)
    q, weights, cache, table, row_req, row_len = [t.cuda() for t in inputs]
    out = deepgemm_ops.indexer_topk(q, weights, cache, table, row_req, row_len, topk, block_size, True)
    torch.cuda.synchronize()
    out = out.cpu()
    assert bool((out[8] == -1).all()) and bool((out[9] == -1).all())  # padding row, no keys
    assert sorted(out[7].tolist()) == [-1] * (topk - 1) + [0]  # kv_len 1: position 0 only
    # Against the scores of the queries the kernels see (vLLM's fp8 quantization):
    # DeepGEMM's fp8 products may reorder near ties only.
    q8, w8 = kv_cache_ref.quantize_indexer_queries(inputs[0], inputs[1], heads)
    recall = _check_picks(out, q8.float(), w8, *inputs[2:], topk, block_size, 5e-3)
    assert recall >= 0.98, recall
    if q_dtype == torch.bfloat16:  # and the unquantized reference still agrees broadly
        raw_recall = _check_picks(out, inputs[0].float(), inputs[1], *inputs[2:], topk, block_size, 0.1)
        assert raw_recall >= 0.9, raw_recall

    # small budgets: one request / one row per chunk, the same picks
    monkeypatch.setattr(vllm_deepgemm, "MAX_LOGITS_BYTES", 1 << 16)
    monkeypatch.setattr(vllm_deepgemm, "MAX_GATHER_KEYS", 2000)
    chunked = deepgemm_ops.indexer_topk(q, weights, cache, table, row_req, row_len, topk, block_size, True)
    assert torch.equal(chunked.cpu().sort(dim=1).values, out.sort(dim=1).values)
    # planned from host rows (prefill batches): the same picks, the device tensors never read
    host = deepgemm_ops.indexer_topk(q, weights, cache, table, row_req.clone(), row_len.clone(), topk, block_size,
                                     True, host_rows=(inputs[4], inputs[5]))  # fmt: skip
    assert torch.equal(host.cpu().sort(dim=1).values, out.sort(dim=1).values)


@pytest.mark.gpu
def test_gpu_falls_back_to_triton_where_deepgemm_does_not_apply(deepgemm_ops):
    """A bf16 indexer cache, more than 64 heads, top-k above 2048, block size 2: the Triton
    provider's picks exactly."""
    gen = torch.Generator().manual_seed(9)
    tops = dispatch.get_ops("triton", "cuda")
    cases = []
    q, w, cache, table, rreq, rlen = [t.cuda() for t in _indexer_inputs([300, 200], [(0, 300), (1, 50), (-1, 0)],
                                                                          16, 64, torch.bfloat16, gen)]  # fmt: skip
    bf16_cache = torch.randn(cache.shape[0], 64, 128, generator=gen).to(torch.bfloat16).cuda()
    cases.append((q, w, bf16_cache, table, rreq, rlen, 32, 64, False))
    cases.append((torch.randn(3, 128, 128, generator=gen).to(torch.bfloat16).cuda(),
                  torch.randn(3, 128, generator=gen).cuda(), cache, table, rreq, rlen, 32, 64, True))  # fmt: skip
    cases.append((q, w, cache, table, rreq, rlen, 4096, 64, True))
    small = [t.cuda() for t in _indexer_inputs([30], [(0, 30), (0, 7)], 16, 2, torch.bfloat16, gen)]
    cases.append((*small, 8, 2, True))
    for args in cases:
        assert torch.equal(deepgemm_ops.indexer_topk(*args), tops.indexer_topk(*args))


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_the_triton_indexer(deepgemm_ops):
    """Captured in a CUDA graph, the provider records the Triton indexer; replays on new
    inputs written into the captured tensors give the Triton provider's picks for them."""
    gen = torch.Generator().manual_seed(21)
    tops = dispatch.get_ops("triton", "cuda")
    rows = [(0, 300), (1, 77), (0, 12), (-1, 0)]

    def inputs():
        return [t.cuda() for t in _indexer_inputs([300, 200], rows, 64, 64, torch.bfloat16, gen)]

    static = inputs()
    deepgemm_ops.indexer_topk(*static, 32, 64, True)  # warm-up (JIT) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = deepgemm_ops.indexer_topk(*static, 32, 64, True)
    for _ in range(2):
        for dst, src in zip(static, inputs()):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, tops.indexer_topk(*static, 32, 64, True))


@pytest.mark.gpu
def test_gpu_auto_resolves_here_and_routes_each_batch(deepgemm_ops, monkeypatch):
    """On a GPU with vLLM's DeepGEMM indexer, ``kernels: auto`` is this provider; a short
    batch (below both thresholds) gets the Triton provider's picks exactly, a long one goes
    through the DeepGEMM path and agrees with the reference up to fp8 near-ties."""
    ops = extensions.resolve_kernel_provider("auto", torch.device("cuda"), torch.bfloat16, 128)
    assert ops.name == NAME and ops.policy == IndexerPolicy()
    ran = []
    real = vllm_deepgemm._deepgemm_indexer_topk
    monkeypatch.setattr(vllm_deepgemm, "_deepgemm_indexer_topk", lambda *a: ran.append(1) or real(*a))
    gen = torch.Generator().manual_seed(31)
    tops = dispatch.get_ops("triton", "cuda")

    short = _indexer_inputs([900, 400], [(0, 900), (1, 400), (0, 17), (-1, 0)], 64, 64, torch.bfloat16, gen)
    short_gpu = [t.cuda() for t in short]
    assert short_gpu[3].shape[1] * 64 < ops.policy.min_key_width
    got = ops.indexer_topk(*short_gpu, 2048, 64, True)
    assert not ran and torch.equal(got, tops.indexer_topk(*short_gpu, 2048, 64, True))

    long_rows = [(0, 20000), (0, 19000), (1, 3000), (0, 2049), (-1, 0)]
    long = _indexer_inputs([20000, 3000], long_rows, 64, 64, torch.bfloat16, gen)
    long_gpu = [t.cuda() for t in long]
    assert long_gpu[3].shape[1] * 64 >= ops.policy.min_key_width
    out = ops.indexer_topk(*long_gpu, 2048, 64, True)
    torch.cuda.synchronize()
    assert ran == [1]
    q8, w8 = kv_cache_ref.quantize_indexer_queries(long[0], long[1], 64)
    assert _check_picks(out.cpu(), q8.float(), w8, *long[2:], 2048, 64, 5e-3) >= 0.98


@pytest.mark.gpu
@pytest.mark.parametrize("heads,topk", [(64, 2048), (16, 64)])
@pytest.mark.parametrize("next_n", [1, 2])
def test_gpu_decode_indexer_matches_reference(deepgemm_ops, no_triton_fallback, heads, topk, next_n):
    """Uniform decode / verify rows (vLLM's paged MQA logits + decode top-k): long and short
    requests, a row of one key, a graph-padding request past the block table: against the
    torch reference on the queries the kernels see, fp8 near-ties aside; padding rows all -1."""
    gen = torch.Generator().manual_seed(heads + topk + next_n)
    lens_req = [5000, 1200, 3000, topk, next_n]
    rows = _decode_rows(lens_req, next_n, padding_requests=1)
    inputs = _indexer_inputs(lens_req, rows, heads, 64, torch.bfloat16, gen)
    q, weights, cache, table, row_req, row_len = [t.cuda() for t in inputs]
    out = deepgemm_ops.indexer_topk_decode(q, weights, cache, table, row_req, row_len, next_n, topk, 64, True)
    torch.cuda.synchronize()
    out = out.cpu()
    assert bool((out[-next_n:] == -1).all())
    q8, w8 = kv_cache_ref.quantize_indexer_queries(inputs[0], inputs[1], 64 if heads > 32 else 32)
    recall = _check_picks(out, q8.float(), w8, *inputs[2:], topk, 64, 5e-3)
    assert recall >= 0.98, recall
    # the query as the layer's rope hands it over: the same bytes, so the same logits and picks
    quantized = kv_cache_ref.QuantizedIndexerQuery(q8.cuda(), w8.cuda())
    given = deepgemm_ops.indexer_topk_decode(q, weights, cache, table, row_req, row_len, next_n, topk, 64, True,
                                             quantized=quantized)  # fmt: skip
    assert torch.equal(given.cpu().sort(dim=1).values, out.sort(dim=1).values)


@pytest.mark.gpu
@pytest.mark.parametrize("next_n", [1, 2])
def test_gpu_decode_indexer_replays_in_a_cuda_graph(deepgemm_ops, no_triton_fallback, next_n):
    """Captured in a CUDA graph (as vLLM's FULL decode graphs capture it), the paged path
    replays new batches written into the captured tensors: new queries, weights, lengths and
    cache contents give the picks an eager call gives for them."""
    gen = torch.Generator().manual_seed(40 + next_n)
    lens_req = [3000, 700]

    def inputs(lens):
        return [t.cuda() for t in _indexer_inputs(lens, _decode_rows(lens, next_n, 1), 64, 64, torch.bfloat16, gen)]

    static = inputs(lens_req)
    deepgemm_ops.indexer_topk_decode(*static, next_n, 2048, 64, True)  # warm-up (JIT) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = deepgemm_ops.indexer_topk_decode(*static, next_n, 2048, 64, True)
    for lens in ([3001, 701], [2990, 690]):  # the same block-table and cache shapes
        fresh = inputs(lens)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        graph.replay()
        torch.cuda.synchronize()
        want = VllmDeepGemmOps(ALWAYS_DEEPGEMM).indexer_topk_decode(*fresh, next_n, 2048, 64, True)
        assert torch.equal(out.sort(dim=1).values, want.sort(dim=1).values)
