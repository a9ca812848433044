"""Optimizer, learning-rate curve and warm-up, with YOLOv5's conventions (REFERENCE §3, "Training plumbing").

Parameter groups, in optimizer order:

====  ===================================================  ============  =======================
 #    parameters                                           weight decay  warm-up LR starts at
====  ===================================================  ============  =======================
 0    biases (conv, BN shift, adapters)                    none          ``warmup_bias_lr``
 1    other 1-D tensors: normalisation scales (BN gamma)   none          0
 2    conv / linear weights (ndim >= 2)                    yes           0
====  ===================================================  ============  =======================

Every group ends its warm-up at ``lr0 · lf(epoch)``, so groups 1 and 2 always carry the same LR.

YOLOv5 orders the same three groups biases, decayed weights, scales (seen in a YOLOv5 7.0 training
checkpoint: group 0 no decay, warm-up from ``warmup_bias_lr``; group 1 decayed; group 2 no decay),
and its results.csv's ``x/lr0..2`` follow its order: `YOLOV5_GROUP_ORDER` maps them onto ours.

Membership is decided from the parameter itself, not from its module class: a tensor registered as
``bias`` is a bias; any other tensor of at most one dimension is a per-channel scale (what
BatchNorm, SyncBatchNorm, GroupNorm and LayerNorm own), and only multi-dimensional tensors
(filters, matrices) are decayed. This needs no list of normalisation classes and keeps working for
any normalisation layer a model may bring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

NOMINAL_BATCH = 64  # YOLOv5's default: gradients are accumulated to about this many images per step
BIAS, SCALE, WEIGHT = 0, 1, 2  # parameter-group indices, see the module docstring
YOLOV5_GROUP_ORDER = (BIAS, WEIGHT, SCALE)  # our group index of YOLOv5's x/lr0, x/lr1, x/lr2


def group_of(name: str, param: torch.Tensor) -> int:
    """Group index (BIAS, SCALE or WEIGHT) of the parameter registered under ``name``."""
    if name.rpartition(".")[2] == "bias":
        return BIAS
    return SCALE if param.ndim <= 1 else WEIGHT


def split_parameters(modules: Iterable[nn.Module]) -> tuple[list, list, list]:
    """Trainable parameters of ``modules`` as (biases, scales, weights); a shared one is listed once."""
    groups: tuple[list, list, list] = ([], [], [])
    taken: set[int] = set()
    for module in modules:
        for name, p in module.named_parameters():
            if p.requires_grad and id(p) not in taken:
                taken.add(id(p))
                groups[group_of(name, p)].append(p)
    return groups


def build_optimizer(
    modules: Iterable[nn.Module], name: str, lr: float, momentum: float, weight_decay: float,
    loss_scaling: bool = False,
) -> torch.optim.Optimizer:
    """SGD (Nesterov), Adam or AdamW over the three groups of `split_parameters`.

    ``momentum`` is SGD's momentum or Adam's beta1; ``weight_decay`` applies to group WEIGHT only.
    ``loss_scaling``: a GradScaler drives the steps (fp16), so some steps are skipped for inf
    gradients; the fused kernels are then not used (see below).
    """
    decays = {BIAS: 0.0, SCALE: 0.0, WEIGHT: weight_decay}
    groups = [{"params": params, "weight_decay": decays[i]} for i, params in enumerate(split_parameters(modules))]
    # One fused kernel per step instead of a Python loop over ~170-400 tensors: 2-3× less optimizer
    # time on CPU (benchmarks/results/optimizer_step.md), same update rule. Not under a GradScaler:
    # torch's fused SGD allocates its momentum buffers with empty_like on the first step, and when
    # the scaler skips that step (inf gradients at the initial scale 2^16, the usual fp16 start) the
    # buffers stay uninitialised and the next step writes garbage into the weights (seen on CUDA:
    # the fp16 demo diverged after 6 skipped steps; benchmarks/results/cuda_h200.md).
    fused = {"fused": True} if _fusable(groups) and not loss_scaling else {}
    if name == "SGD":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=True, **fused)
    if name in ("Adam", "AdamW"):
        return getattr(torch.optim, name)(groups, lr=lr, betas=(momentum, 0.999), **fused)
    raise ValueError(f"--optimizer {name} is not one of SGD, Adam, AdamW")


KERNEL_OPTIONS = ("fused", "foreach")  # how torch steps, not what it computes


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` for a resumed run, keeping what this run decided.

    torch copies every group option from the checkpoint, kernel choice included, so a run saved with
    fused kernels (CPU, no loss scaling) and resumed under a GradScaler (``--device 0``: fp16) would
    step fused again (see `build_optimizer`); the kernel options of ``optimizer`` are put back.
    torch casts each per-parameter buffer to its parameter's dtype and device but keeps the saved
    memory layout, and a run resumed with another precision has its parameters in another layout
    (channels_last under AMP): torch's fused SGD then reads the momentum buffer in the wrong order
    (0.26 off in one step in a 4×3×3×3 probe). Every such buffer is re-laid like its parameter.
    """
    kernels = [{k: g[k] for k in KERNEL_OPTIONS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, kernels):
        group.update(kept)
    for param, buffers in optimizer.state.items():
        for key, value in buffers.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                buffers[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def _fusable(groups: list[dict]) -> bool:
    """torch's fused SGD/Adam/AdamW kernels take floating-point parameters on CPU or CUDA."""
    params = [p for g in groups for p in g["params"]]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


@dataclass(frozen=True)
class LrCurve:
    """Multiplier lf(e) of ``lr0`` at epoch e, from 1 at e = 0 down to ``lrf`` at e = ``epochs``.

    linear: lf(e) = (1 − e/E)·(1 − lrf) + lrf;  cosine: lf(e) = lrf + (1 − lrf)·(1 + cos(π·e/E))/2.
    A callable object, usable as `torch.optim.lr_scheduler.LambdaLR`'s ``lr_lambda``.
    """

    epochs: int
    lrf: float
    cosine: bool = False

    def __call__(self, epoch: float) -> float:
        progress = epoch / self.epochs
        remaining = (1.0 + math.cos(math.pi * progress)) / 2 if self.cosine else 1.0 - progress
        return self.lrf + (1.0 - self.lrf) * remaining


@dataclass(frozen=True)
class EpochLr:
    """The epoch scheduler's multiplier as YOLOv5 7.0's train.py applies it (measured on it, used as a
    black box: the optimizer's LR per step and results.csv's x/lr columns, fixture
    ``tests/fixtures/oracle_lr``): the LR set at the end of epoch e is lr0·lf(e), so after warm-up
    epoch e + 1 trains at lf(e), one epoch behind the curve; the epoch in which warm-up ends keeps
    warm-up's last value, lr0·lf(that epoch).

    ``EpochLr(lf)(k)`` = lf(max(k − 1, 0)): `torch.optim.lr_scheduler.LambdaLR` calls it with k = 0
    at construction and k = e + 1 after epoch e's ``step()``.
    """

    lf: Callable[[float], float]

    def __call__(self, step: int) -> float:
        return self.lf(max(step - 1, 0))


def accumulation_steps(batch_size: int, nominal_batch: int = NOMINAL_BATCH) -> int:
    """Batches per optimizer step so that each step sees about `nominal_batch` images."""
    return max(round(nominal_batch / batch_size), 1)


def _lerp(start: float, end: float, t: float) -> float:
    return start + (end - start) * t


@dataclass(frozen=True)
class StepSettings:
    """What one training iteration runs with. ``lrs`` (one per group) and ``momentum`` are None once
    warm-up is over: the epoch scheduler's values then stand."""

    lrs: tuple[float, ...] | None
    momentum: float | None
    accumulate: int

    def apply(self, optimizer: torch.optim.Optimizer) -> int:
        """Write the LRs / momentum into ``optimizer``'s groups; return ``accumulate``."""
        if self.lrs is not None:
            for group, lr in zip(optimizer.param_groups, self.lrs):
                group["lr"] = lr
        if self.momentum is not None:
            for group in optimizer.param_groups:
                if "momentum" in group:  # SGD only; Adam's beta1 is left alone, as in YOLOv5
                    group["momentum"] = self.momentum
        return self.accumulate


@dataclass(frozen=True)
class WarmupSchedule:
    """Per-iteration warm-up, as a pure function of (iteration, epoch).

    Over iterations 0 … ``iterations`` (counted from the start of training; the last one included,
    so that momentum ends at ``momentum_end`` and stays there), with t = iteration / iterations rising
    linearly from 0 to 1:

    * LR of group g: from ``bias_lr`` (group BIAS) or 0 (others) to ``lr0_g · lf(epoch)``;
    * SGD momentum: from ``momentum_start`` to ``momentum_end``;
    * accumulation: round(1 + (nominal/batch − 1)·t), at least 1, so the first steps are small.

    Afterwards only ``accumulate`` = max(round(nominal/batch), 1) is set.
    """

    iterations: int
    lf: Callable[[float], float]
    bias_lr: float
    momentum_start: float
    momentum_end: float
    batch_size: int
    nominal_batch: int = NOMINAL_BATCH

    @classmethod
    def from_hyp(cls, hyp: dict, n_batches: int, batch_size: int, lf: Callable[[float], float],
                 nominal_batch: int = NOMINAL_BATCH) -> WarmupSchedule:
        """Length max(round(warmup_epochs · n_batches), 100) iterations (REFERENCE §3; at least 100 even
        when warmup_epochs is 0, as in YOLOv5)."""
        iterations = max(round(float(hyp["warmup_epochs"]) * n_batches), 100)
        return cls(iterations, lf, float(hyp["warmup_bias_lr"]), float(hyp["warmup_momentum"]),
                   float(hyp["momentum"]), batch_size, nominal_batch)

    def settings(self, iteration: int, epoch: int, base_lrs: Sequence[float]) -> StepSettings:
        """Settings of ``iteration`` (global index) in ``epoch``; ``base_lrs`` = each group's lr0."""
        if iteration > self.iterations:
            return StepSettings(None, None, accumulation_steps(self.batch_size, self.nominal_batch))
        t = iteration / self.iterations
        scale = self.lf(epoch)
        lrs = tuple(_lerp(self.bias_lr if g == BIAS else 0.0, lr0 * scale, t) for g, lr0 in enumerate(base_lrs))
        accumulate = max(1, round(_lerp(1.0, self.nominal_batch / self.batch_size, t)))
        return StepSettings(lrs, _lerp(self.momentum_start, self.momentum_end, t), accumulate)

    def step(self, optimizer: torch.optim.Optimizer, iteration: int, epoch: int) -> int:
        """Apply this iteration's settings to ``optimizer`` (groups hold ``initial_lr`` from the
        LR scheduler); return the number of batches to accumulate."""
        base = [group["initial_lr"] for group in optimizer.param_groups]
        return self.settings(iteration, epoch, base).apply(optimizer)
