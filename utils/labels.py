"""Label files: locating, parsing and scanning them, with a safe scan cache.

The seam where a new label format plugs in: :func:`parse_label_file` turns one label file into
(n, 5) ``cls xc yc w h`` rows (plus a problem/repair note); everything downstream sees only
those rows.

Data layout (YOLOv5 convention): images under some ``.../images/...`` folder, labels at the same
relative path with the LAST ``images`` path component replaced by ``labels`` and the suffix by
``.txt`` (:mod:`utils.image_files` lists both); one ``class xc yc w h`` row per object, normalised
to 0-1, zero-based class. An image without a label file (or with an empty one) is a background
image. Label rows in YOLOv5's segment format (``cls x1 y1 ... xn yn``) are read as their bounding
boxes.

The scan drops corrupt images and malformed label files (wrong column count, non-numeric values,
negative or > 1 coordinates, even by round-off, as YOLOv5 does); exact duplicate rows are removed.

Scan results are cached beside the labels (``<labels dir>.yolokd.npz``, e.g.
``labels/train.yolokd.npz``; YOLOv5's own ``labels/train.cache`` is left alone) as a plain ``.npz``
archive (no pickle) keyed by a hash of the file list, sizes and mtimes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from utils.boxes import xyxy2xywhn

LOGGER = logging.getLogger(__name__)

CACHE_VERSION = 5  # 2: polygon rows parsed as boxes; 3: images decoded during the scan; 4: YOLOv5's acceptance
# rules (no clipping of label values, zero-size boxes kept, images under 10 px skipped); 5: values checked in
# float32, files mixing boxes and polygons read as YOLOv5 reads them, EXIF 5/7 shapes unrotated
CACHE_SUFFIX = ".yolokd.npz"  # never YOLOv5's ".cache" (see cache_path_for)
MIN_IMAGE_SIDE = 10  # YOLOv5 skips smaller images (measured on its 7.0 loader)
MAX_LISTED = 5  # problem files named in the summary warning


# --------------------------------------------------------------------------------------------
# Scanning (image verification + label parsing) and the scan cache
# --------------------------------------------------------------------------------------------
class UnreadableImageError(OSError):
    """An image file no decoder can read (its compressed data is missing or corrupt)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image {path} ({reason})")
        self.path = path


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset just past the first SOS (start of scan) header of a JPEG, found by walking the marker
    segments from SOI (so an EXIF thumbnail's own SOS inside APP1 is skipped); None if malformed."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        segment_end = pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            return segment_end
        pos = segment_end
    return None


def _jpeg_scan_is_blank(data: bytes) -> bool:
    """Whether a JPEG's entropy-coded data is nothing but zero bytes (lost data that a disk or a copy
    zero-filled). Decoders accept such a file and return a flat grey picture; an encoder never writes
    it (the last byte of a scan is padded with one-bits)."""
    start = _jpeg_scan_start(data)
    if start is None:
        return False
    scan = data[start:]
    scan = scan[:-2] if scan.endswith(b"\xff\xd9") else scan  # the EOI marker
    return not scan.strip(b"\x00")


def decode_check(path: str) -> tuple[tuple[int, int], str]:
    """((w, h) as displayed, '' if the image decodes, else why not).

    A structure check alone (PIL ``verify``) passes files whose headers survived but whose compressed
    data did not (a JPEG cut after its headers): those pass the scan and then fail when an epoch
    reads them. So the data is decoded here too: JPEGs at 1/8 scale (PIL ``draft``: the entropy
    decoder still reads every byte, only the inverse DCT is skipped, about 4 ms for a 640x480 file),
    other formats fully. A JPEG whose scan data is all zero bytes is refused as well (see
    `_jpeg_scan_is_blank`).
    """
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # chunk CRCs and structure; leaves the object unusable, so reopen below
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
            is_jpeg = im.format == "JPEG"
            if is_jpeg:
                im.draft(im.mode, (max(w // 8, 1), max(h // 8, 1)))
            im.load()  # raises on truncated or undecodable data
    except FileNotFoundError:  # a .txt list may name files that are gone
        return (0, 0), "image file not found"
    except UnidentifiedImageError:  # its own message names an in-memory buffer, not the file
        return (0, 0), "corrupt image (not a picture format the decoder knows, or damaged header)"
    except Exception as e:  # any decoder error means the file is unusable
        return (0, 0), f"corrupt image ({type(e).__name__}: {e})"
    if is_jpeg and _jpeg_scan_is_blank(data):
        return (w, h), "corrupt image (JPEG data is all zero bytes: the file lost its content)"
    # EXIF rotation by ±90° (6, 8): OpenCV applies it when reading. 5 and 7 (rotation with a mirror)
    # turn the picture too, yet YOLOv5 keeps their stored shape (measured on its 7.0 loader); so do we:
    # the shape only chooses the rectangular batch, whose size then equals YOLOv5's.
    if orientation in (6, 8):
        w, h = h, w
    if w < MIN_IMAGE_SIDE or h < MIN_IMAGE_SIDE:
        return (w, h), f"image too small ({w}x{h}; YOLOv5 skips images under {MIN_IMAGE_SIDE} px)"
    return (w, h), ""


IMAGE_PROBLEMS = ("corrupt image", "image too small")  # how `decode_check`'s reasons begin


def warn_each_unreadable(problems: Sequence[tuple[str, str]]) -> None:
    """One warning per image the scan found undecodable: each needs the user's attention (fix or
    remove the file), unlike label repairs, which are summarised."""
    for path, why in problems:
        LOGGER.warning("skipped image %s: %s", path, why)


def _polygon_boxes(rows: np.ndarray) -> np.ndarray:
    """Polygon rows ``[cls, x1, y1, ..., xn, yn]`` of one length, (m, 1 + 2n) float32 -> (m, 5) float32
    ``[cls, xc, yc, w, h]``: the axis-aligned hull of each row's points, [min x, max x] × [min y, max y],
    computed in float32 as YOLOv5 computes it (so that range checks and duplicates see its numbers)."""
    pts = rows[:, 1:].reshape(len(rows), -1, 2)  # (m, points, xy)
    lo, hi = pts.min(1), pts.max(1)
    return np.concatenate((rows[:, :1], (lo + hi) / np.float32(2), hi - lo), 1)


def _rows_to_boxes(rows: list[list[str]]) -> tuple[np.ndarray, str, str]:
    """Label rows -> ((n, 5) float32 ``[cls, xc, yc, w, h]`` in file order, error, note).

    YOLOv5's reading (its 7.0 loader, measured): when no row has more than 6 columns, every row must
    be a box ``cls xc yc w h``; once any row has more, EVERY row is a polygon ``cls x1 y1 ... xn yn``
    reduced to its box — a 5-column row in such a file becomes the two points (xc, yc), (w, h), which
    the note reports. Values are float32 from the start, as there. Rows of one length are parsed
    together (a label file has few lengths, a dataset many rows).
    """
    empty = np.zeros((0, 5), dtype=np.float32)
    widths = [len(r) for r in rows]
    polygons = max(widths) > 6
    for i, w in enumerate(widths):
        if polygons and (w < 3 or w % 2 == 0):
            return empty, (f"line {i + 1}: {w} columns do not make (x, y) points after the class (a file with "
                           "polygon rows is read as polygons only)"), ""
        if not polygons and w != 5:
            return empty, (f"line {i + 1} has {w} columns, expected 5 (cls xc yc w h) or an odd number >= 7 "
                           "(cls x1 y1 x2 y2 x3 y3 ... polygon)"), ""
    try:
        if not polygons:
            return np.array(rows, dtype=np.float32), "", ""
        out = np.empty((len(rows), 5), dtype=np.float32)
        for width in set(widths):
            idx = [i for i, w in enumerate(widths) if w == width]
            out[idx] = _polygon_boxes(np.array([rows[i] for i in idx], dtype=np.float32))
    except ValueError:
        return empty, "non-numeric value", ""
    narrow = sum(w < 7 for w in widths)
    note = (f"{narrow} row(s) of under 7 columns read as polygons (the file mixes boxes and polygons; "
            "YOLOv5 reads it so)") if narrow else ""
    return out, "", note


def parse_label_file(path: str) -> tuple[np.ndarray, str, str, bool]:
    """Parse one YOLO label file.

    Returns ``(labels (n, 5) float32 [cls, xc, yc, w, h], error, note, found)``: ``error`` non-empty
    means the file is malformed (the image will be skipped); ``note`` records repairs (duplicate rows
    removed); ``found`` is False when the file does not exist (background).
    Rows may be boxes (5 columns) or polygons (``cls x1 y1 ... xn yn``, normalised), which become
    their bounding boxes as in YOLOv5 (:func:`_rows_to_boxes`). The acceptance rules are YOLOv5's (measured on its 7.0
    loader, so that a dataset gives the images and instances it gives there): every box value
    ``xc yc w h`` in [0, 1] and nothing negative, or the image is skipped (no clipping of round-off:
    YOLOv5 skips 1.0005 too); boxes of zero width or height are kept (they count as instances).
    Class range against nc is checked later, so the cache does not depend on nc.
    """
    empty = np.zeros((0, 5), dtype=np.float32)
    if not os.path.isfile(path):
        return empty, "", "", False
    try:
        with open(path, encoding="utf-8") as f:
            rows = [r.split() for r in f.read().strip().splitlines() if r.strip()]
    except (OSError, UnicodeDecodeError) as e:
        return empty, f"unreadable label file ({type(e).__name__})", "", True
    if not rows:
        return empty, "", "", True
    lb, err, note = _rows_to_boxes(rows)  # polygons become boxes first: YOLOv5 checks the boxes
    if err:
        return empty, err, "", True
    if not np.isfinite(lb).all():  # a non-finite polygon point makes its box non-finite too
        return empty, "non-finite value", "", True
    cls = lb[:, 0]
    bad_cls = (cls < 0) | (cls != np.round(cls))
    if bad_cls.any():
        return empty, f"class must be a non-negative integer, got {cls[bad_cls][0]!s}", "", True
    outside = (lb[:, 1:] < 0) | (lb[:, 1:] > 1)
    if outside.any():
        return empty, (f"box value {lb[:, 1:][outside][0]!s} outside [0, 1] (labels are normalised xc yc w h; "
                       "YOLOv5 skips such images too)"), "", True
    notes = [note] if note else []
    _, first = np.unique(lb, axis=0, return_index=True)
    if len(first) < len(lb):
        notes.append(f"{len(lb) - len(first)} duplicate row(s) removed")
        lb = lb[first]  # YOLOv5's order after removing duplicates: rows sorted (class, then xc, ...)
    return lb, "", "; ".join(notes), True


def _files_hash(im_files: Sequence[str], label_files: Sequence[str]) -> str:
    """Hash of every path with its size and mtime: any added/removed/edited file changes it."""
    h = hashlib.sha256()
    for f in (*im_files, *label_files):
        try:
            st = os.stat(f)
            h.update(f"{f}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{f}\t-\n".encode())
    return h.hexdigest()


def _scan_one(args: tuple[str, str]) -> tuple[tuple[int, int], np.ndarray, str, str, bool]:
    im_file, lb_file = args
    shape, err = decode_check(im_file)
    if err:
        return shape, np.zeros((0, 5), np.float32), err, "", os.path.isfile(lb_file)
    labels, lerr, note, found = parse_label_file(lb_file)
    return shape, labels, (f"{Path(lb_file).name}: {lerr}" if lerr else ""), note, found


def cache_path_for(label_files: Sequence[str]) -> Path:
    """Where the scan cache lives: ``<folder of the first label file>`` + :data:`CACHE_SUFFIX`.

    E.g. ``labels/train2017.yolokd.npz``. YOLOv5 keeps its own (pickled) cache at
    ``labels/train2017.cache``; a different name lets both tools keep theirs side by side.
    """
    folder = Path(label_files[0]).parent
    return folder.with_name(folder.name + CACHE_SUFFIX)


def _save_cache(path: Path, scan: dict[str, Any]) -> None:
    offsets = np.cumsum([0] + [len(x) for x in scan["labels"]]).astype(np.int64)
    labels = np.concatenate(scan["labels"], 0) if scan["labels"] else np.zeros((0, 5), np.float32)
    buf = io.BytesIO()
    np.savez(
        buf,
        version=np.array(CACHE_VERSION),
        hash=np.array(scan["hash"]),
        im_files=np.array(scan["im_files"], dtype=str),
        shapes=np.asarray(scan["shapes"], dtype=np.int64).reshape(-1, 2),
        offsets=offsets,
        labels=labels.astype(np.float32),
        errors=np.array(scan["errors"], dtype=str),
        notes=np.array(scan["notes"], dtype=str),
        found=np.asarray(scan["found"], dtype=bool),
    )
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)  # atomic: readers never see a partial cache
    except OSError as e:
        LOGGER.warning("scan cache not saved (%s is not writable: %s)", path, e)
        with contextlib.suppress(OSError):
            tmp.unlink()


def _load_cache(path: Path, key: str, im_files: Sequence[str]) -> dict[str, Any] | None:
    """The cached scan when it exists, parses and matches ``key`` and the file list; else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION or str(z["hash"]) != key:
                return None
            files = z["im_files"].tolist()
            if files != list(im_files):
                return None
            offsets, labels = z["offsets"], z["labels"]
            return {
                "hash": key,
                "im_files": files,
                "shapes": z["shapes"].tolist(),
                "labels": [labels[offsets[i]:offsets[i + 1]].copy() for i in range(len(files))],
                "errors": z["errors"].tolist(),
                "notes": z["notes"].tolist(),
                "found": z["found"].tolist(),
            }
    except Exception:  # unreadable/old/foreign file: just rescan
        return None


def scan_dataset(im_files: Sequence[str], label_files: Sequence[str], cache_path: Path | None = None) -> dict:
    """Verify images and parse labels, reusing ``cache_path`` when its hash matches.

    Returns a dict of per-image lists: ``shapes`` ((w, h)), ``labels`` ((n, 5) arrays), ``errors``
    ('' when usable), ``notes`` (repairs made), ``found`` (label file exists), plus ``hash`` and
    ``from_cache`` (bool).
    """
    key = _files_hash(im_files, label_files)
    if cache_path is not None:
        cached = _load_cache(cache_path, key, im_files)
        if cached is not None:
            cached["from_cache"] = True
            return cached
    workers = min(8, max(len(im_files) // 64, 1))  # threads: the work is mostly file I/O
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(_scan_one, zip(im_files, label_files), chunksize=32))
    scan = {
        "hash": key,
        "im_files": list(im_files),
        "shapes": [r[0] for r in results],
        "labels": [r[1] for r in results],
        "errors": [r[2] for r in results],
        "notes": [r[3] for r in results],
        "found": [r[4] for r in results],
        "from_cache": False,
    }
    if cache_path is not None and cache_path.parent.is_dir():  # no labels folder: nothing to cache beside
        _save_cache(cache_path, scan)
    return scan


def label_lines(det: np.ndarray, shape: tuple[int, int], save_conf: bool = False) -> list[str]:
    """YOLO label rows ``class xc yc w h [conf]`` (normalised by ``shape`` = (h, w)) for (n, 6) boxes
    ``x1 y1 x2 y2 conf cls`` in pixels: what detect.py and val.py write with --save-txt, numbers with 6
    significant digits (``%g``) as YOLOv5 prints them."""
    h, w = shape
    xywhn = xyxy2xywhn(np.asarray(det[:, :4], dtype=np.float64), w, h)
    rows = []
    for (xc, yc, bw, bh), conf, cls in zip(xywhn, det[:, 4], det[:, 5]):
        row = f"{int(cls)} {xc:g} {yc:g} {bw:g} {bh:g}"
        rows.append(f"{row} {conf:g}" if save_conf else row)
    return rows
