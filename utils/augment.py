"""Image + box augmentation for detection training, driven by YOLOv5 hyperparameter keys.

Conventions used throughout this module:
- images are HWC uint8 numpy arrays in OpenCV's BGR order (the dataset converts to RGB last);
- pixel-space labels are (n, 5) float arrays ``[cls, x1, y1, x2, y2]``, boxes alone (n, 4) xyxy;
- randomness comes only from the ``numpy.random.Generator`` passed in, so a seeded generator gives
  bit-identical output (the dataset seeds one per item from (seed, epoch, index)).

Hyperparameter keys and the distributions drawn from them (the ones a YOLOv5 hyp file implies):
``degrees`` rotation ~ U(−d, d) degrees; ``scale`` zoom ~ U(1 − s, 1 + s); ``shear`` two shear
angles ~ U(−sh, sh) degrees; ``perspective`` two projective coefficients ~ U(−p, p) per pixel;
``translate`` where the input centre lands ~ U(0.5 − t, 0.5 + t) of the output size per axis;
``hsv_h hsv_s hsv_v`` multiplicative gains ~ U(1 − g, 1 + g) on OpenCV's H, S, V channels;
``mosaic``/``mixup`` probabilities (mixup weight ~ Beta(32, 32)); ``flipud``/``fliplr`` are applied
by the dataset. The draws themselves are not YOLOv5's random stream.

Library choice (measured on this project's CPU, one thread, uint8 BGR, 2·s canvas → s output):
OpenCV's fixed-point ``warpAffine`` takes 0.5 ms at 320 px and 2.4 ms at 640 px, while
``torchvision.transforms.v2.functional.affine`` on a uint8 tensor converts to float and runs
``grid_sample`` (3.5 ms / 26 ms for an s → s warp alone); ``v2.ColorJitter`` costs 8 / 25 ms against
0.5 / 1.5 ms for the HSV lookup table below. So the pixels go through OpenCV and the geometry (the
3×3 matrix, the box corners, the box filter) is composed here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from utils.boxes import xywhn2xyxy

PAD_VALUE = 114  # grey used for letterbox / mosaic / warp borders (the value YOLOv5 models expect)
_FILL = (PAD_VALUE, PAD_VALUE, PAD_VALUE)


def _rng(rng: np.random.Generator | None) -> np.random.Generator:
    return rng if rng is not None else np.random.default_rng()


# ------------------------------------------------------------------------------------------- resizing and letterbox
def resize_to(im: np.ndarray, hw: tuple[int, int], fast: bool = False) -> np.ndarray:
    """Resize an image to ``hw`` = (h, w) with the filter suited to the direction of the change.

    Shrinking (no side grows) averages pixel areas (``INTER_AREA``): it is the anti-aliased filter,
    what validation and inference should see. Growing, or ``fast=True``, is bilinear: augmented
    training images are resampled once more by the warp, so a costlier filter would buy nothing.
    Returns ``im`` itself when the size is unchanged.
    """
    h, w = int(hw[0]), int(hw[1])
    h0, w0 = im.shape[:2]
    if (h, w) == (h0, w0):
        return im
    shrinking = h <= h0 and w <= w0
    interp = cv2.INTER_AREA if shrinking and not fast else cv2.INTER_LINEAR
    return cv2.resize(im, (w, h), interpolation=interp)


def _fit_factors(src_hw: tuple[int, int], box_hw: tuple[int, int], stretch: bool, enlarge: bool) -> tuple[float, float]:
    """(w, h) factors that fit ``src_hw`` inside ``box_hw``: one common factor (at most 1 unless
    ``enlarge``), or each axis's own when stretching."""
    if stretch:
        return box_hw[1] / src_hw[1], box_hw[0] / src_hw[0]
    factor = min(box_hw[0] / src_hw[0], box_hw[1] / src_hw[1], math.inf if enlarge else 1.0)
    return factor, factor


def _fitted_hw(src_hw: tuple[int, int], factors: tuple[float, float]) -> tuple[int, int]:
    """``src_hw`` scaled by ``factors`` (w, h), each side rounded to whole pixels (at least 1)."""
    return max(round(src_hw[0] * factors[1]), 1), max(round(src_hw[1] * factors[0]), 1)


def letterbox(
    im: np.ndarray,
    new_shape: int | tuple[int, int] = 640,
    color: tuple[int, int, int] = _FILL,
    auto: bool = False,
    scale_fill: bool = False,
    scaleup: bool = True,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """Resize keeping the aspect ratio, then pad to ``new_shape`` = (h, w) (an int means square).

    ``auto`` pads only up to the next multiple of ``stride`` (minimum rectangle) instead of the full
    shape; ``scale_fill`` stretches without padding; ``scaleup=False`` never enlarges (validation).
    Returns ``(image (H, W, 3), (rw, rh), (padw, padh))``: the scale factors as computed, before the
    resized sides were rounded to whole pixels (one factor for both axes unless ``scale_fill``), and
    half the spare columns / rows: the image starts at ⌊padw⌋, ⌊padh⌋, but an odd spare gives x.5. Both
    are what YOLOv5's loader scales labels by and records for mapping predictions back (measured: a
    side rounded from 177.45 to 177 px still scales labels by the unrounded factor), so
    ``x' = x * rw + padw`` puts labels where it puts them.
    """
    box_hw = (new_shape, new_shape) if isinstance(new_shape, int) else (int(new_shape[0]), int(new_shape[1]))
    src_hw = im.shape[:2]
    factors = _fit_factors(src_hw, box_hw, stretch=scale_fill, enlarge=scaleup)
    fit_hw = _fitted_hw(src_hw, factors)
    im = resize_to(im, fit_hw, fast=True)  # bilinear either way, as YOLOv5's letterbox: detect.py's pixels
    spare = np.subtract(box_hw, fit_hw)  # (rows, cols) of padding to add
    if auto and not scale_fill:
        spare %= stride
    before = spare // 2
    after = spare - before
    if spare.any():
        im = cv2.copyMakeBorder(im, int(before[0]), int(after[0]), int(before[1]), int(after[1]),
                                cv2.BORDER_CONSTANT, value=color)
    return im, factors, (float(spare[1]) / 2, float(spare[0]) / 2)


def letterbox_input(
    im_bgr: np.ndarray, shape: tuple[int, int], auto: bool = False, stride: int = 32
) -> tuple[np.ndarray, tuple[int, int]]:
    """A BGR uint8 (h0, w0, 3) picture as model input: the one letterbox-to-tensor conversion.

    Returns float32 (1, 3, h, w) RGB in 0-1 and the letterboxed (h, w); :func:`utils.boxes.scale_boxes`
    maps boxes back from the two shapes, as YOLOv5's detect.py does.
    """
    boxed = letterbox(im_bgr, shape, auto=auto, stride=stride)[0]
    chw = boxed[..., ::-1].transpose(2, 0, 1)  # BGR HWC -> RGB CHW
    return np.ascontiguousarray(chw, dtype=np.float32)[None] / 255.0, boxed.shape[:2]


# ----------------------------------------------------------------------------------------------------------- colour
def hsv_table(gains: Sequence[float]) -> np.ndarray:
    """(1, 256, 3) uint8 lookup table multiplying OpenCV's H, S, V channels by ``gains``.

    Hue lives on a circle of 180 values in OpenCV's 8-bit HSV, so it wraps; S and V saturate at 255.
    """
    table = np.arange(256, dtype=np.float32)[:, None] * np.asarray(gains, dtype=np.float32)
    table[:, 0] %= 180.0
    return np.clip(table, 0, 255).astype(np.uint8)[None]


def jitter_hsv(
    im: np.ndarray, hgain: float = 0.5, sgain: float = 0.5, vgain: float = 0.5, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Multiply hue, saturation and value of a BGR uint8 image by gains drawn in ``1 ± gain``.

    One three-channel lookup on the HSV image (no split/merge). Writes into ``im`` (which must be
    C-contiguous) and returns it; all gains zero leaves it untouched.
    """
    if not (hgain or sgain or vgain):
        return im
    gains = 1.0 + _rng(rng).uniform(-1.0, 1.0, 3) * (hgain, sgain, vgain)
    hsv = cv2.cvtColor(im, cv2.COLOR_BGR2HSV)
    cv2.LUT(hsv, hsv_table(gains), dst=hsv)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=im)


def mixup(
    im: np.ndarray,
    labels: np.ndarray,
    im2: np.ndarray,
    labels2: np.ndarray,
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """MixUp (Zhang et al. 2018): ``λ·im + (1 − λ)·im2`` with λ ~ Beta(32, 32) (≈ 0.5), both label sets."""
    lam = float(_rng(rng).beta(32.0, 32.0))
    return cv2.addWeighted(im, lam, im2, 1.0 - lam, 0.0), np.concatenate((labels, labels2), 0)


# ----------------------------------------------------- geometry: one sampled warp, its 3×3 matrix, boxes through it
@dataclass(frozen=True)
class WarpParams:
    """One draw of the geometric augmentation (all defaults = identity about the centre).

    angle: degrees, counter-clockwise as seen on screen; zoom: isotropic factor; shear: (x, y)
    angles in degrees (x' grows with y by tan(sx), y' with x by tan(sy)); tilt: (px, py) projective
    coefficients per pixel from the centre; anchor: (x, y) fraction of the output where the input
    centre lands.
    """

    angle: float = 0.0
    zoom: float = 1.0
    shear: tuple[float, float] = (0.0, 0.0)
    tilt: tuple[float, float] = (0.0, 0.0)
    anchor: tuple[float, float] = (0.5, 0.5)

    @property
    def area_gain(self) -> float:
        """Factor the warp scales areas by: det of rotation·zoom (zoom²) × det of the shear.

        The tilt is left out: at most ``perspective`` per pixel from the centre (≤ 0.001 in YOLOv5's
        hyps), a few percent at the edges.
        """
        tx, ty = (math.tan(math.radians(a)) for a in self.shear)
        return self.zoom**2 * abs(1.0 - tx * ty)

    @classmethod
    def sample(
        cls,
        rng: np.random.Generator,
        degrees: float = 0.0,
        translate: float = 0.0,
        scale: float = 0.0,
        shear: float = 0.0,
        perspective: float = 0.0,
    ) -> WarpParams:
        """Draw each parameter uniformly from the range its YOLOv5 hyp key sets (module docstring)."""
        u = rng.uniform(-1.0, 1.0, 8)  # one draw for all eight numbers: a fixed stream layout
        return cls(
            angle=float(u[0] * degrees),
            zoom=float(1.0 + u[1] * scale),
            shear=(float(u[2] * shear), float(u[3] * shear)),
            tilt=(float(u[4] * perspective), float(u[5] * perspective)),
            anchor=(float(0.5 + u[6] * translate), float(0.5 + u[7] * translate)),
        )


def _shift(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def _rotate_zoom(angle_deg: float, zoom: float) -> np.ndarray:
    # With y pointing down, a counter-clockwise turn on screen is [[c, s], [−s, c]].
    c, s = zoom * math.cos(math.radians(angle_deg)), zoom * math.sin(math.radians(angle_deg))
    return np.array([[c, s, 0.0], [-s, c, 0.0], [0.0, 0.0, 1.0]])


def _skew(sx_deg: float, sy_deg: float) -> np.ndarray:
    return np.array([[1.0, math.tan(math.radians(sx_deg)), 0.0], [math.tan(math.radians(sy_deg)), 1.0, 0.0],
                     [0.0, 0.0, 1.0]])


def _tilt(px: float, py: float) -> np.ndarray:
    # w = 1 + px·x + py·y: the origin (the image centre at this stage) is a fixed point.
    return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [px, py, 1.0]])


def warp_matrix(p: WarpParams, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> np.ndarray:
    """3×3 homography taking source pixels to output pixels for the draw ``p``.

    Read right to left, a point is: moved so the source centre is the origin (rotation, zoom and
    tilt then act about the centre), rotated and zoomed, sheared in that rotated frame, given the
    projective tilt (a camera tilt of the already-rotated picture; the centre stays put), and last
    moved to ``anchor`` × output size, so the translate draw is exactly where the centre lands.
    With zero tilt the last row is (0, 0, 1) and the map is affine.
    """
    (sh, sw), (dh, dw) = src_hw, dst_hw
    steps = [
        _shift(p.anchor[0] * dw, p.anchor[1] * dh),
        _tilt(*p.tilt),
        _skew(*p.shear),
        _rotate_zoom(p.angle, p.zoom),
        _shift(-sw / 2, -sh / 2),
    ]
    return np.linalg.multi_dot(steps)


def warp_boxes(boxes: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Enclosing xyxy boxes (n, 4) of the four warped corners of each box (n, 4), not clipped."""
    if not len(boxes):
        return np.zeros((0, 4))
    xs = boxes[:, None, 0::2]  # (n, 1, 2): x1, x2
    ys = boxes[:, 1::2, None]  # (n, 2, 1): y1, y2
    corners = np.stack(np.broadcast_arrays(xs, ys), axis=-1).reshape(-1, 1, 2)  # every x with every y
    moved = cv2.perspectiveTransform(corners.astype(np.float64), m).reshape(-1, 4, 2)
    return np.concatenate((moved.min(axis=1), moved.max(axis=1)), axis=1)


def keep_visible(
    clipped: np.ndarray,
    expected_area: np.ndarray,
    min_side: float = 2.0,
    max_aspect: float = 100.0,
    min_visible: float = 0.1,
) -> np.ndarray:
    """Which warped boxes stay labels: bool (n,) from the clipped xyxy boxes (n, 4) and the areas (n,)
    the objects would cover after the warp if nothing were cut (:attr:`WarpParams.area_gain` × area).

    A box stays when both sides exceed ``min_side`` pixels (smaller ones are noise to the loss), its
    long side is under ``max_aspect`` × its short side (slivers left by clipping), and its area is
    over ``min_visible`` of the expected area (an object mostly outside the picture is not
    labelled). Zero-size boxes never stay. With no shear the expected area is zoom² × the area
    before, as in YOLOv5's rule.
    """
    seen = clipped[:, 2:] - clipped[:, :2]
    short, long = seen.min(axis=1), seen.max(axis=1)
    return (short > min_side) & (long < max_aspect * short) & (seen.prod(axis=1) > min_visible * expected_area)


def warp_image(im: np.ndarray, m: np.ndarray, dst_hw: tuple[int, int]) -> np.ndarray:
    """Warp with bilinear sampling and grey borders; affine when the matrix allows it (cheaper)."""
    dsize = (int(dst_hw[1]), int(dst_hw[0]))
    if m[2, 0] or m[2, 1]:
        return cv2.warpPerspective(im, m, dsize, flags=cv2.INTER_LINEAR, borderValue=_FILL)
    return cv2.warpAffine(im, m[:2], dsize, flags=cv2.INTER_LINEAR, borderValue=_FILL)


def random_warp(
    im: np.ndarray,
    labels: np.ndarray | None,
    rng: np.random.Generator | None = None,
    out_hw: tuple[int, int] | None = None,
    degrees: float = 0.0,
    translate: float = 0.0,
    scale: float = 0.0,
    shear: float = 0.0,
    perspective: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Random rotation/zoom/shear/tilt/translation of an image and its boxes (ranges: module docstring).

    im: (H, W, 3); labels: (n, 5) ``[cls, x1, y1, x2, y2]`` pixels. ``out_hw`` (default: the input
    size) is the output size; mosaic passes (s, s) to take its 2·s canvas back to s. Boxes become
    the enclosure of their warped corners, clipped to the output and filtered by
    :func:`keep_visible` against their area × :attr:`WarpParams.area_gain`. Returns ``(image,
    labels (m, 5) float32)``; an identity draw returns the input image itself.
    """
    labels = np.zeros((0, 5), np.float32) if labels is None else labels
    src_hw = im.shape[:2]
    dst_hw = src_hw if out_hw is None else (int(out_hw[0]), int(out_hw[1]))
    draw = WarpParams.sample(_rng(rng), degrees, translate, scale, shear, perspective)
    m = warp_matrix(draw, src_hw, dst_hw)
    if dst_hw != src_hw or not np.allclose(m, np.eye(3)):
        im = warp_image(im, m, dst_hw)
    if len(labels):
        boxes = labels[:, 1:5].astype(np.float64)
        clipped = np.clip(warp_boxes(boxes, m), 0, (dst_hw[1], dst_hw[0], dst_hw[1], dst_hw[0]))
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = keep_visible(clipped, area * draw.area_gain)
        labels = np.column_stack((labels[keep, 0], clipped[keep])).astype(np.float32)
    return im, labels


# ----------------------------------------------------------------------------------------------------------- mosaic
# Tile k's direction from the centre, (x sign, y sign): up-left, up-right, down-left, down-right.
TILE_SIGNS = tuple((sx, sy) for sy in (-1, 1) for sx in (-1, 1))


def tile_origins(centre: tuple[int, int], tile_wh: Sequence[tuple[int, int]]) -> np.ndarray:
    """Top-left canvas corners (4, 2) int (x, y) of four tiles meeting at ``centre`` = (x, y).

    Each tile extends away from the centre along its :data:`TILE_SIGNS` direction, so its corner
    nearest the centre is the centre: a negative sign puts the tile's far edge at centre − size.
    """
    size = np.asarray(tile_wh, dtype=np.int64).reshape(4, 2)
    backwards = np.asarray(TILE_SIGNS) < 0
    return np.asarray(centre, dtype=np.int64) - size * backwards


def paste(canvas: np.ndarray, im: np.ndarray, origin: tuple[int, int]) -> None:
    """Copy ``im`` onto ``canvas`` with its top-left pixel at ``origin`` = (x, y); what falls outside is cut."""
    x0, y0 = int(origin[0]), int(origin[1])
    h, w = im.shape[:2]
    top, left = max(y0, 0), max(x0, 0)
    bottom, right = min(y0 + h, canvas.shape[0]), min(x0 + w, canvas.shape[1])
    if bottom > top and right > left:
        canvas[top:bottom, left:right] = im[top - y0:bottom - y0, left - x0:right - x0]


def mosaic4(
    items: Sequence[tuple[np.ndarray, np.ndarray]],
    imgsz: int,
    rng: np.random.Generator | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Four images meeting at a random centre on a (2·imgsz, 2·imgsz) grey canvas (Bochkovskiy et al. 2020).

    items: four ``(image (h, w, 3) already resized so max(h, w) = imgsz, labels (n, 5) [cls, xc, yc,
    w, h] normalised)``, placed up-left, up-right, down-left, down-right of the centre (x, y) drawn
    uniformly in [imgsz/2, 3·imgsz/2) (see :func:`tile_origins`); what falls off the canvas is cut.
    ``out``: an optional (2·imgsz, 2·imgsz, 3) uint8 buffer to reuse (it is overwritten). Returns
    ``(canvas, labels (m, 5) [cls, x1, y1, x2, y2] in canvas pixels, clipped to the canvas)``; the
    caller then applies :func:`random_warp` with ``out_hw=(imgsz, imgsz)``.
    """
    if len(items) != 4:
        raise ValueError(f"mosaic4 needs exactly 4 images, got {len(items)}")
    side = 2 * int(imgsz)
    shape = (side, side, items[0][0].shape[2])
    if out is not None and out.shape == shape and out.dtype == np.uint8:
        canvas = out
        canvas.fill(PAD_VALUE)
    else:
        canvas = np.full(shape, PAD_VALUE, dtype=np.uint8)
    centre = _rng(rng).uniform(imgsz / 2, 3 * imgsz / 2, 2).astype(np.int64)
    origins = tile_origins(centre, [(im.shape[1], im.shape[0]) for im, _ in items])
    placed = []
    for (im, lb), (x0, y0) in zip(items, origins):
        paste(canvas, im, (x0, y0))
        if len(lb):
            h, w = im.shape[:2]
            px = np.empty((len(lb), 5), np.float32)
            px[:, 0] = lb[:, 0]
            px[:, 1:] = xywhn2xyxy(lb[:, 1:], w, h, padw=x0, padh=y0)
            placed.append(px)
    labels = np.concatenate(placed, 0) if placed else np.zeros((0, 5), np.float32)
    np.clip(labels[:, 1:], 0, side, out=labels[:, 1:])
    return canvas, labels


def flip_labels(labels: np.ndarray, lr: bool = False, ud: bool = False) -> np.ndarray:
    """Mirror normalised ``[cls, xc, yc, w, h]`` labels (n, 5) in place for a left-right/up-down flip."""
    if lr and len(labels):
        labels[:, 1] = 1.0 - labels[:, 1]
    if ud and len(labels):
        labels[:, 2] = 1.0 - labels[:, 2]
    return labels
