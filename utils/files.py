"""Small filesystem helpers shared by the CLI scripts and the training engine.

Run folders (:func:`increment_path`) and the repository's own folders (:data:`REPO_ROOT`,
:func:`find_in_repo`, :func:`find_data_yaml`). Checkpoint names, including the official release
names that are downloaded on demand, are resolved by :func:`models.hub.find_weights`. Imports
nothing from the project.
"""

from __future__ import annotations

import re
from pathlib import Path


def _numbered_siblings(base: Path, sep: str, suffix: str) -> list[int]:
    """The numbers n of existing siblings named ``<base.name><sep><n><suffix>`` next to ``base``."""
    pattern = re.compile(re.escape(base.name + sep) + r"(\d+)" + re.escape(suffix))
    found = (pattern.fullmatch(p.name) for p in base.parent.iterdir()) if base.parent.is_dir() else ()
    return [int(m.group(1)) for m in found if m]


def increment_path(path: str | Path, exist_ok: bool = False, sep: str = "", mkdir: bool = False) -> Path:
    """A run path that is not taken yet: ``runs/val/exp``, then ``exp2``, ``exp3``, ...

    ``path`` itself when it does not exist yet, or when ``exist_ok`` (reuse the run folder).
    Otherwise the number after the highest one in use among its siblings (at least 2), so runs
    stay numbered in the order they were made even when an older one was deleted. An existing
    file keeps its suffix after the number (``results.csv`` -> ``results2.csv``).

    ``mkdir`` creates the folder and, for a new number, claims it atomically: ``mkdir`` without
    ``exist_ok`` fails when a concurrent process made the same folder first, and then the next
    free number is tried.
    """
    path = Path(path)
    if exist_ok or not path.exists():
        if mkdir:
            path.mkdir(parents=True, exist_ok=True)
        return path
    suffix = path.suffix if path.is_file() else ""
    base = path.with_suffix("") if suffix else path
    while True:
        number = max(_numbered_siblings(base, sep, suffix), default=1) + 1
        candidate = base.with_name(f"{base.name}{sep}{number}{suffix}")
        if not mkdir:
            return candidate
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:  # another process claimed this number between the scan and mkdir
            continue


REPO_ROOT = Path(__file__).resolve().parents[1]


def find_in_repo(spec: str | Path, repo_folder: str) -> Path | None:
    """``spec`` if it is a file; else, for a bare file name, that name in the repository's
    ``repo_folder`` (``data``, ``weights``) if it is there; else None."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = REPO_ROOT / repo_folder / path.name
    return shipped if path.parent == Path(".") and shipped.is_file() else None


def find_data_yaml(spec: str | Path) -> Path:
    """A dataset yaml as given, or a bare name found in the repository's data/ (``VisDrone.yaml``)."""
    found = find_in_repo(spec, "data")
    if found is not None:
        return found
    raise FileNotFoundError(f"--data {spec} not found (give a path to a dataset yaml, or a name in data/)")
