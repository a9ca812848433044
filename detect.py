"""Run a detector on images or videos; save annotated copies and YOLO-format label files.

Usage:
    python detect.py --weights best.pt --source data/images            # a folder
    python detect.py --weights best.onnx --source "shots/*.jpg" --save-txt --save-conf
    python detect.py --weights best.pt --source clip.mp4 --conf-thres 0.4

Results go to ``--project/--name`` (runs/detect/exp, exp2, ... unless ``--exist-ok``): one
annotated image per input image, one annotated .mp4 per video, and with ``--save-txt`` a
``labels/<stem>.txt`` per image (``<stem>_<frame>.txt`` per video frame) holding one row
``class xc yc w h [conf]`` per detection, normalised to the original image size.

The work is :func:`engine.predict.predict`; this script parses, calls it and prints.
Pipeline per frame: letterbox → backend (PyTorch or onnxruntime, same interface) → NMS
(score = objectness × class probability) → boxes mapped back to the original pixels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from engine.cli import configure_logging, parser_from_table, require, run_guarded
from engine.predict import Detections, DetectSettings, predict
from engine.yolov5_flags import Yolov5OnlyFlag, add_yolov5_only_flags, check_yolov5_only_kwargs
from utils.allocator import keep_freed_memory
from utils.torch_utils import parse_device


def run(
    weights: str | Path,
    source: str | Path,
    imgsz: int | list[int] | tuple[int, ...] = 640,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    max_det: int = 1000,
    device: str = "",
    view_img: bool = False,
    save_txt: bool = False,
    save_conf: bool = False,
    nosave: bool = False,
    classes: list[int] | None = None,
    project: str | Path = "runs/detect",
    name: str = "exp",
    exist_ok: bool = False,
    line_width: int | None = None,
    half: bool = False,
    verbose: bool = True,
    agnostic_nms: bool = False,
    hide_labels: bool = False,
    hide_conf: bool = False,
    save_crop: bool = False,
    vid_stride: int = 1,
    **yolov5_only: Any,
) -> Detections:
    """:func:`engine.predict.predict` with detect.py's flags; prints a line per frame and the speeds.
    ``yolov5_only``: YOLOv5's keywords of `YOLOV5_ONLY_FLAGS` (``dnn=True`` ...), warned about or refused."""
    check_yolov5_only_kwargs(yolov5_only, YOLOV5_ONLY_FLAGS, "detect.run")
    settings = DetectSettings(conf_thres, iou_thres, max_det, classes, view_img, save_txt, save_conf, nosave,
                              line_width, agnostic_nms, hide_labels, hide_conf, save_crop, vid_stride)
    out = predict(weights, source, imgsz, device, half, settings, project, name, exist_ok,
                  report=print if verbose else None)
    if verbose:
        n = len(out.results)
        print("speed per image: " + ", ".join(f"{t / n * 1e3:.1f}ms {stage}" for stage, t in out.seconds.items()))
        print(f"results saved to {out.save_dir}")
    return out


_SWITCH = {"action": "store_true"}

# Command-line flags in YOLOv5's spelling, grouped for --help: (names, help, argparse options).
# `run` takes the same names as keywords, so `run(**vars(parse_opt()))` is the whole CLI.
CLI_FLAGS: dict[str, list[tuple[str | tuple[str, ...], str, dict]]] = {
    "model and input": [
        ("--weights", ".pt checkpoint or .onnx file from export.py", {"required": True}),
        ("--source", "image, folder, glob pattern or video", {"required": True}),
        (("--imgsz", "--img", "--img-size"), "h w, or one size", {"nargs": "+", "type": int, "default": [640]}),
        ("--device", "cpu, or a CUDA index such as 0 (default: CUDA if available)", {"default": ""}),
        ("--half", "fp16 PyTorch inference (CUDA only)", _SWITCH),
        ("--vid-stride", "read every N-th frame of a video", {"type": int, "default": 1}),
    ],
    "which detections": [
        ("--conf-thres", "score threshold (objectness × class)", {"type": float, "default": 0.25}),
        ("--iou-thres", "NMS IoU threshold", {"type": float, "default": 0.45}),
        ("--max-det", "most detections per image", {"type": int, "default": 1000}),
        ("--classes", "keep only these class ids", {"nargs": "+", "type": int}),
        ("--agnostic-nms", "class-agnostic NMS: boxes of different classes suppress each other",
         {"action": "store_true"}),
    ],
    "output": [
        ("--project", "results go to project/name", {"default": "runs/detect"}),
        ("--name", "results go to project/name", {"default": "exp"}),
        ("--exist-ok", "reuse project/name instead of incrementing it", _SWITCH),
        ("--nosave", "do not save annotated images/videos", _SWITCH),
        ("--save-txt", "save YOLO-format labels to labels/*.txt", _SWITCH),
        ("--save-conf", "append the score to each --save-txt row", _SWITCH),
        ("--save-crop", "save each detection's crop to crops/<class name>/<stem>.jpg", _SWITCH),
        (("--line-width", "--line-thickness"), "box line width in pixels (default: by picture size)", {"type": int}),
        ("--hide-labels", "draw boxes without name tags", _SWITCH),
        ("--hide-conf", "name tags without the score", _SWITCH),
        ("--view-img", "show results in a window", _SWITCH),
    ],
}


YOLOV5_ONLY_FLAGS = [
    Yolov5OnlyFlag(("--data",), "YOLOv5 reads class names from it for some runtimes; ours come from the weights",
                   {"default": None}),
    Yolov5OnlyFlag(("--dnn",), "YOLOv5's OpenCV DNN runtime; .onnx files run in onnxruntime"),
    Yolov5OnlyFlag(("--update",), "YOLOv5's stripping of optimizer state from its model files"),
    Yolov5OnlyFlag(("--augment",), "YOLOv5's test-time augmentation is not part of this tool; detect without it",
                   refused=True),
    Yolov5OnlyFlag(("--visualize",), "YOLOv5's feature-map dumps are not part of this tool (analyze_kd.py "
                   "draws per-image entropy maps)", refused=True),
]


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the `CLI_FLAGS` command line (and YOLOv5's flags that do nothing here)."""
    parser = parser_from_table("Detect objects in images and videos", CLI_FLAGS)
    add_yolov5_only_flags(parser, YOLOV5_ONLY_FLAGS)
    return parser.parse_args(argv)


def check_options(opt: argparse.Namespace) -> argparse.Namespace:
    """One-line ValueError naming the flag for values no detection run can use."""
    require(all(s >= 1 for s in opt.imgsz), f"--imgsz {' '.join(map(str, opt.imgsz))}: sizes must be positive")
    require(0.0 <= opt.conf_thres <= 1.0, f"--conf-thres {opt.conf_thres}: a score threshold in [0, 1]")
    require(0.0 <= opt.iou_thres <= 1.0, f"--iou-thres {opt.iou_thres}: an IoU threshold in [0, 1]")
    require(opt.max_det >= 1, f"--max-det {opt.max_det}: must be at least 1")
    require(opt.line_width is None or opt.line_width >= 1, f"--line-width {opt.line_width}: must be at least 1")
    require(opt.vid_stride >= 1, f"--vid-stride {opt.vid_stride}: must be at least 1")
    parse_device(opt.device)
    return opt  # YOLOv5's flags without an effect here are run()'s to check (it takes them from Python too)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: returns the exit status (0 ok, 2 with a one-line message on bad input, 130 on Ctrl-C)."""
    opt = parse_opt(argv)
    configure_logging()
    keep_freed_memory()
    status, _ = run_guarded("detect.py", lambda: run(**vars(check_options(opt))), extra_errors=(ImportError,))
    return status


if __name__ == "__main__":
    sys.exit(main())
