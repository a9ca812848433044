"""What detect.py reads: the files a ``--source`` names and the frames in them, as YOLOv5's detect.py
takes them (images, folders, globs, ``.txt`` lists, videos with ``--vid-stride``)."""

from __future__ import annotations

import glob
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from utils.image_files import IMG_FORMATS  # the datasets' suffixes: YOLOv5 shares one list too

VID_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".wmv", ".mpg", ".mpeg"}


def list_sources(source: str | Path) -> list[Path]:
    """Image/video files named by ``source``: one file, a folder (sorted, not recursive), a glob, or a
    ``.txt`` list of such sources, one per line, as YOLOv5's detect.py takes them (a relative line from
    the current directory when it names something there, as in YOLOv5, else from the list's folder). A
    path that exists is taken literally (``img[1].jpg`` is a file, not a glob)."""
    s = str(source)
    p = Path(s)
    if p.is_file() and p.suffix.lower() == ".txt":
        lines = sorted(ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip())  # as YOLOv5
        if not lines:
            raise FileNotFoundError(f"--source {s}: the list is empty (one image, video, folder or glob per line)")
        here = [ln if Path(ln).is_absolute() or Path(ln).exists() or glob.glob(ln) else p.parent / ln for ln in lines]
        return [f for src in here for f in list_sources(src)]
    if p.is_dir():
        files = sorted(p.iterdir())
    elif p.is_file():
        files = [p]
    elif any(c in s for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(s, recursive=True))
    else:
        raise FileNotFoundError(f"--source {s}: no such file, folder or glob match")
    media = [f for f in files if f.is_file() and f.suffix.lower() in IMG_FORMATS | VID_SUFFIXES]
    if not media:
        raise FileNotFoundError(
            f"--source {s}: no images ({', '.join(sorted(IMG_FORMATS))}) or videos "
            f"({', '.join(sorted(VID_SUFFIXES))}) found"
        )
    return media


@dataclass
class Frame:
    """One picture to process: ``image`` BGR uint8 (h, w, 3); for a video, ``frame`` is the number of this
    processed frame, from 1 (YOLOv5's label-file numbering), and ``n_frames`` how many there are; None
    for an image."""

    path: Path
    image: np.ndarray
    frame: int | None = None
    n_frames: int = 0
    fps: float = 30.0


def _skip(path: Path, why: str) -> None:
    """One warning for a source file that cannot be read; the rest of the source is still processed."""
    print(f"detect.py: warning: skipped {path}: {why}", file=sys.stderr)


def iter_frames(files: list[Path], vid_stride: int = 1) -> Iterator[Frame]:
    """Yield every image, and every ``vid_stride``-th frame of every video, in order; unreadable files are
    skipped with one warning each.

    A video's frames are taken as YOLOv5's detect.py takes them (measured on it): the last of each group
    of ``vid_stride`` (0-based frames stride−1, 2·stride−1, ...; a final incomplete group is dropped),
    numbered 1, 2, ... in the order processed, of ``frame count // vid_stride``.
    """
    if vid_stride < 1:
        raise ValueError(f"--vid-stride {vid_stride}: must be at least 1")
    for f in files:
        if f.suffix.lower() in IMG_FORMATS:
            im = cv2.imread(str(f))
            if im is None:
                _skip(f, "cannot decode the image (corrupt, truncated or unsupported)")
                continue
            yield Frame(f, im)
            continue
        cap = cv2.VideoCapture(str(f))
        if not cap.isOpened():
            cap.release()
            _skip(f, "cannot open the video")
            continue
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) // vid_stride
        fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        try:
            i = 0
            while True:
                last_of_group = (i + 1) % vid_stride == 0
                ok, im = cap.read() if last_of_group else (cap.grab(), None)  # grab: skip, no decode
                if not ok:
                    break
                if im is not None:
                    yield Frame(f, im, (i + 1) // vid_stride, n, fps)
                i += 1
        finally:
            cap.release()
