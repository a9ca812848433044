"""Command-line flags of the training engine, as YOLOv5 users know them.

`train_distill.py` builds ONE parser from `add_train_args` (this file) and the distillation group
(`distill.cli.add_distill_args`); the parsed namespace is the whole configuration of a run and is
saved in `opt.yaml` and in every checkpoint.
"""

from __future__ import annotations

import argparse

from engine.cli import require

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


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """Add the model/data/training/run/distributed groups to `parser`."""
    g = parser.add_argument_group("model and data")
    g.add_argument("--weights", default="", help="initial weights: official YOLOv5 .pt or ours ('' = from scratch)")
    g.add_argument("--cfg", default="", help="model yaml (e.g. models/yolov5s.yaml); default: the --weights' own")
    g.add_argument("--data", default="data/demo.yaml", help="dataset yaml (path/train/val/names)")
    g.add_argument("--hyp", default="data/hyps/hyp.scratch-low.yaml", help="hyper-parameter yaml")
    g.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train/val image size (pixels)")
    g.add_argument("--single-cls", action="store_true", help="train multi-class data as one class")
    g.add_argument("--rect", action="store_true", help="rectangular training batches (no mosaic)")
    g.add_argument("--cache", nargs="?", const="ram", default=None, choices=["ram"], help="cache images in RAM")
    g.add_argument("--workers", type=int, default=2, help="dataloader workers per process")

    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=100, help="total training epochs")
    g.add_argument("--batch-size", type=int, default=16, help="total batch size across all processes")
    g.add_argument("--nominal-batch", type=int, default=64,
                   help="accumulate gradients to about this many images per optimizer step (YOLOv5: 64); "
                        "smaller values give more steps on small datasets")
    g.add_argument("--optimizer", default="SGD", choices=["SGD", "Adam", "AdamW"], help="optimizer")
    g.add_argument("--cos-lr", action="store_true", help="cosine LR schedule instead of linear")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="class label smoothing epsilon")
    g.add_argument("--patience", type=int, default=100, help="stop after this many epochs without improvement")
    g.add_argument("--freeze", nargs="+", type=int, default=[0], help="freeze the first N layers, or listed indices")
    g.add_argument("--seed", type=int, default=0, help="global seed (data order, augmentation, init)")
    g.add_argument("--device", default="", help="cuda device, e.g. 0 or 0,1, or cpu ('' = auto)")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm under DDP")
    g.add_argument("--noval", action="store_true", help="validate only after the final epoch")
    g.add_argument("--max-nonfinite", type=int, default=20,
                   help="stop the run after this many consecutive steps with a non-finite loss")

    g = parser.add_argument_group("run folder and checkpoints")
    g.add_argument("--project", default="runs/train", help="save to project/name")
    g.add_argument("--name", default="exp", help="save to project/name")
    g.add_argument("--exist-ok", action="store_true", help="reuse an existing project/name instead of incrementing")
    g.add_argument("--resume", nargs="?", const=True, default=False,
                   help="resume from a last.pt (path), or the most recent run when given without a path")
    g.add_argument("--nosave", action="store_true", help="only save the final checkpoint")
    g.add_argument("--save-period", type=int, default=-1, help="also save epochN.pt every N epochs (-1 = off)")
    g.add_argument("--noplots", action="store_true", help="skip plots")
    g.add_argument("--demo", action="store_true",
                   help="distil the demo student from the shipped demo teacher on the generated demo data "
                        "(what running the script without arguments does)")


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
    require(opt.workers >= 0, f"--workers {opt.workers}: must be 0 (load in the main process) or more")
    require(opt.patience >= 0, f"--patience {opt.patience}: must be 0 or more")
    require(opt.max_nonfinite >= 1, f"--max-nonfinite {opt.max_nonfinite}: must be at least 1")
    require(0.0 <= opt.label_smoothing < 1.0, f"--label-smoothing {opt.label_smoothing}: must be in [0, 1)")
    require(all(i >= 0 for i in opt.freeze), f"--freeze {' '.join(map(str, opt.freeze))}: layer numbers are >= 0")
    require(bool(opt.name) and opt.name not in (".", ".."), f"--name {opt.name!r}: give a folder name, e.g. exp")
    parse_device(opt.device)  # raises its own one-line ValueError naming --device
    return opt
