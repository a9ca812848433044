"""Stage 1 of the knowledge analysis: learn the per-unit noise scales σ and their entropies.

L(σ) = E_z ‖f(x̃) − f(x)‖² / s_f² − λ · (1/P) Σ_p log σ_{u(p)},  x̃ = x + σ_{u(p)} · z  (z ~ N(0, 1)),
minimised over θ = log σ with Adam, θ projected onto [log σ_min, log σ_max] after every step;
H_u = log σ_u + ½·log(2πe). The derivation and the choice of λ: :mod:`analysis.knowledge`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

HALF_LOG_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)  # H of N(0, σ²) is log σ + this


@dataclass
class EntropySettings:
    """How the per-unit noise scales σ are learned (see :mod:`analysis.knowledge` for L(σ)).

    lam: λ, weight of the mean log σ against the relative feature change (larger → noisier
        optimum: more change tolerated everywhere). steps/lr: Adam on θ = log σ. samples: noise
        draws per step. cell: unit side in pixels (1 = per pixel). sigma_init/min/max: start and
        projection bounds of σ in 0-1 intensity units.
    """

    lam: float = 0.01
    steps: int = 200
    samples: int = 4
    lr: float = 0.05
    cell: int = 16
    sigma_init: float = 0.01
    sigma_min: float = 1e-5
    sigma_max: float = 1.0

    def check(self) -> None:
        """Raise ValueError naming the bad setting."""
        if self.lam <= 0:
            raise ValueError(f"lam must be > 0, got {self.lam}")
        if self.steps < 1 or self.samples < 1 or self.cell < 1:
            raise ValueError(f"steps, samples and cell must be >= 1 (got {self.steps}, {self.samples}, {self.cell})")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.sigma_min <= self.sigma_init <= self.sigma_max:
            raise ValueError(f"need 0 < sigma_min <= sigma_init <= sigma_max, got "
                             f"{self.sigma_min}, {self.sigma_init}, {self.sigma_max}")


@dataclass
class EntropyResult:
    """Output of :func:`learn_entropy` for a batch of B images on a (gh, gw) unit grid.

    entropy: (B, gh, gw) H_u in nats; log_sigma: (B, gh, gw) log σ_u; change: (B,) relative feature
    change E‖f(x̃) − f(x)‖²/s_f² averaged over the last tenth of the steps; loss: L summed over the
    batch, per step.
    """

    entropy: torch.Tensor
    log_sigma: torch.Tensor
    change: torch.Tensor
    loss: list[float] = field(default_factory=list)


def grid_shape(shape_hw: tuple[int, int], cell: int) -> tuple[int, int]:
    """Units per column and row: ``(ceil(H / cell), ceil(W / cell))`` (edge units may be partial)."""
    return math.ceil(shape_hw[0] / cell), math.ceil(shape_hw[1] / cell)


def expand_units(unit_map: torch.Tensor, cell: int, shape_hw: tuple[int, int]) -> torch.Tensor:
    """(..., gh, gw) per-unit values → (..., H, W) per-pixel values (each unit fills its square)."""
    out = unit_map.repeat_interleave(cell, -2).repeat_interleave(cell, -1)
    return out[..., : shape_hw[0], : shape_hw[1]]


class _SigmaObjective:
    """L(σ) for a fixed batch: holds f(x), the spread s_f² and the noise source.

    One call evaluates ``samples``·B perturbed inputs in one feature call and returns the summed
    loss and the (B,) relative change; each image's θ only reaches its own term of the sum, so the
    B problems stay independent.
    """

    def __init__(self, feature_fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                 s: EntropySettings, generator: torch.Generator | None) -> None:
        self.feature_fn, self.images, self.s, self.generator = feature_fn, images, s, generator
        with torch.no_grad():
            self.f0 = feature_fn(images)  # (B, D)
            # s_f² = Σ_d (f_d − mean f)²; the floor keeps a constant feature from dividing by zero.
            self.spread = ((self.f0 - self.f0.mean(1, keepdim=True)) ** 2).sum(1).clamp_min(1e-12)

    def __call__(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """θ (B, 1, gh, gw) → (L summed over the batch, (B,) E‖Δf‖² / s_f²)."""
        B, C, H, W = self.images.shape
        n = self.s.samples
        theta_px = expand_units(theta, self.s.cell, (H, W))  # (B, 1, H, W)
        z = torch.randn((n, B, C, H, W), generator=self.generator, device=self.images.device,
                        dtype=self.images.dtype)
        x = (self.images.unsqueeze(0) + z * theta_px.exp().unsqueeze(0)).reshape(n * B, C, H, W)
        f = self.feature_fn(x).view(n, B, -1)
        change = ((f - self.f0.unsqueeze(0)) ** 2).sum(2).mean(0) / self.spread
        entropy_term = theta_px.mean((1, 2, 3))  # (1/P) Σ_p log σ_u(p), per image
        return (change - self.s.lam * entropy_term).sum(), change


def learn_entropy(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    settings: EntropySettings | None = None,
    generator: torch.Generator | None = None,
) -> EntropyResult:
    """Learn the per-unit noise scales σ that minimise L(σ) for each image; return the entropies.

    images: (B, 3, H, W) float, the model's input scale (0-1). feature_fn: x (N, 3, H, W) → (N, D),
    differentiable in x, with no interaction between the N inputs (e.g. a model in eval mode).
    """
    s = settings or EntropySettings()
    s.check()
    if images.ndim != 4:
        raise ValueError(f"learn_entropy: images must be (B, C, H, W), got shape {tuple(images.shape)}")
    objective = _SigmaObjective(feature_fn, images.detach(), s, generator)
    gh, gw = grid_shape(tuple(images.shape[2:]), s.cell)
    theta = torch.full((images.shape[0], 1, gh, gw), math.log(s.sigma_init), device=images.device,
                       requires_grad=True)
    opt = torch.optim.Adam([theta], lr=s.lr)
    first_tail_step = s.steps - max(1, s.steps // 10)
    changes: list[torch.Tensor] = []
    losses: list[float] = []
    for step in range(s.steps):
        loss, change = objective(theta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            theta.clamp_(math.log(s.sigma_min), math.log(s.sigma_max))
        losses.append(float(loss.detach()))
        if step >= first_tail_step:
            changes.append(change.detach())
    log_sigma = theta.detach()[:, 0]
    return EntropyResult(entropy=log_sigma + HALF_LOG_2PI_E, log_sigma=log_sigma,
                         change=torch.stack(changes).mean(0), loss=losses)
