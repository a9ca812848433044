"""Export a trained detector to ONNX or to YOLOv5's own .pt format, and check the file.

The work is :mod:`engine.export`; this script parses the flags and calls it.

Usage:
    python export.py --weights runs/train/exp/weights/best.pt --include onnx --imgsz 640
    python export.py --weights best.pt --include yolov5              # best_yolov5.pt for YOLOv5's tools
    python export.py --weights best.pt --dynamic --simplify          # dynamic batch, height, width
    python export.py --weights best.pt --half --device 0             # fp16 file (CUDA only)
    python export.py --weights best.pt --int8 --data data/VisDrone.yaml  # + best.int8.onnx (static INT8)

The exported graph is the model in eval mode with Conv+BN fused, input ``images`` (bs, 3, H, W)
RGB 0-1 and a single output ``output0`` (bs, N, 5 + nc): N = Σ_levels na·(H/s)·(W/s) rows of
``xc, yc, w, h`` (pixels of the input), objectness and per-class scores, all after sigmoid, i.e. the
decoded tensor YOLOv5's ONNX files carry (NMS is left to the caller). ``stride`` and ``names``
are stored as JSON strings in the file's ``metadata_props`` (also readable with
``ast.literal_eval``), with ``imgsz``, ``nc``, ``dynamic`` and ``format``.

``--include yolov5`` writes ``<name>_yolov5.pt`` beside the weights (or ``--output``): the model as
an official YOLOv5 v7.0 release checkpoint (pickled ``models.yolo.DetectionModel`` tree in fp16,
epoch -1; :mod:`models.yolov5_format`), which YOLOv5's detect.py, val.py, export.py (TensorRT,
CoreML, TFLite, OpenVINO, ...) and ``torch.hub.load(..., 'custom', path=...)`` load as one of
theirs. It is read back through our restricted unpickler and compared with the source model on
one image (fp16 rounding: held to the fp16 tolerance).

After writing, the ONNX file is run in onnxruntime on one letterboxed image (``--check-image``, or a
generated test picture) and compared with the PyTorch model; see :func:`parity`.

``--int8`` then quantises the fp32 file to ``<name>.int8.onnx`` (onnxruntime static QDQ INT8,
calibrated on ``--calib-images`` letterboxed images of ``--data``'s ``--calib-split``; the decode
stays float — :mod:`utils.onnx_int8` says what is quantised and why) and prints both files' sizes,
their single-thread onnxruntime latency at batch 1 (median of 20 runs) and how far the INT8
outputs are from the fp32 ones on the check image (informational: INT8 is not held to ``tol``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.cli import configure_logging, parser_from_table, require, run_guarded
from engine.export import (
    DEFAULT_OPSET,
    TOL_FP16,
    TOL_FP32,
    check_imgsz,
    export_weights,
    export_yolov5,
    parity,
    preprocess,
    synthetic_image,
)
from engine.yolov5_flags import Yolov5OnlyFlag, add_yolov5_only_flags, check_yolov5_only_flags
from utils.torch_utils import parse_device

# The library functions scripts and tests use through this module's name.
__all__ = ["TOL_FP16", "TOL_FP32", "check_imgsz", "export_yolov5", "main", "parity", "preprocess", "run",
           "synthetic_image"]

run = export_weights  # export.run(...) from Python: the same function the CLI calls

_SWITCH = {"action": "store_true"}

# Command-line flags in YOLOv5's spelling, grouped for --help: (names, help, argparse options).
CLI_FLAGS: dict[str, list[tuple[str | tuple[str, ...], str, dict]]] = {
    "model": [
        ("--weights", "checkpoint (.pt, ours or official YOLOv5)", {"required": True}),
        ("--device", "cpu, or a CUDA index such as 0", {"default": "cpu"}),
        ("--half", "fp16 export (needs a CUDA device)", _SWITCH),
    ],
    "exported file": [
        ("--include", "formats to export: onnx, yolov5 (YOLOv5's own .pt, for its tools)",
         {"nargs": "+", "default": ["onnx"]}),
        ("--output", "output file (default: weights with .onnx, or <name>_yolov5.pt)", {}),
        (("--imgsz", "--img", "--img-size"), "h w, or one size", {"nargs": "+", "type": int, "default": [640]}),
        ("--batch-size", "batch size of the exported input", {"type": int, "default": 1}),
        ("--dynamic", "dynamic batch, height and width axes", _SWITCH),
        ("--opset", "ONNX opset version", {"type": int, "default": DEFAULT_OPSET}),
        ("--simplify", "simplify with onnxslim / onnxsim when installed", _SWITCH),
        ("--check-image", "image for the parity check (default: generated)", {}),
    ],
    "INT8": [
        ("--int8", "also write <name>.int8.onnx (static INT8, needs --data)", _SWITCH),
        ("--data", "dataset yaml whose images calibrate --int8", {}),
        ("--calib-images", "number of --int8 calibration images", {"type": int, "default": 64}),
        ("--calib-split", "split the calibration images come from (train: keeps them apart from the val mAP)",
         {"default": "train", "choices": ("train", "val")}),
    ],
}


_TF_ONLY = "an option of YOLOv5's TensorFlow/TensorRT/CoreML exports; ONNX files are written without it"
YOLOV5_ONLY_FLAGS = [
    Yolov5OnlyFlag(("--inplace",), "YOLOv5's in-place Detect decode; the exported decode gives the same numbers"),
    Yolov5OnlyFlag(("--keras",), _TF_ONLY),
    Yolov5OnlyFlag(("--optimize",), "YOLOv5's TorchScript mobile optimisation (no TorchScript export here)"),
    Yolov5OnlyFlag(("--verbose",), "YOLOv5's TensorRT log level"),
    Yolov5OnlyFlag(("--workspace",), "YOLOv5's TensorRT workspace size", {"type": int, "default": 4}),
    Yolov5OnlyFlag(("--nms",), _TF_ONLY + " (run NMS after onnxruntime, as val.py and detect.py do)"),
    Yolov5OnlyFlag(("--agnostic-nms",), _TF_ONLY),
    Yolov5OnlyFlag(("--topk-per-class",), _TF_ONLY, {"type": int, "default": 100}),
    Yolov5OnlyFlag(("--topk-all",), _TF_ONLY, {"type": int, "default": 100}),
    Yolov5OnlyFlag(("--iou-thres",), _TF_ONLY, {"type": float, "default": 0.45}),
    Yolov5OnlyFlag(("--conf-thres",), _TF_ONLY, {"type": float, "default": 0.25}),
]


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the `CLI_FLAGS` command line (and YOLOv5's flags that do nothing here)."""
    parser = parser_from_table("Export a YOLOv5 detector to ONNX and check it in onnxruntime", CLI_FLAGS)
    add_yolov5_only_flags(parser, YOLOV5_ONLY_FLAGS)
    return parser.parse_args(argv)


def check_options(opt: argparse.Namespace) -> argparse.Namespace:
    """One-line ValueError naming the flag for values no export can use."""
    require(all(s >= 1 for s in opt.imgsz), f"--imgsz {' '.join(map(str, opt.imgsz))}: sizes must be positive")
    require(opt.batch_size >= 1, f"--batch-size {opt.batch_size}: must be at least 1")
    require(opt.calib_images >= 1, f"--calib-images {opt.calib_images}: must be at least 1")
    parse_device(opt.device)
    check_yolov5_only_flags(opt, YOLOV5_ONLY_FLAGS)
    return opt


def main(argv: list[str] | None = None) -> int:
    """CLI entry: returns the exit status (0 ok, 2 on an error, with a one-line message, 130 on Ctrl-C)."""
    opt = parse_opt(argv)
    configure_logging()
    status, _ = run_guarded("export.py", lambda: _run_from(check_options(opt)),
                            extra_errors=(ImportError, RuntimeError))
    return status


def _run_from(opt: argparse.Namespace) -> tuple[Path, float]:
    return run(opt.weights, imgsz=opt.imgsz, batch_size=opt.batch_size, include=opt.include, dynamic=opt.dynamic,
               half=opt.half, opset=opt.opset, simplify=opt.simplify, device=opt.device, output=opt.output,
               check_image=opt.check_image, int8=opt.int8, data=opt.data, calib_images=opt.calib_images,
               calib_split=opt.calib_split)


if __name__ == "__main__":
    sys.exit(main())
