"""Step aside: the hand-over classes registered for DeepSeek-V3.2 carry vLLM's own model
info and build vLLM's model unless the plugin is active; the config hook changes nothing
when inactive and refuses at startup what the plugin's model does not support."""

import copy
import importlib.util
import logging
import sys
import types
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from vllm.platforms import current_platform

import vllm_cp_nsa.plugin as plugin
from vllm_cp_nsa.adapter import config_hook, handover
from vllm_cp_nsa.adapter.mtp import CpNsaDeepseekV32MTP
from vllm_cp_nsa.adapter.model import CpNsaDeepseekV32ForCausalLM
from vllm_cp_nsa.config import CpNsaConfigError

INACTIVE_LINE = ("vllm_cp_nsa: installed but not active: no cp_nsa in --additional-config; "
                 "vLLM's own DeepSeek-V3.2 runs")


@pytest.fixture(scope="module")
def cuda_handover():
    """adapter/handover.py as imported on a CUDA host: built over vLLM's CUDA V3.2 classes
    (``vllm.models.deepseek_v32`` resolves per platform; the CUDA module imports on CPU)."""
    from vllm.models.deepseek_v32.nvidia.model import DeepseekV32ForCausalLM
    from vllm.models.deepseek_v32.nvidia.mtp import DeepseekV32MTP

    cuda_entry = types.ModuleType("vllm.models.deepseek_v32")
    cuda_entry.DeepseekV32ForCausalLM, cuda_entry.DeepseekV32MTP = DeepseekV32ForCausalLM, DeepseekV32MTP
    spec = importlib.util.spec_from_file_location("vllm_cp_nsa.adapter._handover_cuda", handover.__file__)
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules["vllm.models.deepseek_v32"]
    sys.modules["vllm.models.deepseek_v32"] = cuda_entry
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules["vllm.models.deepseek_v32"] = saved
    return module


@pytest.fixture
def on_cuda(monkeypatch):
    """A platform where vLLM's own V3.2 runs."""
    monkeypatch.setattr(plugin, "vllm_serves_v32_here", lambda: True)


class Recorder:
    """Replaces a model class's ``__init__``: records the call, builds an empty module."""

    def __init__(self):
        self.calls = []

    def install(self, monkeypatch, cls):
        calls = self.calls

        def init(model, *, vllm_config, prefix=""):
            torch.nn.Module.__init__(model)
            calls.append((type(model), vllm_config, prefix))

        monkeypatch.setattr(cls, "__init__", init)


def _vllm_config(additional_config, quant_config=None):
    return types.SimpleNamespace(additional_config=additional_config, quant_config=quant_config)


PAIRS = [("DeepseekV32ForCausalLM", CpNsaDeepseekV32ForCausalLM),
         ("DeepseekV32MTP", CpNsaDeepseekV32MTP)]


@pytest.mark.parametrize("name,plugin_cls", PAIRS)
@pytest.mark.parametrize("additional_config,plugin_builds", [
    ({}, False), (None, False), ({"other_plugin": {}}, False),
    ({"cp_nsa": {}}, True), ({"cp_nsa": {"mode": "off"}}, True),
    ({"cp_nsa": {"mode": "round-robin-split"}}, True),
])
def test_handover_builds_vllms_model_unless_cp_nsa(monkeypatch, on_cuda, cuda_handover, name, plugin_cls,
                                                   additional_config, plugin_builds):
    handover_cls = getattr(cuda_handover, name)
    vllm_cls = handover_cls.__mro__[1]
    assert vllm_cls.__module__.startswith("vllm.models.deepseek_v32.nvidia")
    recorder = Recorder()
    recorder.install(monkeypatch, vllm_cls)
    recorder.install(monkeypatch, plugin_cls)
    config = _vllm_config(additional_config)
    model = handover_cls(vllm_config=config, prefix="p")
    expected = plugin_cls if plugin_builds else vllm_cls
    assert type(model) is expected
    assert recorder.calls == [(expected, config, "p")]  # one __init__, the built class's


@pytest.mark.parametrize("name,plugin_cls", PAIRS)
def test_handover_on_cpu_builds_the_plugins_model(monkeypatch, name, plugin_cls):
    """vLLM cannot run V3.2 on CPU: the plugin serves it without cp_nsa."""
    recorder = Recorder()
    recorder.install(monkeypatch, plugin_cls)
    recorder.install(monkeypatch, getattr(handover, name).__mro__[1])
    model = getattr(handover, name)(vllm_config=_vllm_config({}), prefix="")
    assert type(model) is plugin_cls and len(recorder.calls) == 1


def test_active_build_hands_the_quant_config_the_plugins_packed_modules(monkeypatch):
    recorder = Recorder()
    recorder.install(monkeypatch, CpNsaDeepseekV32ForCausalLM)
    quant = types.SimpleNamespace(packed_modules_mapping={"fused_qkv_a_proj": ["q_a_proj", "kv_a_proj_with_mqa"]})
    handover.DeepseekV32ForCausalLM(vllm_config=_vllm_config({"cp_nsa": {}}, quant), prefix="")
    assert quant.packed_modules_mapping is CpNsaDeepseekV32ForCausalLM.packed_modules_mapping


@pytest.mark.parametrize("name", ["DeepseekV32ForCausalLM", "DeepseekV32MTP"])
def test_model_info_is_vllms_own(cuda_handover, name):
    """What vLLM reads from the registered class (supports_pp, interfaces, ...) is exactly
    what it reads from its own class, on CUDA (name included) and on CPU."""
    from vllm.model_executor.models.registry import _ModelInfo

    cuda_cls = getattr(cuda_handover, name)
    assert _ModelInfo.from_model_cls(cuda_cls) == _ModelInfo.from_model_cls(cuda_cls.__mro__[1])
    cpu_cls = getattr(handover, name)
    ours, vllms = _ModelInfo.from_model_cls(cpu_cls), _ModelInfo.from_model_cls(cpu_cls.__mro__[1])
    assert replace(ours, architecture=vllms.architecture) == vllms
    assert ours.supports_pp  # vLLM's class supports PP: the config hook must refuse it (below)


def test_registered_classes_resolve_to_the_handover():
    from vllm.model_executor.models import ModelRegistry

    from vllm_cp_nsa.architectures import ARCHITECTURE, MTP_ARCHITECTURE

    plugin.register()
    assert ModelRegistry.models[ARCHITECTURE].load_model_cls() is handover.DeepseekV32ForCausalLM
    assert ModelRegistry.models[MTP_ARCHITECTURE].load_model_cls() is handover.DeepseekV32MTP


# --- the config hook ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_config(tmp_path_factory):
    """The tiny V3.2's VllmConfig as vLLM builds it (hook included), -tp 2."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "eval"))
    from make_tiny_model import build_tiny_model
    from vllm.engine.arg_utils import EngineArgs

    model = build_tiny_model(tmp_path_factory.mktemp("v32") / "v32", seed=0)
    return EngineArgs(model=str(model), tensor_parallel_size=2, max_model_len=1024, max_num_seqs=16,
                      additional_config={"cp_nsa": {"mode": "round-robin-split"}}).create_engine_config()


def _fresh(base, additional_config, **changes):
    """A copy of ``base`` as it is before any model hook ran: graphs on, no sizes, and a
    KV dtype the plugin would canonicalize."""
    from vllm.config import CUDAGraphMode

    cfg = copy.deepcopy(base)
    cfg.additional_config = additional_config
    cfg.compilation_config.cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
    cfg.compilation_config.cudagraph_capture_sizes = None
    cfg.compilation_config.max_cudagraph_capture_size = None
    cfg.cache_config.cache_dtype = "fp8"
    for path, value in changes.items():
        section, field = path.split("__")
        setattr(getattr(cfg, section), field, value)
    return cfg


def _state(cfg) -> dict:
    return {section: repr(asdict(getattr(cfg, section)) if hasattr(getattr(cfg, section), "__dataclass_fields__")
                          else vars(getattr(cfg, section)))
            for section in ("compilation_config", "cache_config", "scheduler_config", "parallel_config",
                            "model_config")}


class PluginLog(logging.Handler):
    """The plugin logger's records (vLLM's logging config may stop propagation to pytest)."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def clear(self):
        self.records.clear()


@pytest.fixture
def plugin_log(monkeypatch):
    logger = logging.getLogger("vllm.cp_nsa")
    handler = PluginLog()
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, handler])
    monkeypatch.setattr(logger, "level", logging.INFO)
    monkeypatch.setattr(config_hook, "_logged_lines", set())
    return handler


def test_inactive_hook_changes_nothing_but_vllms_hook(on_cuda, base_config, plugin_log):
    hook = config_hook.CpNsaV32ConfigHook
    for additional_config in ({}, {"other_plugin": 1}):
        ours = _fresh(base_config, additional_config)
        vllms = _fresh(base_config, additional_config)
        hook.verify_and_update_config(ours)
        hook.previous.verify_and_update_config(vllms)
        assert _state(ours) == _state(vllms)
        assert ours.cache_config.cache_dtype == "fp8"
    assert plugin_log.messages() == [INACTIVE_LINE]  # once
    # The same comparison with cp_nsa tells the two apart (graph mode, KV dtype).
    active, vllms = _fresh(base_config, {"cp_nsa": {}}), _fresh(base_config, {"cp_nsa": {}})
    hook.verify_and_update_config(active)
    hook.previous.verify_and_update_config(vllms)
    assert _state(active) != _state(vllms) and active.cache_config.cache_dtype == "fp8_ds_mla"


def test_cpu_serves_v32_without_cp_nsa(base_config, plugin_log):
    cfg = _fresh(base_config, {})
    config_hook.CpNsaV32ConfigHook.verify_and_update_config(cfg)
    assert cfg.cache_config.cache_dtype == "fp8_ds_mla"
    lines = plugin_log.messages()
    assert any("no cp_nsa in --additional-config, but vLLM cannot run DeepSeek-V3.2 on cpu" in line
               and "the plugin serves it" in line for line in lines), lines


UNSUPPORTED = [
    ({"parallel_config__pipeline_parallel_size": 2}, "pipeline parallelism (--pipeline-parallel-size 2)"),
    ({"parallel_config__decode_context_parallel_size": 2}, "--decode-context-parallel-size 2"),
    ({"parallel_config__prefill_context_parallel_size": 2}, "--prefill-context-parallel-size 2"),
    ({"lora_config__": object()}, "LoRA (--enable-lora)"),
    ({"parallel_config__enable_eplb": True}, "expert load balancing (--enable-eplb)"),
    ({"parallel_config__data_parallel_size": 2}, "moe='full' cannot run with data parallelism"),
    ({"parallel_config__data_parallel_size": 2, "parallel_config__enable_expert_parallel": True,
      "additional_config__": {"cp_nsa": {"mode": "round-robin-split", "moe": "full"}}},
     "moe='full' cannot run with data parallelism (--data-parallel-size 2)"),
    ({"parallel_config__data_parallel_size": 2,
      "additional_config__": {"cp_nsa": {"mode": "round-robin-split", "moe": "scattered"}}},
     "moe='scattered' cannot run with data parallelism (--data-parallel-size 2) without --enable-expert-parallel"),
]


def _set(cfg, changes):
    for path, value in changes.items():
        section, field = path.split("__")
        if field:
            setattr(getattr(cfg, section), field, value)
        else:
            setattr(cfg, section, value)


@pytest.mark.parametrize("changes,expected", UNSUPPORTED)
@pytest.mark.parametrize("cuda", [True, False])
def test_active_hook_refuses_what_the_plugin_model_lacks(monkeypatch, base_config, changes, expected, cuda):
    monkeypatch.setattr(plugin, "vllm_serves_v32_here", lambda: cuda)
    cfg = _fresh(base_config, {"cp_nsa": {"mode": "round-robin-split"}})
    _set(cfg, changes)
    with pytest.raises(CpNsaConfigError) as err:
        config_hook.refuse_unsupported(cfg, config_hook.CpNsaConfig.from_additional_config(cfg.additional_config))
    assert expected in str(err.value)
    assert ("remove cp_nsa from --additional-config to run vLLM's own DeepSeek-V3.2" in str(err.value)) is cuda
    # The unsupported setting is what fails: the same config without it passes.
    config_hook.refuse_unsupported(_fresh(base_config, cfg.additional_config),
                                   config_hook.CpNsaConfig.from_additional_config(cfg.additional_config))


DP_EP_ACCEPTED = [
    ("auto", "allgather_reducescatter"), ("scattered", "allgather_reducescatter"),
    ("auto", "deepep_low_latency"), ("scattered", "deepep_high_throughput"), ("auto", "deepep_v2"),
]


@pytest.mark.parametrize("moe,backend", DP_EP_ACCEPTED)
def test_dp_with_expert_parallel_runs_scattered_moe(monkeypatch, base_config, moe, backend):
    """--data-parallel-size 2 -tp 2 --enable-expert-parallel: CP inside each replica, the
    scattered MoE's experts over vLLM's EP group (all 4 ranks); one line says so."""
    from vllm_cp_nsa.adapter import runtime

    monkeypatch.setattr(config_hook, "_logged_lines", set())
    cfg = _fresh(base_config, {"cp_nsa": {"mode": "round-robin-split", "moe": moe}})
    _set(cfg, {"parallel_config__data_parallel_size": 2, "parallel_config__tensor_parallel_size": 2,
               "parallel_config__enable_expert_parallel": True, "parallel_config__all2all_backend": backend})
    options = config_hook.CpNsaConfig.from_additional_config(cfg.additional_config)
    config_hook.refuse_unsupported(cfg, options)
    refusal, line = config_hook.data_parallel_decision(cfg, options)
    assert refusal == ""
    assert "data parallelism 2 x -tp 2" in line and "moe=scattered" in line and "all 4 ranks" in line
    # on CPU vLLM's own EP MoE cannot run: the torch all-to-all stays, and the line says why
    assert ("rows moved by torch all-to-all over that group (vLLM's CPU build cannot run its "
            "expert-parallel MoE") in line
    assert runtime.vllm_expert_parallel_moe(cfg)[0] is False
    # on a GPU platform the rows ride vLLM's FusedMoE and the configured all2all backend
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    _, line = config_hook.data_parallel_decision(cfg, options)
    assert (f"rows moved by vLLM's FusedMoE with its '{backend}' all2all backend, each rank's CP rows as "
            "its sequence-parallel chunk") in line
    assert runtime.vllm_expert_parallel_moe(cfg)[0] is True
    _, _, communicator = runtime.resolve_ops_and_communicator(cfg, torch.device("cpu"), 4)
    assert communicator.name == "scattered"
    monkeypatch.setattr(runtime, "get_ep_group", lambda: "ep")
    monkeypatch.setattr(runtime, "get_tp_group", lambda: "tp")
    assert runtime.moe_group_coordinator(cfg) == "ep"
    cfg.parallel_config.data_parallel_size = 1
    assert runtime.moe_group_coordinator(cfg) == "tp"
    assert runtime.vllm_expert_parallel_moe(cfg)[0] is False  # vLLM's sequence-parallel MoE needs DP > 1


def test_dp_with_a_backend_outside_vllms_sequence_parallel_moe_keeps_torch_all_to_all(monkeypatch, base_config):
    """'naive' is not one of the backends vLLM runs its sequence-parallel MoE with: even on a
    GPU platform the scattered MoE keeps its torch all-to-all, and the line names the reason."""
    from vllm_cp_nsa.adapter import runtime

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self: False)
    cfg = _fresh(base_config, {"cp_nsa": {"mode": "round-robin-split", "moe": "scattered"}})
    _set(cfg, {"parallel_config__data_parallel_size": 2, "parallel_config__tensor_parallel_size": 2,
               "parallel_config__enable_expert_parallel": True, "parallel_config__all2all_backend": "naive"})
    refusal, line = config_hook.data_parallel_decision(
        cfg, config_hook.CpNsaConfig.from_additional_config(cfg.additional_config))
    assert refusal == ""
    assert ("torch all-to-all over that group (vLLM's sequence-parallel MoE is off here" in line
            and "'naive' is set" in line)
    assert runtime.vllm_expert_parallel_moe(cfg)[0] is False


def test_eagle3_drafter_is_refused(base_config):
    cfg = _fresh(base_config, {"cp_nsa": {}})
    cfg.speculative_config = types.SimpleNamespace(method="eagle3")
    with pytest.raises(CpNsaConfigError, match="speculative method 'eagle3'.*use method 'mtp'"):
        config_hook.refuse_unsupported(cfg, config_hook.CpNsaConfig())


def test_vllm_kernels_on_fp16_fail_at_config_time(monkeypatch, base_config):
    """kernels='vllm' (FlashMLA, bf16 only) on an fp16 model fails in the config hook, with
    the fix, not at model build in the worker."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "device_type", "cuda")
    cfg = _fresh(base_config, {"cp_nsa": {"kernels": "vllm"}})
    cfg.model_config.dtype = torch.float16
    with pytest.raises(CpNsaConfigError) as err:
        config_hook.CpNsaV32ConfigHook.verify_and_update_config(cfg)
    assert "kernel provider 'vllm' does not support" in str(err.value) and "float16" in str(err.value)
    assert "kernels='auto'" in str(err.value)


def test_startup_line_names_the_resolved_provider_and_what_moe_runs(base_config, plugin_log):
    cfg = _fresh(base_config, {"cp_nsa": {"mode": "round-robin-split"}})
    config_hook.CpNsaV32ConfigHook.verify_and_update_config(cfg)
    line = next(m for m in plugin_log.messages() if "kernels=" in m)
    assert "kernels=torch (requested auto)" in line  # the provider CPU resolves, not 'auto'
    assert "moe=full (auto: no expert-parallel all-to-all backend is set" in line
    assert "CUDA graphs off" not in line
    cfg = _fresh(base_config, {"cp_nsa": {"mode": "round-robin-split"}},
                 parallel_config__enable_expert_parallel=True,
                 parallel_config__all2all_backend="deepep_high_throughput")
    plugin_log.clear()
    config_hook.CpNsaV32ConfigHook.verify_and_update_config(cfg)
    line = next(m for m in plugin_log.messages() if "kernels=" in m)
    assert ("moe=scattered (auto: expert parallelism with the all-to-all backend 'deepep_high_throughput' "
            "is set), moving token rows with torch all-to-all over the TP ranks (not with "
            "'deepep_high_throughput'), CUDA graphs off") in line


@pytest.mark.parametrize("options,piecewise", [
    ({"mode": "off"}, True),                                       # rows never split
    ({"mode": "off", "decode_attention": "auto"}, True),            # auto: no head split under mode off
    ({"mode": "round-robin-split"}, False),                        # rows picked per batch
    ({"mode": "off", "decode_attention": "tp"}, False),             # heads picked per batch
])
def test_graph_mode_keeps_piecewise_graphs_only_for_a_fixed_layout(base_config, plugin_log, monkeypatch, options,
                                                                   piecewise):
    """-tp 2: without a split layout vLLM's FULL_AND_PIECEWISE stays (breakable piecewise graphs
    around the attention's eager break); a split plan or per-batch heads downgrade it to
    FULL_DECODE_ONLY with a warning that says which, and blames the split layout only under CP."""
    from vllm.config import CUDAGraphMode

    cfg = _fresh(base_config, {"cp_nsa": options}, cache_config__cache_dtype="auto")
    monkeypatch.setattr(config_hook, "_logged_lines", set())  # lines logged once per process
    config_hook.CpNsaV32ConfigHook.verify_and_update_config(cfg)
    mode = cfg.compilation_config.cudagraph_mode
    warnings = [m for m in plugin_log.messages() if "-> FULL_DECODE_ONLY" in m]
    if piecewise:
        assert mode == CUDAGraphMode.FULL_AND_PIECEWISE and not warnings
        # on CPU there are no graphs at all: no line may claim vLLM's graphs (the backend says "off")
        assert not any("CUDA graphs as vLLM's own" in m for m in plugin_log.messages())
    else:
        assert mode == CUDAGraphMode.FULL_DECODE_ONLY and len(warnings) == 1
        assert ("split layout" in warnings[0]) is (options["mode"] != "off")
        assert ("heads per batch" in warnings[0]) is (options.get("decode_attention") == "tp")


@pytest.mark.parametrize("tp,kv_cache_dtype,split_decode,min_tokens,kind", [
    (2, "auto", False, 2048, "bf16"),   # N=2 bf16: head-split (TP) decode, RR loses to TP at 1K
    (4, "auto", True, 1024, "bf16"),    # N=4 bf16: split decode 21-24 % faster than TP
    (4, "fp8", False, 1024, "fp8"),     # N=4 fp8: split decode slower, head-split decode
])
def test_hook_resolves_auto_to_the_measured_thresholds(base_config, plugin_log, tp, kv_cache_dtype, split_decode,
                                                       min_tokens, kind):
    """The defaults (decode_attention and min_tokens_for_cp auto) resolve once, in the hook, to
    split_policy's table for N and the KV dtype; the graph sizes follow it and the startup
    line gives the thresholds and their source. Every worker resolves the same from the config."""
    from vllm.config import CUDAGraphMode

    from vllm_cp_nsa.adapter.runtime import attention_split_policy
    from vllm_cp_nsa.split_policy import resolve_split_policy

    cfg = _fresh(base_config, {"cp_nsa": {"mode": "round-robin-split"}}, cache_config__cache_dtype=kv_cache_dtype,
                 parallel_config__tensor_parallel_size=tp)
    config_hook.CpNsaV32ConfigHook.verify_and_update_config(cfg)
    policy = attention_split_policy(cfg)
    assert (policy.split_decode, policy.min_tokens_for_cp, policy.decode_min_tokens, policy.heads_split) == (
        split_decode, min_tokens, 0, True)
    assert policy == resolve_split_policy("auto", "auto", tp, kv_cache_dtype)
    line = next(m for m in plugin_log.messages() if "kernels=" in m)
    assert f"mode=round-robin-split over the {tp} TP ranks: {policy.describe(tp)}" in line
    assert f"batches with < {min_tokens} real tokens unsplit (heads split)" in line and f"[N={tp} {kind}: " in line
    assert ("decode / verify batches split over the ranks" if split_decode
            else "decode / verify batches unsplit, heads split (TP)") in line
    # FULL graphs hold decode batches: split over N ranks, sizes are multiples of N
    assert cfg.compilation_config.cudagraph_mode == CUDAGraphMode.FULL_DECODE_ONLY
    sizes = cfg.compilation_config.cudagraph_capture_sizes
    assert all(s % tp == 0 for s in sizes) is split_decode, sizes


def test_explicit_options_override_auto_and_say_so(base_config, plugin_log):
    from vllm_cp_nsa.adapter.runtime import attention_split_policy

    cfg = _fresh(base_config, {"cp_nsa": {"mode": "round-robin-split", "decode_attention": "split",
                                          "min_tokens_for_cp": 0}}, cache_config__cache_dtype="auto")
    config_hook.CpNsaV32ConfigHook.verify_and_update_config(cfg)
    policy = attention_split_policy(cfg)
    assert (policy.split_decode, policy.min_tokens_for_cp, policy.heads_split) == (True, 0, False)
    line = next(m for m in plugin_log.messages() if "kernels=" in m)
    assert ("decode / verify batches split over the ranks; batches with < 2 real tokens unsplit (all heads on every "
            "rank) [decode_attention=split (user); min_tokens_for_cp=0 (user)]") in line
