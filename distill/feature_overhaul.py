"""Overhaul of feature distillation, adapted to SiLU networks.

Heo et al. 2019, "A Comprehensive Overhaul of Feature Distillation" (ICCV). Four ingredients:
features are taken BEFORE the activation (the teacher's BN output), the teacher target goes
through a margin ReLU, a partial L2 ignores errors that the activation would hide, and the student
passes through a connector (1×1 conv without bias + BN).

Margins. For ReLU, m_c = E[x | x < 0] for x ~ N(β_c, γ_c²), the teacher's BN shift and scale
(the BN output's distribution): m = β − |γ|·φ(β/|γ|)/Φ(−β/|γ|) when Φ(−β/|γ|) > 0.001, else
−3|γ|. Targets below m_c are raised to m_c, and where both the (transformed) target and the
student are ≤ 0 with the student below the target, no loss is taken: ReLU maps all of those to 0.

SiLU adaptation (ours). YOLOv5 activates with SiLU(x) = x·σ(x), which is NOT flat for x < 0: it
decreases to its minimum −0.2785 at x* ≈ −1.2785 and then rises back towards 0 as x → −∞. So:

* On [x*, ∞) SiLU is strictly increasing: pre-activation order is activation order, and the
  teacher's value there is informative. Below x*, SiLU folds back and saturates at ≈0; a teacher
  response of −2 or −6 is "off" in the same sense that any negative response is off under ReLU.
* We therefore use the margin m'_c = max(m_c, x*), x* = −1.2785 (the pre-activation argmin of
  SiLU — not −0.2785, which is SiLU's minimum VALUE and lives on the output side). The Gaussian
  m_c is kept when it lies in the monotone part (the usual case: β ≈ 0, γ ≈ 1 gives m ≈ −0.80);
  for wide channels (large |γ|) the margin stops at x* instead of reaching into the folded part,
  where matching exact values would teach the student a distinction the next layer barely sees.
* The partial L2 keeps the paper's rule (skip where target ≤ 0 and student ≤ target): with the
  clamped margin it means "a student that is at least as far into the off-region as the teacher
  is not pushed back", which is the paper's intent.
* Other activations: ReLU-like ones keep the paper's margin; Hardswish gets the same treatment
  as SiLU with its own argmin −1.5 (:func:`activation_floor`, chosen from the teacher's layer).

Loss = Σ_levels w_l · Σ_{n,c,h,w} partial-L2 / N with w_l = 1 / 2^(L−l−1) (l = 0 for P3, the
shallowest level; P5 gets 1). The paper also divides by a constant (1e3-1e4); we leave that to the
weight: default ``--f_weight`` 1e-4 (neck maps at 640 px have ~10⁶ elements per image; on the demo
set at 160 px the weighted term is ~11× the detection loss at initialisation, in line with the
calibrated pkd/mimic, benchmarks/kd_terms.py).

Teacher BN statistics (``--d_overhaul_bn``). Heo et al. distil with the teacher's BN normalising
with the BATCH statistics (train mode), so target and student (also in train mode) are normalised
alike. ``running`` (default) keeps the frozen teacher in eval mode; ``batch`` recomputes every
teacher BN output from the batch's mean/variance through temporary forward hooks
(:meth:`distill.distiller.Distiller.teacher_forward`) — the teacher's weights and running buffers are
never written. The margins are computed from the BN's γ/β either way. Needs an unfolded teacher
(BN layers present).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from distill.adapters import Connector, check_levels, resize_to

# Pre-activation argmin of SiLU: the root of 1 + x·(1 − σ(x)) = 0; SiLU(x*) = −0.27846.
SILU_ARGMIN = -1.2784645
HARDSWISH_ARGMIN = -1.5  # x·relu6(x + 3)/6 has its minimum −0.375 at x = −1.5


def gaussian_margin(gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Heo et al.'s margin m = E[x | x < 0], x ~ N(β, γ²), per channel (the ReLU version).

    m = β − |γ|·φ(β/|γ|) / Φ(−β/|γ|)  when Φ(−β/|γ|) > 0.001,  else −3|γ|.
    ``gamma``, ``beta``: (C,) BN weight and bias → (C,) fp32.
    """
    s = gamma.detach().float().abs().clamp_min(1e-12)
    b = beta.detach().float()
    z = b / s
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    cdf_neg = 0.5 * torch.erfc(z / math.sqrt(2.0))  # Φ(−z)
    safe = cdf_neg > 0.001
    m = b - s * pdf / cdf_neg.clamp_min(0.001)
    return torch.where(safe, m, -3.0 * s)


def activation_floor(act: nn.Module | None) -> float | None:
    """Lowest useful margin for the activation that follows the tapped BN.

    SiLU → x* = −1.2785 (see the module docstring); Hardswish, whose minimum is at x = −1.5 by the
    same argument → −1.5; ReLU-like and anything else → None (the paper's margin unchanged).
    """
    if isinstance(act, nn.SiLU):
        return SILU_ARGMIN
    if isinstance(act, nn.Hardswish):
        return HARDSWISH_ARGMIN
    return None


def silu_margin(bn: nn.BatchNorm2d, floor: float | None = SILU_ARGMIN) -> torch.Tensor:
    """Margin max(m_c, floor) from a teacher BN layer (see the module docstring) → (C,).

    ``floor`` None gives the paper's ReLU margin m_c.
    """
    m = gaussian_margin(bn.weight, bn.bias)
    return m if floor is None else m.clamp_min(floor)


def partial_l2(s: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Σ (s − target)² over the elements where NOT (target ≤ 0 and s ≤ target); shapes equal → scalar."""
    keep = (target > 0) | (s > target)
    return ((s - target).pow(2) * keep.to(s.dtype)).sum()


def overhaul_loss(
    s: Sequence[torch.Tensor],
    t: Sequence[torch.Tensor],
    margins: Sequence[torch.Tensor],
    level_weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Σ_levels w_l · partial_l2(s_l, max(t_l, m_l)) / N.

    ``s``: per-level (N, C, H, W) student maps already through the connector; ``t``: teacher
    pre-activation maps, same channels (student resized to the teacher's H×W if needed);
    ``margins``: per-level (C,) margins (see :func:`silu_margin`); ``level_weights`` default
    1/2^(L−l−1). Returns a scalar.
    """
    check_levels(list(s), list(t), "overhaul_loss")
    L = len(t)
    if len(margins) != L:
        raise ValueError(f"overhaul_loss: {len(margins)} margin vectors for {L} levels")
    weights = list(level_weights) if level_weights is not None else [1.0 / 2 ** (L - i - 1) for i in range(L)]
    total = None
    for w, si, ti, m in zip(weights, s, t, margins):
        ti = ti.detach().float()
        target = torch.maximum(ti, m.to(ti.device, ti.dtype).view(1, -1, 1, 1))
        loss = w * partial_l2(resize_to(si.float(), ti), target) / ti.shape[0]
        total = loss if total is None else total + loss
    return total


class FeatureOverhaul(nn.Module):
    """Overhaul distillation with connectors (1×1 conv no bias + BN) on every level.

    Args:
        c_s, c_t: per-level channel counts.
        teacher_bns: per level, the teacher's BN whose output is the tapped pre-activation feature
            (from :class:`distill.taps.FeatureTaps` with ``pre_activation=True``); the margins are
            computed once here (the teacher is frozen) and kept as non-persistent buffers.
        floors: per level, the margin floor (:func:`activation_floor` of the activation after
            that BN); default the SiLU floor on every level.
        level_weights: optional override of 1/2^(L−l−1).

    ``forward(s, t)``: student and teacher PRE-activation per-level maps → scalar.
    """

    def __init__(
        self,
        c_s: list[int],
        c_t: list[int],
        teacher_bns: Sequence[nn.BatchNorm2d],
        floors: Sequence[float | None] | None = None,
        level_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not (len(c_s) == len(c_t) == len(teacher_bns)):
            raise ValueError(f"FeatureOverhaul: {len(c_s)} student levels, {len(c_t)} teacher levels, "
                             f"{len(teacher_bns)} teacher BN layers")
        self.adapters = nn.ModuleList(Connector(a, b, bn=True) for a, b in zip(c_s, c_t))
        floors = list(floors) if floors is not None else [SILU_ARGMIN] * len(teacher_bns)
        for i, (bn, floor) in enumerate(zip(teacher_bns, floors)):
            if bn.num_features != c_t[i]:
                raise ValueError(f"FeatureOverhaul: teacher BN {i} has {bn.num_features} channels, expected {c_t[i]}")
            self.register_buffer(f"margin{i}", silu_margin(bn, floor), persistent=False)
        self.level_weights = list(level_weights) if level_weights is not None else None

    @property
    def margins(self) -> list[torch.Tensor]:
        return [getattr(self, f"margin{i}") for i in range(len(self.adapters))]

    def forward(self, s: Sequence[torch.Tensor], t: Sequence[torch.Tensor]) -> torch.Tensor:
        check_levels(list(s), list(t), "FeatureOverhaul")
        return overhaul_loss([a(x) for a, x in zip(self.adapters, s)], t, self.margins, self.level_weights)


__all__ = [
    "HARDSWISH_ARGMIN",
    "SILU_ARGMIN",
    "FeatureOverhaul",
    "activation_floor",
    "gaussian_margin",
    "overhaul_loss",
    "partial_l2",
    "silu_margin",
]
