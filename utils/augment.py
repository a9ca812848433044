"""Image + box augmentation for detection training, driven by YOLOv5 hyperparameter keys.

Conventions used throughout this module:
- images are HWC uint8 numpy arrays in OpenCV's BGR order (the dataset converts to RGB last);
- pixel-space labels are (n, 5) float arrays ``[cls, x1, y1, x2, y2]``;
- randomness comes only from the ``numpy.random.Generator`` passed in, so a seeded generator gives
  bit-identical output (the dataset owns one generator per worker process).

Hyperparameter keys read by the dataset (as in YOLOv5 hyp yamls): ``hsv_h hsv_s hsv_v degrees
translate scale shear perspective flipud fliplr mosaic mixup``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from utils.boxes import xywhn2xyxy

PAD_VALUE = 114  # grey used for letterbox / mosaic / warp borders (the value YOLOv5 models expect)


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


def letterbox(
    im: np.ndarray,
    new_shape: int | tuple[int, int] = 640,
    color: tuple[int, int, int] = (PAD_VALUE, PAD_VALUE, PAD_VALUE),
    auto: bool = False,
    scale_fill: bool = False,
    scaleup: bool = True,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping the aspect ratio, then pad to ``new_shape`` = (h, w) (an int means square).

    ``auto`` pads only up to the next multiple of ``stride`` (minimum rectangle) instead of the full
    shape; ``scale_fill`` stretches without padding; ``scaleup=False`` never enlarges (validation).
    Returns ``(image (H, W, 3), (rw, rh), (padw, padh))``: the per-axis scale actually applied
    (resized size / input size, so rounding is accounted for) and the integer left/top padding.
    A pixel-space point maps as ``x' = x * rw + padw``, ``y' = y * rh + padh``.
    """
    h0, w0 = im.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    th, tw = int(new_shape[0]), int(new_shape[1])

    if scale_fill:
        nw, nh = tw, th
    else:
        r = min(th / h0, tw / w0)
        if not scaleup:
            r = min(r, 1.0)
        nw, nh = max(round(w0 * r), 1), max(round(h0 * r), 1)

    if (nw, nh) != (w0, h0):
        # INTER_AREA is the better filter when shrinking, INTER_LINEAR when enlarging.
        interp = cv2.INTER_AREA if nw < w0 and nh < h0 else cv2.INTER_LINEAR
        im = cv2.resize(im, (nw, nh), interpolation=interp)

    dw, dh = tw - nw, th - nh  # total padding
    if auto and not scale_fill:
        dw, dh = dw % stride, dh % stride
    # Odd totals put the extra pixel right/bottom; we report the exact integer left/top offset.
    left, top = dw // 2, dh // 2
    if dw or dh:
        im = cv2.copyMakeBorder(im, top, dh - top, left, dw - left, cv2.BORDER_CONSTANT, value=color)
    return im, (nw / w0, nh / h0), (left, top)


def augment_hsv(
    im: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Random hue/saturation/value gains applied in place to a BGR uint8 image via lookup tables.

    Gains are drawn uniformly in ``1 ± gain`` per channel; hue wraps around (OpenCV hue is 0-179),
    saturation and value saturate at 255. Returns the same array for convenience.
    """
    if not (hgain or sgain or vgain):
        return im
    g = _rng(rng).uniform(-1.0, 1.0, 3) * np.array([hgain, sgain, vgain]) + 1.0
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float32)
    # LUTs turn three per-pixel float multiplies into table lookups on uint8 data.
    lut_h = ((x * g[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * g[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * g[2], 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=im)
    return im


def box_candidates(
    box1: np.ndarray,
    box2: np.ndarray,
    wh_thr: float = 2.0,
    ar_thr: float = 100.0,
    area_thr: float = 0.1,
    eps: float = 1e-16,
) -> np.ndarray:
    """Which transformed boxes survive: (4, n) xyxy before (already scaled) and after → bool (n,).

    Kept when width and height exceed ``wh_thr`` pixels, the area after clipping is more than
    ``area_thr`` of the area before, and the aspect ratio max(w/h, h/w) stays below ``ar_thr``.
    """
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (aspect < ar_thr)


def random_perspective(
    im: np.ndarray,
    targets: np.ndarray | None = None,
    degrees: float = 0.0,
    translate: float = 0.1,
    scale: float = 0.5,
    shear: float = 0.0,
    perspective: float = 0.0,
    border: tuple[int, int] = (0, 0),
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation/scale/shear/translation/perspective warp of an image and its boxes.

    im: (H, W, 3); targets: (n, 5) ``[cls, x1, y1, x2, y2]`` pixels. ``border`` = (by, bx) grows
    (positive) or shrinks (negative) the output: it is (H + 2·by, W + 2·bx); mosaic passes
    −imgsz/2 to crop its 2·imgsz canvas back to imgsz. Boxes are transformed by warping their four
    corners and taking the enclosing box, clipped to the output, then filtered with
    :func:`box_candidates`. Returns ``(image, targets (m, 5))``.
    """
    rng = _rng(rng)
    targets = np.zeros((0, 5), dtype=np.float32) if targets is None else targets
    out_h, out_w = im.shape[0] + 2 * border[0], im.shape[1] + 2 * border[1]

    # Compose the warp right-to-left: centre the input on the origin, then perspective, rotation
    # + scale, shear, and finally move the origin to a random point near the output centre.
    centre = np.eye(3)
    centre[0, 2], centre[1, 2] = -im.shape[1] / 2, -im.shape[0] / 2
    persp = np.eye(3)
    persp[2, 0], persp[2, 1] = rng.uniform(-perspective, perspective, 2)
    rot = np.eye(3)
    angle = rng.uniform(-degrees, degrees)
    s = rng.uniform(1 - scale, 1 + scale)
    rot[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=angle, scale=s)
    shr = np.eye(3)
    shr[0, 1], shr[1, 0] = (math.tan(math.radians(a)) for a in rng.uniform(-shear, shear, 2))
    move = np.eye(3)
    move[0, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_w
    move[1, 2] = rng.uniform(0.5 - translate, 0.5 + translate) * out_h
    M = move @ shr @ rot @ persp @ centre

    if border[0] or border[1] or not np.allclose(M, np.eye(3)):
        fill = (PAD_VALUE, PAD_VALUE, PAD_VALUE)
        if perspective:
            im = cv2.warpPerspective(im, M, dsize=(out_w, out_h), borderValue=fill)
        else:  # affine is cheaper and exact when the last row is (0, 0, 1)
            im = cv2.warpAffine(im, M[:2], dsize=(out_w, out_h), borderValue=fill)

    n = len(targets)
    if n:
        # Four corners per box → homogeneous (4n, 3) → warped → back to (n, 8) xy pairs.
        corners = np.ones((n * 4, 3))
        corners[:, :2] = targets[:, [1, 2, 3, 4, 1, 4, 3, 2]].reshape(n * 4, 2)  # x1y1 x2y2 x1y2 x2y1
        corners = corners @ M.T
        xy = corners[:, :2] / corners[:, 2:3] if perspective else corners[:, :2]
        xy = xy.reshape(n, 8)
        xs, ys = xy[:, [0, 2, 4, 6]], xy[:, [1, 3, 5, 7]]
        new = np.stack((xs.min(1), ys.min(1), xs.max(1), ys.max(1)), axis=1)
        new[:, [0, 2]] = new[:, [0, 2]].clip(0, out_w)
        new[:, [1, 3]] = new[:, [1, 3]].clip(0, out_h)
        # Compare against the box scaled by s only (not translated) so the area test measures
        # what clipping removed, not what the random zoom did.
        keep = box_candidates(targets[:, 1:5].T * s, new.T, area_thr=0.10)
        targets = np.concatenate((targets[keep, :1], new[keep]), axis=1).astype(np.float32)
    return im, targets


def mosaic4(
    items: Sequence[tuple[np.ndarray, np.ndarray]],
    imgsz: int,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Tile four images around a random centre on a (2·imgsz, 2·imgsz) grey canvas.

    items: four ``(image (h, w, 3) already resized so max(h, w) = imgsz, labels (n, 5) [cls, xc, yc,
    w, h] normalised)``. The centre (xc, yc) is uniform in [imgsz/2, 3·imgsz/2]; image 0 fills the
    quadrant up-left of the centre (its bottom-right corner at the centre), then up-right,
    down-left, down-right; parts falling outside the canvas are cut. Returns ``(canvas, labels (m, 5)
    [cls, x1, y1, x2, y2] in canvas pixels, clipped to the canvas)``; the caller then applies
    :func:`random_perspective` with ``border=(-imgsz // 2, -imgsz // 2)`` to return to imgsz.
    """
    if len(items) != 4:
        raise ValueError(f"mosaic4 needs exactly 4 images, got {len(items)}")
    rng = _rng(rng)
    s = int(imgsz)
    xc, yc = (int(v) for v in rng.uniform(s / 2, 3 * s / 2, 2))
    canvas = np.full((2 * s, 2 * s, items[0][0].shape[2]), PAD_VALUE, dtype=np.uint8)
    all_labels = []
    for k, (img, labels) in enumerate(items):
        h, w = img.shape[:2]
        # Destination rectangle on the canvas (a) and matching source rectangle in the image (b).
        if k == 0:  # up-left
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b = w - (x2a - x1a), h - (y2a - y1a)
        elif k == 1:  # up-right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
            x1b, y1b = 0, h - (y2a - y1a)
        elif k == 2:  # down-left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(yc + h, 2 * s)
            x1b, y1b = w - (x2a - x1a), 0
        else:  # down-right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(yc + h, 2 * s)
            x1b, y1b = 0, 0
        x2b, y2b = x1b + (x2a - x1a), y1b + (y2a - y1a)
        canvas[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
        if len(labels):
            px = labels.copy().astype(np.float32)
            # Image pixel (0, 0) lands at canvas (x1a - x1b, y1a - y1b).
            px[:, 1:] = xywhn2xyxy(labels[:, 1:], w, h, padw=x1a - x1b, padh=y1a - y1b)
            all_labels.append(px)
    out = np.concatenate(all_labels, 0) if all_labels else np.zeros((0, 5), dtype=np.float32)
    np.clip(out[:, 1:], 0, 2 * s, out=out[:, 1:])
    return canvas, out


def mixup(
    im: np.ndarray,
    labels: np.ndarray,
    im2: np.ndarray,
    labels2: np.ndarray,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend two same-size images with a Beta(32, 32) weight (≈0.5) and keep both label sets."""
    r = _rng(rng).beta(32.0, 32.0)
    blended = (im.astype(np.float32) * r + im2.astype(np.float32) * (1.0 - r)).astype(np.uint8)
    return blended, np.concatenate((labels, labels2), 0)


def flip_labels(labels: np.ndarray, lr: bool = False, ud: bool = False) -> np.ndarray:
    """Mirror normalised ``[cls, xc, yc, w, h]`` labels (n, 5) in place for a left-right/up-down flip."""
    if lr and len(labels):
        labels[:, 1] = 1.0 - labels[:, 1]
    if ud and len(labels):
        labels[:, 2] = 1.0 - labels[:, 2]
    return labels
