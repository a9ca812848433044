"""Fetch official YOLOv5 v7.0 release checkpoints (the teachers and starting weights of the experiments).

Usage::

    python weights/download.py yolov5s yolov5m            # into weights/
    python weights/download.py yolov5x6 --dir ~/models    # elsewhere
    python -m weights.download --list

From Python: ``from weights.download import download; path = download("yolov5m", "weights")``.

Each file is streamed (urllib only) into a temporary file beside its destination, checked — the byte
count the server announced, a size window derived from the model's parameter count (release files
hold the model in fp16, ~2 bytes per parameter), then loaded with ``models.load_checkpoint`` (the
restricted unpickler) and its parameter count compared with the published one — and only then
renamed into place (atomic ``os.replace``), so a failed or interrupted download never leaves a
half-written ``yolov5s.pt`` behind. An existing file that passes the same checks is kept.

Offline (or behind a firewall)? Download the file by hand from the URL printed in the error, put it
in the destination folder, and run the same command again: it will be verified and kept.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

RELEASE_TAG = "v7.0"
RELEASE_URL = "https://github.com/ultralytics/yolov5/releases/download/{tag}/{name}.pt"
ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / "weights"

# Parameters of each release model (nc=80). P5 figures are exact; the P6 ones are published rounded
# to 0.1 M, hence the tolerance used when comparing.
PARAMS: dict[str, int] = {
    "yolov5n": 1_872_157,
    "yolov5s": 7_235_389,
    "yolov5m": 21_190_557,
    "yolov5l": 46_563_709,
    "yolov5x": 86_749_405,
    "yolov5n6": 3_200_000,
    "yolov5s6": 12_600_000,
    "yolov5m6": 35_700_000,
    "yolov5l6": 76_700_000,
    "yolov5x6": 140_700_000,
}
MODELS = tuple(PARAMS)
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A download that could not be completed or verified; the message is one line saying what to do."""


def model_name(name: str) -> str:
    """``'yolov5s'``, ``'yolov5s.pt'`` or ``'YOLOv5s'`` → ``'yolov5s'``; anything else is a ValueError."""
    key = str(name).strip().lower()
    key = key[:-3] if key.endswith(".pt") else key
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


def _state_dict_params(state_dict: dict) -> int:
    """Parameter count from a state_dict: weights and biases, not BN statistics or anchors."""
    return sum(int(v.numel()) for k, v in state_dict.items() if k.endswith((".weight", ".bias")))


def _load_and_count(path: Path) -> int:
    """Load ``path`` with ``models.load_checkpoint``; return its parameter count.

    ``models`` is importable when the repository root is on the import path (``python -m``,
    pytest, library use). Run as ``python weights/download.py`` it is not, and this file does not
    edit ``sys.path``: the check then runs in a child interpreter started in the repository root.
    """
    try:
        from models.checkpoint import CheckpointError, load_checkpoint
    except ModuleNotFoundError:
        return _load_and_count_in_child(path)
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise DownloadError(f"{path.name}: downloaded file is not a loadable YOLOv5 checkpoint ({e})") from None
    return _state_dict_params(ckpt["state_dict"])


def _load_and_count_in_child(path: Path) -> int:
    code = ("import sys; from weights.download import _load_and_count; "
            "print(_load_and_count(__import__('pathlib').Path(sys.argv[1])))")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise DownloadError(f"{path.name}: could not verify the checkpoint ({last})")
    return int(proc.stdout.strip().splitlines()[-1])


def verify(path: str | Path, name: str) -> None:
    """Raise :class:`DownloadError` unless ``path`` looks like and loads as release model ``name``."""
    path, name = Path(path), model_name(name)
    size = path.stat().st_size
    lo, hi = size_window(name)
    if not lo <= size <= hi:
        raise DownloadError(f"{path.name}: {size / 1e6:.1f} MB is not a plausible {name}.pt "
                            f"(expected {lo / 1e6:.1f}-{hi / 1e6:.1f} MB); delete it and download again")
    n = _load_and_count(path)
    expected = PARAMS[name]
    tol = 0 if name[-1] != "6" else 0.05 * expected  # P6 counts are published rounded
    if abs(n - expected) > tol:
        raise DownloadError(f"{path.name}: holds a model with {n:,} parameters, {name} has {expected:,}; "
                            f"wrong file?")


def _fetch(url: str, tmp, timeout: float, show: bool) -> int:
    """Stream ``url`` into the open binary file ``tmp``; return the byte count (checked vs Content-Length)."""
    req = urllib.request.Request(url, headers={"User-Agent": "yolo-kd-weights/1"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        done, last_pct = 0, -10
        while True:
            chunk = resp.read(_CHUNK)
            if not chunk:
                break
            tmp.write(chunk)
            done += len(chunk)
            if show and total:
                pct = 100 * done // total
                if pct >= last_pct + 10:
                    print(f"\r  {done / 1e6:.1f}/{total / 1e6:.1f} MB ({pct}%)", end="", file=sys.stderr, flush=True)
                    last_pct = pct
        if show and total:
            print(file=sys.stderr)
    if total is not None and done != total:
        raise DownloadError(f"download of {url} stopped after {done:,} of {total:,} bytes; run the command again")
    return done


def download(name: str, dest_dir: str | Path = DEFAULT_DIR, force: bool = False, timeout: float = 60.0,
             progress: bool = False) -> Path:
    """Download release checkpoint ``name`` (e.g. 'yolov5s') into ``dest_dir``; return its path.

    An existing ``dest_dir/<name>.pt`` that verifies is returned as is (``force`` re-downloads).
    Raises ValueError for an unknown name and :class:`DownloadError` (one line, including the URL
    to fetch by hand) when offline, on HTTP errors, or when the file fails verification; nothing
    is left at the destination in those cases.
    """
    name = model_name(name)
    dest_dir = Path(dest_dir).expanduser()
    dest = dest_dir / f"{name}.pt"
    url = release_url(name)
    if dest.is_file() and not force:
        try:
            verify(dest, name)
            return dest
        except DownloadError as e:
            print(f"{dest}: existing file rejected ({e}); downloading it again", file=sys.stderr)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"Downloading {url} to {dest}", file=sys.stderr)
    fd, tmp_name = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".part")
    tmp_path = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as tmp:
            try:
                _fetch(url, tmp, timeout, progress)
            except urllib.error.HTTPError as e:
                raise DownloadError(f"{url}: server answered HTTP {e.code} ({e.reason}); download it by hand "
                                    f"and save it as {dest}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason = getattr(e, "reason", e)
                raise DownloadError(f"cannot reach {url} ({reason}): offline? Fetch the file by hand (browser, "
                                    f"or another machine) and save it as {dest}") from None
            tmp.flush()
            os.fsync(tmp.fileno())
        verify(tmp_path, name)
        os.replace(tmp_path, dest)
    finally:
        tmp_path.unlink(missing_ok=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    """CLI: download each named model; one line per failure; exit status 1 if any failed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"models to fetch: {' '.join(MODELS)}")
    p.add_argument("--dir", default=str(DEFAULT_DIR), help="destination folder (default: weights/)")
    p.add_argument("--force", action="store_true", help="download even if a valid file is already there")
    p.add_argument("--timeout", type=float, default=60.0, help="network timeout per read, seconds")
    p.add_argument("--list", action="store_true", help="print the model names and URLs, then exit")
    args = p.parse_args(argv)
    if args.list:
        for n in MODELS:
            print(f"{n:9s} {release_url(n)}")
        return 0
    if not args.names:
        p.error(f"name at least one model ({' '.join(MODELS)}) or use --list")
    failed = 0
    for n in args.names:
        try:
            path = download(n, args.dir, force=args.force, timeout=args.timeout, progress=True)
        except (ValueError, DownloadError) as e:
            print(f"download.py: error: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path} ok ({path.stat().st_size / 1e6:.1f} MB)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
