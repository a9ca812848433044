"""Detection metrics: prediction/label matching, per-class AP, fitness and the confusion matrix.

Conventions (the COCO / YOLOv5 validation rules, see REFERENCE §4):
- IoU thresholds 0.50:0.05:0.95 (10 values, built exactly as pycocotools builds them).
- At each threshold a detection is a true positive when it is matched to a label of the same class
  with IoU >= threshold; matching is greedy by IoU and one-to-one (each label and each detection is
  used at most once).
- AP per class and threshold = mean over the 101 recall points 0, 0.01, ..., 1 of the precision
  envelope (max precision at any recall >= r), 0 where recall r is never reached. This is the COCO
  rule, so our mAP agrees with pycocotools up to its per-image detection cap and matching order.
- P and R are reported at the confidence threshold that maximises the mean F1 over classes (IoU 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils.boxes import box_iou

# np.linspace rather than arange so the floats are bit-identical to those pycocotools compares with
IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_POINTS = np.linspace(0.0, 1.0, int(np.round((1.0 - 0.0) / 0.01)) + 1, endpoint=True)
CONF_POINTS = np.linspace(0.0, 1.0, 1000)  # x axis of the P/R/F1-versus-confidence curves


def fitness(map50: float, map5095: float) -> float:
    """Model selection score: 0.1·mAP50 + 0.9·mAP50-95."""
    return 0.1 * float(map50) + 0.9 * float(map5095)


def greedy_match(scores: np.ndarray) -> np.ndarray:
    """One-to-one greedy assignment by descending score, batched over a leading dimension.

    scores: (B, n, m) pair scores (IoU); entries < 0 mark forbidden pairs.
    Returns (B, n) int64: the matched column for each row, or -1.

    Sequential greedy (take the best remaining pair, drop its row and column, repeat) is equivalent
    to repeatedly taking every pair that is the best of both its row and its column: such a pair
    would be reached by the sequential pass before any competing pair. Each round is a few array
    ops over all B at once, and a round always takes the global best pair, so it terminates.
    Ties go to the lower index (``argmax`` returns the first maximum), i.e. to the earlier row when
    rows are sorted by confidence. NumPy rather than torch: the matrices are small and per image,
    where torch's per-op dispatch (and intra-op threads) cost more than the arithmetic.
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


def _class_aware_iou(detections: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """(n, m) float64 IoU of detections × labels, -1 where the classes differ.

    Float64 like pycocotools, so a pair on a threshold falls on the same side in both.
    """
    iou = box_iou(detections[:, :4].double(), labels[:, 1:5].double())
    iou = torch.where(detections[:, 5:6] == labels[:, 0][None], iou, torch.full_like(iou, -1.0))
    return iou.cpu().numpy()


def match_predictions(
    detections: torch.Tensor,
    labels: torch.Tensor,
    iou_thresholds: np.ndarray | torch.Tensor = IOU_THRESHOLDS,
    greedy: str = "iou",
) -> torch.Tensor:
    """Mark each detection as a true positive or not at every IoU threshold.

    detections: (n, 6) x1, y1, x2, y2, conf, cls (best first); labels: (m, 5) cls, x1, y1, x2, y2,
    in the same pixel space. Returns (n, T) bool on the detections' device.
    A detection may only match a label of its own class. ``greedy``:
    - ``"iou"`` (YOLOv5's rule, default): pairs are taken in order of decreasing IoU (vectorised).
    - ``"score"`` (pycocotools' rule): detections in order of decreasing confidence each take the
      unmatched label they overlap most. A Python loop over detections; used to check that our AP
      equals pycocotools' exactly. The two differ only where near-duplicate detections compete for
      one label, which NMS mostly removes.
    """
    if greedy not in ("iou", "score"):
        raise ValueError(f"greedy={greedy!r}: use 'iou' or 'score'")
    iouv = np.asarray(iou_thresholds.cpu() if isinstance(iou_thresholds, torch.Tensor) else iou_thresholds, np.float64)
    n, m, T = detections.shape[0], labels.shape[0], iouv.size
    if n == 0 or m == 0:
        return torch.zeros((n, T), dtype=torch.bool, device=detections.device)
    iou = _class_aware_iou(detections, labels)
    valid = iou[None] >= iouv[:, None, None]  # (T, n, m)
    if greedy == "iou":
        correct = (greedy_match(np.where(valid, iou[None], -1.0)) >= 0).T
    else:
        used = np.zeros((T, m), dtype=bool)  # labels taken so far, per threshold
        correct = np.zeros((n, T), dtype=bool)
        tidx = np.arange(T)
        for i in np.argsort(-detections[:, 4].cpu().numpy(), kind="mergesort"):
            cand = np.where(valid[:, i] & ~used, iou[i][None], -1.0)  # (T, m)
            j = cand.argmax(1)
            hit = cand[tidx, j] >= 0
            used[tidx[hit], j[hit]] = True
            correct[i] = hit
    return torch.from_numpy(np.ascontiguousarray(correct)).to(detections.device)


def _precision_envelope_ap(recall: np.ndarray, precision: np.ndarray) -> tuple[float, np.ndarray]:
    """COCO 101-point AP of one precision/recall sequence (detections in descending confidence).

    recall, precision: (n,). Returns (AP, precision at each of RECALL_POINTS (101,)).
    """
    if recall.size == 0:
        return 0.0, np.zeros_like(RECALL_POINTS)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # max precision at any later point
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")  # first point reaching recall r
    q = np.zeros_like(RECALL_POINTS)
    ok = idx < recall.size
    q[ok] = envelope[idx[ok]]
    return float(q.mean()), q


@dataclass
class APResult:
    """Output of :func:`ap_per_class`; k = number of classes that have labels.

    classes (k,) class ids; n_labels (k,); ap (k, T) AP per IoU threshold; p, r, f1 (k,) at the
    confidence ``conf_best`` that maximises the mean F1 over classes (IoU 0.5); curves for plots:
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


def ap_per_class(
    tp: np.ndarray | torch.Tensor,
    conf: np.ndarray | torch.Tensor,
    pred_cls: np.ndarray | torch.Tensor,
    target_cls: np.ndarray | torch.Tensor,
    eps: float = 1e-16,
) -> APResult:
    """Per-class average precision at every IoU threshold, plus P/R/F1 at the best mean-F1 confidence.

    tp: (n, T) bool, true positive per detection and IoU threshold (from :func:`match_predictions`);
    conf: (n,) scores; pred_cls: (n,) classes of the detections; target_cls: (m,) classes of all
    labels. Detections are pooled over images. Only classes with at least one label are scored
    (as pycocotools does); detections of other classes are ignored.
    """
    tp, conf, pred_cls, target_cls = (
        x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        for x in (tp, conf, pred_cls, target_cls)
    )
    tp = (tp[:, None] if tp.ndim == 1 else tp).astype(bool)  # (n,) is one threshold
    T = tp.shape[1]
    order = np.argsort(-conf, kind="mergesort")  # stable: ties keep image order, like pycocotools
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]

    classes, n_labels = np.unique(target_cls.astype(int), return_counts=True)
    k = classes.size
    ap = np.zeros((k, T))
    pr_curve = np.zeros((k, RECALL_POINTS.size))
    p_curve = np.zeros((k, CONF_POINTS.size))
    r_curve = np.zeros((k, CONF_POINTS.size))
    for ci, c in enumerate(classes):
        sel = pred_cls == c
        n_gt = n_labels[ci]
        tpc = np.cumsum(tp[sel], axis=0)  # (nc_det, T)
        fpc = np.cumsum(~tp[sel], axis=0)
        recall = tpc / (n_gt + eps)
        precision = tpc / (tpc + fpc + eps)
        for t in range(T):
            ap[ci, t], q = _precision_envelope_ap(recall[:, t], precision[:, t])
            if t == 0:
                pr_curve[ci] = q
        # P and R versus confidence threshold (IoU 0.5): keep detections with conf >= x.
        cc = conf[sel]  # descending
        kept = np.searchsorted(-cc, -CONF_POINTS, side="right")  # count of conf >= x
        tp50 = np.concatenate(([0.0], tpc[:, 0])) if tpc.size else np.zeros(1)
        r_curve[ci] = tp50[kept] / (n_gt + eps)
        # Above the top score nothing is kept: hold the top detection's precision (0 without any
        # detection) so the curve stays flat rather than jumping to an arbitrary value.
        top = tp50[1] if cc.size else 0.0
        p_curve[ci] = np.where(kept > 0, tp50[kept] / np.maximum(kept, 1), top)

    f1_curve = 2 * p_curve * r_curve / (p_curve + r_curve + eps)
    best = int(f1_curve.mean(0).argmax()) if k else 0
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

    def process_batch(self, detections: torch.Tensor | None, labels: torch.Tensor) -> None:
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

    def tp_fp(self) -> tuple[np.ndarray, np.ndarray]:
        """(nc,) true positives (diagonal) and false positives (row sum minus diagonal), background excluded."""
        tp = np.diag(self.matrix)[:-1]
        fp = self.matrix.sum(1)[:-1] - tp
        return tp, fp

    def plot(self, save_path: str | Path, names: list[str], normalize: bool = True) -> Path:
        """Save a heat-map of the (column-normalised) matrix; returns the path."""
        from utils.plots import plot_confusion_matrix  # plots stay optional for metric users

        return plot_confusion_matrix(self.normalized() if normalize else self.matrix, names, save_path, normalize)
