"""Convert VisDrone2019-DET annotations to YOLO labels (standalone: stdlib + Pillow only).

VisDrone rows (pixels): ``bbox_left,bbox_top,bbox_width,bbox_height,score,object_category,
truncation,occlusion``. ``score`` 0 marks a box to ignore; category 0 is "ignored regions", 1-10
are the classes (pedestrian, people, bicycle, car, van, truck, tricycle, awning-tricycle, bus,
motor), 11 is "others". We keep categories 1-10 with score != 0 as YOLO classes 0-9, clip boxes to
the image, drop those left with zero area, and count everything dropped.

For each split folder (``images/`` + ``annotations/``) this writes ``labels/<stem>.txt`` with one
``cls xc yc w h`` row per box (normalised, 6 decimals); an image with no kept boxes gets an empty
file (a background image).

Usage::

    python data/scripts/visdrone2yolo.py --dir ../datasets/VisDrone          # every VisDrone2019-DET-* split
    python data/scripts/visdrone2yolo.py --dir ../datasets/VisDrone/VisDrone2019-DET-val   # one split
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from PIL import Image

IMG_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
FIRST_CLASS, LAST_CLASS = 1, 10  # VisDrone categories kept; YOLO class = category - 1


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header (no full decode)."""
    with Image.open(path) as im:
        return im.size


def convert_rows(text: str, width: int, height: int, counts: Counter) -> list[str]:
    """Turn the text of one VisDrone annotation file into YOLO label lines, updating ``counts``."""
    lines = []
    for raw in text.splitlines():
        raw = raw.strip().rstrip(",")  # some releases end rows with a comma
        if not raw:
            continue
        fields = raw.split(",")
        try:
            if len(fields) < 6:
                raise ValueError(raw)
            left, top, bw, bh, score, category = (int(float(v)) for v in fields[:6])
        except ValueError:
            counts["malformed_rows"] += 1
            continue
        counts["rows"] += 1
        if score == 0:
            counts["dropped_score0"] += 1
            continue
        if category == 0:
            counts["dropped_ignored_region"] += 1
            continue
        if not FIRST_CLASS <= category <= LAST_CLASS:
            counts["dropped_others"] += 1
            continue
        x1, y1 = max(left, 0), max(top, 0)
        x2, y2 = min(left + bw, width), min(top + bh, height)
        if x2 <= x1 or y2 <= y1:
            counts["dropped_zero_area"] += 1
            continue
        if (x1, y1, x2, y2) != (left, top, left + bw, top + bh):
            counts["clipped"] += 1
        xc, yc = (x1 + x2) / 2 / width, (y1 + y2) / 2 / height
        w, h = (x2 - x1) / width, (y2 - y1) / height
        lines.append(f"{category - FIRST_CLASS} {xc:.6f} {yc:.6f} {w:.6f} {h:.6f}")
        counts["boxes"] += 1
    return lines


def convert_split(split_dir: str | Path) -> dict[str, int]:
    """Convert one split folder holding ``images/`` and ``annotations/``; returns the counts.

    Keys: images, rows, boxes, clipped, dropped_score0, dropped_ignored_region, dropped_others,
    dropped_zero_area, malformed_rows, missing_annotations (images without an annotation file;
    they get an empty label file), background_images (no box kept).
    """
    split_dir = Path(split_dir)
    images_dir, ann_dir, labels_dir = split_dir / "images", split_dir / "annotations", split_dir / "labels"
    if not images_dir.is_dir() or not ann_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} must contain images/ and annotations/ (a VisDrone2019-DET split)")
    labels_dir.mkdir(exist_ok=True)
    counts: Counter = Counter()
    for keys in ("images", "rows", "boxes", "clipped", "dropped_score0", "dropped_ignored_region",
                 "dropped_others", "dropped_zero_area", "malformed_rows", "missing_annotations",
                 "background_images"):
        counts[keys] = 0
    for img in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMG_SUFFIXES):
        counts["images"] += 1
        ann = ann_dir / f"{img.stem}.txt"
        lines: list[str] = []
        if ann.is_file():
            width, height = _image_size(img)
            lines = convert_rows(ann.read_text(encoding="utf-8"), width, height, counts)
        else:
            counts["missing_annotations"] += 1
        if not lines:
            counts["background_images"] += 1
        (labels_dir / f"{img.stem}.txt").write_text("".join(f"{line}\n" for line in lines))
    return dict(counts)


def main(argv: list[str] | None = None) -> dict[str, dict[str, int]]:
    parser = argparse.ArgumentParser(description="VisDrone2019-DET annotations -> YOLO labels")
    parser.add_argument("--dir", required=True, help="dataset root with VisDrone2019-DET-* splits, or one split")
    args = parser.parse_args(argv)
    root = Path(args.dir)
    if (root / "annotations").is_dir():
        splits = [root]
    else:
        splits = sorted(p for p in root.glob("VisDrone2019-DET-*") if (p / "annotations").is_dir())
    if not splits:
        raise SystemExit(f"no VisDrone split (a folder with images/ and annotations/) found under {root}")
    results = {}
    for split in splits:
        c = convert_split(split)
        results[split.name] = c
        dropped = ", ".join(f"{k.removeprefix('dropped_')} {v}" for k, v in c.items() if k.startswith("dropped_"))
        print(f"{split.name}: {c['images']} images, {c['boxes']} boxes written ({c['clipped']} clipped), "
              f"dropped: {dropped}; malformed rows {c['malformed_rows']}, "
              f"missing annotation files {c['missing_annotations']}, background images {c['background_images']}")
    return results


if __name__ == "__main__":
    main()
