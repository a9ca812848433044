"""Knowledge distillation for YOLOv5 detectors.

The distiller never edits student or teacher code: it records the tensors entering ``Detect``
with forward hooks (:mod:`distill.taps`) and adds its own trainable modules (connectors,
generators). Losses are plain functions/modules of tensors, one file per family:
:mod:`distill.output` (objectness-weighted MSE, soft labels, Chen et al.), ``feature_mse``,
``feature_pkd``, ``feature_overhaul``, ``feature_mimic``, ``feature_cwd``, ``feature_mgd``,
``feature_qmimic``. :mod:`distill.methods` is the one table of them all (builders, default weights,
inputs, term names).
"""

from distill.cli import add_distill_args, config_from_args
from distill.distiller import DistillConfig, Distiller
from distill.methods import DEFAULT_F_WEIGHTS, FEATURE_METHODS, FEATURE_TABLE, OUTPUT_MODES, OUTPUT_TABLE
from distill.schedule import kd_scale
from distill.taps import FeatureTaps
from distill.teacher import Compatibility, check_compatibility, freeze_teacher, load_teacher

__all__ = [
    "DEFAULT_F_WEIGHTS",
    "FEATURE_METHODS",
    "FEATURE_TABLE",
    "OUTPUT_MODES",
    "OUTPUT_TABLE",
    "Compatibility",
    "DistillConfig",
    "Distiller",
    "FeatureTaps",
    "add_distill_args",
    "check_compatibility",
    "config_from_args",
    "freeze_teacher",
    "kd_scale",
    "load_teacher",
]
