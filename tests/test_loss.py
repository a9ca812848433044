"""DetectionLoss: parity with the YOLOv5 reference numbers and hand-worked limiting cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.loss import (
    DetectionLoss,
    complete_iou,
    decode_cell_boxes,
    match_anchors,
    put_last_wins,
    scale_hyp,
    smooth_bce_targets,
    training_cells,
)

FIXTURES = Path(__file__).parent / "fixtures"
NPZ = FIXTURES / "yolov5n_nc80.npz"

HYP = {"box": 0.05, "obj": 1.0, "cls": 0.5, "cls_pw": 1.0, "obj_pw": 1.0, "anchor_t": 4.0, "fl_gamma": 0.0}


@pytest.fixture(scope="module")
def ref() -> dict:
    with np.load(NPZ) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def yolov5n():
    from models import load_model

    return load_model(str(FIXTURES / "yolov5n_nc80.pt"))


class _Detect(nn.Module):
    """Stand-in Detect layer for the hand-worked cases: only what the loss reads."""

    def __init__(self, anchors: list[list[list[float]]], nc: int) -> None:
        super().__init__()
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32))
        self.nl, self.na = len(anchors), len(anchors[0])
        self.nc, self.no = nc, nc + 5
        self.stride = torch.tensor([8.0 * 2**i for i in range(self.nl)])


class _Model(nn.Module):
    def __init__(self, anchors: list[list[list[float]]], nc: int = 3) -> None:
        super().__init__()
        self.det = _Detect(anchors, nc)

    @property
    def detect(self) -> _Detect:
        return self.det


class _Wrapper(nn.Module):
    """Looks like DistributedDataParallel to the loss: the real model sits in ``.module``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model


# One level, anchors 1, 5 and 25 grid cells: a target of side ~1.2 matches only anchor 0.
ONE_LEVEL = [[[1.0, 1.0], [5.0, 5.0], [25.0, 25.0]]]
GRID = 8


def _preds(bs: int = 2, nc: int = 3, grid: int = GRID, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bs, 3, grid, grid, nc + 5, generator=g)]


def _target(img: int, cls: int, gx: float, gy: float, gw: float, gh: float, grid: int = GRID) -> list[float]:
    """A target row from grid-unit coordinates."""
    return [img, cls, gx / grid, gy / grid, gw / grid, gh / grid]


# ---------------------------------------------------------------- parity with the reference


@pytest.mark.parametrize("scaled", [False, True])
def test_parity_with_yolov5(ref: dict, yolov5n, scaled: bool) -> None:
    hyps = json.loads(str(ref["hyp_json"]))
    hyp = scale_hyp(hyps["raw"], 3, 80, 320) if scaled else hyps["raw"]
    preds = [torch.from_numpy(ref[f"train_out_320_{i}"]) for i in range(3)]
    total, items = DetectionLoss(yolov5n, hyp)(preds, torch.from_numpy(ref["targets_320"]))
    tag = "scaled_320" if scaled else "320"
    assert total.shape == (1,) and items.shape == (3,)
    expected = [float(ref[f"{k}_{tag}"]) for k in ("lbox", "lobj", "lcls")]
    np.testing.assert_allclose(items.numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(total.item(), float(ref[f"loss_{tag}"]), rtol=1e-5)


def test_scale_hyp_matches_training(ref: dict) -> None:
    hyps = json.loads(str(ref["hyp_json"]))
    raw = dict(hyps["raw"])
    out = scale_hyp(raw, 3, 80, 320)
    assert raw == hyps["raw"], "scale_hyp must not modify its input"
    assert out.keys() == hyps["scaled"].keys()
    for k, v in hyps["scaled"].items():
        assert out[k] == pytest.approx(v), k
    # other depths / class counts / sizes
    o = scale_hyp({"box": 0.05, "obj": 1.0, "cls": 0.5}, nl=4, nc=10, imgsz=1280)
    assert o["box"] == pytest.approx(0.05 * 3 / 4)
    assert o["cls"] == pytest.approx(0.5 * 10 / 80 * 3 / 4)
    assert o["obj"] == pytest.approx(1.0 * 4 * 3 / 4)


def test_model_anchors_match_reference(ref: dict, yolov5n) -> None:
    np.testing.assert_allclose(yolov5n.detect.anchors.numpy(), ref["anchors"])


# ---------------------------------------------------------------- hand-worked limiting cases


def test_perfect_box_gives_zero_box_loss() -> None:
    model = _Model(ONE_LEVEL)
    # Centre at fractional 0.5 in cell (3, 2): no neighbour cells, so one positive (anchor 0).
    gx, gy, gw, gh = 3.5, 2.5, 1.2, 0.9
    preds = _preds()
    p = preds[0]
    # Invert the decoding: 2σ − 0.5 = 0.5 → σ = 0.5; (2σ)²·1 = gw → σ = √gw / 2.
    p[1, 0, 2, 3, 0:2] = 0.0
    p[1, 0, 2, 3, 2] = torch.logit(torch.tensor(gw**0.5 / 2))
    p[1, 0, 2, 3, 3] = torch.logit(torch.tensor(gh**0.5 / 2))
    loss = DetectionLoss(model, HYP)
    targets = torch.tensor([_target(1, 2, gx, gy, gw, gh)])
    _, items = loss(preds, targets)
    assert items[0].item() == pytest.approx(0.0, abs=1e-6)
    # Objectness target is CIoU = 1 at that one cell, 0 elsewhere.
    obj_target = torch.zeros(p.shape[:4])
    obj_target[1, 0, 2, 3] = 1.0
    want = F.binary_cross_entropy_with_logits(p[..., 4], obj_target) * 4.0 * HYP["obj"]  # balance[0] = 4 (nl=1)
    assert items[1].item() == pytest.approx(want.item(), rel=1e-5)


def test_no_targets_is_background_only() -> None:
    anchors = [[[1.0, 1.3], [2.0, 3.7], [4.1, 2.9]]] * 3
    model = _Model(anchors, nc=3)
    g = torch.Generator().manual_seed(1)
    preds = [torch.randn(2, 3, s, s, 8, generator=g, requires_grad=True) for s in (8, 4, 2)]
    total, items = DetectionLoss(model, HYP)(preds, torch.zeros(0, 6))
    assert items[0].item() == 0.0 and items[2].item() == 0.0
    want = sum(
        bal * F.binary_cross_entropy_with_logits(p[..., 4], torch.zeros_like(p[..., 4]))
        for bal, p in zip([4.0, 1.0, 0.4], preds)
    )
    assert items[1].item() == pytest.approx(want.item() * HYP["obj"], rel=1e-6)
    assert total.item() == pytest.approx(items.sum().item() * 2, rel=1e-6)


def test_label_smoothing_targets() -> None:
    assert smooth_bce_targets(0.0) == (1.0, 0.0)
    cp, cn = smooth_bce_targets(0.1)
    assert cp == pytest.approx(0.95) and cn == pytest.approx(0.05)
    # The class loss of one positive uses exactly those targets.
    model = _Model(ONE_LEVEL, nc=4)
    preds = _preds(nc=4)
    hyp = {**HYP, "label_smoothing": 0.1}
    _, items = DetectionLoss(model, hyp)(preds, torch.tensor([_target(0, 2, 3.5, 2.5, 1.2, 0.9)]))
    logits = preds[0][0, 0, 2, 3, 5:]
    want = F.binary_cross_entropy_with_logits(logits, torch.tensor([0.05, 0.05, 0.95, 0.05]))
    assert items[2].item() == pytest.approx(want.item() * HYP["cls"], rel=1e-6)


def test_single_class_has_no_class_loss() -> None:
    model = _Model(ONE_LEVEL, nc=1)
    _, items = DetectionLoss(model, HYP)(_preds(nc=1), torch.tensor([_target(0, 0, 3.5, 2.5, 1.2, 0.9)]))
    assert items[2].item() == 0.0 and items[0].item() > 0


def test_anchor_ratio_rule_rejects_mismatched_shapes() -> None:
    model = _Model(ONE_LEVEL)
    loss = DetectionLoss(model, HYP)
    preds = _preds()
    # 7.0 × 0.2 cells: worst ratios 7 (anchor 1×1), 25 (5×5), 125 (25×25), all beyond anchor_t = 4.
    (pos,) = loss.assign(preds, torch.tensor([_target(0, 1, 3.5, 2.5, 7.0, 0.2)]))
    assert pos.count == 0
    _, items = loss(preds, torch.tensor([_target(0, 1, 3.5, 2.5, 7.0, 0.2)]))
    assert items[0].item() == 0.0 and items[2].item() == 0.0
    # A looser anchor_t = 30 admits the 1×1 and 5×5 anchors (7, 25 < 30), not the 25×25 one.
    loose = DetectionLoss(model, {**HYP, "anchor_t": 30.0})
    (pos,) = loose.assign(preds, torch.tensor([_target(0, 1, 3.5, 2.5, 7.0, 0.2)]))
    assert sorted(pos.anchor.tolist()) == [0, 1]


def test_anchor_ratio_threshold_is_strict_and_symmetric() -> None:
    anchors = torch.tensor([[2.0, 2.0]])
    # ratio exactly anchor_t on either side (8/2 = 4, 2/0.5 = 4) is rejected; just inside is kept
    wh = torch.tensor([[8.0, 2.0], [2.0, 0.5], [7.9, 2.0], [2.0, 0.51]])
    t_idx, a_idx = match_anchors(wh, anchors, 4.0)
    assert t_idx.tolist() == [2, 3] and a_idx.tolist() == [0, 0]


def _cells(pos) -> list[tuple[int, int]]:
    """(gy, gx) pairs of one level's positives, in listing order."""
    return list(zip(pos.gy.tolist(), pos.gx.tolist()))


@pytest.mark.parametrize(
    ("centre", "cells"),
    [
        ((5.3, 5.3), {(5, 5), (5, 4), (4, 5)}),  # leans left and up
        ((5.7, 5.7), {(5, 5), (5, 6), (6, 5)}),  # leans right and down
        ((5.3, 5.7), {(5, 5), (5, 4), (6, 5)}),  # (gy, gx) pairs: left in x, down in y
        ((5.5, 5.5), {(5, 5)}),  # exactly centred: leans nowhere
        ((5.5, 5.2), {(5, 5), (4, 5)}),  # centred in x only: one neighbour
        ((0.3, 0.3), {(0, 0)}),  # leans out of the grid: no neighbour
        ((1.2, 0.7), {(0, 1), (0, 0), (1, 1)}),  # lower-x neighbour is column 0, upper-y is row 1
        ((GRID - 0.3, GRID - 0.3), {(GRID - 1, GRID - 1)}),  # far edge likewise
        ((GRID - 1.2, GRID - 0.7), {(GRID - 1, GRID - 2), (GRID - 1, GRID - 1), (GRID - 2, GRID - 2)}),
    ],
)
def test_neighbour_cells(centre: tuple[float, float], cells: set) -> None:
    model = _Model(ONE_LEVEL)
    loss = DetectionLoss(model, HYP)
    t = torch.tensor([_target(0, 0, centre[0], centre[1], 1.2, 0.9)])
    (pos,) = loss.assign(_preds(), t)
    assert pos.count == len(cells)  # one anchor matches, so the count equals the cells
    assert set(_cells(pos)) == cells
    assert (pos.anchor == 0).all() and (pos.img == 0).all() and (pos.cls == 0).all()
    # The box target's xy is the centre relative to each assigned cell's corner, within (−0.5, 1.5).
    xy = torch.tensor(centre, dtype=torch.float32)
    assert torch.allclose(pos.box[:, 0] + pos.gx, xy[0].expand(pos.count))
    assert torch.allclose(pos.box[:, 1] + pos.gy, xy[1].expand(pos.count))
    assert ((pos.box[:, :2] > -0.5) & (pos.box[:, :2] < 1.5)).all()
    assert torch.allclose(pos.box[:, 2:], torch.tensor([1.2, 0.9]).expand(pos.count, 2))
    assert torch.allclose(pos.anchor_wh, torch.tensor([1.0, 1.0]).expand(pos.count, 2))


def test_centre_on_a_cell_border_gets_yolov5s_cells_duplicates_included() -> None:
    # x = 3.0: own 3, lower ⌊2.5⌋ = 2 (frac 0 < ½, 3 > 1), upper ⌊3.5⌋ = 3 again (frac(8 − 3) = 0, 5 > 1);
    # y = 1.0: own 1, no lower (1 > 1 fails), upper ⌊1.5⌋ = 1 again. (0, 0): no lower, both uppers = own.
    row, cell = training_cells(torch.tensor([[3.0, 1.0], [0.0, 0.0]]), (GRID, GRID))
    assert row.tolist() == [0, 1, 0, 0, 1, 0, 1]  # own, own, lower-x, upper-x ×2, upper-y ×2
    assert cell.tolist() == [[3, 1], [0, 0], [2, 1], [3, 1], [0, 0], [3, 1], [0, 0]]


def test_indices_are_clamped_on_the_border() -> None:
    model = _Model(ONE_LEVEL)
    loss = DetectionLoss(model, HYP)
    t = torch.tensor([_target(0, 0, float(GRID), float(GRID), 1.2, 0.9)])  # centre exactly on the far edge
    (pos,) = loss.assign(_preds(), t)
    # own ⌊8⌋ and both lower neighbours ⌊7.5⌋ clamp to the last cell (YOLOv5 lists it three times), the
    # centre 1.0 from its corner (reachable: decoded xy < 1.5); no upper neighbour (8 − 8 = 0 is not > 1)
    assert _cells(pos) == [(GRID - 1, GRID - 1)] * 3
    assert pos.box[:, :2].tolist() == [[1.0, 1.0]] * 3


def test_listing_order_own_cells_then_neighbours_by_side_and_axis() -> None:
    # rows: 0 leans lower-x and upper-y; 1 leans upper-x and lower-y
    row, cell = training_cells(torch.tensor([[3.2, 3.7], [5.8, 5.1]]), (GRID, GRID))
    assert row.tolist() == [0, 1, 0, 1, 1, 0]
    assert cell.tolist() == [[3, 3], [5, 5], [2, 3], [5, 4], [6, 5], [3, 4]]


def test_target_matching_two_anchors_trains_both() -> None:
    model = _Model(ONE_LEVEL)
    # side 2.2: ratios 2.2 (1×1 anchor) and 2.27 (5×5) pass anchor_t = 4; 25/2.2 = 11.4 does not
    (pos,) = DetectionLoss(model, HYP).assign(_preds(), torch.tensor([_target(1, 2, 4.3, 4.6, 2.2, 2.2)]))
    assert pos.count == 6  # 2 anchors × (own + lower-x + upper-y)
    assert sorted(zip(pos.anchor.tolist(), _cells(pos))) == sorted(
        (a, c) for a in (0, 1) for c in ((4, 4), (4, 3), (5, 4))
    )
    assert torch.equal(pos.anchor_wh, model.detect.anchors[0][pos.anchor])
    assert (pos.img == 1).all() and (pos.cls == 2).all()


def test_shared_cell_objectness_goes_to_the_neighbour_listed_last() -> None:
    """Two targets, same image and anchor, each one's neighbour is the other's own cell.

    Own cells are listed before neighbours, so in each cell the neighbour's CIoU sets the objectness
    target (the reference's rule); the other way round gives a different loss.
    """
    model = _Model(ONE_LEVEL)
    preds = _preds(bs=1)
    a = _target(0, 0, 4.7, 5.5, 1.2, 0.9)  # own (y5, x4), upper-x neighbour (5, 5)
    b = _target(0, 0, 5.2, 5.5, 1.4, 1.1)  # own (5, 5), lower-x neighbour (5, 4)
    _, items = DetectionLoss(model, HYP)(preds, torch.tensor([a, b]))

    p = preds[0][0]  # (na, ny, nx, no) of the one image
    anchor = torch.tensor([[1.0, 1.0]])

    def ciou_at(cell_x: int, t: list[float]) -> float:
        box = torch.tensor([[t[2] * GRID - cell_x, t[3] * GRID - 5, t[4] * GRID, t[5] * GRID]])
        return complete_iou(decode_cell_boxes(p[0, 5, cell_x, :4][None], anchor), box).clamp(min=0).item()

    def obj_loss(at4: float, at5: float) -> float:
        obj_target = torch.zeros(p.shape[:3])
        obj_target[0, 5, 4], obj_target[0, 5, 5] = at4, at5
        return F.binary_cross_entropy_with_logits(p[..., 4], obj_target).item() * 4.0 * HYP["obj"]

    neighbour_wins = obj_loss(ciou_at(4, b), ciou_at(5, a))
    own_wins = obj_loss(ciou_at(4, a), ciou_at(5, b))
    assert abs(neighbour_wins - own_wins) > 1e-4  # the case does tell the two rules apart
    assert items[1].item() == pytest.approx(neighbour_wins, rel=1e-6)


def test_gradient_flows_and_ddp_unwrap() -> None:
    model = _Wrapper(_Model(ONE_LEVEL))
    preds = [p.requires_grad_() for p in _preds()]
    targets = torch.tensor([_target(0, 1, 5.3, 5.3, 1.2, 0.9), _target(1, 2, 2.6, 3.1, 0.8, 1.7)])
    total, items = DetectionLoss(model, HYP)(preds, targets)
    assert not items.requires_grad
    total.backward()
    grad = preds[0].grad
    assert torch.isfinite(grad).all()
    # box and class channels get gradient at the positive cell, objectness everywhere
    assert grad[0, 0, 5, 5, :4].abs().sum() > 0 and grad[0, 0, 5, 5, 5:].abs().sum() > 0
    assert (grad[..., 4] != 0).all()


def test_objectness_and_positives_gradient_with_repeated_cells() -> None:
    """The loss's one-buffer gather: gradcheck, and equal to autograd's slice + index backwards."""
    from utils.loss import _ObjectnessAndPositives

    g = torch.Generator().manual_seed(3)
    p = torch.randn(2, 3, 4, 5, 8, dtype=torch.float64, generator=g, requires_grad=True)
    index = (torch.tensor([0, 1, 1, 1]), torch.tensor([2, 0, 0, 1]), torch.tensor([3, 1, 1, 0]),
             torch.tensor([4, 2, 2, 0]))  # the 2nd and 3rd positives share a cell
    w_obj = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g)
    w_rows = torch.randn(4, 8, dtype=torch.float64, generator=g)

    def weighted(obj: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return (obj * w_obj).sum() + (rows.tanh() * w_rows).sum()

    assert torch.autograd.gradcheck(lambda x: weighted(*_ObjectnessAndPositives.apply(x, *index)), (p,))
    ours = torch.autograd.grad(weighted(*_ObjectnessAndPositives.apply(p, *index)), p)[0]
    ref = torch.autograd.grad(weighted(p[..., 4], p[index]), p)[0]
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-15)
    obj, rows = _ObjectnessAndPositives.apply(p, *index)
    assert obj.is_contiguous() and torch.equal(obj, p[..., 4]) and torch.equal(rows, p[index])


def test_half_inputs_are_computed_in_fp32() -> None:
    model = _Model(ONE_LEVEL)
    preds = _preds()
    targets = torch.tensor([_target(0, 1, 5.3, 5.3, 1.2, 0.9)])
    loss = DetectionLoss(model, HYP)
    total16, _ = loss([p.half() for p in preds], targets)
    total32, _ = loss([p.half().float() for p in preds], targets)
    assert total16.dtype == torch.float32
    assert total16.item() == pytest.approx(total32.item(), rel=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast region must not leak in
        total_ac, _ = loss(preds, targets)
    assert total_ac.dtype == torch.float32
    assert total_ac.item() == pytest.approx(loss(preds, targets)[0].item(), rel=1e-6)


def test_focal_loss_reduces_easy_negatives() -> None:
    model = _Model(ONE_LEVEL)
    preds = _preds()
    preds[0][..., 4] = -6.0  # confidently background: focal weighting makes these nearly free
    t = torch.tensor([_target(0, 1, 5.3, 5.3, 1.2, 0.9)])
    _, plain = DetectionLoss(model, HYP)(preds, t)
    _, focal = DetectionLoss(model, {**HYP, "fl_gamma": 1.5})(preds, t)
    assert 0 < focal[1] < plain[1]
    assert focal[0] == plain[0]  # focal applies to BCE terms only


def test_duplicate_positions_last_value_wins() -> None:
    dst = torch.zeros(1, 1, 2, 2)
    idx = tuple(torch.tensor(v) for v in ([0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1], [0, 0, 1, 0]))
    put_last_wins(dst, idx, torch.tensor([0.2, 0.7, 0.4, 0.9]))
    assert dst[0, 0, 1, 0].item() == pytest.approx(0.9) and dst[0, 0, 0, 1].item() == pytest.approx(0.4)
    assert dst[0, 0, 0, 0].item() == 0.0 and dst[0, 0, 1, 1].item() == 0.0
    # many repeats in a larger tensor: the same as assigning one by one in order
    g = torch.Generator().manual_seed(3)
    idx = tuple(torch.randint(0, s, (500,), generator=g) for s in (2, 3, 4, 4))
    vals = torch.rand(500, generator=g)
    want = torch.zeros(2, 3, 4, 4)
    for k in range(500):
        want[idx[0][k], idx[1][k], idx[2][k], idx[3][k]] = vals[k]
    got = torch.zeros(2, 3, 4, 4)
    put_last_wins(got, idx, vals)
    assert torch.equal(got, want)


def test_complete_iou_limiting_cases() -> None:
    """CIoU = IoU − ρ²/c² − α·v (Zheng et al. 2020), on boxes worked by hand."""
    box = torch.tensor([[0.5, 0.5, 1.0, 2.0]])
    assert complete_iou(box, box).item() == pytest.approx(1.0, abs=1e-6)
    # same shape, disjoint, centres 2 apart in x: IoU 0, v 0, enclosing box 3×2 → −4/13
    other = torch.tensor([[2.5, 0.5, 1.0, 2.0]])
    assert complete_iou(box, other).item() == pytest.approx(-4 / 13, rel=1e-5)
    # same centre, 1×1 inside 2×2: IoU 1/4, ρ = 0, v = 0 (same aspect)
    a, b = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    assert complete_iou(a, b).item() == pytest.approx(0.25, rel=1e-5)
    # same centre, 2×1 vs 1×1: IoU 1/2, v = 4/π²·(atan 2 − π/4)², α = v / (1 − IoU + v)
    a, b = torch.tensor([[0.0, 0.0, 2.0, 1.0]]), torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    v = 4 / np.pi**2 * (np.arctan(2.0) - np.pi / 4) ** 2
    assert complete_iou(a, b).item() == pytest.approx(0.5 - v * v / (0.5 + v), rel=1e-5)


def test_ciou_gradient_treats_alpha_as_constant() -> None:
    # d(α·v)/dw with α held fixed: the gradient of −CIoU equals that of −(IoU − α_const·v)
    a = torch.tensor([[0.1, -0.2, 2.0, 1.3]], requires_grad=True)
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    complete_iou(a, b).sum().backward()
    a2 = a.detach().clone().requires_grad_()
    x1, y1, w, h = a2[0]
    inter = (torch.minimum(x1 + w / 2, torch.tensor(0.5)) - torch.maximum(x1 - w / 2, torch.tensor(-0.5))) * (
        torch.minimum(y1 + h / 2, torch.tensor(0.5)) - torch.maximum(y1 - h / 2, torch.tensor(-0.5)))
    iou = inter / (w * h + 1 - inter)
    rho2 = x1**2 + y1**2
    c2 = (torch.maximum(x1 + w / 2, torch.tensor(0.5)) - torch.minimum(x1 - w / 2, torch.tensor(-0.5))) ** 2 + (
        torch.maximum(y1 + h / 2, torch.tensor(0.5)) - torch.minimum(y1 - h / 2, torch.tensor(-0.5))) ** 2
    v = 4 / np.pi**2 * (np.pi / 4 - torch.atan(w / h)) ** 2
    alpha = (v / (1 - iou + v)).detach()
    (iou - rho2 / c2 - alpha * v).backward()
    assert torch.allclose(a.grad, a2.grad, rtol=1e-4, atol=1e-6)


def test_missing_hyp_key_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="anchor_t"):
        DetectionLoss(_Model(ONE_LEVEL), {"box": 0.05, "obj": 1.0, "cls": 0.5})


ORACLE_LOSS = FIXTURES / "oracle_loss"
LOSS_CASES = json.loads((ORACLE_LOSS / "cases.json").read_text())


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_loss_equals_yolov5s_on_its_own_cases(case: str) -> None:
    """YOLOv5 7.0's ComputeLoss on seven cases (tests/fixtures/oracle_loss: label smoothing, one class, focal
    loss, centres on cell borders, tiny/huge/thin boxes, no targets): our loss gives its total and items."""
    from models import load_model

    meta, want = LOSS_CASES[case], json.loads((ORACLE_LOSS / "oracle.json").read_text())[case]
    arrays = np.load(ORACLE_LOSS / "cases.npz")
    model = load_model("models/yolov5n.yaml", nc=meta["nc"])
    np.testing.assert_allclose(model.detect.anchors.numpy(), want["anchors"])  # the same grid-unit anchors
    preds = [torch.from_numpy(arrays[f"{case}_p{i}"].astype(np.float32)) for i in range(3)]
    total, items = DetectionLoss(model, meta["hyp"])(preds, torch.from_numpy(arrays[f"{case}_targets"]))
    assert float(total) == pytest.approx(want["loss"], rel=1e-6)
    np.testing.assert_allclose(items.numpy(), want["items"], rtol=1e-6, atol=1e-7)
