"""Plugin compatibility: discovery, idempotent registration, touchpoints (a missing one
leaves the plugin inactive without raising), version guard."""

import ast
import logging
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import vllm_cp_nsa.plugin as plugin
from vllm_cp_nsa import touchpoints
from vllm_cp_nsa.architectures import ARCHITECTURE, MTP_ARCHITECTURE

ADAPTER = Path(plugin.__file__).parent / "adapter"


def test_entry_point_is_discoverable():
    eps = {e.name: e for e in entry_points(group="vllm.general_plugins")}
    assert eps["cp_nsa"].value == "vllm_cp_nsa.plugin:register"
    assert eps["cp_nsa"].load() is plugin.register


def test_register_is_idempotent_and_only_touches_v32():
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    before = {arch: ModelRegistry.models[arch] for arch in ("LlamaForCausalLM", "DeepseekV3ForCausalLM")}
    plugin.register()
    hook = MODELS_CONFIG_MAP[ARCHITECTURE]
    model = ModelRegistry.models[ARCHITECTURE]
    plugin.register()
    plugin._registered = False  # force the body to run again
    plugin.register()
    assert MODELS_CONFIG_MAP[ARCHITECTURE] is hook
    assert hook.previous is not hook and hook.previous is not None
    assert ModelRegistry.models[ARCHITECTURE].class_name == model.class_name
    assert f"{model.module_name}:{model.class_name}" == plugin.HANDOVER_MODEL
    mtp = ModelRegistry.models[MTP_ARCHITECTURE]
    assert f"{mtp.module_name}:{mtp.class_name}" == plugin.HANDOVER_MTP
    assert {arch: ModelRegistry.models[arch] for arch in before} == before


def test_every_touchpoint_exists_in_installed_vllm():
    assert touchpoints.check_touchpoints() == ()


def test_missing_symbol_is_reported_not_raised(monkeypatch):
    fake = touchpoints.Touchpoint("vllm.v1.attention.backend", "NoSuchBackendBase", "test")
    monkeypatch.setattr(touchpoints, "TOUCHPOINTS", touchpoints.TOUCHPOINTS + (fake,))
    missing = touchpoints.check_touchpoints()
    assert missing == (fake,)
    reason = touchpoints.unavailable_reason(missing)
    assert "vllm.v1.attention.backend.NoSuchBackendBase" in reason
    assert touchpoints.CHECKED_AGAINST in reason


@pytest.fixture
def fresh_registration(monkeypatch):
    """register() and the touchpoint check run again in this test; vLLM's registry and
    config map are restored afterwards."""
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    monkeypatch.setattr(ModelRegistry, "models", dict(ModelRegistry.models))
    monkeypatch.setitem(MODELS_CONFIG_MAP, ARCHITECTURE, MODELS_CONFIG_MAP[ARCHITECTURE])
    monkeypatch.setattr(plugin, "_registered", False)
    monkeypatch.delenv(plugin._UNAVAILABLE_WARNED_ENV, raising=False)
    plugin.missing_touchpoints.cache_clear()
    yield ModelRegistry, MODELS_CONFIG_MAP
    plugin.missing_touchpoints.cache_clear()


def _capture_plugin_log(monkeypatch, caplog):
    # vLLM's logging config stops propagation of "vllm.*" loggers to the root
    monkeypatch.setattr(logging.getLogger("vllm.cp_nsa"), "handlers",
                        [*logging.getLogger("vllm.cp_nsa").handlers, caplog.handler])
    caplog.set_level(logging.INFO, logger="vllm.cp_nsa")


def test_register_with_a_missing_symbol_logs_and_stays_inactive(monkeypatch, caplog, fresh_registration):
    """register() does not raise; it says why the plugin is inactive; only a launch that
    asks for cp_nsa fails, with that reason and the fix."""
    fake = touchpoints.Touchpoint("vllm.v1.attention.backend", "NoSuchBackendBase", "test")
    monkeypatch.setattr(touchpoints, "TOUCHPOINTS", touchpoints.TOUCHPOINTS + (fake,))
    _capture_plugin_log(monkeypatch, caplog)
    plugin.register()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("NoSuchBackendBase" in w and "stays inactive" in w for w in warnings), warnings
    assert plugin.plugin_active({}) is False  # even on CPU: vLLM's own path, whatever it does
    assert plugin.plugin_active(None) is False
    with pytest.raises(touchpoints.VllmTouchpointError) as err:
        plugin.plugin_active({"cp_nsa": {}})
    assert "NoSuchBackendBase" in str(err.value) and touchpoints.TESTED_RANGE in str(err.value)
    assert plugin.inactive_line().startswith("vllm_cp_nsa: installed but not active: vLLM ")
    assert "NoSuchBackendBase" in plugin.inactive_line()


def test_missing_registration_symbol_leaves_vllms_entry(monkeypatch, fresh_registration):
    """Without vLLM's own V3.2 class to subclass, the hand-over is not registered (vLLM's
    entry stays), while the config hook is still installed to refuse a cp_nsa launch."""
    registry, config_map = fresh_registration
    monkeypatch.setitem(registry.models, ARCHITECTURE, "vllm's own entry")
    monkeypatch.setitem(config_map, ARCHITECTURE, config_map[ARCHITECTURE].previous)
    parent = next(t for t in touchpoints.TOUCHPOINTS if t.symbol == "DeepseekV32ForCausalLM")
    monkeypatch.setattr(touchpoints, "TOUCHPOINTS", tuple(
        touchpoints.Touchpoint(t.module, "NoSuchV32Class", t.why) if t is parent else t
        for t in touchpoints.TOUCHPOINTS))
    monkeypatch.setattr(plugin, "_HANDOVER_NEEDS", plugin._HANDOVER_NEEDS | {(parent.module, "NoSuchV32Class")})
    plugin.register()
    assert registry.models[ARCHITECTURE] == "vllm's own entry"
    from vllm_cp_nsa.adapter.config_hook import CpNsaV32ConfigHook

    assert config_map[ARCHITECTURE] is CpNsaV32ConfigHook


def _vllm_imports(path: Path) -> set[tuple[str, str]]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
            found |= {(node.module, alias.name) for alias in node.names}
    return found


def test_adapter_uses_only_listed_vllm_symbols():
    listed = {(t.module, t.symbol.split(".")[0]) for t in touchpoints.TOUCHPOINTS}
    used = set().union(*(_vllm_imports(p) for p in ADAPTER.glob("*.py")))
    assert used, "the adapter must import vLLM"
    assert used <= listed, f"unlisted vLLM symbols: {sorted(used - listed)}"


# The adapter's kernel provider modules import vLLM only inside functions (the registry,
# adapter/builtins.py, imports them on any vLLM). Core never importing vLLM or the adapter:
# plugin_tests/unit/test_layering.py.
_KERNEL_PROVIDER_MODULES = ("vllm_kernels.py", "vllm_deepgemm.py")


def _lazy_vllm_imports(path: Path) -> set[tuple[str, str]]:
    """vLLM symbols imported inside functions (not at module level)."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    return {(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm"
            and id(node) not in top for alias in node.names}  # fmt: skip


# Optional symbols the model imports lazily where they apply (vLLM's fused embedding kernels).
_MODEL_MODULES = ("model.py", "mtp.py")


def test_vllm_kernel_provider_imports_vllm_lazily():
    """Module level of adapter/vllm_kernels.py and adapter/vllm_deepgemm.py imports no vLLM
    (the registry imports them on any vLLM and without one); their kernel symbols and the
    model's lazily imported fused kernels are exactly the optional touchpoints, anything else
    they use is a required one."""
    used = set()
    for name in _KERNEL_PROVIDER_MODULES:
        tree = ast.parse((ADAPTER / name).read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] != "vllm", (name, node.module)
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "vllm" for a in node.names), name
        used |= _vllm_imports(ADAPTER / name)
    model_lazy = set().union(*(_lazy_vllm_imports(ADAPTER / name) for name in _MODEL_MODULES))
    optional = {(t.module, t.symbol) for t in touchpoints.TOUCHPOINTS if t.optional}
    required = {(t.module, t.symbol) for t in touchpoints.TOUCHPOINTS if not t.optional}
    # the DeepGEMM probe also reads the GPU capability through vLLM's platform (required)
    assert (used | model_lazy) - required == optional


@pytest.mark.parametrize("cuda", [True, False])
def test_missing_optional_symbol_only_warns_where_cuda_is(monkeypatch, caplog, cuda):
    """A missing optional (CUDA-kernel) symbol is a warning on a CUDA host and debug-level
    elsewhere (a CPU build of vLLM lacks some; no kernel provider there would use them)."""
    fake = touchpoints.Touchpoint("vllm.utils.deep_gemm", "no_such_kernel", "test", optional=True)
    monkeypatch.setattr(touchpoints, "TOUCHPOINTS", touchpoints.TOUCHPOINTS + (fake,))
    monkeypatch.setattr(touchpoints, "_cuda_present", lambda: cuda)
    with caplog.at_level(logging.DEBUG, logger="vllm.cp_nsa"):
        assert touchpoints.check_touchpoints() == ()
    levels = [r.levelno for r in caplog.records if "vllm.utils.deep_gemm.no_such_kernel" in r.getMessage()]
    assert levels == [logging.WARNING if cuda else logging.DEBUG]


@pytest.mark.parametrize("version,tested", [("0.32.0", True), ("0.32.3+cpu", True), ("0.33.0", True), ("0.34.0", True),
                                            ("0.35.0", False), ("0.31.1", False)])
def test_version_guard(monkeypatch, caplog, version, tested):
    monkeypatch.setattr(touchpoints, "_installed_vllm_version", lambda: version)
    with caplog.at_level(logging.WARNING, logger="vllm.cp_nsa"):
        assert touchpoints.check_vllm_version() is tested
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if tested:
        assert not warnings
    else:
        assert len(warnings) == 1
        assert f"vLLM {version} is untested" in warnings[0] and touchpoints.TESTED_RANGE in warnings[0]
