"""MTP-aware CUDA-graph sizing under CP: the sizing function and its hook."""

import math

import pytest

from vllm_cp_nsa.graph_sizing import cp_capture_sizes

GRID = [(n, k, s) for n in (1, 2, 3, 4, 8) for k in (0, 1, 2, 3) for s in (1, 8, 256)]


@pytest.mark.parametrize("cp,k,max_num_seqs", GRID)
def test_sizes_invariants(cp, k, max_num_seqs):
    max_batched = 8192
    sizes = cp_capture_sizes(cp_size=cp, num_speculative_tokens=k, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_batched)
    q = 1 + k
    limit = min(max(min(max_num_seqs * q * 2, 512), math.lcm(cp, q)), max_batched)
    assert sizes.sizes == sorted(set(sizes.sizes)) and sizes.max_size == sizes.sizes[-1]
    assert all(s % cp == 0 for s in sizes.sizes)
    assert all(s <= limit for s in sizes.sizes)
    assert sizes.decode_sizes and set(sizes.decode_sizes) <= set(sizes.sizes)
    assert all(s % math.lcm(cp, q) == 0 for s in sizes.decode_sizes)
    # Every uniform decode batch of up to max_num_seqs requests that fits the limit has
    # a decode size at most one doubling step above it.
    for reqs in range(1, max_num_seqs + 1):
        if reqs * q <= limit and reqs * q <= sizes.decode_sizes[-1]:
            assert any(d >= reqs * q for d in sizes.decode_sizes)


@pytest.mark.parametrize("max_batched,max_capture", [(64, None), (4096, 96), (300, 1000)])
def test_never_above_limits(max_batched, max_capture):
    for cp in (2, 3, 8):
        sizes = cp_capture_sizes(cp_size=cp, num_speculative_tokens=2, max_num_seqs=256,
                                 max_num_batched_tokens=max_batched, max_capture_size=max_capture)
        limit = min(max_batched, max_capture if max_capture is not None else 512)
        assert sizes.max_size <= limit and all(s % cp == 0 for s in sizes.sizes)


def test_explicit_sizes_are_rounded_and_changes_listed():
    sizes = cp_capture_sizes(cp_size=4, num_speculative_tokens=1, max_num_seqs=64,
                             max_num_batched_tokens=2048, max_capture_size=64,
                             requested_sizes=[1, 4, 6, 8, 63, 64, 100])
    assert sizes.sizes == [4, 8, 64]
    assert sizes.changes == [(1, 4), (6, 8), (63, 64), (100, None)]
    assert sizes.decode_sizes == [4, 8, 64]      # lcm(4, 2) = 4
    unchanged = cp_capture_sizes(cp_size=2, num_speculative_tokens=0, max_num_seqs=8,
                                 max_num_batched_tokens=2048, requested_sizes=[2, 4, 8])
    assert unchanged.sizes == [2, 4, 8] and unchanged.changes == []


def test_impossible_limits_fail_clearly():
    with pytest.raises(ValueError, match="no CUDA-graph capture size"):
        cp_capture_sizes(cp_size=8, num_speculative_tokens=0, max_num_seqs=1, max_num_batched_tokens=4)
    with pytest.raises(ValueError, match="no CUDA-graph capture size"):
        cp_capture_sizes(cp_size=4, num_speculative_tokens=0, max_num_seqs=8, max_num_batched_tokens=512,
                         max_capture_size=3)


@pytest.mark.parametrize("cp,k,max_num_seqs", GRID)
def test_decode_only_sizes_serve_uniform_decode(cp, k, max_num_seqs):
    """FULL_DECODE_ONLY: every size is a decode size, so vLLM's own rounding to 1+k
    (adjust_cudagraph_sizes_for_spec_decode) cannot break the multiple of N."""
    sizes = cp_capture_sizes(cp_size=cp, num_speculative_tokens=k, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=8192, decode_only=True)
    assert sizes.sizes == sizes.decode_sizes
    assert all(s % math.lcm(cp, 1 + k) == 0 for s in sizes.sizes)
    requested = cp_capture_sizes(cp_size=cp, num_speculative_tokens=k, max_num_seqs=max_num_seqs,
                                 max_num_batched_tokens=8192, decode_only=True, requested_sizes=[1, 5, 24])
    assert all(s % math.lcm(cp, 1 + k) == 0 for s in requested.sizes)
    assert all(used is None or used % math.lcm(cp, 1 + k) == 0 for _, used in requested.changes)


def test_hook_on_a_real_vllm_config(tmp_path, caplog):
    """The engine's own VllmConfig (hook run by vLLM), then vLLM's own size
    resolution keeps the plugin's sizes (explicit sizes win there)."""
    import logging
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
    from make_tiny_model import build_tiny_model
    from vllm.config import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    from vllm_cp_nsa.adapter.config_hook import set_cp_capture_sizes

    model = build_tiny_model(tmp_path / "v32", seed=0)
    args = EngineArgs(model=str(model), tensor_parallel_size=4, max_model_len=1024, max_num_seqs=16,
                      additional_config={"cp_nsa": {"mode": "round-robin-split"}},
                      speculative_config={"method": "mtp", "num_speculative_tokens": 2})
    cfg = args.create_engine_config()
    compilation = cfg.compilation_config
    # The hook ran inside VllmConfig.__post_init__ (before the CPU platform turned
    # graphs off): the max size is the plugin's, multiple of lcm(4, 3).
    assert compilation.max_cudagraph_capture_size == 96
    # Re-run the hook and vLLM's own resolution as a GPU host would (graphs on).
    compilation.cudagraph_capture_sizes, compilation.max_cudagraph_capture_size = None, None
    compilation.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    set_cp_capture_sizes(cfg)
    ours = list(compilation.cudagraph_capture_sizes)
    cfg._set_cudagraph_sizes()
    assert compilation.cudagraph_capture_sizes == ours and compilation.max_cudagraph_capture_size == ours[-1]
    assert all(s % 4 == 0 for s in ours) and {12, 24, 48, 96} <= set(ours)

    compilation.cudagraph_capture_sizes = [1, 2, 5, 8]
    plugin_logger = logging.getLogger("vllm.cp_nsa")  # vLLM's logging config stops propagation
    plugin_logger.addHandler(caplog.handler)
    try:
        set_cp_capture_sizes(cfg)
    finally:
        plugin_logger.removeHandler(caplog.handler)
    assert compilation.cudagraph_capture_sizes == [4, 8]
    assert "1->4, 2->4, 5->8" in caplog.text


def test_hook_sets_full_decode_only(tmp_path, caplog):
    """The hook picks FULL_DECODE_ONLY (mixed batches eager: the model is not compiled
    and vLLM turns on breakable graphs for V3.2), keeps NONE, changes other modes with a
    warning, and its sizes survive vLLM's own spec-decode rounding."""
    import logging
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
    from make_tiny_model import build_tiny_model
    from vllm.config import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    from vllm_cp_nsa.adapter.config_hook import CpNsaV32ConfigHook

    model = build_tiny_model(tmp_path / "v32", seed=0)
    # split decode (auto at N=2 would run decode unsplit: its sizes are test_decode_attention_tp_...'s)
    cfg = EngineArgs(model=str(model), tensor_parallel_size=2, max_model_len=1024, max_num_seqs=16,
                     additional_config={"cp_nsa": {"mode": "round-robin-split", "decode_attention": "split"}},
                     speculative_config={"method": "mtp", "num_speculative_tokens": 2}).create_engine_config()
    compilation = cfg.compilation_config
    plugin_logger = logging.getLogger("vllm.cp_nsa")
    plugin_logger.addHandler(caplog.handler)
    try:
        for requested, expected in ((None, CUDAGraphMode.FULL_DECODE_ONLY),
                                    (CUDAGraphMode.NONE, CUDAGraphMode.NONE),
                                    (CUDAGraphMode.FULL_DECODE_ONLY, CUDAGraphMode.FULL_DECODE_ONLY),
                                    (CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL_DECODE_ONLY),
                                    (CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.FULL_DECODE_ONLY)):
            caplog.clear()
            compilation.cudagraph_mode = requested
            compilation.cudagraph_capture_sizes, compilation.max_cudagraph_capture_size = None, None
            CpNsaV32ConfigHook.verify_and_update_config(cfg)
            assert compilation.cudagraph_mode == expected
            warned = "-> FULL_DECODE_ONLY" in caplog.text
            assert warned == (requested not in (None, CUDAGraphMode.NONE, CUDAGraphMode.FULL_DECODE_ONLY))
    finally:
        plugin_logger.removeHandler(caplog.handler)
    compilation.cudagraph_mode = None
    compilation.cudagraph_capture_sizes, compilation.max_cudagraph_capture_size = None, None
    CpNsaV32ConfigHook.verify_and_update_config(cfg)
    ours = list(compilation.cudagraph_capture_sizes)
    assert ours and all(s % 6 == 0 for s in ours)  # lcm(2, 1 + 2)
    cfg._set_cudagraph_sizes()
    compilation.adjust_cudagraph_sizes_for_spec_decode(3)
    assert compilation.cudagraph_capture_sizes == ours


def test_decode_attention_tp_sizes_follow_only_the_verify_length(tmp_path):
    """decode_attention='tp': FULL_DECODE_ONLY graphs hold unsplit decode batches, so the
    sizes need only be multiples of 1+k (3 here), not of lcm(4, 3) = 12. The hook passes the
    split policy's choice: auto at N=4 splits decode with a bf16 cache, not with fp8."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
    from make_tiny_model import build_tiny_model
    from vllm.config import CUDAGraphMode
    from vllm.engine.arg_utils import EngineArgs

    from vllm_cp_nsa.adapter.config_hook import CpNsaV32ConfigHook, set_cp_capture_sizes

    model = build_tiny_model(tmp_path / "v32", seed=0)
    cfg = EngineArgs(model=str(model), tensor_parallel_size=4, max_model_len=1024, max_num_seqs=16,
                     additional_config={"cp_nsa": {"mode": "round-robin-split", "decode_attention": "tp"}},
                     speculative_config={"method": "mtp", "num_speculative_tokens": 2}).create_engine_config()
    compilation = cfg.compilation_config
    compilation.cudagraph_mode = CUDAGraphMode.FULL_DECODE_ONLY
    for split_decode, multiple in ((True, 12), (False, 3)):
        compilation.cudagraph_capture_sizes, compilation.max_cudagraph_capture_size = None, None
        set_cp_capture_sizes(cfg, split_decode=split_decode)
        sizes = list(compilation.cudagraph_capture_sizes)
        assert all(s % multiple == 0 for s in sizes), (split_decode, sizes)
        assert (3 in sizes) is (not split_decode)
    for kv_cache_dtype, multiple in (("auto", 12), ("fp8", 3)):
        cfg = EngineArgs(model=str(model), tensor_parallel_size=4, max_model_len=1024, max_num_seqs=16,
                         kv_cache_dtype=kv_cache_dtype, additional_config={"cp_nsa": {"mode": "round-robin-split"}},
                         speculative_config={"method": "mtp", "num_speculative_tokens": 2}).create_engine_config()
        compilation = cfg.compilation_config
        compilation.cudagraph_mode = None  # as before vLLM's CPU platform turned graphs off
        compilation.cudagraph_capture_sizes, compilation.max_cudagraph_capture_size = None, None
        CpNsaV32ConfigHook.verify_and_update_config(cfg)
        assert compilation.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY
        sizes = list(compilation.cudagraph_capture_sizes)
        assert all(s % multiple == 0 for s in sizes) and (3 in sizes) is (multiple == 3), (kv_cache_dtype, sizes)


@pytest.mark.parametrize("cp_size,mode,heads_split,moe_ok,expected", [
    (1, "off", False, True, True),
    (1, "round-robin-split", False, True, True),   # one rank: the plan never splits
    (4, "off", False, True, True),
    (4, "round-robin-split", False, True, False),
    (4, "in-seq-split", False, True, False),
    (4, "off", True, True, False),
    (1, "off", False, False, False),
])
def test_piecewise_graphs_only_for_a_layout_fixed_by_the_padded_size(cp_size, mode, heads_split, moe_ok, expected):
    from vllm_cp_nsa.graph_sizing import piecewise_graph_decision

    ok, reason = piecewise_graph_decision(cp_size=cp_size, mode=mode, heads_split=heads_split,
                                          moe_capturable=moe_ok)
    assert ok is expected and reason
