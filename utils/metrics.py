"""Detection metrics: detection/label matching, per-class AP, P/R at the best F1, fitness, confusion matrix.

Two conventions, selected by name (``"yolov5"`` is the default everywhere):

``"yolov5"`` — the figures YOLOv5 7.0's val.py prints (REFERENCE §4, checked against it as an
oracle: tests/test_metrics_oracle.py).
  Matching at IoU threshold t: a detection only pairs with labels of its own class; it points at
  the label it overlaps most and is a candidate for that label when the IoU is >= t. Each label
  accepts its highest-confidence candidate; the others are false positives (they do not fall back
  to another label).
  AP: the precision/recall sequence of the detections (descending confidence) gets the end points
  (recall 0, precision 1) before and (recall 1, precision 0) after; the precision envelope is
  sampled by linear interpolation at recall 0, 0.01, ..., 1 and integrated with the trapezoid rule
  (so a perfect detector scores 0.995: the last 0.01 of recall is a triangle).
  Left as they are on purpose: IoU is float64 (a pair within ~1e-7 of a threshold could fall the
  other way in float32) and detections with exactly equal scores keep their input order (image
  order, then NMS order) where a non-stable sort would shuffle them.
``"coco"`` — pycocotools' rules, for cross-checks (the COCO figure itself comes from pycocotools,
  ``val.py --save-json``). Matching: detections by descending confidence each take the still
  unmatched same-class label they overlap most (IoU >= t). AP: the mean of the envelope at the 101
  recall points, 0 at recall points never reached.

Both: IoU thresholds 0.50:0.05:0.95; detections pooled over images; only classes with labels are
scored. P and R per class are read at the confidence threshold where the mean F1 over classes
(IoU 0.5), smoothed by a moving average over a tenth of the confidence axis, peaks; P/R versus
confidence are the detection-level precision/recall sequences interpolated linearly in confidence.

Size: both conventions side by side (matching, AP, P/R, confusion matrix), so a difference between
them is visible in one file; the oracle test pins them together.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from utils.boxes import box_iou

Convention = Literal["yolov5", "coco"]
CONVENTIONS = ("yolov5", "coco")

# np.linspace rather than arange so the floats are bit-identical to those pycocotools compares with
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
CONF_POINTS = np.linspace(0.0, 1.0, 1000)  # x axis of the P/R/F1-versus-confidence curves


def fitness(map50: float, map5095: float) -> float:
    """Model selection score: 0.1·mAP50 + 0.9·mAP50-95."""
    return 0.1 * float(map50) + 0.9 * float(map5095)


def _check_convention(convention: str) -> None:
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}: use one of {', '.join(CONVENTIONS)}")


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


# ------------------------------------------------------------------------------------------ matching
def same_class_iou(detections: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(n, m) float64 IoU of detections × labels, -1 where their classes differ.

    detections: (n, 6) x1, y1, x2, y2, conf, cls; labels: (m, 5) cls, x1, y1, x2, y2. Float64, as
    pycocotools computes, so a pair sitting on a threshold lands on the same side in both.
    """
    iou = box_iou(detections[:, :4].double(), labels[:, 1:5].double()).cpu().numpy()
    same = _as_numpy(detections[:, 5])[:, None] == _as_numpy(labels[:, 0])[None, :]
    return np.where(same, iou, -1.0)


def _confidence_rank(conf: np.ndarray) -> np.ndarray:
    """Indices best first; equal scores keep their input order (NMS output order)."""
    return np.argsort(-conf, kind="stable")


def match_to_preferred_label(iou: np.ndarray, conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The ``"yolov5"`` matching rule. iou: (n, m) from :func:`same_class_iou`; conf: (n,);
    thresholds: (T,). Returns (n, T) bool.

    Each detection's preferred label and its IoU do not depend on the threshold, so the rule comes
    down to: at threshold t, a label's true positive is the first detection, in confidence order,
    among those that prefer it with IoU >= t. Detections are visited grouped by preferred label
    (best-ranked first inside a group); a running count of candidates, restarted at every group,
    is 1 exactly at that first one. Integer counts, so a pair exactly on a threshold is never lost.
    """
    n = iou.shape[0]
    preferred = iou.argmax(1)
    best = iou[np.arange(n), preferred]  # -1: no label of the detection's class
    rank = _confidence_rank(conf)
    visit = rank[np.argsort(preferred[rank], kind="stable")]
    group = preferred[visit]
    candidate = best[visit][:, None] >= thresholds[None, :]  # (n, T)
    running = np.cumsum(candidate, axis=0)
    new_group = np.r_[True, group[1:] != group[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    before_group = running[group_start] - candidate[group_start]  # candidates of earlier groups
    hit = candidate & (running - before_group == 1)
    out = np.empty_like(hit)
    out[visit] = hit
    return out


def match_in_confidence_order(iou: np.ndarray, conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The ``"coco"`` matching rule (pycocotools). Shapes as :func:`match_to_preferred_label`.

    A loop over detections (best first), each step vectorised over the thresholds: the detection
    takes, per threshold, the most-overlapping label not yet taken at that threshold.
    """
    T, m = thresholds.size, iou.shape[1]
    taken = np.zeros((T, m), dtype=bool)
    out = np.zeros((iou.shape[0], T), dtype=bool)
    reach = iou[:, None, :] >= thresholds[None, :, None]  # (n, T, m)
    for d in _confidence_rank(conf):
        free = np.where(reach[d] & ~taken, iou[d][None, :], -np.inf)  # (T, m)
        pick = free.argmax(1)
        ok = np.isfinite(free[np.arange(T), pick])
        taken[np.flatnonzero(ok), pick[ok]] = True
        out[d] = ok
    return out


_MATCHERS = {"yolov5": match_to_preferred_label, "coco": match_in_confidence_order}


def match_predictions(
    detections: torch.Tensor,
    labels: torch.Tensor,
    iou_thresholds: np.ndarray | torch.Tensor = IOU_THRESHOLDS,
    convention: Convention = "yolov5",
) -> torch.Tensor:
    """Mark each detection as a true positive or not at every IoU threshold of one image.

    detections: (n, 6) x1, y1, x2, y2, conf, cls; labels: (m, 5) cls, x1, y1, x2, y2 in the same
    pixel space. Returns (n, T) bool on the detections' device. ``convention``: see the module
    docstring. The rules differ only where several detections overlap one label well.
    """
    _check_convention(convention)
    thresholds = _as_numpy(iou_thresholds).astype(np.float64).reshape(-1)
    n, m = detections.shape[0], labels.shape[0]
    if n == 0 or m == 0:
        return torch.zeros((n, thresholds.size), dtype=torch.bool, device=detections.device)
    iou = same_class_iou(detections, labels)
    hit = _MATCHERS[convention](iou, _as_numpy(detections[:, 4]).astype(np.float64), thresholds)
    return torch.from_numpy(hit).to(detections.device)


def greedy_match(scores: np.ndarray) -> np.ndarray:
    """One-to-one greedy assignment by descending score, batched over a leading dimension.

    scores: (B, n, m) pair scores (IoU); entries < 0 mark forbidden pairs.
    Returns (B, n) int64: the matched column for each row, or -1.

    Sequential greedy (take the best remaining pair, drop its row and column, repeat) is equivalent
    to repeatedly taking every pair that is the best of both its row and its column: such a pair
    would be reached by the sequential pass before any competing pair. Each round is a few array
    ops over all B at once, and a round always takes the global best pair, so it terminates.
    Ties go to the lower index (``argmax`` returns the first maximum).
    """
    v = np.array(scores, dtype=np.float64)  # a copy: rounds overwrite taken rows/columns
    B, n, m = v.shape
    out = np.full((B, n), -1, dtype=np.int64)
    allowed = v >= 0
    rows_in, cols_in = np.flatnonzero(allowed.any((0, 2))), np.flatnonzero(allowed.any((0, 1)))
    if rows_in.size == 0:
        return out
    v = v[:, rows_in][:, :, cols_in]  # most detections overlap no label: leave them out of the rounds
    rows = np.arange(rows_in.size)
    sub = np.full((B, rows_in.size), -1, dtype=np.int64)
    while True:
        best_col = v.argmax(2)  # (B, n')
        best_row = v.argmax(1)  # (B, m')
        row_best = np.take_along_axis(v, best_col[..., None], 2)[..., 0]
        mutual = (row_best >= 0) & (np.take_along_axis(best_row, best_col, 1) == rows)
        if not mutual.any():
            break
        b, i = np.nonzero(mutual)
        j = best_col[b, i]
        sub[b, i] = j
        v[b, i, :] = -1.0
        v[b, :, j] = -1.0
    out[:, rows_in] = np.where(sub >= 0, cols_in[np.maximum(sub, 0)], -1)
    return out


# ------------------------------------------------------------------------------- average precision
def precision_envelope(precision: np.ndarray) -> np.ndarray:
    """Best precision at this or any later (higher-recall) point, along axis 0: (k, ...) -> (k, ...)."""
    return np.flip(np.maximum.accumulate(np.flip(precision, 0), axis=0), 0)


_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it; requirements allow numpy 1.23+


def average_precision(
    recall: np.ndarray, precision: np.ndarray, convention: Convention = "yolov5"
) -> tuple[np.ndarray, np.ndarray]:
    """AP of precision/recall sequences, one column per IoU threshold.

    recall, precision: (k, T), rows = detections of one class by descending confidence (recall
    non-decreasing down each column). Returns (AP (T,), sampled envelope (101, T) at RECALL_POINTS).
    ``"yolov5"``: the columns are framed by (0, 1) and (1, 0), the envelope is interpolated linearly
    at the 101 points and integrated with the trapezoid rule. ``"coco"``: at each recall point the
    envelope of the first detection reaching it (0 if none does), averaged.
    """
    T = recall.shape[1]
    if convention == "yolov5":
        ones, zeros = np.ones((1, T)), np.zeros((1, T))
        r = np.concatenate((zeros, recall, ones))
        env = precision_envelope(np.concatenate((ones, precision, zeros)))
        # np.interp per column: where one recall value repeats, it uses the last (lowest) envelope value
        sampled = np.stack([np.interp(RECALL_POINTS, r[:, t], env[:, t]) for t in range(T)], 1)
        return _trapezoid(sampled, RECALL_POINTS, axis=0), sampled
    _check_convention(convention)
    sampled = np.zeros((RECALL_POINTS.size, T))
    if recall.shape[0]:
        env = precision_envelope(precision)
        for t in range(T):
            first = np.searchsorted(recall[:, t], RECALL_POINTS, side="left")
            reached = first < recall.shape[0]
            sampled[reached, t] = env[first[reached], t]
    return sampled.mean(0), sampled


# ------------------------------------------------------------------------------ per-class summary
@dataclass
class APResult:
    """Output of :func:`score_detections`; k = number of classes that have labels.

    classes (k,) class ids; n_labels (k,); ap (k, T) AP per IoU threshold; p, r, f1 (k,) at the
    confidence ``conf_best`` where the smoothed mean F1 over classes (IoU 0.5) peaks; curves for plots:
    pr_curve (k, 101) interpolated precision at RECALL_POINTS (IoU 0.5), p_curve / r_curve /
    f1_curve (k, 1000) versus CONF_POINTS.
    """

    classes: np.ndarray
    n_labels: np.ndarray
    ap: np.ndarray
    p: np.ndarray
    r: np.ndarray
    f1: np.ndarray
    conf_best: float = 0.0
    pr_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, RECALL_POINTS.size)))
    p_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, CONF_POINTS.size)))
    r_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, CONF_POINTS.size)))
    f1_curve: np.ndarray = field(default_factory=lambda: np.zeros((0, CONF_POINTS.size)))

    @property
    def ap50(self) -> np.ndarray:
        return self.ap[:, 0] if self.ap.size else np.zeros(0)

    @property
    def ap5095(self) -> np.ndarray:
        return self.ap.mean(1) if self.ap.size else np.zeros(0)

    @property
    def map50(self) -> float:
        return float(self.ap50.mean()) if self.ap.size else 0.0

    @property
    def map(self) -> float:
        return float(self.ap5095.mean()) if self.ap.size else 0.0

    @property
    def mp(self) -> float:
        return float(self.p.mean()) if self.p.size else 0.0

    @property
    def mr(self) -> float:
        return float(self.r.mean()) if self.r.size else 0.0


def confidence_curves(conf: np.ndarray, recall: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of one class versus the confidence threshold CONF_POINTS (1000,).

    conf (k,) descending, recall / precision (k,) at IoU 0.5 after each detection. The sequences are
    interpolated linearly in confidence; above the top score nothing is kept: recall 0, precision 1.
    """
    if conf.size == 0:
        return np.zeros_like(CONF_POINTS), np.zeros_like(CONF_POINTS)
    # np.interp wants increasing abscissae: walk the confidence axis downwards
    p = np.interp(-CONF_POINTS, -conf, precision, left=1.0)
    r = np.interp(-CONF_POINTS, -conf, recall, left=0.0)
    return p, r


F1_SMOOTHING_POINTS = 101  # moving-average window over CONF_POINTS (a tenth of the axis), see best_f1_index


def moving_average(y: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of a 1-D curve (odd ``window``); the ends are extended with the end
    values, so the output has y's length and a flat curve stays flat."""
    half = window // 2
    return np.convolve(np.pad(y, half, mode="edge"), np.full(window, 1.0 / window), mode="valid")


def best_f1_index(f1: np.ndarray, window: int = F1_SMOOTHING_POINTS) -> int:
    """Column of the (k, 1000) F1-versus-confidence curves where their mean over classes peaks.

    The mean curve is smoothed first (``window`` points, 1 = none): a single noisy peak does not
    pick the operating point. YOLOv5's printed P and R are reproduced with a 101-point window
    (measured against YOLOv5 7.0's val.py; other widths move the chosen point).
    """
    if f1.size == 0:
        return 0
    mean = f1.mean(0)
    return int((moving_average(mean, window) if window > 1 else mean).argmax())


def score_detections(
    hits: np.ndarray | torch.Tensor,
    scores: np.ndarray | torch.Tensor,
    det_classes: np.ndarray | torch.Tensor,
    label_classes: np.ndarray | torch.Tensor,
    convention: Convention = "yolov5",
) -> APResult:
    """Per-class average precision at every IoU threshold, plus P/R/F1 at the best mean-F1 confidence.

    hits: (n, T) bool, true positive per detection and IoU threshold (from :func:`match_predictions`;
    (n,) is one threshold); scores: (n,) confidences; det_classes: (n,) classes of the detections;
    label_classes: (m,) classes of all labels. Detections are pooled over images. Only classes with
    at least one label are scored; detections of other classes are ignored.
    """
    _check_convention(convention)
    hits, scores, det_classes, label_classes = (_as_numpy(x) for x in (hits, scores, det_classes, label_classes))
    hits = (hits[:, None] if hits.ndim == 1 else hits).astype(bool)  # (n,) is one threshold
    ranked = _confidence_rank(scores.astype(np.float64))
    hits, scores, det_classes = hits[ranked], scores[ranked].astype(np.float64), det_classes[ranked]

    classes, n_labels = np.unique(label_classes.astype(np.int64), return_counts=True)
    k, T = classes.size, hits.shape[1]
    ap = np.zeros((k, T))
    pr_curve = np.zeros((k, RECALL_POINTS.size))
    p_curve = np.zeros((k, CONF_POINTS.size))
    r_curve = np.zeros((k, CONF_POINTS.size))
    for i, (c, n_gt) in enumerate(zip(classes, n_labels)):
        mine = det_classes == c
        if not mine.any():
            continue  # no detection of this class: AP 0, P = R = 0
        found = np.cumsum(hits[mine], axis=0)  # (k_c, T) true positives among the top 1..k_c detections
        recall = found / n_gt
        precision = found / np.arange(1, found.shape[0] + 1)[:, None]
        ap[i], sampled = average_precision(recall, precision, convention)
        pr_curve[i] = sampled[:, 0]
        p_curve[i], r_curve[i] = confidence_curves(scores[mine], recall[:, 0], precision[:, 0])

    f1_curve = 2 * p_curve * r_curve / np.maximum(p_curve + r_curve, 1e-16)
    best = best_f1_index(f1_curve)
    return APResult(
        classes=classes,
        n_labels=n_labels,
        ap=ap,
        p=p_curve[:, best],
        r=r_curve[:, best],
        f1=f1_curve[:, best],
        conf_best=float(CONF_POINTS[best]),
        pr_curve=pr_curve,
        p_curve=p_curve,
        r_curve=r_curve,
        f1_curve=f1_curve,
    )


# ------------------------------------------------------------------------------ confusion matrix
class ConfusionMatrix:
    """Detection confusion matrix, (nc + 1) × (nc + 1): rows = predicted class, columns = true class.

    The last row/column is background: column ``nc`` counts false positives (a detection matching
    no label), row ``nc`` counts missed labels. Only detections with conf >= ``conf`` take part;
    a detection and a label pair up (class-agnostic, greedy by IoU, one-to-one) when IoU >= ``iou_thres``.
    """

    def __init__(self, nc: int, conf: float = 0.25, iou_thres: float = 0.45) -> None:
        self.nc = nc
        self.conf = conf
        self.iou_thres = iou_thres
        self.matrix = np.zeros((nc + 1, nc + 1), dtype=np.int64)

    def add_image(self, detections: torch.Tensor | None, labels: torch.Tensor) -> None:
        """Add one image. detections: (n, 6) x1, y1, x2, y2, conf, cls or None; labels: (m, 5) cls, xyxy."""
        gt_cls = labels[:, 0].long().cpu().numpy()
        if detections is None or detections.shape[0] == 0:
            np.add.at(self.matrix, (self.nc, gt_cls), 1)
            return
        detections = detections[detections[:, 4] >= self.conf]
        det_cls = detections[:, 5].long().cpu().numpy()
        if labels.shape[0] and detections.shape[0]:
            iou = box_iou(detections[:, :4].double(), labels[:, 1:5].double()).cpu().numpy()
            match = greedy_match(np.where(iou >= self.iou_thres, iou, -1.0)[None])[0]  # (n,) label or -1
        else:
            match = np.full(det_cls.shape, -1)
        hit = match >= 0
        np.add.at(self.matrix, (det_cls[hit], gt_cls[match[hit]]), 1)
        np.add.at(self.matrix, (det_cls[~hit], self.nc), 1)  # false positives
        missed = np.ones(gt_cls.shape, dtype=bool)
        missed[match[hit]] = False
        np.add.at(self.matrix, (self.nc, gt_cls[missed]), 1)

    def normalized(self) -> np.ndarray:
        """Each column divided by its sum (the distribution of predictions for each true class)."""
        return self.matrix / np.maximum(self.matrix.sum(0, keepdims=True), 1)

    def true_false_positives(self) -> tuple[np.ndarray, np.ndarray]:
        """(nc,) true positives (diagonal) and false positives (row sum minus diagonal), background excluded."""
        tp = np.diag(self.matrix)[:-1]
        fp = self.matrix.sum(1)[:-1] - tp
        return tp, fp

    def plot(self, save_path: str | Path, names: list[str], normalize: bool = True) -> Path:
        """Save a heat-map of the (column-normalised) matrix; returns the path."""
        from utils.plots import plot_confusion_matrix  # plots stay optional for metric users

        return plot_confusion_matrix(self.normalized() if normalize else self.matrix, names, save_path, normalize)
