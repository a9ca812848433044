"""Fetch official YOLOv5 v7.0 release checkpoints (the teachers and starting weights of the experiments).

Usage::

    python weights/download.py yolov5s yolov5m            # into weights/
    python weights/download.py yolov5x6 --dir ~/models    # elsewhere
    python -m weights.download --list

A command line over :mod:`models.hub` (the download, its checks and the model table live there;
from Python: ``from models.hub import download; path = download("yolov5m")``). Each file is
verified before it is moved into place; see weights/README.md.

Offline (or behind a firewall)? Download the file by hand from the URL printed in the error, put it
in the destination folder, and run the same command again: it will be verified and kept.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _rerun_as_module(argv: list[str]) -> int:
    """``python weights/download.py`` puts weights/ on the import path, not the repository root, and
    this file edits no ``sys.path``: run ``python -m weights.download`` in a child whose
    ``PYTHONPATH`` starts with the root (the working folder stays, so a relative ``--dir`` holds)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "weights.download", *argv], env=env, check=False).returncode


def _parser(models: tuple[str, ...], default_dir: Path) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("names", nargs="*", help=f"models to fetch: {' '.join(models)}")
    p.add_argument("--dir", default=str(default_dir), help="destination folder (default: weights/)")
    p.add_argument("--force", action="store_true", help="download even if a valid file is already there")
    p.add_argument("--timeout", type=float, default=60.0, help="network timeout per read, seconds")
    p.add_argument("--list", action="store_true", help="print the model names and URLs, then exit")
    return p


def main(argv: list[str] | None = None) -> int:
    """CLI: download each named model; one line per failure; exit status 1 if any failed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        from models import hub
    except ModuleNotFoundError as e:
        if e.name != "models" or __spec__ is not None:  # only a file-path run lacks the root
            raise
        return _rerun_as_module(argv)
    p = _parser(hub.MODELS, hub.WEIGHTS_DIR)
    args = p.parse_args(argv)
    if args.list:
        for n in hub.MODELS:
            print(f"{n:9s} {hub.release_url(n)}")
        return 0
    if not args.names:
        p.error(f"name at least one model ({' '.join(hub.MODELS)}) or use --list")
    failed = 0
    for n in args.names:
        try:
            path = hub.download(n, args.dir, force=args.force, timeout=args.timeout, progress=True)
        except (ValueError, hub.DownloadError) as e:
            print(f"download.py: error: {e}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path} ok ({path.stat().st_size / 1e6:.1f} MB)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
