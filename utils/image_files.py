"""Which files a dataset source names: images from folders and ``.txt`` lists, and each image's label path.

The listing follows YOLOv5 7.0's (measured on its loader, used as a black box): its image suffixes,
hidden files and folders skipped, one sorted list without repeats, ``.txt`` lines resolved as there
(see :func:`_listed_path`). The label path rule is YOLOv5's layout: ``.../images/...`` ->
``.../labels/...``. What is in the files is :mod:`utils.labels`' business.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

LOGGER = logging.getLogger(__name__)

# YOLOv5's image suffixes (measured on its 7.0 loader): .mpo is multi-picture JPEG, .dng TIFF-based raw;
# a .pfm file is listed but PIL cannot read it, so the scan reports it as corrupt (as YOLOv5 does)
IMG_FORMATS = {".bmp", ".dng", ".jpeg", ".jpg", ".mpo", ".pfm", ".png", ".tif", ".tiff", ".webp"}


def img2label_paths(im_files: Sequence[str]) -> list[str]:
    """Label path per image: the last ``images`` path component → ``labels``, suffix → ``.txt``.

    Paths without an ``images`` component keep their folder (labels beside the images).
    """
    out = []
    for f in im_files:
        parts = list(Path(f).parts)
        for i in range(len(parts) - 2, -1, -1):  # last folder component named 'images'
            if parts[i] == "images":
                parts[i] = "labels"
                break
        out.append(str(Path(*parts).with_suffix(".txt")))
    return out


def _listed_path(line: str, list_file: Path) -> str:
    """One line of a ``.txt`` image list as a path, resolved as YOLOv5 resolves it where it can.

    ``./x`` is under the list's folder (the YOLOv5 layout: ``coco/train2017.txt`` with
    ``./images/train2017/x.jpg``). Any other relative line is under the current directory, YOLOv5's
    rule, when the file exists there; else under the list's folder, so that a list written relative
    to itself works from anywhere (YOLOv5 would fail on it).
    """
    q = Path(line)
    if q.is_absolute():
        return os.path.normpath(q)
    if not line.startswith("./") and q.exists():
        return os.path.normpath(q)
    return os.path.normpath(list_file.parent / q)


def _folder_images(folder: Path) -> list[str]:
    """Image files under ``folder``, recursively, skipping hidden files and folders (``.git``,
    ``.ipynb_checkpoints`` copies...), which YOLOv5's search never sees either."""
    def visible(q: Path) -> bool:
        return not any(part.startswith(".") for part in q.relative_to(folder).parts)

    return [str(q) for q in folder.rglob("*") if q.suffix.lower() in IMG_FORMATS and visible(q) and q.is_file()]


def list_image_files(sources: str | Path | Sequence[str | Path]) -> list[str]:
    """Image paths from folders (searched recursively) and/or ``.txt`` lists (:func:`_listed_path`), as
    ONE sorted list without repeats, as YOLOv5 orders them: the order decides which images share a
    rectangular validation batch, where images of equal aspect ratio are not reordered, and so the
    padding and the predictions. An image listed twice (a folder named twice, a repeated list line) is
    used once, as in YOLOv5.
    """
    srcs = [sources] if isinstance(sources, (str, Path)) else list(sources)
    files: list[str] = []
    for s in srcs:
        p = Path(s)
        if p.is_dir():
            files += _folder_images(p)
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    files.append(_listed_path(line, p))
        elif p.exists():
            raise ValueError(f"dataset source {p} is neither a folder nor a .txt list of images")
        else:
            raise FileNotFoundError(f"dataset source {p} not found")
    listed = [f for f in files if Path(f).suffix.lower() in IMG_FORMATS]
    unique = sorted(set(listed))
    if len(unique) < len(listed):
        LOGGER.warning("%d image entries of %s repeat an earlier one; each image is used once (as in YOLOv5)",
                       len(listed) - len(unique), ", ".join(map(str, srcs)))
    if not unique:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMG_FORMATS))}) found in {', '.join(map(str, srcs))}")
    return unique
