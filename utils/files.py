"""Small filesystem helpers shared by the CLI scripts and the training engine."""

from __future__ import annotations

from pathlib import Path


def increment_path(path: str | Path, exist_ok: bool = False, sep: str = "", mkdir: bool = False) -> Path:
    """The first free run path: ``runs/val/exp``, then ``exp2``, ``exp3``, ...

    With ``exist_ok`` the path is returned as is (reusing an existing run folder). A file path keeps
    its suffix (``results.csv`` -> ``results2.csv``). ``mkdir`` creates the returned folder, which
    also claims it against a concurrent caller (``mkdir`` without ``exist_ok`` fails if it lost the race).
    """
    path = Path(path)
    if not exist_ok and path.exists():
        stem, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
        n = 2
        while True:
            candidate = Path(f"{stem}{sep}{n}{suffix}")
            if not candidate.exists():
                if not mkdir:
                    path = candidate
                    break
                try:
                    candidate.mkdir(parents=True)
                    return candidate
                except FileExistsError:  # another process took it in the meantime: try the next
                    pass
            n += 1
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path
