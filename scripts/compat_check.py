#!/usr/bin/env python3
"""Static check of the plugin's vLLM touchpoints against a vLLM source tree (no import).

vLLM's GPU wheels need their own CUDA torch and Python 3.12 to import, so the compatibility
matrix resolves the plugin's dependencies on the unpacked wheel's Python source instead:

- a touchpoint ``module`` + ``symbol`` (``A.b`` for class attributes) resolves when the module
  file exists and the name is defined there or re-exported (``from x import y``, ``import x``,
  ``from x import *``, an alias assignment, any branch of an ``if`` / ``try``, a module
  ``__getattr__`` that names it), and a class attribute is defined in the class body, set on
  ``self`` in a method, or inherited from a base resolvable in the tree;
- a called signature resolves when the callable (a function, or a class's ``__init__`` found
  along its bases, or a dataclass's fields) takes every keyword the adapter passes, and a field
  list resolves when the class has every attribute the adapter reads.

Usage: compat_check.py --source DIR [--touchpoints vllm_cp_nsa/touchpoints.py] [--label 0.34.0]
Prints one line per check and a summary; exit 0 when every required check resolves.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Found:
    module: str
    node: ast.AST | None
    """The defining node (ClassDef, FunctionDef, Assign...), None for a module or a dynamic name."""
    note: str = ""


class Missing(Exception):
    """A name that does not resolve; the message says where the lookup stopped."""


def _scope_nodes(body):
    """Statements of a module / class body, descending into if / try / with blocks
    (every branch: version or platform guards decide at import time, not here)."""
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _scope_nodes(node.body)
            yield from _scope_nodes(node.orelse)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            yield from _scope_nodes(node.body)
            for handler in node.handlers:
                yield from _scope_nodes(handler.body)
            yield from _scope_nodes(node.orelse)
            yield from _scope_nodes(node.finalbody)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            yield from _scope_nodes(node.body)


def _is_type_checking(node) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _runtime_nodes(body):
    """Like ``_scope_nodes`` but skipping ``if TYPE_CHECKING:`` blocks (not bound at run time)."""
    for node in body:
        if _is_type_checking(node):
            yield from _runtime_nodes(node.orelse)
            continue
        yield node
        if isinstance(node, ast.If):
            yield from _runtime_nodes(node.body)
            yield from _runtime_nodes(node.orelse)
        elif isinstance(node, ast.Try) or type(node).__name__ == "TryStar":
            yield from _runtime_nodes(node.body)
            for handler in node.handlers:
                yield from _runtime_nodes(handler.body)
            yield from _runtime_nodes(node.orelse)
            yield from _runtime_nodes(node.finalbody)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            yield from _runtime_nodes(node.body)


def _targets(node) -> list[str]:
    if isinstance(node, ast.Assign):
        names = []
        for target in node.targets:
            for elt in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(elt, ast.Name):
                    names.append(elt.id)
        return names
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def _sets_attribute_by_name(call: ast.Call, attr: str) -> bool:
    """``setattr(self, "attr", v)`` / ``replace_parameter(self, "attr", v)`` or
    ``self.register_buffer("attr", v)`` / ``self.register_parameter("attr", v)``."""
    args = call.args
    if (len(args) >= 2 and isinstance(args[0], ast.Name) and args[0].id == "self"
            and isinstance(args[1], ast.Constant) and args[1].value == attr):
        return True
    func = call.func
    return (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "self"
            and func.attr in ("register_buffer", "register_parameter") and bool(args)
            and isinstance(args[0], ast.Constant) and args[0].value == attr)


class SourceTree:
    """A directory holding ``vllm/`` (or any package) as Python source."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._ast: dict[str, ast.Module] = {}

    def module_file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        return None

    def tree(self, module: str) -> ast.Module:
        if module not in self._ast:
            path = self.module_file(module)
            if path is None:
                raise Missing(f"no module {module}")
            self._ast[module] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        return self._ast[module]

    def _absolute(self, module: str, level: int, name: str | None) -> str:
        if not level:
            return name or ""
        parts = module.split(".")
        if self.module_file(module).name != "__init__.py":
            parts = parts[:-1]
        parts = parts[: len(parts) - (level - 1)]
        return ".".join(parts + ([name] if name else []))

    # ------------------------------------------------------------------ names in a module
    def resolve_name(self, module: str, name: str, _seen=None) -> Found:
        """Where ``module.name`` is defined (following re-exports)."""
        seen = _seen if _seen is not None else set()
        if (module, name) in seen:
            raise Missing(f"import cycle at {module}.{name}")
        seen.add((module, name))
        tree = self.tree(module)
        star_sources = []
        for node in _runtime_nodes(tree.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
                return Found(module, node)
            if name in _targets(node):
                value = node.value
                if isinstance(value, ast.Name) and value.id != name:
                    try:
                        return self.resolve_name(module, value.id, seen)
                    except Missing:
                        pass
                return Found(module, node)
            if isinstance(node, ast.ImportFrom):
                source = self._absolute(module, node.level, node.module)
                for alias in node.names:
                    if alias.name == "*":
                        star_sources.append(source)
                    elif (alias.asname or alias.name) == name:
                        try:
                            return self._resolve_imported(source, alias.name, seen)
                        except Missing:
                            continue  # e.g. `try: from ._C import f` / `except ImportError: def f`
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname == name:
                        return self._module_found(alias.name)
                    if alias.asname is None and alias.name.split(".")[0] == name:
                        return self._module_found(name)
        for source in star_sources:
            try:
                return self.resolve_name(source, name, seen)
            except Missing:
                continue
        submodule = f"{module}.{name}"
        if self.module_file(submodule):
            return Found(submodule, None, "module")
        getattr_fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "__getattr__"), None)
        if getattr_fn is not None and any(
            isinstance(c, ast.Constant) and c.value == name for c in ast.walk(getattr_fn)
        ):
            return Found(module, getattr_fn, "module __getattr__")
        raise Missing(f"{name} not defined in {module}")

    def _module_found(self, module: str) -> Found:
        if self.module_file(module):
            return Found(module, None, "module")
        return Found(module, None, "external module")

    def _resolve_imported(self, source: str, name: str, seen) -> Found:
        if self.module_file(f"{source}.{name}"):
            return Found(f"{source}.{name}", None, "module")
        if self.module_file(source) is None:
            if source.split(".")[0] == self.root_package(source):
                raise Missing(f"no module {source} (imported for {name})")
            return Found(source, None, f"external {source}.{name}")
        return self.resolve_name(source, name, seen)

    def root_package(self, module: str) -> str | None:
        top = module.split(".")[0]
        return top if (self.root / top).is_dir() else None

    # ---------------------------------------------------------------- class attributes
    def class_bases(self, found: Found) -> list[Found]:
        bases = []
        for base in found.node.bases:
            expr = base.value if isinstance(base, ast.Subscript) else base
            dotted = ast.unparse(expr)
            head, _, rest = dotted.partition(".")
            try:
                target = self.resolve_name(found.module, head)
                for part in rest.split(".") if rest else []:
                    target = self.resolve_name(target.module, part) if target.node is None else self.attribute(target, part)
            except Missing:
                continue
            if isinstance(target.node, ast.ClassDef):
                bases.append(target)
        return bases

    def attribute(self, found: Found, attr: str, _depth: int = 0) -> Found:
        """``attr`` on a module or class: defined in the body, on ``self``, or inherited."""
        if found.node is None:
            if found.note.startswith("external"):
                return Found(found.module, None, f"{found.note}.{attr} (outside the tree)")
            return self.resolve_name(found.module, attr)
        if not isinstance(found.node, ast.ClassDef):
            raise Missing(f"{attr}: {found.module}.{getattr(found.node, 'name', '?')} is not a class")
        cls = found.node
        for node in _scope_nodes(cls.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == attr:
                return Found(found.module, node)
            if attr in _targets(node):
                return Found(found.module, node)
        for method in cls.body:
            if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(method):
                    targets = node.targets if isinstance(node, ast.Assign) else (
                        [node.target] if isinstance(node, ast.AnnAssign) else [])
                    for target in targets:
                        if (isinstance(target, ast.Attribute) and target.attr == attr
                                and isinstance(target.value, ast.Name) and target.value.id == "self"):
                            return Found(found.module, node, f"self.{attr} in {method.name}")
                    if isinstance(node, ast.Call) and _sets_attribute_by_name(node, attr):
                        return Found(found.module, node, f"{ast.unparse(node.func)}(..., {attr!r}) in {method.name}")
        if _depth < 20:
            for base in self.class_bases(found):
                try:
                    return self.attribute(base, attr, _depth + 1)
                except Missing:
                    continue
        raise Missing(f"{cls.name} (in {found.module}) has no attribute {attr}")

    def resolve(self, module: str, symbol: str) -> Found:
        """``module`` + dotted ``symbol`` (``Class.attr``)."""
        if self.module_file(module) is None:
            raise Missing(f"no module {module}")
        head, *rest = symbol.split(".")
        found = self.resolve_name(module, head)
        for attr in rest:
            found = self.attribute(found, attr)
        return found

    # ------------------------------------------------------------------------ parameters
    def parameters(self, found: Found) -> tuple[set[str], bool, str]:
        """(parameter names, takes **kwargs, where) of a function, or of a class's
        constructor (its ``__init__`` along the bases, else its dataclass fields)."""
        node = found.node
        if isinstance(node, ast.ClassDef):
            try:
                init = self.attribute(found, "__init__")
                if isinstance(init.node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names, kwargs, _ = self.parameters(init)
                    return names, kwargs, f"{init.module}.{node.name}.__init__"
            except Missing:
                pass
            return self._dataclass_fields(found), False, f"{found.module}.{node.name} (dataclass fields)"
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
            return names, args.kwarg is not None, f"{found.module}.{node.name}"
        raise Missing(f"{found.module}: not a function or class ({type(node).__name__})")

    def _dataclass_fields(self, found: Found, _depth: int = 0) -> set[str]:
        fields = {n.target.id for n in found.node.body
                  if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
                  and "ClassVar" not in ast.unparse(n.annotation)}
        if _depth < 20:
            for base in self.class_bases(found):
                fields |= self._dataclass_fields(base, _depth + 1)
        return fields


# ------------------------------------------------------------------------------ the checks
@dataclass
class Result:
    kind: str
    name: str
    ok: bool
    optional: bool
    detail: str
    digest: str = ""
    """Short hash of the resolved definition's AST: equal across versions = unchanged source."""


def _digest(found: Found) -> str:
    if found.node is None:
        return ""
    return hashlib.sha1(ast.dump(found.node).encode()).hexdigest()[:8]


def check_touchpoint(tree: SourceTree, point) -> Result:
    name = f"{point.module}.{point.symbol}"
    try:
        found = tree.resolve(point.module, point.symbol)
        where = f"{found.module}" + (f" ({found.note})" if found.note else "")
        return Result("symbol", name, True, point.optional, where, _digest(found))
    except Missing as exc:
        return Result("symbol", name, False, point.optional, str(exc))


def check_signature(tree: SourceTree, sig) -> Result:
    name = f"{sig.module}.{sig.callable}({', '.join(sig.names)})" if sig.kind == "params" else (
        f"{sig.module}.{sig.callable}.{{{', '.join(sig.names)}}}")
    try:
        found = tree.resolve(sig.module, sig.callable)
        if sig.kind == "fields":
            absent = []
            for attr in sig.names:
                try:
                    tree.attribute(found, attr)
                except Missing:
                    absent.append(attr)
            if absent:
                return Result("fields", name, False, sig.optional, f"no attribute {', '.join(absent)}")
            return Result("fields", name, True, sig.optional, found.module, _digest(found))
        params, kwargs, where = tree.parameters(found)
        absent = [p for p in sig.names if p not in params]
        if absent and not kwargs:
            return Result("params", name, False, sig.optional, f"{where} takes no {', '.join(absent)}")
        note = f" ({', '.join(absent)} only through **kwargs)" if absent else ""
        return Result("params", name, True, sig.optional, where + note, _digest(found))
    except Missing as exc:
        return Result(sig.kind, name, False, sig.optional, str(exc))


def load_touchpoints(path: str | Path):
    """touchpoints.py is a leaf (standard library only): load it by path, without the package."""
    spec = importlib.util.spec_from_file_location("_cp_nsa_touchpoints", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_checks(source: str | Path, touchpoints) -> list[Result]:
    tree = SourceTree(source)
    results = [check_touchpoint(tree, p) for p in touchpoints.TOUCHPOINTS]
    results += [check_signature(tree, s) for s in getattr(touchpoints, "CALLED_SIGNATURES", ())]
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="directory holding vllm/ as source")
    parser.add_argument("--touchpoints", default=str(Path(__file__).resolve().parents[1] / "vllm_cp_nsa" / "touchpoints.py"))
    parser.add_argument("--label", default="", help="version label for the summary line")
    parser.add_argument("--quiet", action="store_true", help="only failures and the summary")
    args = parser.parse_args(argv)
    results = run_checks(args.source, load_touchpoints(args.touchpoints))
    for r in results:
        if args.quiet and r.ok:
            continue
        status = "ok  " if r.ok else ("OPT " if r.optional else "MISS")
        print(f"{status} {r.kind:6s} {r.name}  -> {r.detail}" + (f"  #{r.digest}" if r.digest else ""))
    required = [r for r in results if not r.optional]
    failed = [r for r in required if not r.ok]
    optional_failed = [r for r in results if r.optional and not r.ok]
    print(f"SUMMARY {args.label or args.source}: {len(results) - len(failed) - len(optional_failed)}/{len(results)} resolved; "
          f"required missing {len(failed)}; optional missing {len(optional_failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
