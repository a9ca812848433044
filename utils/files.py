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


REPO_ROOT = Path(__file__).resolve().parents[1]


def _existing(spec: str | Path, repo_folder: str) -> Path | None:
    """``spec`` if it is a file, else a bare file name found in the repository's ``repo_folder``."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = REPO_ROOT / repo_folder / path.name
    return shipped if path.parent == Path(".") and shipped.is_file() else None


def find_data_yaml(spec: str | Path) -> Path:
    """A dataset yaml as given, or a bare name found in the repository's data/ (``VisDrone.yaml``)."""
    found = _existing(spec, "data")
    if found is not None:
        return found
    raise FileNotFoundError(f"--data {spec} not found (give a path to a dataset yaml, or a name in data/)")


def find_weights(spec: str | Path, flag: str = "--weights") -> Path:
    """A checkpoint as given, one in the repository's weights/, or an official YOLOv5 release name
    (``yolov5s.pt``) fetched into weights/ by ``weights/download.py`` — as YOLOv5 users expect."""
    found = _existing(spec, "weights")
    if found is not None:
        return found
    path = Path(spec)
    from weights.download import MODELS, DownloadError, download  # deferred: only when a file is missing

    name = path.name[:-3] if path.name.endswith(".pt") else path.name
    if path.parent == Path(".") and name.lower() in MODELS:
        try:
            return download(name, REPO_ROOT / "weights")
        except DownloadError as e:
            raise FileNotFoundError(str(e)) from None
    raise FileNotFoundError(f"{flag} {spec} not found (give a path, a file in weights/, or an official "
                            "release name such as yolov5s.pt)")
