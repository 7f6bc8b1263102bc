"""The project reads nothing outside its own tree: a fresh clone with no sibling folders
must set up, run the demo and pass the tests. Guards every tracked code / config file
against paths that climb out of the repository (the GSM8K data once came from
``../shared``, which a clone does not have)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Narrative files (notes, READMEs) may name where something came from; code may not read it.
CODE_SUFFIXES = {".py", ".sh", ".toml", ".yaml", ".yml", ".cfg", ".ini", ".json", ".txt"}
OUTSIDE_PATTERNS = [
    re.compile(r"\.\./shared"),                      # ../shared/..., ../../shared
    re.compile(r"""["']\.\.["']\s*,\s*["']shared"""),  # os.path.join("..", "shared")
    re.compile(r"""["']\.\.["']\s*/\s*["']shared"""),  # REPO / ".." / "shared"
    re.compile(r"""\.parent\s*/\s*["']shared["']"""),    # REPO.parent / "shared"
    re.compile(r"/work/(shared|main)\b"),              # this machine's absolute layout
]


def tracked_code_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True,
                           text=True).stdout.split("\0")
    files = [REPO / n for n in names if n]
    return [f for f in files if (f.suffix in CODE_SUFFIXES or f.parent.name == ".ci")
            and "eval/results/" not in f.as_posix()]  # recorded outputs of past runs, not code


def outside_references(text: str) -> list[str]:
    return [m.group(0) for pattern in OUTSIDE_PATTERNS for m in pattern.finditer(text)]


def test_patterns_catch_the_ways_out():
    assert outside_references('DATA = REPO.parent / "shared" / "data"')
    assert outside_references('p = REPO / ".." / "shared" / "data" / "gsm8k"')
    assert outside_references("bash ../shared/tools/gpu-stack/stage.sh")
    assert outside_references('os.path.join("..", "shared", "x")')
    assert not outside_references('DEFAULT = Path(__file__).with_name("data")')


def test_no_tracked_code_reads_outside_the_repo():
    this_file = Path(__file__).resolve()
    files = tracked_code_files()
    assert any(f.name == "run.py" for f in files), "git ls-files found no code: run from a checkout"
    offenders = {}
    for f in files:
        if f.resolve() == this_file or not f.is_file():
            continue
        found = outside_references(f.read_text(errors="replace"))
        if found:
            offenders[str(f.relative_to(REPO))] = found
    assert not offenders, f"paths outside the repository: {offenders}"


def test_gsm8k_default_data_is_in_the_repo():
    from eval.gsm8k.run import DEFAULT_DATA_DIR

    assert DEFAULT_DATA_DIR.resolve().is_relative_to(REPO)
    for split in ("test", "train"):
        lines = (DEFAULT_DATA_DIR / f"{split}.jsonl").read_text().splitlines()
        assert lines and all('"answer"' in line and "####" in line for line in lines[:50])
    assert (DEFAULT_DATA_DIR / "LICENSE").read_text().startswith("MIT License")


def test_test_module_names_are_unique():
    """pytest imports test modules by basename (no packages here): two test files with one name
    in different folders make collection fail on a fresh clone."""
    names = [f.name for f in (REPO / "plugin_tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
