"""Box converters, clipping, letterbox undo and the NMS candidate rules, on hand-worked boxes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from utils.boxes import (
    clip_boxes,
    non_max_suppression,
    scale_boxes,
    xywh2xyxy,
    xywhn2xyxy,
    xyxy2xywh,
    xyxy2xywhn,
)

ROOT = Path(__file__).resolve().parents[1]
XYWH = [[50.0, 40.0, 20.0, 10.0], [5.0, 6.0, 4.0, 8.0]]
XYXY = [[40.0, 35.0, 60.0, 45.0], [3.0, 2.0, 7.0, 10.0]]


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_converters_hand_worked_and_inverse(kind: str) -> None:
    make = torch.tensor if kind == "torch" else (lambda v: np.array(v, dtype=np.float32))
    xywh = make(XYWH)
    xyxy = xywh2xyxy(xywh)
    assert type(xyxy) is type(xywh) and xyxy.dtype == xywh.dtype
    np.testing.assert_allclose(np.asarray(xyxy), XYXY)
    np.testing.assert_allclose(np.asarray(xyxy2xywh(xyxy)), XYWH)
    np.testing.assert_allclose(np.asarray(xywh), XYWH)  # input untouched
    # leading dimensions pass through
    batch = make([XYWH, XYWH, XYWH])
    assert tuple(xywh2xyxy(batch).shape) == (3, 2, 4)
    np.testing.assert_allclose(np.asarray(xywh2xyxy(batch))[2], XYXY)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_normalised_converters(kind: str) -> None:
    make = torch.tensor if kind == "torch" else np.array
    w, h = 100.0, 80.0
    n = make([[0.5, 0.5, 0.2, 0.25]])
    px = xywhn2xyxy(n, w, h, padw=3.0, padh=-2.0)
    np.testing.assert_allclose(np.asarray(px), [[43.0, 28.0, 63.0, 48.0]])
    back = xyxy2xywhn(xywhn2xyxy(n, w, h), w, h)
    np.testing.assert_allclose(np.asarray(back), np.asarray(n), rtol=1e-6)
    # clip: a box hanging over the right/bottom edge is cut to (w − eps, h − eps) first
    over = make([[90.0, 70.0, 120.0, 95.0]])
    got = np.asarray(xyxy2xywhn(over, w, h, clip=True, eps=1e-3))
    np.testing.assert_allclose(got, [[(90 + 99.999) / 2 / w, (70 + 79.999) / 2 / h, 9.999 / w, 9.999 / h]], rtol=1e-5)
    assert np.asarray(over)[0, 2] == 120.0  # input untouched


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_clip_boxes(kind: str) -> None:
    make = torch.tensor if kind == "torch" else np.array
    boxes = make([[-5.0, -1.0, 30.0, 50.0], [2.0, 3.0, 4.0, 5.0]])
    got = clip_boxes(boxes, (40, 25))  # (h, w)
    np.testing.assert_allclose(np.asarray(got), [[0.0, 0.0, 25.0, 40.0], [2.0, 3.0, 4.0, 5.0]])
    assert np.asarray(boxes)[0, 0] == -5.0  # a new object, the input is untouched


@pytest.mark.parametrize("given", [True, False])
def test_scale_boxes_undoes_a_letterbox(given: bool) -> None:
    h0, w0 = 300, 400  # original image
    h1, w1 = 320, 320  # letterboxed: gain 0.8, picture 320×240 centred, 40 px bands top and bottom
    gain, pad = 0.8, (0.0, 40.0)
    orig = torch.tensor([[10.0, 20.0, 200.0, 290.0], [350.0, 0.0, 400.0, 300.0]])
    boxed = orig * gain + torch.tensor([pad[0], pad[1], pad[0], pad[1]])
    ratio_pad = ((gain, gain), pad) if given else None
    got = scale_boxes((h1, w1), boxed.clone(), (h0, w0), ratio_pad)
    assert torch.allclose(got, orig, atol=1e-4)
    # a box reaching into the padding band is clipped to the original image
    band = torch.tensor([[0.0, 0.0, 20.0, 50.0]])
    assert scale_boxes((h1, w1), band, (h0, w0), ratio_pad)[0].tolist() == pytest.approx([0.0, 0.0, 25.0, 12.5])
    # numpy takes the same path
    np.testing.assert_allclose(scale_boxes((h1, w1), boxed.numpy(), (h0, w0), ratio_pad), orig.numpy(), atol=1e-4)


def _pred(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)[None]


def test_nms_single_label_takes_the_best_class_before_the_class_filter() -> None:
    # one box, class 1 scores 0.72, class 0 0.45: single-label proposes only class 1
    rows = [[50, 50, 20, 20, 0.9, 0.5, 0.8]]
    (out,) = non_max_suppression(_pred(rows), 0.25, 0.45)
    assert out[:, 5].tolist() == [1.0] and out[0, 4].item() == pytest.approx(0.72)
    # asking for class 0 only: its best class is 1, so single-label gives nothing ...
    assert non_max_suppression(_pred(rows), 0.25, 0.45, classes=[0])[0].shape == (0, 6)
    # ... while multi-label still proposes (box, class 0)
    (multi,) = non_max_suppression(_pred(rows), 0.25, 0.45, classes=[0], multi_label=True)
    assert multi[:, 5].tolist() == [0.0] and multi[0, 4].item() == pytest.approx(0.45)


def test_nms_threshold_is_on_obj_times_cls_and_strict() -> None:
    rows = [[50, 50, 20, 20, 0.5, 0.5, 0.2], [150, 50, 20, 20, 0.9, 0.3, 0.2]]  # scores 0.25 and 0.27
    (out,) = non_max_suppression(_pred(rows), 0.25, 0.45, multi_label=True)
    assert out.shape == (1, 6) and out[0, 4].item() == pytest.approx(0.27)
    assert torch.allclose(out[0, :4], torch.tensor([140.0, 40.0, 160.0, 60.0]))


def test_nms_empty_and_single_class_and_list_input() -> None:
    nothing = _pred([[50, 50, 20, 20, 0.1, 0.9]])
    (out,) = non_max_suppression(nothing, 0.25, 0.45)
    assert out.shape == (0, 6)
    one_class = _pred([[50, 50, 20, 20, 0.8, 0.5], [52, 50, 20, 20, 0.9, 0.9]])
    (out,) = non_max_suppression((one_class, []), 0.25, 0.45, multi_label=True)  # eval-mode (decoded, raw)
    assert out.shape == (1, 6) and out[0, 4].item() == pytest.approx(0.81) and out[0, 5].item() == 0


def test_nms_agnostic_lets_classes_suppress_each_other() -> None:
    # two nearly identical boxes, one per class (scores 0.8·0.9 = 0.72 and 0.9·0.9 = 0.81)
    rows = [[50, 50, 20, 20, 0.8, 0.9, 0.0], [51, 50, 20, 20, 0.9, 0.0, 0.9]]
    (aware,) = non_max_suppression(_pred(rows), 0.25, 0.45)
    assert sorted(aware[:, 5].tolist()) == [0.0, 1.0]
    (agnostic,) = non_max_suppression(_pred(rows), 0.25, 0.45, agnostic=True)
    assert agnostic.shape == (1, 6) and agnostic[0, 5].item() == 1.0 and agnostic[0, 4].item() == pytest.approx(0.81)
    far = [[50, 50, 20, 20, 0.8, 0.9, 0.0], [150, 50, 20, 20, 0.9, 0.0, 0.9]]  # apart: both stay
    assert non_max_suppression(_pred(far), 0.25, 0.45, agnostic=True)[0].shape == (2, 6)


def test_nms_caps_candidates_at_max_nms_by_score() -> None:
    rows = [[10 + 30 * i, 10, 20, 20, 0.3 + 0.01 * i, 1.0] for i in range(30)]  # disjoint boxes
    (out,) = non_max_suppression(_pred(rows), 0.25, 0.45, max_nms=5)
    assert out.shape[0] == 5
    assert out[:, 4].tolist() == pytest.approx([0.59, 0.58, 0.57, 0.56, 0.55])


def test_nms_batch_keeps_images_apart() -> None:
    a = [[50, 50, 20, 20, 0.9, 0.9, 0.1]]
    b = [[50, 50, 20, 20, 0.8, 0.1, 0.9]]
    outs = non_max_suppression(torch.cat((_pred(a), _pred(b))), 0.25, 0.45)
    assert [o[:, 5].tolist() for o in outs] == [[0.0], [1.0]]


@pytest.mark.parametrize("spread", [40.0, 400.0])  # crowded (most suppressed: prefixes grow) / spread out
def test_nms_score_prefix_shortcut_equals_full_batched_nms(spread: float) -> None:
    from torchvision.ops import batched_nms

    from utils.boxes import _first_kept

    g = torch.Generator().manual_seed(3)
    n = 5000
    xy = torch.rand(n, 2, generator=g) * spread
    wh = 4 + torch.rand(n, 2, generator=g) * 30
    boxes = torch.cat((xy, xy + wh), 1)
    scores = torch.randperm(n, generator=g).float() / n  # distinct scores: one greedy order
    cls = torch.randint(0, 4, (n,), generator=g)
    for max_det in (1, 30, 300, 3000):
        full = batched_nms(boxes, scores, cls, 0.5)[:max_det]
        assert torch.equal(_first_kept(boxes, scores, cls, 0.5, max_det), full)


# ------------------------------------------------------------- our tensor box ops vs torchvision.ops
def _random_xyxy(n: int, g: torch.Generator, dtype: torch.dtype = torch.float32, lo: float = -20.0,
                 spread: float = 300.0) -> torch.Tensor:
    xy = lo + torch.rand(n, 2, generator=g, dtype=dtype) * spread
    return torch.cat((xy, xy + torch.rand(n, 2, generator=g, dtype=dtype) * 60), 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_box_ops_equal_torchvision(dtype: torch.dtype) -> None:
    from torchvision import ops

    from utils.boxes import box_iou

    g = torch.Generator().manual_seed(0)
    a, b = _random_xyxy(200, g, dtype), _random_xyxy(150, g, dtype)
    iou = box_iou(a, b)
    assert iou.dtype == dtype and iou.shape == (200, 150)
    assert torch.equal(iou, ops.box_iou(a, b))
    assert (iou > 0).any() and (iou == 0).any()  # overlapping and disjoint pairs both present
    assert torch.equal(xywh2xyxy(a), ops.box_convert(a, "cxcywh", "xyxy"))
    assert torch.equal(xyxy2xywh(a), ops.box_convert(a, "xyxy", "cxcywh"))
    clipped = clip_boxes(a, (100.5, 200))
    assert torch.equal(clipped, ops.clip_boxes_to_image(a, (100.5, 200)))  # type: ignore[arg-type]
    assert clipped[:, 0::2].max() == 200 and clipped[:, 1::2].max() == 100.5 and clipped.min() == 0


def _nms_per_class(boxes: torch.Tensor, scores: torch.Tensor, cls: torch.Tensor, thres: float) -> torch.Tensor:
    """Reference: ``torchvision.ops.nms`` run on each class alone, kept indices best first."""
    from torchvision.ops import nms

    groups = [(cls == c).nonzero().squeeze(1) for c in cls.unique()]
    kept = torch.cat([idx[nms(boxes[idx], scores[idx], thres)] for idx in groups])
    return kept[scores[kept].argsort(descending=True)]


# (boxes, classes): one call on shifted classes (1 class; 400 boxes in 80 classes; 100 boxes) or
# one call per class (3000 boxes in 3 or 80 classes): both routes must give per-class NMS's answer
@pytest.mark.parametrize(("n", "n_classes"), [(3000, 1), (3000, 3), (3000, 80), (400, 80), (100, 3)])
@pytest.mark.parametrize("lo", [0.0, -50.0])  # pre-clip boxes can start left of / above the image
def test_batched_nms_equals_nms_per_class(n: int, n_classes: int, lo: float) -> None:
    from utils.boxes import batched_nms

    g = torch.Generator().manual_seed(n_classes)
    boxes = _random_xyxy(n, g, lo=lo, spread=300 * (n / n_classes / 1000) ** 0.5)  # equally crowded classes
    scores = torch.randperm(n, generator=g).float() / n  # distinct: one greedy order
    cls = torch.randint(0, n_classes, (n,), generator=g)
    for thres in (0.3, 0.45, 0.7):
        ours = batched_nms(boxes, scores, cls, thres)
        assert ours.dtype == torch.long
        assert torch.equal(ours, _nms_per_class(boxes, scores, cls, thres))
        assert 0 < ours.numel() < n  # something suppressed, something kept
    assert batched_nms(boxes[:0], scores[:0], cls[:0], 0.5).numel() == 0


def test_batched_nms_keeps_classes_apart_left_of_the_image() -> None:
    # torchvision.ops.batched_nms shifts class c by c·(max coordinate + 1) for small inputs: with
    # boxes left of / above the image (pre-clip predictions) that shift is negative and classes overlap
    from torchvision.ops import batched_nms as tv_batched_nms

    from utils.boxes import batched_nms

    boxes = torch.tensor([[-50.0, -50.0, -1.0, -1.0]] * 2)  # max coordinate −1: torchvision shifts by 0
    scores, cls = torch.tensor([0.9, 0.8]), torch.tensor([0, 1])
    assert batched_nms(boxes, scores, cls, 0.45).tolist() == [0, 1]
    assert tv_batched_nms(boxes, scores, cls, 0.45).tolist() == [0]  # the case this guards against


def test_batched_nms_never_suppresses_across_classes() -> None:
    from utils.boxes import batched_nms

    same_box = torch.tensor([[10.0, 10.0, 50.0, 50.0]] * 3)
    scores = torch.tensor([0.9, 0.8, 0.7])
    assert batched_nms(same_box, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [0, 1]
    assert batched_nms(same_box, scores, torch.tensor([0, 1, 2]), 0.5).tolist() == [0, 1, 2]


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_the_inference_path_does_not_import_torchvision() -> None:
    # val.py, detect.py and evaluate's NMS run on torchvision's kernel without its ~1.8 s package import
    proc = _python(
        "import sys, torch\n"
        "import val, detect, engine.validate, engine.predict\n"
        "from utils.boxes import non_max_suppression\n"
        "rows = [[50., 50, 20, 20, 0.9, 0.9], [52, 50, 20, 20, 0.8, 0.9], [150, 50, 20, 20, 0.7, 0.9]]\n"
        "out = non_max_suppression(torch.tensor([rows]), 0.25, 0.45)[0]\n"
        "print(*[round(s, 4) for s in out[:, 4].tolist()], 'torchvision' in sys.modules)\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["0.81", "0.63", "False"]  # the 2 px shifted copy (IoU 0.82) is suppressed


def test_nms_kernel_falls_back_to_the_package_import() -> None:
    # an install whose compiled extension has another name: importing torchvision registers the op
    proc = _python(
        "import sys, torch\n"
        "import utils.boxes as b\n"
        "b._KERNEL_LIBRARIES = ('no_such_library',)\n"
        "keep = b.batched_nms(torch.tensor([[0., 0, 10, 10], [1, 1, 10, 10]]), torch.tensor([0.9, 0.8]),\n"
        "                     torch.tensor([0, 0]), 0.5)\n"
        "print(keep.tolist(), 'torchvision' in sys.modules)\n"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["[0]", "True"]
