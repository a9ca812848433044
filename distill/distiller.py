"""The Distiller: one teacher forward + recorded student features → named, unweighted KD terms.

Data flow of one training step (the engine owns the loop)::

    preds = student(imgs)                        # FeatureTaps registered here record P3/P4/P5
    terms = distiller(imgs, preds, targets)      # teacher forward (no_grad, eval) + KD losses
    loss  = det_loss + bs · kd_scale · Σ_k distiller.weights[k] · terms[k]

The Distiller is an ``nn.Module`` holding ONLY what KD trains (connectors, MGD generators), so
``distiller.parameters()`` is what the optimiser adds and ``distiller.state_dict()`` is what
``last.pt['adapters']`` stores. The teacher and the student are referenced, not registered: they
never appear in its state_dict, ``.to()``, ``.train()`` or ``.parameters()``.

Output modes (``--d_output``), with the terms they produce and their weights (d = ``d_weight``,
box/obj/cls = the detection hyp gains after ``scale_hyp``):

=========  =========================================================  ==========================
mode       terms                                                      weights
=========  =========================================================  ==========================
objmse     kd/out_box, kd/out_obj, kd/out_cls (Adlik-style MSE)       d·box, d·obj, d·cls
soft       kd/out_box (as objmse), kd/soft_obj, kd/soft_cls (T²·BCE)   d·box, d·obj, d·cls
chen       kd/soft_obj (background ×1.5), kd/soft_cls, kd/bounded_box  d·obj, d·cls, box·ν
none       —                                                          —
=========  =========================================================  ==========================

``*_cls`` terms exist only when nc > 1. Feature methods (``--d_feature``) add ``kd/feat_<method>``
with weight ``f_weights[method]`` (defaults :data:`DEFAULT_F_WEIGHTS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distill.feature_cwd import FeatureCWD
from distill.feature_mgd import MGD_DROP_RATIO, FeatureMGD
from distill.feature_mimic import FeatureMimic
from distill.feature_mse import FeatureMSE
from distill.feature_overhaul import FeatureOverhaul, activation_floor
from distill.feature_pkd import FeaturePKD
from distill.feature_qmimic import Q_BITS, FeatureQMimic
from distill.output import chen_bounded_box, objectness_weighted_mse, soft_output_terms
from distill.schedule import SCHEDULES, kd_scale
from distill.taps import FeatureTaps, detect_inputs, detect_layer, final_conv
from distill.teacher import check_compatibility, run_teacher
from utils.torch_utils import unwrap_model as unwrap

OUTPUT_MODES = ("objmse", "soft", "chen", "none")
FEATURE_METHODS = ("mse", "pkd", "overhaul", "mimic", "cwd", "mgd", "qmimic")

# Default weight of each feature term. Start: the methods' reference settings (REFERENCE.md §6):
# mse: Chen et al.'s hint weight γ 0.5; overhaul: the paper's "/ constant" (1e4 for our large neck
# maps); cwd: 5 (5-10 on FPN levels); mgd: α = 2e-5. Measured on the demo study (docs/RESULTS.md):
# the reference pkd 6 and mimic 1 were tuned against detection losses of order 1 (mmdetection);
# YOLOv5's per-image losses are ~10× smaller, so those terms swamped the detection loss (pkd 6:
# mAP50-95 0.41 vs 0.54 alone; mimic 1: ~0, the term stayed ~100× the detection loss) while pkd 1
# and mimic 0.01 gave 0.65-0.66. qmimic shares mimic's scale.
DEFAULT_F_WEIGHTS: dict[str, float] = {
    "mse": 0.5,
    "pkd": 1.0,
    "overhaul": 1e-4,
    "mimic": 0.01,
    "cwd": 5.0,
    "mgd": 2e-5,
    "qmimic": 0.01,
}

_DEFAULT_HYP = {"box": 0.05, "obj": 1.0, "cls": 0.5, "anchor_t": 4.0}


@dataclass
class DistillConfig:
    """Everything the Distiller needs; built from the CLI by :func:`distill.cli.config_from_args`.

    Attributes:
        output: 'objmse' | 'soft' | 'chen' | 'none' (see the module docstring).
        output_explicit: the user chose ``output`` (an incompatible teacher is then an error, not a
            warning that disables output KD).
        d_weight: multiplier of every output term (Adlik's default 10).
        temperature: T of the soft-label terms (Chen et al.: T = 1 is best for detection).
        features: feature methods, any of :data:`FEATURE_METHODS`.
        f_weights: weight per feature method; missing ones take :data:`DEFAULT_F_WEIGHTS`.
        schedule, stop_epochs, warmup_epochs: see :func:`distill.schedule.kd_scale`.
        hyp: detection loss gains ``box``, ``obj``, ``cls`` (already scaled, the dict given to
            ``DetectionLoss``) and ``anchor_t`` (used by the 'chen' positives).
        chen_margin: m of the bounded regression (grid units²; 0 = any student worse than the
            teacher is pushed); chen_nu: ν, its weight relative to d·box; chen_bg_weight: 1.5.
        cwd_tau: τ of CWD; mgd_drop: MGD's mask ratio; mimic_conf: when > 0, cells where the
            teacher's objectness exceeds it form an extra mimic region per image (mimic, qmimic).
        q_bits, q_step, q_per_channel, q_symmetric: the qmimic quantiser (see
            :mod:`distill.feature_qmimic`); q_step > 0 overrides q_bits.
        t_val: validate the teacher once before training (read by the engine).
    """

    output: str = "objmse"
    output_explicit: bool = False
    d_weight: float = 10.0
    temperature: float = 1.0
    features: tuple[str, ...] = ()
    f_weights: dict[str, float] = field(default_factory=dict)
    schedule: str = "cosine"  # measured best on the demo study (docs/RESULTS.md)
    stop_epochs: int = 0
    warmup_epochs: int = 0
    hyp: dict[str, float] = field(default_factory=lambda: dict(_DEFAULT_HYP))
    chen_margin: float = 0.0
    chen_nu: float = 0.5
    chen_bg_weight: float = 1.5
    cwd_tau: float = 1.0
    mgd_drop: float = MGD_DROP_RATIO
    mimic_conf: float = 0.0
    q_bits: int = Q_BITS
    q_step: float = 0.0
    q_per_channel: bool = False
    q_symmetric: bool = False
    t_val: bool = True

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_MODES:
            raise ValueError(f"--d_output {self.output!r}: use one of {', '.join(OUTPUT_MODES)}")
        self.features = tuple(self.features)
        bad = [m for m in self.features if m not in FEATURE_METHODS]
        if bad:
            raise ValueError(f"--d_feature {','.join(bad)}: unknown method; use any of {', '.join(FEATURE_METHODS)}")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"--d_feature {','.join(self.features)}: a method is listed twice")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--d_schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if not 2 <= self.q_bits <= 16:
            raise ValueError(f"--q_bits {self.q_bits}: use 2..16")
        if self.q_step < 0:
            raise ValueError(f"--q_step {self.q_step}: must be >= 0 (0 = derive the step from --q_bits)")
        if self.temperature <= 0:
            raise ValueError(f"--d_temperature {self.temperature}: must be > 0")
        self.hyp = {**_DEFAULT_HYP, **{k: float(v) for k, v in self.hyp.items() if k in _DEFAULT_HYP}}

    @property
    def active(self) -> bool:
        """True when any distillation term is requested."""
        return self.output != "none" or bool(self.features)

    def f_weight(self, method: str) -> float:
        return float(self.f_weights.get(method, DEFAULT_F_WEIGHTS[method]))

    def scale(self, epoch: float, epochs: int) -> float:
        """:func:`~distill.schedule.kd_scale` with this config's schedule."""
        return kd_scale(epoch, epochs, self.schedule, self.stop_epochs, self.warmup_epochs)


class Distiller(nn.Module):
    """Knowledge distillation from a frozen ``teacher`` into ``student`` (see the module docstring).

    Args:
        student: the DetectionModel being trained (may be DDP-wrapped); feature taps are
            registered on it here, so construct the Distiller BEFORE the first student forward
            whose features you want, and before building the EMA is not required (taps ignore
            deep copies).
        teacher: a frozen DetectionModel (:func:`distill.teacher.load_teacher`).
        cfg: :class:`DistillConfig`.

    Attributes:
        weights: dict term name → weight (see the module docstring); the engine computes
            Σ weights[k] · kd_scale · terms[k] (× batch size, like the detection loss).
        compat: the :class:`~distill.teacher.Compatibility` record (``output`` may have been
            downgraded to 'none' with a warning).
        features: ``nn.ModuleDict`` method → loss module (its connectors / generators).

    ``forward(imgs, student_preds, targets)`` → dict of UNWEIGHTED scalar terms. Call it once per
    student forward: it consumes (and then clears) the features the student's taps recorded.
    Under DDP the Distiller is not wrapped: average its gradients across ranks before the step.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Plain attributes, bypassing nn.Module registration (see the module docstring).
        object.__setattr__(self, "student", unwrap(student))
        object.__setattr__(self, "teacher", teacher)
        self.compat = check_compatibility(student, teacher, cfg.output, cfg.output_explicit, cfg.features)
        self.output = self.compat.output
        self.nc = int(detect_layer(student).nc)

        hyp, d = cfg.hyp, cfg.d_weight
        self.weights: dict[str, float] = {}
        if self.output in ("objmse", "soft"):
            self.weights["kd/out_box"] = d * hyp["box"]
        if self.output == "objmse":
            self.weights["kd/out_obj"] = d * hyp["obj"]
            if self.nc > 1:
                self.weights["kd/out_cls"] = d * hyp["cls"]
        if self.output in ("soft", "chen"):
            self.weights["kd/soft_obj"] = d * hyp["obj"]
            if self.nc > 1:
                self.weights["kd/soft_cls"] = d * hyp["cls"]
        if self.output == "chen":
            # Chen's ν weighs the bounded term against the hard regression loss (gain `box` here); it is
            # averaged over positives only, so the objmse-style d_weight (meant for all-cell means)
            # must not multiply it: with it the term's gradient swamped every other (docs/RESULTS.md).
            self.weights["kd/bounded_box"] = hyp["box"] * cfg.chen_nu
            from utils.loss import DetectionLoss  # the hard loss's own positive assignment

            self._assigner = DetectionLoss(self.student, {**hyp})

        self.features = nn.ModuleDict()
        s_ch, t_ch = self.compat.s_channels, self.compat.t_channels
        post = [m for m in cfg.features if m != "overhaul"]
        self._s_taps = FeatureTaps(self.student) if post else None
        self._t_taps = FeatureTaps(teacher) if post else None
        self._s_pre = FeatureTaps(self.student, pre_activation=True) if "overhaul" in cfg.features else None
        self._t_pre = FeatureTaps(teacher, pre_activation=True) if "overhaul" in cfg.features else None
        for m in cfg.features:
            if m == "mse":
                self.features[m] = FeatureMSE(s_ch, t_ch)
            elif m == "pkd":
                self.features[m] = FeaturePKD(s_ch, t_ch)
            elif m == "cwd":
                self.features[m] = FeatureCWD(s_ch, t_ch, tau=cfg.cwd_tau)
            elif m == "mgd":
                self.features[m] = FeatureMGD(s_ch, t_ch, drop_ratio=cfg.mgd_drop)
            elif m == "mimic":
                self.features[m] = FeatureMimic(s_ch, t_ch)
            elif m == "qmimic":
                self.features[m] = FeatureQMimic(s_ch, t_ch, bits=cfg.q_bits, step=cfg.q_step or None,
                                                 per_channel=cfg.q_per_channel, symmetric=cfg.q_symmetric)
            elif m == "overhaul":
                floors = [activation_floor(getattr(final_conv(layer), "act", None)) for layer in detect_inputs(teacher)]
                self.features[m] = FeatureOverhaul(self._s_pre.channels, self._t_pre.channels, self._t_pre.modules,
                                                   floors=floors)
            self.weights[f"kd/feat_{m}"] = cfg.f_weight(m)
        p = next(self.student.parameters(), None)
        if p is not None:
            self.to(p.device)

    # ------------------------------------------------------------------------------------ forward
    def teacher_forward(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """Run the frozen teacher on ``imgs`` (float 0-1, any dtype/device); raw per-level fp32 outputs
        (its taps' features cast to fp32 too; see :func:`distill.teacher.run_teacher`)."""
        return run_teacher(self.teacher, imgs, (self._t_taps, self._t_pre))

    def forward(
        self, imgs: torch.Tensor, student_preds: Sequence[torch.Tensor] | Any, targets: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Named unweighted KD terms for one batch.

        Args:
            imgs: (B, 3, H, W) the batch the student just saw, float 0-1.
            student_preds: the student's train-mode output, list of (B, na, ny, nx, 5 + nc).
            targets: (n, 6) ``[img, cls, xc, yc, w, h]`` normalised.

        Returns dict name → 0-dim fp32 tensor, keys exactly those of ``weights``.
        """
        if isinstance(student_preds, tuple) and len(student_preds) == 2 and isinstance(student_preds[1], list):
            student_preds = student_preds[1]
        s_out = list(student_preds)
        t_out = self.teacher_forward(imgs)
        terms: dict[str, torch.Tensor] = {}

        if self.output == "objmse":
            r = objectness_weighted_mse(s_out, t_out, self.nc)
            terms["kd/out_box"], terms["kd/out_obj"] = r["box"], r["obj"]
            if self.nc > 1:
                terms["kd/out_cls"] = r["cls"]
        elif self.output in ("soft", "chen"):
            bg = self.cfg.chen_bg_weight if self.output == "chen" else 1.0
            r = soft_output_terms(s_out, t_out, self.nc, self.cfg.temperature, bg_weight=bg)
            terms["kd/soft_obj"] = r["obj"]
            if self.nc > 1:
                terms["kd/soft_cls"] = r["cls"]
            if self.output == "soft":
                terms["kd/out_box"] = objectness_weighted_mse(s_out, t_out, self.nc)["box"]
            else:
                terms["kd/bounded_box"] = self._bounded_box(s_out, t_out, targets)

        if self.cfg.features:
            targets = targets.to(s_out[0].device)
            s_post = self._s_taps.get() if self._s_taps else None
            t_post = self._t_taps.get() if self._t_taps else None
            for m, module in self.features.items():
                if m == "overhaul":
                    value = module(self._s_pre.get(), self._t_pre.get())
                elif m in ("mimic", "qmimic"):
                    value = module(s_post, t_post, targets, self._confident_cells(t_out))
                else:
                    value = module(s_post, t_post)
                terms[f"kd/feat_{m}"] = value
            for taps in (self._s_taps, self._t_taps, self._s_pre, self._t_pre):
                if taps is not None:
                    taps.clear()
        return {k: v.float().reshape(()) for k, v in terms.items()}

    def _bounded_box(self, s_out: list[torch.Tensor], t_out: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
        s32 = [p.float() for p in s_out]
        positives = self._assigner.assign(s32, targets.to(s32[0].device).float())
        return chen_bounded_box(s32, t_out, [p.box for p in positives], [p.cell_index() for p in positives],
                                [p.anchor_wh for p in positives], margin=self.cfg.chen_margin)

    def _confident_cells(self, t_out: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Per level (B, ny, nx) bool: the teacher's best anchor objectness > ``mimic_conf``."""
        thr = self.cfg.mimic_conf
        if thr <= 0:
            return None
        return [t[..., 4].float().sigmoid().amax(1) > thr for t in t_out]

    # ------------------------------------------------------------------------------------ helpers
    def scale(self, epoch: float, epochs: int) -> float:
        """The KD multiplier for ``epoch`` (:meth:`DistillConfig.scale`)."""
        return self.cfg.scale(epoch, epochs)

    def summary(self) -> list[str]:
        """Lines for the run log: mode, terms with weights, adapters, compatibility notes."""
        n_params = sum(p.numel() for p in self.parameters())
        lines = [f"distillation: output={self.output}, features={','.join(self.cfg.features) or 'none'}, "
                 f"schedule={self.cfg.schedule}, trainable KD params={n_params}"]
        lines += [f"  {k}: weight {w:g}" for k, w in self.weights.items()]
        lines += [f"  note: {n}" for n in self.compat.notes]
        return lines

    def remove(self) -> None:
        """Remove every hook this Distiller placed on the student and the teacher."""
        for taps in (self._s_taps, self._t_taps, self._s_pre, self._t_pre):
            if taps is not None:
                taps.remove()


__all__ = ["DEFAULT_F_WEIGHTS", "FEATURE_METHODS", "OUTPUT_MODES", "DistillConfig", "Distiller"]
