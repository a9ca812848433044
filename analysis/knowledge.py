"""Quantify the knowledge in a detector's features: per-cell input entropy and visual concepts.

Method (Cheng, Rao, Chen, Zhang, "Explaining Knowledge Distillation by Quantifying the Knowledge",
CVPR 2020). For one image x (B=1 here; batches are independent problems solved together) and a
feature f(x) ∈ R^D of a model, perturb the input with independent Gaussian noise whose standard
deviation σ_u is shared by all pixels and channels of one *unit* u (a ``cell``×``cell`` square of
input pixels; ``cell=1`` is per pixel)::

    x̃ = x + σ_{u(p)} · z_{p,c},   z ~ N(0, 1) per pixel p and channel c

and find the largest perturbation that leaves the feature nearly unchanged, i.e. minimise

    L(σ) = E_z ‖f(x̃) − f(x)‖² / s_f²  −  λ · (1/P) Σ_p log σ_{u(p)}

with s_f² = ‖f(x) − mean(f(x))‖² (the feature's spread over its D entries, so the first term is the
*relative* squared change, scale-free) and P = H·W the number of pixels. This is the paper's
Lagrangian form of "maximise the entropy of the perturbation subject to a bound on the expected
feature change"; our λ is the paper's λ times P (we average the entropy over pixels instead of
summing it), so one λ fits every image size and every ``cell``. For a feature that is locally
linear in the input, the optimum puts λ·n_u/(2P) of relative change into every unit u the feature
reads (n_u = the unit's pixels), e.g. f(x) = x ⊙ m gives σ_u² = λ·s_f²·n_u/(2·P·c_u) where c_u
counts the unit's unmasked pixel-channels; units the feature ignores grow until the clamp σ_max.
So λ/2 bounds the total relative change E‖Δf‖²/s_f² at the optimum (reached when f reads every
unit); the default λ = 0.01 keeps it below 0.5 %, the small-perturbation regime.

Optimisation: σ = exp(θ) (θ unconstrained), the expectation estimated with ``samples`` noise draws
per step (reparameterised, so gradients flow through z·σ), Adam on θ, θ projected onto
[log σ_min, log σ_max] after every step (σ_max = 1 is the whole 0-1 intensity range: noise beyond
it carries no more meaning).

Entropy of unit u: the differential entropy of its Gaussian noise per input element,
``H_u = log σ_u + ½·log(2πe)`` (nats; averaged, not summed, over the unit's pixels and channels,
which share σ_u, so units of any size compare). Low entropy = the feature cannot tolerate noise
there = the network relies on that region; high entropy = the information there is discarded.

Visual concepts: a unit u is a concept when ``H̄ − H_u > b`` (b = 0.2 nats by default) with H̄ the
mean entropy of the *background* units (the paper's baseline; ``baseline='all'`` uses every unit).
Foreground units overlap a ground-truth box (mapped through the letterbox); background units are
the rest of the image; units lying entirely in letterbox padding are neither (they are not image
content) and take no part in H̄ or the counts. Per image: N_fg, N_bg (concepts on foreground /
background) and their ratio N_fg / (N_fg + N_bg) (the paper's λ; ``ratio`` here to keep λ for the
Lagrange weight). A model's numbers are the mean and sample std (ddof=1) over the images.

Learning dynamics (epoch checkpoints): with S_j the set of (image, unit) foreground concepts of the
epoch-j model and M the last epoch, ``stability = |S_M| / |⋃_j S_j|`` (1 = nothing learned on the
way was discarded, the paper's ratio) and per epoch ``retention_j = |S_j ∩ S_M| / |S_M|`` (the share
of the final model's foreground concepts already present at epoch j).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distill.taps import FeatureTaps, detect_layer, unwrap

HALF_LOG_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)  # H of N(0, σ²) is log σ + this
BASELINES = ("bg", "all")
_EPOCH_FILE = re.compile(r"^epoch(\d+)\.pt$")


# ============================================================================================
# Settings
# ============================================================================================
@dataclass
class EntropySettings:
    """How the per-unit noise scales σ are learned (see the module docstring for L(σ)).

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


# ============================================================================================
# The feature f(x)
# ============================================================================================
class _FeaturesReadyError(Exception):
    """Raised by a hook once every wanted tensor is recorded, so the rest of the forward is skipped."""


class FeatureExtractor:
    """Callable ``x (B, 3, H, W) → f(x) (B, D)``: a model's feature, flattened, differentiable in x.

    ``layer=None``: the tensors entering Detect (P3/P4/P5 via :class:`distill.taps.FeatureTaps`),
    each flattened to (B, C_l·H_l·W_l) and concatenated in level order. ``layer=k``: the output of
    ``model.model[k]`` (negative k counts from the end; Detect itself is refused). The forward stops
    right after the last wanted layer (nothing later is computed).

    While open, the model is in eval mode (BN uses running statistics, so the B images and noise
    samples of a batch never interact) and its parameters do not require grad (only the input
    does); :meth:`close` (or leaving the ``with`` block) restores both and removes the hooks.
    """

    def __init__(self, model: nn.Module, layer: int | None = None) -> None:
        self.model = unwrap(model)
        self._taps: FeatureTaps | None = None
        self._out: torch.Tensor | None = None
        self._handles: list[Any] = []
        layers = self.model.model
        if layer is None:
            self._taps = FeatureTaps(self.model)
            last = max(self._taps.modules, key=lambda m: int(getattr(m, "i", -1)))
            self._handles.append(last.register_forward_hook(self._stop))  # fires after the tap's hook
            self.description = "Detect inputs (layers " + ", ".join(str(m.i) for m in self._taps.modules) + ")"
        else:
            n = len(layers)
            k = int(layer) + n if int(layer) < 0 else int(layer)
            if not 0 <= k < n:
                raise ValueError(f"--layer {layer}: the model has layers 0..{n - 1}")
            if layers[k] is detect_layer(self.model):
                raise ValueError(f"--layer {layer} is the Detect layer; pick one of the layers feeding it or earlier")
            self._handles.append(layers[k].register_forward_hook(self._record))
            self.description = f"layer {k} ({type(layers[k]).__name__})"
        self._training = self.model.training
        self._grad = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self._grad:
            p.requires_grad_(False)

    @staticmethod
    def _stop(module: nn.Module, args: Any, output: Any) -> None:
        raise _FeaturesReadyError

    def _record(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._out = output
        raise _FeaturesReadyError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) as a (B, D) float tensor."""
        try:
            self.model(x)
        except _FeaturesReadyError:
            pass
        else:  # only reachable when a hook did not fire (e.g. a model that skips the layer)
            raise RuntimeError(f"FeatureExtractor: {self.description} was not reached in the forward pass")
        if self._taps is not None:
            feats = self._taps.get()
            self._taps.clear()
        else:
            feats, self._out = [self._out], None
        return torch.cat([f.flatten(1).float() for f in feats], 1)

    def close(self) -> None:
        """Remove the hooks; restore the model's train/eval mode and requires_grad flags."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._taps is not None:
            self._taps.remove()
            self._taps = None
        for p, flag in self._grad:
            p.requires_grad_(flag)
        self.model.train(self._training)

    def __enter__(self) -> FeatureExtractor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ============================================================================================
# Learning σ
# ============================================================================================
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


def learn_entropy(
    feature_fn: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    settings: EntropySettings | None = None,
    generator: torch.Generator | None = None,
) -> EntropyResult:
    """Learn the per-unit noise scales σ that minimise L(σ) for each image; return the entropies.

    images: (B, 3, H, W) float, the model's input scale (0-1). feature_fn: x (N, 3, H, W) → (N, D),
    differentiable in x, with no interaction between the N inputs (e.g. a model in eval mode).
    Every step evaluates ``samples``·B perturbed inputs in one call; each image's σ only affects
    its own term of the summed loss, so the B problems stay independent.
    """
    s = settings or EntropySettings()
    s.check()
    if images.ndim != 4:
        raise ValueError(f"learn_entropy: images must be (B, C, H, W), got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    gh, gw = grid_shape((H, W), s.cell)
    images = images.detach()
    with torch.no_grad():
        f0 = feature_fn(images)  # (B, D)
        # s_f² = Σ_d (f_d − mean f)²; the floor keeps a constant feature from dividing by zero.
        spread = ((f0 - f0.mean(1, keepdim=True)) ** 2).sum(1).clamp_min(1e-12)
    lo, hi = math.log(s.sigma_min), math.log(s.sigma_max)
    theta = torch.full((B, 1, gh, gw), math.log(s.sigma_init), device=images.device, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=s.lr)
    tail = max(1, s.steps // 10)
    changes: list[torch.Tensor] = []
    losses: list[float] = []
    for step in range(s.steps):
        theta_px = expand_units(theta, s.cell, (H, W))  # (B, 1, H, W)
        z = torch.randn((s.samples, B, C, H, W), generator=generator, device=images.device, dtype=images.dtype)
        x = (images.unsqueeze(0) + z * theta_px.exp().unsqueeze(0)).reshape(s.samples * B, C, H, W)
        f = feature_fn(x).view(s.samples, B, -1)
        change = ((f - f0.unsqueeze(0)) ** 2).sum(2).mean(0) / spread  # (B,) E‖Δf‖² / s_f²
        entropy_term = theta_px.mean((1, 2, 3))  # (1/P) Σ_p log σ_u(p), per image
        loss = (change - s.lam * entropy_term).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            theta.clamp_(lo, hi)
        losses.append(float(loss.detach()))
        if step >= s.steps - tail:
            changes.append(change.detach())
    log_sigma = theta.detach()[:, 0]
    return EntropyResult(
        entropy=log_sigma + HALF_LOG_2PI_E,
        log_sigma=log_sigma,
        change=torch.stack(changes).mean(0),
        loss=losses,
    )


# ============================================================================================
# Foreground / background units
# ============================================================================================
def box_cell_mask(
    boxes: np.ndarray, shape_hw: tuple[int, int], cell: int, min_overlap: float = 0.0
) -> np.ndarray:
    """Units overlapping any box: bool (gh, gw).

    boxes: (n, 4) x1 y1 x2 y2 in pixels of the (letterboxed) input. Unit (r, c) spans
    x ∈ [c·cell, min((c+1)·cell, W)), y likewise; it is marked when its intersection with some box
    has an area > ``min_overlap`` × the unit's area (by default any positive overlap: a box edge
    lying exactly on a unit border does not mark the unit beyond it).
    """
    H, W = shape_hw
    gh, gw = grid_shape(shape_hw, cell)
    mask = np.zeros((gh, gw), dtype=bool)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        return mask
    x0 = np.arange(gw) * cell
    x1 = np.minimum(x0 + cell, W)
    y0 = np.arange(gh) * cell
    y1 = np.minimum(y0 + cell, H)
    ix = np.clip(np.minimum(x1[None], boxes[:, 2:3]) - np.maximum(x0[None], boxes[:, 0:1]), 0, None)  # (n, gw)
    iy = np.clip(np.minimum(y1[None], boxes[:, 3:4]) - np.maximum(y0[None], boxes[:, 1:2]), 0, None)  # (n, gh)
    inter = iy[:, :, None] * ix[:, None, :]  # (n, gh, gw)
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]  # (gh, gw)
    return ((inter > 0) & (inter > min_overlap * area)).any(0)


# ============================================================================================
# Concepts
# ============================================================================================
@dataclass
class ConceptCount:
    """Concept bookkeeping for one entropy map.

    n_fg / n_bg: concepts on foreground / background units; ratio: n_fg / (n_fg + n_bg) (NaN when
    the image has no concept); h_bar: the baseline entropy H̄; n_fg_units / n_bg_units: how many
    units each region has; h_fg / h_bg: mean entropy per region (NaN when empty); concepts: bool
    (gh, gw) map of the concept units.
    """

    n_fg: int
    n_bg: int
    ratio: float
    h_bar: float
    n_fg_units: int
    n_bg_units: int
    h_fg: float
    h_bg: float
    concepts: np.ndarray

    def record(self) -> dict[str, float | int]:
        """The scalar fields as a plain dict (for JSON)."""
        return {k: getattr(self, k) for k in ("n_fg", "n_bg", "ratio", "h_bar", "n_fg_units", "n_bg_units",
                                              "h_fg", "h_bg")}


def count_concepts(
    entropy: np.ndarray | torch.Tensor,
    fg: np.ndarray,
    valid: np.ndarray | None = None,
    b: float = 0.2,
    baseline: str = "bg",
) -> ConceptCount:
    """Concepts of one (gh, gw) entropy map: units with ``H̄ − H_u > b``.

    fg: bool (gh, gw) foreground units; valid: bool (gh, gw) units holding image content (None =
    all); background = valid & ~fg. ``baseline='bg'``: H̄ = mean H over background units (falls back
    to all valid units when the image has no background); ``'all'``: over all valid units.
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    h = entropy.detach().cpu().numpy() if isinstance(entropy, torch.Tensor) else np.asarray(entropy, dtype=float)
    h = h.astype(np.float64)
    valid = np.ones(h.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    fg = np.asarray(fg, dtype=bool) & valid
    bg = valid & ~fg
    if not valid.any():
        raise ValueError("count_concepts: no valid unit in the map")
    ref = bg if baseline == "bg" and bg.any() else valid
    h_bar = float(h[ref].mean())
    concepts = ((h_bar - h) > b) & valid
    n_fg, n_bg = int((concepts & fg).sum()), int((concepts & bg).sum())
    return ConceptCount(
        n_fg=n_fg,
        n_bg=n_bg,
        ratio=n_fg / (n_fg + n_bg) if n_fg + n_bg else float("nan"),
        h_bar=h_bar,
        n_fg_units=int(fg.sum()),
        n_bg_units=int(bg.sum()),
        h_fg=float(h[fg].mean()) if fg.any() else float("nan"),
        h_bg=float(h[bg].mean()) if bg.any() else float("nan"),
        concepts=concepts,
    )


def _mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 (0 for a single value), count) over the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def summarize(counts: Sequence[ConceptCount]) -> dict[str, float | int]:
    """Mean and std over images of N_fg, N_bg, the ratio and the entropy gap H̄_bg − H̄_fg.

    Images without any concept have no ratio and are left out of its mean (``ratio_images`` says
    how many images it averages); images without foreground are left out of the gap.
    """
    out: dict[str, float | int] = {"images": len(counts)}
    columns = {
        "n_fg": [c.n_fg for c in counts],
        "n_bg": [c.n_bg for c in counts],
        "ratio": [c.ratio for c in counts],
        "h_gap": [c.h_bg - c.h_fg for c in counts],
    }
    for key, vals in columns.items():
        mean, std, n = _mean_std(vals)
        out[f"{key}_mean"], out[f"{key}_std"] = mean, std
        if key in ("ratio", "h_gap"):
            out[f"{key}_images"] = n
    return out


# ============================================================================================
# Images
# ============================================================================================
@dataclass
class Sample:
    """One letterboxed input.

    image: float (3, H, W) RGB 0-1 (the model's input); boxes: (n, 4) ground-truth x1 y1 x2 y2 in
    the letterboxed pixels; classes: (n,); content: x1 y1 x2 y2 of the real image inside the padding.
    """

    path: str
    image: torch.Tensor
    boxes: np.ndarray
    classes: np.ndarray
    content: tuple[float, float, float, float]

    def masks(self, cell: int) -> tuple[np.ndarray, np.ndarray]:
        """(fg, valid) bool (gh, gw) unit maps: units overlapping a box / the image content."""
        shape = (int(self.image.shape[1]), int(self.image.shape[2]))
        valid = box_cell_mask(np.asarray([self.content]), shape, cell)
        return box_cell_mask(self.boxes, shape, cell) & valid, valid


def load_samples(
    sources: str | Path | Sequence[str | Path],
    imgsz: int,
    n: int,
    seed: int = 0,
    stride: int = 32,
    nc: int | None = None,
) -> list[Sample]:
    """``n`` images (all if fewer) picked at random with ``seed``, letterboxed to imgsz×imgsz.

    Uses :class:`utils.dataset.YoloDataset` without augmentation (the validation pipeline: resize
    so the long side is imgsz, never enlarging, then pad), whose labels already follow the
    letterbox: a normalised box (xc, yc, w, h) of the original image lands at
    x = xc·w0·r + padw, … with r the resize ratio, which we read back in pixels.
    """
    from utils.dataset import YoloDataset  # local: only the CLI path needs the data stack

    ds = YoloDataset(sources, imgsz=imgsz, batch_size=1, augment=False, rect=False, stride=stride, nc=nc)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(ds), size=min(int(n), len(ds)), replace=False))
    samples = []
    for i in picks:
        img, labels, path, (h0, w0), ((rh, rw), (padw, padh)) = ds[int(i)]
        H, W = int(img.shape[1]), int(img.shape[2])
        xywh = labels[:, 2:6].numpy().astype(np.float64)
        boxes = np.empty_like(xywh)
        boxes[:, 0] = (xywh[:, 0] - xywh[:, 2] / 2) * W
        boxes[:, 1] = (xywh[:, 1] - xywh[:, 3] / 2) * H
        boxes[:, 2] = (xywh[:, 0] + xywh[:, 2] / 2) * W
        boxes[:, 3] = (xywh[:, 1] + xywh[:, 3] / 2) * H
        content = (float(padw), float(padh), float(padw + w0 * rw), float(padh + h0 * rh))
        samples.append(Sample(str(path), img.float() / 255.0, boxes, labels[:, 1].numpy().astype(int), content))
    return samples


# ============================================================================================
# One model on a set of images
# ============================================================================================
@dataclass
class ModelKnowledge:
    """Per-image entropy maps and concept counts of one model, and their summary over images."""

    label: str
    source: str
    feature: str
    entropy: list[np.ndarray]
    counts: list[ConceptCount]
    change: list[float]
    summary: dict[str, float | int]


def analyze_model(
    model: nn.Module,
    samples: Sequence[Sample],
    settings: EntropySettings | None = None,
    b: float = 0.2,
    baseline: str = "bg",
    layer: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    label: str = "model",
    source: str = "",
    log: Callable[[str], None] | None = None,
) -> ModelKnowledge:
    """Entropy maps and concepts of ``model`` on ``samples`` (all of one size).

    Images are optimised ``batch_size`` at a time. The noise of batch k comes from a generator
    seeded with (seed, k), so every model sees the same noise draws (common random numbers make
    model-to-model differences less noisy).
    """
    s = settings or EntropySettings()
    device = next(unwrap(model).parameters()).device
    entropy: list[np.ndarray] = []
    counts: list[ConceptCount] = []
    change: list[float] = []
    with FeatureExtractor(model, layer) as fx:
        description = fx.description
        for start in range(0, len(samples), max(1, batch_size)):
            batch = samples[start : start + max(1, batch_size)]
            gen = torch.Generator(device=device)
            gen.manual_seed(int(seed) * 1_000_003 + start)
            images = torch.stack([smp.image for smp in batch]).to(device)
            res = learn_entropy(fx, images, s, gen)
            for smp, h, ch in zip(batch, res.entropy.cpu().numpy(), res.change.cpu().tolist()):
                fg, valid = smp.masks(s.cell)
                entropy.append(h)
                counts.append(count_concepts(h, fg, valid, b=b, baseline=baseline))
                change.append(float(ch))
            if log is not None:
                log(f"{label}: {start + len(batch)}/{len(samples)} images")
    return ModelKnowledge(label, source, description, entropy, counts, change, summarize(counts))


# ============================================================================================
# Learning dynamics over epoch checkpoints
# ============================================================================================
def epoch_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every ``epochN.pt`` in ``folder`` (written by ``--save-period``), by epoch."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--epochs-dir {folder} not found")
    found = []
    for p in folder.iterdir():
        m = _EPOCH_FILE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    if not found:
        raise FileNotFoundError(f"--epochs-dir {folder} has no epochN.pt files (train with --save-period 1)")
    return sorted(found)


def concept_dynamics(epochs: Sequence[int], fg_concepts: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """Stability of the foreground concepts over training.

    fg_concepts[j][k]: bool (gh, gw) foreground concepts of image k at epochs[j]; the last entry is
    the final model M. S_j = ⋃_k {(k, u)}: the (image, unit) pairs. Returns ``stability`` =
    |S_M| / |⋃_j S_j| (NaN when no epoch has a concept), per epoch ``retention`` = |S_j ∩ S_M| / |S_M|
    and ``discarded`` = |S_j \\ S_M| / |S_j| (NaN for empty denominators), and ``peak`` = per image,
    the first epoch at which its N_fg reaches its maximum, divided by the final epoch (mean and
    std over images: small = concepts learned early, in one go; an epoch-count stand-in for the
    paper's learning-effort metric, which measures progress in weight-space distance).
    """
    if len(epochs) != len(fg_concepts) or not len(epochs):
        raise ValueError("concept_dynamics: one list of concept maps per epoch is needed")
    final = fg_concepts[-1]
    n_final = sum(int(m.sum()) for m in final)
    union = [np.logical_or.reduce([fg_concepts[j][k] for j in range(len(epochs))]) for k in range(len(final))]
    n_union = sum(int(m.sum()) for m in union)
    retention, discarded = [], []
    for maps in fg_concepts:
        kept = sum(int((m & f).sum()) for m, f in zip(maps, final))
        total = sum(int(m.sum()) for m in maps)
        retention.append(kept / n_final if n_final else float("nan"))
        discarded.append((total - kept) / total if total else float("nan"))
    counts = np.asarray([[int(m.sum()) for m in maps] for maps in fg_concepts])  # (epochs, images)
    peak = [epochs[int(np.argmax(counts[:, k]))] / epochs[-1] for k in range(counts.shape[1])]
    peak_mean, peak_std, _ = _mean_std(peak)
    return {
        "epochs": list(map(int, epochs)),
        "stability": n_final / n_union if n_union else float("nan"),
        "final_fg_concepts": n_final,
        "union_fg_concepts": n_union,
        "retention": retention,
        "discarded": discarded,
        "peak_mean": peak_mean,
        "peak_std": peak_std,
    }


# ============================================================================================
# Reporting
# ============================================================================================
def _pm(mean: float, std: float, digits: int = 2) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(results: Sequence[ModelKnowledge]) -> str:
    """One row per model: N_fg, N_bg, ratio, entropy gap, relative feature change (mean ± std)."""
    lines = [
        "| model | N_fg | N_bg | N_fg/(N_fg+N_bg) | H̄_bg − H̄_fg (nats) | E‖Δf‖²/s_f² | images |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.summary
        ch_mean, ch_std, _ = _mean_std(r.change)
        ratio = _pm(s["ratio_mean"], s["ratio_std"], 3)
        if s["ratio_images"] != s["images"]:
            ratio += f" ({s['ratio_images']} img)"
        lines.append(
            f"| {r.label} | {_pm(s['n_fg_mean'], s['n_fg_std'], 1)} | {_pm(s['n_bg_mean'], s['n_bg_std'], 1)} | "
            f"{ratio} | {_pm(s['h_gap_mean'], s['h_gap_std'], 3)} | {_pm(ch_mean, ch_std, 3)} | {s['images']} |"
        )
    return "\n".join(lines)


def dynamics_table(per_epoch: Sequence[ModelKnowledge], dyn: dict[str, Any]) -> str:
    """One row per epoch checkpoint: N_fg, N_bg, ratio (mean ± std) and the retention of S_M."""
    lines = ["| epoch | N_fg | N_bg | N_fg/(N_fg+N_bg) | retention of final fg concepts |", "|---|---|---|---|---|"]
    for ep, r, ret in zip(dyn["epochs"], per_epoch, dyn["retention"]):
        s = r.summary
        lines.append(
            f"| {ep} | {_pm(s['n_fg_mean'], s['n_fg_std'], 1)} | {_pm(s['n_bg_mean'], s['n_bg_std'], 1)} | "
            f"{_pm(s['ratio_mean'], s['ratio_std'], 3)} | {ret:.3f} |"
        )
    lines.append("")
    lines.append(
        f"stability |S_M| / |∪_j S_j| = {dyn['stability']:.3f} ({dyn['final_fg_concepts']} final / "
        f"{dyn['union_fg_concepts']} ever); N_fg peaks at {_pm(dyn['peak_mean'], dyn['peak_std'], 2)} "
        f"of training"
    )
    return "\n".join(lines)


def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.figure import Figure  # lazy: importing this module must stay cheap

    return Figure(figsize=figsize, layout="constrained")


def plot_entropy_maps(
    sample: Sample, maps: Sequence[tuple[str, np.ndarray, ConceptCount]], cell: int, save_path: str | Path
) -> Path:
    """Side-by-side figure for one image: the input, then H_u − H̄ per model with the GT boxes drawn.

    maps: (label, entropy (gh, gw), counts) per model. Entropies are drawn relative to each
    model's baseline H̄ (concepts are defined relative to it, and overall levels differ between
    models) on one diverging scale shared by all panels: blue = below H̄ = relied upon, red =
    discarded; white outlines = concept units (H̄ − H_u > b); grey = letterbox padding.
    """
    from matplotlib.patches import Rectangle

    img = sample.image.permute(1, 2, 0).cpu().numpy()
    H, W = img.shape[:2]
    _, valid = sample.masks(cell)
    rel = [np.where(valid, h - cnt.h_bar, np.nan) for _, h, cnt in maps]
    span = max([float(np.nanmax(np.abs(r))) for r in rel] + [1e-6])
    fig = _figure((3.0 * (len(maps) + 1) + 0.8, 3.4))
    axes = fig.subplots(1, len(maps) + 1, squeeze=False)[0]
    im = None
    for j, ax in enumerate(axes):
        if j == 0:
            ax.imshow(img)
            ax.set_title(Path(sample.path).name, fontsize=8)
        else:
            label, h, cnt = maps[j - 1]
            ax.set_facecolor("0.8")
            im = ax.imshow(rel[j - 1], cmap="RdBu_r", vmin=-span, vmax=span,
                           extent=(0, cell * h.shape[1], cell * h.shape[0], 0), interpolation="nearest")
            ys, xs = np.nonzero(cnt.concepts)
            for y, x in zip(ys, xs):
                ax.add_patch(Rectangle((x * cell, y * cell), cell, cell, fill=False, edgecolor="white",
                                       linewidth=0.6))
            ax.set_title(f"{label}\nfg {cnt.n_fg}  bg {cnt.n_bg}  H̄ {cnt.h_bar:.2f}", fontsize=8)
        for x1, y1, x2, y2 in sample.boxes:
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor="lime", linewidth=1.0))
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    if im is not None:
        fig.colorbar(im, ax=list(axes[1:]), shrink=0.8, label="H − H̄ (nats/element)")
    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(save_path, dpi=120)
    return save_path


def plot_dynamics(per_epoch: Sequence[ModelKnowledge], dyn: dict[str, Any], save_path: str | Path) -> Path:
    """N_fg and N_bg (mean ± std over images) and the retention of the final fg concepts per epoch."""
    ep = np.asarray(dyn["epochs"])
    fig = _figure((9, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    for key, colour in (("n_fg", "tab:orange"), ("n_bg", "tab:blue")):
        m = np.asarray([r.summary[f"{key}_mean"] for r in per_epoch])
        sd = np.asarray([r.summary[f"{key}_std"] for r in per_epoch])
        ax1.plot(ep, m, "o-", color=colour, label=f"N_{key[2:]}")
        ax1.fill_between(ep, m - sd, m + sd, color=colour, alpha=0.2)
    ax1.set(xlabel="epoch", ylabel="concepts per image", title="concepts learned")
    ax1.legend()
    ax2.plot(ep, dyn["retention"], "o-", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="|S_j ∩ S_M| / |S_M|", ylim=(0, 1.05),
            title=f"retention (stability {dyn['stability']:.2f})")
    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(save_path, dpi=120)
    return save_path


def _jsonable(x: Any) -> Any:
    """NaN/inf → None, numpy scalars → Python, recursively (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def _model_record(r: ModelKnowledge, samples: Sequence[Sample]) -> dict[str, Any]:
    return {
        "label": r.label,
        "weights": r.source,
        "feature": r.feature,
        "summary": r.summary,
        "per_image": [{"image": smp.path, **c.record(), "change": ch}
                      for smp, c, ch in zip(samples, r.counts, r.change)],
    }


# ============================================================================================
# The whole analysis (what analyze_kd.py runs)
# ============================================================================================
def run_analysis(
    weights: Sequence[str | Path],
    data: str | Path,
    labels: Sequence[str] | None = None,
    imgsz: int = 640,
    images: int = 8,
    split: str = "val",
    settings: EntropySettings | None = None,
    b: float = 0.2,
    baseline: str = "bg",
    layer: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    epochs_dir: str | Path | None = None,
    plots: bool = True,
    project: str | Path = "runs/analyze",
    name: str = "exp",
    exist_ok: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compare checkpoints (and optionally the epoch checkpoints of one run) on the same images.

    After the inputs are checked (one-line FileNotFoundError / ValueError naming the flag), creates
    ``save_dir`` = ``project/name`` incremented (``exp``, ``exp2``, …; as is with ``exist_ok``) and
    writes into it: ``knowledge.md`` (table(s)), ``knowledge.json`` (settings, summaries,
    per-image records, dynamics), ``entropy.npz`` (the entropy maps, ``<label>`` → (N, gh, gw)),
    with ``plots`` ``maps/<image>.png`` (one per image, models side by side) and, for
    ``epochs_dir``, ``dynamics.png``; ``entropy.npz`` holds the epoch models' maps under
    ``dynamics_epoch<N>``. Returns the JSON dict plus ``save_dir``, ``table``.
    """
    from models import load_model  # local: keeps `import analysis.knowledge` light
    from utils.dataset import load_data_config
    from utils.files import increment_path

    s = settings or EntropySettings()
    s.check()
    if baseline not in BASELINES:
        raise ValueError(f"--baseline must be one of {BASELINES}, got {baseline!r}")
    weights = [Path(w) for w in weights]
    if not weights and epochs_dir is None:
        raise ValueError("give --weights and/or --epochs-dir")
    labels = list(labels) if labels else [w.stem for w in weights]
    if len(labels) != len(weights):
        raise ValueError(f"--labels gives {len(labels)} names for {len(weights)} --weights")
    if len(set(labels)) != len(labels):
        raise ValueError(f"--labels must be distinct, got {labels}")
    for w in weights:
        if not w.is_file():
            raise FileNotFoundError(f"--weights {w} not found")
    ckpts = epoch_checkpoints(epochs_dir) if epochs_dir is not None else []
    if not Path(data).is_file():
        raise FileNotFoundError(f"--data {data} not found")
    cfg = load_data_config(data, require=(split,))
    if not cfg.get(split):
        raise ValueError(f"--data {data} has no '{split}' split")

    device = torch.device(device)
    first = load_model(weights[0] if weights else ckpts[-1][1], device=device)
    gs = max(int(first.stride.max()), 32)
    if imgsz % gs:
        new = math.ceil(imgsz / gs) * gs
        if log is not None:
            log(f"--imgsz {imgsz} is not a multiple of the max stride {gs}; using {new}")
        imgsz = new
    samples = load_samples(cfg[split], imgsz, images, seed=seed, stride=gs, nc=cfg["nc"])
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)
    common = {"settings": s, "b": b, "baseline": baseline, "layer": layer, "batch_size": batch_size,
              "seed": seed, "log": log}

    results: list[ModelKnowledge] = []
    for i, (w, label) in enumerate(zip(weights, labels)):
        model = first if i == 0 else load_model(w, device=device)
        results.append(analyze_model(model, samples, label=label, source=str(w), **common))
        del model
    per_epoch: list[ModelKnowledge] = []
    for ep, path in ckpts:
        model = load_model(path, device=device)
        per_epoch.append(analyze_model(model, samples, label=f"epoch{ep}", source=str(path), **common))
        del model
    del first

    report: dict[str, Any] = {
        "paper": "Cheng et al., Explaining Knowledge Distillation by Quantifying the Knowledge, CVPR 2020",
        "data": str(data),
        "split": split,
        "imgsz": imgsz,
        "images": [smp.path for smp in samples],
        "seed": seed,
        "feature": (results or per_epoch)[0].feature,
        "settings": {**vars(s), "b": b, "baseline": baseline, "layer": layer},
        "models": [_model_record(r, samples) for r in results],
        "dynamics": None,
    }
    table = markdown_table(results) if results else ""
    if per_epoch:
        dyn = concept_dynamics([ep for ep, _ in ckpts], [[c.concepts & smp.masks(s.cell)[0]
                                                          for c, smp in zip(r.counts, samples)] for r in per_epoch])
        report["dynamics"] = {**dyn, "dir": str(epochs_dir),
                              "per_epoch": [_model_record(r, samples) for r in per_epoch]}
        table = (table + "\n\n" if table else "") + "Learning dynamics (" + str(epochs_dir) + ")\n\n" + \
            dynamics_table(per_epoch, dyn)
        if plots:
            plot_dynamics(per_epoch, dyn, save_dir / "dynamics.png")

    header = (f"Knowledge per {s.cell}×{s.cell} px unit ({report['feature']}; {len(samples)} {split} images at "
              f"{imgsz} px; λ={s.lam}, b={b}, baseline={'background' if baseline == 'bg' else 'all'} units, "
              f"{s.steps} steps × {s.samples} samples)\n\n")
    (save_dir / "knowledge.md").write_text(header + table + "\n", encoding="utf-8")
    (save_dir / "knowledge.json").write_text(json.dumps(_jsonable(report), indent=2), encoding="utf-8")
    np.savez_compressed(save_dir / "entropy.npz",
                        **{r.label: np.stack(r.entropy) for r in results},
                        **{f"dynamics_{r.label}": np.stack(r.entropy) for r in per_epoch})
    if plots and results:
        for k, smp in enumerate(samples):
            maps = [(r.label, r.entropy[k], r.counts[k]) for r in results]
            plot_entropy_maps(smp, maps, s.cell, save_dir / "maps" / f"{k:03d}_{Path(smp.path).stem}.png")
    return {**report, "save_dir": save_dir, "table": header + table}


__all__ = [
    "HALF_LOG_2PI_E",
    "ConceptCount",
    "EntropyResult",
    "EntropySettings",
    "FeatureExtractor",
    "ModelKnowledge",
    "Sample",
    "analyze_model",
    "box_cell_mask",
    "concept_dynamics",
    "count_concepts",
    "dynamics_table",
    "epoch_checkpoints",
    "expand_units",
    "grid_shape",
    "learn_entropy",
    "load_samples",
    "markdown_table",
    "plot_dynamics",
    "plot_entropy_maps",
    "run_analysis",
    "summarize",
]
