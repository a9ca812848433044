"""Command-line flags of the training engine, as YOLOv5 users know them.

`train_distill.py` builds ONE parser from `add_train_args` (this file) and the distillation group
(`distill.cli.add_distill_args`); the parsed namespace is the whole configuration of a run and is
saved in `opt.yaml` and in every checkpoint.
"""

from __future__ import annotations

import argparse

from engine.cli import require
from engine.yolov5_flags import Yolov5OnlyFlag, add_yolov5_only_flags, check_yolov5_only_flags

DEMO_PRESET = [
    "--data", "data/demo.yaml",
    "--cfg", "models/yolov5p.yaml",
    "--t_weights", "weights/demo_teacher.pt",
    "--imgsz", "160",
    "--epochs", "20",
    "--batch-size", "16",
    "--nominal-batch", "16",
    "--name", "demo",
]  # fmt: skip


_SWITCH = {"action": "store_true"}
_INT = {"type": int}


def count_or_auto(value: str) -> int | str:
    """``--workers``: a number of loader workers, or ``auto`` (`utils.dataset.default_workers`)."""
    return value if value == "auto" else int(value)


# The flags, grouped for --help: (names, help, argparse options). YOLOv5's spellings and defaults,
# except where the help says otherwise.
TRAIN_FLAGS: dict[str, list[tuple[str | tuple[str, ...], str, dict]]] = {
    "model and data": [
        ("--weights", "initial weights: official YOLOv5 .pt or ours ('' = from scratch)", {"default": ""}),
        ("--cfg", "model yaml (e.g. models/yolov5s.yaml); default: the --weights' own", {"default": ""}),
        ("--data", "dataset yaml (path/train/val/names)", {"default": "data/demo.yaml"}),
        ("--hyp", "hyper-parameter yaml", {"default": "data/hyps/hyp.scratch-low.yaml"}),
        (("--imgsz", "--img", "--img-size"), "train/val image size (pixels)", {**_INT, "default": 640}),
        ("--single-cls", "train multi-class data as one class", _SWITCH),
        ("--rect", "rectangular training batches (no mosaic)", _SWITCH),
        ("--image-weights", "draw each epoch's training images with replacement, favouring rare classes and "
                            "classes with a low mAP at the last validation (one process, not with --rect)", _SWITCH),
        ("--multi-scale", "train each batch at a random size in [0.5, 1.5] × --imgsz (multiples of the max "
                          "stride; validation stays at --imgsz)", _SWITCH),
        ("--cache", "image cache: ram (as --cache alone), none, or auto (default: ram when the resized images "
                    "take at most 1/8 of the available memory; the same batches, decoded once)",
         {"nargs": "?", "const": "ram", "default": "auto", "choices": ["ram", "auto", "none"]}),
        ("--workers", "dataloader workers per process; auto: 0 when training on a CPU of at most 4 cores per "
                      "process (the model's threads already keep them busy), else 2",
         {"type": count_or_auto, "default": "auto"}),
    ],
    "training": [
        ("--epochs", "total training epochs", {**_INT, "default": 100}),
        ("--batch-size", "total batch size across all processes", {**_INT, "default": 16}),
        ("--nominal-batch", "accumulate gradients to about this many images per optimizer step (YOLOv5: 64); "
                            "smaller values give more steps on small datasets", {**_INT, "default": 64}),
        ("--optimizer", "optimizer", {"default": "SGD", "choices": ["SGD", "Adam", "AdamW"]}),
        ("--cos-lr", "cosine LR schedule instead of linear", _SWITCH),
        ("--label-smoothing", "class label smoothing epsilon", {"type": float, "default": 0.0}),
        ("--patience", "stop after this many epochs without improvement (0: never stop early)",
         {**_INT, "default": 100}),
        ("--freeze", "freeze the first N layers, or listed indices", {**_INT, "nargs": "+", "default": [0]}),
        ("--seed", "global seed (data order, augmentation, init)", {**_INT, "default": 0}),
        ("--deterministic", "deterministic kernels only (torch, cuDNN, cuBLAS): the same seed gives the same "
                            "weights on CUDA too; ~15 %% slower steps on a small CPU",
         _SWITCH),
        ("--device", "cuda device, e.g. 0 or 0,1, or cpu ('' = auto)", {"default": ""}),
        ("--sync-bn", "SyncBatchNorm under DDP", _SWITCH),
        ("--noamp", "no mixed precision: fp32 everywhere (default: fp16 autocast + GradScaler on CUDA, bf16 "
                    "autocast on CPUs with native bf16; see README 'Mixed precision')", _SWITCH),
        ("--noval", "validate only after the final epoch", _SWITCH),
        ("--noautoanchor", "keep the model's anchors (no AutoAnchor check/search; placeholder 'anchors: N' are "
                           "still fitted; with output distillation the student takes the teacher's anchors anyway)",
         _SWITCH),
        ("--max-nonfinite", "stop the run after this many consecutive steps with a non-finite loss",
         {**_INT, "default": 20}),
    ],
    "run folder and checkpoints": [
        ("--project", "save to project/name", {"default": "runs/train"}),
        ("--name", "save to project/name", {"default": "exp"}),
        ("--exist-ok", "reuse project/name instead of numbering a new one (an earlier run's files there are "
                       "moved into prev-<time>/)", _SWITCH),
        ("--resume", "resume from a run's weights/last.pt (in its own run folder), or the most recent run when "
                     "given without a path", {"nargs": "?", "const": True, "default": False}),
        ("--nosave", "only save the final last.pt (no best.pt, as in YOLOv5)", _SWITCH),
        ("--save-period", "also save epochN.pt after epochs 0, N, 2N... (0-based, YOLOv5's names; -1 = off)",
         {**_INT, "default": -1}),
        ("--noplots", "skip plots", _SWITCH),
        ("--demo", "distil the demo student from the shipped demo teacher on the generated demo data "
                   "(what running the script without arguments does)", _SWITCH),
    ],
}

# YOLOv5's train.py flags without an effect here (`engine.yolov5_flags`); added after the distillation flags.
YOLOV5_ONLY_FLAGS = [
    Yolov5OnlyFlag(("--local_rank", "--local-rank"), "set by the legacy torch.distributed.launch; the LOCAL_RANK "
                   "environment variable (torchrun sets it) is what counts", {**_INT, "default": -1}, quiet=True),
    Yolov5OnlyFlag(("--entity",), "YOLOv5's W&B entity (no remote loggers; results stay in the run folder)",
                   {"default": None}),
    Yolov5OnlyFlag(("--upload_dataset",), "YOLOv5's W&B dataset upload", {"nargs": "?", "const": True,
                                                                          "default": False}),
    Yolov5OnlyFlag(("--bbox_interval",), "YOLOv5's W&B image-logging interval", {**_INT, "default": -1}),
    Yolov5OnlyFlag(("--artifact_alias",), "YOLOv5's W&B artifact version", {"default": "latest"}),
    Yolov5OnlyFlag(("--bucket",), "YOLOv5's cloud bucket for --evolve", {"default": ""}),
    Yolov5OnlyFlag(("--evolve",), "YOLOv5's hyper-parameter evolution is not part of this tool; train with a --hyp "
                   "yaml (data/hyps/) per setting instead", {**_INT, "nargs": "?", "const": 300, "default": None},
                   refused=True),
    Yolov5OnlyFlag(("--quad",), "YOLOv5's four-image collate is not supported; leave it out", refused=True),
]


def add_yolov5_only_args(parser: argparse.ArgumentParser) -> None:
    """Add `YOLOV5_ONLY_FLAGS` as the parser's last group."""
    add_yolov5_only_flags(parser, YOLOV5_ONLY_FLAGS)


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Add the `TRAIN_FLAGS` groups to `parser`."""
    for title, flags in TRAIN_FLAGS.items():
        group = parser.add_argument_group(title)
        for names, text, options in flags:
            group.add_argument(*((names,) if isinstance(names, str) else names), help=text, **options)


def check_options(opt: argparse.Namespace) -> argparse.Namespace:
    """Reject flag values no run can use, each with a one-line ValueError naming the flag.

    Called once at the start of `engine.trainer.fit`, before anything is built or written. Files
    named by flags are checked where they are read (they may be official names fetched on demand).
    """
    from utils.torch_utils import parse_device  # deferred: this module must import without torch

    require(opt.epochs >= 1, f"--epochs {opt.epochs}: train at least 1 epoch")
    require(opt.batch_size >= 1, f"--batch-size {opt.batch_size}: must be at least 1")
    require(opt.nominal_batch >= 1, f"--nominal-batch {opt.nominal_batch}: must be at least 1 (YOLOv5: 64)")
    require(opt.imgsz >= 1, f"--imgsz {opt.imgsz}: give a positive image size in pixels, e.g. 640")
    require(opt.workers == "auto" or opt.workers >= 0,
            f"--workers {opt.workers}: must be 0 (load in the main process) or more, or auto")
    require(opt.patience >= 0, f"--patience {opt.patience}: must be 0 or more")
    require(opt.max_nonfinite >= 1, f"--max-nonfinite {opt.max_nonfinite}: must be at least 1")
    require(0.0 <= opt.label_smoothing < 1.0, f"--label-smoothing {opt.label_smoothing}: must be in [0, 1)")
    require(all(i >= 0 for i in opt.freeze), f"--freeze {' '.join(map(str, opt.freeze))}: layer numbers are >= 0")
    require(bool(opt.name) and opt.name not in (".", ".."), f"--name {opt.name!r}: give a folder name, e.g. exp")
    parse_device(opt.device)  # raises its own one-line ValueError naming --device
    check_yolov5_only_flags(opt, YOLOV5_ONLY_FLAGS)
    return opt
