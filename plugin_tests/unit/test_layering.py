"""The dependency direction: the core never imports vLLM or the adapter.

The core is ``vllm_cp_nsa/*.py`` (split plans, communicator, attention math, configuration,
registries) and ``kernels/*.py`` (installed as ``vllm_cp_nsa.kernels``): torch, triton and
pluggy only. ``vllm_cp_nsa/adapter/`` is the one layer that imports vLLM, and it imports the
core, never the other way. Two core-level modules face vLLM by their job and are exempt, as
long as they do it only inside functions (checked): ``plugin.py``, vLLM's
``vllm.general_plugins`` entry point, which registers the adapter's model class and config
hook with vLLM when vLLM calls it; ``touchpoints.py``, which resolves the listed vLLM symbols
by name and reads vLLM's version.

Two checks: every import statement anywhere in a core module's source (inside functions too,
``importlib.import_module`` with a literal name too), and a fresh interpreter that imports
every core module with ``vllm`` made unimportable and finds no adapter module loaded.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import vllm_cp_nsa

CORE = Path(vllm_cp_nsa.__file__).parent
KERNELS = CORE.parent / "kernels"
ENTRY_MODULES = ("plugin.py", "touchpoints.py")
FORBIDDEN = ("vllm", "vllm_cp_nsa.adapter")


def _core_modules() -> dict[Path, str]:
    """Source path -> the package its relative imports resolve against."""
    found = {path: "vllm_cp_nsa" for path in CORE.glob("*.py")}
    found.update({path: "vllm_cp_nsa.kernels" for path in KERNELS.glob("*.py")})
    return found


def _absolute(package: str, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    base = package.split(".")[: len(package.split(".")) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def _is_forbidden(name: str) -> bool:
    return any(name == f or name.startswith(f + ".") for f in FORBIDDEN)


def forbidden_imports(source: str, package: str, module_level_only: bool = False) -> list[str]:
    """Names of vLLM / adapter modules ``source`` imports (relative imports resolved against
    ``package``): import statements and ``import_module`` / ``__import__`` calls with a literal
    name; with ``module_level_only``, only the statements run at import time."""
    tree = ast.parse(source)
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names: list[str] = []
    for node in nodes:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(package, node.module, node.level)
            names.append(base)
            names += [f"{base}.{alias.name}" for alias in node.names]  # from . import adapter
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if called in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                names.append(node.args[0].value)
    return sorted({n for n in names if _is_forbidden(n)})


def test_the_scan_finds_each_kind_of_import():
    """The checker itself: each way of reaching vLLM or the adapter is reported."""
    cases = {
        "from .adapter.vllm_kernels import VllmKernelOps": "vllm_cp_nsa.adapter.vllm_kernels",
        "from . import adapter": "vllm_cp_nsa.adapter",
        "def f():\n    from vllm.config import VllmConfig": "vllm.config",
        "import vllm": "vllm",
        "import importlib\nimportlib.import_module('vllm_cp_nsa.adapter.model')": "vllm_cp_nsa.adapter.model",
    }
    for source, name in cases.items():
        assert name in forbidden_imports(source, "vllm_cp_nsa"), source
    assert forbidden_imports("from ..adapter import builtins", "vllm_cp_nsa.kernels") == [
        "vllm_cp_nsa.adapter", "vllm_cp_nsa.adapter.builtins"]  # fmt: skip
    for clean in ("from .kernels.dispatch import NsaOps", "import vllm_cp_nsa_extra", "from . import config"):
        assert forbidden_imports(clean, "vllm_cp_nsa") == [], clean
    assert forbidden_imports("def f():\n    import vllm", "vllm_cp_nsa", module_level_only=True) == []


def test_core_never_imports_vllm_or_the_adapter():
    modules = _core_modules()
    assert {p.name for p in modules} >= {"builtins.py", "extensions.py", "nsa_attention.py", "dispatch.py"}
    bad = {}
    for path, package in modules.items():
        entry = path.parent == CORE and path.name in ENTRY_MODULES
        found = forbidden_imports(path.read_text(), package, module_level_only=entry)
        if found:
            bad[f"{path.parent.name}/{path.name}"] = found
    assert not bad, f"core modules importing vLLM or the adapter: {bad}"


def test_core_imports_without_vllm_and_loads_no_adapter_module():
    names = [f"vllm_cp_nsa.{p.stem}" for p in CORE.glob("*.py") if p.stem != "__init__"]
    names += [f"vllm_cp_nsa.kernels.{p.stem}" for p in KERNELS.glob("*.py") if p.stem != "__init__"]
    code = (
        "import sys\n"
        "sys.modules['vllm'] = None  # any 'import vllm...' now raises ImportError\n"
        f"for name in {sorted(names)!r}:\n"
        "    __import__(name)\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('vllm_cp_nsa.adapter'))\n"
        "print(loaded)\n"
        "sys.exit(1 if loaded else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
