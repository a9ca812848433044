"""Where checkpoints come from: a path, the repository's ``weights/`` folder, or an official release.

:func:`find_weights` resolves a ``--weights`` value as YOLOv5 users expect: an existing file as
given, a bare file name shipped in ``weights/`` (``demo_teacher.pt``), or the name of an official
YOLOv5 v7.0 release model (``yolov5s.pt``), which :func:`download` fetches into ``weights/``.

A release file is streamed into a temporary file beside its destination
(:func:`utils.downloads.temp_download`: byte cap, announced length checked), then checked here —
a size window derived from the model's parameter count (release files hold the model in fp16,
~2 bytes per parameter), a load through :func:`models.checkpoint.load_checkpoint` (the restricted
unpickler: no code from the file runs) and the loaded parameter count against the published one —
and only then renamed into place, so a failed or interrupted download never leaves a
half-written ``yolov5s.pt``. An existing file that passes the same checks is kept.

Why in ``models/``: what is fetched is a checkpoint and the check is a checkpoint load; it uses only
the project-free helpers :mod:`utils.downloads` (transport) and :mod:`utils.files` (repository
folders), so ``utils/`` never has to reach up into ``models/``. ``weights/download.py`` is the CLI.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from models.checkpoint import CheckpointError, load_checkpoint
from utils.downloads import HTTP_ERROR, INCOMPLETE, UNREACHABLE, FetchError, temp_download
from utils.files import REPO_ROOT, find_in_repo

RELEASE_TAG = "v7.0"
RELEASE_URL = "https://github.com/ultralytics/yolov5/releases/download/{tag}/{name}.pt"
WEIGHTS_DIR = REPO_ROOT / "weights"

# Parameters of each release model (nc=80), exact: the P5 figures as published; the P6 ones (published
# rounded to 0.1 M) counted on the real YOLOv5 7.0's models, equal to our models/yolov5*6.yaml.
PARAMS: dict[str, int] = {
    "yolov5n": 1_872_157,
    "yolov5s": 7_235_389,
    "yolov5m": 21_190_557,
    "yolov5l": 46_563_709,
    "yolov5x": 86_749_405,
    "yolov5n6": 3_246_940,
    "yolov5s6": 12_626_620,
    "yolov5m6": 35_731_932,
    "yolov5l6": 76_770_172,
    "yolov5x6": 140_794_780,
}
MODELS = tuple(PARAMS)


class DownloadError(RuntimeError):
    """A download that could not be completed or verified; the message is one line saying what to do."""


def model_name(name: str) -> str:
    """``'yolov5s'``, ``'yolov5s.pt'`` or ``'YOLOv5s'`` → ``'yolov5s'``; anything else is a ValueError."""
    key = str(name).strip().lower().removesuffix(".pt")
    if key not in PARAMS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    return key


def release_url(name: str) -> str:
    """The GitHub release asset URL of ``name`` (a :data:`MODELS` entry)."""
    return RELEASE_URL.format(tag=RELEASE_TAG, name=model_name(name))


def size_window(name: str) -> tuple[int, int]:
    """(min, max) plausible file size in bytes: fp16 weights (2 B/param) plus pickle overhead."""
    n = PARAMS[model_name(name)]
    return int(2 * n * 0.9), int(2 * n * 1.3) + (4 << 20)


def parameter_count(state_dict: dict) -> int:
    """Learned parameters in a state_dict: ``*.weight`` and ``*.bias`` entries (not BN statistics or
    anchors), the way the release parameter counts are published."""
    return sum(int(v.numel()) for k, v in state_dict.items() if k.endswith((".weight", ".bias")))


def verify(path: str | Path, name: str) -> None:
    """Raise :class:`DownloadError` unless ``path`` looks like and loads as release model ``name``."""
    path, name = Path(path), model_name(name)
    size = path.stat().st_size
    lo, hi = size_window(name)
    if not lo <= size <= hi:
        raise DownloadError(f"{path.name}: {size / 1e6:.1f} MB is not a plausible {name}.pt "
                            f"(expected {lo / 1e6:.1f}-{hi / 1e6:.1f} MB); delete it and download again")
    try:
        n = parameter_count(load_checkpoint(path)["state_dict"])
    except CheckpointError as e:
        raise DownloadError(f"{path.name}: downloaded file is not a loadable YOLOv5 checkpoint ({e})") from None
    expected = PARAMS[name]
    if n != expected:
        raise DownloadError(f"{path.name}: holds a model with {n:,} parameters, {name} has {expected:,}; "
                            f"wrong file?")


def _advice(e: FetchError, dest: Path) -> str:
    """One line: what failed and how to finish by hand."""
    if e.kind == HTTP_ERROR:
        return f"{e}; download it by hand and save it as {dest}"
    if e.kind == UNREACHABLE:
        return f"{e}: offline? Fetch the file by hand (browser, or another machine) and save it as {dest}"
    if e.kind == INCOMPLETE:
        return f"{e}; run the command again"
    return f"{e}; wrong file? Fetch it by hand and save it as {dest}"


def _kept(dest: Path, name: str) -> bool:
    """True when an existing ``dest`` verifies (it is then used as is)."""
    try:
        verify(dest, name)
        return True
    except DownloadError as e:
        print(f"{dest}: existing file rejected ({e}); downloading it again", file=sys.stderr)
        return False


def download(name: str, dest_dir: str | Path | None = None, force: bool = False, timeout: float = 60.0,
             progress: bool = False) -> Path:
    """Download release checkpoint ``name`` (e.g. 'yolov5s') into ``dest_dir`` (default: the
    repository's weights/); return its path.

    An existing ``dest_dir/<name>.pt`` that verifies is returned as is (``force`` re-downloads).
    Raises ValueError for an unknown name and :class:`DownloadError` (one line, including the URL
    to fetch by hand) when offline, on HTTP errors, or when the file fails verification; nothing
    is left at the destination in those cases.
    """
    name = model_name(name)
    dest_dir = Path(WEIGHTS_DIR if dest_dir is None else dest_dir).expanduser()
    dest = dest_dir / f"{name}.pt"
    if dest.is_file() and not force and _kept(dest, name):
        return dest
    url = release_url(name)
    if progress:
        print(f"Downloading {url} to {dest}", file=sys.stderr)
    try:
        with temp_download(url, dest_dir, prefix=f".{name}.", timeout=timeout, max_bytes=size_window(name)[1],
                           agent="yolo-kd-weights/1", progress=progress) as part:
            verify(part, name)
            os.replace(part, dest)
    except FetchError as e:
        raise DownloadError(_advice(e, dest)) from None
    return dest


def find_weights(spec: str | Path, flag: str = "--weights") -> Path:
    """A checkpoint as given, one in the repository's weights/, or an official YOLOv5 release name
    (``yolov5s.pt``) fetched into weights/ by :func:`download`.

    Raises FileNotFoundError (one line naming ``flag``) when none applies or the download fails.
    """
    found = find_in_repo(spec, "weights")
    if found is not None:
        return found
    path = Path(spec)
    if path.parent == Path(".") and path.name.lower().removesuffix(".pt") in PARAMS:
        try:
            return download(model_name(path.name), WEIGHTS_DIR)
        except DownloadError as e:
            raise FileNotFoundError(str(e)) from None
    raise FileNotFoundError(f"{flag} {spec} not found (give a path, a file in weights/, or an official "
                            "release name such as yolov5s.pt)")


__all__ = ["MODELS", "PARAMS", "RELEASE_TAG", "DownloadError", "download", "find_weights", "model_name",
           "parameter_count", "release_url", "size_window", "verify"]
