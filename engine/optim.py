"""Optimizer, learning-rate schedule and warm-up, with YOLOv5's conventions.

Three parameter groups (biases; normalisation weights; other weights) so that weight decay hits
only conv/linear weights. Warm-up ramps the LR from 0 (biases: from `warmup_bias_lr` down) to the
scheduled value and the momentum from `warmup_momentum` up, over max(warmup_epochs·nb, 100) steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

NOMINAL_BATCH = 64  # YOLOv5's default: gradients are accumulated to about this many images per step


def split_parameters(modules: Iterable[nn.Module]) -> tuple[list, list, list]:
    """(decayed weights, normalisation weights, biases) of trainable parameters, each listed once."""
    decay, norm, bias, seen = [], [], [], set()
    norm_types = tuple(v for k, v in vars(nn).items() if "Norm" in k and isinstance(v, type))
    for module in modules:
        for m in module.modules():
            for name, p in m.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                if name == "bias":
                    bias.append(p)
                elif isinstance(m, norm_types):
                    norm.append(p)
                else:
                    decay.append(p)
    return decay, norm, bias


def build_optimizer(
    modules: Iterable[nn.Module], name: str, lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """SGD (Nesterov), Adam or AdamW over the three groups; group 0 = biases, 1 = norm, 2 = weights."""
    decay, norm, bias = split_parameters(modules)
    if name == "SGD":
        opt = torch.optim.SGD(bias, lr=lr, momentum=momentum, nesterov=True)
    elif name == "Adam":
        opt = torch.optim.Adam(bias, lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        opt = torch.optim.AdamW(bias, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    else:
        raise ValueError(f"--optimizer {name} is not one of SGD, Adam, AdamW")
    opt.add_param_group({"params": norm, "weight_decay": 0.0})
    opt.add_param_group({"params": decay, "weight_decay": weight_decay})
    return opt


def lr_lambda(epochs: int, lrf: float, cosine: bool) -> Callable[[int], float]:
    """LR multiplier per epoch: linear 1 → lrf, or a cosine from 1 to lrf."""
    if cosine:
        return lambda e: ((1 - math.cos(e * math.pi / epochs)) / 2) * (lrf - 1) + 1
    return lambda e: (1 - e / epochs) * (1.0 - lrf) + lrf


class WarmUp:
    """Per-iteration warm-up of LR, momentum and gradient accumulation.

    `apply(ni, epoch)` is called before every forward pass while ni < n_iters; it returns the number
    of batches to accumulate for this iteration.
    """

    def __init__(self, hyp: dict, n_batches: int, batch_size: int, lf: Callable[[int], float],
                 nominal_batch: int = NOMINAL_BATCH) -> None:
        self.n_iters = max(round(hyp["warmup_epochs"] * n_batches), 100) if hyp["warmup_epochs"] > 0 else 0
        self.hyp, self.lf = hyp, lf
        self.nominal_batch = nominal_batch
        self.accumulate = accumulation_steps(batch_size, nominal_batch)
        self.batch_size = batch_size

    def active(self, ni: int) -> bool:
        return ni < self.n_iters

    def apply(self, optimizer: torch.optim.Optimizer, ni: int, epoch: int) -> int:
        if not self.active(ni):
            return self.accumulate
        xp = [0, self.n_iters]
        for j, group in enumerate(optimizer.param_groups):
            start = self.hyp["warmup_bias_lr"] if j == 0 else 0.0
            group["lr"] = float(np.interp(ni, xp, [start, group["initial_lr"] * self.lf(epoch)]))
            if "momentum" in group:
                group["momentum"] = float(np.interp(ni, xp, [self.hyp["warmup_momentum"], self.hyp["momentum"]]))
        return max(1, round(float(np.interp(ni, xp, [1, self.nominal_batch / self.batch_size]))))


def accumulation_steps(batch_size: int, nominal_batch: int = NOMINAL_BATCH) -> int:
    """Batches per optimizer step so that each step sees about `nominal_batch` images."""
    return max(round(nominal_batch / batch_size), 1)
