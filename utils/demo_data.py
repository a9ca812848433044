"""A small synthetic detection dataset that a CPU can learn in minutes (the project's demo set).

Images are 160×160 PNGs (``imgsz`` scales everything) with 1-4 filled shapes of four classes that
differ in colour AND shape (red circle, green square, blue triangle, yellow cross) on a noisy
gradient background with a few grey distractor strokes. Most objects are 24-64 px, about one in
seven is small (14-20 px), and overlap is limited so that every object stays mostly visible.
Everything is drawn from ``numpy.random.default_rng([seed, split, index])``, so the same seed
writes byte-identical files and changing ``n_train`` leaves the val images untouched.

Layout written under ``root`` (YOLO layout plus a COCO json for val)::

    images/{train,val}/000001.png ...     labels/{train,val}/000001.txt ("cls xc yc w h", normalised)
    annotations/instances_val.json        COCO: image id = int(file stem), category id = class index

Boxes are the exact pixel extent of each shape (computed from its mask before later shapes are
painted over it), so labels are tight even where shapes overlap.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

NAMES = ["red_circle", "green_square", "blue_triangle", "yellow_cross"]
# BGR colours far apart in hue, so colour alone already separates the classes.
_COLOURS = np.array([(40, 40, 215), (45, 185, 45), (215, 85, 35), (35, 215, 225)], dtype=np.float32)
_SPLIT_IDS = {"train": 0, "val": 1}


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Low-saturation linear gradient + a few thin grey strokes (float32 BGR, (size, size, 3))."""
    grey = rng.uniform(70, 185, 2)
    tint = rng.uniform(-18, 18, (2, 3))  # small per-channel tint keeps the background unsaturated
    c0, c1 = grey[0] + tint[0], grey[1] + tint[1]
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    t = (np.cos(theta) * xx + np.sin(theta) * yy)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    for _ in range(int(rng.integers(2, 5))):  # distractors: thin grey lines and arcs
        g = float(rng.uniform(30, 225))
        colour = tuple(float(v) for v in g + rng.uniform(-12, 12, 3))
        thick = int(rng.integers(1, 3))
        if rng.random() < 0.6:
            p1 = tuple(int(v) for v in rng.integers(0, size, 2))
            p2 = tuple(int(v) for v in rng.integers(0, size, 2))
            cv2.line(img, p1, p2, colour, thick, cv2.LINE_AA)
        else:
            centre = tuple(int(v) for v in rng.integers(0, size, 2))
            axes = tuple(int(v) for v in rng.integers(10, size // 2, 2))
            start = float(rng.uniform(0, 360))
            cv2.ellipse(img, centre, axes, 0.0, start, start + float(rng.uniform(60, 200)), colour, thick,
                        cv2.LINE_AA)
    return img


def _shape_mask(cls: int, x: int, y: int, s: int, rng: np.random.Generator, size: int) -> np.ndarray:
    """Binary mask of one shape of class ``cls`` drawn in the s×s cell with top-left (x, y)."""
    m = np.zeros((size, size), dtype=np.uint8)
    if cls == 0:  # circle
        r = s / 2
        cv2.circle(m, (round(x + r), round(y + r)), max(round(r - 0.5), 1), 1, -1)
    elif cls == 1:  # square (slightly rectangular at times, so box aspect varies a little)
        w = max(round(s * rng.uniform(0.85, 1.0)), 4)
        h = max(round(s * rng.uniform(0.85, 1.0)), 4)
        cv2.rectangle(m, (x, y), (x + w - 1, y + h - 1), 1, -1)
    elif cls == 2:  # triangle pointing up
        h = s - 1
        pts = np.array([[x + (s - 1) / 2, y], [x, y + h], [x + s - 1, y + h]], dtype=np.float32)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    else:  # plus-shaped cross, bar thickness a third of its size
        t = max(round(s / 3), 2)
        o = (s - t) // 2
        cv2.rectangle(m, (x + o, y), (x + o + t - 1, y + s - 1), 1, -1)
        cv2.rectangle(m, (x, y + o), (x + s - 1, y + o + t - 1), 1, -1)
    return m


def _iou_and_cover(box: np.ndarray, others: list[np.ndarray]) -> tuple[float, float]:
    """Largest IoU of ``box`` with ``others`` and the largest fraction of any other box it covers."""
    best_iou = best_cover = 0.0
    for o in others:
        iw = min(box[2], o[2]) - max(box[0], o[0])
        ih = min(box[3], o[3]) - max(box[1], o[1])
        inter = max(iw, 0) * max(ih, 0)
        a1 = (box[2] - box[0]) * (box[3] - box[1])
        a2 = (o[2] - o[0]) * (o[3] - o[1])
        best_iou = max(best_iou, inter / (a1 + a2 - inter))
        best_cover = max(best_cover, inter / a2)
    return best_iou, best_cover


def render_sample(rng: np.random.Generator, size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image. Returns ``(image uint8 (size, size, 3) BGR, boxes (n, 5) [cls, x1, y1, x2, y2]
    pixels, x2/y2 exclusive)``."""
    img = _background(rng, size)
    boxes: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(0, len(NAMES)))
        s = int(rng.integers(14, 21)) if rng.random() < 0.15 else int(rng.integers(24, 65))
        s = max(round(s * size / 160), 6)  # sizes are specified for 160 px; keep proportions at other sizes
        for _attempt in range(30):  # rejection sampling keeps overlap mild
            x, y = (int(v) for v in rng.integers(2, size - s - 1, 2))
            cell = np.array([x, y, x + s, y + s], dtype=np.float32)
            iou, cover = _iou_and_cover(cell, [b[1:] for b in boxes])
            if iou < 0.2 and cover < 0.35:
                break
        else:
            continue  # no room for this object: fewer objects is fine
        mask = _shape_mask(cls, x, y, s, rng, size)
        ys, xs = np.nonzero(mask)
        boxes.append(np.array([cls, xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=np.float32))
        colour = _COLOURS[cls] + rng.uniform(-20, 20, 3).astype(np.float32)
        img[mask.astype(bool)] = colour
    img += rng.normal(0.0, 5.0, img.shape).astype(np.float32)  # sensor-like noise on everything
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    return out, np.stack(boxes) if boxes else np.zeros((0, 5), dtype=np.float32)


def generate_demo(root: str | Path, seed: int = 0, n_train: int = 600, n_val: int = 150, imgsz: int = 160) -> Path:
    """Write the demo dataset under ``root`` (layout in the module docstring) and return ``root``.

    Deterministic: the same (seed, n_train, n_val, imgsz) gives byte-identical files. Takes about
    1-2 s per 100 images on one core.
    """
    root = Path(root)
    coco_images, coco_annotations = [], []
    for split, n in (("train", n_train), ("val", n_val)):
        im_dir, lb_dir = root / "images" / split, root / "labels" / split
        im_dir.mkdir(parents=True, exist_ok=True)
        lb_dir.mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            rng = np.random.default_rng([seed, _SPLIT_IDS[split], i])
            img, boxes = render_sample(rng, imgsz)
            stem = f"{i:06d}"
            if not cv2.imwrite(str(im_dir / f"{stem}.png"), img, [cv2.IMWRITE_PNG_COMPRESSION, 3]):
                raise OSError(f"could not write {im_dir / stem}.png")
            rows = []
            for c, x1, y1, x2, y2 in boxes:
                xc, yc = (x1 + x2) / 2 / imgsz, (y1 + y2) / 2 / imgsz
                rows.append(f"{int(c)} {xc:.6f} {yc:.6f} {(x2 - x1) / imgsz:.6f} {(y2 - y1) / imgsz:.6f}\n")
            (lb_dir / f"{stem}.txt").write_text("".join(rows))
            if split == "val":
                coco_images.append({"id": i, "file_name": f"{stem}.png", "width": imgsz, "height": imgsz})
                for c, x1, y1, x2, y2 in boxes:
                    w, h = float(x2 - x1), float(y2 - y1)
                    coco_annotations.append({
                        "id": len(coco_annotations) + 1, "image_id": i, "category_id": int(c),
                        "bbox": [float(x1), float(y1), w, h], "area": w * h, "iscrowd": 0,
                    })
    coco = {
        "info": {"description": f"yolo-kd synthetic demo set (seed {seed})"},
        "images": coco_images,
        "annotations": coco_annotations,
        "categories": [{"id": i, "name": n, "supercategory": "shape"} for i, n in enumerate(NAMES)],
    }
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    return root
