"""CWD: channel-wise distillation for dense prediction.

Shu et al. 2021, "Channel-wise Knowledge Distillation for Dense Prediction" (ICCV). Each channel's
activation map is turned into a spatial distribution with a softmax, so the student learns WHERE
each teacher channel fires rather than its raw magnitude. Reference: τ = 1, weight 5-10 on FPN
levels (mmdetection); our default is 1 (:data:`distill.methods.FEATURE_TABLE`): at 5 the term was
~67× YOLOv5's detection loss at initialisation, at 1 ~13×, where the calibrated pkd/mimic sit
(benchmarks/kd_terms.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from distill.adapters import check_levels, make_connectors, resize_to


def cwd_loss(s: Sequence[torch.Tensor], t: Sequence[torch.Tensor], tau: float = 1.0) -> torch.Tensor:
    """Σ_levels τ² · Σ_{n,c} KL(softmax_hw(t_nc/τ) ‖ softmax_hw(s_nc/τ)) / (N·C).

    The softmax runs over the H·W positions of each (image, channel) map. ``s``, ``t``: per-level
    (N, C, H, W) with equal C; the student is resized bilinearly to the teacher's H×W when they
    differ. Zero iff every student map equals the teacher's up to a per-map additive constant;
    otherwise positive. Returns a scalar.
    """
    if tau <= 0:
        raise ValueError(f"cwd_loss: tau must be > 0, got {tau}")
    check_levels(list(s), list(t), "cwd_loss")
    total = None
    for si, ti in zip(s, t):
        ti = ti.detach().float()
        si = resize_to(si.float(), ti)
        N, C = ti.shape[:2]
        log_ps = F.log_softmax(si.reshape(N * C, -1) / tau, dim=1)
        log_pt = F.log_softmax(ti.reshape(N * C, -1) / tau, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum()
        loss = kl * (tau * tau) / (N * C)
        total = loss if total is None else total + loss
    return total


class FeatureCWD(nn.Module):
    """CWD with a 1×1 connector only on levels whose channel counts differ.

    ``forward(s, t)`` takes per-level (N, C_s, H, W) and (N, C_t, H, W) lists → scalar.
    """

    def __init__(self, c_s: list[int], c_t: list[int], tau: float = 1.0) -> None:
        super().__init__()
        self.tau = float(tau)
        self.adapters = make_connectors(c_s, c_t, always=False)

    def forward(self, s: Sequence[torch.Tensor], t: Sequence[torch.Tensor]) -> torch.Tensor:
        check_levels(list(s), list(t), "FeatureCWD")
        return cwd_loss([a(x) for a, x in zip(self.adapters, s)], t, self.tau)


__all__ = ["FeatureCWD", "cwd_loss"]
