"""The layers of the repository, checked on the source: which part may import which.

    CLI scripts (train_distill, val, export, detect, analyze_kd)      weights/download.py (CLI)
        → engine/ → distill/, analysis/ → models/ → utils/ (project-free helpers)

* ``utils/`` is the bottom layer: it imports no other part of the project.
* ``models/`` knows nothing of training, data, distillation or analysis; from ``utils/`` it may use
  only the project-free helpers in :data:`MODELS_MAY_USE` (file lookup, download transport, the
  placeholder-anchor, image-size and output conventions).
* ``distill/`` does not import ``engine/`` (training calls the distiller, not the reverse).
* ``analysis/`` is not imported by training (``engine/``, ``distill/``).
* No library module imports a CLI script; CLI scripts do not import each other.
* ``weights/`` and ``data/`` are data folders: no library module imports them.

Every ``import`` statement counts, at module level or inside a function (a deferred import is
still a dependency). Read with ``ast``: nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLI_SCRIPTS = frozenset({"train_distill", "val", "export", "detect", "analyze_kd"})
LIBRARY = ("models", "utils", "engine", "distill", "analysis")
_NOT_LIBRARY = CLI_SCRIPTS | {"weights", "data", "benchmarks", "scripts", "tests", "conftest"}
PROJECT = frozenset(LIBRARY) | _NOT_LIBRARY

# Top-level project names each part must not import (besides itself).
FORBIDDEN: dict[str, frozenset[str]] = {
    "utils": _NOT_LIBRARY | {"models", "engine", "distill", "analysis"},
    "models": _NOT_LIBRARY | {"utils", "engine", "distill", "analysis"},
    "distill": _NOT_LIBRARY | {"engine", "analysis"},
    "analysis": _NOT_LIBRARY | {"engine"},
    "engine": _NOT_LIBRARY | {"analysis"},
    "weights": (_NOT_LIBRARY - {"weights"}) | {"engine", "distill", "analysis"},
    "benchmarks": CLI_SCRIPTS,  # benchmarks measure the library, not the scripts
    **{cli: (CLI_SCRIPTS - {cli}) | {"weights", "benchmarks", "scripts", "tests"} for cli in CLI_SCRIPTS},
}
# The exceptions to FORBIDDEN, by module: leaves that import nothing from the project themselves.
MODELS_MAY_USE = frozenset({"utils.files", "utils.downloads", "utils.anchors", "utils.geometry",
                            "utils.detect_outputs"})
ALLOWED: dict[str, frozenset[str]] = {"models": MODELS_MAY_USE}

# Violations in files that other work is reshaping now, as "file imports module"; each entry must
# still be a violation (an entry that no longer is fails the test, so the list only shrinks).
KNOWN: frozenset[str] = frozenset({
})


def _part(path: Path) -> str:
    """The top-level project name a source file belongs to (``utils/files.py`` → ``utils``)."""
    rel = path.relative_to(REPO)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _module(base: str, name: str) -> str:
    """``from base import name``: ``base.name`` when that is a module of the repository, else ``base``."""
    full = f"{base}.{name}"
    as_path = REPO.joinpath(*full.split("."))
    return full if as_path.with_suffix(".py").is_file() or as_path.is_dir() else base


def imported_modules(path: Path) -> dict[str, int]:
    """Project modules imported anywhere in ``path`` → the line of the first such import."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:  # relative imports stay in their package
            names = [_module(node.module or "", alias.name) for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PROJECT:
                found.setdefault(name, node.lineno)
    return found


def _sources() -> list[Path]:
    skip = {"datasets", "runs", ".git", ".venv", "venv"}
    return sorted(p for p in REPO.rglob("*.py") if not skip & set(p.relative_to(REPO).parts))


def layer_violations() -> dict[str, int]:
    """``"file imports module"`` → line, for every import a rule above forbids."""
    out = {}
    for path in _sources():
        part = _part(path)
        for name, line in imported_modules(path).items():
            top = name.split(".")[0]
            if top != part and top in FORBIDDEN.get(part, ()) and name not in ALLOWED.get(part, ()):
                out[f"{path.relative_to(REPO).as_posix()} imports {name}"] = line
    return out


def test_no_part_imports_across_the_layers() -> None:
    found = layer_violations()
    new = [f"{v} (line {line})" for v, line in found.items() if v not in KNOWN]
    assert not new, "layer violations:\n" + "\n".join(new)
    assert not KNOWN - set(found), f"fixed, remove from KNOWN: {sorted(KNOWN - set(found))}"


def test_allowed_exceptions_are_project_free_leaves() -> None:
    for module in set().union(*ALLOWED.values()):
        path = REPO.joinpath(*module.split(".")).with_suffix(".py")
        assert path.is_file(), module
        assert imported_modules(path) == {}, f"{module} must import nothing from the project"


@pytest.mark.parametrize("source, expected", [
    ("import utils.files\n", {"utils.files": 1}),
    ("def f():\n    from weights.download import main\n", {"weights.download": 2}),
    ("from models import load_model, hub\nimport torch\nimport val\n", {"models": 1, "models.hub": 1, "val": 3}),
    ("from . import sibling\nimport numpy\n", {}),
])
def test_imports_are_found_at_any_depth(tmp_path: Path, source: str, expected: dict[str, int]) -> None:
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert imported_modules(path) == expected


def test_every_library_part_has_rules() -> None:
    assert set(LIBRARY) <= set(FORBIDDEN)
    assert all(part not in FORBIDDEN[part] for part in LIBRARY)
