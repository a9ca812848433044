"""Every module of the project imports (benchmarks and scripts too: they are not run by other tests,
so a name moved by a refactor would otherwise only surface when a user runs them)."""

from __future__ import annotations

import importlib
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _modules() -> list[str]:
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout (e.g. an unpacked archive): walk the tree
        files = [str(p.relative_to(REPO)) for p in REPO.rglob("*.py")]
    keep = [f for f in files if not f.startswith(("tests/", ".")) and Path(f).name != "conftest.py"]
    return sorted(f[:-3].replace("/", ".").removesuffix(".__init__") for f in keep)


@pytest.mark.parametrize("name", _modules())
def test_module_imports(name: str) -> None:
    importlib.import_module(name)
