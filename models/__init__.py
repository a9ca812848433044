"""YOLOv5-compatible detection models and safe checkpoint I/O.

Knows nothing of training, data or distillation: a model is a model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from models.yolo import Detect, DetectionModel

_YAML_SUFFIXES = (".yaml", ".yml")


def load_model(path_or_yaml: str | Path | dict, nc: int | None = None,
               device: str | torch.device = "cpu") -> DetectionModel:
    """A DetectionModel in fp32 and eval mode on `device`.

    `path_or_yaml`: an official YOLOv5 .pt, one of our checkpoints, a model yaml path (or a
    shipped name such as 'yolov5s.yaml', randomly initialised) or a model dict. A checkpoint is
    read without running anything it names (see `models.checkpoint`); any failure is one
    `CheckpointError` line naming the file.
    `nc` overrides the number of classes (checkpoint weights of other shapes are then kept
    at their initial values; see `model_from_checkpoint`).
    """
    if isinstance(path_or_yaml, dict) or str(path_or_yaml).lower().endswith(_YAML_SUFFIXES):
        model = DetectionModel(path_or_yaml, nc=nc)
    else:
        model = model_from_checkpoint(load_checkpoint(path_or_yaml), nc=nc)
    return model.float().to(device).eval()


__all__ = ["CheckpointError", "Detect", "DetectionModel", "load_checkpoint", "load_model",
           "model_from_checkpoint", "save_checkpoint"]
