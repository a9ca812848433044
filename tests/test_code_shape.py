"""Code shape on the train/val/export path, checked on the source with ``ast`` (nothing is imported).

* Every function (and method) is at most :data:`MAX_FUNCTION_LINES` lines, decorators excluded:
  a function that does not fit on one screen hides its steps.
* Every file over :data:`MAX_FILE_LINES` lines says why in its module docstring, on a line starting
  with ``Size:`` (one subject that reads best in one place); otherwise it should be split.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
MAX_FILE_LINES = 400
SCRIPTS = ("train_distill.py", "val.py", "export.py", "detect.py")
PACKAGES = ("engine", "models", "utils", "distill")

# Files other work is reshaping right now; each entry must still exist (the set only shrinks).
ALLOW: dict[str, str] = {}  # files exempt from both checks, each with its reason (none today)


def path_files() -> list[Path]:
    """The modules on the train/val/export path."""
    files = [REPO / name for name in SCRIPTS]
    for package in PACKAGES:
        files += sorted((REPO / package).rglob("*.py"))
    return files


def long_functions(tree: ast.AST, limit: int = MAX_FUNCTION_LINES) -> list[tuple[str, int, int]]:
    """(name, first line, length) of every function or method longer than ``limit`` lines."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > limit:
                out.append((node.name, node.lineno, length))
    return out


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def _checked() -> list[Path]:
    return [p for p in path_files() if _rel(p) not in ALLOW]


@pytest.mark.parametrize("path", _checked(), ids=_rel)
def test_functions_fit_on_a_screen(path: Path) -> None:
    found = long_functions(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    assert not found, "split: " + ", ".join(f"{name} (line {line}, {n} lines)" for name, line, n in found)


@pytest.mark.parametrize("path", _checked(), ids=_rel)
def test_long_files_say_why(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if len(text.splitlines()) <= MAX_FILE_LINES:
        return
    doc = ast.get_docstring(ast.parse(text, str(path))) or ""
    assert any(line.startswith("Size:") for line in doc.splitlines()), (
        f"{_rel(path)} has {len(text.splitlines())} lines: split it, or give the reason on a 'Size:' docstring line"
    )


def test_allow_list_names_real_files() -> None:
    assert all((REPO / name).is_file() for name in ALLOW)


def test_the_checks_can_fail() -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    tree = ast.parse(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(tree) == [("long", 5, MAX_FUNCTION_LINES + 1)]
