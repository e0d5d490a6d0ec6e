"""bench/ holds only scripts that run: what they import, start or read is there, and each one is documented.

The benchmarks themselves take minutes to hours and some need a GPU, so CI does not run them; these checks
catch what broke before (a script deleted while others still imported it as a library).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.name != "common.py")  # common.py is the shared module
# Imported only by the runners that run inside the peers' own venvs (bench/.venv-trl, bench/.venv-axolotl).
PEER_PACKAGES = {"trl", "axolotl"}
# `bench/NAME.ext` in prose and shell, `BENCH / "NAME.ext"` in Python
FILE_REFERENCE = re.compile(r'(?:\bbench/|BENCH / ")([A-Za-z_][\w.-]*\.(?:py|sh|yml|txt))\b')


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_module_a_bench_script_imports_is_there() -> None:
    local = {p.stem for p in BENCH.glob("*.py")}
    missing = {
        f"{path.name}: import {name}"
        for path in BENCH.glob("*.py")
        for name in imported_modules(path)
        if name not in local and name not in PEER_PACKAGES and importlib.util.find_spec(name) is None
    }
    assert not missing, sorted(missing)


def test_every_bench_file_named_in_scripts_and_docs_exists() -> None:
    texts = [*BENCH.glob("*.py"), *BENCH.glob("*.sh"), *BENCH.glob("*.yml"), BENCH / "README.md", REPO / "README.md",
             *(REPO / "docs").glob("*.md")]  # not RESULTS.md: a dated record of what ran then
    missing = {
        f"{path.relative_to(REPO)}: bench/{name}"
        for path in texts
        for name in FILE_REFERENCE.findall(path.read_text(encoding="utf-8"))
        if not (BENCH / name).is_file()
    }
    assert not missing, sorted(missing)


def test_every_bench_file_is_documented_in_its_readme() -> None:
    readme = (BENCH / "README.md").read_text(encoding="utf-8")
    tracked = subprocess.run(["git", "ls-files", "bench"], capture_output=True, text=True, cwd=REPO, check=True).stdout
    files = {Path(line).name for line in tracked.splitlines()} - {"README.md", "RESULTS.md", ".gitignore"}
    assert files, "git ls-files found nothing under bench/"
    assert not sorted(name for name in files if f"`{name}`" not in readme and f"bench/{name}" not in readme)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_every_bench_script_answers_help(script: Path) -> None:
    proc = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stdout + proc.stderr
