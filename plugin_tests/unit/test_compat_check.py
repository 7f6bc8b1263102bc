"""scripts/compat_check.py: the static touchpoint / signature resolver the compatibility matrix
runs against vLLM wheels it cannot import. Each case builds a small synthetic source tree."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


compat = _load("compat_check_under_test", ROOT / "scripts" / "compat_check.py")


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@dataclass(frozen=True)
class Point:
    module: str
    symbol: str
    optional: bool = False


@dataclass(frozen=True)
class Sig:
    module: str
    callable: str
    names: tuple
    kind: str = "params"
    optional: bool = False


@pytest.fixture
def tree(tmp_path):
    write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/base.py": """
            from dataclasses import dataclass
            class Base:
                inherited = 1
                def __init__(self, a, b=None):
                    self.set_in_init = a
                    setattr(self, "set_by_name", b)
            @dataclass
            class Spec:
                block_size: int
                head_size: int
            @dataclass
            class SubSpec(Spec):
                cache_role: str = "x"
            """,
        "pkg/layers/__init__.py": """
            from .impl import Layer, make_layer as make
            from .star import *
            ALIAS = Layer
            """,
        "pkg/layers/impl.py": """
            from typing import TYPE_CHECKING
            from pkg.base import Base
            if TYPE_CHECKING:
                from pkg.base import Spec as OnlyForTypes
            class Layer(Base):
                def __init__(self, num_heads, *, prefix="", use_sparse=False):
                    super().__init__(num_heads)
                    self.register_buffer("buf", None)
                class Mode:
                    FULL = 1
            def make_layer(x, **kwargs):
                return Layer(x)
            """,
        "pkg/layers/star.py": """
            try:
                from ._fast import fast_op
            except ImportError:
                def fast_op(q, kv):
                    raise RuntimeError
            """,
        "pkg/lazy.py": """
            def __getattr__(name):
                if name == "current":
                    return 1
                raise AttributeError(name)
            """,
    })
    return compat.SourceTree(tmp_path)


def test_symbols_resolve_through_reexports_try_blocks_star_imports_and_module_getattr(tree):
    assert tree.resolve("pkg.layers", "Layer").module == "pkg.layers.impl"
    assert tree.resolve("pkg.layers", "make").node.name == "make_layer"
    assert tree.resolve("pkg.layers", "ALIAS").node.name == "Layer"
    assert tree.resolve("pkg.layers", "fast_op").module == "pkg.layers.star"
    assert tree.resolve("pkg.lazy", "current").note == "module __getattr__"
    assert tree.resolve("pkg", "layers").note == "module"


@pytest.mark.parametrize("module,symbol", [
    ("pkg.layers", "Missing"),                # not defined anywhere
    ("pkg.nope", "Layer"),                    # no such module
    ("pkg.layers.impl", "OnlyForTypes"),      # bound only under TYPE_CHECKING
    ("pkg.lazy", "other"),                    # __getattr__ does not name it
    ("pkg.layers", "Layer.absent"),           # no such class attribute, nor on its bases
])
def test_absent_symbols_are_reported(tree, module, symbol):
    with pytest.raises(compat.Missing):
        tree.resolve(module, symbol)


def test_class_attributes_come_from_body_self_assignments_setattr_and_bases(tree):
    for attr in ("Mode", "buf", "set_in_init", "set_by_name", "inherited"):
        assert tree.resolve("pkg.layers", f"Layer.{attr}") is not None
    assert tree.resolve("pkg.layers", "Layer.Mode.FULL") is not None


def test_signature_checks_pass_and_fail(tree):
    ok = compat.check_signature(tree, Sig("pkg.layers", "Layer", ("num_heads", "prefix", "use_sparse")))
    assert ok.ok, ok.detail
    bad = compat.check_signature(tree, Sig("pkg.layers", "Layer", ("num_heads", "attn_backend")))
    assert not bad.ok and "attn_backend" in bad.detail
    # a keyword that only **kwargs takes passes, and says so
    kw = compat.check_signature(tree, Sig("pkg.layers", "make", ("x", "anything")))
    assert kw.ok and "**kwargs" in kw.detail
    # dataclass constructors take their fields, inherited ones included
    spec = compat.check_signature(tree, Sig("pkg.base", "SubSpec", ("block_size", "head_size", "cache_role")))
    assert spec.ok, spec.detail
    assert not compat.check_signature(tree, Sig("pkg.base", "SubSpec", ("max_tp_shards",))).ok


def test_field_checks_name_each_absent_attribute(tree):
    res = compat.check_signature(tree, Sig("pkg.layers", "Layer", ("buf", "nope1", "nope2"), kind="fields"))
    assert not res.ok and "nope1" in res.detail and "nope2" in res.detail
    assert compat.check_signature(tree, Sig("pkg.layers", "Layer", ("buf", "inherited"), kind="fields")).ok


def test_digest_tells_a_changed_definition_from_an_unchanged_one(tmp_path):
    one = write_tree(tmp_path / "a", {"m.py": "def f(x):\n    return x\n"})
    same = write_tree(tmp_path / "b", {"m.py": "\n\ndef f(x):\n    return x\n"})  # moved only
    changed = write_tree(tmp_path / "c", {"m.py": "def f(x, y=0):\n    return x\n"})
    digests = [compat.check_touchpoint(compat.SourceTree(p), Point("m", "f")).digest for p in (one, same, changed)]
    assert digests[0] == digests[1] != digests[2]


def test_main_exit_status_follows_required_touchpoints_only(tmp_path, capsys):
    src = write_tree(tmp_path / "src", {"v/__init__.py": "def present(a):\n    pass\n"})
    tp = tmp_path / "tp.py"
    tp.write_text(textwrap.dedent("""
        from dataclasses import dataclass
        @dataclass(frozen=True)
        class T:
            module: str
            symbol: str
            optional: bool = False
        TOUCHPOINTS = (T("v", "present"), T("v", "gone", optional=True))
    """))
    assert compat.main(["--source", str(src), "--touchpoints", str(tp), "--quiet"]) == 0
    assert "optional missing 1" in capsys.readouterr().out
    tp.write_text(tp.read_text().replace('optional=True', 'optional=False'))
    assert compat.main(["--source", str(src), "--touchpoints", str(tp)]) == 1
    assert "MISS" in capsys.readouterr().out


def test_the_projects_touchpoints_resolve_against_the_installed_vllm_source():
    """The repo's own table against the vLLM the CPU suite runs (a real tree, not synthetic)."""
    vllm_spec = importlib.util.find_spec("vllm")
    if vllm_spec is None:
        pytest.skip("no vLLM installed")
    site = Path(vllm_spec.origin).parents[1]
    touchpoints = compat.load_touchpoints(ROOT / "vllm_cp_nsa" / "touchpoints.py")
    results = compat.run_checks(site, touchpoints)
    assert len(results) == len(touchpoints.TOUCHPOINTS) + len(touchpoints.CALLED_SIGNATURES)
    failed = [r for r in results if not r.ok and not r.optional]
    assert not failed, [(r.name, r.detail) for r in failed]


def test_every_version_branch_names_an_existing_test_and_only_checked_versions():
    """touchpoints.py records, per symbol, the releases it was checked against and any version
    branch of the adapter; a branch must point at the test that covers it."""
    touchpoints = compat.load_touchpoints(ROOT / "vllm_cp_nsa" / "touchpoints.py")
    entries = touchpoints.TOUCHPOINTS + touchpoints.CALLED_SIGNATURES
    assert all(set(e.versions) <= set(touchpoints.CHECKED_VERSIONS) and e.versions for e in entries)
    branches = [t for t in touchpoints.TOUCHPOINTS if t.branch]
    assert branches, "the fp8_fp4_mqa_logits signature branch (0.32 vs 0.33+) is listed"
    for point in branches:
        test_ref = next(word for word in point.branch.replace("(", " ").replace(")", " ").split() if "::" in word)
        path, _, name = test_ref.partition("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test_ref
