"""The model's first launch on CUDA: vLLM's fused embedding gather + the first layer's RMSNorm
(``vllm.model_executor.layers.fused_embed_norm``, as vLLM's own V3.2 starts its forward)
against the unfused start (the embedding lookup, then the first layer's RMSNorm).

CPU: the model's wiring with a torch stand-in of the kernel's contract (vLLM's CPU build
has no Triton, so its kernel cannot run here, not even interpreted). GPU: vLLM's kernel.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm.model_executor.layers.fused_embed_norm")
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.model_executor.layers import fused_embed_norm as vllm_fused  # noqa: E402
from vllm.model_executor.layers.layernorm import RMSNorm  # noqa: E402
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod  # noqa: E402

from vllm_cp_nsa.adapter import model as adapter_model  # noqa: E402
from vllm_cp_nsa.adapter.model import CpNsaModel, fused_embedding_available  # noqa: E402
from vllm_cp_nsa.split_plan import unsplit_plan  # noqa: E402

VOCAB, HIDDEN = 300, 7168


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference in bf16 steps at the larger magnitude of each pair."""
    a, b = a.double(), b.double()
    step = torch.maximum(a.abs(), b.abs()).clamp(min=2.0**-126).log2().floor().exp2() * 2.0**-7
    return float(((a - b).abs() / step).max())


def _exact_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The RMSNorm in fp64, not rounded: what both paths approximate."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.detach().double()


def _assert_rounded_once(fused: torch.Tensor, plain: torch.Tensor, exact: torch.Tensor) -> None:
    """The kernel's contract on the device: fp32 math rounded once, so within half a bf16 step of
    the exact result (plus fp32's own error), and never less accurate on average than the
    unfused path, which rounds twice (the normed row, then its product with the weight). The
    two differ by one step in about a quarter of the elements for that reason alone."""
    assert _ulps(fused, exact) <= 0.5 + 1e-3
    assert (fused.double() - exact).abs().mean() <= (plain.double() - exact).abs().mean()
    assert _ulps(fused, plain) <= 2


def _kernel_contract(input_ids, embed_table, chain_weight, eps):
    """``fused_embed_norm``'s documented result: (the table's rows, their RMSNorm times the
    weight, computed in fp32 and rounded once, as its kernel does)."""
    rows = embed_table[input_ids.view(-1)]
    x = rows.float()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * chain_weight.float()
    return rows, normed.to(rows.dtype)


class _Layer:
    """Records what the model hands a decoder layer; passes x and the residual on."""

    def __init__(self, seen: list, input_layernorm=None):
        self.seen = seen
        self.input_layernorm = input_layernorm

    def __call__(self, positions, x, residual, meta, plan, input_normed=False):
        self.seen.append((x.clone(), None if residual is None else residual.clone(), input_normed))
        return x, x if residual is None else residual


def _model(device, seen: list, eps: float):
    gen = torch.Generator().manual_seed(2)
    embedding = torch.nn.Embedding(VOCAB, HIDDEN, dtype=torch.bfloat16).to(device)
    embedding.weight.data = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).bfloat16().to(device)
    with set_current_vllm_config(VllmConfig()):  # a CustomOp picks its forward from the config
        norm = RMSNorm(HIDDEN, eps=eps, dtype=torch.bfloat16).to(device)
    norm.weight.data = (torch.rand(HIDDEN, generator=gen) + 0.5).bfloat16().to(device)
    model = SimpleNamespace(embed_tokens=embedding, embed_input_ids=embedding, fused_embedding=True,
                            layers=[_Layer(seen, norm), _Layer(seen)], metadata_layer_name="layer0",
                            runtime=SimpleNamespace(group=None), norm=lambda x, residual: (x, residual))  # fmt: skip
    model._embed_local = lambda *a: CpNsaModel._embed_local(model, *a)
    return model


def _run_both(monkeypatch, device, tokens: int, eps: float = 1e-6):
    """The model's forward with the fused start forced and not: per branch, what its two layers got."""
    ids = torch.randint(0, VOCAB, (tokens,), generator=torch.Generator().manual_seed(tokens)).to(device)
    positions = torch.arange(tokens, device=device)
    monkeypatch.setattr(adapter_model, "forward_metadata_for",
                        lambda name, n, group: (None, unsplit_plan(n, 1, 0, "test")))  # fmt: skip
    runs = {}
    for fused in (False, True):
        seen = []
        model = _model(device, seen, eps)
        monkeypatch.setattr(adapter_model, "embedding_kernel_applies", lambda input_ids, fused=fused: fused)
        with torch.inference_mode():  # as vLLM runs the model
            out = CpNsaModel.forward(model, ids, positions)
        assert out.shape == (tokens, HIDDEN) and len(seen) == 2
        runs[fused] = seen
    with torch.inference_mode():
        rows = model.embed_tokens(ids)
        want = model.layers[0].input_layernorm(rows)
    return runs[False], runs[True], rows, want, model


@pytest.mark.parametrize("tokens", [1, 8, 37])
def test_fused_start_hands_the_first_layer_its_normed_input(monkeypatch, tokens):
    """With the kernel (a stand-in of its contract here): the first layer gets the embedding rows
    as its residual, bit-exact, and their RMSNorm as its input with ``input_normed``, within
    one bf16 step of vLLM's RMSNorm class (the kernel rounds once, after the weight); the
    kernel gets the layer's own norm weight and eps; the next layer gets the first one's
    outputs as usual. Without it (CPU ids): the lookup, no residual, the first layer norms."""
    calls = []
    monkeypatch.setattr(vllm_fused, "fused_embed_norm", lambda *a: calls.append(a[2:]) or _kernel_contract(*a))
    plain, fused, rows, want, model = _run_both(monkeypatch, "cpu", tokens, eps=1e-5)
    assert torch.equal(plain[0][0], rows) and plain[0][1] is None and plain[0][2] is False
    x, residual, normed = fused[0]
    assert normed is True and torch.equal(residual, rows)
    assert x.dtype == want.dtype and x.shape == want.shape
    norm = model.layers[0].input_layernorm
    _assert_rounded_once(x, want, _exact_rms_norm(rows, norm.weight, norm.variance_epsilon))
    ((weight, eps),) = calls
    assert eps == 1e-5 and weight is model.layers[0].input_layernorm.weight
    assert fused[1][2] is False and plain[1][2] is False  # only the first layer is handed a normed input


def test_fused_start_only_where_the_whole_table_is_here():
    """vLLM's ``has_full_vocab_on_rank``: one TP rank and an unquantized table; CPU ids never."""
    assert fused_embedding_available(SimpleNamespace(tp_size=1, quant_method=UnquantizedEmbeddingMethod()))
    assert not fused_embedding_available(SimpleNamespace(tp_size=2, quant_method=UnquantizedEmbeddingMethod()))
    assert not fused_embedding_available(SimpleNamespace(tp_size=1, quant_method=object()))
    assert not adapter_model.embedding_kernel_applies(torch.zeros(3, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tokens", [1, 8, 4096])
def test_gpu_fused_start_equals_the_unfused_one(monkeypatch, tokens):
    """vLLM's kernel on CUDA: the residual bit-exact, the normed input the exact RMSNorm of the
    looked-up rows rounded once (2026-12-05 on an H200: a quarter of its elements one step from
    vLLM's RMSNorm class, which rounds twice)."""
    plain, fused, rows, want, model = _run_both(monkeypatch, "cuda", tokens)
    x, residual, normed = fused[0]
    assert normed is True and torch.equal(residual, rows)
    norm = model.layers[0].input_layernorm
    _assert_rounded_once(x, want, _exact_rms_norm(rows, norm.weight, norm.variance_epsilon))


def _eh_contract(positions, input_ids, embed_table, previous_hidden, enorm_w, hnorm_w, eps):
    """``fused_embed_eh_norm``'s documented result: cat([enorm(table rows zeroed at position 0),
    hnorm(previous_hidden)]), each norm in fp32 rounded once."""
    def norm(x, w):
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(previous_hidden.dtype)

    rows = torch.where(positions[:, None] == 0, 0, embed_table[input_ids.view(-1)])
    return torch.cat([norm(rows, enorm_w), norm(previous_hidden, hnorm_w)], dim=-1)


def _mtp_input(monkeypatch, device, fused: bool, positions, ids, previous):
    """What the MTP draft layer's eh_proj receives, with the fused input forced or not, and the
    exact (fp64, unrounded) input it approximates."""
    from vllm_cp_nsa.adapter import mtp as adapter_mtp
    from vllm_cp_nsa.adapter.mtp import CpNsaDeepseekV32MTP, CpNsaMtpLayer

    gen = torch.Generator().manual_seed(4)
    embedding = torch.nn.Embedding(VOCAB, HIDDEN, dtype=torch.bfloat16).to(device)
    embedding.weight.data = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).bfloat16().to(device)
    with set_current_vllm_config(VllmConfig()):
        enorm, hnorm = (RMSNorm(HIDDEN, eps=1e-6, dtype=torch.bfloat16).to(device) for _ in range(2))
    enorm.weight.data = (torch.rand(HIDDEN, generator=gen) + 0.5).bfloat16().to(device)
    hnorm.weight.data = (torch.rand(HIDDEN, generator=gen) + 0.5).bfloat16().to(device)
    seen = []
    layer = SimpleNamespace(enorm=enorm, hnorm=hnorm, eh_proj=lambda x: seen.append(x.clone()) or (x[:, :HIDDEN],),
                            mtp_block=lambda positions, x, residual, meta, plan: (x, torch.zeros_like(x)),
                            shared_head=SimpleNamespace(norm=lambda x: x))  # fmt: skip
    call = lambda *a: CpNsaMtpLayer.forward(layer, *a)  # noqa: E731
    call.mtp_block = SimpleNamespace(self_attn=SimpleNamespace(mla_attn=SimpleNamespace(layer_name="mtp")))
    call.enorm, call.hnorm = enorm, hnorm
    model = SimpleNamespace(model=SimpleNamespace(layer=lambda idx: call, runtime=SimpleNamespace(group=None),
                                                  fused_embedding=True, embed_tokens=embedding),
                            embed_input_ids=embedding)  # fmt: skip
    monkeypatch.setattr(adapter_mtp, "forward_metadata_for", lambda name, n, group: (None, unsplit_plan(n, 1, 0, "t")))
    monkeypatch.setattr(adapter_mtp, "embedding_kernel_applies", lambda input_ids: fused)
    with torch.inference_mode():
        hidden, recycled = CpNsaDeepseekV32MTP.forward(model, ids, positions, previous)
    assert hidden.shape == recycled.shape == (len(ids), HIDDEN)
    (x,) = seen
    rows = torch.where(positions[:, None] == 0, 0, embedding.weight.detach()[ids])
    exact = torch.cat([_exact_rms_norm(rows, enorm.weight, enorm.variance_epsilon),
                       _exact_rms_norm(previous, hnorm.weight, hnorm.variance_epsilon)], dim=-1)  # fmt: skip
    return x, exact


def test_mtp_draft_input_fused_equals_unfused(monkeypatch):
    """The MTP draft's input with vLLM's fused gather + norms (a stand-in of its contract on CPU)
    is the unfused one's — rows at position 0 zeroed before enorm — within one bf16 step; the
    kernel gets the layer's enorm / hnorm weights and eps."""
    from vllm.model_executor.layers import fused_embed_norm as module

    calls = []
    monkeypatch.setattr(module, "fused_embed_eh_norm", lambda *a: calls.append(a[4:]) or _eh_contract(*a))
    gen = torch.Generator().manual_seed(6)
    positions = torch.tensor([0, 5, 6, 0, 9])
    ids = torch.randint(0, VOCAB, (5,), generator=gen)
    previous = (torch.randn(5, HIDDEN, generator=gen) * 2).bfloat16()
    plain, exact = _mtp_input(monkeypatch, "cpu", False, positions, ids, previous)
    fused, _ = _mtp_input(monkeypatch, "cpu", True, positions, ids, previous)
    assert plain.shape == fused.shape == (5, 2 * HIDDEN)
    _assert_rounded_once(fused, plain, exact)
    assert not fused[positions == 0, :HIDDEN].any() and fused[positions != 0, :HIDDEN].abs().sum() > 0
    ((enorm_w, hnorm_w, eps),) = calls
    assert eps == 1e-6 and not torch.equal(enorm_w, hnorm_w)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mtp_draft_input_fused_equals_unfused(monkeypatch):
    """vLLM's fused MTP input kernel on CUDA against the five-launch path."""
    gen = torch.Generator().manual_seed(7)
    positions = torch.tensor([0, 5, 6, 0, 9] * 100).cuda()
    ids = torch.randint(0, VOCAB, (500,), generator=gen).cuda()
    previous = (torch.randn(500, HIDDEN, generator=gen) * 2).bfloat16().cuda()
    plain, exact = _mtp_input(monkeypatch, "cuda", False, positions, ids, previous)
    fused, _ = _mtp_input(monkeypatch, "cuda", True, positions, ids, previous)
    _assert_rounded_once(fused, plain, exact)
