"""Hint learning: L2 between an adapted student feature and the teacher feature.

FitNets (Romero et al. 2015) and, for detection, Chen et al. 2017 ("Learning Efficient Object
Detection Models with Knowledge Distillation"), who found that a 1×1 adaptation layer helps even
when the widths already match (VOC 56.9 → 58.0) and weighted the hint term γ = 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distill.adapters import check_levels, make_connectors, resize_to


def hint_mse(s: Sequence[torch.Tensor], t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_levels mean((s − t)²).

    ``s``, ``t``: per-level (N, C, H, W) maps with equal channels (adapt the student first); the
    student is resized bilinearly to the teacher's H×W when they differ. We use the mean rather
    than Chen's plain sum so the value does not grow with image size and width; the reference
    weight γ = 0.5 is the default ``--f_weight``. Returns a scalar.
    """
    check_levels(list(s), list(t), "hint_mse")
    total = None
    for si, ti in zip(s, t):
        ti = ti.detach().float()
        loss = (resize_to(si.float(), ti) - ti).pow(2).mean()
        total = loss if total is None else total + loss
    return total


class FeatureMSE(nn.Module):
    """Hint L2 after a per-level 1×1 :class:`~distill.adapters.Connector` (always present).

    Args: ``c_s``, ``c_t`` per-level channel counts of the student and the teacher.
    ``forward(s, t)`` takes per-level (N, C_s, H, W) and (N, C_t, H, W) lists → scalar.
    """

    def __init__(self, c_s: list[int], c_t: list[int]) -> None:
        super().__init__()
        self.adapters = make_connectors(c_s, c_t, always=True)

    def forward(self, s: Sequence[torch.Tensor], t: Sequence[torch.Tensor]) -> torch.Tensor:
        check_levels(list(s), list(t), "FeatureMSE")
        return hint_mse([a(x) for a, x in zip(self.adapters, s)], t)


__all__ = ["FeatureMSE", "hint_mse"]
