"""``decode_attention: tp`` refuses attention projections it cannot slice by head.

The quantized projection is a real one: vLLM's fp8 block-quantized ``ReplicatedLinear``
(``Fp8LinearMethod``, 128x128 blocks, as DeepSeek-V3.2's checkpoint), loaded through its
weight loaders and run on CPU against the dequantized product computed here."""

import socket
from types import SimpleNamespace

import pytest
import torch

from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed import (destroy_distributed_environment, destroy_model_parallel, init_distributed_environment,
                              initialize_model_parallel)  # fmt: skip
from vllm.model_executor.layers.linear import ReplicatedLinear, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization.fp8 import Fp8Config

from vllm_cp_nsa.adapter.model import check_heads_sliceable
from vllm_cp_nsa.config import CpNsaConfigError


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


def test_unquantized_projections_can_be_sliced_a_loaded_fp8_layer_is_refused(vllm_single_rank):
    gen = torch.Generator().manual_seed(0)
    layer, dequantized = _fp8_block_linear(256, 384, gen)
    assert layer.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(5, 256, generator=gen).to(torch.bfloat16)
    expected = x.double() @ dequantized.T
    got = layer(x)[0].double()
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2  # bf16 activations, fp8 weight
    plain = ReplicatedLinear(256, 384, bias=False, quant_config=None, prefix="q_b_proj", disable_tp=True)
    assert isinstance(plain.quant_method, UnquantizedLinearMethod)
    check_heads_sliceable(plain, plain)
    with pytest.raises(CpNsaConfigError, match=r"needs them unquantized; this checkpoint quantizes them "
                                               r"\(Fp8LinearMethod\)\. Use decode_attention='split'"):
        check_heads_sliceable(plain, layer)
