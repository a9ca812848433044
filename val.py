"""Validate a YOLOv5 detector (official checkpoint or ours) on a dataset.

    python val.py --weights runs/train/exp/weights/best.pt --data data/demo.yaml --imgsz 160
    python val.py --weights yolov5s.pt --data data/coco.yaml --save-json --iou-thres 0.65
    python val.py --weights best.int8.onnx --data data/demo.yaml --imgsz 160   # onnxruntime (export.py)

Prints a YOLOv5-style table (per class with --verbose) and per-image speeds, and writes
``metrics.json`` (plus plots, and with --save-json the COCO predictions and pycocotools figures)
into ``runs/val/exp*``. ``run(...)`` does the same from Python and returns the metrics dict.

``.onnx`` weights (fp32 or INT8 files from export.py) run in onnxruntime through models.backends'
``models.backends.OnnxBackend``; everything after the model output (NMS, matching, AP) is the same code. A file
exported with ``--dynamic`` gets the same rectangular batches as a .pt; a fixed-shape file is fed
square letterboxed batches of its own size (rect off, ``--imgsz`` ignored; a non-square fixed size
is refused) and at most its static batch size, which is said on the console.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from engine.cli import require, run_guarded
from engine.evaluate import evaluate, results_table
from models import load_model
from models.hub import find_weights
from utils.dataset import create_dataloader, load_data_config
from utils.files import find_data_yaml, increment_path
from utils.torch_utils import parse_device, select_device

TASKS = ("val", "test", "speed")


class OnnxModel(nn.Module):
    """``evaluate``'s model interface over :class:`models.backends.OnnxBackend`: (B, 3, H, W) float 0-1 →
    decoded (B, N, 5 + nc); attributes ``nc``, ``names``, ``stride``, ``fixed_shape``, ``fixed_batch``."""

    def __init__(self, weights: str | Path, device: torch.device) -> None:
        super().__init__()
        from models.backends import OnnxBackend  # deferred: onnxruntime is optional

        self.backend = OnnxBackend(weights, device)
        self.names = list(self.backend.names)
        self.nc = len(self.names)
        self.stride = torch.tensor([float(self.backend.stride)])
        self.fixed_shape = self.backend.fixed_shape
        self.fixed_batch = self.backend.fixed_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend(x)


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
) -> dict:
    """Evaluate ``weights`` on the ``task`` split of ``data``; returns :func:`engine.evaluate.evaluate`'s
    dict plus ``save_dir``.

    ``task='speed'`` times inference on square batches with deployment thresholds (conf 0.25,
    IoU 0.45) and skips plots and COCO json. ``anno_json`` defaults to the dataset's ``val_json``
    for the val split; otherwise one is generated from the labels. Raises FileNotFoundError /
    ValueError (one line) for missing files or mismatched classes.
    """
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    weights = find_weights(weights)
    data = find_data_yaml(data)
    split = "val" if task == "speed" else task
    cfg = load_data_config(data, require=(split,))
    if not cfg.get(split):
        raise ValueError(f"--data {data} has no '{split}' split")
    names, nc = cfg["names"], cfg["nc"]

    dev = select_device(device, batch_size)
    is_onnx = weights.suffix.lower() == ".onnx"
    model = OnnxModel(weights, dev) if is_onnx else load_model(weights, device=dev)
    if model.nc != nc:
        raise ValueError(f"--weights {weights} predicts {model.nc} classes but --data {data} has {nc}")
    stride = int(model.stride.max())
    gs = max(stride, 32)
    fixed = getattr(model, "fixed_shape", None)
    if fixed:
        if fixed[0] != fixed[1]:
            raise ValueError(f"--weights {weights} has a fixed {fixed[0]}x{fixed[1]} input; validation letterboxes to "
                             f"squares: re-export with one --imgsz or with --dynamic")
        if imgsz != fixed[0]:
            print(f"--weights {weights} has a fixed {fixed[0]}x{fixed[1]} input: using --imgsz {fixed[0]}")
        imgsz = fixed[0]
        print(f"fixed-shape ONNX file: square letterboxed {imgsz}x{imgsz} batches (rect off)")
    fixed_batch = getattr(model, "fixed_batch", None)
    if fixed_batch and batch_size > fixed_batch:
        print(f"--weights {weights} takes batches of {fixed_batch}: using --batch-size {fixed_batch}")
        batch_size = fixed_batch
    if imgsz % gs:
        new = math.ceil(imgsz / gs) * gs
        print(f"--imgsz {imgsz} is not a multiple of the max stride {gs}; using {new}")
        imgsz = new
    # fp16 convolutions are a CUDA feature; an ONNX file carries its own dtype
    half = half and dev.type == "cuda" and not is_onnx
    if half:
        model.half()  # our own copy, so converting it is fine (evaluate never converts a caller's model)

    speed = task == "speed"
    if speed:
        conf_thres, iou_thres, save_json, plots = 0.25, 0.45, False, False
    rect = not speed and not fixed
    loader, _ = create_dataloader(
        cfg[split], imgsz, batch_size, gs, rect=rect, pad=0.5 if rect else 0.0, workers=workers, nc=nc
    )
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)
    if anno_json is None and split == "val":
        anno_json = cfg.get("val_json")

    if dev.type == "cuda" and not is_onnx:  # one warm-up pass so cuDNN autotuning does not land in the timings
        with torch.inference_mode():
            p = next(model.parameters())
            model(torch.zeros(1, 3, imgsz, imgsz, device=dev, dtype=p.dtype))

    results = evaluate(
        model,
        loader,
        names,
        dev,
        conf_thres=conf_thres,
        iou_thres=iou_thres,
        max_det=max_det,
        half=half,
        save_dir=save_dir,
        plots=plots,
        save_json=save_json,
        anno_json=anno_json,
        save_txt=save_txt,
        save_conf=save_conf,
        json_name=f"{weights.stem}_predictions.json",
    )
    results["save_dir"] = save_dir

    print(results_table(results, verbose=verbose))
    sp = results["speed_ms"]
    print(
        f"Speed: {sp['pre']:.1f}ms pre-process, {sp['inf']:.1f}ms inference, {sp['nms']:.1f}ms NMS per image "
        f"at --imgsz {imgsz}, batch {batch_size} on {dev}{' fp16' if half else ''}"
    )
    coco = results["coco"]
    if coco is not None:
        print(coco["summary"])
        print(
            f"COCO (pycocotools): mAP50-95 {coco['map']:.4f}, mAP50 {coco['map50']:.4f} | "
            f"YOLOv5 val.py convention (table above): mAP50-95 {results['map']:.4f}, mAP50 {results['map50']:.4f}"
        )
    metrics = {
        "weights": str(weights),
        "data": str(data),
        "task": task,
        "imgsz": imgsz,
        "conf_thres": conf_thres,
        "iou_thres": iou_thres,
        "images": results["n_images"],
        "instances": results["n_instances"],
        "mAP50": results["map50"],
        "mAP50-95": results["map"],
        "P": results["precision"],
        "R": results["recall"],
        "fitness": results["fitness"],
        "per_class": results["per_class"],
        "pycocotools": None if coco is None else {k: coco[k] for k in ("map", "map50", "stats")},
        "speed_ms": sp,
        "device": str(dev),
        "half": half,
        "backend": "onnxruntime" if is_onnx else "pytorch",
    }
    (save_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"Results saved to {save_dir}")
    return results


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
    p.add_argument("--device", default="", help="cuda device (0 or 0,1) or cpu; default: first GPU if any")
    p.add_argument("--half", action="store_true", help="fp16 inference (CUDA only)")
    p.add_argument("--save-json", action="store_true", help="write COCO predictions json and run pycocotools")
    p.add_argument("--save-txt", action="store_true", help="write detections as YOLO txt labels")
    p.add_argument("--save-conf", action="store_true", help="append confidences to --save-txt labels")
    p.add_argument("--verbose", action="store_true", help="per-class table")
    p.add_argument("--project", default="runs/val")
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of incrementing")
    p.add_argument("--workers", type=int, default=8, help="dataloader workers")
    p.add_argument("--noplots", action="store_true", help="skip plots")
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
    return opt


def main(argv: list[str] | None = None) -> dict:
    """CLI entry: the metrics dict; bad input exits with status 2 and one line on stderr, no traceback."""
    opt = parse_opt(argv)

    def work() -> dict:
        kwargs = vars(check_options(opt))
        kwargs["plots"] = not kwargs.pop("noplots")
        return run(**kwargs)

    status, results = run_guarded("val.py", work)
    if status:
        raise SystemExit(status)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
