"""Output (response) distillation for YOLOv5 heads.

Inputs are the raw per-level head tensors p_l of shape (bs, na, ny, nx, 5 + nc) — channels
[x, y, w, h, obj, cls_1 … cls_nc] as logits — from the student's train-mode forward and the
teacher's forward (``Detect`` in eval mode returns them as the second element). Teacher tensors are
detached inside every function; all math is fp32. Every function returns UNWEIGHTED terms: the
distiller multiplies by ``d_weight`` × the hyp gain of the matching detection term.

Three families (see ``/work/shared/REFERENCE.md`` §6):

* :func:`objectness_weighted_mse` — the YOLOv5 "Adlik" form: squared error on raw logits, every
  cell weighted by the teacher's objectness σ(t_obj).
* :func:`soft_label_bce` / :func:`soft_output_terms` — Hinton soft labels written for YOLO's
  independent sigmoid outputs: T²·BCE(σ(s/T), σ(t/T)).
* Chen et al. 2017, "Learning Efficient Object Detection Models with Knowledge Distillation"
  (NeurIPS): class-imbalance-weighted soft term (background weight 1.5; in YOLO "background" is the
  negative side of the objectness sigmoid) and the teacher-bounded regression
  :func:`bounded_regression` on the positive cells.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _pairs(s: Sequence[torch.Tensor], t: Sequence[torch.Tensor], name: str):
    if len(s) != len(t) or not s:
        raise ValueError(f"{name}: need the same non-zero number of student and teacher levels, got "
                         f"{len(s)} and {len(t)}")
    for si, ti in zip(s, t):
        if si.shape != ti.shape:
            raise ValueError(f"{name}: student level {tuple(si.shape)} vs teacher {tuple(ti.shape)}; output "
                             f"distillation needs identical heads (same anchors, strides and nc)")
        yield si.float(), ti.detach().float()


def objectness_weighted_mse(
    s: Sequence[torch.Tensor], t: Sequence[torch.Tensor], nc: int
) -> dict[str, torch.Tensor]:
    """Teacher-objectness-weighted squared error on raw head logits, summed over levels.

    Per level, with w = σ(t_obj) of shape (bs, na, ny, nx) broadcast over the last axis:

        box = mean(w · (s_xywh − t_xywh)²)      mean over bs·na·ny·nx·4 elements
        obj = mean(w · (s_obj − t_obj)²)        mean over bs·na·ny·nx
        cls = mean(w · (s_cls − t_cls)²)        mean over bs·na·ny·nx·nc, only when nc > 1

    Cells the teacher considers empty (σ(t_obj) ≈ 0) contribute almost nothing, so the student is
    not pulled towards the teacher's arbitrary box logits on background. ``s``, ``t``: lists of
    (bs, na, ny, nx, 5 + nc). Returns ``{'box', 'obj', 'cls'}`` scalars (``cls`` is an exact zero
    when nc == 1: a single class is learnt through objectness alone, as in the detection loss).
    Gradients reach ``s`` only (:class:`_WeightedSquaredError`).
    """
    sums = sum(_WeightedSquaredError.apply(si, ti) for si, ti in _pairs(s, t, "objectness_weighted_mse"))
    box, obj, cls = sums.unbind()
    if nc <= 1:
        cls = box * 0.0
    return {"box": box, "obj": obj, "cls": cls}


class _WeightedSquaredError(torch.autograd.Function):
    """One level of :func:`objectness_weighted_mse` as a (3,) tensor (box, obj, cls), with its
    gradient written out: ∂L/∂s = 2·w·(s − t)·c / n, where n = bs·na·ny·nx and c is the channel's
    coefficient (g_box/4 on x, y, w, h; g_obj on obj; g_cls/nc on the classes). It keeps the
    difference and makes about one pass over the (bs, na, ny, nx, 5 + nc) tensor each way, where
    autograd's mse_loss + matmul made several (forward + backward at batch 16, 320 px, nc 80 on the
    2-core CPU: 21 ms instead of 31). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        dtype = torch.promote_types(s.dtype, torch.float32)  # fp32, or fp64 when given (gradcheck)
        diff = s.to(dtype) - t.to(dtype)  # (bs, na, ny, nx, no)
        w = t[..., 4].to(dtype).sigmoid()  # (bs, na, ny, nx)
        sq = diff * diff
        no, n = diff.shape[-1], max(diff[..., 0].numel(), 1)
        box = (sq[..., :4].sum(-1) * w).sum() / (4 * n)
        obj = (sq[..., 4] * w).sum() / n
        cls = (sq[..., 5:].sum(-1) * w).sum() / (max(no - 5, 1) * n)
        ctx.save_for_backward(diff, w)
        ctx.n, ctx.s_dtype = n, s.dtype
        return torch.stack([box, obj, cls])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        diff, w = ctx.saved_tensors
        no = diff.shape[-1]
        coef = torch.empty(no, dtype=diff.dtype, device=diff.device)  # (no,) per-channel factor
        coef[:4] = grad[0] / 4
        coef[4] = grad[1]
        coef[5:] = grad[2] / max(no - 5, 1)
        coef *= 2.0 / ctx.n
        return (diff * w.unsqueeze(-1)).mul_(coef).to(ctx.s_dtype), None


def soft_label_bce(
    s: torch.Tensor,
    t: torch.Tensor,
    T: float = 1.0,
    weights: torch.Tensor | None = None,
    neg_weight: float = 1.0,
) -> torch.Tensor:
    """Temperature-softened binary cross-entropy between independent sigmoid outputs.

    Hinton et al. 2015 ("Distilling the Knowledge in a Neural Network") use T²·KL(softmax(t/T) ‖
    softmax(s/T)); YOLO's classes (and its objectness) are independent sigmoids, so the consistent
    form is, element-wise with p_t = σ(t/T), p_s = σ(s/T):

        ℓ = −T² · [ p_t·log p_s + λ_neg·(1 − p_t)·log(1 − p_s) ]

    and the result is mean(weights · ℓ) over all elements. The T² factor keeps gradient magnitudes
    comparable across temperatures. λ_neg (``neg_weight``) = 1 is plain BCE; Chen et al. 2017
    weight the background side 1.5 (used on objectness). Note the minimum of plain BCE over s is at
    s = t but its value there is the teacher's entropy, not 0 (the gradient is 0).

    Shapes: ``s``, ``t`` any equal shape (logits); ``weights`` broadcastable to it (e.g. σ(t_obj)
    with a trailing 1). Returns a scalar.
    """
    if s.shape != t.shape:
        raise ValueError(f"soft_label_bce: student {tuple(s.shape)} vs teacher {tuple(t.shape)}")
    if T <= 0:
        raise ValueError(f"soft_label_bce: temperature must be > 0, got {T}")
    s = s.float() / T
    p_t = (t.detach().float() / T).sigmoid()
    loss = -(p_t * F.logsigmoid(s) + neg_weight * (1.0 - p_t) * F.logsigmoid(-s)) * (T * T)
    if weights is not None:
        loss = loss * weights.detach().float()
    return loss.mean()


def soft_output_terms(
    s: Sequence[torch.Tensor],
    t: Sequence[torch.Tensor],
    nc: int,
    T: float = 1.0,
    bg_weight: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Soft-label terms for a YOLO head, summed over levels.

        obj = soft_label_bce(s_obj, t_obj, T, neg_weight=bg_weight)            all cells
        cls = soft_label_bce(s_cls, t_cls, T, weights=σ(t_obj))                 only when nc > 1

    Objectness is the object-vs-background classifier, so it takes Chen's background weight
    (``bg_weight`` 1.5 for the 'chen' mode, 1.0 for plain soft labels). Class scores only mean
    something where there is an object, so they are weighted by the teacher's objectness, as in
    :func:`objectness_weighted_mse`. Returns ``{'obj', 'cls'}`` (``cls`` exactly 0 when nc == 1).
    """
    obj = cls = None
    for si, ti in _pairs(s, t, "soft_output_terms"):
        lo = soft_label_bce(si[..., 4], ti[..., 4], T, neg_weight=bg_weight)
        obj = lo if obj is None else obj + lo
        if nc > 1:
            w = ti[..., 4:5].sigmoid()
            lc = soft_label_bce(si[..., 5:], ti[..., 5:], T, weights=w)
            cls = lc if cls is None else cls + lc
    if cls is None:
        cls = obj * 0.0
    return {"obj": obj, "cls": cls}


def chen_soft_terms(
    s: Sequence[torch.Tensor],
    t: Sequence[torch.Tensor],
    cells: Sequence[tuple[torch.Tensor, ...]],
    nc: int,
    balance: Sequence[float],
    T: float = 1.0,
    bg_weight: float = 1.5,
) -> dict[str, torch.Tensor]:
    """Chen et al.'s soft classification term over the SAME samples as YOLOv5's hard terms.

    Chen et al. 2017 (eq. 2): L_cls = μ·L_hard + (1 − μ)·L_soft, so the soft term must average over
    what the hard one averages over, or μ would not mix like with like. Per level l:

        obj_l = balance_l · soft_label_bce(s_obj, t_obj, T, neg_weight=bg_weight)   all cells
        cls_l = soft_label_bce(s_cls[pos], t_cls[pos], T)                           positive cells

    exactly the cells/normalisation of the hard objectness (all cells, × balance [4, 1, 0.4]) and
    class (positives, mean over n·nc) BCE; background (the negative side of objectness) weighs
    ``bg_weight`` 1.5. ``cells``: per level the (b, a, gj, gi) index of the hard loss's positives
    (``LevelPositives.cell_index()``). Returns ``{'obj', 'cls'}`` summed over levels (``cls`` an
    exact 0 when nc == 1 or there are no positives).
    """
    obj = cls = None
    for (si, ti), idx, bal in zip(_pairs(s, t, "chen_soft_terms"), cells, balance):
        lo = soft_label_bce(si[..., 4], ti[..., 4], T, neg_weight=bg_weight) * bal
        obj = lo if obj is None else obj + lo
        if nc > 1 and idx[0].numel():
            lc = soft_label_bce(si[idx][:, 5:], ti[idx][:, 5:], T)
            cls = lc if cls is None else cls + lc
    if cls is None:
        cls = obj * 0.0
    return {"obj": obj, "cls": cls}


def bounded_regression(
    s_box: torch.Tensor, t_box: torch.Tensor, gt_box: torch.Tensor, margin: float = 0.0
) -> torch.Tensor:
    """Teacher-bounded L2 regression loss (Chen et al. 2017, eq. 4).

        e_s = ‖R_s − y‖²,  e_t = ‖R_t − y‖²   (squared L2 over the 4 box coordinates)
        L_b = e_s  if e_s + m > e_t  else 0,   averaged over the n boxes

    The teacher acts as an upper bound: once the student regresses at least ``m`` better than the
    teacher it receives no extra push, so a weak teacher cannot drag it away from the ground truth.
    Chen et al. add it to the ordinary regression loss with weight ν = 0.5.

    Shapes: ``s_box``, ``t_box``, ``gt_box`` (n, 4) in the same units (we use grid units, see
    :func:`chen_bounded_box`). Returns a scalar (0 connected to ``s_box``'s graph when n == 0).
    """
    if not (s_box.shape == t_box.shape == gt_box.shape) or s_box.shape[-1] != 4:
        raise ValueError(f"bounded_regression: need three (n, 4) tensors, got {tuple(s_box.shape)}, "
                         f"{tuple(t_box.shape)}, {tuple(gt_box.shape)}")
    if s_box.shape[0] == 0:
        return s_box.sum() * 0.0
    gt = gt_box.detach().float()
    e_s = (s_box.float() - gt).pow(2).sum(-1)
    e_t = (t_box.detach().float() - gt).pow(2).sum(-1)
    active = (e_s + margin > e_t).to(e_s.dtype)
    return (e_s * active).mean()


def decode_cells(p: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """YOLOv5 box decoding of gathered raw rows: xy = 2σ − 0.5 (cell-relative), wh = (2σ)²·anchor.

    ``p`` (n, ≥4) raw logits, ``anchors`` (n, 2) in grid units → (n, 4) xywh in grid units.
    """
    xy = p[:, :2].sigmoid() * 2.0 - 0.5
    wh = (p[:, 2:4].sigmoid() * 2.0).pow(2) * anchors
    return torch.cat((xy, wh), 1)


def regression_space(box: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """xywh (grid units, xy cell-relative) → the R-CNN regression parametrisation Chen et al. bound:
    (x / a_w, y / a_h, log(w / a_w), log(h / a_h)).

    Measured in raw grid units the squared error of a P5 box is hundreds of times that of a small
    box and ~80× the CIoU loss at the start of training (docs/RESULTS.md: chen then made the student
    far worse); relative to the matched anchor, every box counts alike, as in the paper.
    ``box`` (n, 4), ``anchors`` (n, 2) grid units → (n, 4).
    """
    wh = box[:, 2:4].clamp_min(1e-6)
    return torch.cat((box[:, :2] / anchors, torch.log(wh / anchors)), 1)


def chen_bounded_box(
    s: Sequence[torch.Tensor],
    t: Sequence[torch.Tensor],
    tbox: Sequence[torch.Tensor],
    indices: Sequence[tuple[torch.Tensor, ...]],
    anchors: Sequence[torch.Tensor],
    margin: float = 0.0,
) -> torch.Tensor:
    """:func:`bounded_regression` on the positive cells of every level, summed over levels.

    Positives, their ground-truth boxes and matched anchors come from
    ``utils.loss.DetectionLoss.assign`` (the detection loss's own assignment, so KD and the
    hard loss agree on which cells hold objects): per level ``indices`` = (b, a, gj, gi),
    ``tbox`` (n, 4) xywh with xy relative to the cell corner and wh in grid units, ``anchors``
    (n, 2) grid units. Student and teacher rows are decoded the same way (:func:`decode_cells`), and
    all three are compared in :func:`regression_space` (anchor-relative, log sizes).
    """
    pairs = list(_pairs(s, t, "chen_bounded_box"))
    if not (len(pairs) == len(tbox) == len(indices) == len(anchors)):
        raise ValueError("chen_bounded_box: targets must have one entry per prediction level")
    total = None
    for (si, ti), gt, (b, a, gj, gi), anc in zip(pairs, tbox, indices, anchors):
        lb = bounded_regression(regression_space(decode_cells(si[b, a, gj, gi], anc), anc),
                                regression_space(decode_cells(ti[b, a, gj, gi], anc), anc),
                                regression_space(gt, anc), margin)
        total = lb if total is None else total + lb
    return total


__all__ = [
    "bounded_regression",
    "chen_bounded_box",
    "chen_soft_terms",
    "decode_cells",
    "regression_space",
    "objectness_weighted_mse",
    "soft_label_bce",
    "soft_output_terms",
]
