"""Validate a YOLOv5 detector (official checkpoint or ours) on a dataset.

    python val.py --weights runs/train/exp/weights/best.pt --data data/demo.yaml --imgsz 160
    python val.py --weights yolov5s.pt --data data/coco.yaml --save-json --iou-thres 0.65
    python val.py --weights best.int8.onnx --data data/demo.yaml --imgsz 160   # onnxruntime (export.py)

Prints a YOLOv5-style table (per class with --verbose) and per-image speeds, and writes
``metrics.json`` (plus plots, and with --save-json the COCO predictions and pycocotools figures)
into ``runs/val/exp*``. ``run(...)`` does the same from Python and returns the metrics dict.

The work is :func:`engine.validate.validate`; this script parses, calls it and prints.
``.onnx`` weights (fp32 or INT8 files from export.py) run in onnxruntime through
``models.backends.OnnxModel``; everything after the model output (NMS, matching, AP) is the same code.
ONNX files get square letterboxed batches, as YOLOv5's val.py feeds exported models (and so its
figures); ``--rect`` gives a file exported with ``--dynamic`` the .pt's rectangular batches (and the
.pt's figures). A fixed-shape file is fed batches of its own size (``--imgsz`` ignored; a non-square
fixed size is refused) and at most its static batch size, which is said on the console.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine.cli import configure_logging, require, run_guarded
from engine.evaluate import EvalSettings, results_table
from engine.validate import TASKS, validate
from engine.yolov5_flags import Yolov5OnlyFlag, add_yolov5_only_flags, check_yolov5_only_kwargs
from utils.allocator import keep_freed_memory
from utils.torch_utils import parse_device

PER_CLASS_UP_TO = 50  # fewer classes than this: the per-class table is printed without --verbose


def run(
    weights: str | Path,
    data: str | Path,
    imgsz: int = 640,
    batch_size: int = 32,
    conf_thres: float = 0.001,
    iou_thres: float = 0.6,
    max_det: int = 300,
    task: str = "val",
    device: str = "",
    half: bool = False,
    save_json: bool = False,
    save_txt: bool = False,
    save_conf: bool = False,
    verbose: bool = False,
    project: str | Path = "runs/val",
    name: str = "exp",
    exist_ok: bool = False,
    workers: int = 8,
    plots: bool = True,
    anno_json: str | Path | None = None,
    single_cls: bool = False,
    rect: bool = False,
    **yolov5_only: Any,
) -> dict:
    """:func:`engine.validate.validate` with val.py's flags, and its report on the console.
    ``yolov5_only``: YOLOv5's keywords of `YOLOV5_ONLY_FLAGS` (``dnn=True`` ...), warned about or refused."""
    check_yolov5_only_kwargs(yolov5_only, YOLOV5_ONLY_FLAGS, "val.run")
    settings = EvalSettings(conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, half=half, plots=plots,
                            save_json=save_json, anno_json=anno_json, save_txt=save_txt, save_conf=save_conf,
                            single_cls=single_cls)
    results = validate(weights, data, imgsz, batch_size, task, device, settings, project, name, exist_ok, workers,
                       rect)
    nc = len(results["maps"])
    print_report(results, verbose or 1 < nc < PER_CLASS_UP_TO)  # YOLOv5's val.py shows small class lists too
    return results


def print_report(results: dict, verbose: bool = False) -> None:
    """The notes on changed settings, the metrics table, speeds, the COCO figures and where files went."""
    for note in results["notes"]:
        print(note)
    print(results_table(results, verbose=verbose))
    sp = results["speed_ms"]
    print(
        f"Speed: {sp['pre']:.1f}ms pre-process, {sp['inf']:.1f}ms inference, {sp['nms']:.1f}ms NMS per image "
        f"at --imgsz {results['imgsz']}, batch {results['batch_size']} on {results['device']}"
        f"{'' if results['arithmetic'] == 'fp32' else ' ' + results['arithmetic']}"
    )
    coco = results["coco"]
    if coco is not None:
        print(coco["summary"])
        print(
            f"COCO (pycocotools): mAP50-95 {coco['map']:.4f}, mAP50 {coco['map50']:.4f} | "
            f"YOLOv5 val.py convention (table above): mAP50-95 {results['map']:.4f}, mAP50 {results['map50']:.4f}"
        )
    print(f"Results saved to {results['save_dir']}")


YOLOV5_ONLY_FLAGS = [
    Yolov5OnlyFlag(("--augment",), "YOLOv5's test-time augmentation is not part of this tool; validate without it",
                   refused=True),
    Yolov5OnlyFlag(("--save-hybrid",), "YOLOv5's labels-plus-predictions files are not supported; use --save-txt",
                   refused=True),
    Yolov5OnlyFlag(("--dnn",), "YOLOv5's OpenCV DNN runtime; .onnx files run in onnxruntime"),
]


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a YOLOv5 detector (mAP50, mAP50-95, P, R).")
    p.add_argument("--weights", type=str, required=True,
                   help="official YOLOv5 .pt, one of our checkpoints, or an .onnx file from export.py (fp32 or INT8)")
    p.add_argument("--data", type=str, required=True, help="dataset yaml")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--conf-thres", type=float, default=0.001)
    p.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    p.add_argument("--task", default="val", choices=TASKS)
    p.add_argument("--single-cls", action="store_true",
                   help="treat the dataset as one class (every label and prediction is class 0, NMS across classes)")
    p.add_argument("--device", default="", help="cuda device (0 or 0,1) or cpu; default: first GPU if any")
    p.add_argument("--half", action="store_true",
                   help="half-precision inference: fp16 on CUDA, bf16 autocast on a CPU with native bf16 "
                   "(AMX/AVX512-BF16; ~1e-4 mAP from fp32, the default, which gives YOLOv5's figures)")
    p.add_argument("--save-json", action="store_true", help="write COCO predictions json and run pycocotools")
    p.add_argument("--save-txt", action="store_true", help="write detections as YOLO txt labels")
    p.add_argument("--save-conf", action="store_true", help="append confidences to --save-txt labels")
    p.add_argument("--verbose", action="store_true", help="per-class table (shown anyway for 2-49 classes)")
    p.add_argument("--project", default="runs/val")
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of incrementing")
    p.add_argument("--workers", type=int, default=8, help="dataloader workers")
    p.add_argument("--noplots", dest="plots", action="store_false", help="skip plots")
    p.add_argument("--rect", action="store_true",
                   help="a --dynamic .onnx file gets the .pt's rectangular batches (and its figures) instead of "
                   "YOLOv5's square letterboxed ones")
    add_yolov5_only_flags(p, YOLOV5_ONLY_FLAGS)
    return p.parse_args(argv)


def check_options(opt: argparse.Namespace) -> argparse.Namespace:
    """One-line ValueError naming the flag for values no evaluation can use."""
    require(opt.imgsz >= 1, f"--imgsz {opt.imgsz}: give a positive image size in pixels, e.g. 640")
    require(opt.batch_size >= 1, f"--batch-size {opt.batch_size}: must be at least 1")
    require(0.0 <= opt.conf_thres <= 1.0, f"--conf-thres {opt.conf_thres}: a score threshold in [0, 1]")
    require(0.0 <= opt.iou_thres <= 1.0, f"--iou-thres {opt.iou_thres}: an IoU threshold in [0, 1]")
    require(opt.max_det >= 1, f"--max-det {opt.max_det}: must be at least 1")
    require(opt.workers >= 0, f"--workers {opt.workers}: must be 0 or more")
    parse_device(opt.device)
    return opt  # YOLOv5's flags without an effect here are run()'s to check (it takes them from Python too)


def main(argv: list[str] | None = None) -> dict:
    """CLI entry: the metrics dict; bad input exits with status 2 and one line on stderr, no traceback."""
    opt = parse_opt(argv)
    configure_logging()
    keep_freed_memory()

    status, results = run_guarded("val.py", lambda: run(**vars(check_options(opt))))
    if status:
        raise SystemExit(status)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
