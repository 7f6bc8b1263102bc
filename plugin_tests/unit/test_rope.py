"""The plugin's MLA / indexer rope and MLA softmax scale against DeepSeek's YaRN written
out here in torch (after DeepSeek-V3's reference ``precompute_freqs_cis``), independent
of vLLM's and the plugin's rotary code, at positions below and past
``original_max_position_embeddings``."""

import math
from types import SimpleNamespace

import pytest
import torch

from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
from vllm_cp_nsa.adapter.model import DeepseekRope, deepseek_rope_parameters, mla_softmax_scale, write_back
from vllm_cp_nsa.config import CpNsaConfigError

ROPE_DIM = 64
THETA = 10000.0
ORIGINAL = 64  # the tiny model's (the release's 4096, scaled down)
FACTOR = 40
RELEASE_YARN = {"rope_type": "yarn", "rope_theta": THETA, "factor": FACTOR, "original_max_position_embeddings": ORIGINAL,
                "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
# below, at and past original_max_position_embeddings, up to the last cached position
# vLLM computes the angles in float32: ~1e-7 relative, times positions up to 2559
ATOL = 5e-4
POSITIONS = torch.tensor([0, 1, 7, ORIGINAL - 1, ORIGINAL, ORIGINAL + 1, 200, 1000, FACTOR * ORIGINAL - 1])


def reference_inv_freq(params: dict) -> torch.Tensor:
    """Rotation frequency of each dim pair: plain RoPE, or DeepSeek YaRN's blend of the
    original (fast dims) and factor-interpolated (slow dims) frequencies."""
    freqs = 1.0 / THETA ** (torch.arange(0, ROPE_DIM, 2, dtype=torch.float64) / ROPE_DIM)
    if params["rope_type"] == "default":
        return freqs
    original, factor = params["original_max_position_embeddings"], params["factor"]

    def pair_index_with(rotations):  # the dim pair that turns `rotations` times over the original context
        return ROPE_DIM * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(THETA))

    low = max(math.floor(pair_index_with(params["beta_fast"])), 0)
    high = min(math.ceil(pair_index_with(params["beta_slow"])), ROPE_DIM - 1)
    ramp = ((torch.arange(ROPE_DIM // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (original frequency), 0: interpolate (divided by factor)
    return freqs / factor * (1 - keep) + freqs * keep


def reference_magnitude(params: dict) -> float:
    """YaRN's cos/sin magnitude: mscale(mscale) / mscale(mscale_all_dim)."""
    if params["rope_type"] == "default":
        return 1.0

    def mscale(m):
        return 0.1 * m * math.log(params["factor"]) + 1.0

    return mscale(params.get("mscale", 1)) / mscale(params.get("mscale_all_dim", 0))


def reference_rotate(x: torch.Tensor, positions: torch.Tensor, params: dict, interleaved: bool) -> torch.Tensor:
    """x [n, ..., ROPE_DIM]: pair j is (2j, 2j+1) when interleaved, (j, j + ROPE_DIM/2) otherwise."""
    angle = positions.double()[:, None] * reference_inv_freq(params)[None]  # [n, ROPE_DIM/2]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (ROPE_DIM // 2,)
    cos, sin = angle.cos().view(shape), angle.sin().view(shape)
    x = x.double()
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else x.split(ROPE_DIM // 2, dim=-1)
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = torch.stack([ra, rb], dim=-1).flatten(-2) if interleaved else torch.cat([ra, rb], dim=-1)
    return out * reference_magnitude(params)


def _config(rope_parameters: dict, max_positions: int = FACTOR * ORIGINAL):
    return SimpleNamespace(rope_parameters=dict(rope_parameters), max_position_embeddings=max_positions)


@pytest.fixture(params=["none", "all"], ids=["torch-rotary", "cpu-kernels"])
def vllm_context(request):
    """vLLM's rotary as torch code, and with its custom ops (the CPU kernels) enabled."""
    with set_current_vllm_config(VllmConfig(compilation_config=CompilationConfig(custom_ops=[request.param]))):
        yield


YARN_VARIANTS = {
    "release": RELEASE_YARN,
    "mscale-ratio": {**RELEASE_YARN, "mscale": 1.0, "mscale_all_dim": 0.5},
    "default": {"rope_type": "default", "rope_theta": THETA},
}


@pytest.mark.parametrize("params", YARN_VARIANTS.values(), ids=YARN_VARIANTS.keys())
@pytest.mark.parametrize("path,interleaved", [("mla", True), ("indexer", False)])
def test_rotation_equals_reference_below_and_past_original_context(vllm_context, params, path, interleaved):
    torch.manual_seed(0)
    rope = DeepseekRope(_config(params), ROPE_DIM, is_neox_style=not interleaved)
    n, heads = len(POSITIONS), 4
    # Rope dims as the model hands them over: a slice of wider rows.
    q_rows = torch.randn(n, heads, ROPE_DIM + 32)
    k_rows = torch.randn(n, ROPE_DIM + 16)
    q_in, k_in = q_rows[..., 32:], k_rows[:, :ROPE_DIM]
    want_q = reference_rotate(q_in, POSITIONS, params, interleaved)
    want_k = reference_rotate(k_in, POSITIONS, params, interleaved)
    q_out, k_out = rope(POSITIONS, q_in.clone(), k_in.clone())
    assert q_out.shape == q_in.shape and k_out.shape == k_in.shape
    torch.testing.assert_close(q_out.double(), want_q, atol=ATOL, rtol=0)
    torch.testing.assert_close(k_out.double(), want_k, atol=ATOL, rtol=0)
    # the indexer writes its rotated dims back into its own rows, leaving the rest
    q_tail, k_tail = q_rows[..., :32].clone(), k_rows[:, ROPE_DIM:].clone()
    write_back(q_in, q_out)
    write_back(k_in, k_out)
    torch.testing.assert_close(q_rows[..., 32:].double(), want_q, atol=ATOL, rtol=0)
    assert torch.equal(q_rows[..., :32], q_tail) and torch.equal(k_rows[:, ROPE_DIM:], k_tail)


def test_yarn_changes_rotation_past_original_context(vllm_context):
    """The reference is not trivially plain RoPE: YaRN's slow dims are interpolated."""
    yarn, plain = RELEASE_YARN, YARN_VARIANTS["default"]
    assert not torch.allclose(reference_inv_freq(yarn), reference_inv_freq(plain))
    rope = DeepseekRope(_config(yarn), ROPE_DIM, is_neox_style=False)
    q = torch.randn(len(POSITIONS), 2, ROPE_DIM)
    k = torch.randn(len(POSITIONS), ROPE_DIM)
    q_out, _ = rope(POSITIONS, q.clone(), k.clone())
    assert not torch.allclose(q_out.double(), reference_rotate(q, POSITIONS, plain, True), atol=1e-3)


@pytest.mark.parametrize("params,want", [
    (RELEASE_YARN, (192**-0.5) * (0.1 * math.log(FACTOR) + 1.0) ** 2),
    ({**RELEASE_YARN, "mscale_all_dim": 0.707}, (192**-0.5) * (0.0707 * math.log(FACTOR) + 1.0) ** 2),
    ({k: v for k, v in RELEASE_YARN.items() if k != "mscale_all_dim"}, 192**-0.5),
    # vLLM's own V3.2 maps attention_factor 1.0 to deepseek_llama_scaling: no softmax mscale
    ({**RELEASE_YARN, "attention_factor": 1.0}, 192**-0.5),
    (YARN_VARIANTS["default"], 192**-0.5),
])
def test_mla_softmax_scale(params, want):
    assert mla_softmax_scale(192, deepseek_rope_parameters(_config(params))) == pytest.approx(want, rel=1e-12)


def test_rope_parameters_follow_vllms_v32_without_touching_the_config():
    config = _config(RELEASE_YARN)
    assert deepseek_rope_parameters(config) == {**RELEASE_YARN, "rope_type": "deepseek_yarn"}
    assert config.rope_parameters == RELEASE_YARN  # vLLM's own model rewrites it; the plugin does not
    llama = _config({**RELEASE_YARN, "attention_factor": 1.0})
    assert deepseek_rope_parameters(llama)["rope_type"] == "deepseek_llama_scaling"
    assert deepseek_rope_parameters(_config(YARN_VARIANTS["default"])) == YARN_VARIANTS["default"]


def test_yarn_without_its_parameters_fails_naming_them():
    with pytest.raises(CpNsaConfigError, match="original_max_position_embeddings"):
        deepseek_rope_parameters(_config({"rope_type": "yarn", "rope_theta": THETA, "factor": FACTOR}))


def test_max_model_len_past_the_cached_positions_fails_at_startup(vllm_context):
    # max_position_embeddings says 8192, but DeepSeek YaRN caches original x factor = 2560 positions
    rope = DeepseekRope(_config(RELEASE_YARN, max_positions=8192), ROPE_DIM, is_neox_style=False)
    rope.check_covers(FACTOR * ORIGINAL)
    with pytest.raises(CpNsaConfigError, match="--max-model-len 2560"):
        rope.check_covers(FACTOR * ORIGINAL + 1)


HF_VARIANTS = {
    "release": RELEASE_YARN,
    "default": YARN_VARIANTS["default"],
    "mscale-ratio": YARN_VARIANTS["mscale-ratio"],
    "mscale_all_dim-zero": {**RELEASE_YARN, "mscale_all_dim": 0},
    "no-mscale-keys": {k: v for k, v in RELEASE_YARN.items() if k not in ("mscale", "mscale_all_dim")},
    "mscale-alone": {**{k: v for k, v in RELEASE_YARN.items() if k != "mscale_all_dim"}, "mscale": 0.707},
    "mscale_all_dim-alone": {k: v for k, v in RELEASE_YARN.items() if k != "mscale"},
    "untruncated": {**RELEASE_YARN, "truncate": False},
}


@pytest.mark.parametrize("params", HF_VARIANTS.values(), ids=HF_VARIANTS.keys())
def test_hf_oracle_refuses_exactly_the_ropes_where_hf_differs(params):
    """eval/hf_oracle.py compares HF against the plugin only where HF's rope is vLLM's
    V3.2 rope: its check agrees with HF's and the plugin's actual cos/sin tables."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
    from hf_oracle import rope_differences_from_vllm
    from transformers.models.deepseek_v32 import DeepseekV32Config
    from transformers.models.deepseek_v32.modeling_deepseek_v32 import DeepseekV32RotaryEmbedding

    hf_config = DeepseekV32Config(qk_rope_head_dim=ROPE_DIM, rope_parameters=dict(params),
                                  max_position_embeddings=FACTOR * ORIGINAL)
    hf_cos, hf_sin = DeepseekV32RotaryEmbedding(hf_config)(torch.zeros(1), POSITIONS[None])
    with set_current_vllm_config(VllmConfig()):
        rope = DeepseekRope(_config(params), ROPE_DIM, is_neox_style=True)
    cos, sin = rope.rotary_emb.cos_sin_cache[POSITIONS].chunk(2, dim=-1)
    same = torch.allclose(hf_cos[0, :, : ROPE_DIM // 2], cos, atol=ATOL) and torch.allclose(
        hf_sin[0, :, : ROPE_DIM // 2], sin, atol=ATOL)
    assert same == (rope_differences_from_vllm(hf_config.rope_parameters) == [])


def test_kernel_cos_sin_table_is_the_rotarys_own_or_one_converted_copy(vllm_context):
    """The CUDA path hands vLLM's kernel the rotary's table when its dtype matches the query's,
    else one converted copy reused by every later call (a new copy per layer call would be a
    launch and an allocation on the host's critical path)."""
    rope = DeepseekRope(_config(RELEASE_YARN), ROPE_DIM, is_neox_style=False)
    table = rope.rotary_emb.cos_sin_cache
    assert rope.cos_sin_cache(torch.empty(1, dtype=table.dtype)) is table
    other = torch.float64 if table.dtype != torch.float64 else torch.float32
    first = rope.cos_sin_cache(torch.empty(1, dtype=other))
    assert first.dtype == other and torch.equal(first, table.to(other))
    assert rope.cos_sin_cache(torch.empty(1, dtype=other)) is first
    assert rope.cos_sin_cache(torch.empty(1, dtype=table.dtype)) is table


@pytest.mark.parametrize("params", YARN_VARIANTS.values(), ids=YARN_VARIANTS.keys())
def test_prologue_kernels_rotate_with_the_rotarys_table_as_the_reference(vllm_context, params):
    """kernels/mla_prologue.py (the CUDA path; on CPU its torch reference, which the kernel
    tests hold the Triton kernels to) with the tables ``DeepseekRope.kernel_rope`` hands it:
    MLA's rope (interleaved) of q_pe and k_pe, the indexer's (NeoX) of its query and key, equal
    to DeepSeek's YaRN written out above, below and past the original context; dims outside
    the rope untouched."""
    from kernels.mla_prologue import Norm, latent_prologue, query_rope

    torch.manual_seed(0)
    mla = DeepseekRope(_config(params), ROPE_DIM, is_neox_style=False)
    indexer = DeepseekRope(_config(params), ROPE_DIM, is_neox_style=True)
    n = len(POSITIONS)
    q = torch.randn(n, 3, 32 + ROPE_DIM)
    index_q = torch.randn(n, 2, ROPE_DIM + 64)
    want_q, want_iq = reference_rotate(q[..., 32:], POSITIONS, params, True), reference_rotate(
        index_q[..., :ROPE_DIM], POSITIONS, params, False)
    got_q, got_iq = q.clone(), index_q.clone()
    query_rope(got_q[..., 32:], got_iq, POSITIONS, mla.kernel_rope(q), indexer.kernel_rope(q))
    torch.testing.assert_close(got_q[..., 32:].double(), want_q, atol=ATOL, rtol=0)
    torch.testing.assert_close(got_iq[..., :ROPE_DIM].double(), want_iq, atol=ATOL, rtol=0)
    assert torch.equal(got_q[..., :32], q[..., :32]) and torch.equal(got_iq[..., ROPE_DIM:], index_q[..., ROPE_DIM:])
    # the keys: k_pe after the kv norm's rows, the indexer key after its LayerNorm (identity here)
    rows = torch.randn(n, 16 + 16 + ROPE_DIM)
    key = torch.randn(n, 128)
    ones = torch.ones(16)
    _, _, k_pe, k, _ = latent_prologue(rows[:, :16], rows[:, 16:32], rows[:, 32:], key, key[:, :4], torch.ones(1),
                                       POSITIONS, Norm(ones, None, 1e-6), Norm(ones, None, 1e-6),
                                       Norm(torch.ones(128), torch.zeros(128), 0.0), mla.kernel_rope(key),
                                       indexer.kernel_rope(key))  # fmt: skip
    torch.testing.assert_close(k_pe.double(), reference_rotate(rows[:, 32:], POSITIONS, params, True), atol=ATOL, rtol=0)
    normed = torch.nn.functional.layer_norm(key, (128,))
    torch.testing.assert_close(k[:, :ROPE_DIM].double(), reference_rotate(normed[:, :ROPE_DIM], POSITIONS, params, False),
                               atol=ATOL, rtol=0)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_prologue_ropes_match_reference_and_vllms_own_class():
    """Real dimensions and the release's rope on CUDA, positions up to 163839: the prologue
    kernels rotate the rope dims of the projections where they lie (MLA's last 64 of 192 dims
    per head and k_pe, the indexer's first 64 of 128), leave every other dim as it was, and
    agree with the reference at least as closely as vLLM's own rotary class called on the same
    tensors (its torch path rounds to bf16 after each op)."""
    from kernels.mla_prologue import query_rope

    params = {**RELEASE_YARN, "original_max_position_embeddings": 4096}
    positions = torch.tensor([0, 1, 4095, 4096, 4097, 20000, 100000, 163839], device="cuda")
    config = _config(params, max_positions=163840)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # vLLM builds the model's rotary in the model dtype
    try:
        with set_current_vllm_config(VllmConfig(compilation_config=CompilationConfig(custom_ops=["all"]))):
            mla = DeepseekRope(config, ROPE_DIM, is_neox_style=False).cuda()
            indexer = DeepseekRope(config, ROPE_DIM, is_neox_style=True).cuda()
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(len(positions), 128, 192, device="cuda", generator=gen, dtype=torch.bfloat16)
            index_q = torch.randn(len(positions), 64, 128, device="cuda", generator=gen, dtype=torch.bfloat16)
            own_q, own_iq = q.clone(), index_q.clone()
            dummy = torch.zeros(len(positions), 1, ROPE_DIM, device="cuda", dtype=torch.bfloat16)
            own_q[..., 128:] = mla.rotary_emb(positions, own_q[..., 128:].contiguous(), dummy.clone())[0].view(
                own_q[..., 128:].shape)
            own_iq[..., :ROPE_DIM] = indexer.rotary_emb(positions, own_iq[..., :ROPE_DIM].contiguous(),
                                                        dummy.clone())[0].view(own_iq[..., :ROPE_DIM].shape)
            ours_q, ours_iq = q.clone(), index_q.clone()
            query_rope(ours_q[..., 128:], ours_iq, positions, mla.kernel_rope(q), indexer.kernel_rope(q))
            torch.cuda.synchronize()
    finally:
        torch.set_default_dtype(default_dtype)
    assert torch.equal(ours_q[..., :128], q[..., :128]) and torch.equal(ours_iq[..., ROPE_DIM:], index_q[..., ROPE_DIM:])
    for ours, own, x, interleaved in ((ours_q[..., 128:], own_q[..., 128:], q[..., 128:], True),
                                      (ours_iq[..., :ROPE_DIM], own_iq[..., :ROPE_DIM], index_q[..., :ROPE_DIM], False)):
        want = reference_rotate(x.cpu().float(), positions.cpu(), params, interleaved)
        torch.testing.assert_close(ours.cpu().double(), want, atol=0.1, rtol=0.02)
        error = (ours.cpu().double() - want).abs().mean().item()
        assert error <= (own.cpu().double() - want).abs().mean().item() * 1.05


@pytest.mark.parametrize("fp8_heads", [0, 32], ids=["bf16-indexer-query", "fp8-indexer-query"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_projection_branches_agree(vllm_context, monkeypatch, interleaved, fp8_heads):
    """On CUDA the layer's norms and ropes take kernels/mla_prologue.py; elsewhere vLLM's
    RMSNorm, LayerNorm and rotary classes. Both branches on CPU (the kernels' references, the
    branch forced): the same seven tensors within bf16 rounding, q_nope and the indexer weights
    equal — a wrong rope style, dim range or norm would be far off. Where the provider's
    indexer takes fp8 queries (``fp8_heads``), the fused branch also hands over its roped
    indexer query quantized as the indexer would quantize it; the other branch leaves that
    to the indexer."""
    from vllm.model_executor.layers.layernorm import LayerNorm, RMSNorm

    from vllm_cp_nsa.adapter import model as adapter_model
    from vllm_cp_nsa.adapter.model import CpNsaAttention, CpNsaIndexer

    gen = torch.Generator().manual_seed(5)
    n, heads, index_heads, q_rank, kv_rank = len(POSITIONS), 4, 4, 48, 32
    qkv = (torch.randn(n, q_rank + kv_rank + ROPE_DIM, generator=gen) * 3 + 1).bfloat16()
    k_and_weights = (torch.randn(n, 128 + index_heads, generator=gen) * 3 + 1).bfloat16()
    q_b = torch.randn(q_rank, heads * (32 + ROPE_DIM), generator=gen).bfloat16()
    wq_b = torch.randn(q_rank, index_heads * 128, generator=gen).bfloat16()
    key_norm = LayerNorm(128, eps=1e-6, dtype=torch.float32)
    key_norm.weight.data = torch.rand(128, generator=gen) + 0.5
    key_norm.bias.data = torch.randn(128, generator=gen) * 0.1
    q_norm, kv_norm = RMSNorm(q_rank, eps=1e-6, dtype=torch.bfloat16), RMSNorm(kv_rank, eps=1e-5, dtype=torch.bfloat16)
    q_norm.weight.data = (torch.rand(q_rank, generator=gen) + 0.5).bfloat16()
    kv_norm.weight.data = (torch.rand(kv_rank, generator=gen) + 0.5).bfloat16()
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # vLLM builds the model's rotary in the model dtype
    try:
        mla_rope = DeepseekRope(_config(RELEASE_YARN), ROPE_DIM, is_neox_style=False)
        index_rope = DeepseekRope(_config(RELEASE_YARN), ROPE_DIM, is_neox_style=not interleaved)
    finally:
        torch.set_default_dtype(default_dtype)
    indexer = SimpleNamespace(wq_b=lambda q_c: (q_c @ wq_b,), wk_weights_proj=lambda x: (k_and_weights.clone(),),
                              n_heads=index_heads, head_dim=128, rope_dim=ROPE_DIM, k_norm=key_norm,
                              rotary_emb=index_rope, weight_scale=torch.tensor([0.25]))  # fmt: skip
    for name in ("key_and_weights", "query", "key_norm", "norm_and_rotate"):
        setattr(indexer, name, getattr(CpNsaIndexer, name).__get__(indexer))
    layer = SimpleNamespace(fused_qkv_a_proj=lambda x: (qkv.clone(),), q_lora_rank=q_rank, kv_lora_rank=kv_rank,
                            qk_rope_head_dim=ROPE_DIM, qk_nope_head_dim=32, qk_head_dim=32 + ROPE_DIM,
                            q_a_layernorm=q_norm, kv_a_layernorm=kv_norm, indexer=indexer,
                            rotary_emb=mla_rope, index_q_fp8_heads=fp8_heads,
                            _q_b=lambda q_c, heads: q_c @ q_b)  # fmt: skip
    layer._prologue_cache_write = CpNsaAttention._prologue_cache_write.__get__(layer)
    x = torch.empty(n, 8)  # the stand-in projections ignore it: it sizes the rows
    with torch.inference_mode():  # as vLLM runs the model: the ropes write the projections' views
        unfused = CpNsaAttention._project(layer, POSITIONS, x, None)
        monkeypatch.setattr(adapter_model, "prologue_kernels_apply", lambda positions, *rows: True)
        fused = CpNsaAttention._project(layer, POSITIONS, x, None)
    fused_latent, unfused_latent = fused[2], unfused[2]
    assert fused[-1] is False and unfused[-1] is False  # no batch metadata: the attention writes the caches
    fused_fp8, unfused_fp8 = fused[-2], unfused[-2]
    fused, unfused = fused[:2] + fused[3:-2], unfused[:2] + unfused[3:-2]
    names = ("q_nope", "q_pe", "kv_c", "k_pe", "index_q", "index_weights", "index_k")
    for name, a, b in zip(names, fused, unfused):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a.float(), b.float(), atol=0.05, rtol=0.02, msg=name)
    assert torch.equal(fused[5], unfused[5])  # the weights: no norm, no rope
    # the fused branch's latent query buffer holds the roped q_pe in its tail; the other has none
    assert unfused_latent is None and fused_latent.shape == (n, heads, kv_rank + ROPE_DIM)
    assert torch.equal(fused_latent[..., kv_rank:], fused[1])
    assert unfused_fp8 is None and (fused_fp8 is None) == (fp8_heads == 0)
    if fp8_heads:
        from vllm_cp_nsa.kernels.kv_cache_ref import quantize_indexer_queries

        want_q8, want_w8 = quantize_indexer_queries(fused[4], fused[5], fp8_heads)
        assert fused_fp8.q.shape == (n, fp8_heads, 128) and fused_fp8.weights.shape == (n, fp8_heads)
        assert torch.equal(fused_fp8.q.view(torch.uint8), want_q8.view(torch.uint8))
        assert torch.equal(fused_fp8.weights, want_w8)
