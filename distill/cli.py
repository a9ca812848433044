"""Command-line flags of distillation and their translation into a :class:`DistillConfig`."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from distill.distiller import OVERHAUL_BN, DistillConfig
from distill.feature_qmimic import Q_BITS
from distill.methods import DEFAULT_F_WEIGHTS, FEATURE_METHODS, FEATURE_TABLE, OUTPUT_MODES, OUTPUT_TABLE
from distill.schedule import SCHEDULES


def add_distill_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the "distillation" argument group to ``parser`` and return it."""
    g = parser.add_argument_group("distillation")
    g.add_argument("--t_weights", default="",
                   help="teacher checkpoint (official YOLOv5 .pt or ours); empty = plain training, no distillation")
    g.add_argument("--t_cfg", default="",
                   help="teacher model yaml: build it, then load --t_weights into it (default: the checkpoint's own)")
    modes = "; ".join(f"{k} = {m.summary}" for k, m in OUTPUT_TABLE.items())
    g.add_argument("--d_output", default=None, choices=OUTPUT_MODES,
                   help=f"output distillation: {modes}. Default objmse when a teacher is given; the student "
                        f"takes the teacher's anchors. If the heads differ in levels/strides it is dropped with "
                        f"a warning when --d_feature is given, an error otherwise or when you ask for it")
    g.add_argument("--d_weight", type=float, default=10.0,
                   help="weight of the objmse/adlik/soft output terms; each is also multiplied by its detection "
                        "gain (box/obj/cls)")
    g.add_argument("--d_temperature", type=float, default=1.0,
                   help="temperature T of the soft-label terms (soft, chen); Chen et al. found T=1 best for detection")
    g.add_argument("--d_mu", type=float, default=0.5,
                   help="chen: μ of L_cls = μ·hard + (1 − μ)·soft (Chen et al. 2017: 0.5); 1 = hard labels only")
    methods = "; ".join(f"{k} = {r.summary}" for k, r in FEATURE_TABLE.items())
    g.add_argument("--d_feature", default="", metavar="METHOD[,METHOD]",
                   help=f"feature distillation on the tensors entering Detect, any of {','.join(FEATURE_METHODS)} "
                        f"({methods})")
    defaults = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_F_WEIGHTS.items())
    g.add_argument("--f_weight", default="",
                   help=f"feature term weight: one float for all --d_feature methods or a comma list in the same "
                        f"order; default per method ({defaults}; calibrated by benchmarks/kd_terms.py)")
    g.add_argument("--d_overhaul_bn", default="running", choices=OVERHAUL_BN,
                   help="overhaul: teacher BN statistics, running (eval mode) or batch (Heo et al.: the batch's "
                        "statistics; the teacher's weights and running buffers are never changed; output-KD "
                        "targets then come from that same forward)")
    g.add_argument("--d_schedule", default=None, choices=SCHEDULES,
                   help="KD strength over epochs: const, or linear/cosine decay towards 0 at the end; default "
                        "cosine because it measured best (docs/RESULTS.md: objmse mAP50-95 0.70 cosine vs 0.62 "
                        "const vs 0.52 alone on the demo study), const for --d_output adlik (as published)")
    g.add_argument("--d_stop_epochs", type=int, default=0,
                   help="switch distillation off for the last N epochs (the student settles on the labels)")
    g.add_argument("--f_stop_epochs", type=int, default=0,
                   help="switch the --d_feature terms off for the last N epochs; output KD goes on with its schedule")
    g.add_argument("--d_warmup_epochs", type=int, default=0,
                   help="ramp distillation up over the first N epochs")
    g.add_argument("--d_margin", type=float, default=0.0,
                   help="chen: margin m of the teacher-bounded regression, in its anchor-relative regression "
                        "space (x/a_w, y/a_h, log w/a_w, log h/a_h), squared")
    g.add_argument("--d_mimic_conf", type=float, default=0.0,
                   help="mimic, qmimic: also imitate cells whose teacher objectness exceeds this "
                        "(0 = ground-truth boxes only)")
    g.add_argument("--q_bits", type=int, default=Q_BITS,
                   help="qmimic: 2^bits levels spanning the teacher's running min..max range (8 = the asymmetric "
                        "uint8 grid of export.py --int8)")
    g.add_argument("--q_step", type=float, default=0.0,
                   help="qmimic: fixed quantisation step β (Wei et al.) instead of one derived from --q_bits (0 = off)")
    g.add_argument("--q_per_channel", action="store_true",
                   help="qmimic: one range/step per channel instead of one per feature map")
    g.add_argument("--q_symmetric", action="store_true",
                   help="qmimic: symmetric range ±max|x| (2^(bits-1)-1 levels a side) instead of min..max")
    g.add_argument("--t_val", action=argparse.BooleanOptionalAction, default=True,
                   help="validate the teacher once before training and log its mAP (--no-t_val to skip)")
    return g


def _float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag} {text!r}: expected a float or a comma-separated list of floats") from None


def config_from_args(args: argparse.Namespace, hyp: Mapping[str, Any]) -> DistillConfig:
    """Translate parsed flags (see :func:`add_distill_args`) into a :class:`DistillConfig`.

    ``hyp``: the training hyp as given to ``DetectionLoss`` (gains already scaled by
    ``scale_hyp``); its ``box``/``obj``/``cls``/``anchor_t`` are used. Without ``--t_weights`` the
    returned config is inactive (``output`` 'none', no features); asking for a distillation
    method without a teacher is an error.
    """
    features = tuple(m.strip().lower() for m in (args.d_feature or "").split(",") if m.strip())
    has_teacher = bool(getattr(args, "t_weights", ""))
    if not has_teacher:
        if features or args.d_output not in (None, "none"):
            asked = f"--d_feature {args.d_feature}" if features else f"--d_output {args.d_output}"
            raise ValueError(f"{asked} needs a teacher: pass --t_weights")
        return DistillConfig(output="none", t_val=False, hyp=dict(hyp))

    weights = _float_list(args.f_weight or "", "--f_weight")
    if weights and not features:
        raise ValueError("--f_weight given without --d_feature")
    f_stop = int(getattr(args, "f_stop_epochs", 0))
    if f_stop and not features:
        raise ValueError("--f_stop_epochs given without --d_feature")
    if f_stop and f_stop >= int(getattr(args, "epochs", f_stop + 1)):
        raise ValueError(f"--f_stop_epochs {f_stop}: the feature terms would never run in --epochs "
                         f"{args.epochs}; use fewer")
    if len(weights) == 1:
        weights = weights * len(features)
    if weights and len(weights) != len(features):
        raise ValueError(f"--f_weight: {len(weights)} values for {len(features)} --d_feature methods; give one value "
                         f"or one per method")
    output = args.d_output or "objmse"
    schedule = getattr(args, "d_schedule", None) or ("const" if output == "adlik" else "cosine")
    return DistillConfig(
        output=output,
        output_explicit=args.d_output is not None,
        d_weight=float(args.d_weight),
        temperature=float(args.d_temperature),
        features=features,
        f_weights=dict(zip(features, weights)),
        schedule=schedule,
        stop_epochs=int(args.d_stop_epochs),
        warmup_epochs=int(getattr(args, "d_warmup_epochs", 0)),
        f_stop_epochs=f_stop,
        hyp=dict(hyp),
        chen_mu=float(getattr(args, "d_mu", 0.5)),
        chen_margin=float(getattr(args, "d_margin", 0.0)),
        overhaul_bn=getattr(args, "d_overhaul_bn", "running"),
        mimic_conf=float(getattr(args, "d_mimic_conf", 0.0)),
        q_bits=int(getattr(args, "q_bits", Q_BITS)),
        q_step=float(getattr(args, "q_step", 0.0)),
        q_per_channel=bool(getattr(args, "q_per_channel", False)),
        q_symmetric=bool(getattr(args, "q_symmetric", False)),
        t_val=bool(args.t_val),
    )


__all__ = ["add_distill_args", "config_from_args"]
