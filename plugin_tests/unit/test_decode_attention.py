"""Splitting the attention heads (``decode_attention: tp``, or what ``auto`` resolves to) needs
attention projections it can slice by head: unquantized ``q_b_proj`` / ``o_proj`` and heads
divisible by the ranks. Checked once, at config time (``runtime.heads_split_blocker``): an
explicit ``tp`` is refused at startup naming the fix, ``auto`` falls back to split decode.

The quantized projection is a real one: vLLM's fp8 block-quantized ``ReplicatedLinear``
(``Fp8LinearMethod``, 128x128 blocks, as DeepSeek-V3.2's checkpoint), loaded through its
weight loaders and run on CPU against the dequantized product computed here; the refused
checkpoint is the tiny model in the release's format (fp8 block weights + scales)."""

import copy
import logging
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel, init_distributed_environment,
                              initialize_model_parallel)  # fmt: skip
from vllm.model_executor.layers.linear import ReplicatedLinear, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod

from vllm_cp_nsa.adapter import config_hook
from vllm_cp_nsa.adapter.runtime import attention_split_policy, heads_split_blocker
from vllm_cp_nsa.config import CpNsaConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
from make_tiny_model import build_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def vllm_single_rank():
    """vLLM's parallel state for one process (its linear layers read the TP group), and a
    current config whose model dtype the fp8 method reads; torn down afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = VllmConfig()
    object.__setattr__(config, "model_config", SimpleNamespace(dtype=torch.bfloat16, is_moe=False))
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     local_rank=0, backend="gloo")  # fmt: skip
        initialize_model_parallel(1, 1)
        try:
            yield
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


def _fp8_block_linear(n_in: int, n_out: int, gen: torch.Generator):
    """(layer, dequantized weight [n_out, n_in] float64): an fp8 128x128-block linear loaded
    with a random fp8 weight and per-block scales."""
    quant = Fp8Config(is_checkpoint_fp8_serialized=True, activation_scheme="dynamic", weight_block_size=[128, 128])
    layer = ReplicatedLinear(n_in, n_out, bias=False, quant_config=quant, prefix="o_proj",
                             params_dtype=torch.bfloat16, disable_tp=True)  # fmt: skip
    weight = (torch.randn(n_out, n_in, generator=gen) * 0.5).to(torch.float8_e4m3fn)
    scales = torch.rand(n_out // 128, n_in // 128, generator=gen) + 0.5
    layer.weight.weight_loader(layer.weight, weight)
    layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, scales)
    layer.quant_method.process_weights_after_loading(layer)
    dequantized = weight.double() * scales.double().repeat_interleave(128, 0).repeat_interleave(128, 1)
    return layer, dequantized


@pytest.mark.skipif(not torch.cpu._is_amx_tile_supported(),
                    reason="vLLM's CPU fp8 block GEMM needs AMX tiles (Sapphire Rapids or newer); this CPU has none")
def test_a_quantized_checkpoints_projection_has_no_weight_to_slice_by_head(vllm_single_rank):
    """What the config-time check stands for: under an fp8 checkpoint's quantization the
    projection holds fp8 blocks whose meaning needs the per-block scales (a row slice of the
    weight is not the projection of those heads); unquantized, it is a plain weight."""
    gen = torch.Generator().manual_seed(0)
    layer, dequantized = _fp8_block_linear(256, 384, gen)
    assert isinstance(layer.quant_method, Fp8LinearMethod) and layer.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    expected = x.double() @ dequantized.T
    got = layer(x)[0].double()
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2  # bf16 activations, fp8 weight
    plain = ReplicatedLinear(256, 384, bias=False, quant_config=None, prefix="q_b_proj", disable_tp=True)
    assert isinstance(plain.quant_method, UnquantizedLinearMethod) and plain.weight.dtype.is_floating_point


@pytest.fixture(scope="module")
def release_config(tmp_path_factory):
    """-tp 2 VllmConfig of the tiny checkpoint in the release's format (fp8 block weights)."""
    from vllm.engine.arg_utils import EngineArgs

    model = build_tiny_model(tmp_path_factory.mktemp("release") / "v32", seed=0, preset="release")
    return EngineArgs(model=str(model), tensor_parallel_size=2, max_model_len=1024,
                      additional_config={"cp_nsa": {"mode": "round-robin-split"}}).create_engine_config()


def _with_options(config, options: dict):
    cfg = copy.deepcopy(config)
    cfg.additional_config = {"cp_nsa": options}
    return cfg


def test_explicit_tp_on_an_fp8_checkpoint_is_refused_at_startup(release_config):
    from vllm.engine.arg_utils import EngineArgs

    assert release_config.model_config.quantization == "fp8"
    with pytest.raises(Exception, match=r"decode_attention='tp' splits the attention heads over the 2 ranks, but the "
                                        r"checkpoint quantizes q_b_proj / o_proj \(fp8\).*Use decode_attention='auto' "
                                        r"\(split decode here\) or 'split'"):
        EngineArgs(model=release_config.model_config.model, tensor_parallel_size=2, max_model_len=1024,
                   additional_config={"cp_nsa": {"mode": "round-robin-split", "decode_attention": "tp"}},
                   ).create_engine_config()
    # one rank: nothing is split, nothing to refuse
    cfg = _with_options(release_config, {"decode_attention": "tp"})
    cfg.parallel_config.tensor_parallel_size = 1
    assert not attention_split_policy(cfg).heads_split


def test_auto_on_an_fp8_checkpoint_splits_decode_and_keeps_all_heads(release_config, monkeypatch):
    """N=2 bf16 KV: the table says head-split (TP) decode; the fp8 projections forbid it, so
    decode splits over the ranks and unsplit batches keep all heads; the startup line says why."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("vllm.cp_nsa")
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, handler])
    monkeypatch.setattr(logger, "level", logging.INFO)
    cfg = _with_options(release_config, {"mode": "round-robin-split"})
    config_hook.CpNsaV32ConfigHook.verify_and_update_config(cfg)
    policy = attention_split_policy(cfg)
    assert (policy.split_decode, policy.min_tokens_for_cp, policy.decode_min_tokens, policy.heads_split) == (
        True, 2048, 0, False)
    line = next(r.getMessage() for r in records if "kernels=" in r.getMessage())
    assert ("decode / verify batches split over the ranks; batches with < 2048 real tokens unsplit (all heads on "
            "every rank)") in line
    assert "auto decode falls back to split: the checkpoint quantizes q_b_proj / o_proj (fp8)" in line


def test_heads_not_divisible_by_the_ranks_block_the_head_split(release_config):
    cfg = _with_options(release_config, {"mode": "round-robin-split"})
    assert cfg.model_config.hf_config is not release_config.model_config.hf_config
    cfg.model_config.quantization = None
    cfg.model_config.hf_config.num_attention_heads = 6
    cfg.parallel_config.tensor_parallel_size = 4
    assert heads_split_blocker(cfg) == "the 6 attention heads are not a multiple of the 4 ranks"
    assert not attention_split_policy(cfg).heads_split  # auto: N=4 bf16 splits decode anyway
    cfg.additional_config = {"cp_nsa": {"mode": "round-robin-split", "decode_attention": "tp"}}
    with pytest.raises(CpNsaConfigError, match="the 6 attention heads are not a multiple of the 4 ranks"):
        attention_split_policy(cfg)
    cfg.model_config.hf_config.num_attention_heads = 8
    assert heads_split_blocker(cfg) is None and attention_split_policy(cfg).heads_split
