"""What a training checkpoint holds, and how a run is resumed from one.

`last.pt` keeps everything needed to continue exactly (fp32 weights, EMA, optimizer, AMP scaler,
distillation adapters, RNG states); `best.pt` is the deployable student: fp16 EMA weights plus the
metadata `load_model` needs. Both are plain dicts of tensors and builtins, readable with
`torch.load(weights_only=True)`, and written atomically by `models.checkpoint.save_checkpoint`.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn

from models.checkpoint import FORMAT  # the one home of the checkpoint format string
from utils.torch_utils import WeightEMA, rng_state, unwrap_model


def _half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in state.items()}


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # contiguous: an AMP run trains in channels_last; the files stay layout-independent
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in state.items()}


def training_checkpoint(
    model: nn.Module,
    ema: WeightEMA,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    distiller: nn.Module | None,
    opt: argparse.Namespace,
    hyp: dict,
    epoch: int,
    best_fitness: float,
    history: list[dict] | None = None,
    class_maps: list[float] | None = None,
    pending: dict | None = None,
) -> dict:
    """The full state after `epoch` (0-based) finished. ``history``: the results.csv rows of epochs
    0..epoch (dicts of str -> int/float), so results.csv can be rebuilt exactly on --resume;
    ``class_maps``: the last validation's per-class mAP50-95, which --image-weights samples by;
    ``pending``: the gradient accumulation left open at the epoch's end (`engine.trainer.pending_state`),
    so that a resumed run steps where and with what the uninterrupted one would; None when the epoch
    ended on an optimizer step."""
    student = unwrap_model(model)
    return {
        "format": FORMAT,
        "yaml": student.yaml,
        "model": _cpu(student.state_dict()),
        "ema": _cpu(ema.module.state_dict()),
        "updates": ema.updates,
        "names": list(student.names),
        "stride": [float(s) for s in student.stride],
        "epoch": epoch,
        "best_fitness": float(best_fitness),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "adapters": _cpu(distiller.state_dict()) if distiller is not None else None,
        "opt": namespace_to_dict(opt),
        "hyp": dict(hyp),
        "rng": rng_state(),
        "history": [dict(row) for row in (history or [])],
        "class_maps": None if class_maps is None else [float(m) for m in class_maps],
        "pending": pending,
        "date": datetime.now(timezone.utc).isoformat(),
    }


def deployable(ckpt: dict) -> dict:
    """Strip a training checkpoint to the fp16 EMA student (what best.pt and export carry)."""
    return {
        **{k: ckpt[k] for k in ("format", "yaml", "names", "stride", "epoch", "best_fitness", "opt", "hyp", "date")},
        "model": _half(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"]),
        "ema": None,
        "updates": ckpt.get("updates", 0),
        "optimizer": None,
        "scaler": None,
        "adapters": None,
        "rng": None,
    }


def model_checkpoint(model: nn.Module) -> dict:
    """A deployable checkpoint (fp16 weights + metadata) of a model that was not trained by `fit`."""
    student = unwrap_model(model)
    return {"format": FORMAT, "yaml": student.yaml, "model": _half(_cpu(student.state_dict())), "ema": None,
            "names": list(student.names), "stride": [float(s) for s in student.stride], "epoch": -1,
            "best_fitness": 0.0, "updates": 0, "optimizer": None, "scaler": None, "adapters": None, "opt": {},
            "hyp": {}, "rng": None, "date": datetime.now(timezone.utc).isoformat()}


def namespace_to_dict(opt: argparse.Namespace) -> dict:
    """Plain, yaml- and weights_only-safe dict of the parsed flags (Paths become strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opt).items()}


def find_last_checkpoint(project: str | Path = "runs/train") -> Path:
    """The most recently written last.pt under `project` (for `--resume` without a path)."""
    candidates = sorted(Path(project).glob("*/weights/last.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"--resume: no runs/*/weights/last.pt found under {project}; pass the path to last.pt")
    return candidates[-1]
