"""The table of distillation methods: every name, builder, default weight, input and term name.

Two tables, read by :mod:`distill.distiller` (what to build and call), :mod:`distill.cli` (flag
choices and help text) and :class:`distill.distiller.DistillConfig` (validation, default weights):

* :data:`FEATURE_TABLE` — feature methods (``--d_feature``): name → :class:`FeatureMethod`.
* :data:`OUTPUT_TABLE` — output modes (``--d_output``): name → :class:`OutputMode`.

Term names are written here once (the ``TERM_*`` constants and each row's ``terms``); nothing else
spells them. Adding a feature method = one new ``distill/feature_<name>.py`` with an ``nn.Module``
plus one :data:`FEATURE_TABLE` row (see CONTRIBUTING.md, "Adding a distillation method").

Default weights (``default_weight``) are calibrated so that each weighted term is a documented
fraction of YOLOv5's detection loss at initialisation on the demo set (``benchmarks/kd_terms.py``,
figures in ``benchmarks/results/kd_terms.json`` and docs/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from distill.feature_cwd import FeatureCWD
from distill.feature_mgd import FeatureMGD
from distill.feature_mimic import FeatureMimic
from distill.feature_mse import FeatureMSE
from distill.feature_overhaul import FeatureOverhaul
from distill.feature_pkd import FeaturePKD
from distill.feature_qmimic import FeatureQMimic

# ------------------------------------------------------------------------------------ term names
TERM_OUT_BOX = "kd/out_box"
TERM_OUT_OBJ = "kd/out_obj"
TERM_OUT_CLS = "kd/out_cls"
TERM_SOFT_OBJ = "kd/soft_obj"
TERM_SOFT_CLS = "kd/soft_cls"
TERM_BOUNDED_BOX = "kd/bounded_box"

# Inputs a feature method's forward takes (``FeatureMethod.needs``):
FEATURES = "features"  # post-activation maps entering Detect: forward(s, t)
PRE_FEATURES = "pre_features"  # pre-activation maps + the teacher's BN layers: forward(s_pre, t_pre)
BOXES = "boxes"  # forward(s, t, targets, teacher_confident_cells)
BN_STATS = "bn_stats"  # the builder reads the teacher BN's γ/β


@dataclass(frozen=True)
class BuildContext:
    """What a feature builder may read: per-level channels, the config, the teacher's pre-activation
    BN layers and the activation floors after them (only filled when a method needs them)."""

    s_channels: list[int]
    t_channels: list[int]
    cfg: Any  # DistillConfig (not imported: distiller imports this module)
    s_pre_channels: list[int] | None = None
    t_pre_channels: list[int] | None = None
    t_bns: Sequence[nn.Module] | None = None
    floors: Sequence[float | None] | None = None


@dataclass(frozen=True)
class FeatureMethod:
    """One ``--d_feature`` method: ``build(ctx) -> nn.Module``; its scalar term ``terms[0]``."""

    name: str
    build: Callable[[BuildContext], nn.Module]
    default_weight: float
    needs: frozenset[str]
    terms: tuple[str, ...]
    summary: str


@dataclass(frozen=True)
class OutputMode:
    """One ``--d_output`` mode. ``gains``: term → detection gain key (its weight is d_weight · gain,
    or (1 − μ) · gain / ν · gain for chen, see :meth:`distill.distiller.Distiller`); ``cls_terms``
    exist only when nc > 1; ``batch_scaled``: the criterion multiplies the weighted terms by the
    batch size like the detection loss (False = Adlik's published form)."""

    name: str
    gains: dict[str, str]
    cls_terms: tuple[str, ...]
    batch_scaled: bool
    summary: str


def _overhaul(ctx: BuildContext) -> nn.Module:
    return FeatureOverhaul(ctx.s_pre_channels, ctx.t_pre_channels, ctx.t_bns, floors=ctx.floors)


def _qmimic(ctx: BuildContext) -> nn.Module:
    c = ctx.cfg
    return FeatureQMimic(ctx.s_channels, ctx.t_channels, bits=c.q_bits, step=c.q_step or None,
                         per_channel=c.q_per_channel, symmetric=c.q_symmetric)


def _row(name: str, build: Callable[[BuildContext], nn.Module], weight: float, needs: set[str],
         summary: str) -> FeatureMethod:
    return FeatureMethod(name, build, weight, frozenset(needs), (f"kd/feat_{name}",), summary)


# Default weights (benchmarks/kd_terms.py, benchmarks/results/kd_terms.json, docs/RESULTS.md "Default
# weights"): pkd 1 and the old mimic 0.01 (Σ over channels) were the best feature rows of the demo
# study; at initialisation their weighted terms are ~12.5× and ~13.7× the detection loss (YOLOv5's
# loss is small at init: obj gain × (160/640)²). cwd, mgd and mimic (now per value, Li et al.'s
# m_i = C·cells) are set to the same ~12× (rounded to one digit): mimic 1 (= the paper's reference),
# qmimic 1 (shares mimic's scale), cwd 1 (the mmdetection 5 was 67×), mgd 2 on its per-value mean
# (α 2e-5 on Σ/N was ~1e-4×: no signal at all). mse 0.5 (Chen's γ, 4×) and overhaul 1e-4 (11×) are
# already in range and kept.
FEATURE_TABLE: dict[str, FeatureMethod] = {r.name: r for r in (
    _row("mse", lambda c: FeatureMSE(c.s_channels, c.t_channels), 0.5, {FEATURES},
         "FitNets/Chen hint: L2 after a 1×1 connector (weight γ 0.5)"),
    _row("pkd", lambda c: FeaturePKD(c.s_channels, c.t_channels), 1.0, {FEATURES},
         "Cao et al. 2022: per-channel standardised maps, MSE/2 ≈ 1 − Pearson r"),
    _row("overhaul", _overhaul, 1e-4, {PRE_FEATURES, BN_STATS},
         "Heo et al. 2019: pre-activation maps, margin from the teacher BN, partial L2 (--d_overhaul_bn)"),
    _row("mimic", lambda c: FeatureMimic(c.s_channels, c.t_channels), 1.0, {FEATURES, BOXES},
         "Li et al. 2017: L2 inside ground-truth boxes / (C·cells) per region"),
    _row("cwd", lambda c: FeatureCWD(c.s_channels, c.t_channels, tau=c.cfg.cwd_tau), 1.0, {FEATURES},
         "Shu et al. 2021: channel-wise spatial softmax, τ²·KL"),
    _row("mgd", lambda c: FeatureMGD(c.s_channels, c.t_channels, drop_ratio=c.cfg.mgd_drop, seed=c.cfg.mgd_seed),
         2.0, {FEATURES}, "Yang et al. 2022: masked generative distillation, mean per value"),
    _row("qmimic", _qmimic, 1.0, {FEATURES, BOXES},
         "Wei et al. 2018: mimic between uniformly quantised maps (--q_bits ...)"),
)}

OUTPUT_TABLE: dict[str, OutputMode] = {m.name: m for m in (
    OutputMode("objmse", {TERM_OUT_BOX: "box", TERM_OUT_OBJ: "obj", TERM_OUT_CLS: "cls"}, (TERM_OUT_CLS,), True,
               "teacher-objectness-weighted MSE on head logits, × d_weight·gain, × batch size like the "
               "detection loss (ours; bs× stronger than Adlik's)"),
    OutputMode("adlik", {TERM_OUT_BOX: "box", TERM_OUT_OBJ: "obj", TERM_OUT_CLS: "cls"}, (TERM_OUT_CLS,), False,
               "the Adlik fork's published form: objmse terms × d_weight·gain, NOT × batch size, constant "
               "schedule unless --d_schedule is given"),
    OutputMode("soft", {TERM_OUT_BOX: "box", TERM_SOFT_OBJ: "obj", TERM_SOFT_CLS: "cls"}, (TERM_SOFT_CLS,), True,
               "T²·BCE soft labels on objectness/classes + objmse box term"),
    OutputMode("chen", {TERM_SOFT_OBJ: "obj", TERM_SOFT_CLS: "cls", TERM_BOUNDED_BOX: "box"}, (TERM_SOFT_CLS,), True,
               "Chen et al. 2017: L_cls = μ·hard + (1−μ)·soft (--d_mu; soft over the hard loss's samples, "
               "background ×1.5) + teacher-bounded regression ν·box; ignores --d_weight"),
    OutputMode("none", {}, (), True, "no output distillation"),
)}

FEATURE_METHODS: tuple[str, ...] = tuple(FEATURE_TABLE)
OUTPUT_MODES: tuple[str, ...] = tuple(OUTPUT_TABLE)
DEFAULT_F_WEIGHTS: dict[str, float] = {k: r.default_weight for k, r in FEATURE_TABLE.items()}

__all__ = [
    "BOXES",
    "BN_STATS",
    "DEFAULT_F_WEIGHTS",
    "FEATURES",
    "FEATURE_METHODS",
    "FEATURE_TABLE",
    "OUTPUT_MODES",
    "OUTPUT_TABLE",
    "PRE_FEATURES",
    "BuildContext",
    "FeatureMethod",
    "OutputMode",
]
