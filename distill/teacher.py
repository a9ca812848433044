"""The teacher: loading, freezing (for good) and checking that it can teach this student.

A teacher is an ordinary DetectionModel that must never learn: parameters frozen, BatchNorm in
eval mode for the whole run. Known YOLOv5 distillation forks left the teacher in train mode, so
its BN running statistics drifted with the student's batches; here ``.train()`` on a frozen
teacher is a no-op and every forward re-asserts eval mode on all submodules.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from distill.taps import detect_input_channels, detect_layer
from utils.detect_outputs import raw_outputs
from utils.precision import Precision
from utils.torch_utils import unwrap_model as unwrap

if TYPE_CHECKING:  # only for annotations: distill/ does not need models/ at import time
    from models.yolo import DetectionModel


# ---------------------------------------------------------------------------------------- freezing
def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement ``train()`` of a frozen teacher: whatever is asked, stay in eval mode."""
    return nn.Module.train(self, False)


def _reassert_eval(module: nn.Module, args: Any) -> None:
    """Forward pre-hook: undo any ``.train()`` called on a submodule since the last forward."""
    if any(m.training for m in module.modules()):
        nn.Module.train(module, False)


def freeze_teacher(model: nn.Module) -> nn.Module:
    """Freeze ``model`` in place: no gradients, eval mode now and on every later forward.

    * ``requires_grad`` False on every parameter;
    * ``model.train(...)`` becomes a no-op that keeps eval mode (an instance attribute shadowing
      the method, so nothing else about the class changes);
    * a forward pre-hook switches every submodule back to eval if someone called ``.train()`` on
      a submodule directly — BatchNorm running statistics can never update.

    Idempotent. Returns ``model``.
    """
    model.requires_grad_(False)
    nn.Module.train(model, False)
    if not getattr(model, "_kd_frozen", False):
        model.train = types.MethodType(_eval_only_train, model)
        model.register_forward_pre_hook(_reassert_eval)
        model._kd_frozen = True
    return model


def load_teacher(
    path: str | Path,
    device: str | torch.device = "cpu",
    cfg: str | Path | dict | None = None,
    half: bool | None = None,
    precision: Precision | None = None,
    fold_bn: bool = False,
) -> DetectionModel:
    """Load a frozen teacher from a YOLOv5 release/train checkpoint or one of ours.

    Args:
        path: checkpoint file (``--t_weights``).
        device: where the teacher runs.
        cfg: optional model yaml (``--t_cfg``): build that architecture, then load the
            checkpoint's weights into it (strict; a mismatch names both files).
        half: fp16 weights; default True on CUDA, False elsewhere (ignored when ``precision`` is given).
        precision: the run's `utils.precision.Precision`: the teacher's weights take its autocast
            dtype (fp16 on CUDA, bf16 on a bf16 CPU, fp32 with AMP off) and channels_last when it
            uses it. A frozen teacher needs no fp32 master weights: storing it in the low dtype
            saves the per-op casts autocast would do on every forward.
        fold_bn: fold every BatchNorm into its conv (fewer ops per forward; outputs equal up to
            rounding). Leave False when a feature tap reads BN outputs (Overhaul's pre-activations).

    Returns the model frozen by :func:`freeze_teacher`.
    """
    p = Path(path)
    if not str(path) or not p.is_file():
        raise FileNotFoundError(f"--t_weights {path!s}: teacher checkpoint not found")
    if p.suffix in (".yaml", ".yml"):
        raise ValueError(f"--t_weights {path}: a teacher needs trained weights (.pt), not a model yaml")
    device = torch.device(device)
    if precision is None:  # the pre-precision interface: fp16 (+ channels_last) on CUDA
        half = device.type == "cuda" if half is None else half
        precision = Precision(device.type, torch.float16 if half else None)
    return prepare_teacher(_build_teacher(p, device, cfg), precision, fold_bn)


def prepare_teacher(model: nn.Module, precision: Precision, fold_bn: bool = False) -> nn.Module:
    """Fold BN (optional, in fp32), cast to ``precision.dtype`` (fp32 when None), channels_last when
    ``precision`` uses it, then :func:`freeze_teacher`. Returns the model."""
    model = model.float()
    if fold_bn:
        nn.Module.train(model, False)
        model.fuse()
    det = detect_layer(model)
    anchors = det.anchors.clone()  # kept fp32: in bf16 (8 mantissa bits) 373 px would read 372
    model = model.to(precision.dtype or torch.float32)
    det.anchors = anchors
    if precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return freeze_teacher(model)


def _build_teacher(p: Path, device: torch.device, cfg: str | Path | dict | None) -> DetectionModel:
    """The teacher's network from the checkpoint, or ``cfg``'s architecture with its weights."""
    if not cfg:
        from models import load_model

        return load_model(p, device=device)
    from models.checkpoint import load_checkpoint
    from models.yolo import DetectionModel

    ckpt = load_checkpoint(p)
    nc = ckpt.get("yaml", {}).get("nc") or len(ckpt.get("names") or [])
    model = DetectionModel(cfg, nc=nc or None)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0:2]
        raise ValueError(f"--t_cfg {cfg} does not match the weights in --t_weights {p}: "
                         f"{' '.join(first)}") from None
    if ckpt.get("names"):
        model.names = list(ckpt["names"])
    return model.to(device)


@torch.no_grad()  # not inference_mode: the fp32 outputs enter the student's autograd graph as constants
def run_teacher(teacher: nn.Module, imgs: torch.Tensor, taps: Iterable[Any] = ()) -> list[torch.Tensor]:
    """The frozen teacher's raw per-level outputs on ``imgs`` (float 0-1), in fp32, outside autograd.

    The input is cast to the teacher's own dtype and memory format (`teacher_input`); an enclosing
    autocast region (the student's) is switched off so it cannot mix its dtype into the teacher.
    The outputs and the features recorded by ``taps`` (`distill.taps.FeatureTaps`, None skipped)
    are cast to fp32 once here, so every KD loss sees fp32 tensors whatever the teacher's dtype.
    """
    teacher.eval()  # a no-op for a frozen teacher; keeps a hand-made one honest too
    x = teacher_input(imgs, teacher)
    head = detect_layer(teacher)
    head.raw_only = True  # raw logits only: the decoded boxes would be thrown away
    try:
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = [t.float() for t in raw_outputs(teacher(x))]
    finally:
        head.raw_only = False
    for tap in taps:
        if tap is not None and tap.features and all(f is not None for f in tap.features):
            tap.features = [f.float() for f in tap.features]
    return out


# ----------------------------------------------------------------------------------- compatibility
@dataclass
class Compatibility:
    """What :func:`check_compatibility` decided.

    ``output``: the output-distillation mode to use ('none' when it had to be disabled);
    ``output_reason``: why it was disabled ('' otherwise); ``s_channels`` / ``t_channels``: channels
    of the tensors entering Detect (features may differ in width: connectors handle it);
    ``strides`` (student's, pixels); ``t_levels``: the teacher's Detect levels the feature terms read,
    one per student level (all of them, in order, unless a deeper teacher is paired by stride;
    ``t_channels`` are those levels' channels); ``notes``: human-readable lines for the log.
    """

    output: str
    output_reason: str = ""
    s_channels: list[int] = field(default_factory=list)
    t_channels: list[int] = field(default_factory=list)
    strides: list[float] = field(default_factory=list)
    t_levels: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def same_channels(self) -> bool:
        return self.s_channels == self.t_channels


def _names(model: nn.Module) -> list[str] | None:
    names = getattr(model, "names", None)
    if isinstance(names, dict):
        return [str(names[k]) for k in sorted(names)]
    return [str(n) for n in names] if names is not None else None


def _anchors_px(det: nn.Module) -> torch.Tensor:
    return det.anchors.detach().float().cpu() * det.stride.detach().float().cpu().view(-1, 1, 1)


def _check_same_classes(student: nn.Module, teacher: nn.Module) -> None:
    """ValueError unless teacher and student have the same ``nc`` and (when both know them) names."""
    s_nc, t_nc = int(detect_layer(student).nc), int(detect_layer(teacher).nc)
    if s_nc != t_nc:
        raise ValueError(f"teacher has nc={t_nc} classes but the student has nc={s_nc}: distillation needs "
                         f"the same classes (use a teacher trained on this dataset, --t_weights)")
    s_names, t_names = _names(unwrap(student)), _names(unwrap(teacher))
    if s_names is not None and t_names is not None and s_names != t_names:
        i = next(k for k, (a, b) in enumerate(zip(s_names, t_names)) if a != b)
        raise ValueError(f"teacher and student class names differ (class {i}: teacher {t_names[i]!r}, student "
                         f"{s_names[i]!r}): distillation needs the same classes in the same order")


def _head_mismatch(s_det: nn.Module, t_det: nn.Module) -> str:
    """Why two Detect heads cannot be compared cell by cell ('' when they can)."""
    s_stride = [float(x) for x in s_det.stride]
    t_stride = [float(x) for x in t_det.stride]
    if int(s_det.nl) != int(t_det.nl) or int(s_det.na) != int(t_det.na):
        return (f"teacher head has {int(t_det.nl)} levels × {int(t_det.na)} anchors, student "
                f"{int(s_det.nl)} × {int(s_det.na)}")
    if s_stride != t_stride:
        return f"strides differ (teacher {t_stride}, student {s_stride})"
    if not torch.allclose(_anchors_px(s_det), _anchors_px(t_det), rtol=1e-3, atol=1e-2):
        return (f"anchors differ (teacher {_anchors_px(t_det).view(-1).tolist()} px, student "
                f"{_anchors_px(s_det).view(-1).tolist()} px)")
    return ""


def paired_levels(s_stride: list[float], t_stride: list[float]) -> list[int] | None:
    """The teacher level for each student level: level by level when both have as many, else the
    teacher level of the same stride (a P6 teacher's P3-P5 for a P5 student); None when a student
    stride has no teacher level."""
    if len(s_stride) == len(t_stride):
        return list(range(len(s_stride)))
    if not set(s_stride) <= set(t_stride):
        return None
    return [t_stride.index(st) for st in s_stride]


def check_compatibility(
    student: nn.Module,
    teacher: nn.Module,
    output_kd: str = "objmse",
    explicit: bool = False,
    features: Iterable[str] = (),
    resumed: bool = False,
) -> Compatibility:
    """Decide whether ``teacher`` can distil into ``student``; raise a clear error when it cannot.

    * classes: ``nc`` and ``names`` must be equal (ValueError naming both), for any kind of KD —
      the teacher's knowledge is about its own classes.
    * output KD (``output_kd`` != 'none') compares head tensors cell by cell, so it needs the same
      number of levels, strides and anchors (compared in pixels: anchors·stride) and anchors per
      cell. On a mismatch: ``explicit`` True (the user asked for it) → ValueError; otherwise
      (it was the default) → a warning and output KD is disabled (``output`` = 'none').
    * feature KD (``features`` non-empty) works across widths and depths; it pairs the levels
      (:func:`paired_levels`): level by level when both models have as many (spatial sizes follow
      from the strides and are resized if they differ), else by equal stride; ValueError when a
      student stride has no teacher level.
    * something must be left to distil: ValueError when output KD is off (disabled, or 'none') and
      no feature method is given — the teacher would run for nothing; except in a ``resumed`` run,
      which goes on as it began (see ``DistillConfig.resumed``).
    """
    s_det, t_det = detect_layer(student), detect_layer(teacher)
    _check_same_classes(student, teacher)
    features = list(features)
    t_stride = [float(x) for x in t_det.stride]
    rec = Compatibility(output=output_kd, s_channels=detect_input_channels(student),
                        t_channels=detect_input_channels(teacher), strides=[float(x) for x in s_det.stride],
                        t_levels=list(range(len(t_stride))))
    _decide_output(rec, s_det, t_det, t_stride, explicit, features, resumed)
    if features:
        _pair_feature_levels(rec, features, t_stride)
    return rec


def _decide_output(rec: Compatibility, s_det: nn.Module, t_det: nn.Module, t_stride: list[float], explicit: bool,
                   features: list[str], resumed: bool = False) -> None:
    """Keep ``rec.output``, drop it with a warning, or raise (see :func:`check_compatibility`)."""
    s_stride = rec.strides
    other_terms = bool(features) or resumed  # a resumed run trains on as it began
    if rec.output == "none":
        if not other_terms:
            raise ValueError("--d_output none without --d_feature leaves nothing to distil; give a feature method "
                             "(e.g. --d_feature pkd) or train without --t_weights")
        return
    reason = _head_mismatch(s_det, t_det)
    if reason and (explicit or not other_terms):
        hint = ("add feature distillation, e.g. --d_feature pkd (it pairs levels of equal stride)"
                if paired_levels(s_stride, t_stride) is not None else
                f"no feature method can pair them either: the student's strides {s_stride} are not all "
                f"among the teacher's {t_stride}; choose a teacher with the student's levels")
        what = f"--d_output {rec.output}: output" if explicit else f"the default output (--d_output {rec.output})"
        raise ValueError(f"{what} distillation needs identical heads but {reason}; {hint}")
    if reason:
        goes_on = (f"the feature terms ({','.join(features)}) go on" if features
                   else "the resumed run goes on as it began")
        warnings.warn(f"output distillation disabled: {reason} (it compares head outputs cell by cell); {goes_on}",
                      stacklevel=3)
        rec.output, rec.output_reason = "none", reason
        rec.notes.append(f"output KD disabled: {reason}")


def _pair_feature_levels(rec: Compatibility, features: list[str], t_stride: list[float]) -> None:
    """Set ``rec.t_levels`` / ``rec.t_channels`` for the feature terms, or raise when they cannot pair."""
    s_stride = rec.strides
    levels = paired_levels(s_stride, t_stride)
    if levels is None:
        raise ValueError(f"--d_feature {','.join(features)}: the student's strides {s_stride} are not all "
                         f"among the teacher's {t_stride}; feature distillation pairs levels of equal stride")
    rec.t_levels, rec.t_channels = levels, [rec.t_channels[k] for k in levels]
    if len(s_stride) != len(t_stride):
        rec.notes.append(f"teacher levels {levels} (strides {[t_stride[k] for k in levels]}) teach the "
                         f"student's {len(s_stride)} levels")
    if not rec.same_channels:
        rec.notes.append(f"feature widths differ (student {rec.s_channels}, teacher {rec.t_channels}): "
                         f"1×1 connectors adapt them")
    if s_stride != [t_stride[k] for k in levels]:
        rec.notes.append(f"strides differ (student {s_stride}, teacher {t_stride}): student maps are resized")


def teacher_input(imgs: torch.Tensor, teacher: nn.Module) -> torch.Tensor:
    """``imgs`` (B, 3, H, W) cast to the teacher's device, dtype and memory format.

    uint8 images are scaled to 0-1 first; the teacher's first parameter decides dtype/device, and
    channels_last is used when its first conv weight is stored that way.
    """
    p = next(teacher.parameters())
    x = imgs if imgs.is_floating_point() else imgs.float() / 255.0
    x = x.to(device=p.device, dtype=p.dtype)
    w = next((m.weight for m in teacher.modules() if isinstance(m, nn.Conv2d)), None)
    if w is not None and w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous():
        x = x.contiguous(memory_format=torch.channels_last)
    return x


__all__ = [
    "Compatibility",
    "check_compatibility",
    "freeze_teacher",
    "load_teacher",
    "prepare_teacher",
    "run_teacher",
    "teacher_input",
]
