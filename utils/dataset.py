"""Dataset yaml parsing, label scanning with a safe cache, the YOLO dataset and its loader.

Data layout (YOLOv5 convention): images under some ``.../images/...`` folder, labels at the same
relative path with the LAST ``images`` path component replaced by ``labels`` and the suffix by
``.txt``; one ``class xc yc w h`` row per object, normalised to 0-1, zero-based class. An image
without a label file (or with an empty one) is a background image.

Problems in the data never crash an epoch: the scan drops corrupt images and malformed label
files (wrong column count, non-numeric values, negative or > 1 coordinates, class index out of
range ``0 <= cls < nc``) and reports them in ONE summary warning (count + first files). An image
whose label file has an out-of-range class is dropped as a whole rather than trained with some of
its objects missing (which would teach the model that those objects are background). Exact
duplicate rows are removed; coordinates a hair outside [0, 1] (float round-off) are clipped.

Scan results are cached beside the labels (``<labels dir>.yolokd.npz``, e.g.
``labels/train.yolokd.npz``; YOLOv5's own ``labels/train.cache`` is left alone) as a plain ``.npz``
archive (no pickle) keyed by a hash of the file list, sizes and mtimes.

Label rows in YOLOv5's segment format (``cls x1 y1 ... xn yn``) are read as their bounding boxes.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import random
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, get_worker_info

from utils.augment import jitter_hsv, letterbox, mixup, mosaic4, random_warp, resize_to
from utils.boxes import xywhn2xyxy, xyxy2xywhn
from utils.data_download import fetch_dataset

LOGGER = logging.getLogger(__name__)

IMG_FORMATS = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"}
CACHE_VERSION = 3  # 2: polygon rows parsed as boxes; 3: images are decoded during the scan (1 only verified them)
CACHE_SUFFIX = ".yolokd.npz"  # never YOLOv5's ".cache" (see cache_path_for)
COORD_TOL = 1e-3  # label coordinates this far outside [0, 1] are round-off and get clipped
MAX_LISTED = 5  # problem files named in the summary warning
STAND_IN_TRIES = 8  # other images tried in place of one that cannot be read at load time

# Augmentation defaults = data/hyps/hyp.scratch-low.yaml, used for keys a given hyp lacks.
AUG_DEFAULTS: dict[str, float] = {
    "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5,
    "shear": 0.0, "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0,
}


# --------------------------------------------------------------------------------------------
# Dataset yaml
# --------------------------------------------------------------------------------------------
def project_root() -> Path:
    """This repository's folder (holding ``data/``, ``models/``).

    YOLOv5 resolves a relative dataset ``path`` against its own repository folder (measured with
    YOLOv5 7.0: neither the current directory nor the yaml's folder is consulted), so shipped yamls
    say ``path: ../datasets/<name>``: a ``datasets/`` folder beside the checkout. We use ours alike.
    """
    return Path(__file__).resolve().parents[1]


def root_candidates(value: str | None, yaml_file: Path) -> list[Path]:
    """Folders a yaml's ``path`` may mean, in order of preference (see :func:`load_data_config`).

    Absolute: itself. Relative (or absent, i.e. ``.``): under :func:`project_root` (YOLOv5's rule),
    then under the current directory, the yaml folder's parent and the yaml's own folder (where
    dataset exporters put ``data.yaml``). Duplicates are dropped.
    """
    p = Path(value if value not in (None, "") else ".").expanduser()
    if p.is_absolute():
        return [p]
    here = yaml_file.resolve().parent
    out: list[Path] = []
    for base in (project_root(), Path.cwd(), here.parent, here):
        c = (base / p).resolve()
        if c not in out:
            out.append(c)
    return out


def _split_paths(value: Any, root: Path) -> list[Path]:
    """A yaml split entry (str or list) as normalised paths, relative ones under ``root``."""
    entries = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for e in entries:
        q = Path(str(e)).expanduser()
        out.append(Path(os.path.normpath(q if q.is_absolute() else root / q)))
    return out


def _choose_root(cfg: dict, candidates: list[Path], require: Iterable[str]) -> Path:
    """The first candidate under which every required split exists; else the first existing one
    when the yaml names a ``path``; else the first (YOLOv5's, where a download or generator puts it)."""
    needed = [k for k in require if cfg.get(k)]
    for c in candidates:
        if all(q.exists() for k in needed for q in _split_paths(cfg[k], c)):
            return c
    if cfg.get("path"):
        for c in candidates:
            if c.exists():
                return c
    return candidates[0]


def _missing_splits(cfg: dict, root: Path, require: Iterable[str]) -> list[Path]:
    return [q for k in require if cfg.get(k) for q in _split_paths(cfg[k], root) if not q.exists()]


def _generate_into(root: Path, kind: str, seed: int) -> None:
    """Build a generated dataset at ``root`` atomically: write a sibling temp folder, then rename,
    so concurrent processes (DDP ranks) never see a half-written set."""
    # local imports: a generator is only needed on first use
    if kind == "demo":
        from utils.demo_data import generate_demo as generate
    elif kind == "aerial":
        from utils.aerial_data import generate_aerial as generate
    else:
        raise ValueError(f"unknown 'generate: {kind}' (supported: demo, aerial)")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    LOGGER.info("generating the %s dataset into %s", kind, root)
    generate(tmp, seed=seed)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first (root now exists and is non-empty)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not root.exists():
            raise


def load_data_config(path: str | Path, require: Iterable[str] = ("train", "val")) -> dict[str, Any]:
    """Read a YOLOv5-style dataset yaml.

    Keys: ``path`` (dataset root), ``train``/``val``/``test`` (each a folder of images, a ``.txt``
    list of image paths, or a list of those; relative to the root), ``names`` (list, or {id: name}
    with ids 0..nc-1), optional ``nc`` (must equal len(names)), optional ``val_json`` (COCO
    annotation json for val, relative to the root), optional ``download``, optional ``generate:
    demo`` (build the synthetic demo set into the root when it is missing; ``generate_seed`` picks
    its seed).

    Where a relative ``path`` points (no ``path`` means ``.``): YOLOv5 7.0 takes it relative to its
    repository folder, whatever the current directory or the yaml's location (measured with the
    real YOLOv5), so a shipped ``path: ../datasets/coco128`` means ``datasets/`` beside the
    checkout. We take it relative to THIS repository (:func:`project_root`) first, so a yaml used
    with both tools finds the same folder; when the required splits are not there, the current
    directory, the yaml folder's parent and the yaml's own folder are tried in that order
    (:func:`root_candidates`), and the first under which every required split exists is used.

    ``download``: when the required splits are missing everywhere and the entry is a URL of a
    ``.zip`` (or a list of them), it is downloaded and unzipped into the dataset root's parent
    (YOLOv5's convention; see :mod:`utils.data_download` for the checks); any other entry (code,
    prose) is never run: a one-line :class:`DatasetUnavailableError` says what to fetch and where, as does
    a failed or offline download (the CLIs exit with status 2).

    Splits named in ``require`` must exist, others are resolved but checked only when a dataset is
    built from them (so evaluating on val does not need the train images downloaded).
    Returns the yaml's dict with ``path`` (Path), ``train``/``val``/``test`` (list[str] of absolute
    paths, or None), ``names`` (list[str]), ``nc`` (int), ``val_json`` (Path or None) and
    ``yaml_file`` (Path). Raises FileNotFoundError / ValueError naming the yaml, key and path.
    """
    yaml_file = Path(path)
    if not yaml_file.is_file():
        raise FileNotFoundError(f"dataset yaml {yaml_file} not found")
    with open(yaml_file, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{yaml_file}: expected a mapping with path/train/val/names, got {type(cfg).__name__}")
    cfg = dict(cfg)

    # names / nc
    names = cfg.get("names")
    if names is None:
        if "nc" not in cfg:
            raise ValueError(f"{yaml_file}: needs 'names' (list or {{id: name}})")
        names = [f"class{i}" for i in range(int(cfg["nc"]))]
    if isinstance(names, dict):
        ids = sorted(int(k) for k in names)
        if ids != list(range(len(ids))):
            raise ValueError(f"{yaml_file}: 'names' ids must be 0..{len(ids) - 1} without gaps, got {ids}")
        names = [str(names[k]) for k in sorted(names, key=int)]
    elif isinstance(names, (list, tuple)):
        names = [str(n) for n in names]
    else:
        raise ValueError(f"{yaml_file}: 'names' must be a list or a {{id: name}} mapping")
    if "nc" in cfg and int(cfg["nc"]) != len(names):
        raise ValueError(f"{yaml_file}: 'nc' is {cfg['nc']} but 'names' lists {len(names)} classes")
    cfg["names"], cfg["nc"] = names, len(names)

    for key in ("train", "val"):
        if key in require and not cfg.get(key):
            raise ValueError(f"{yaml_file}: missing '{key}' split")

    tried = root_candidates(cfg.get("path"), yaml_file)
    root = _choose_root(cfg, tried, require)
    gen = cfg.get("generate")
    if gen and not root.exists():
        _generate_into(root, str(gen), int(cfg.get("generate_seed", 0)))
    missing = _missing_splits(cfg, root, require)
    if missing and cfg.get("download"):
        # YOLOv5 unzips into the dataset root's parent (path: ../datasets/x, archive holding x/).
        fetch_dataset(cfg["download"], root.parent, f"{yaml_file}: dataset not found ({missing[0]} is missing)")
        missing = _missing_splits(cfg, root, require)
    if missing:
        where = f" (dataset root {root}; tried {', '.join(map(str, tried))})" if len(tried) > 1 else ""
        key = next(k for k in require if cfg.get(k) and missing[0] in _split_paths(cfg[k], root))
        raise FileNotFoundError(f"{yaml_file}: '{key}' path {missing[0]} not found{where}")
    cfg["path"] = root
    for key in ("train", "val", "test"):
        cfg[key] = [str(q) for q in _split_paths(cfg[key], root)] if cfg.get(key) else None

    vj = cfg.get("val_json")
    if vj:
        vjp = Path(str(vj)).expanduser()
        vjp = vjp if vjp.is_absolute() else root / vjp
        if vjp.is_file():
            cfg["val_json"] = vjp
        else:
            LOGGER.warning("%s: 'val_json' %s not found; COCO-tool evaluation will be skipped", yaml_file, vjp)
            cfg["val_json"] = None
    else:
        cfg["val_json"] = None
    cfg["yaml_file"] = yaml_file.resolve()
    return cfg


# --------------------------------------------------------------------------------------------
# File lists and label paths
# --------------------------------------------------------------------------------------------
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


def list_image_files(sources: str | Path | Sequence[str | Path]) -> list[str]:
    """Image paths from folders (searched recursively) and/or ``.txt`` lists, sorted per source.

    Relative lines of a ``.txt`` list are resolved against the list's folder, which is the dataset
    root in the YOLOv5 layout (e.g. ``coco/train2017.txt`` with ``./images/train2017/x.jpg``).
    """
    srcs = [sources] if isinstance(sources, (str, Path)) else list(sources)
    files: list[str] = []
    for s in srcs:
        p = Path(s)
        if p.is_dir():
            found = [str(q) for q in p.rglob("*") if q.suffix.lower() in IMG_FORMATS and q.is_file()]
            files += sorted(found)
        elif p.is_file() and p.suffix.lower() == ".txt":
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                q = Path(line)
                q = q if q.is_absolute() else p.parent / q
                files.append(os.path.normpath(q))
        elif p.exists():
            raise ValueError(f"dataset source {p} is neither a folder nor a .txt list of images")
        else:
            raise FileNotFoundError(f"dataset source {p} not found")
    files = [f for f in files if Path(f).suffix.lower() in IMG_FORMATS]
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMG_FORMATS))}) found in {', '.join(map(str, srcs))}")
    return files


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
    except Exception as e:  # any decoder error means the file is unusable
        return (0, 0), f"corrupt image ({type(e).__name__}: {e})"
    if is_jpeg and _jpeg_scan_is_blank(data):
        return (w, h), "corrupt image (JPEG data is all zero bytes: the file lost its content)"
    if orientation in (5, 6, 7, 8):  # EXIF rotation by ±90°: OpenCV applies it when reading
        w, h = h, w
    if w < 2 or h < 2:
        return (w, h), f"image too small ({w}x{h})"
    return (w, h), ""


IMAGE_PROBLEMS = ("corrupt image", "image too small")  # how `decode_check`'s reasons begin


def _warn_each_unreadable(problems: Sequence[tuple[str, str]]) -> None:
    """One warning per image the scan found undecodable: each needs the user's attention (fix or
    remove the file), unlike label repairs, which are summarised."""
    for path, why in problems:
        LOGGER.warning("skipped image %s: %s", path, why)


def _polygon_boxes(rows: list[list[str]]) -> np.ndarray:
    """Rows ``cls x1 y1 ... xn yn`` (segment format) -> (n, 5) float64 ``[cls, xc, yc, w, h]``.

    The box of a polygon is the axis-aligned hull of its points: [min x, max x] × [min y, max y],
    points clipped to the image first (the caller rejects points beyond round-off). Rows must all
    have the same odd length (the caller groups them).
    """
    arr = np.array(rows, dtype=np.float64)
    pts = arr[:, 1:].reshape(len(arr), -1, 2).clip(0, 1)  # (n, points, xy)
    lo, hi = pts.min(1), pts.max(1)  # (n, 2) each
    return np.concatenate((arr[:, :1], (lo + hi) / 2, hi - lo), 1)


def _rows_to_boxes(rows: list[list[str]]) -> tuple[np.ndarray, str]:
    """Label rows of either kind -> ((n, 5) float64 in file order, error).

    5 columns: a box ``cls xc yc w h``; 7, 9, 11, ... columns: a polygon ``cls x1 y1 ... xn yn`` with
    n >= 3 points (YOLOv5's segment labels), reduced to its bounding box. A file may mix both.
    """
    out = np.zeros((len(rows), 5), dtype=np.float64)
    by_width: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_width.setdefault(len(r), []).append(i)
    for width, idx in by_width.items():
        if width != 5 and (width < 7 or width % 2 == 0):
            return out[:0], (f"line {idx[0] + 1} has {width} columns, expected 5 (cls xc yc w h) "
                             "or an odd number >= 7 (cls x1 y1 x2 y2 x3 y3 ... polygon)")
        group = [rows[i] for i in idx]
        try:
            out[idx] = np.array(group, dtype=np.float64) if width == 5 else _polygon_boxes(group)
        except ValueError:
            return out[:0], "non-numeric value"
    return out, ""


def parse_label_file(path: str) -> tuple[np.ndarray, str, str, bool]:
    """Parse one YOLO label file.

    Returns ``(labels (n, 5) float32 [cls, xc, yc, w, h], error, note, found)``: ``error`` non-empty
    means the file is malformed (the image will be skipped); ``note`` records repairs (duplicates
    removed, round-off clipped); ``found`` is False when the file does not exist (background).
    Rows may be boxes (5 columns) or polygons (``cls x1 y1 ... xn yn``, n >= 3, normalised), which
    become their bounding boxes as in YOLOv5; polygon points are range-checked like box values.
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
    # Range checks run on every coordinate as written (box values or polygon points).
    try:
        coords = np.array([float(v) for r in rows for v in r[1:]], dtype=np.float64)
    except ValueError:
        return empty, "non-numeric value", "", True
    lb, err = _rows_to_boxes(rows)
    if err:
        return empty, err, "", True
    if not (np.isfinite(lb).all() and np.isfinite(coords).all()):
        return empty, "non-finite value", "", True
    cls = lb[:, 0]
    bad_cls = (cls < 0) | (cls != np.round(cls))
    if bad_cls.any():
        return empty, f"class must be a non-negative integer, got {cls[bad_cls][0]:g}", "", True
    if (coords < -COORD_TOL).any() or (coords > 1 + COORD_TOL).any():
        return empty, "coordinates outside [0, 1] (labels must be normalised xc yc w h)", "", True
    notes = []
    if ((coords < 0) | (coords > 1)).any():
        notes.append("coordinates clipped to [0, 1]")
        lb[:, 1:] = lb[:, 1:].clip(0, 1)
    if ((lb[:, 3] <= 0) | (lb[:, 4] <= 0)).any():
        return empty, "box with zero width or height", "", True
    _, first = np.unique(lb, axis=0, return_index=True)
    if len(first) < len(lb):
        notes.append(f"{len(lb) - len(first)} duplicate row(s) removed")
        lb = lb[np.sort(first)]  # keep file order
    return lb.astype(np.float32), "", "; ".join(notes), True


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


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
def load_bgr(path: str) -> np.ndarray:
    """Read an image as HWC uint8 BGR (OpenCV first, PIL as a fallback for formats it lacks)."""
    im = cv2.imread(path, cv2.IMREAD_COLOR)
    if im is None:
        try:
            with Image.open(path) as pil:
                im = cv2.cvtColor(np.asarray(pil.convert("RGB")), cv2.COLOR_RGB2BGR)
        except Exception as e:
            raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e
    return im


def long_side_hw(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(h, w) scaled by one factor so the longer side is ``size`` (each side at least 1 pixel)."""
    factor = size / max(hw)
    return max(round(hw[0] * factor), 1), max(round(hw[1] * factor), 1)


def rect_batch_shapes(aspect: np.ndarray, batch_size: int, imgsz: int, stride: int, pad: float) -> np.ndarray:
    """Per-batch (h, w) input shapes (nb, 2) int for rectangular batches of images sorted by aspect.

    aspect: (n,) h/w of each image, in batch order; batch b holds images [b·bs, (b+1)·bs).
    An image scaled to long side ``imgsz`` is ``imgsz·(a, 1)`` when a ≤ 1 and ``imgsz·(1, 1/a)``
    otherwise, so the batch needs height ``imgsz·min(1, max a)`` and width ``imgsz·min(1, 1/min a)``.
    Each side then gets ``pad`` strides of margin (YOLOv5 validation uses 0.5) and goes up to the
    next multiple of ``stride``: ``stride·ceil(need/stride + pad)``.
    """
    starts = np.arange(0, len(aspect), max(int(batch_size), 1))
    tallest = np.maximum.reduceat(aspect, starts)
    widest = np.minimum.reduceat(aspect, starts)
    need = np.stack((np.minimum(tallest, 1.0), np.minimum(1.0 / widest, 1.0)), axis=1) * imgsz
    return np.ceil(need / stride + pad).astype(int) * stride


class YoloDataset(Dataset):
    """Images + YOLO labels with YOLOv5-style training augmentation.

    Attributes: ``im_files`` (list[str]), ``label_files``, ``labels`` (list of (n, 5) float32
    arrays ``[cls, xc, yc, w, h]`` normalised to the original image), ``shapes`` ((N, 2) int array
    of original (w, h), YOLOv5's order), ``batch_shapes`` ((nb, 2) (h, w) when ``rect``), ``nc``.

    Item ``i`` → ``(img uint8 tensor (3, H, W) RGB, labels float32 (n, 6) [0, cls, xc, yc, w, h]
    normalised to the returned image, path, (h0, w0), ratio_pad)`` where ``ratio_pad`` =
    ``((rh, rw), (padw, padh))`` maps returned pixels back to the original
    (``x0 = (x - padw) / rw``), or None for mosaic images (several sources, no single mapping).
    Column 0 is filled with the batch index by :func:`collate_fn`.

    Augmentation (``augment=True``): mosaic with probability ``hyp['mosaic']`` (off when ``rect``),
    else letterbox; then random perspective, mixup (probability ``hyp['mixup']``, mosaic only),
    HSV jitter and flips. Each item draws its randomness from a generator seeded with
    (seed, epoch, index) — see :meth:`set_epoch` — so an epoch's batches depend on nothing else: not
    on the worker count, not on what ran before. That is what lets ``--resume`` continue exactly.
    """

    def __init__(
        self,
        sources: str | Path | Sequence[str | Path],
        imgsz: int = 640,
        batch_size: int = 16,
        augment: bool = False,
        hyp: dict | None = None,
        rect: bool = False,
        cache: str | bool | None = None,
        stride: int = 32,
        pad: float = 0.0,
        single_cls: bool = False,
        seed: int = 0,
        nc: int | None = None,
    ) -> None:
        self.imgsz, self.augment, self.rect, self.stride, self.pad = int(imgsz), augment, rect, int(stride), pad
        self.hyp = {**AUG_DEFAULTS, **(hyp or {})}
        self.mosaic = augment and not rect  # rectangular batches need one image per item
        self.seed, self.epoch = seed, 0
        self.rng = np.random.default_rng(seed)
        # Mosaic canvas reused item after item (each worker process has its own): a fresh 2·imgsz
        # canvas is ≥ 4 MB at 640 px, which numpy backs with huge pages that the kernel zeroes on
        # first touch; reusing it took a 640-px item from 14 to 9 ms of CPU in one process.
        self._canvas: np.ndarray | None = None
        self.nc = nc

        im_files = list_image_files(sources)
        label_files = img2label_paths(im_files)
        scan = scan_dataset(im_files, label_files, cache_path_for(label_files))
        self.scan_from_cache = scan["from_cache"]
        keep, skipped, repaired = self._filter(im_files, label_files, scan, nc)
        if not keep:
            listed = "; ".join(f"{Path(f).name}: {why}" for f, why in skipped[:MAX_LISTED])
            raise ValueError(f"no usable images in {sources}: all {len(im_files)} were skipped ({listed})")
        self._report(len(im_files), keep, skipped, repaired, scan)

        self.im_files = [im_files[i] for i in keep]
        self.label_files = [label_files[i] for i in keep]
        self.labels = [scan["labels"][i].copy() for i in keep]
        self.shapes = np.array([scan["shapes"][i] for i in keep], dtype=np.int64).reshape(-1, 2)
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        self.n = len(self.im_files)
        self.batch_shapes = None
        self.batch_index = np.floor(np.arange(self.n) / max(batch_size, 1)).astype(int)
        if rect:
            self._make_rect(batch_size)

        if cache is True:
            cache = "ram"
        if cache not in (None, False, "ram"):
            raise ValueError(f"cache={cache!r} is not supported (use 'ram' or None)")
        # One flag per image, in shared memory so that every loader worker sees it: set when the
        # image was found unreadable and warned about (once per file, not once per worker or epoch).
        self._warned_unreadable = torch.zeros(self.n, dtype=torch.uint8).share_memory_()
        self.ims: list[tuple | None] = [None] * self.n
        if cache == "ram":
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                self.ims = list(pool.map(self._read_resized_or_none, range(self.n)))
            mb = sum(x[0].nbytes for x in self.ims if x is not None) / 2**20
            LOGGER.info("cached %d images in RAM (%.0f MB)", self.n, mb)

    # ---- construction helpers
    @staticmethod
    def _filter(im_files, label_files, scan, nc):
        keep, skipped, repaired = [], [], []
        for i, f in enumerate(im_files):
            err = scan["errors"][i]
            lb = scan["labels"][i]
            if not err and nc is not None and len(lb) and (lb[:, 0] >= nc).any():
                err = f"{Path(label_files[i]).name}: class {int(lb[:, 0].max())} out of range (nc={nc})"
            if err:
                skipped.append((f, err))
                continue
            if scan["notes"][i]:
                repaired.append((label_files[i], scan["notes"][i]))
            keep.append(i)
        return keep, skipped, repaired

    @staticmethod
    def _report(total, keep, skipped, repaired, scan):
        nbox = sum(len(scan["labels"][i]) for i in keep)
        nbg = sum(1 for i in keep if not len(scan["labels"][i]))
        src = "cache" if scan["from_cache"] else "scan"
        LOGGER.info("%d images (%d background), %d boxes, %d skipped [%s]", len(keep), nbg, nbox, len(skipped), src)
        unreadable = [(f, why) for f, why in skipped if why.startswith(IMAGE_PROBLEMS)]
        _warn_each_unreadable(unreadable)
        skipped = [item for item in skipped if item not in unreadable]
        parts = []
        if skipped:
            listed = "; ".join(f"{f}: {why}" for f, why in skipped[:MAX_LISTED])
            more = f" (+{len(skipped) - MAX_LISTED} more)" if len(skipped) > MAX_LISTED else ""
            parts.append(f"skipped {len(skipped)} of {total} images: {listed}{more}")
        if repaired:
            listed = "; ".join(f"{f}: {why}" for f, why in repaired[:MAX_LISTED])
            more = f" (+{len(repaired) - MAX_LISTED} more)" if len(repaired) > MAX_LISTED else ""
            parts.append(f"repaired {len(repaired)} label file(s): {listed}{more}")
        if parts:  # one warning per dataset, however many files are affected
            LOGGER.warning("dataset problems: %s", " | ".join(parts))

    def _make_rect(self, batch_size: int) -> None:
        """Order the images by aspect ratio h/w and give each batch its own shape (:func:`rect_batch_shapes`).

        The order is numpy's default ``argsort`` (introsort, not stable), the one YOLOv5 uses: images
        of equal aspect are then in the same order as there, and so are the batches they share,
        which keeps mAP comparisons with YOLOv5 exact.
        """
        aspect = self.shapes[:, 1] / self.shapes[:, 0]  # shapes are (w, h)
        order = np.argsort(aspect)
        self.im_files, self.label_files, self.labels = (
            [seq[i] for i in order] for seq in (self.im_files, self.label_files, self.labels))
        self.shapes = self.shapes[order]
        self.batch_shapes = rect_batch_shapes(aspect[order], batch_size, self.imgsz, self.stride, self.pad)

    # ---- loading
    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (call before the loader starts its workers)."""
        self.epoch = int(epoch)

    def _read_resized(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        im = load_bgr(self.im_files[i])
        hw0 = im.shape[:2]
        hw = long_side_hw(hw0, self.imgsz)
        im = resize_to(im, hw, fast=self.augment)  # the warp resamples augmented images again
        return im, hw0, hw

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """(BGR image resized so its long side is imgsz, (h0, w0) original, (h, w) resized)."""
        cached = self.ims[i]
        if cached is not None:
            return cached[0].copy(), cached[1], cached[2]
        return self._read_resized(i)

    def _load_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        picks = [index, *(int(j) for j in self.rng.integers(0, self.n, 3))]
        items = [(self.load_image(j)[0], self.labels[j]) for j in picks]
        img, px = mosaic4(items, self.imgsz, self.rng, out=self._canvas)
        self._canvas = img  # free to reuse: the warp below always writes a new (imgsz, imgsz) image
        return random_warp(img, px, self.rng, out_hw=(self.imgsz, self.imgsz), **self.warp_ranges)

    @property
    def warp_ranges(self) -> dict[str, float]:
        """The hyp entries :func:`random_warp` draws its geometry from."""
        return {k: float(self.hyp[k]) for k in ("degrees", "translate", "scale", "shear", "perspective")}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self._item_or_stand_in(index)

    def _build_item(self, index: int):
        h = self.hyp
        self.rng = np.random.default_rng([self.seed, self.epoch, index])
        ratio_pad = None
        if self.mosaic and self.rng.random() < h["mosaic"]:
            img, px = self._load_mosaic(index)
            if self.rng.random() < h["mixup"]:
                img2, px2 = self._load_mosaic(int(self.rng.integers(0, self.n)))
                img, px = mixup(img, px, img2, px2, self.rng)
            h0, w0 = int(self.shapes[index][1]), int(self.shapes[index][0])
        else:
            img, (h0, w0), (hr, wr) = self.load_image(index)
            shape = tuple(self.batch_shapes[self.batch_index[index]]) if self.rect else self.imgsz
            img, (rw, rh), (padw, padh) = letterbox(img, shape, auto=False, scaleup=self.augment)
            lb = self.labels[index]
            px = np.zeros((len(lb), 5), dtype=np.float32)
            if len(lb):
                px[:, 0] = lb[:, 0]
                px[:, 1:] = xywhn2xyxy(lb[:, 1:], rw * wr, rh * hr, padw=padw, padh=padh)
            ratio_pad = ((rh * hr / h0, rw * wr / w0), (padw, padh))
            if self.augment:
                img, px = random_warp(img, px, self.rng, **self.warp_ranges)

        H, W = img.shape[:2]
        labels = np.zeros((len(px), 5), dtype=np.float32)
        if len(px):
            labels[:, 0] = px[:, 0]
            labels[:, 1:] = xyxy2xywhn(px[:, 1:5], W, H, clip=True, eps=1e-3)
        if self.augment:
            img = jitter_hsv(img, h["hsv_h"], h["hsv_s"], h["hsv_v"], rng=self.rng)
            if self.rng.random() < h["flipud"]:
                img = np.flipud(img)
                labels[:, 2] = 1 - labels[:, 2]
            if self.rng.random() < h["fliplr"]:
                img = np.fliplr(img)
                labels[:, 1] = 1 - labels[:, 1]
            # Flips can undo ratio_pad's meaning; only un-augmented items are mapped back anyway.

        out = torch.zeros((len(labels), 6), dtype=torch.float32)
        out[:, 1:] = torch.from_numpy(labels)
        chw = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC → RGB CHW
        return torch.from_numpy(chw), out, self.im_files[index], (h0, w0), ratio_pad


    # ---- images that cannot be read at load time (a file that broke after the scan)
    def _read_resized_or_none(self, i: int) -> tuple | None:
        """`_read_resized` for the RAM cache; None (read again, and handled, at load time) if unreadable."""
        try:
            return self._read_resized(i)
        except UnreadableImageError as e:
            self._warn_unreadable(e)
            return None

    def _warn_unreadable(self, error: UnreadableImageError) -> None:
        """One warning per file for the whole run, whichever worker process meets it first."""
        i = self.im_files.index(error.path) if error.path in self.im_files else None
        if i is not None and self._warned_unreadable[i]:
            return
        if i is not None:
            self._warned_unreadable[i] = 1
        what = "replaced by other images" if self.augment else "counted as a blank image without labels"
        LOGGER.warning("%s; %s from now on (fix or remove the file)", error, what)

    def _item_or_stand_in(self, index: int):
        """Item ``index``, or a stand-in when one of its images cannot be decoded.

        Training (``augment``) takes the item of another index drawn from a generator seeded with
        (seed, epoch, index, attempt): the epoch keeps its length and stays a function of (seed,
        epoch), so ``--resume`` still continues exactly. Evaluation must count every image once, so
        there the image becomes a blank (grey) picture without labels.
        """
        try:
            return self._build_item(index)
        except UnreadableImageError as e:
            self._warn_unreadable(e)
        if not self.augment:
            return self._blank_item(index)
        for attempt in range(1, STAND_IN_TRIES + 1):
            other = int(np.random.default_rng([self.seed, self.epoch, index, attempt]).integers(self.n))
            try:
                return self._build_item(other)
            except UnreadableImageError as e:
                self._warn_unreadable(e)
        raise UnreadableImageError(self.im_files[index], f"and {STAND_IN_TRIES} images drawn to replace it are "
                                   "unreadable too; check the dataset's files")

    def _blank_item(self, index: int):
        """Item ``index`` as a grey picture without labels (this process remembers the substitution)."""
        w0, h0 = (int(v) for v in self.shapes[index])
        r = self.imgsz / max(h0, w0)  # about the size `_read_resized` gives; no labels, so exactness is moot
        h, w = max(round(h0 * r), 1), max(round(w0 * r), 1)
        self.ims[index] = (np.full((h, w, 3), 114, dtype=np.uint8), (h0, w0), (h, w))
        self.labels[index] = np.zeros((0, 5), dtype=np.float32)
        return self._build_item(index)

def collate_fn(batch: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], tuple]:
    """Stack a list of dataset items.

    Returns ``(imgs uint8 (B, 3, H, W), targets float32 (N, 6) [batch_idx, cls, xc, yc, w, h],
    paths, shapes)`` with ``shapes[i] = ((h0, w0), ratio_pad)``.
    """
    imgs, labels, paths, hw0, ratio_pads = zip(*batch)
    for i, lb in enumerate(labels):
        lb[:, 0] = i  # which image of the batch each box belongs to
    return torch.stack(imgs, 0), torch.cat(labels, 0), paths, tuple(zip(hw0, ratio_pads))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive every RNG of the worker from the loader's seed.

    PyTorch gives worker k the seed ``base_seed + k`` where ``base_seed`` comes from the loader's
    generator, so a seeded generator makes every worker's augmentation reproducible.
    """
    info = get_worker_info()
    seed = info.seed % 2**32
    random.seed(seed)
    np.random.seed(seed)
    cv2.setNumThreads(0)  # workers already run in parallel; OpenCV's own threads only oversubscribe


def create_dataloader(
    sources: str | Path | Sequence[str | Path],
    imgsz: int,
    batch_size: int,
    stride: int,
    hyp: dict | None = None,
    augment: bool = False,
    rect: bool = False,
    workers: int = 2,
    shuffle: bool = False,
    rank: int = -1,
    world_size: int = 1,
    seed: int = 0,
    cache: str | bool | None = None,
    single_cls: bool = False,
    pad: float = 0.0,
    nc: int | None = None,
) -> tuple[DataLoader, YoloDataset]:
    """Build a :class:`YoloDataset` and its DataLoader; returns ``(loader, dataset)``.

    Batches are :func:`collate_fn` tuples. Validation callers use ``rect=True, pad=0.5`` as YOLOv5
    does. ``world_size > 1`` adds a DistributedSampler (shuffled with ``seed``; the trainer calls
    ``loader.sampler.set_epoch(epoch)`` and ``dataset.set_epoch(epoch)``). Non-augmenting loaders keep
    their workers between epochs; augmenting ones restart them so each epoch's augmentation stream
    (seed, epoch, index) reaches them. The same seed gives the same batches. ``nc`` enables the
    class-range check on labels.
    """
    if rect and shuffle:
        LOGGER.warning("rect=True is incompatible with shuffle; shuffle disabled")
        shuffle = False
    rank_offset = max(rank, 0)  # ranks augment differently but shuffle alike (sampler seed)
    dataset = YoloDataset(sources, imgsz=imgsz, batch_size=batch_size, augment=augment, hyp=hyp, rect=rect,
                          cache=cache, stride=stride, pad=pad, single_cls=single_cls, seed=seed + rank_offset,
                          nc=nc)
    batch_size = min(batch_size, len(dataset))
    nw = max(0, min(int(workers), os.cpu_count() or 1))
    sampler = None
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank_offset, shuffle=shuffle, seed=seed)
    generator = torch.Generator()
    generator.manual_seed(seed + 1_000_003 * rank_offset)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=nw,
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_fn,
        worker_init_fn=seed_worker,
        generator=generator,
        # Augmenting loaders restart their workers each epoch so that set_epoch() reaches them.
        persistent_workers=nw > 0 and not augment,
        drop_last=False,
    )
    return loader, dataset

