"""Static import closure of an engine's offline path, for staging a GPU stack without a GPU.

The GPU hosts reach no package registry, so every module an engine imports at module level on
the path we run must travel as a wheel. Running the import on the CPU machine is no help (CUDA
wheels do not import here), so this follows ``import`` statements in the source instead:
starting from entry modules inside an unzipped site dir, it walks module-level imports (also
those under ``if`` / ``try`` at module level; not those inside functions, which are lazy) of the
engine's own packages (``--follow``, default: the entries' top-level packages) and reports
top-level names found neither in the site dir nor in the image's list. Third-party packages are
only checked to be present, not walked: their own optional imports sit behind availability
checks the scan cannot evaluate (transformers, torch). Imports inside ``try: ... except
ImportError`` are reported apart: the engine guards them.

    python eval/import_closure.py --site /tmp/sgw/site --have-file image_modules.txt \
        sglang.srt.entrypoints.engine sglang.srt.models.deepseek_v2
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Closure:
    """Modules visited and the top-level names they need that the site lacks."""

    visited: set[str] = field(default_factory=set)
    missing: dict[str, str] = field(default_factory=dict)  # top-level name -> first importer
    guarded: dict[str, str] = field(default_factory=dict)  # same, only under try/except ImportError


def module_file(site: Path, name: str) -> Path | None:
    """The source file of ``name`` in ``site`` (package ``__init__`` or module), if any."""
    base = site.joinpath(*name.split("."))
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def top_level_present(roots: list[Path], top: str, have: set[str]) -> bool:
    """Whether a top-level import name is satisfied by the site dirs, the image or the stdlib."""
    if top in have or top in sys.stdlib_module_names or top in sys.builtin_module_names or top == "__main__":
        return True
    return any((root / top).is_dir() or (root / f"{top}.py").is_file() or any(root.glob(f"{top}.*.so"))
               for root in roots)


def _catches_import_error(node: ast.Try) -> bool:
    names = {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"}
    for handler in node.handlers:
        if handler.type is None:
            return True
        types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        if any(isinstance(t, ast.Name) and t.id in names for t in types):
            return True
    return False


TARGET_PYTHON = (3, 12)  # the GPU hosts' python3
_COMPARE = {ast.GtE: lambda a, b: a >= b, ast.Gt: lambda a, b: a > b, ast.Lt: lambda a, b: a < b,
            ast.LtE: lambda a, b: a <= b}


def _version_test(test: ast.expr) -> bool | None:
    """The value of ``sys.version_info <op> (M, N)`` on TARGET_PYTHON; None for any other test."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and type(test.ops[0]) in _COMPARE):
        return None
    left, right = test.left, test.comparators[0]
    if not (isinstance(left, ast.Attribute) and left.attr == "version_info" and isinstance(right, ast.Tuple)):
        return None
    try:
        wanted = tuple(ast.literal_eval(right))
    except ValueError:
        return None
    return _COMPARE[type(test.ops[0])](TARGET_PYTHON[:len(wanted)], wanted)


def module_level_imports(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, bool]]:
    """(absolute module name, guarded) for every import executed when ``module`` is imported."""
    found: list[tuple[str, bool]] = []
    package = module if is_package else module.rpartition(".")[0]

    def resolve(node: ast.ImportFrom) -> list[str]:
        if node.level == 0:
            base = node.module or ""
        else:
            parts = package.split(".")
            parts = parts[: len(parts) - (node.level - 1)]
            base = ".".join(p for p in [*parts, node.module or ""] if p)
        # ``from pkg import name`` may name a submodule: try both
        return [base, *(f"{base}.{a.name}" for a in node.names if a.name != "*")]

    def walk(body: list[ast.stmt], guarded: bool) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                found.extend((a.name, guarded) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                found.extend((name, guarded) for name in resolve(node))
            elif isinstance(node, ast.Try):
                walk(node.body, guarded or _catches_import_error(node))
                for handler in node.handlers:  # a fallback: runs only when the body failed
                    walk(handler.body, True)
                walk(node.orelse, guarded)
                walk(node.finalbody, guarded)
            elif isinstance(node, ast.If):
                # ``if TYPE_CHECKING:`` never runs
                test = node.test
                if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
                    walk(node.orelse, guarded)
                    continue
                if isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
                    walk(node.orelse, guarded)
                    continue
                taken = _version_test(test)
                if taken is not None:  # ``if sys.version_info >= (3, 14):`` on the target Python
                    walk(node.body if taken else node.orelse, guarded)
                    continue
                walk(node.body, guarded)
                walk(node.orelse, guarded)
            elif isinstance(node, ast.With):
                walk(node.body, guarded)

    walk(tree.body, False)
    return found


def closure(site: Path, entries: list[str], have: set[str], follow: set[str] | None = None,
            extra_paths: tuple[str, ...] = ()) -> Closure:
    """Walk module-level imports from ``entries`` through the ``follow`` packages; unguarded wins
    over guarded for a name. ``extra_paths`` (relative to ``site``) are also on the path there."""
    follow = follow or {e.split(".")[0] for e in entries}
    roots = [site, *(site / p for p in extra_paths)]
    result = Closure()
    stack: list[tuple[str, bool, str]] = [(e, False, "<entry>") for e in entries]
    while stack:
        name, guarded, importer = stack.pop()
        top = name.split(".")[0]
        if not top_level_present(roots, top, have):
            if guarded:
                result.guarded.setdefault(top, importer)
            else:
                result.missing.setdefault(top, importer)
                result.guarded.pop(top, None)
            continue
        if name in result.visited or top not in follow:
            continue
        path = module_file(site, name)
        if path is None:
            continue  # a name inside a module, the image's package, or a compiled extension
        result.visited.add(name)
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        parents = name.split(".")
        for i in range(1, len(parents)):
            stack.append((".".join(parents[:i]), guarded, importer))
        tree = ast.parse(path.read_bytes(), filename=str(path))
        for child, child_guarded in module_level_imports(tree, name, path.name == "__init__.py"):
            stack.append((child, guarded or child_guarded, name))
    for top in result.missing:
        result.guarded.pop(top, None)
    return result


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def unmet_requirements(wheels: list[Path], image_dists: set[str], python: str = "3.12") -> dict[str, list[str]]:
    """Requires-Dist of the staged wheels (no extras, markers for Linux x86_64 / ``python``) that
    neither another staged wheel nor the image provides: wheel -> requirements. Versions are not
    compared (the image's versions are known only for a few packages)."""
    from packaging.requirements import Requirement

    env = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "python_version": python, "python_full_version": python + ".3", "implementation_name": "cpython",
           "os_name": "posix", "extra": ""}
    staged = {_canonical(w.name.split("-")[0]) for w in wheels}
    have = staged | {_canonical(d) for d in image_dists}
    unmet: dict[str, list[str]] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
            lines = zf.read(meta).decode(errors="replace").splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            if _canonical(req.name) not in have:
                unmet.setdefault(wheel.name, []).append(str(req))
    return unmet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("entries", nargs="+", help="entry modules (dotted names)")
    ap.add_argument("--site", required=True, type=Path, help="unzipped wheels (pip install --target)")
    ap.add_argument("--have", default="", help="comma-separated top-level names the image has")
    ap.add_argument("--have-file", type=Path, help="one top-level import name a line")
    ap.add_argument("--follow", default="", help="comma-separated packages to walk (default: the entries')")
    ap.add_argument("--extra-path", action="append", default=[],
                    help="a directory under --site that is also on sys.path there (e.g. nvidia_cutlass_dsl/dsl_packages)")
    ap.add_argument("--wheels", type=Path, help="also check the Requires-Dist of every wheel in this folder")
    ap.add_argument("--image-dists", type=Path, help="distributions the image holds, one a line (for --wheels)")
    args = ap.parse_args()
    have = {h for h in args.have.split(",") if h}
    if args.have_file:
        have |= {line.strip() for line in args.have_file.read_text().splitlines() if line.strip() and not line.startswith("#")}
    follow = {f for f in args.follow.split(",") if f} or None
    result = closure(args.site, args.entries, have, follow, tuple(args.extra_path))
    print(f"modules visited: {len(result.visited)}")
    for top, importer in sorted(result.missing.items()):
        print(f"MISSING {top}  (first imported by {importer})")
    for top, importer in sorted(result.guarded.items()):
        print(f"guarded {top}  (under try/except in {importer})")
    if args.wheels:
        dists = {line.strip() for line in args.image_dists.read_text().splitlines()
                 if line.strip() and not line.startswith("#")} if args.image_dists else set()
        for wheel, reqs in sorted(unmet_requirements(sorted(args.wheels.glob("*.whl")), dists).items()):
            print(f"UNMET {wheel}: {', '.join(reqs)}")


if __name__ == "__main__":
    main()
