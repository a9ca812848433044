"""YOLOv5 detection loss: CIoU box regression, objectness BCE and class BCE over three levels.

Notation used below: ``bs`` batch size, ``na`` anchors per level, ``nl`` levels, ``nc`` classes,
``no = nc + 5`` outputs per anchor, ``(ny, nx)`` the grid of a level, ``nt`` the number of targets.

For each level i with raw logits p_i (bs, na, ny, nx, no):

* positives come from :meth:`DetectionLoss.build_targets` (anchor-ratio rule + neighbour cells);
* box:  decoded pxy = 2σ(t_xy) − 0.5, pwh = (2σ(t_wh))²·anchor (grid units);
  lbox += mean(1 − CIoU(pbox, tbox)) over the positives;
* obj:  target 0 everywhere except CIoU.detach().clamp(0) at the positives;
  lobj += balance_i · BCE(p_obj, target) averaged over all bs·na·ny·nx cells;
* cls:  (only when nc > 1) BCE over the positives with targets cp = 1 − ε/2 at the true class and
  cn = ε/2 elsewhere (ε = label smoothing).

Finally lbox·box, lobj·obj, lcls·cls (hyp gains) and total = (lbox + lobj + lcls) · bs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from utils.boxes import bbox_ciou
from utils.torch_utils import unwrap_model

# Objectness weights per level, large grids (small objects) first. Three levels use YOLOv5's
# [4.0, 1.0, 0.4]; other depths (P3-P6 / P3-P7 models) use the same table extended downwards.
_BALANCE = {3: [4.0, 1.0, 0.4]}
_BALANCE_DEFAULT = [4.0, 1.0, 0.25, 0.06, 0.02]

# The neighbour-cell offset: a target also trains the adjacent cell on the side its centre leans to.
_NEIGHBOUR_G = 0.5

# hyp keys the loss needs; the rest of a training hyp dict is ignored here.
_REQUIRED_KEYS = ("box", "obj", "cls", "anchor_t")


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
        # Anchors are a buffer of the Detect layer; read it at call time from this reference so a
        # later model.to(device) is followed (buffers move in place of the attribute, so re-read).
        self._detect = det
        self.gains = (float(hyp["box"]), float(hyp["obj"]), float(hyp["cls"]))
        self.anchor_t = float(hyp["anchor_t"])
        self.cls_pw = float(hyp.get("cls_pw", 1.0))
        self.obj_pw = float(hyp.get("obj_pw", 1.0))
        self.fl_gamma = float(hyp.get("fl_gamma", 0.0))
        self.cp, self.cn = smooth_bce_targets(float(hyp.get("label_smoothing", 0.0)))
        self.balance = _BALANCE.get(self.nl, _BALANCE_DEFAULT)
        if self.nl > len(self.balance):
            raise ValueError(f"DetectionLoss: {self.nl} detection levels, objectness balance has only "
                             f"{len(self.balance)} entries")

    @property
    def anchors(self) -> torch.Tensor:
        """Detect anchors (nl, na, 2) in grid units, fp32."""
        return self._detect.anchors.float()

    def __call__(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss of raw per-level predictions against normalised targets; see the class docstring."""
        if isinstance(preds, tuple) and len(preds) == 2 and isinstance(preds[1], list):
            preds = preds[1]  # an eval-mode (decoded, raw) output: the raw list is what we need
        if len(preds) != self.nl:
            raise ValueError(f"DetectionLoss: got {len(preds)} prediction levels, the model has {self.nl}")
        device = preds[0].device
        # fp32 math even when the forward ran under autocast: cast the inputs and switch autocast
        # off here, so no op below is silently downcast (exp/atan/BCE lose too much in fp16).
        with torch.autocast(device_type=device.type, enabled=False):
            return self._compute([p.float() for p in preds], targets.to(device=device, dtype=torch.float32))

    def _compute(self, preds: list[torch.Tensor], targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss proper, on fp32 inputs already on one device (see the class docstring)."""
        device = preds[0].device
        anchors = self.anchors.to(device)
        tcls, tbox, indices, anch = self.build_targets(preds, targets, anchors)

        cls_pw = torch.tensor([self.cls_pw], device=device)
        obj_pw = torch.tensor([self.obj_pw], device=device)
        zero = torch.zeros(1, device=device)
        lbox, lobj, lcls = zero.clone(), zero.clone(), zero.clone()
        for i, p in enumerate(preds):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(p.shape[:4], device=device)
            n = b.shape[0]
            if n:
                ps = p[b, a, gj, gi]  # (n, no) the positive cells
                pxy = ps[:, :2].sigmoid() * 2 - 0.5
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anch[i]
                iou = bbox_ciou(torch.cat((pxy, pwh), 1), tbox[i])  # (n,)
                lbox = lbox + (1.0 - iou).mean()
                _assign_last(tobj, (b, a, gj, gi), iou.detach().clamp(0))
                if self.nc > 1:  # a single class is learnt by objectness alone
                    t = torch.full_like(ps[:, 5:], self.cn)
                    t[torch.arange(n, device=device), tcls[i]] = self.cp
                    lcls = lcls + _bce(ps[:, 5:], t, cls_pw, self.fl_gamma)
            lobj = lobj + _bce(p[..., 4], tobj, obj_pw, self.fl_gamma) * self.balance[i]

        lbox = lbox * self.gains[0]
        lobj = lobj * self.gains[1]
        lcls = lcls * self.gains[2]
        bs = preds[0].shape[0]
        return (lbox + lobj + lcls) * bs, torch.cat((lbox, lobj, lcls)).detach()

    def build_targets(
        self, preds: list[torch.Tensor], targets: torch.Tensor, anchors: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.Tensor, ...]], list[torch.Tensor]]:
        """Assign targets to (image, anchor, cell) positives on every level.

        A target matches anchor k when max(r, 1/r) < anchor_t for both w and h, r = gt_wh / anchor_wh
        (shape match, not IoU). Each match trains its own cell and up to two neighbours: the left
        (top) cell when the centre's fractional x (y) is < 0.5 and x (y) > 1, the right (bottom) cell
        when the same holds measured from the far edge (nx − x). This triples positives and lets the
        decoded offset 2σ − 0.5 ∈ (−0.5, 1.5) reach centres in the adjacent cell.

        Returns per level: ``tcls`` (n,) long, ``tbox`` (n, 4) xywh with xy relative to the cell
        corner (in [−0.5, 1.5]) and wh in grid units, ``indices`` (b, a, gj, gi) each (n,) long,
        clamped to the grid, and ``anch`` (n, 2) the matched anchors in grid units.
        """
        na, nt = self.na, targets.shape[0]
        device = targets.device
        g = _NEIGHBOUR_G
        # (na, nt, 7): every target repeated once per anchor with the anchor index appended.
        ai = torch.arange(na, device=device, dtype=torch.float32).view(na, 1).expand(na, nt)
        tga = torch.cat((targets.unsqueeze(0).expand(na, nt, 6), ai.unsqueeze(2)), 2)
        # Cell offsets for: self, left, top, right, bottom (subtracted from the centre, then floored).
        off = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], device=device, dtype=torch.float32) * g

        tcls, tbox, indices, anch = [], [], [], []
        for i, p in enumerate(preds):
            ny, nx = p.shape[2], p.shape[3]
            gain = torch.tensor([1, 1, nx, ny, nx, ny, 1], device=device, dtype=torch.float32)
            t = tga * gain  # normalised → grid units on this level
            if nt:
                r = t[..., 4:6] / anchors[i][:, None]  # (na, nt, 2)
                t = t[torch.max(r, 1 / r).amax(2) < self.anchor_t]  # (m, 7)
                gxy = t[:, 2:4]
                gxi = gain[[2, 3]] - gxy  # distance from the far edge
                left, top = ((gxy % 1 < g) & (gxy > 1)).T
                right, bottom = ((gxi % 1 < g) & (gxi > 1)).T
                sel = torch.stack((torch.ones_like(left), left, top, right, bottom))  # (5, m)
                t = t.unsqueeze(0).expand(5, -1, -1)[sel]
                offsets = off[:, None].expand(5, sel.shape[1], 2)[sel]
            else:
                t = tga[0]  # (0, 7)
                offsets = torch.zeros_like(t[:, 2:4])

            b, c = t[:, 0].long(), t[:, 1].long()
            gxy, gwh, a = t[:, 2:4], t[:, 4:6], t[:, 6].long()
            gij = (gxy - offsets).long()
            # Clamp so a centre on the far border (x == nx) still indexes the last cell.
            gi = gij[:, 0].clamp(0, nx - 1)
            gj = gij[:, 1].clamp(0, ny - 1)
            indices.append((b, a, gj, gi))
            tbox.append(torch.cat((gxy - torch.stack((gi, gj), 1), gwh), 1))
            anch.append(anchors[i][a])
            tcls.append(c)
        return tcls, tbox, indices, anch


def _assign_last(dst: torch.Tensor, index: tuple[torch.Tensor, ...], values: torch.Tensor) -> None:
    """``dst[index] = values`` where, for repeated positions, the LAST listed value wins.

    Plain advanced-index assignment leaves duplicates unspecified (CUDA may pick any). YOLOv5's
    reference numbers come from CPU, where the last write wins; doing it explicitly keeps CPU and
    CUDA identical. ``dst`` (bs, na, ny, nx); ``index`` four (n,) long tensors; ``values`` (n,).
    """
    lin = torch.zeros_like(index[0])
    for idx, size in zip(index, dst.shape):
        lin = lin * size + idx
    uniq, inv = torch.unique(lin, return_inverse=True)
    order = torch.arange(lin.shape[0], device=lin.device)
    last = torch.zeros_like(uniq).scatter_reduce(0, inv, order, reduce="amax", include_self=False)
    dst.view(-1)[uniq] = values[last].to(dst.dtype)


__all__ = ["DetectionLoss", "scale_hyp", "smooth_bce_targets"]
