"""The Distiller: one teacher forward + recorded student features → named, unweighted KD terms.

Data flow of one training step (the engine owns the loop)::

    preds = student(imgs)                        # FeatureTaps registered here record P3/P4/P5
    loss, terms = criterion(imgs, preds, targets, criterion.kd_scale(epoch, epochs))
    # criterion: det terms + positives → distiller(imgs, preds, targets, positives) → one weight dict

The Distiller is an ``nn.Module`` holding ONLY what KD trains (connectors, MGD generators), so
``distiller.parameters()`` is what the optimiser adds and ``distiller.state_dict()`` is what
``last.pt['adapters']`` stores. The teacher and the student are referenced, not registered: they
never appear in its state_dict, ``.to()``, ``.train()`` or ``.parameters()``.

What exists is read from :mod:`distill.methods` (one table of output modes and feature methods,
their builders, default weights, inputs and term names). Output modes and their weights
(d = ``d_weight``, box/obj/cls = the detection hyp gains after ``scale_hyp``, μ = ``chen_mu``,
ν = ``chen_nu``):

=========  =========================================================  ==========================
mode       terms                                                      weights
=========  =========================================================  ==========================
objmse     kd/out_box, kd/out_obj, kd/out_cls (Adlik-style MSE)       d·box, d·obj, d·cls  (× bs)
adlik      the same terms (Adlik's published form)                    d·box, d·obj, d·cls  (no bs)
soft       kd/out_box (as objmse), kd/soft_obj, kd/soft_cls (T²·BCE)   d·box, d·obj, d·cls
chen       kd/soft_obj (background ×1.5), kd/soft_cls, kd/bounded_box  (1−μ)·obj, (1−μ)·cls, ν·box
none       —                                                          —
=========  =========================================================  ==========================

``*_cls`` terms exist only when nc > 1. For chen the detection loss's det/obj and det/cls are
weighted μ (:meth:`Distiller.det_weights`). Feature methods (``--d_feature``) add ``kd/feat_<method>``
with weight ``f_weights[method]`` (defaults :data:`distill.methods.DEFAULT_F_WEIGHTS`).

Size: a little over 400 lines: the Distiller and its config, one documented field per flag; the losses
live in their own files and the method table in :mod:`distill.methods`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill.feature_mgd import MGD_DROP_RATIO
from distill.feature_overhaul import activation_floor
from distill.feature_qmimic import Q_BITS
from distill.methods import (
    BOXES,
    DEFAULT_F_WEIGHTS,
    FEATURE_METHODS,
    FEATURE_TABLE,
    FEATURES,
    OUTPUT_MODES,
    OUTPUT_TABLE,
    PRE_FEATURES,
    TERM_BOUNDED_BOX,
    TERM_OUT_BOX,
    TERM_OUT_CLS,
    TERM_OUT_OBJ,
    TERM_SOFT_CLS,
    TERM_SOFT_OBJ,
    BuildContext,
)
from distill.output import chen_bounded_box, chen_soft_terms, objectness_weighted_mse, soft_output_terms
from distill.schedule import SCHEDULES, kd_scale
from distill.taps import FeatureTaps, detect_inputs, detect_layer, final_conv
from distill.teacher import check_compatibility, run_teacher
from utils.detect_outputs import raw_outputs
from utils.loss import level_positives, objectness_balance
from utils.torch_utils import unwrap_model as unwrap

OVERHAUL_BN = ("running", "batch")
_DEFAULT_HYP = {"box": 0.05, "obj": 1.0, "cls": 0.5, "anchor_t": 4.0}


@dataclass
class DistillConfig:
    """Everything the Distiller needs; built from the CLI by :func:`distill.cli.config_from_args`.

    Attributes:
        output: a :data:`OUTPUT_MODES` name (see the module docstring).
        output_explicit: the user chose ``output`` (an incompatible teacher is then an error, not a
            warning that disables output KD).
        d_weight: multiplier of the objmse/adlik/soft output terms (Adlik's default 10).
        temperature: T of the soft-label terms (Chen et al.: T = 1 is best for detection).
        features: feature methods, any of :data:`FEATURE_METHODS`.
        f_weights: weight per feature method; missing ones take :data:`DEFAULT_F_WEIGHTS`.
        schedule, stop_epochs, warmup_epochs: see :func:`distill.schedule.kd_scale`.
        f_stop_epochs: the feature terms stop for the last N epochs while output KD goes on
            (:meth:`Distiller.set_epoch`); 0 = they follow the schedule to the end.
        hyp: detection loss gains ``box``, ``obj``, ``cls`` (already scaled, the dict given to
            ``DetectionLoss``) and ``anchor_t``.
        chen_mu: μ of L_cls = μ·hard + (1 − μ)·soft (Chen et al. 2017; 0.5); chen_margin: m of the
            bounded regression (in the anchor-relative regression space of
            :func:`distill.output.regression_space`; 0 = any student worse than the teacher is
            pushed); chen_nu: ν, its weight relative to box; chen_bg_weight: 1.5.
        cwd_tau: τ of CWD; mgd_drop: MGD's mask ratio; mgd_seed: seed of MGD's mask generator;
            mimic_conf: when > 0, cells where the teacher's objectness exceeds it form an extra
            mimic region per image (mimic, qmimic).
        overhaul_bn: 'running' (teacher BN with its running statistics, eval) or 'batch' (Heo et
            al.: batch statistics; the teacher's weights and running buffers never change).
        q_bits, q_step, q_per_channel, q_symmetric: the qmimic quantiser (see
            :mod:`distill.feature_qmimic`); q_step > 0 overrides q_bits.
        t_val: validate the teacher once before training (read by the engine).
        resumed: the run was started before: a default output KD that cannot compare the heads is
            switched off with a warning even when no other term remains, as runs of earlier versions
            were, so that such a run trains on as it began instead of failing to resume.
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
    f_stop_epochs: int = 0
    hyp: dict[str, float] = field(default_factory=lambda: dict(_DEFAULT_HYP))
    chen_mu: float = 0.5
    chen_margin: float = 0.0
    chen_nu: float = 0.5
    chen_bg_weight: float = 1.5
    cwd_tau: float = 1.0
    mgd_drop: float = MGD_DROP_RATIO
    mgd_seed: int = 0
    mimic_conf: float = 0.0
    overhaul_bn: str = "running"
    q_bits: int = Q_BITS
    q_step: float = 0.0
    q_per_channel: bool = False
    q_symmetric: bool = False
    t_val: bool = True
    resumed: bool = False

    def __post_init__(self) -> None:
        if self.output not in OUTPUT_TABLE:
            raise ValueError(f"--d_output {self.output!r}: use one of {', '.join(OUTPUT_MODES)}")
        self.features = tuple(self.features)
        bad = [m for m in self.features if m not in FEATURE_TABLE]
        if bad:
            raise ValueError(f"--d_feature {','.join(bad)}: unknown method; use any of {', '.join(FEATURE_METHODS)}")
        if len(set(self.features)) != len(self.features):
            raise ValueError(f"--d_feature {','.join(self.features)}: a method is listed twice")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--d_schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}")
        if self.f_stop_epochs < 0:
            raise ValueError(f"--f_stop_epochs {self.f_stop_epochs}: must be >= 0")
        if not 2 <= self.q_bits <= 16:
            raise ValueError(f"--q_bits {self.q_bits}: use 2..16")
        if self.q_step < 0:
            raise ValueError(f"--q_step {self.q_step}: must be >= 0 (0 = derive the step from --q_bits)")
        if self.temperature <= 0:
            raise ValueError(f"--d_temperature {self.temperature}: must be > 0")
        if not 0.0 <= self.chen_mu <= 1.0:
            raise ValueError(f"--d_mu {self.chen_mu}: must be in [0, 1]")
        if self.overhaul_bn not in OVERHAUL_BN:
            raise ValueError(f"--d_overhaul_bn {self.overhaul_bn!r}: use one of {', '.join(OVERHAUL_BN)}")
        self.hyp = {**_DEFAULT_HYP, **{k: float(v) for k, v in self.hyp.items() if k in _DEFAULT_HYP}}

    @property
    def active(self) -> bool:
        """True when any distillation term is requested."""
        return self.output != "none" or bool(self.features)

    def f_weight(self, method: str) -> float:
        return float(self.f_weights.get(method, DEFAULT_F_WEIGHTS[method]))


def output_weights(cfg: DistillConfig, output: str, nc: int) -> dict[str, float]:
    """Weight of each output term of mode ``output`` (the table in the module docstring)."""
    mode = OUTPUT_TABLE[output]
    hyp = cfg.hyp
    weights = {}
    for term, gain in mode.gains.items():
        if term in mode.cls_terms and nc <= 1:
            continue  # a single class is learnt through objectness alone
        if output != "chen":
            weights[term] = cfg.d_weight * hyp[gain]
        elif term == TERM_BOUNDED_BOX:
            # ν weighs the bounded term against the hard regression loss (gain `box`); averaged over
            # positives only, so no d_weight (with it the gradient swamped every other, docs/RESULTS.md).
            weights[term] = cfg.chen_nu * hyp[gain]
        else:
            weights[term] = (1.0 - cfg.chen_mu) * hyp[gain]  # (1 − μ)·soft, μ·hard: det_weights
    return weights


def _batch_stat_bn(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the BN's output recomputed with the batch's statistics (Heo et al.'s teacher),
    without touching the running buffers (none are passed) nor the weights."""
    return F.batch_norm(args[0], None, None, module.weight, module.bias, training=True, momentum=0.0, eps=module.eps)


class Distiller(nn.Module):
    """Knowledge distillation from a frozen ``teacher`` into ``student`` (see the module docstring).

    Args:
        student: the DetectionModel being trained (may be DDP-wrapped); feature taps are
            registered on it here, so construct the Distiller BEFORE the first student forward
            whose features you want.
        teacher: a frozen DetectionModel (:func:`distill.teacher.load_teacher`).
        cfg: :class:`DistillConfig`.

    Attributes:
        weights: dict term name → weight (see the module docstring); the criterion computes
            Σ weights[k] · scale · terms[k] (× batch size unless k is in ``unscaled_terms``).
        unscaled_terms: terms NOT multiplied by the batch size (the 'adlik' output terms).
        compat: the :class:`~distill.teacher.Compatibility` record (``output`` may have been
            downgraded to 'none' with a warning).
        features: ``nn.ModuleDict`` method → loss module (its connectors / generators).

    ``forward(imgs, student_preds, targets, positives=None)`` → dict of UNWEIGHTED scalar terms.
    Call it once per student forward: it consumes (and then clears) the features the student's
    taps recorded. :meth:`set_epoch` (called by the trainer at each epoch start) switches the
    feature terms off for the last ``cfg.f_stop_epochs`` epochs. Under DDP the Distiller is not
    wrapped: average its gradients across ranks.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Plain attributes, bypassing nn.Module registration (see the module docstring).
        object.__setattr__(self, "student", unwrap(student))
        object.__setattr__(self, "teacher", teacher)
        self.compat = check_compatibility(student, teacher, cfg.output, cfg.output_explicit, cfg.features,
                                          resumed=cfg.resumed)
        self.output = self.compat.output
        self.nc = int(detect_layer(student).nc)
        self.weights: dict[str, float] = output_weights(cfg, self.output, self.nc)
        self.unscaled_terms = set() if OUTPUT_TABLE[self.output].batch_scaled else set(self.weights)
        needs = set().union(*(FEATURE_TABLE[m].needs for m in cfg.features))
        t_levels = self.compat.t_levels  # the teacher levels paired with the student's
        self._s_taps = FeatureTaps(self.student) if FEATURES in needs else None
        self._t_taps = FeatureTaps(teacher, levels=t_levels) if FEATURES in needs else None
        self._s_pre = FeatureTaps(self.student, pre_activation=True) if PRE_FEATURES in needs else None
        self._t_pre = FeatureTaps(teacher, pre_activation=True, levels=t_levels) if PRE_FEATURES in needs else None
        self.features = nn.ModuleDict()
        self.features_active = True  # see set_epoch
        ctx = self._build_context()
        for m in cfg.features:
            spec = FEATURE_TABLE[m]
            self.features[m] = spec.build(ctx)
            self.weights[spec.terms[0]] = cfg.f_weight(m)
        p = next(self.student.parameters(), None)
        if p is not None:
            self.to(p.device)

    def _build_context(self) -> BuildContext:
        pre = self._t_pre
        floors = None
        if pre is not None:
            layers = detect_inputs(self.teacher, self.compat.t_levels)
            floors = [activation_floor(getattr(final_conv(layer), "act", None)) for layer in layers]
        return BuildContext(self.compat.s_channels, self.compat.t_channels, self.cfg,
                            s_pre_channels=self._s_pre.channels if pre is not None else None,
                            t_pre_channels=pre.channels if pre is not None else None,
                            t_bns=pre.modules if pre is not None else None, floors=floors)

    # ------------------------------------------------------------------------------------ forward
    def teacher_forward(self, imgs: torch.Tensor) -> list[torch.Tensor]:
        """Run the frozen teacher on ``imgs`` (float 0-1, any dtype/device); raw per-level fp32 outputs
        (its taps' features cast to fp32 too; see :func:`distill.teacher.run_teacher`).

        With ``overhaul_bn='batch'`` (and overhaul selected) every teacher BN normalises with the
        batch's statistics (Heo et al.) through temporary forward hooks: the teacher stays in eval
        mode, its running buffers and weights are never written (its BN is never folded then).
        """
        handles = []
        if self.cfg.overhaul_bn == "batch" and "overhaul" in self.cfg.features:
            handles = [m.register_forward_hook(_batch_stat_bn, prepend=True)
                       for m in self.teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        try:
            return run_teacher(self.teacher, imgs, (self._t_taps, self._t_pre))
        finally:
            for h in handles:
                h.remove()

    def forward(
        self,
        imgs: torch.Tensor,
        student_preds: Sequence[torch.Tensor] | Any,
        targets: torch.Tensor,
        positives: Sequence[Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Named unweighted KD terms for one batch.

        Args:
            imgs: (B, 3, H, W) the batch the student just saw, float 0-1.
            student_preds: the student's train-mode output, list of (B, na, ny, nx, 5 + nc).
            targets: (n, 6) ``[img, cls, xc, yc, w, h]`` normalised.
            positives: the detection loss's per-level ``LevelPositives`` (chen reuses them; when
                None they are assigned here with the same rule).

        Returns dict name → 0-dim fp32 tensor, keys exactly those of ``weights``.
        """
        s_out = list(raw_outputs(student_preds))
        t_out = self.teacher_forward(imgs)
        terms = self._output_terms(s_out, t_out, targets, positives)
        if self.cfg.features and self.features_active:
            terms.update(self._feature_terms(t_out, targets.to(s_out[0].device)))
        else:
            self._clear_taps()
        return {k: v.float().reshape(()) for k, v in terms.items()}

    def _output_terms(self, s_out: list[torch.Tensor], t_out: list[torch.Tensor], targets: torch.Tensor,
                      positives: Sequence[Any] | None) -> dict[str, torch.Tensor]:
        terms: dict[str, torch.Tensor] = {}
        if self.output in ("objmse", "adlik"):
            r = objectness_weighted_mse(s_out, t_out, self.nc)
            terms[TERM_OUT_BOX], terms[TERM_OUT_OBJ], terms[TERM_OUT_CLS] = r["box"], r["obj"], r["cls"]
        elif self.output == "soft":
            r = soft_output_terms(s_out, t_out, self.nc, self.cfg.temperature)
            terms[TERM_SOFT_OBJ], terms[TERM_SOFT_CLS] = r["obj"], r["cls"]
            terms[TERM_OUT_BOX] = objectness_weighted_mse(s_out, t_out, self.nc)["box"]
        elif self.output == "chen":
            s32 = [p.float() for p in s_out]
            pos = positives if positives is not None else self._assign(s32, targets)
            cells = [p.cell_index() for p in pos]
            r = chen_soft_terms(s32, t_out, cells, self.nc, objectness_balance(len(s32)), self.cfg.temperature,
                                self.cfg.chen_bg_weight)
            terms[TERM_SOFT_OBJ], terms[TERM_SOFT_CLS] = r["obj"], r["cls"]
            terms[TERM_BOUNDED_BOX] = chen_bounded_box(s32, t_out, [p.box for p in pos], cells,
                                                       [p.anchor_wh for p in pos], margin=self.cfg.chen_margin)
        return {k: v for k, v in terms.items() if k in self.weights}

    def _feature_terms(self, t_out: list[torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        s_post = self._s_taps.get() if self._s_taps else None
        t_post = self._t_taps.get() if self._t_taps else None
        terms = {}
        for m, module in self.features.items():
            spec = FEATURE_TABLE[m]
            if PRE_FEATURES in spec.needs:
                value = module(self._s_pre.get(), self._t_pre.get())
            elif BOXES in spec.needs:
                value = module(s_post, t_post, targets, self._confident_cells(t_out))
            else:
                value = module(s_post, t_post)
            terms[spec.terms[0]] = value
        self._clear_taps()
        return terms

    def _clear_taps(self) -> None:
        for taps in (self._s_taps, self._t_taps, self._s_pre, self._t_pre):
            if taps is not None:
                taps.clear()

    def _assign(self, s32: list[torch.Tensor], targets: torch.Tensor) -> list[Any]:
        """The detection loss's positives, for direct calls without them (same rule, utils.loss)."""
        anchors = detect_layer(self.student).anchors.float().to(s32[0].device)
        t = targets.to(s32[0].device).float()
        return [level_positives(t, anchors[i], (int(p.shape[3]), int(p.shape[2])), self.cfg.hyp["anchor_t"])
                for i, p in enumerate(s32)]

    def _confident_cells(self, t_out: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """Per level (B, ny, nx) bool: the teacher's best anchor objectness > ``mimic_conf``."""
        thr = self.cfg.mimic_conf
        if thr <= 0:
            return None
        return [t_out[k][..., 4].float().sigmoid().amax(1) > thr for k in self.compat.t_levels]

    # ------------------------------------------------------------------------------------ weighting
    def scale(self, epoch: float, epochs: int) -> float:
        """The KD multiplier for ``epoch`` (:func:`distill.schedule.kd_scale` with this config) —
        the one place it is computed (the criterion asks for it)."""
        c = self.cfg
        return kd_scale(epoch, epochs, c.schedule, c.stop_epochs, c.warmup_epochs)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Start epoch ``epoch`` (0-based) of ``epochs``: the feature terms are computed unless it is
        one of the last ``cfg.f_stop_epochs`` (output KD keeps its schedule). Their connectors then
        get no gradient (``grad`` stays None: the optimizer and the DDP gradient average skip them)."""
        self.features_active = epoch < epochs - self.cfg.f_stop_epochs

    def det_weights(self, scale: float) -> dict[str, float]:
        """Weights of the detection terms at KD ``scale``: chen's μ·hard, i.e. 1 − scale·(1 − μ) on
        det/obj and det/cls (back to plain detection as the schedule decays); 1 otherwise."""
        if self.output != "chen":
            return {}
        w = 1.0 - scale * (1.0 - self.cfg.chen_mu)
        return {"det/obj": w, "det/cls": w}

    # ------------------------------------------------------------------------------------ helpers
    def summary(self) -> list[str]:
        """Lines for the run log: mode, terms with weights, adapters, compatibility notes."""
        n_params = sum(p.numel() for p in self.parameters())
        lines = [f"distillation: output={self.output}, features={','.join(self.cfg.features) or 'none'}, "
                 f"schedule={self.cfg.schedule}, trainable KD params={n_params}"]
        if self.cfg.features and self.cfg.f_stop_epochs:
            lines[0] += f", feature terms off for the last {self.cfg.f_stop_epochs} epoch(s)"
        lines += [f"  {k}: weight {w:g}{' (not × batch size)' if k in self.unscaled_terms else ''}"
                  for k, w in self.weights.items()]
        lines += [f"  note: {n}" for n in self.compat.notes]
        return lines

    def remove(self) -> None:
        """Remove every hook this Distiller placed on the student and the teacher."""
        for taps in (self._s_taps, self._t_taps, self._s_pre, self._t_pre):
            if taps is not None:
                taps.remove()


__all__ = ["DEFAULT_F_WEIGHTS", "FEATURE_METHODS", "OUTPUT_MODES", "DistillConfig", "Distiller", "output_weights"]
