"""Matching, AP, fitness, confusion matrix and NMS on hand-built cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.boxes import non_max_suppression
from utils.metrics import (
    IOU_THRESHOLDS,
    ConfusionMatrix,
    ap_per_class,
    fitness,
    greedy_match,
    match_predictions,
)


def det(*rows) -> torch.Tensor:
    """(n, 6) x1 y1 x2 y2 conf cls."""
    return torch.tensor(rows, dtype=torch.float32).view(-1, 6)


def lab(*rows) -> torch.Tensor:
    """(m, 5) cls x1 y1 x2 y2."""
    return torch.tensor(rows, dtype=torch.float32).view(-1, 5)


def evaluate_images(images: list[tuple[torch.Tensor, torch.Tensor]]):
    stats = [(match_predictions(d, l), d[:, 4], d[:, 5], l[:, 0]) for d, l in images]
    tp, conf, pcls, tcls = (torch.cat(x) for x in zip(*stats))
    return ap_per_class(tp, conf, pcls, tcls)


def test_perfect_predictions_give_map_one():
    labels = lab([0, 10, 10, 50, 60], [1, 70, 20, 120, 90], [2, 5, 100, 40, 150])
    dets = torch.cat((labels[:, 1:], torch.tensor([[0.9], [0.8], [0.7]]), labels[:, :1]), 1)
    res = evaluate_images([(dets, labels), (dets.clone(), labels.clone())])
    assert res.map50 == pytest.approx(1.0)
    assert res.map == pytest.approx(1.0)
    assert res.mp == pytest.approx(1.0) and res.mr == pytest.approx(1.0)
    assert fitness(res.map50, res.map) == pytest.approx(1.0)


def test_one_miss_and_one_false_positive_hand_computed():
    # Two labels; the TP outranks the FP: recall (.5, .5), precision (1, .5). COCO 101-point AP:
    # recall points 0.00..0.50 (51 of 101) see the envelope precision 1, the rest are unreachable.
    labels = lab([0, 0, 0, 10, 10], [0, 50, 50, 60, 60])
    dets = det([0, 0, 10, 10, 0.9, 0], [100, 100, 120, 120, 0.8, 0])
    res = evaluate_images([(dets, labels)])
    assert res.ap[0] == pytest.approx(np.full(10, 51 / 101))
    # FP outranks the TP: precision (0, .5) -> envelope .5 on the same 51 recall points.
    dets = det([0, 0, 10, 10, 0.8, 0], [100, 100, 120, 120, 0.9, 0])
    res = evaluate_images([(dets, labels)])
    assert res.ap[0] == pytest.approx(np.full(10, 0.5 * 51 / 101))
    # Best mean F1 keeps both detections: P = 0.5, R = 0.5
    assert res.p[0] == pytest.approx(0.5) and res.r[0] == pytest.approx(0.5)


def test_iou_055_counts_at_050_but_not_from_060():
    labels = lab([3, 0, 0, 100, 100])
    dets = det([0, 0, 55, 100, 0.9, 3])  # IoU = 5500 / 10000 = 0.55
    correct = match_predictions(dets, labels)
    assert correct.shape == (1, 10)
    assert bool(correct[0, 0])
    assert not correct[0, 2:].any()  # 0.60 ... 0.95
    res = evaluate_images([(dets, labels)])
    assert res.ap[0, 0] == pytest.approx(1.0) and res.ap[0, 2:].max() == 0.0


def test_class_mismatch_never_matches():
    labels = lab([0, 10, 10, 50, 50], [1, 60, 60, 90, 90])
    dets = det([10, 10, 50, 50, 0.9, 1], [60, 60, 90, 90, 0.8, 0])  # perfect boxes, swapped classes
    assert not match_predictions(dets, labels).any()
    assert evaluate_images([(dets, labels)]).map50 == 0.0


def test_each_label_and_detection_used_once_greedy_by_iou():
    labels = lab([0, 0, 0, 100, 100], [0, 200, 0, 300, 100])
    # Two detections on label 0: only one can be its match, the other is a false positive.
    dets = det([0, 0, 100, 100, 0.9, 0], [1, 1, 100, 100, 0.8, 0])
    correct = match_predictions(dets, labels)
    assert correct[:, 0].tolist() == [True, False]
    # Greedy by IoU: d1 ~ L0 at IoU 0.9 is taken first, so d0 (IoU 0.8 with L0) falls back to L1.
    labels = lab([0, 0, 0, 100, 100], [0, 40, 0, 140, 100])
    d0 = [20, 0, 120, 100, 0.9, 0]  # IoU L0 = 80/120 = 0.667, IoU L1 = 80/120 = 0.667
    d1 = [5, 0, 105, 100, 0.8, 0]  # IoU L0 = 95/105 = 0.905, IoU L1 = 65/135 = 0.48
    correct = match_predictions(det(d0, d1), labels)
    assert correct[:, 0].tolist() == [True, True]  # both labels found at IoU 0.5
    assert correct[:, 3].tolist() == [True, True]  # 0.65
    assert correct[:, 4].tolist() == [False, True]  # 0.70: only the 0.905 pair survives


def _sequential_greedy(s: np.ndarray) -> np.ndarray:
    out = np.full(s.shape[0], -1)
    s = s.copy()
    while (s >= 0).any():
        i, j = np.unravel_index(np.argmax(s), s.shape)
        out[i] = j
        s[i, :] = -1
        s[:, j] = -1
    return out


def test_vectorised_greedy_equals_sequential_greedy():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n, m = rng.integers(0, 12, 2)
        s = rng.random((3, n, m))
        s[s < 0.4] = -1  # forbidden pairs
        got = greedy_match(s)
        for b in range(3):
            assert got[b].tolist() == _sequential_greedy(s[b]).tolist()


def test_no_predictions_and_no_labels():
    res = evaluate_images([(det(), lab([0, 0, 0, 10, 10]))])
    assert res.map50 == 0.0 and res.map == 0.0 and res.mr == 0.0 and res.mp == 0.0
    res = ap_per_class(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.zeros(0))
    assert res.map == 0.0 and res.classes.size == 0
    # predictions of classes without labels are ignored (as in pycocotools)
    res = evaluate_images([(det([0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.9, 2]), lab([0, 0, 0, 10, 10]))])
    assert res.classes.tolist() == [0] and res.map == pytest.approx(1.0)


def test_iou_thresholds_and_fitness():
    assert len(IOU_THRESHOLDS) == 10
    assert IOU_THRESHOLDS[0] == 0.5 and IOU_THRESHOLDS[-1] == pytest.approx(0.95)
    assert fitness(0.6, 0.4) == pytest.approx(0.1 * 0.6 + 0.9 * 0.4)


def test_confusion_matrix_counts():
    cm = ConfusionMatrix(nc=3, conf=0.25, iou_thres=0.45)
    labels = lab([0, 0, 0, 10, 10], [1, 50, 50, 70, 70], [2, 100, 100, 120, 120])
    dets = det(
        [0, 0, 10, 10, 0.9, 0],  # correct
        [50, 50, 70, 70, 0.8, 2],  # right box, wrong class
        [200, 200, 220, 220, 0.7, 1],  # false positive
        [100, 100, 120, 120, 0.1, 2],  # below conf: ignored, so label 2 is missed
    )
    cm.process_batch(dets, labels)
    m = cm.matrix
    assert m[0, 0] == 1 and m[2, 1] == 1 and m[1, 3] == 1 and m[3, 2] == 1
    assert m.sum() == 4
    cm.process_batch(None, lab([1, 0, 0, 5, 5]))
    assert m[3, 1] == 1
    assert np.allclose(cm.normalized().sum(0)[[0, 1, 2]], 1.0)
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0, 0] and fp.tolist() == [0, 1, 1]


# ----------------------------------------------------------------------------------------- NMS
def raw_pred(rows: list[list[float]], nc: int) -> torch.Tensor:
    """(1, n, 5 + nc) decoded predictions from rows xc yc w h obj cls0..cls{nc-1}."""
    t = torch.tensor(rows, dtype=torch.float32)
    assert t.shape[1] == 5 + nc
    return t[None]


def test_nms_is_class_aware():
    # Two identical boxes: same class -> one survives; different classes -> both kept.
    same = raw_pred([[50, 50, 20, 20, 0.9, 0.9, 0.1], [51, 50, 20, 20, 0.8, 0.9, 0.1]], nc=2)
    assert non_max_suppression(same, 0.25, 0.45)[0].shape[0] == 1
    diff = raw_pred([[50, 50, 20, 20, 0.9, 0.9, 0.1], [51, 50, 20, 20, 0.8, 0.1, 0.9]], nc=2)
    out = non_max_suppression(diff, 0.25, 0.45)[0]
    assert out.shape[0] == 2 and sorted(out[:, 5].tolist()) == [0.0, 1.0]
    assert torch.allclose(out[0, :4], torch.tensor([40.0, 40.0, 60.0, 60.0]))  # xyxy, best first
    assert out[0, 4] == pytest.approx(0.81)  # score = obj · cls


def test_nms_max_det_and_multi_label():
    rows = [[10 + 30 * i, 10, 20, 20, 0.9 - 0.01 * i, 0.9, 0.0] for i in range(20)]  # disjoint boxes
    out = non_max_suppression(raw_pred(rows, nc=2), 0.25, 0.45, max_det=7)[0]
    assert out.shape[0] == 7
    assert torch.all(out[:-1, 4] >= out[1:, 4])
    # One box scoring for two classes: multi-label keeps both candidates, single-label the best one.
    one = raw_pred([[50, 50, 20, 20, 0.9, 0.8, 0.6]], nc=2)
    assert non_max_suppression(one, 0.25, 0.45, multi_label=True)[0].shape[0] == 2
    single = non_max_suppression(one, 0.25, 0.45, multi_label=False)[0]
    assert single.shape[0] == 1 and single[0, 5] == 0
    # conf threshold applies to obj·cls
    assert non_max_suppression(one, 0.6, 0.45, multi_label=True)[0].shape[0] == 1
