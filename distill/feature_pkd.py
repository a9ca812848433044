"""PKD: feature distillation through the Pearson correlation coefficient.

Cao et al. 2022, "PKD: General Distillation Framework for Object Detectors via Pearson Correlation
Coefficient" (NeurIPS). Normalising each channel to zero mean and unit variance first removes the
magnitude gap between teacher and student (different widths, BN scales, FPN designs), so only the
pattern of activations is imitated. Reference detection configs weight it 6-10; our default is 1
(:data:`distill.methods.FEATURE_TABLE`: 6 swamped YOLOv5's smaller detection loss on the demo study,
docs/RESULTS.md; 1 puts the term at ~12× the detection loss at initialisation, benchmarks/kd_terms.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distill.adapters import check_levels, make_connectors, resize_to

PKD_EPS = 1e-6


def pkd_normalize(x: torch.Tensor, eps: float = PKD_EPS) -> torch.Tensor:
    """Per-channel standardisation over batch × H × W: z = (x − mean_c) / (std_c + eps).

    ``std_c`` is the unbiased standard deviation (divisor N·H·W − 1); a channel with a single value
    (batch 1 on a 1×1 map) has none and standardises to 0 (torch's unbiased std would be NaN and
    poison the whole loss). Shape kept: (N, C, H, W).
    """
    x = x.float()
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    values = x.numel() // max(x.shape[1], 1)
    std = x.std(dim=(0, 2, 3), keepdim=True, correction=1 if values > 1 else 0)
    return (x - mean) / (std + eps)


def pkd_loss(s: Sequence[torch.Tensor], t: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ_levels MSE(z_s, z_t) / 2 with z = :func:`pkd_normalize` of each map.

    For standardised maps (and large N·H·W) this is 1 − r, r the per-channel Pearson correlation
    averaged over channels, so it lies in [0, 2] per level, is 0 when the student matches the
    teacher up to any per-channel positive scale and shift, and is unchanged by such changes.
    ``s``, ``t``: per-level (N, C, H, W) with equal C; the student is resized bilinearly to the
    teacher's H×W (before normalising) when they differ. Returns a scalar.
    """
    check_levels(list(s), list(t), "pkd_loss")
    total = None
    for si, ti in zip(s, t):
        ti = ti.detach()
        zs = pkd_normalize(resize_to(si.float(), ti))
        zt = pkd_normalize(ti)
        loss = (zs - zt).pow(2).mean() / 2
        total = loss if total is None else total + loss
    return total


class FeaturePKD(nn.Module):
    """PKD with a 1×1 connector only on levels whose channel counts differ (identity otherwise).

    With equal widths no adapter is needed — normalisation already absorbs any per-channel affine
    gap — and keeping none preserves that exact invariance. ``forward(s, t)`` → scalar.
    """

    def __init__(self, c_s: list[int], c_t: list[int]) -> None:
        super().__init__()
        self.adapters = make_connectors(c_s, c_t, always=False)

    def forward(self, s: Sequence[torch.Tensor], t: Sequence[torch.Tensor]) -> torch.Tensor:
        check_levels(list(s), list(t), "FeaturePKD")
        return pkd_loss([a(x) for a, x in zip(self.adapters, s)], t)


__all__ = ["PKD_EPS", "FeaturePKD", "pkd_loss", "pkd_normalize"]
