"""Matching rules, AP arithmetic, P/R selection, fitness and the confusion matrix on hand-built cases
(the comparison with YOLOv5's own figures is in test_metrics_oracle.py), plus NMS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.boxes import non_max_suppression
from utils.metrics import (
    IOU_THRESHOLDS,
    ConfusionMatrix,
    average_precision,
    best_f1_index,
    fitness,
    greedy_match,
    match_predictions,
    match_to_preferred_label,
    moving_average,
    score_detections,
)


def det(*rows) -> torch.Tensor:
    """(n, 6) x1 y1 x2 y2 conf cls."""
    return torch.tensor(rows, dtype=torch.float32).view(-1, 6)


def lab(*rows) -> torch.Tensor:
    """(m, 5) cls x1 y1 x2 y2."""
    return torch.tensor(rows, dtype=torch.float32).view(-1, 5)


def evaluate_images(images: list[tuple[torch.Tensor, torch.Tensor]], convention: str = "yolov5"):
    stats = [(match_predictions(d, l, convention=convention), d[:, 4], d[:, 5], l[:, 0]) for d, l in images]
    tp, conf, pcls, tcls = (torch.cat(x) for x in zip(*stats))
    return score_detections(tp, conf, pcls, tcls, convention=convention)


# ------------------------------------------------------------------------------------------- AP
def test_perfect_predictions():
    labels = lab([0, 10, 10, 50, 60], [1, 70, 20, 120, 90], [2, 5, 100, 40, 150])
    dets = torch.cat((labels[:, 1:], torch.tensor([[0.9], [0.8], [0.7]]), labels[:, :1]), 1)
    images = [(dets, labels), (dets.clone(), labels.clone())]
    res = evaluate_images(images)
    # YOLOv5's curve ends at (recall 1, precision 0): the last 0.01 of recall counts half, hence 0.995
    assert res.map50 == pytest.approx(0.995) and res.map == pytest.approx(0.995)
    assert res.mp == pytest.approx(1.0) and res.mr == pytest.approx(1.0)
    assert fitness(res.map50, res.map) == pytest.approx(0.995)
    coco = evaluate_images(images, "coco")
    assert coco.map50 == pytest.approx(1.0) and coco.map == pytest.approx(1.0)


def test_ap_hand_computed_both_conventions():
    labels = lab([0, 0, 0, 10, 10], [0, 50, 50, 60, 60])
    # TP outranks FP: recall (.5, .5), precision (1, .5); envelope with end points: r 0 .5 .5 1 / p 1 1 .5 0.
    # Sampled at r = k/100: 1 for k < 50, 0.5 at k = 50 (a repeated recall takes its last, lowest
    # value), then the line 1 - r. Trapezoids: 49·0.01 + (1 + .5)/2·0.01 + triangle .5·.5/2 = 0.6225.
    dets = det([0, 0, 10, 10, 0.9, 0], [100, 100, 120, 120, 0.8, 0])
    assert evaluate_images([(dets, labels)]).ap[0] == pytest.approx(np.full(10, 0.6225))
    # COCO: recall points 0.00..0.50 (51 of 101) see precision 1, the rest are never reached.
    assert evaluate_images([(dets, labels)], "coco").ap[0] == pytest.approx(np.full(10, 51 / 101))
    # FP outranks TP: envelope .5 from recall 0 to .5, then the line to (1, 0): .5·.5 + .125 = 0.375.
    dets = det([0, 0, 10, 10, 0.8, 0], [100, 100, 120, 120, 0.9, 0])
    assert evaluate_images([(dets, labels)]).ap[0] == pytest.approx(np.full(10, 0.375))
    assert evaluate_images([(dets, labels)], "coco").ap[0] == pytest.approx(np.full(10, 0.5 * 51 / 101))


def test_average_precision_columns_are_independent():
    recall = np.array([[0.5, 0.0], [0.5, 0.5]])
    precision = np.array([[1.0, 0.0], [0.5, 0.5]])
    ap, sampled = average_precision(recall, precision)
    assert ap == pytest.approx([0.6225, 0.375]) and sampled.shape == (101, 2)
    # one detection, recall .5 at precision 1: flat to .5, then the tail down to (1, 0)
    assert average_precision(np.array([[0.5]]), np.array([[1.0]]))[0] == pytest.approx([0.75])


# ------------------------------------------------------------------------------------- matching
def test_iou_055_counts_at_050_but_not_from_060():
    labels = lab([3, 0, 0, 100, 100])
    dets = det([0, 0, 55, 100, 0.9, 3])  # IoU = 5500 / 10000 = 0.55
    for convention in ("yolov5", "coco"):
        correct = match_predictions(dets, labels, convention=convention)
        assert correct.shape == (1, 10)
        assert bool(correct[0, 0]) and bool(correct[0, 1])
        assert not correct[0, 2:].any()  # 0.60 ... 0.95


def test_class_mismatch_never_matches():
    labels = lab([0, 10, 10, 50, 50], [1, 60, 60, 90, 90])
    dets = det([10, 10, 50, 50, 0.9, 1], [60, 60, 90, 90, 0.8, 0])  # perfect boxes, swapped classes
    assert not match_predictions(dets, labels).any()
    assert not match_predictions(dets, labels, convention="coco").any()
    assert evaluate_images([(dets, labels)]).map50 == 0.0


def test_label_keeps_its_most_confident_detection_without_fallback():
    labels = lab([0, 0, 0, 100, 100], [0, 40, 0, 140, 100])
    d0 = [15, 0, 115, 100, 0.9, 0]  # IoU L0 85/115 = .739, L1 75/125 = .600 -> prefers L0
    d1 = [10, 0, 110, 100, 0.8, 0]  # IoU L0 90/110 = .818, L1 70/130 = .538 -> prefers L0
    for dets, (i0, i1) in ((det(d0, d1), (0, 1)), (det(d1, d0), (1, 0))):  # input order does not matter
        yolo = match_predictions(dets, labels)
        # IoU .5: L0 takes the more confident d0; d1 is a false positive although it overlaps L1 by .538
        assert (yolo[i0, 0].item(), yolo[i1, 0].item()) == (True, False)
        # IoU .75: d0 (.739) is no candidate any more, so L0 takes d1
        assert (yolo[i0, 5].item(), yolo[i1, 5].item()) == (False, True)
        # pycocotools lets d1 fall back to the still free L1 at IoU .5 (not at .55)
        coco = match_predictions(dets, labels, convention="coco")
        assert (coco[i1, 0].item(), coco[i1, 1].item(), coco[i0, 0].item()) == (True, False, True)
    with pytest.raises(ValueError, match="convention"):
        match_predictions(det(d0), labels, convention="iou")


def _preferred_label_by_loops(iou: np.ndarray, conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """The rule read literally: per threshold, each detection picks its best label; each label keeps
    the most confident of the detections that picked it (earlier index on equal confidence)."""
    n, m = iou.shape
    out = np.zeros((n, thresholds.size), dtype=bool)
    for t, thr in enumerate(thresholds):
        owner = {}
        for d in range(n):
            j = int(np.argmax(iou[d]))
            if iou[d, j] < thr:
                continue
            if j not in owner or conf[d] > conf[owner[j]]:
                owner[j] = d
        for d in owner.values():
            out[d, t] = True
    return out


def test_vectorised_rule_equals_the_literal_rule():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n, m = rng.integers(1, 15), rng.integers(1, 6)
        iou = rng.random((n, m))
        iou[rng.random((n, m)) < 0.3] = -1.0  # other class
        iou[rng.random((n, m)) < 0.1] = IOU_THRESHOLDS[rng.integers(0, 10)]  # exactly on a threshold
        conf = rng.choice([0.3, 0.5, 0.7, 0.9], n)  # ties keep input order
        got = match_to_preferred_label(iou, conf, IOU_THRESHOLDS)
        assert got.tolist() == _preferred_label_by_loops(iou, conf, IOU_THRESHOLDS).tolist()


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
    res = score_detections(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), np.zeros(0))
    assert res.map == 0.0 and res.classes.size == 0
    # predictions of classes without labels are ignored
    res = evaluate_images([(det([0, 0, 10, 10, 0.9, 0], [0, 0, 10, 10, 0.9, 2]), lab([0, 0, 0, 10, 10]))])
    assert res.classes.tolist() == [0] and res.map == pytest.approx(0.995)
    assert match_predictions(det([0, 0, 10, 10, 0.9, 0]), lab()).shape == (1, 10)


# ------------------------------------------------------------------------------ P/R at best F1
def test_moving_average_and_best_f1_index():
    y = np.r_[np.zeros(10), np.ones(5), np.zeros(10)]
    assert moving_average(y, 5)[12] == pytest.approx(1.0) and moving_average(y, 5)[10] == pytest.approx(0.6)
    assert moving_average(np.full(7, 3.0), 5) == pytest.approx(np.full(7, 3.0))  # ends extended, not zero
    # one sharp spike and a broad plateau slightly lower: smoothing picks the plateau, raw argmax the spike
    f1 = np.full((2, 1000), 0.2)
    f1[:, 100] = 0.9
    f1[:, 600:800] = 0.8
    assert best_f1_index(f1, window=1) == 100
    assert 600 <= best_f1_index(f1) < 800


def test_precision_recall_at_best_f1():
    # One class, 4 labels: 3 TPs at high confidence then 20 FPs at conf 0.2. The best F1 sits just
    # below the TPs: R = 0.75 and P close to 1 (P/R are interpolated linearly in confidence between
    # detections, and the smoothing moves the point a little under the last TP), far from P = 3/23
    # of keeping everything.
    labels = lab(*([0, 100 * i, 0, 100 * i + 50, 50] for i in range(4)))
    dets = [[100 * i, 0, 100 * i + 50, 50, 0.9 - 0.01 * i, 0] for i in range(3)]
    dets += [[1000 + 60 * i, 0, 1050 + 60 * i, 50, 0.2, 0] for i in range(20)]
    res = evaluate_images([(det(*dets), labels)])
    assert res.r[0] == pytest.approx(0.75) and 0.95 < res.p[0] < 1.0
    assert 0.2 < res.conf_best < 0.88
    i = best_f1_index(res.f1_curve)
    assert res.p[0] == res.p_curve[0, i] and res.r[0] == res.r_curve[0, i] and res.f1[0] == res.f1_curve[0, i]
    assert res.p_curve[0, -1] == 1.0 and res.r_curve[0, -1] == 0.0  # above every score: nothing kept
    assert res.p_curve.shape == res.r_curve.shape == res.f1_curve.shape == (1, 1000)
    assert res.pr_curve.shape == (1, 101)


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
    cm.add_image(dets, labels)
    m = cm.matrix
    assert m[0, 0] == 1 and m[2, 1] == 1 and m[1, 3] == 1 and m[3, 2] == 1
    assert m.sum() == 4
    cm.add_image(None, lab([1, 0, 0, 5, 5]))
    assert m[3, 1] == 1
    assert np.allclose(cm.normalized().sum(0)[[0, 1, 2]], 1.0)
    tp, fp = cm.true_false_positives()
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
