"""eval/import_closure.py: what a staged GPU stack must carry, found from the source on a CPU."""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "eval"))

import import_closure as ic  # noqa: E402


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _site(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    _write(site, "engine/__init__.py", "from .core import run\n")
    _write(site, "engine/core.py", "\n".join([
        "import os",
        "import needed_pkg",
        "from typing import TYPE_CHECKING",
        "if TYPE_CHECKING:",
        "    import only_for_types",
        "try:",
        "    import optional_pkg",
        "except ImportError:",
        "    import fallback_pkg",
        "import sys",
        "if sys.version_info >= (3, 14):",
        "    import py314_only",
        "else:",
        "    import pre314",
        "from . import sub",
        "from thirdparty import helper",
        "def lazy():",
        "    import lazy_pkg",
        "",
    ]))
    _write(site, "engine/sub.py", "import sub_needs\n")
    _write(site, "thirdparty/__init__.py", "import thirdparty_internal_optional\n")
    _write(site, "extra/dsl/cutlass_like/__init__.py", "")
    return site


def test_walks_the_engine_and_reports_what_the_image_lacks(tmp_path):
    site = _site(tmp_path)
    result = ic.closure(site, ["engine"], have={"pre314"})
    assert set(result.missing) == {"needed_pkg", "sub_needs"}
    assert result.missing["sub_needs"] == "engine.sub"
    # guarded (try body and its fallback), not imported on 3.12, typing only, lazy: never missing
    assert set(result.guarded) == {"optional_pkg", "fallback_pkg"}
    for name in ("only_for_types", "py314_only", "lazy_pkg"):
        assert name not in result.missing and name not in result.guarded
    # a third-party package is checked to exist, not walked
    assert "thirdparty_internal_optional" not in result.missing
    assert {"engine", "engine.core", "engine.sub"} <= result.visited


def test_follow_and_extra_paths(tmp_path):
    site = _site(tmp_path)
    _write(site, "engine/more.py", "import cutlass_like\n")
    walked = ic.closure(site, ["engine", "engine.more"], have={"pre314", "needed_pkg", "sub_needs"},
                        follow={"engine", "thirdparty"})
    assert set(walked.missing) == {"thirdparty_internal_optional", "cutlass_like"}
    found = ic.closure(site, ["engine.more"], have=set(), extra_paths=("extra/dsl",))
    assert "cutlass_like" not in found.missing


def test_requires_dist_met_by_the_stack_or_the_image(tmp_path):
    def wheel(name: str, requires: list[str]) -> Path:
        path = tmp_path / f"{name}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr(f"{name}-1.0.dist-info/METADATA",
                        "Name: x\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))
        return path

    wheels = [wheel("engine_pkg", ["needed-dep>=1", "image_dep", "winonly; sys_platform == 'win32'",
                                   "docs; extra == 'docs'", "missing.dep"]),
              wheel("needed_dep", [])]
    assert ic.unmet_requirements(wheels, {"Image-Dep"}) == {wheels[0].name: ["missing.dep"]}


def test_the_repos_image_lists_are_read_as_names():
    modules = (REPO / "eval" / "gpu_image_modules.txt").read_text().splitlines()
    assert "torch" in modules and "yaml" in modules and "PIL" in modules
    dists = (REPO / "eval" / "gpu_image_dists.txt").read_text().splitlines()
    assert "pyyaml" in dists and "transformers" in dists
