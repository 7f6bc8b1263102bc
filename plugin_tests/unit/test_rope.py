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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("interleaved,heads,rope_first", [(True, 128, False), (False, 64, True)], ids=["mla", "indexer"])
def test_gpu_rotation_in_place_matches_reference_and_vllms_own_call(interleaved, heads, rope_first):
    """Real dimensions and the release's rope on CUDA: the plugin rotates the rope dims of the
    projections where they lie (vLLM's rotary kernel over strided slices: MLA's last 64 of 192
    dims per head, the indexer's first 64 of 128), leaves every other dim as it was, and
    agrees with the reference at positions up to 163839 at least as closely as vLLM's own
    rotary class called on the same tensors (its torch path rounds to bf16 after each op)."""
    params = {**RELEASE_YARN, "original_max_position_embeddings": 4096}
    positions = torch.tensor([0, 1, 4095, 4096, 4097, 20000, 100000, 163839], device="cuda")
    config = _config(params, max_positions=163840)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # vLLM builds the model's rotary in the model dtype
    try:
        with set_current_vllm_config(VllmConfig(compilation_config=CompilationConfig(custom_ops=["all"]))):
            rope = DeepseekRope(config, ROPE_DIM, is_neox_style=not interleaved).cuda()
            width = 128 if rope_first else 192
            rope_dims = slice(0, ROPE_DIM) if rope_first else slice(width - ROPE_DIM, width)
            other_dims = slice(ROPE_DIM, width) if rope_first else slice(0, width - ROPE_DIM)
            gen = torch.Generator(device="cuda").manual_seed(0)
            q = torch.randn(len(positions), heads, width, device="cuda", generator=gen, dtype=torch.bfloat16)
            kv = torch.randn(len(positions), 512 + ROPE_DIM, device="cuda", generator=gen, dtype=torch.bfloat16)
            # vLLM's own rotary class on the same tensors
            own_q, own_kv = q.clone(), kv.clone()
            own_q[..., rope_dims], own_k = rope.rotary_emb(positions, own_q[..., rope_dims],
                                                           own_kv[:, 512:].unsqueeze(1))
            # the plugin's, in place on the projections' slices
            ours_q_rows, ours_kv = q.clone(), kv.clone()
            ours_q, ours_k = rope(positions, ours_q_rows[..., rope_dims], ours_kv[:, 512:])
            torch.cuda.synchronize()
    finally:
        torch.set_default_dtype(default_dtype)
    assert ours_q.data_ptr() == ours_q_rows[..., rope_dims].data_ptr() and ours_k.data_ptr() == ours_kv[:, 512:].data_ptr()
    assert torch.equal(ours_q_rows[..., other_dims], q[..., other_dims]) and torch.equal(ours_kv[:, :512], kv[:, :512])
    want_q = reference_rotate(q[..., rope_dims].cpu().float(), positions.cpu(), params, interleaved)
    want_k = reference_rotate(kv[:, 512:].cpu().float(), positions.cpu(), params, interleaved)
    torch.testing.assert_close(ours_q.cpu().double(), want_q, atol=0.1, rtol=0.02)
    torch.testing.assert_close(ours_k.cpu().double(), want_k, atol=0.1, rtol=0.02)

    def mean_error(got, want):
        return (got.cpu().double() - want).abs().mean().item()

    assert mean_error(ours_q, want_q) <= mean_error(own_q[..., rope_dims], want_q) * 1.05
    assert mean_error(ours_k, want_k) <= mean_error(own_k.reshape(ours_k.shape), want_k) * 1.05


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_indexer_key_kernel_branch_is_wired_like_the_unfused_path(vllm_context, monkeypatch, interleaved):
    """On CUDA the indexer's key takes kernels/indexer_key.py (LayerNorm + rope in one pass)
    and its query vLLM's rotary alone; elsewhere the LayerNorm class and the rotary class. Both
    branches on CPU (the kernel's reference, the rotary class standing in for vLLM's in-place
    kernel): same query, key within bf16 rounding, weights untouched — a wrong rope style, dim
    range or norm parameter would be far off."""
    from vllm.model_executor.layers.layernorm import LayerNorm

    from vllm_cp_nsa.adapter.model import CpNsaIndexer

    gen = torch.Generator().manual_seed(5)
    n, heads = len(POSITIONS), 4
    rope = DeepseekRope(_config(RELEASE_YARN), ROPE_DIM, is_neox_style=not interleaved)
    q_proj = torch.randn(n, heads * 128, generator=gen).bfloat16()
    k_and_weights = (torch.randn(n, 128 + heads, generator=gen) * 3 + 1).bfloat16()
    norm = LayerNorm(128, eps=1e-6, dtype=torch.float32)
    norm.weight.data = torch.rand(128, generator=gen) + 0.5
    norm.bias.data = torch.randn(128, generator=gen) * 0.1
    layer = SimpleNamespace(wq_b=lambda q_c: (q_proj.clone(),), wk_weights_proj=lambda x: (k_and_weights.clone(),),
                            n_heads=heads, head_dim=128, rope_dim=ROPE_DIM, k_norm=norm, rotary_emb=rope,
                            weight_scale=torch.tensor([0.25]))  # fmt: skip
    q_unfused, w_unfused, k_unfused = CpNsaIndexer.forward(layer, None, None, POSITIONS)

    def rotate_in_place(self, positions, q, k):  # vLLM's kernel, as its rotary class computes it
        assert k is None and q.shape[-1] == ROPE_DIM
        rotated, _ = self.rotary_emb(positions, q.clone(), torch.zeros(q.shape[0], 1, ROPE_DIM, dtype=q.dtype))
        q.copy_(rotated.view(q.shape))
        return q, k

    monkeypatch.setattr(DeepseekRope, "in_place_applies", staticmethod(lambda positions, *tensors: True))
    monkeypatch.setattr(DeepseekRope, "rotate_in_place", rotate_in_place)
    q_fused, w_fused, k_fused = CpNsaIndexer.forward(layer, None, None, POSITIONS)
    assert torch.equal(q_fused, q_unfused) and torch.equal(w_fused, w_unfused)
    assert k_fused.shape == k_unfused.shape and k_fused.dtype == k_unfused.dtype
    torch.testing.assert_close(k_fused.float(), k_unfused.float(), atol=0.05, rtol=0.02)
    assert torch.equal(k_fused[:, ROPE_DIM:], k_unfused[:, ROPE_DIM:])  # unroped dims: the same LayerNorm
