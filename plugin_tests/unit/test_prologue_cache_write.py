"""Where the new tokens' cache writes happen: the layer's prologue kernel writes them for an
unsplit batch with metadata run eagerly or as a FULL graph (as vLLM's own V3.2 writes both
caches in its norm-rope kernel), and the attention's eager break skips its own write; a split
batch (written after its all-gather), a piecewise graph's forward (its captured pieces replay
the capture's work for any batch of that size), a forward without metadata, unallocated caches
(the memory profile) and the CPU path leave it to the attention.

CPU: the fused branch forced, its kernels' references writing (the bytes of the Triton
kernel are tested in plugin_tests/kernels/test_mla_prologue.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.layernorm import LayerNorm, RMSNorm

from vllm_cp_nsa import nsa_attention as nsa
from vllm_cp_nsa.adapter import model as adapter_model
from vllm_cp_nsa.adapter.model import CpNsaAttention, CpNsaIndexer, DeepseekRope
from vllm_cp_nsa.kernels import kv_cache_ref
from vllm_cp_nsa.nsa_attention import build_forward_metadata
from vllm_cp_nsa.split_plan import RoundRobinSplit

Q_RANK, KV_RANK, PE, KEY, HEADS, INDEX_HEADS, BLOCK = 48, 512, 64, 128, 2, 4, 16


def _layer(gen, latent_cache, index_cache):
    """A CpNsaAttention stand-in with the real ``_project`` / ``_prologue_cache_write``."""
    n = 6
    qkv = (torch.randn(n, Q_RANK + KV_RANK + PE, generator=gen) * 2).bfloat16()
    k_and_weights = (torch.randn(n, KEY + INDEX_HEADS, generator=gen) * 2).bfloat16()
    q_b = torch.randn(Q_RANK, HEADS * (32 + PE), generator=gen).bfloat16() * 0.1
    wq_b = torch.randn(Q_RANK, INDEX_HEADS * KEY, generator=gen).bfloat16() * 0.1
    key_norm = LayerNorm(KEY, eps=1e-6, dtype=torch.float32)
    q_norm, kv_norm = RMSNorm(Q_RANK, eps=1e-6, dtype=torch.bfloat16), RMSNorm(KV_RANK, eps=1e-6, dtype=torch.bfloat16)
    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                             max_position_embeddings=4096)  # fmt: skip
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        mla_rope, index_rope = DeepseekRope(config, PE, is_neox_style=False), DeepseekRope(config, PE, True)
    finally:
        torch.set_default_dtype(default_dtype)
    indexer = SimpleNamespace(wq_b=lambda q_c: (q_c @ wq_b,), wk_weights_proj=lambda x: (k_and_weights.clone(),),
                              n_heads=INDEX_HEADS, head_dim=KEY, rope_dim=PE, k_norm=key_norm, rotary_emb=index_rope,
                              weight_scale=torch.tensor([0.25]),
                              k_cache=SimpleNamespace(kv_cache=index_cache, fp8=True))  # fmt: skip
    for name in ("key_and_weights", "query", "key_norm", "norm_and_rotate"):
        setattr(indexer, name, getattr(CpNsaIndexer, name).__get__(indexer))
    layer = SimpleNamespace(fused_qkv_a_proj=lambda x: (qkv.clone(),), q_lora_rank=Q_RANK, kv_lora_rank=KV_RANK,
                            qk_rope_head_dim=PE, qk_nope_head_dim=32, qk_head_dim=32 + PE, q_a_layernorm=q_norm,
                            kv_a_layernorm=kv_norm, indexer=indexer, rotary_emb=mla_rope, index_q_fp8_heads=0,
                            _q_b=lambda q_c, heads: q_c @ q_b,
                            mla_attn=SimpleNamespace(kv_cache=latent_cache, kv_cache_dtype="fp8_ds_mla"))  # fmt: skip
    for name in ("_prologue_cache_write", "_caches"):
        setattr(layer, name, getattr(CpNsaAttention, name).__get__(layer))
    return layer, n


def _meta(n: int, slots: torch.Tensor, split: bool):
    table = torch.arange(4, dtype=torch.int32).view(1, 4)
    if not split:
        return build_forward_metadata([n], slots, table, BLOCK, 1, 0, None, 0, 1, "cpu")
    return build_forward_metadata([n], slots, table, BLOCK, 2, 0, RoundRobinSplit(), 0, 1, "cpu")


@pytest.fixture(autouse=True)
def vllm_config():
    """vLLM's norm and rotary classes pick their forward from a current config."""
    with set_current_vllm_config(VllmConfig()):
        yield


@pytest.mark.parametrize("case", ["unsplit", "split", "no-metadata", "no-cache", "cpu-branch", "piecewise-graph"])
def test_the_prologue_writes_an_unsplit_batchs_tokens(monkeypatch, case):
    gen = torch.Generator().manual_seed(3)
    latent = torch.zeros(4, BLOCK, 656, dtype=torch.uint8)
    index = torch.zeros(4, BLOCK * 132, dtype=torch.uint8)
    layer, n = _layer(gen, latent if case != "no-cache" else latent[:0], index)
    slots = torch.tensor([17, 18, 19, -1, 40, 41])  # one token of the batch not written
    meta = None if case == "no-metadata" else _meta(n, slots, case == "split")
    if case != "cpu-branch":
        monkeypatch.setattr(adapter_model, "prologue_kernels_apply", lambda positions, *rows: True)
    # vLLM's forward context: a piecewise graph's capture or replay (the V2 runner captures with a dummy batch)
    monkeypatch.setattr(adapter_model, "in_piecewise_cudagraph", lambda: case == "piecewise-graph")
    positions = torch.tensor([3, 4, 5, 6, 7, 8])
    with torch.inference_mode():
        out = CpNsaAttention._project(layer, positions, torch.empty(n, 8), None, meta)
    written = out[-1]
    assert written is (case == "unsplit")
    if not written:
        assert not latent.any() and not index.any()
        return
    # the tokens as the attention would have written them from the same rows
    _, _, _, kv_c, k_pe, _, _, index_k, _, _ = out
    want_latent, want_index = torch.zeros_like(latent), torch.zeros_like(index)
    kv_cache_ref.write_latent_cache(want_latent, kv_c, k_pe, slots, "fp8_ds_mla")
    kv_cache_ref.write_indexer_cache(want_index, index_k, slots, BLOCK, True)
    assert torch.equal(latent, want_latent) and torch.equal(index, want_index) and latent.any()


def test_the_attention_skips_the_write_the_prologue_did(monkeypatch):
    """``nsa_attention(caches_written=True)`` does not write the new tokens again; without it,
    it does (once per layer)."""
    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop

    calls = []
    monkeypatch.setattr(nsa, "write_new_tokens", lambda *a: calls.append("write"))
    monkeypatch.setattr(nsa, "select_topk_positions", stop)
    for written in (True, False):
        with pytest.raises(Stop):  # stop after the write decision
            nsa.nsa_attention(q_nope=torch.zeros(1, 1, 1), q_pe=None, kv_c=None, k_pe=None, index_q=None,
                              index_weights=None, index_k=None, local_positions=None, w_uk_t=None,
                              w_uv=torch.zeros(1, 1, 1), meta=SimpleNamespace(whole_prompts=None), caches=None,
                              topk=1, sm_scale=1.0, group=None, ops=None, caches_written=written)  # fmt: skip
    assert calls == ["write"]
