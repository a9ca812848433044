"""Mimic: feature imitation restricted to object regions.

Li et al. 2017, "Mimicking Very Efficient Network for Object Detection" (CVPR):

    L_m = 1/(2N) · Σ_i (1/m_i) · ‖u_i − r(v_i)‖²

over N regions, u the teacher feature, v the student feature, r a regression (adaptation) layer and
m_i the region's size. Li et al. use RPN proposals; a one-stage YOLO has none, so our regions are
the ground-truth boxes projected onto each level, optionally plus one "teacher-confident" region per
image (the cells where the teacher's objectness exceeds a threshold — objects the labels missed).
Background outside the regions never contributes: the dominant, easy background does not drown the
signal, which is the point of the method. Reference weight 1; our default is in
:data:`distill.methods.FEATURE_TABLE` (calibrated by benchmarks/kd_terms.py).

Region → cells rule: a box covers the cells it intersects, [floor(x1), ceil(x2)) × [floor(y1),
ceil(y2)) in grid units of that level, at least one cell, clamped to the map. m_i = C · (the number
of those cells), the region's feature dimension as in the paper; ‖·‖² sums over channels and cells.
So the term is a mean squared error per feature value: it does not grow with the width C, and a
P5 region (wide maps) counts as much as a P3 one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distill.adapters import check_levels, make_connectors, resize_to


def box_cells(targets: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Cell ranges of normalised boxes on an h×w map.

    ``targets`` (n, 6) ``[img, cls, xc, yc, w, h]`` normalised to the image (the feature map covers
    the whole image, so grid coordinates are the normalised ones × map size). Returns (n, 5) long
    ``[img, x1, y1, x2, y2]`` with x2, y2 exclusive, x2 > x1, y2 > y1.
    """
    t = targets.detach().float()
    xc, yc, bw, bh = t[:, 2] * w, t[:, 3] * h, t[:, 4] * w, t[:, 5] * h
    x1 = torch.floor(xc - bw / 2).clamp(0, w - 1)
    y1 = torch.floor(yc - bh / 2).clamp(0, h - 1)
    x2 = torch.maximum(torch.ceil(xc + bw / 2).clamp(max=w), x1 + 1)
    y2 = torch.maximum(torch.ceil(yc + bh / 2).clamp(max=h), y1 + 1)
    return torch.stack((t[:, 0], x1, y1, x2, y2), 1).long()


def _region_sums(d: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """Sums of d (N, H, W) over the boxes ``cells`` (n, 5) through a summed-area table (O(1) per box)."""
    N, H, W = d.shape
    sat = torch.zeros((N, H + 1, W + 1), dtype=torch.float64, device=d.device)
    # fp64 table: box sums are differences of large prefix sums, fp32 would lose small boxes' digits.
    sat[:, 1:, 1:] = d.double().cumsum(1).cumsum(2)
    b, x1, y1, x2, y2 = cells.unbind(1)
    return (sat[b, y2, x2] - sat[b, y1, x2] - sat[b, y2, x1] + sat[b, y1, x1]).to(d.dtype)


def mimic_loss(
    s: Sequence[torch.Tensor],
    t: Sequence[torch.Tensor],
    targets: torch.Tensor,
    conf_masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Σ_levels 1/(2N) Σ_regions (1/m_i)·Σ_{cells∈i, c} (t − s)²,  m_i = C·cells(i).

    ``s``, ``t``: per-level (B, C, H, W), equal C (adapt the student first; it is resized to the
    teacher's H×W if needed); ``targets`` (n, 6) normalised ``[img, cls, xc, yc, w, h]``;
    ``conf_masks``: optional per-level (B, H, W) bool masks, each image's True cells forming one
    more region. N counts the regions of that level; with none the level adds an exact 0 that
    stays connected to the student's graph. Returns a scalar.
    """
    check_levels(list(s), list(t), "mimic_loss")
    if conf_masks is not None and len(conf_masks) != len(t):
        raise ValueError(f"mimic_loss: {len(conf_masks)} confidence masks for {len(t)} levels")
    total = None
    for i, (si, ti) in enumerate(zip(s, t)):
        ti = ti.detach().float()
        d = (resize_to(si.float(), ti) - ti).pow(2).mean(1)  # (B, H, W): Σ_c / C, the C of m_i = C·cells
        H, W = d.shape[1:]
        per_region = []
        if targets.shape[0]:
            cells = box_cells(targets.to(d.device), H, W)
            area = ((cells[:, 3] - cells[:, 1]) * (cells[:, 4] - cells[:, 2])).to(d.dtype)
            per_region.append(_region_sums(d, cells) / area)
        if conf_masks is not None:
            m = conf_masks[i].to(d.device, torch.bool)
            count = m.flatten(1).sum(1)
            has = count > 0
            sums = (d * m.to(d.dtype)).flatten(1).sum(1)
            per_region.append(sums[has] / count[has].to(d.dtype))
        r = torch.cat(per_region) if per_region else d.new_zeros(0)
        loss = r.sum() / (2 * r.numel()) if r.numel() else d.sum() * 0.0
        total = loss if total is None else total + loss
    return total


class FeatureMimic(nn.Module):
    """Mimic with the regression layer r = a 1×1 :class:`~distill.adapters.Connector` on every level.

    ``forward(s, t, targets, conf_masks=None)`` → scalar (see :func:`mimic_loss`).
    """

    def __init__(self, c_s: list[int], c_t: list[int]) -> None:
        super().__init__()
        self.adapters = make_connectors(c_s, c_t, always=True)

    def forward(
        self,
        s: Sequence[torch.Tensor],
        t: Sequence[torch.Tensor],
        targets: torch.Tensor,
        conf_masks: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        check_levels(list(s), list(t), "FeatureMimic")
        return mimic_loss([a(x) for a, x in zip(self.adapters, s)], t, targets, conf_masks)


__all__ = ["FeatureMimic", "box_cells", "mimic_loss"]
