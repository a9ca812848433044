"""YOLOv5 detection loss: CIoU box regression, objectness BCE and class BCE over the levels.

Notation: ``bs`` batch size, ``na`` anchors per level, ``nl`` levels, ``nc`` classes, ``no = nc + 5``
outputs per anchor, ``(ny, nx)`` the grid of a level, ``nt`` targets, ``n`` positives of a level.

Two stages, each its own function:

1. Assignment (:meth:`DetectionLoss.assign`): per level, the (target, anchor) pairs whose shapes
   agree (:func:`match_anchors`), then the grid cells each pair trains (:func:`training_cells`),
   giving one :class:`LevelPositives` per level.
2. The loss (:meth:`DetectionLoss.__call__`), per level with raw logits p (bs, na, ny, nx, no):

   * box:  decoded pxy = 2σ(t_xy) − 0.5, pwh = (2σ(t_wh))²·anchor (grid units, relative to the cell);
     box term = mean over positives of 1 − CIoU(pred, target) (``torchvision.ops.complete_box_iou_loss``);
   * obj:  target 0 everywhere except CIoU.detach().clamp(0) at the positives;
     obj term = balance_level · mean BCE over all bs·na·ny·nx cells;
   * cls:  (only when nc > 1) mean BCE over the positives against cp = 1 − ε/2 at the true class and
     cn = ε/2 elsewhere (ε = label smoothing).

   Then lbox·box, lobj·obj, lcls·cls (hyp gains) and total = (lbox + lobj + lcls) · bs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import ops

from utils.detect_outputs import raw_outputs
from utils.torch_utils import unwrap_model

# hyp keys the loss needs; the rest of a training hyp dict is ignored here.
_REQUIRED_KEYS = ("box", "obj", "cls", "anchor_t")

# CIoU's small constant (denominators of IoU, the enclosing diagonal and α), as in the reference.
_CIOU_EPS = 1e-7
_WH_FLOOR = 1e-5  # grid units; see complete_iou


def objectness_balance(nl: int) -> list[float]:
    """Objectness weight per level, finest grid first: [4.0, 1.0, 0.4] for the usual three levels.

    Models with other depths (P3-P6, P3-P7) use YOLOv5's longer list 4.0, 1.0, 0.25, 0.06, 0.02
    cut to ``nl`` entries; more than five levels has no reference value and is an error.
    """
    if nl == 3:
        return [4.0, 1.0, 0.4]
    other_depths = [4.0, 1.0, 0.25, 0.06, 0.02]
    if nl > len(other_depths):
        raise ValueError(f"DetectionLoss: {nl} detection levels, objectness balance has only "
                         f"{len(other_depths)} entries")
    return other_depths[:nl]


def scale_hyp(hyp: dict[str, Any], nl: int, nc: int, imgsz: int) -> dict[str, Any]:
    """Return a copy of ``hyp`` with the loss gains scaled the way YOLOv5's training does.

    box ×= 3/nl;  cls ×= nc/80 · 3/nl;  obj ×= (imgsz/640)² · 3/nl.

    The reference gains were tuned for 3 levels, 80 classes and 640 px; this keeps each term's
    magnitude comparable when any of those change. ``label_smoothing`` is set to 0.0 when absent so
    the returned dict is complete for :class:`DetectionLoss`. The input dict is not modified.
    """
    missing = [k for k in ("box", "obj", "cls") if k not in hyp]
    if missing:
        raise ValueError(f"scale_hyp: hyp is missing {missing}; pass a full hyp (e.g. data/hyps/*.yaml)")
    out = dict(hyp)
    level_factor = 3 / nl
    out["box"] = hyp["box"] * level_factor
    out["cls"] = hyp["cls"] * nc / 80 * level_factor
    out["obj"] = hyp["obj"] * (imgsz / 640) ** 2 * level_factor
    out.setdefault("label_smoothing", 0.0)
    return out


def smooth_bce_targets(eps: float = 0.0) -> tuple[float, float]:
    """Label-smoothed BCE targets (positive, negative) = (1 − ε/2, ε/2)."""
    return 1.0 - 0.5 * eps, 0.5 * eps


def _bce(
    logits: torch.Tensor, target: torch.Tensor, pos_weight: torch.Tensor, gamma: float, alpha: float = 0.25
) -> torch.Tensor:
    """Mean BCE-with-logits; with ``gamma > 0`` the focal form (Lin et al. 2017).

    focal = BCE · α_t · (1 − p_t)^γ with p_t = y·σ(x) + (1 − y)(1 − σ(x)) and α_t = y·α + (1 − y)(1 − α),
    y possibly soft. Shapes: ``logits`` and ``target`` equal, any shape; returns a scalar.
    """
    if gamma <= 0:
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
    loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    prob = logits.sigmoid()
    p_t = target * prob + (1 - target) * (1 - prob)
    alpha_t = target * alpha + (1 - target) * (1 - alpha)
    return (loss * alpha_t * (1.0 - p_t) ** gamma).mean()


# ------------------------------------------------------------------------------------ assignment
@dataclass(frozen=True)
class LevelPositives:
    """The positive samples of one level, one row per (target, anchor, cell) triple.

    All index tensors are (n,) long on the targets' device:
        img, anchor, gy, gx: where the prediction sits in the level's (bs, na, ny, nx) grid.
        cls: the target's class.
    box: (n, 4) xywh target in grid units, its centre measured from the top-left corner of cell
        (gy, gx), so within (−0.5, 1.5) like the decoded prediction 2σ − 0.5.
    anchor_wh: (n, 2) the matched anchor's size in grid units.
    """

    img: torch.Tensor
    anchor: torch.Tensor
    gy: torch.Tensor
    gx: torch.Tensor
    box: torch.Tensor
    anchor_wh: torch.Tensor
    cls: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.img.shape[0])

    def cell_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(img, anchor, gy, gx): advanced index of the positives in a (bs, na, ny, nx, ...) tensor."""
        return self.img, self.anchor, self.gy, self.gx


def match_anchors(wh: torch.Tensor, anchor_wh: torch.Tensor, anchor_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(target, anchor) index pairs whose shapes agree within a factor ``anchor_t`` on both sides.

    For target size (w, h) and anchor (aw, ah), both in grid units, the pair matches when
    max(w/aw, aw/w, h/ah, ah/h) < anchor_t. ``wh`` (nt, 2), ``anchor_wh`` (na, 2).
    Returns two (m,) long tensors, pairs in target order (a target's anchors in anchor order).
    """
    ratio = wh[:, None, :] / anchor_wh[None, :, :]  # (nt, na, 2)
    worst = torch.maximum(ratio, ratio.reciprocal()).amax(dim=2)
    target_idx, anchor_idx = torch.nonzero(worst < anchor_t, as_tuple=True)
    return target_idx, anchor_idx


def training_cells(centre: torch.Tensor, grid_wh: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid cells that learn a box centred at ``centre``: its own cell and up to two neighbours.

    ``centre`` (m, 2) xy in grid units of a (ny, nx) grid, ``grid_wh`` = (nx, ny). YOLOv5's rule
    (REFERENCE §3), per axis with coordinate c and grid size n:

    * own cell ⌊c⌋;
    * lower neighbour ⌊c − ½⌋ when frac(c) < ½ and c > 1;
    * upper neighbour ⌊c + ½⌋ when frac(n − c) < ½ and n − c > 1;

    every index then clamped into the grid. Off the cell borders these are the cells whose decoded
    offset range (−0.5, 1.5) reaches the centre with a margin (the centre is < 0.5 from their edge).
    On a border (integer c, e.g. a normalised centre of 0.5) both conditions hold and the upper
    "neighbour" ⌊c + ½⌋ is the own cell again; at c = n the lower one clamps into it. Those duplicates
    are kept: they weigh such a target twice in the box and class means, as in YOLOv5, so the loss
    equals its loss on any labels (measured against YOLOv5 7.0's own loss, tests/test_loss.py).

    Returns ``(row, cell)``: for each listed cell the row of ``centre`` it serves (k,) and the cell
    (k, 2) long xy. Listing order: every own cell first (rows ascending), then the neighbours
    grouped by side and axis: lower-x, lower-y, upper-x, upper-y, rows ascending in each group.
    The order only matters for the objectness target of a cell claimed by two different targets
    with the same anchor (the one listed last sets it, :func:`put_last_wins`); this one gives the
    same winner as YOLOv5, which keeps the loss values identical in crowded scenes.
    """
    m = centre.shape[0]
    size = centre.new_tensor(grid_wh)  # (2,) nx, ny
    last = torch.tensor(grid_wh, device=centre.device) - 1
    to_far_edge = size - centre
    sides = (((centre % 1) < 0.5) & (centre > 1), -0.5), (((to_far_edge % 1) < 0.5) & (to_far_edge > 1), 0.5)
    rows, cells = [torch.arange(m, device=centre.device)], [centre.floor()]
    for allowed, shift in sides:  # lower side first, then upper; x before y within a side
        for axis in (0, 1):
            r = torch.nonzero(allowed[:, axis], as_tuple=True)[0]
            moved = centre[r].floor()
            moved[:, axis] = (centre[r, axis] + shift).floor()
            rows.append(r)
            cells.append(moved)
    cell = torch.cat(cells).long().clamp_(min=torch.zeros_like(last), max=last)
    return torch.cat(rows), cell


def level_positives(
    targets: torch.Tensor, anchor_wh: torch.Tensor, grid_wh: tuple[int, int], anchor_t: float
) -> LevelPositives:
    """Positives of one level for ``targets`` (nt, 6) [img, cls, xc, yc, w, h] normalised to 0-1.

    ``anchor_wh`` (na, 2) grid units; ``grid_wh`` = (nx, ny). Target boxes are scaled to grid units
    (x, w by nx; y, h by ny), matched to anchors (:func:`match_anchors`) and each match spread over
    its training cells (:func:`training_cells`).
    """
    scale = targets.new_tensor(grid_wh)
    xy, wh = targets[:, 2:4] * scale, targets[:, 4:6] * scale
    t_idx, a_idx = match_anchors(wh, anchor_wh, anchor_t)
    row, cell = training_cells(xy[t_idx], grid_wh)
    t_idx, a_idx = t_idx[row], a_idx[row]
    return LevelPositives(
        img=targets[t_idx, 0].long(),
        anchor=a_idx,
        gy=cell[:, 1],
        gx=cell[:, 0],
        box=torch.cat((xy[t_idx] - cell, wh[t_idx]), dim=1),
        anchor_wh=anchor_wh[a_idx],
        cls=targets[t_idx, 1].long(),
    )


# ------------------------------------------------------------------------------------ loss terms
def decode_cell_boxes(raw: torch.Tensor, anchor_wh: torch.Tensor) -> torch.Tensor:
    """Raw box logits (n, 4) → xywh (n, 4) in grid units relative to their cell's corner.

    xy = 2σ(t) − 0.5 ∈ (−0.5, 1.5); wh = (2σ(t))² · anchor ∈ (0, 4·anchor).
    """
    doubled = raw.sigmoid() * 2
    return torch.cat((doubled[:, :2] - 0.5, doubled[:, 2:].square() * anchor_wh), dim=1)


def complete_iou(pred_xywh: torch.Tensor, target_xywh: torch.Tensor) -> torch.Tensor:
    """Element-wise CIoU (Zheng et al., AAAI 2020) of two (n, 4) xywh box sets → (n,).

    CIoU = IoU − ρ²/c² − α·v with v = 4/π²·(atan(w_t/h_t) − atan(w_p/h_p))², α = v/(1 − IoU + v),
    α held constant (no gradient). Computed by ``torchvision.ops.complete_box_iou_loss`` (= 1 − CIoU)
    on xyxy corners; its ε placement (in the IoU, diagonal and α denominators, none inside atan)
    differs from YOLOv5's by O(1e-7) relative, well inside the 1e-5 parity of the tests.

    Predicted sizes are floored at ``_WH_FLOOR`` grid units: with no ε inside atan, a predicted
    height below ~1e-7 (raw logit ≲ −9) vanishes in the xyxy round trip (y2 − y1 = 0 in fp32 at
    coordinates ~1), and atan(w/0)'s backward is NaN — it killed overhaul runs on the demo set at
    epoch 2 (issue 17). Boxes that size (1e-5 grid units) only lose the gradient of their own size.
    """
    pred_xywh = torch.cat((pred_xywh[:, :2], pred_xywh[:, 2:].clamp_min(_WH_FLOOR)), 1)
    to_xyxy = (ops.box_convert(b, "cxcywh", "xyxy") for b in (pred_xywh, target_xywh))
    return 1.0 - ops.complete_box_iou_loss(*to_xyxy, reduction="none", eps=_CIOU_EPS)


def put_last_wins(dst: torch.Tensor, index: Sequence[torch.Tensor], values: torch.Tensor) -> None:
    """``dst[index] = values`` in place, where a position listed more than once takes its LAST value.

    ``index_put_`` leaves the winner of repeated positions unspecified; here each position is
    written once: positions are flattened (row-major over ``dst``'s leading dims), stably sorted,
    and only the last entry of each run of equal positions is kept. ``index`` holds one (n,) long
    tensor per leading dim of the contiguous ``dst``; ``values`` is (n,).
    """
    flat = torch.zeros_like(index[0])
    for idx, size in zip(index, dst.shape):
        flat = flat * size + idx
    order = torch.argsort(flat, stable=True)
    flat = flat[order]
    last_of_run = torch.ones_like(flat, dtype=torch.bool)
    last_of_run[:-1] = flat[1:] != flat[:-1]
    dst.view(-1)[flat[last_of_run]] = values[order[last_of_run]].to(dst.dtype)


class _ObjectnessAndPositives(torch.autograd.Function):
    """(p[..., 4], p[img, anchor, gy, gx]) of a level p (bs, na, ny, nx, no), with ONE gradient buffer.

    Forward: the objectness logits (bs, na, ny, nx), contiguous, and the positives' rows (n, no).
    Backward: one zero (bs, na, ny, nx, no) tensor, the objectness gradient written into channel 4
    and the rows' gradients added at their cells. Autograd's slice and index backwards each
    zero-fill a full-size gradient that it then adds; on CPU that was ~1/3 of the loss's time.
    """

    @staticmethod
    def forward(ctx, p: torch.Tensor, *index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        ctx.save_for_backward(*index)
        ctx.shape = p.shape
        return p[..., 4].contiguous(), p[index]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_obj: torch.Tensor, g_rows: torch.Tensor):  # type: ignore[override]
        # both arrive as tensors (autograd materialises an unused output's gradient as zeros)
        index = ctx.saved_tensors
        grad = g_obj.new_zeros(ctx.shape)
        grad[..., 4] = g_obj
        grad.index_put_(index, g_rows, accumulate=True)  # a cell listed twice gets both rows' gradients
        return (grad, *(None for _ in index))


# ------------------------------------------------------------------------------------ the loss
class DetectionLoss:
    """The YOLOv5 detection loss (see the module docstring for the formulas).

    Args:
        model: a DetectionModel (optionally DDP-wrapped); only its ``detect`` layer is read, for
            ``anchors`` (nl, na, 2) in grid units, ``nl``, ``na`` and ``nc``.
        hyp: loss hyperparameters, already scaled by the caller (see :func:`scale_hyp`):
            ``box``, ``obj``, ``cls``, ``anchor_t`` required; ``cls_pw``, ``obj_pw`` (BCE positive
            weights, default 1), ``fl_gamma`` (focal loss when > 0, default 0), ``label_smoothing``
            (default 0) optional.

    Call with ``preds`` = list of nl raw tensors (bs, na, ny, nx, no) and ``targets`` (nt, 6)
    ``[img_idx, cls, xc, yc, w, h]`` normalised to 0-1. Returns ``(total (1,), items (3,))`` where
    items = detached [lbox, lobj, lcls] after their gains and total = items.sum() · bs (with grad).
    The loss is computed in fp32 whatever the dtype of ``preds`` (safe under autocast).
    """

    def __init__(self, model: nn.Module, hyp: dict[str, Any]) -> None:
        missing = [k for k in _REQUIRED_KEYS if k not in hyp]
        if missing:
            raise ValueError(f"DetectionLoss: hyp is missing {missing}; pass a full hyp (data/hyps/*.yaml)")
        det = unwrap_model(model).detect
        self.nl: int = int(det.nl)
        self.na: int = int(det.na)
        self.nc: int = int(det.nc)
        # Keep the Detect layer, not its anchors: model.to(device) replaces the buffer, so the
        # anchors are read at call time.
        self._detect = det
        self.gains = (float(hyp["box"]), float(hyp["obj"]), float(hyp["cls"]))
        self.anchor_t = float(hyp["anchor_t"])
        self.cls_pw = float(hyp.get("cls_pw", 1.0))
        self.obj_pw = float(hyp.get("obj_pw", 1.0))
        self.fl_gamma = float(hyp.get("fl_gamma", 0.0))
        self.cp, self.cn = smooth_bce_targets(float(hyp.get("label_smoothing", 0.0)))
        self.balance = objectness_balance(self.nl)

    @property
    def anchors(self) -> torch.Tensor:
        """Detect anchors (nl, na, 2) in grid units, fp32."""
        return self._detect.anchors.float()

    def assign(self, preds: Sequence[torch.Tensor], targets: torch.Tensor) -> list[LevelPositives]:
        """Per level, the positives of ``targets`` (nt, 6) normalised; ``preds`` only give grid sizes."""
        anchors = self.anchors.to(targets.device)
        return [
            level_positives(targets, anchors[i], (int(p.shape[3]), int(p.shape[2])), self.anchor_t)
            for i, p in enumerate(preds)
        ]

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of raw per-level predictions against normalised targets; see the class docstring."""
        weighted, _ = self.weighted_terms(preds, targets)
        return weighted.sum().reshape(1) * self.raw(preds)[0].shape[0], weighted.detach()

    def raw(self, preds: Any) -> list[torch.Tensor]:
        """The raw per-level list of a train-mode output or of an eval-mode ``(decoded, raw)`` pair."""
        preds = raw_outputs(preds)
        if len(preds) != self.nl:
            raise ValueError(f"DetectionLoss: got {len(preds)} prediction levels, the model has {self.nl}")
        return list(preds)

    def weighted_terms(self, preds: Any, targets: torch.Tensor) -> tuple[torch.Tensor, list[LevelPositives]]:
        """(3,) [lbox, lobj, lcls] after their gains, WITH grad (not × bs), and the positives per level.

        The positives are the assignment this loss used, exposed so that distillation terms that
        need positive cells (chen) reuse it instead of assigning a second time.
        """
        preds = self.raw(preds)
        device = preds[0].device
        # fp32 math even when the forward ran under autocast: cast the inputs and switch autocast
        # off here, so no op below is silently downcast (exp/atan/BCE lose too much in fp16).
        with torch.autocast(device_type=device.type, enabled=False):
            preds32 = [p.float() for p in preds]
            targets32 = targets.to(device=device, dtype=torch.float32)
            positives = self.assign(preds32, targets32)
            levels = zip(preds32, positives, self.balance)
            box, obj, cls = (torch.stack(t).sum() for t in zip(*(self._level_terms(*lv) for lv in levels)))
            return torch.stack((box * self.gains[0], obj * self.gains[1], cls * self.gains[2])), positives

    def _level_terms(
        self, p: torch.Tensor, pos: LevelPositives, balance: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(box, obj, cls) terms of one level before the hyp gains; ``p`` (bs, na, ny, nx, no) fp32."""
        obj_logits, rows = _ObjectnessAndPositives.apply(p, *pos.cell_index())  # (bs, na, ny, nx), (n, no)
        obj_target = torch.zeros_like(obj_logits)
        box = cls = p.new_zeros(())
        if pos.count:
            ciou = complete_iou(decode_cell_boxes(rows[:, :4], pos.anchor_wh), pos.box)
            box = (1.0 - ciou).mean()
            put_last_wins(obj_target, pos.cell_index(), ciou.detach().clamp(min=0))
            if self.nc > 1:
                cls_target = F.one_hot(pos.cls, self.nc).to(p.dtype) * (self.cp - self.cn) + self.cn
                cls = _bce(rows[:, 5:], cls_target, p.new_tensor(self.cls_pw), self.fl_gamma)
        obj = _bce(obj_logits, obj_target, p.new_tensor(self.obj_pw), self.fl_gamma) * balance
        return box, obj, cls
