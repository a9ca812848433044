"""MGD: masked generative distillation.

Yang et al. 2022, "Masked Generative Distillation" (ECCV). Random spatial positions of the
(aligned) student feature are zeroed and a small generator must rebuild the FULL teacher feature
from what is left, which forces the student's features to carry enough context to do so. Reference:
drop ratio λ = 0.65, generator conv3×3 → ReLU → conv3×3, loss α·Σ(G − t)²/N with α = 2e-5.

Ours: the module returns the MEAN over every value, Σ(G − t)²/(N·C·H·W), so the term does not grow
with the resolution or the width (the paper's Σ/N with α = 2e-5 was tuned for mmdetection's FPN at
~800 px); the default ``--f_weight`` is calibrated on YOLOv5's detection loss instead
(benchmarks/kd_terms.py). The random mask comes from the module's own ``torch.Generator`` seeded
with ``seed`` (``DistillConfig.mgd_seed``), so a run's masks do not depend on, nor disturb, the
global RNG (data augmentation, dropout) and are the same from one run to the next.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from distill.adapters import check_levels, make_connectors, resize_to

MGD_DROP_RATIO = 0.65


def random_spatial_mask(
    x: torch.Tensor, drop_ratio: float = MGD_DROP_RATIO, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(N, 1, H, W) float mask for ``x`` (N, C, H, W): each position is 0 with probability
    ``drop_ratio`` and 1 otherwise, shared by all channels of that position."""
    N, _, H, W = x.shape
    u = torch.rand((N, 1, H, W), device=x.device, generator=generator)
    return (u >= drop_ratio).to(torch.float32)


def mgd_generator(c: int) -> nn.Sequential:
    """The MGD generator: conv3×3 (C→C) → ReLU → conv3×3 (C→C), padding 1 (PyTorch default init)."""
    return nn.Sequential(
        nn.Conv2d(c, c, kernel_size=3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(c, c, kernel_size=3, padding=1),
    )


class FeatureMGD(nn.Module):
    """Per level: mean_{n,c,h,w} (G(align(s)·M) − t)², summed over levels (the weight is applied outside).

    ``align`` is a 1×1 connector on levels whose widths differ (identity otherwise), ``M`` a fresh
    :func:`random_spatial_mask` every call, ``G`` one :func:`mgd_generator` per level. The
    generators are trained with the student and discarded afterwards.

    Args: ``c_s``, ``c_t`` per-level channels; ``drop_ratio`` λ; ``generator`` an optional
    ``torch.Generator`` for the masks (must live on the features' device); without one, a
    generator seeded with ``seed`` is created on the features' device at the first call.
    ``forward(s, t)`` → scalar.
    """

    def __init__(
        self,
        c_s: list[int],
        c_t: list[int],
        drop_ratio: float = MGD_DROP_RATIO,
        generator: torch.Generator | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= drop_ratio < 1.0:
            raise ValueError(f"FeatureMGD: drop_ratio must be in [0, 1), got {drop_ratio}")
        self.drop_ratio = float(drop_ratio)
        self.rng = generator
        self.seed = int(seed)
        self._restored_rng: torch.Tensor | None = None  # a checkpoint's mask-RNG state, applied at first use
        self.adapters = make_connectors(c_s, c_t, always=False)
        self.generators = nn.ModuleList(mgd_generator(c) for c in c_t)

    def get_extra_state(self) -> torch.Tensor:
        """The mask generator's state (uint8; empty before the first step): saved with the connectors in
        last.pt, so a resumed run draws the masks the uninterrupted run would have drawn."""
        if self._restored_rng is not None:
            return self._restored_rng
        return self.rng.get_state() if self.rng is not None else torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self._restored_rng = state.clone() if state.numel() else None

    def forward(self, s: Sequence[torch.Tensor], t: Sequence[torch.Tensor]) -> torch.Tensor:
        check_levels(list(s), list(t), "FeatureMGD")
        if self.rng is None or self.rng.device != t[0].device:
            self.rng = torch.Generator(device=t[0].device).manual_seed(self.seed)
        if self._restored_rng is not None:
            saved, self._restored_rng = self._restored_rng, None
            if saved.numel() == self.rng.get_state().numel():
                self.rng.set_state(saved)
            else:  # a CPU generator's state is 5056 bytes, a CUDA one's 16: resumed on another device
                warnings.warn("MGD: the checkpoint's mask generator ran on another device; this run's masks "
                              "continue from --seed instead of the uninterrupted run's", stacklevel=2)
        total = None
        for align, gen, si, ti in zip(self.adapters, self.generators, s, t):
            ti = ti.detach().float()
            x = resize_to(align(si).float(), ti)
            rebuilt = gen(x * random_spatial_mask(x, self.drop_ratio, self.rng))
            loss = (rebuilt - ti).pow(2).mean()
            total = loss if total is None else total + loss
        return total


__all__ = ["MGD_DROP_RATIO", "FeatureMGD", "mgd_generator", "random_spatial_mask"]
