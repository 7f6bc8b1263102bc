"""Plugin compatibility: discovery, idempotent registration, touchpoints, version guard."""

import ast
import logging
from importlib.metadata import entry_points
from pathlib import Path

import pytest

import vllm_cp_nsa.plugin as plugin
from vllm_cp_nsa import touchpoints

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
    hook = MODELS_CONFIG_MAP["DeepseekV32ForCausalLM"]
    model = ModelRegistry.models["DeepseekV32ForCausalLM"]
    plugin.register()
    plugin._registered = False  # force the body to run again
    plugin.register()
    assert MODELS_CONFIG_MAP["DeepseekV32ForCausalLM"] is hook
    assert hook.previous is not hook and hook.previous is not None
    assert ModelRegistry.models["DeepseekV32ForCausalLM"].class_name == model.class_name
    assert model.module_name == "vllm_cp_nsa.adapter.model"
    assert {arch: ModelRegistry.models[arch] for arch in before} == before


def test_every_touchpoint_exists_in_installed_vllm():
    touchpoints.check_touchpoints()


def test_missing_symbol_fails_naming_it(monkeypatch):
    fake = touchpoints.Touchpoint("vllm.v1.attention.backend", "NoSuchBackendBase", "test")
    monkeypatch.setattr(touchpoints, "TOUCHPOINTS", touchpoints.TOUCHPOINTS + (fake,))
    with pytest.raises(touchpoints.VllmTouchpointError) as err:
        touchpoints.check_touchpoints()
    assert "vllm.v1.attention.backend.NoSuchBackendBase" in str(err.value)
    assert touchpoints.CHECKED_AGAINST in str(err.value)


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


# builtins.py registers the adapter's `vllm` and `vllm-deepgemm` kernel providers, whose
# modules import vLLM only inside functions (test_vllm_kernel_provider_imports_vllm_lazily).
_KERNEL_PROVIDER_MODULES = ("vllm_kernels.py", "vllm_deepgemm.py")
_CORE_TO_ADAPTER_IMPORTS = {("builtins.py", "adapter.vllm_kernels"), ("builtins.py", "adapter.vllm_deepgemm")}


def test_core_never_imports_vllm():
    """Only the adapter imports vLLM; plugin.py (entry point) and touchpoints.py
    (resolves the listed symbols lazily) touch it from inside functions."""
    core = Path(plugin.__file__).parent
    kernels = core.parent / "kernels"
    for path in [*core.glob("*.py"), *kernels.glob("*.py")]:
        if path.name in ("plugin.py", "touchpoints.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] != "vllm", path
                if (path.name, node.module) not in _CORE_TO_ADAPTER_IMPORTS:
                    assert "adapter" not in node.module.split("."), path
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "vllm" for a in node.names), path


def test_vllm_kernel_provider_imports_vllm_lazily():
    """Module level of adapter/vllm_kernels.py and adapter/vllm_deepgemm.py imports no vLLM
    (the registry imports them on any vLLM and without one); their kernel symbols are
    exactly the optional touchpoints."""
    used = set()
    for name in _KERNEL_PROVIDER_MODULES:
        tree = ast.parse((ADAPTER / name).read_text())
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] != "vllm", (name, node.module)
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "vllm" for a in node.names), name
        used |= _vllm_imports(ADAPTER / name)
    optional = {(t.module, t.symbol) for t in touchpoints.TOUCHPOINTS if t.optional}
    assert used == optional


def test_missing_optional_symbol_only_warns(monkeypatch, caplog):
    fake = touchpoints.Touchpoint("vllm.utils.deep_gemm", "no_such_kernel", "test", optional=True)
    monkeypatch.setattr(touchpoints, "TOUCHPOINTS", touchpoints.TOUCHPOINTS + (fake,))
    with caplog.at_level(logging.WARNING, logger="vllm.cp_nsa"):
        touchpoints.check_touchpoints()
    assert any("vllm.utils.deep_gemm.no_such_kernel" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("version,tested", [("0.32.0", True), ("0.32.3+cpu", True), ("0.33.0", False), ("0.31.1", False)])
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
