"""Distillation strength over training: one multiplier applied to every KD term.

The teacher is most useful early, when the student is far from it; late in training the student
should settle on the ground truth (and some published runs got worse when KD stayed on to the end).
Hence the decaying schedules and the option to switch KD off for the final epochs.
"""

from __future__ import annotations

import math

SCHEDULES = ("const", "linear", "cosine")


def kd_scale(
    epoch: float,
    epochs: int,
    schedule: str = "const",
    stop_epochs: int = 0,
    warmup_epochs: int = 0,
) -> float:
    """Multiplier in [0, 1] for all distillation terms at (0-based, possibly fractional) ``epoch``.

    Let E = epochs − stop_epochs be the span where KD is active and p = epoch / E its progress.

    * const:  1
    * linear: 1 − p                      (1 at epoch 0, 1/E at the last active epoch)
    * cosine: (1 + cos(π·p)) / 2
    * epochs ≥ E (the last ``stop_epochs``): 0
    * warm-up: during the first ``warmup_epochs`` the value is further multiplied by
      (epoch + 1) / (warmup_epochs + 1), a ramp that never reaches zero, so no epoch is wasted.

    Raises ValueError on an unknown schedule or inconsistent epoch counts.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"kd_scale: unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
    if epochs < 1 or stop_epochs < 0 or warmup_epochs < 0:
        raise ValueError(f"kd_scale: need epochs >= 1 and stop/warm-up >= 0, got {epochs}, {stop_epochs}, "
                         f"{warmup_epochs}")
    active = epochs - stop_epochs
    if epoch >= active:
        return 0.0
    p = max(epoch, 0.0) / active
    if schedule == "const":
        scale = 1.0
    elif schedule == "linear":
        scale = 1.0 - p
    else:
        scale = 0.5 * (1.0 + math.cos(math.pi * p))
    if epoch < warmup_epochs:
        scale *= (max(epoch, 0.0) + 1.0) / (warmup_epochs + 1.0)
    return float(scale)


__all__ = ["SCHEDULES", "kd_scale"]
