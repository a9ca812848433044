"""Quantization mimic: the mimic L2 between uniformly quantised teacher and student feature maps.

Wei et al. 2018, "Quantization Mimic: Towards Very Tiny CNN for Object Detection" (ECCV):

    L_qm = 1/(2N) · Σ_i (1/m_i) · ‖Q(u_i) − Q(r(v_i))‖²

i.e. Li et al.'s mimic loss (:func:`distill.feature_mimic.mimic_loss`: ground-truth boxes as the
regions, m_i = C·cells their feature dimension, N their number; optional teacher-confident regions) computed
after a uniform quantiser Q has been applied to the teacher maps u and to the adapted student maps
r(v). The quantised teacher offers a smaller set of targets; the student only has to land in the
right bin. Wei et al. also fine-tune the teacher with quantised features first; we do not (the
teacher is frozen): its rounding error is part of the target.

Quantiser (:class:`UniformQuantizer`, one per Detect level) — our choices and why:

* Grid ``x̂ = β · clamp(round(x / β), n_lo, n_hi)``: integers n_lo ≤ 0 ≤ n_hi, so 0 is exactly
  representable (SiLU maps are mostly near 0) and every output lies on the grid β·ℤ.
* The TEACHER decides the grid: its range [lo, hi] (lo ≤ 0 ≤ hi) is a running estimate of the
  teacher maps' min and max (EMA, momentum ``Q_MOMENTUM``, the first training batch initialises
  it; updated only in training mode; before any update the current batch's range is used). The
  same grid quantises the student, so both are compared on the teacher's lattice.
* ``bits`` (default 8, flag ``--q_bits``): β = (hi − lo)/(2^bits − 1) with an integer zero point
  z = round(−lo/β): n_lo = −z, n_hi = 2^bits − 1 − z, 2^bits levels. This is the asymmetric uint8
  scheme onnxruntime applies to activations in the INT8 export (``export.py --int8``), so 8 bits
  trains the student for the resolution it will be deployed at; fewer bits (e.g. 4) give the
  coarser lattice Wei et al. motivate the method with.
* ``symmetric`` (``--q_symmetric``): the range is ±max|x| instead, β = max|x|/(2^(bits−1) − 1),
  n = ±(2^(bits−1) − 1); wastes half the levels on SiLU maps (min ≈ −0.28) but matches symmetric
  INT8 runtimes.
* ``step`` (``--q_step β``, overrides ``bits``): Wei et al.'s fixed quantisation step; the levels
  span the teacher range, n_lo = floor(lo/β), n_hi = ceil(hi/β).
* ``per_channel`` (``--q_per_channel``): one range (and step) per channel instead of one per map.
  Default per tensor, as onnxruntime quantises activations.
* Student gradient: straight-through estimator, ∂x̂/∂x := 1 everywhere (Bengio et al. 2013), also
  beyond the clipping range: a student value above the teacher's range with the teacher inside it
  then still receives the gradient 2(β·n_hi − Q(u)) that pulls it back, where the "clipped" STE
  (zero outside) would leave it stuck.

Under DDP each rank keeps its own running range (from its own batches); checkpoints store rank 0's.
Reference weight: 1, as ``mimic``; our default shares mimic's calibration (:mod:`distill.methods`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from distill.adapters import check_levels, resize_to
from distill.feature_mimic import FeatureMimic, mimic_loss

Q_BITS = 8
Q_MOMENTUM = 0.1  # EMA of the teacher range: ~10 batches of memory, smooths batch-to-batch extremes


class UniformQuantizer(nn.Module):
    """Uniform quantiser of (B, C, H, W) maps with a grid set by the teacher's running range.

    Args:
        channels: C (the size of the per-channel statistics).
        bits: number of levels 2^bits when ``step`` is None (2 ≤ bits ≤ 16).
        step: fixed step β (> 0) instead of one derived from ``bits``.
        per_channel: one range per channel instead of one per tensor.
        symmetric: range ±max|x| instead of [min, max] (``bits`` mode only).
        momentum: EMA momentum of the running range.

    Buffers ``lo``, ``hi`` ((C,) or (1,)) and ``updates`` (0 = no range observed yet). See the
    module docstring for the formulas.
    """

    def __init__(
        self,
        channels: int,
        bits: int = Q_BITS,
        step: float | None = None,
        per_channel: bool = False,
        symmetric: bool = False,
        momentum: float = Q_MOMENTUM,
    ) -> None:
        super().__init__()
        if not 2 <= int(bits) <= 16:
            raise ValueError(f"--q_bits {bits}: use 2..16")
        if step is not None and not step > 0:
            raise ValueError(f"--q_step {step}: must be > 0")
        if not 0 < momentum <= 1:
            raise ValueError(f"quantiser momentum {momentum}: must be in (0, 1]")
        self.bits, self.step, self.per_channel = int(bits), step, bool(per_channel)
        self.symmetric, self.momentum = bool(symmetric), float(momentum)
        n = int(channels) if per_channel else 1
        self.register_buffer("lo", torch.zeros(n))
        self.register_buffer("hi", torch.zeros(n))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    # ---------------------------------------------------------------------------------- range
    def batch_range(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) of ``t`` (B, C, H, W), per channel (C,) or per tensor (1,), with lo ≤ 0 ≤ hi."""
        t = t.detach().float()
        if self.per_channel:
            lo, hi = t.amin((0, 2, 3)), t.amax((0, 2, 3))
        else:
            lo, hi = t.min().view(1), t.max().view(1)
        if self.symmetric:
            hi = torch.maximum(lo.abs(), hi.abs())
            lo = -hi
        return lo.clamp(max=0.0), hi.clamp(min=0.0)

    @torch.no_grad()
    def observe(self, t: torch.Tensor) -> None:
        """Update the running range with the teacher batch ``t`` (the first call sets it)."""
        lo, hi = self.batch_range(t)
        if int(self.updates) == 0:
            self.lo.copy_(lo)
            self.hi.copy_(hi)
        else:
            self.lo.add_(self.momentum * (lo - self.lo))
            self.hi.add_(self.momentum * (hi - self.hi))
        self.updates += 1

    def grid(self, ref: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(β, n_lo, n_hi), each (C,) or (1,) float: the lattice of the current range.

        Before any :meth:`observe` the range of ``ref`` (a teacher batch) is used.
        """
        if int(self.updates) == 0:
            if ref is None:
                raise RuntimeError("UniformQuantizer: no range observed yet; pass a teacher batch")
            lo, hi = self.batch_range(ref)
        else:
            lo, hi = self.lo, self.hi
        tiny = torch.finfo(torch.float32).tiny  # an all-zero range still gives a finite step
        if self.step is not None:
            beta = torch.full_like(lo, float(self.step))
            return beta, torch.floor(lo / beta), torch.ceil(hi / beta)
        if self.symmetric:
            n = float(2 ** (self.bits - 1) - 1)
            beta = (hi / n).clamp(min=tiny)
            return beta, torch.full_like(lo, -n), torch.full_like(lo, n)
        levels = float(2**self.bits - 1)
        beta = ((hi - lo) / levels).clamp(min=tiny)
        z = torch.round(-lo / beta).clamp(0.0, levels)
        return beta, -z, levels - z

    # ----------------------------------------------------------------------------- quantise
    def forward(self, x: torch.Tensor, ref: torch.Tensor | None = None, ste: bool = False) -> torch.Tensor:
        """Quantise ``x`` (B, C, H, W) onto the grid; with ``ste`` the gradient passes straight through.

        Q(x) = β·clamp(round(x/β), n_lo, n_hi), computed in fp32. With ``ste``: x + (Q(x) − x)
        detached, so the value is Q(x) and ∂/∂x is the identity (everywhere, see the module
        docstring); without it the result carries no gradient through the rounding.
        """
        beta, n_lo, n_hi = (v.to(x.device).view(1, -1, 1, 1) for v in self.grid(ref))
        xf = x.float()
        q = beta * torch.maximum(torch.minimum(torch.round(xf / beta), n_hi), n_lo)
        return xf + (q - xf).detach() if ste else q.detach()

    def extra_repr(self) -> str:
        how = f"step={self.step:g}" if self.step is not None else f"bits={self.bits}"
        return f"{how}, per_channel={self.per_channel}, symmetric={self.symmetric}, momentum={self.momentum:g}"


def qmimic_loss(
    s: Sequence[torch.Tensor],
    t: Sequence[torch.Tensor],
    targets: torch.Tensor,
    quantizers: Sequence[UniformQuantizer],
    conf_masks: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Σ_levels 1/(2N) Σ_regions (1/m_i)·Σ_{cells∈i, c} (Q(t) − Q(s))²  (Wei et al. 2018).

    ``s``, ``t``: per-level (B, C, H, W), equal C (the student already adapted; it is resized to the
    teacher's H×W BEFORE quantising, so its values stay on the grid); ``targets`` (n, 6)
    normalised ``[img, cls, xc, yc, w, h]``; ``quantizers``: one per level (their current grid is
    used, nothing is observed here); ``conf_masks``: see :func:`~distill.feature_mimic.mimic_loss`,
    which computes the regions, the 1/m_i and 1/(2N) normalisation. Returns a scalar; the student's
    gradient passes the rounding straight through.
    """
    check_levels(list(s), list(t), "qmimic_loss")
    if len(quantizers) != len(t):
        raise ValueError(f"qmimic_loss: {len(quantizers)} quantisers for {len(t)} levels")
    sq, tq = [], []
    for q, si, ti in zip(quantizers, s, t):
        ti = ti.detach().float()
        tq.append(q(ti, ref=ti))
        sq.append(q(resize_to(si.float(), ti), ref=ti, ste=True))
    return mimic_loss(sq, tq, targets, conf_masks)


class FeatureQMimic(FeatureMimic):
    """Quantization mimic: :class:`~distill.feature_mimic.FeatureMimic`'s 1×1 regression layers plus
    one :class:`UniformQuantizer` per level.

    ``forward(s, t, targets, conf_masks=None)`` → scalar (:func:`qmimic_loss`). In training mode the
    quantisers first observe the teacher maps (running range), then quantise both sides.
    """

    def __init__(
        self,
        c_s: list[int],
        c_t: list[int],
        bits: int = Q_BITS,
        step: float | None = None,
        per_channel: bool = False,
        symmetric: bool = False,
        momentum: float = Q_MOMENTUM,
    ) -> None:
        super().__init__(c_s, c_t)
        self.quantizers = nn.ModuleList(
            UniformQuantizer(c, bits=bits, step=step, per_channel=per_channel, symmetric=symmetric, momentum=momentum)
            for c in c_t
        )

    def forward(
        self,
        s: Sequence[torch.Tensor],
        t: Sequence[torch.Tensor],
        targets: torch.Tensor,
        conf_masks: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        check_levels(list(s), list(t), "FeatureQMimic")
        if self.training:
            for q, ti in zip(self.quantizers, t):
                q.observe(ti)
        return qmimic_loss([a(x) for a, x in zip(self.adapters, s)], t, targets, self.quantizers, conf_masks)


__all__ = ["Q_BITS", "Q_MOMENTUM", "FeatureQMimic", "UniformQuantizer", "qmimic_loss"]
