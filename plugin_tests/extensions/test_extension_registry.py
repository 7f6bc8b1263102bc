"""The pluggy extension points (DESIGN.md §3b): built-ins and a third-party package.

A toy distribution (``toy_pkg/toy_cp_strategy``) is made discoverable exactly like an
installed one: its module and a ``toy_cp_strategy-0.1.dist-info/`` (METADATA +
entry_points.txt under ``[vllm_cp_nsa.extensions]``) are written into a temporary
site directory put on ``sys.path``; the registry is rebuilt with
``plugin_manager.cache_clear()``. Everything is undone afterwards.

Run: .venv/bin/python -m pytest plugin_tests/extensions -q
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import shutil
import sys
from pathlib import Path

import pytest
import torch

from vllm_cp_nsa import builtins as cp_builtins
from vllm_cp_nsa import extensions
from vllm_cp_nsa.adapter import builtins as adapter_builtins
from vllm_cp_nsa.communicator import FullMoeCommunicator, ScatteredMoeCommunicator
from vllm_cp_nsa.config import CpNsaConfigError
from vllm_cp_nsa.hookspecs import ENTRY_POINT_GROUP
from vllm_cp_nsa.split_plan import InSeqSplit, RoundRobinSplit, build_split_plan

TOY_SRC = Path(__file__).resolve().parent / "toy_pkg" / "toy_cp_strategy"
TOY_NAME = "toy-contiguous-split"


@contextlib.contextmanager
def installed_distribution(site: Path, module: str, dist: str, *, source: Path | None = None,
                           module_text: str | None = None):
    """Install ``module`` as distribution ``dist`` (version 0.1) into the directory
    ``site``, with an entry point ``toy = module`` in the plugin's group, and put
    ``site`` on ``sys.path`` while the block runs."""
    site.mkdir(parents=True, exist_ok=True)
    if source is not None:
        shutil.copytree(source, site / module, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        (site / module).mkdir()
        (site / module / "__init__.py").write_text(module_text)
    info = site / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntoy = {module}\n")
    (info / "top_level.txt").write_text(f"{module}\n")
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    extensions.plugin_manager.cache_clear()
    try:
        yield
    finally:
        sys.path.remove(str(site))
        for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            del sys.modules[name]
        importlib.invalidate_caches()
        extensions.plugin_manager.cache_clear()


@pytest.fixture
def toy_installed(tmp_path):
    with installed_distribution(tmp_path / "site", "toy_cp_strategy", "toy-cp-strategy", source=TOY_SRC):
        yield tmp_path / "site"


@pytest.fixture(autouse=True)
def _fresh_registry():
    extensions.plugin_manager.cache_clear()
    yield
    extensions.plugin_manager.cache_clear()


# --------------------------------------------------------------------------- built-ins
def test_builtins_come_from_the_installed_entry_point_group(caplog):
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert eps.get("builtin") == "vllm_cp_nsa.builtins"
    assert eps.get("builtin_vllm") == "vllm_cp_nsa.adapter.builtins"
    with caplog.at_level("WARNING", logger="vllm.cp_nsa"):
        pm = extensions.plugin_manager()
    assert "entry point" not in caplog.text
    # Registered by load_setuptools_entrypoints (with its distribution), not by the
    # source-tree fallback (which records no distribution).
    by_dist = {plugin: dist.project_name for plugin, dist in pm.list_plugin_distinfo()}
    assert by_dist.get(cp_builtins) == "vllm-cp-nsa", by_dist
    assert by_dist.get(adapter_builtins) == "vllm-cp-nsa", by_dist
    assert pm.get_name(cp_builtins) == "builtin" and pm.get_name(adapter_builtins) == "builtin_vllm"
    # the core registers its own providers, the adapter the ones that call vLLM's kernels
    assert [p.name for p in cp_builtins.cp_nsa_kernel_providers()] == ["torch", "triton"]
    assert [p.name for p in adapter_builtins.cp_nsa_kernel_providers()] == ["vllm-deepgemm", "vllm"]

    strategies = extensions.split_strategies()
    assert isinstance(strategies["round-robin-split"], RoundRobinSplit)
    assert isinstance(strategies["in-seq-split"], InSeqSplit)
    communicators = extensions.moe_communicators()
    assert isinstance(communicators["full"], FullMoeCommunicator)
    assert isinstance(communicators["scattered"], ScatteredMoeCommunicator)
    providers = extensions.kernel_providers()
    assert {"torch", "triton", "vllm", "vllm-deepgemm"} <= set(providers)
    assert all(p.name == name for name, p in providers.items())

    assert extensions.resolve_split_strategy("off") is None
    assert isinstance(extensions.resolve_split_strategy("round-robin-split"), RoundRobinSplit)
    assert isinstance(extensions.resolve_split_strategy("in-seq-split"), InSeqSplit)
    assert extensions.resolve_moe_communicator("full", expert_all_to_all=True).name == "full"
    assert extensions.resolve_moe_communicator("scattered", expert_all_to_all=False).name == "scattered"
    provider = extensions.resolve_kernel_provider("torch", torch.device("cpu"), torch.float32, 4)
    assert provider.name == "torch"


def test_without_distribution_metadata_the_core_registers_itself_and_warns(monkeypatch, caplog):
    """A source tree without metadata: the core's built-ins come from the fallback; the
    adapter's providers need their entry point, and their absence is logged, not silent."""
    import pluggy

    monkeypatch.setattr(pluggy.PluginManager, "load_setuptools_entrypoints", lambda self, group: 0)
    with caplog.at_level("WARNING", logger="vllm.cp_nsa"):
        providers = extensions.kernel_providers()
    assert set(providers) == {"torch", "triton"}
    assert extensions.plugin_manager().get_name(cp_builtins) == "builtin"
    assert "no 'builtin_vllm' entry point" in caplog.text and "vllm_cp_nsa.adapter.builtins" in caplog.text


@pytest.mark.parametrize("all_to_all, expected, cls", [
    (True, "scattered", ScatteredMoeCommunicator),
    (False, "full", FullMoeCommunicator),
])
def test_auto_moe_communicator(all_to_all, expected, cls):
    comm = extensions.resolve_moe_communicator("auto", expert_all_to_all=all_to_all)
    assert comm.name == expected and isinstance(comm, cls)


def test_unknown_builtin_names_list_the_registered_ones():
    with pytest.raises(CpNsaConfigError) as exc:
        extensions.resolve_moe_communicator("deepep-magic", expert_all_to_all=False)
    msg = str(exc.value)
    assert "deepep-magic" in msg and all(n in msg for n in ("auto", "full", "scattered"))
    with pytest.raises(CpNsaConfigError) as exc:
        extensions.resolve_kernel_provider("cuda-magic", torch.device("cpu"), torch.float32, 4)
    assert "cuda-magic" in str(exc.value) and "torch" in str(exc.value)


# --------------------------------------------------------------------------- third party
def test_toy_strategy_selected_by_name(toy_installed):
    strategy = extensions.resolve_split_strategy(TOY_NAME)
    assert type(strategy).__name__ == "ToyContiguousSplit"
    # Loaded from the installed copy, through its distribution's entry point.
    assert Path(sys.modules["toy_cp_strategy"].__file__).resolve().is_relative_to(toy_installed.resolve())
    dists = {dist.project_name for _, dist in extensions.plugin_manager().list_plugin_distinfo()}
    assert {"toy-cp-strategy", "vllm-cp-nsa"} <= dists
    # The built-ins are still there next to it.
    assert {"round-robin-split", "in-seq-split", TOY_NAME} <= set(extensions.split_strategies())

    # Plans built with it: split then gather is the identity, tokens contiguous per rank.
    for query_lens in ([5, 3, 6], [1] * 9, [37], [100, 1, 1, 7], [2, 2]):
        total = sum(query_lens)
        x = torch.arange(1, total + 1)[:, None] * torch.tensor([1, -7])
        for cp in (2, 3, 4, 8):
            plans = [build_split_plan(query_lens, cp, r, strategy) for r in range(cp)]
            if total < cp:
                assert not any(p.is_split for p in plans)
                continue
            assert all(p.is_split and p.strategy == TOY_NAME for p in plans)
            gathered = torch.cat([p.take_local(x) for p in plans])
            for p in plans:
                assert torch.equal(p.restore_token_order(gathered), x), (query_lens, cp)
            owned = [p.local_token_idx[p.local_token_idx >= 0] for p in plans]
            assert torch.equal(torch.cat(owned), torch.arange(total))  # contiguous, rank-major


def test_unknown_name_lists_registered_names_including_toy(toy_installed):
    with pytest.raises(CpNsaConfigError) as exc:
        extensions.resolve_split_strategy("no-such-split")
    msg = str(exc.value)
    for name in ("no-such-split", "off", "round-robin-split", "in-seq-split", TOY_NAME):
        assert name in msg, f"{name!r} missing from: {msg}"


def test_toy_not_registered_without_its_distribution(tmp_path):
    with pytest.raises(CpNsaConfigError) as exc:
        extensions.resolve_split_strategy(TOY_NAME)
    assert TOY_NAME in str(exc.value) and "allowed values" in str(exc.value)
    assert "round-robin-split" in str(exc.value)
    # ...and state is restored after an installed run.
    before_path = list(sys.path)
    with installed_distribution(tmp_path / "site", "toy_cp_strategy", "toy-cp-strategy", source=TOY_SRC):
        assert TOY_NAME in extensions.split_strategies()
    assert sys.path == before_path and "toy_cp_strategy" not in sys.modules
    assert TOY_NAME not in extensions.split_strategies()


def test_duplicate_name_from_an_extension_is_rejected(tmp_path):
    module_text = (
        "from vllm_cp_nsa.hookspecs import hookimpl\n"
        "from vllm_cp_nsa.split_plan import RoundRobinSplit\n"
        "class Impostor(RoundRobinSplit):\n"
        "    pass\n"
        "@hookimpl\n"
        "def cp_nsa_split_strategies():\n"
        "    return [Impostor()]\n"
    )
    with installed_distribution(tmp_path / "site", "toy_impostor", "toy-impostor", module_text=module_text):
        with pytest.raises(CpNsaConfigError, match="round-robin-split"):
            extensions.split_strategies()
