"""Box formats, clipping, letterbox undo and non-maximum suppression.

Formats: ``xyxy`` = (x1, y1, x2, y2) corners; ``xywh`` = (xc, yc, w, h) centre and size; the ``n``
suffix means normalised to 0-1 by the image width/height. The converters take torch tensors or
numpy arrays of shape (..., 4) and return a new object of the same kind (one formula for both: a box
is split into its two 2-vectors, centre/half-size or the two corners).

NMS runs torchvision's compiled kernel (``torch.ops.torchvision.nms``, CPU and CUDA), loaded without
importing the torchvision package: that import costs ~1.8 s on a 2-core box (torchvision.ops imports
torch._dynamo), a fifth of val.py's wall time on 150 images, and nothing on the inference path needs
more of torchvision than this kernel. The conversions are a line of tensor arithmetic each, so
val.py, detect.py and this module never import torchvision (``tests/test_boxes.py`` checks both, and
checks every result against ``torchvision.ops``: box ops equal, NMS equal to its ``nms`` per class).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ArrayLike = torch.Tensor | np.ndarray


# ------------------------------------------------------------------------------ helpers
def _join(parts: tuple[ArrayLike, ...], like: ArrayLike) -> ArrayLike:
    """Concatenate along the last axis, as tensors or as arrays (the kind of ``like``)."""
    return torch.cat(parts, -1) if isinstance(like, torch.Tensor) else np.concatenate(parts, axis=-1)


def _per_axis(like: ArrayLike, x: float, y: float) -> ArrayLike:
    """The 4-vector (x, y, x, y) as the same kind, dtype and device as ``like``: it broadcasts over xyxy."""
    if isinstance(like, torch.Tensor):
        return torch.tensor((x, y, x, y), dtype=like.dtype, device=like.device)
    return np.array((x, y, x, y), dtype=like.dtype if np.issubdtype(like.dtype, np.floating) else np.float64)


# ------------------------------------------------------------------------------ conversions
def xywh2xyxy(x: ArrayLike) -> ArrayLike:
    """(xc, yc, w, h) → (x1, y1, x2, y2); shape (..., 4): corners = centre ∓ size/2."""
    centre, half = x[..., :2], x[..., 2:4] / 2
    return _join((centre - half, centre + half), x)


def xyxy2xywh(x: ArrayLike) -> ArrayLike:
    """(x1, y1, x2, y2) → (xc, yc, w, h); shape (..., 4): centre = mean of the corners, size = their difference."""
    lo, hi = x[..., :2], x[..., 2:4]
    return _join(((lo + hi) / 2, hi - lo), x)


def xywhn2xyxy(x: ArrayLike, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> ArrayLike:
    """Normalised (xc, yc, w, h) → pixel (x1, y1, x2, y2) in a w×h image placed at offset (padw, padh).

    corners_px = corners_normalised · (w, h) + (padw, padh).
    """
    return xywh2xyxy(x) * _per_axis(x, w, h) + _per_axis(x, padw, padh)


def xyxy2xywhn(x: ArrayLike, w: float, h: float, clip: bool = False, eps: float = 0.0) -> ArrayLike:
    """Pixel (x1, y1, x2, y2) → normalised (xc, yc, w, h) for a w×h image.

    With ``clip`` the corners are first clipped to the image shrunk by ``eps`` on the far sides,
    (0..w − eps, 0..h − eps), so a box touching the edge stays strictly inside after normalising.
    """
    if clip:
        x = clip_boxes(x, (h - eps, w - eps))
    return xyxy2xywh(x) / _per_axis(x, w, h)


def clip_boxes(boxes: ArrayLike, shape: tuple[int | float, int | float]) -> ArrayLike:
    """xyxy boxes clipped to an image of ``shape`` = (height, width): x into [0, w], y into [0, h].

    Returns a new tensor/array (the input is not modified).
    """
    limit = _per_axis(boxes, shape[1], shape[0])  # (w, h, w, h)
    if isinstance(boxes, torch.Tensor):
        return boxes.clamp(limit.new_zeros(()), limit)  # torch's clamp takes both bounds as tensors or neither
    return np.clip(boxes, 0, limit)


def scale_boxes(
    img1_shape: tuple[int, int],
    boxes: ArrayLike,
    img0_shape: tuple[int, int],
    ratio_pad: tuple | None = None,
) -> ArrayLike:
    """Map xyxy boxes from a letterboxed image (``img1_shape`` = (h, w)) back to the original (``img0_shape``).

    A letterbox maps original pixels p0 to p1 = p0·scale + pad, so p0 = (p1 − pad) / scale, then the
    result is clipped to the original image. ``ratio_pad`` = ((scale_y, scale_x), (pad_x, pad_y)) as
    the loader records it; when omitted the letterbox is recomputed from the two shapes: one scale
    min(h1/h0, w1/w0) and the padding split evenly on both sides. Returns new boxes.
    """
    if ratio_pad is None:  # a letterbox keeps the aspect ratio: one scale for both axes
        (h1, w1), (h0, w0) = img1_shape[:2], img0_shape[:2]
        scale = min(h1 / h0, w1 / w0)
        ratio_pad = ((scale, scale), ((w1 - w0 * scale) / 2, (h1 - h0 * scale) / 2))
    (scale_y, scale_x), (pad_x, pad_y) = ratio_pad
    unpadded = boxes - _per_axis(boxes, pad_x, pad_y)
    return clip_boxes(unpadded / _per_axis(boxes, scale_x, scale_y), img0_shape)


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 4) xyxy → (N,) width × height."""
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (N, 4) × (M, 4) → (N, M), in their dtype.

    IoU = |A ∩ B| / (|A| + |B| − |A ∩ B|); the intersection is the (possibly empty) box between
    the larger top-left and the smaller bottom-right corner.
    """
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])  # (N, M, 2)
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    size = (bottom_right - top_left).clamp(min=0)
    inter = size[..., 0] * size[..., 1]
    return inter / (box_area(boxes1)[:, None] + box_area(boxes2)[None, :] - inter)


# ------------------------------------------------------------------------------ the NMS kernel
_KERNEL_LIBRARIES = ("_C_stable", "_C")  # torchvision's compiled extension: newer / older name


def _load_torchvision_kernels() -> None:
    """Load torchvision's compiled extension into ``torch.ops`` without running its package.

    ``torch.ops.load_library`` is how torchvision's own ``__init__`` loads the same file, so a later
    ``import torchvision`` finds it loaded (the dynamic loader hands back the same handle). Silent when
    the file is not found or does not load: the caller then imports the package.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    folder = Path(next(iter(spec.submodule_search_locations)))
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    files = (folder / (name + suffix) for name in _KERNEL_LIBRARIES for suffix in suffixes)
    found = next((f for f in files if f.is_file()), None)
    if found is not None:
        with contextlib.suppress(OSError, RuntimeError):
            torch.ops.load_library(str(found))


def _has_nms_kernel() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018  (an unregistered op raises on attribute access)
    except (AttributeError, RuntimeError):
        return False
    return True


@functools.cache
def nms_kernel() -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """``torch.ops.torchvision.nms(boxes (N, 4) xyxy, scores (N,), iou_thres) -> kept indices``, best first.

    Greedy NMS (the op behind ``torchvision.ops.nms``), loaded as the module docstring says; when the
    extension file cannot be loaded directly, importing torchvision registers it.
    """
    if "torchvision" not in sys.modules and not _has_nms_kernel():
        _load_torchvision_kernels()
    if not _has_nms_kernel():
        import torchvision  # noqa: F401  (registers torch.ops.torchvision.*)
    return torch.ops.torchvision.nms


# One kernel call costs about as much as comparing this many box pairs (CPU, measured with the
# kernel on 15-5000 boxes): it prices the per-class loop's extra calls against the pairs it saves.
_PAIRS_PER_CALL = 35_000


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou_thres: float) -> torch.Tensor:
    """Greedy NMS within each class: indices of the kept boxes, highest score first.

    boxes (N, 4) xyxy, scores (N,), classes (N,) integer ids → (K,) long: exactly NMS run on each
    class alone. (``torchvision.ops.batched_nms`` means the same, but for up to 1000 boxes it shifts
    class c by c·(max coordinate + 1), which lets classes overlap when the coordinates are negative,
    as pre-clip predictions at the image's left/top edge are.) The kernel compares every pair it is
    given, so the work is done whichever way is cheaper: one call per class (Σ n_c² pairs plus a
    call's overhead per class: few crowded classes) or :func:`_nms_shifted_classes` (N² pairs in
    one call: many classes with few boxes each).
    """
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    if boxes.shape[0] ** 2 <= _PAIRS_PER_CALL:  # cheaper than even one extra call: no need to count
        return _nms_shifted_classes(boxes, scores, classes, iou_thres)
    order = classes.argsort(stable=True)
    counts = torch.unique_consecutive(classes[order], return_counts=True)[1]
    per_class_cost = int((counts * counts).sum()) + _PAIRS_PER_CALL * len(counts)
    if per_class_cost >= boxes.shape[0] ** 2:
        return _nms_shifted_classes(boxes, scores, classes, iou_thres)
    nms = nms_kernel()
    kept = torch.cat([group[nms(boxes[group], scores[group], iou_thres)] for group in order.split(counts.tolist())])
    return kept[scores[kept].argsort(descending=True, stable=True)]


def _nms_shifted_classes(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
                         iou_thres: float) -> torch.Tensor:
    """Class-aware NMS in one kernel call: class c moves to x + c·span, y + c·span with an integer
    span larger than every box extent, so boxes of different classes never overlap.

    The shift is done in float64, which holds a float32 coordinate plus an integer shift below 2^29
    to 2^-24 px: within a class the geometry is the unshifted one, and the decisions are those of
    NMS per class in float32 except for a pair whose IoU lies within float32 rounding (~1e-7) of
    ``iou_thres``.
    """
    exact = boxes.double()
    span = (exact.max() - exact.min()).floor() + 2  # a 0-d tensor: no device sync on CUDA
    shifted = exact + (classes.to(exact) * span)[:, None]
    return nms_kernel()(shifted, scores.double(), iou_thres)


# ------------------------------------------------------------------------------ NMS
def _nms_candidates(
    pred: torch.Tensor, conf_thres: float, multi_label: bool, classes: list[int] | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (box, class) pairs of one image that enter NMS.

    ``pred`` (N, 5 + nc): xywh pixels, objectness, class probabilities. A pair's score is
    obj · p(class). A box proposes every class scoring above ``conf_thres`` (``multi_label``) or
    only its best class, and only if that scores above the threshold; ``classes`` then keeps the
    pairs of the listed classes (a box whose best class is not listed proposes nothing in
    single-label mode). Returns xyxy boxes (M, 4), scores (M,) and class ids (M,) long, pairs
    ordered by box then class.
    """
    # score ≤ objectness (class probabilities are ≤ 1): drop low-objectness rows before any product
    pred = pred[pred[:, 4] > conf_thres]
    obj = pred[:, 4:5]
    scores = pred[:, 5:] * obj if pred.shape[1] > 5 else obj  # (n, max(nc, 1))
    proposes = scores > conf_thres
    if not multi_label and scores.shape[1] > 1:
        best = scores.argmax(1, keepdim=True)
        proposes &= torch.zeros_like(proposes).scatter_(1, best, True)
    if classes is not None:
        allowed = torch.zeros(scores.shape[1], dtype=torch.bool, device=scores.device)
        allowed[[c for c in classes if 0 <= c < scores.shape[1]]] = True
        proposes &= allowed
    row, cls = proposes.nonzero(as_tuple=True)
    return xywh2xyxy(pred[row, :4]), scores[row, cls], cls


def _first_kept(boxes: torch.Tensor, scores: torch.Tensor, cls: torch.Tensor, iou_thres: float,
                max_det: int) -> torch.Tensor:
    """``batched_nms(boxes, scores, cls, iou_thres)[:max_det]``, computed on a score prefix when it can be.

    Greedy NMS decides a box from the higher-scoring boxes only, so NMS over the k best candidates
    keeps exactly the full run's kept boxes among those k. Once that yields ``max_det`` boxes they
    are the answer; otherwise k grows ×4 (total work ≤ 4/3 of one full run). Pays off where NMS
    cost is highest: thousands of candidates at conf 0.001 (validation, early epochs).
    """
    prefix = 4 * max_det
    while 0 < prefix < scores.numel():
        top = scores.topk(prefix).indices  # (prefix,) best first
        keep = batched_nms(boxes[top], scores[top], cls[top], iou_thres)
        if keep.numel() >= max_det:
            return top[keep[:max_det]]
        prefix *= 4
    return batched_nms(boxes, scores, cls, iou_thres)[:max_det]


def non_max_suppression(
    prediction: torch.Tensor,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: list[int] | None = None,
    multi_label: bool = False,
    max_det: int = 300,
    max_nms: int = 30000,
    agnostic: bool = False,
) -> list[torch.Tensor]:
    """Class-aware NMS over decoded YOLO outputs (``agnostic``: boxes of any classes suppress each other).

    prediction: (bs, N, 5 + nc) with xywh pixels, objectness and class probabilities (sigmoid), or
    an eval-mode model output (decoded, raw) whose first element is that. Score = objectness ×
    class probability. With ``multi_label`` every class whose score passes ``conf_thres`` yields its
    own candidate (as YOLOv5 validation does); otherwise only the best class. At most ``max_nms``
    best-scoring candidates enter :func:`batched_nms` (suppression within each class).
    Returns one (n, 6) tensor per image: x1, y1, x2, y2, score, class; at most ``max_det`` rows,
    highest score first.
    """
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"conf_thres={conf_thres} and iou_thres={iou_thres} must lie in [0, 1]")
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]
    out: list[torch.Tensor] = []
    for image_pred in prediction:
        boxes, scores, cls = _nms_candidates(image_pred, conf_thres, multi_label, classes)
        if scores.numel() > max_nms:  # bound NMS time on untrained models
            top = scores.topk(max_nms).indices
            boxes, scores, cls = boxes[top], scores[top], cls[top]
        groups = torch.zeros_like(cls) if agnostic else cls
        keep = _first_kept(boxes.float(), scores.float(), groups, iou_thres, max_det)
        out.append(torch.cat((boxes[keep], scores[keep, None], cls[keep, None].to(boxes.dtype)), 1))
    return out
