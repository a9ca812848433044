"""The teacher's side of a training run: loading it, giving the student its anchors, the Distiller.

Kept apart from :mod:`engine.setup` (which calls these in its build sequence) so that what
distillation adds to plain YOLOv5 training reads in one place.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace

import torch
import torch.nn as nn

from distill.cli import config_from_args
from distill.distiller import DistillConfig, Distiller
from distill.methods import BN_STATS, FEATURE_TABLE
from distill.taps import detect_layer
from distill.teacher import load_teacher
from models.yolo import DetectionModel
from utils.precision import Precision

LOGGER = logging.getLogger(__name__)


def load_run_teacher(opt: argparse.Namespace, hyp: dict, device: torch.device,
                     precision: Precision) -> tuple[DetectionModel | None, DistillConfig]:
    """The frozen teacher of --t_weights (None without one) and the run's distillation config, made
    once, before the data: the teacher's strides take part in the image-size rounding, and bad KD flags
    (also KD flags without a teacher) are refused before anything is read. BN is folded unless a
    feature tap reads BN outputs. The config's loss gains are ``hyp``'s until `build_distiller`."""
    cfg = config_from_args(opt, hyp)
    if not opt.t_weights:
        return None, cfg
    teacher = load_teacher(opt.t_weights, device, cfg=opt.t_cfg or None, precision=precision,
                           fold_bn=not any(BN_STATS in FEATURE_TABLE[m].needs for m in cfg.features))
    return teacher, cfg


def build_distiller(cfg: DistillConfig, student: DetectionModel, teacher: DetectionModel | None,
                    loss_hyp: dict, device: torch.device, is_main: bool = True,
                    resumed: bool = False) -> nn.Module | None:
    """The Distiller of the run (None without a teacher), with the loss gains scaled for the student
    (``loss_hyp``); its summary lines are logged once. ``resumed``: see ``DistillConfig.resumed``."""
    if teacher is None:
        return None
    distiller = Distiller(student, teacher, replace(cfg, hyp=dict(loss_hyp), resumed=resumed)).to(device)
    for line in distiller.summary() if is_main else ():  # once per run, not once per DDP rank
        LOGGER.info(line)
    return distiller


def adopt_teacher_anchors(model: DetectionModel, teacher: DetectionModel) -> bool:
    """Copy the teacher's anchors into the student (for output KD) when the heads have the same levels,
    strides and anchors per cell; True when copied (or already equal)."""
    s_det, t_det = model.detect, detect_layer(teacher)
    layout = (int(s_det.nl), int(s_det.na), s_det.stride.float().cpu().tolist())
    t_layout = (int(t_det.nl), int(t_det.na), t_det.stride.float().cpu().tolist())
    if layout != t_layout:
        return False
    t_anchors = t_det.anchors.detach().float().to(s_det.anchors.device)  # grid units, kept fp32 by prepare_teacher
    if not torch.allclose(s_det.anchors, t_anchors):
        s_det.anchors.copy_(t_anchors)
        pixels = (t_anchors.cpu() * t_det.stride.float().cpu().view(-1, 1, 1)).round().int().view(-1).tolist()
        LOGGER.info(f"Anchors from the teacher ({pixels} px), AutoAnchor not run: output distillation compares the "
                    "two heads anchor by anchor")
    return True
