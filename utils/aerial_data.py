"""A generated aerial-style detection set: many small objects on clutter (the hard benchmark).

Where the demo set (utils/demo_data.py) is easy — a few large shapes whose colour gives the class —
this one is built like drone imagery (VisDrone): 20-150 labelled objects per 320×320 image, each
4-32 px on its longer box side, 10 classes, on a textured ground with fields, roofs, roads with
lane dashes, trees and small unlabelled clutter. Classes share colour distributions; what tells
them apart is form, inner pattern and size band, and several pairs are close on purpose
(pedestrian/people, car/van, tricycle/awning_tricycle, truck/bus, bicycle/motor). A per-image
"altitude" factor rescales all objects, so size alone is ambiguous too.

Honest labels: objects never overlap each other (a 1 px gap is kept), they are painted after the
background and distractors, and their shadows only darken the background. Each box is the exact
pixel extent of the object's mask; a light blur, JPEG and sensor noise are applied on top, like
a camera. Everything is drawn from ``numpy.random.default_rng([seed, split, index])``, so the
same seed writes byte-identical files and ``n_train`` does not change the val images.

Layout under ``root`` (as for the demo set)::

    images/{train,val}/000001.jpg ...     labels/{train,val}/000001.txt ("cls xc yc w h", normalised)
    annotations/instances_val.json        COCO: image id = int(file stem), category id = class index
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np

NAMES = ["pedestrian", "people", "bicycle", "car", "van", "truck", "tricycle", "awning_tricycle", "bus",
         "motor"]
# Relative class frequencies (cars and people dominate, buses are rare), as in street scenes.
_FREQ = np.array([16, 10, 6, 22, 9, 6, 6, 5, 4, 12], dtype=np.float64)
# Long side in px at altitude factor 1 (the factor spans 0.8-1.25); bands of look-alikes overlap.
_LENGTH = {0: (4, 7), 1: (5, 9), 2: (7, 13), 3: (12, 20), 4: (14, 22), 5: (21, 29), 6: (7, 12), 7: (8, 13),
           8: (22, 29), 9: (6, 10)}
_MIN_SIDE, _MAX_SIDE = 4, 32
_PATCH = 44  # objects are drawn in a local patch: 32 px plus room for rotation, shadow and jitter
_SPLIT_IDS = {"train": 0, "val": 1}

# BGR palettes. Vehicle paint is shared by every vehicle class (only the weights differ), clothes by
# both person classes, so a colour never identifies a class.
_PAINT = np.array([(228, 228, 226), (178, 176, 172), (42, 42, 46), (112, 112, 116), (44, 46, 178),
                   (150, 74, 42), (92, 44, 32), (150, 184, 204), (62, 112, 54), (40, 188, 222)], np.float32)
_PAINT_W = {3: [5, 4, 4, 3, 2, 2, 1, 1, 1, .5], 4: [7, 4, 2, 2, 1, 1, 1, 1, .5, .5],
            5: [3, 2, 1, 2, 2, 2, 1, 2, 2, 2], 8: [3, 1, .5, 1, 2, 2, 1, 1, 1, 3], 9: [1, 1, 4, 2, 2, 2, 1, 1, 1, 1]}
_GROUND = np.array([(62, 118, 82), (92, 150, 160), (82, 108, 138), (150, 154, 156), (98, 98, 100),
                    (70, 96, 74)], np.float32)
_ROOF = np.array([(58, 78, 150), (120, 120, 124), (70, 70, 74), (205, 205, 200), (140, 110, 84),
                  (96, 128, 150)], np.float32)


def _pick(rng: np.random.Generator, palette: np.ndarray, weights=None, jitter: float = 14.0) -> np.ndarray:
    """One palette colour (optionally weighted) with a uniform per-channel jitter."""
    k = int(rng.integers(len(palette))) if weights is None else _draw(rng, weights)
    return palette[k] + rng.uniform(-jitter, jitter, 3).astype(np.float32)


def _draw(rng: np.random.Generator, weights) -> int:
    """An index drawn with probability proportional to ``weights`` (cheaper than rng.choice(p=))."""
    cum = np.cumsum(weights)
    return int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))


def _smooth_noise(rng: np.random.Generator, size: int, cells: tuple[int, ...], amps: tuple[float, ...]) -> np.ndarray:
    """Multi-scale value noise: random grids of ``cells``² upsampled bicubically, summed with ``amps``
    (float32, (size, size), zero mean)."""
    out = np.zeros((size, size), np.float32)
    for c, a in zip(cells, amps):
        grid = rng.standard_normal((c, c)).astype(np.float32)
        out += a * cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return out


def _poly(canvas: np.ndarray, pts: np.ndarray, value) -> None:
    """Fill a float polygon with 1/16 px precision (OpenCV fixed-point ``shift``)."""
    cv2.fillPoly(canvas, [np.round(pts * 16).astype(np.int32)], value, cv2.LINE_8, shift=4)


def _box_part(centre, theta: float, length: float, width: float, a: float = 0.0, b: float = 1.0,
              wa: float = 0.0, wb: float = 1.0) -> np.ndarray:
    """Corners (4, 2) of the part of a rotated length×width rectangle between fractions ``a..b`` of its
    length and ``wa..wb`` of its width (0 = rear / left edge)."""
    ca, sa = math.cos(theta), math.sin(theta)
    cx, cy = float(centre[0]), float(centre[1])
    pts = []
    for u, v in ((a, wa), (b, wa), (b, wb), (a, wb)):
        du, dv = (u - 0.5) * length, (v - 0.5) * width
        pts.append((cx + du * ca - dv * sa, cy + du * sa + dv * ca))
    return np.array(pts, np.float32)


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[np.ndarray, float]]]:
    """Textured ground, field parcels, roads with lane dashes, roofs, trees and small clutter.
    Returns the float32 BGR image and the roads as (point, angle) for placing vehicles."""
    g0, g1 = _pick(rng, _GROUND), _pick(rng, _GROUND)
    blend = np.clip(_smooth_noise(rng, size, (3, 6), (0.6, 0.3)) + 0.5, 0, 1)[..., None]
    img = g0 * blend + g1 * (1 - blend)
    for _ in range(int(rng.integers(0, 5))):  # parcels: straight-edged patches of another ground
        pts = _box_part(rng.uniform(0, size, 2).astype(np.float32), rng.uniform(0, np.pi), rng.uniform(60, 200),
                        rng.uniform(40, 160))
        _poly(img, pts, tuple(float(v) for v in _pick(rng, _GROUND)))
    texture = _smooth_noise(rng, size, (12, 40, 110), (0.10, 0.08, 0.07))
    img *= 1.0 + texture[..., None]
    roads = []
    for _ in range(int(rng.integers(0, 3))):
        p, ang, w = rng.uniform(0, size, 2).astype(np.float32), float(rng.uniform(0, np.pi)), rng.uniform(14, 30)
        asphalt = tuple(float(v) for v in np.full(3, rng.uniform(55, 105)) + rng.uniform(-6, 6, 3))
        _poly(img, _box_part(p, ang, 3 * size, w), asphalt)
        dash = tuple(float(v) for v in rng.uniform(190, 235, 3))
        step = rng.uniform(12, 20)
        for t in np.arange(-1.5 * size, 1.5 * size, step):  # centre line dashes: vehicle-sized confusers
            c = p + t * np.array([np.cos(ang), np.sin(ang)], np.float32)
            if -8 < c[0] < size + 8 and -8 < c[1] < size + 8:
                _poly(img, _box_part(c, ang, step * 0.45, 1.6), dash)
        roads.append((p, ang))
    shade = float(rng.uniform(0.55, 0.8))
    for _ in range(int(rng.integers(1, 9))):  # roofs with a ridge line and a shadowed half
        c, ang = rng.uniform(0, size, 2).astype(np.float32), float(rng.uniform(0, np.pi))
        length, width = rng.uniform(24, 90), rng.uniform(20, 60)
        col = _pick(rng, _ROOF)
        _poly(img, _box_part(c, ang, length, width), tuple(float(v) for v in col))
        _poly(img, _box_part(c, ang, length, width, wa=0.5), tuple(float(v) for v in col * shade))
        _poly(img, _box_part(c, ang, length, width, wa=0.48, wb=0.52), tuple(float(v) for v in col * 1.15))
    for _ in range(int(rng.integers(3, 40))):  # trees and bushes: dark green blobs with a shadow
        c = rng.uniform(0, size, 2)
        r = float(rng.uniform(3, 14))
        col = np.array([rng.uniform(25, 60), rng.uniform(60, 110), rng.uniform(30, 60)], np.float32)
        cv2.circle(img, (int(c[0] + r / 3) * 16, int(c[1] + r / 3) * 16), int(r * 16), (20, 28, 22), -1,
                   cv2.LINE_8, 4)
        cv2.circle(img, (int(c[0] * 16), int(c[1] * 16)), int(r * 16), tuple(float(v) for v in col), -1,
                   cv2.LINE_8, 4)
    for _ in range(int(rng.integers(10, 60))):  # clutter: square boxes, bins, poles (never a class form)
        c, ang = rng.uniform(0, size, 2).astype(np.float32), float(rng.uniform(0, np.pi))
        col = tuple(float(v) for v in (_pick(rng, _PAINT) if rng.random() < 0.4 else rng.uniform(30, 230, 3)))
        if rng.random() < 0.6:
            s = rng.uniform(6, 12)
            _poly(img, _box_part(c, ang, s, s), col)
        else:
            _poly(img, _box_part(c, ang, rng.uniform(10, 24), 1.2), col)
    return img, roads


def _person(rng, canvas, mask, c, theta, length, cls):
    """pedestrian: an upright ellipse with a dark head dot; people: rounder, with a light centre."""
    aspect = rng.uniform(0.55, 0.75) if cls == 0 else rng.uniform(0.8, 1.0)
    axes = (int(length * 8), int(length * aspect * 8))
    centre = (int(c[0] * 16), int(c[1] * 16))
    deg = float(np.degrees(theta))
    cv2.ellipse(mask, centre, axes, deg, 0, 360, 1, -1, cv2.LINE_8, 4)
    cv2.ellipse(canvas, centre, axes, deg, 0, 360, tuple(float(v) for v in rng.uniform(25, 235, 3)), -1,
                cv2.LINE_8, 4)
    if cls == 0:
        head = c + 0.25 * length * np.array([np.cos(theta), np.sin(theta)])
        cv2.circle(canvas, (int(head[0] * 16), int(head[1] * 16)), int(length * 0.22 * 16),
                   tuple(float(v) for v in rng.uniform(15, 70, 3)), -1, cv2.LINE_8, 4)
    else:
        cv2.ellipse(canvas, centre, (axes[0] // 2, axes[1] // 2), deg, 0, 360,
                    tuple(float(v) for v in rng.uniform(150, 240, 3)), -1, cv2.LINE_8, 4)


def _two_wheeler(rng, canvas, mask, c, theta, length, cls):
    """bicycle: a thin dark bar with wheel dots at both ends; motor: a wider body with a rider dot."""
    width = 1.6 if cls == 2 else length * rng.uniform(0.38, 0.5)
    body = _box_part(c, theta, length, width)
    _poly(mask, body, 1)
    frame = tuple(float(v) for v in (rng.uniform(20, 120, 3) if cls == 2 else _pick(rng, _PAINT, _PAINT_W[9])))
    _poly(canvas, body, frame)
    along = np.array([np.cos(theta), np.sin(theta)])
    if cls == 2:
        for end in (-0.4, 0.4):
            w = c + end * length * along
            cv2.circle(mask, (int(w[0] * 16), int(w[1] * 16)), int(1.8 * 16), 1, -1, cv2.LINE_8, 4)
            cv2.circle(canvas, (int(w[0] * 16), int(w[1] * 16)), int(1.8 * 16), (30, 30, 34), -1, cv2.LINE_8, 4)
    else:
        cv2.circle(canvas, (int(c[0] * 16), int(c[1] * 16)), int(width * 0.4 * 16),
                   tuple(float(v) for v in rng.uniform(20, 235, 3)), -1, cv2.LINE_8, 4)


def _vehicle(rng, canvas, mask, c, theta, length, cls):
    """car / van / truck / bus: a rotated box told apart by aspect and inner pattern."""
    aspect = {3: (1.8, 2.2), 4: (1.45, 1.75), 5: (2.4, 2.9), 8: (2.8, 3.5)}[cls]
    width = length / rng.uniform(*aspect)
    paint = _pick(rng, _PAINT, _PAINT_W[cls])
    glass = tuple(float(v) for v in rng.uniform(20, 60, 3))
    _poly(mask, _box_part(c, theta, length, width), 1)
    _poly(canvas, _box_part(c, theta, length, width), tuple(float(v) for v in paint))
    if cls == 3:  # windscreen and rear window leave a roof in the middle
        _poly(canvas, _box_part(c, theta, length, width, 0.62, 0.8, 0.1, 0.9), glass)
        _poly(canvas, _box_part(c, theta, length, width, 0.12, 0.24, 0.12, 0.88), glass)
    elif cls == 4:  # windscreen at the very front, long flat roof
        _poly(canvas, _box_part(c, theta, length, width, 0.8, 0.92, 0.1, 0.9), glass)
    elif cls == 5:  # cab in its own colour, a gap, then the cargo box
        cab = tuple(float(v) for v in _pick(rng, _PAINT))
        _poly(canvas, _box_part(c, theta, length, width, 0.78, 1.0), cab)
        _poly(canvas, _box_part(c, theta, length, width, 0.74, 0.78), (35, 35, 38))
    else:  # bus: window rows along both long sides
        n_win = max(int(length // 4), 2)
        for k in range(n_win):
            a = 0.08 + 0.84 * k / n_win
            for wa in (0.06, 0.74):
                _poly(canvas, _box_part(c, theta, length, width, a, a + 0.5 * 0.84 / n_win, wa, wa + 0.2), glass)


def _tricycle(rng, canvas, mask, c, theta, length, cls):
    """tricycle: a triangle with a driver dot at the apex; awning_tricycle: its rear half striped."""
    along = np.array([np.cos(theta), np.sin(theta)], np.float32)
    across = np.array([-along[1], along[0]], np.float32)
    half_w = length * rng.uniform(0.32, 0.42)
    tri = np.stack([c + 0.5 * length * along, c - 0.5 * length * along + half_w * across,
                    c - 0.5 * length * along - half_w * across])
    _poly(mask, tri, 1)
    _poly(canvas, tri, tuple(float(v) for v in _pick(rng, _PAINT)))
    if cls == 6:
        tip = c + 0.25 * length * along
        cv2.circle(canvas, (int(tip[0] * 16), int(tip[1] * 16)), int(length * 0.12 * 16) + 8, (30, 30, 34), -1,
                   cv2.LINE_8, 4)
    else:
        cols = [tuple(float(v) for v in rng.uniform(20, 235, 3)), (225.0, 225.0, 225.0)]
        clip = np.zeros_like(mask)
        _poly(clip, tri, 1)
        stripes = np.zeros_like(canvas)
        for k in range(4):
            _poly(stripes, _box_part(c, theta, length, 2 * half_w, 0.0, 0.55, k / 4, (k + 1) / 4), cols[k % 2])
        sel = (clip > 0) & (stripes.sum(-1) > 0)
        canvas[sel] = stripes[sel]


_DRAW = {0: _person, 1: _person, 2: _two_wheeler, 9: _two_wheeler, 3: _vehicle, 4: _vehicle, 5: _vehicle,
         8: _vehicle, 6: _tricycle, 7: _tricycle}


def _render_object(rng: np.random.Generator, cls: int, theta: float, scale: float):
    """Draw one object in a _PATCH² patch. Returns (mask bool, colours float32, box [x1, y1, x2, y2]
    of the mask in patch pixels, x2/y2 exclusive) or None if its box leaves the 4-32 px range."""
    canvas = np.zeros((_PATCH, _PATCH, 3), np.float32)
    mask = np.zeros((_PATCH, _PATCH), np.uint8)
    centre = np.float32(_PATCH / 2) + rng.uniform(0, 1, 2).astype(np.float32)  # sub-pixel position
    lo, hi = _LENGTH[cls]
    # the longest box side of a rotated w×l box is at most (l + w)/√2 ≤ l for slim ones; vans are wider
    length = min(float(rng.uniform(lo, hi) * scale), 26.0 if cls == 4 else 31.0)
    _DRAW[cls](rng, canvas, mask, centre, theta, length, cls)
    ys, xs = np.nonzero(mask)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    side = (box[2:] - box[:2]).max()
    if not _MIN_SIDE <= side <= _MAX_SIDE:
        return None
    return mask.astype(bool), canvas, box


def _centre_for(rng, cls, size, roads, hotspots) -> tuple[np.ndarray, float]:
    """Where and how an object sits: vehicles often along a road (aligned with it), everyone often
    near a crowd hotspot, otherwise anywhere, any direction."""
    u = rng.random()
    if cls in (3, 4, 5, 8, 9, 2) and roads and u < 0.55:
        p, ang = roads[int(rng.integers(len(roads)))]
        t, off = rng.uniform(-size, size), rng.normal(0, 5)
        c = p + t * np.array([np.cos(ang), np.sin(ang)]) + off * np.array([-np.sin(ang), np.cos(ang)])
        return c, ang + (np.pi if rng.random() < 0.5 else 0.0) + rng.normal(0, 0.05)
    if u < 0.8:
        h = hotspots[int(rng.integers(len(hotspots)))]
        return h[:2] + rng.normal(0, h[2], 2), float(rng.uniform(0, 2 * np.pi))
    return rng.uniform(0, size, 2), float(rng.uniform(0, 2 * np.pi))


def render_sample(rng: np.random.Generator, size: int = 320, with_ids: bool = False) -> tuple[np.ndarray, ...]:
    """Draw one image. Returns ``(image uint8 (size, size, 3) BGR, boxes (n, 5) [cls, x1, y1, x2, y2]
    pixels, x2/y2 exclusive)``; n is 20-150 (fewer only if the image has no room left). With
    ``with_ids`` also the object-id map (int16 (size, size); object k's pixels hold k + 1, else 0)."""
    img, roads = _background(rng, size)
    hotspots = np.column_stack([rng.uniform(0, size, (4, 2)), rng.uniform(15, 60, 4)])
    sun = rng.uniform(-2.5, 2.5, 2).round().astype(int)
    shade = float(rng.uniform(0.5, 0.75))
    scale = float(rng.uniform(0.8, 1.25))  # "altitude": one size factor for the whole image
    occupied = np.zeros((size, size), bool)  # object pixels grown by 1 px: objects never touch
    ids = np.zeros((size, size), np.int16)
    boxes: list[list[float]] = []
    target = int(rng.integers(20, 151))
    for _attempt in range(12 * target):
        if len(boxes) == target:
            break
        cls = _draw(rng, _FREQ)
        c, theta = _centre_for(rng, cls, size, roads, hotspots)
        cx, cy = min(max(int(c[0]), 0), size - 1), min(max(int(c[1]), 0), size - 1)
        if occupied[cy, cx]:  # cheap early rejection before drawing
            continue
        drawn = _render_object(rng, cls, theta, scale)
        if drawn is None:
            continue
        mask, colours, (bx1, by1, bx2, by2) = drawn
        # patch origin in the image, clamped so the object's box lies inside the image
        ox = int(np.clip(round(c[0] - _PATCH / 2), -bx1, size - bx2))
        oy = int(np.clip(round(c[1] - _PATCH / 2), -by1, size - by2))
        x1, y1, x2, y2 = bx1 + ox, by1 + oy, bx2 + ox, by2 + oy
        m = mask[by1:by2, bx1:bx2]
        if (occupied[y1:y2, x1:x2] & m).any():
            continue
        # shadow: the mask shifted away from the sun, darkening only free background
        sx1, sy1 = max(x1 + sun[0], 0), max(y1 + sun[1], 0)
        sx2, sy2 = min(x2 + sun[0], size), min(y2 + sun[1], size)
        sm = m[sy1 - y1 - sun[1]:sy2 - y1 - sun[1], sx1 - x1 - sun[0]:sx2 - x1 - sun[0]]
        free = sm & ~occupied[sy1:sy2, sx1:sx2]
        img[sy1:sy2, sx1:sx2][free] *= shade
        img[y1:y2, x1:x2][m] = colours[by1:by2, bx1:bx2][m]
        ids[y1:y2, x1:x2][m] = len(boxes) + 1
        grown = cv2.dilate(np.pad(m, 1).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        gx1, gy1, gx2, gy2 = max(x1 - 1, 0), max(y1 - 1, 0), min(x2 + 1, size), min(y2 + 1, size)
        occupied[gy1:gy2, gx1:gx2] |= grown[gy1 - y1 + 1:gy2 - y1 + 1, gx1 - x1 + 1:gx2 - x1 + 1]
        boxes.append([cls, x1, y1, x2, y2])
    # camera: global exposure, light blur on some images, sensor noise
    img = img * rng.uniform(0.8, 1.15) + rng.uniform(-15, 15)
    if rng.random() < 0.5:
        img = cv2.GaussianBlur(img, (3, 3), 0.6)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 7))
    out = np.clip(np.round(img), 0, 255).astype(np.uint8)
    boxes_arr = np.array(boxes, np.float32).reshape(-1, 5)
    return (out, boxes_arr, ids) if with_ids else (out, boxes_arr)


def _yolo_rows(boxes: np.ndarray, size: int) -> str:
    """'cls xc yc w h' lines, normalised by the image size."""
    xy = (boxes[:, 1:3] + boxes[:, 3:5]) / 2 / size
    wh = (boxes[:, 3:5] - boxes[:, 1:3]) / size
    return "".join(f"{int(c)} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, (x, y), (w, h) in zip(boxes[:, 0], xy, wh))


def generate_aerial(root: str | Path, seed: int = 0, n_train: int = 1000, n_val: int = 200,
                    imgsz: int = 320) -> Path:
    """Write the aerial set under ``root`` (layout in the module docstring) and return ``root``.

    Deterministic: the same (seed, n_train, n_val, imgsz) gives byte-identical files (about 30-40 ms
    per image on one core). Object sizes are specified in pixels for 320 px images.
    """
    root = Path(root)
    images, annotations = [], []
    for split, n in (("train", n_train), ("val", n_val)):
        for sub in ("images", "labels"):
            (root / sub / split).mkdir(parents=True, exist_ok=True)
        for i in range(1, n + 1):
            img, boxes = render_sample(np.random.default_rng([seed, _SPLIT_IDS[split], i]), imgsz)
            stem = f"{i:06d}"
            ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
            if not ok:
                raise OSError(f"could not encode {split} image {stem}")
            (root / "images" / split / f"{stem}.jpg").write_bytes(buf.tobytes())
            (root / "labels" / split / f"{stem}.txt").write_text(_yolo_rows(boxes, imgsz))
            if split != "val":
                continue
            images.append({"id": i, "file_name": f"{stem}.jpg", "width": imgsz, "height": imgsz})
            for c, x1, y1, x2, y2 in boxes.tolist():
                w, h = x2 - x1, y2 - y1
                annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(c),
                                    "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0})
    coco = {"info": {"description": f"yolo-kd generated aerial set (seed {seed})"}, "images": images,
            "annotations": annotations,
            "categories": [{"id": k, "name": n, "supercategory": "object"} for k, n in enumerate(NAMES)]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    return root
