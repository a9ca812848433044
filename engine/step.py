"""One training step, as the trainer runs it per batch and as `benchmarks/bench_train_step` times it.

    imgs (uint8) → float 0-1 (channels_last under AMP) → student forward under the run's autocast
    → predictions cast to fp32 → `TrainingCriterion` in fp32 (detection loss + KD terms, the
    teacher's forward inside the Distiller) → backward (GradScaler-scaled for fp16 only)
    → every `accumulate` batches: unscale, grad-norm clip 10, optimizer step, zero grads, EMA update.

`build_step_state` makes the pieces a step needs (criterion, optimizer, EMA, GradScaler) with the
same calls `engine.setup.prepare_run` uses, so a benchmark can build them without a dataset.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from engine.criterion import TrainingCriterion
from engine.optim import accumulation_steps, build_optimizer
from utils.loss import DetectionLoss
from utils.precision import Precision, to_float
from utils.torch_utils import DistInfo, WeightEMA, all_reduce_grads

if TYPE_CHECKING:  # engine.setup imports this module; the name is only needed for annotations
    from engine.setup import Run


@dataclass
class StepState:
    """What `train_step` reads and updates, for a run without data (benchmarks, tests); an
    `engine.setup.Run` carries the same attributes."""

    model: nn.Module
    criterion: TrainingCriterion
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: WeightEMA
    precision: Precision
    distiller: nn.Module | None = None
    info: DistInfo = field(default_factory=DistInfo)
    trainable_parameters: list = field(default_factory=list)
    last_step: int = -1


def build_step_state(model: nn.Module, distiller: nn.Module | None, hyp: dict, loss_hyp: dict,
                     precision: Precision, batch_size: int, nominal_batch: int,
                     optimizer: str = "SGD") -> StepState:
    """Criterion, optimizer (YOLOv5's weight-decay scaling by batch·accumulate/nominal), EMA, GradScaler.

    ``hyp`` is the hyper-parameter yaml (lr0, momentum, weight_decay); ``loss_hyp`` its loss gains
    scaled by `utils.loss.scale_hyp`.
    """
    weight_decay = hyp["weight_decay"] * batch_size * accumulation_steps(batch_size, nominal_batch) / nominal_batch
    trainable = [model] + ([distiller] if distiller is not None else [])
    opt = build_optimizer(trainable, optimizer, hyp["lr0"], hyp["momentum"], weight_decay,
                          loss_scaling=precision.scaler)
    return StepState(
        model=model,
        criterion=TrainingCriterion(DetectionLoss(model, loss_hyp), distiller),
        optimizer=opt,
        scaler=torch.amp.GradScaler(precision.device_type, enabled=precision.scaler),
        ema=WeightEMA(model),
        precision=precision,
        distiller=distiller,
        trainable_parameters=[p for m in trainable for p in m.parameters() if p.requires_grad],
    )


def train_step(s: StepState | Run, imgs: torch.Tensor, targets: torch.Tensor, ni: int, accumulate: int,
               kd_scale: float = 1.0) -> dict[str, torch.Tensor] | None:
    """One batch: forward, loss, backward; the optimizer steps when ``accumulate`` batches have passed.

    Args:
        imgs: (B, 3, H, W) uint8 (or float 0-1) on the run's device; targets (N, 6) normalised.
        ni: global batch index; the optimizer steps when ``ni - s.last_step >= accumulate``.
        kd_scale: the distillation schedule's factor this epoch.

    Returns the detached named loss terms, or None when the loss was not finite on some rank (this
    batch's gradients are then dropped and nothing stepped).
    """
    x = s.precision.images(imgs)
    with s.precision.autocast():
        preds = s.model(x)
    loss, terms = s.criterion(x, to_float(preds), targets, kd_scale)  # loss in fp32, outside autocast
    if not _all_finite(loss, s.info):
        s.optimizer.zero_grad(set_to_none=True)
        return None
    # DDP averages gradients over ranks, while the loss of the global batch is the SUM of the ranks'
    # losses (each is its local batch size times per-image means): × world size gives the gradient a
    # single process gets from the whole --batch-size (YOLOv5 scales its DDP loss the same way).
    s.scaler.scale(loss * s.info.world_size if s.info.distributed else loss).backward()
    if ni - s.last_step >= accumulate:
        optimizer_step(s)
        s.last_step = ni
    return terms


def optimizer_step(s: StepState | Run) -> None:
    """Average the Distiller's gradients under DDP, unscale, clip to norm 10, step, zero, EMA.

    The average comes first so that the GradScaler checks for infs in gradients every rank shares: a
    rank whose connector overflowed skips the step, and so must the others (else their scalers and
    connectors drift apart)."""
    if s.info.distributed and s.distiller is not None:
        all_reduce_grads(s.distiller, s.info.world_size)
    s.scaler.unscale_(s.optimizer)
    torch.nn.utils.clip_grad_norm_(s.trainable_parameters, max_norm=10.0)
    s.scaler.step(s.optimizer)
    s.scaler.update()
    s.optimizer.zero_grad(set_to_none=True)
    s.ema.update(s.model)


def _all_finite(loss: torch.Tensor, info: DistInfo) -> bool:
    """Whether the loss is finite on every rank (all ranks must skip together or DDP would hang)."""
    ok = torch.isfinite(loss).all().float()
    if info.distributed:
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


__all__ = ["StepState", "build_step_state", "optimizer_step", "train_step"]
