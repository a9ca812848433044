"""Train a YOLOv5 student, distilling from a teacher when --t_weights is given.

    python train_distill.py                                  # the offline demo (see README)
    python train_distill.py --weights yolov5s.pt --data VisDrone.yaml            # baseline
    python train_distill.py --t_weights yolov5m.pt --weights yolov5s.pt --data VisDrone.yaml
    torchrun --nproc_per_node 2 train_distill.py ...                             # DDP
"""

from __future__ import annotations

import argparse
import sys

from distill.cli import add_distill_args
from engine.options import DEMO_PRESET, add_train_args, add_yolov5_only_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="YOLOv5 training with knowledge distillation. Without arguments: the offline demo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_train_args(parser)
    add_distill_args(parser)
    add_yolov5_only_args(parser)
    return parser


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; no flags at all (or --demo) means the demo preset, which later flags may override."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or "--demo" in argv:
        argv = DEMO_PRESET + argv
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: the exit status (0; 2 with one line on stderr for bad flags or files; 130 on Ctrl-C)."""
    opt = parse_options(argv)
    from engine.cli import configure_logging, run_guarded
    from engine.trainer import fit  # deferred so that --help answers without importing torch
    from utils.allocator import keep_freed_memory

    configure_logging()
    keep_freed_memory()
    status, _ = run_guarded("train_distill.py", lambda: fit(opt))
    return status


if __name__ == "__main__":
    sys.exit(main())
