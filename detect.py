"""Run a detector on images or videos; save annotated copies and YOLO-format label files.

Usage:
    python detect.py --weights best.pt --source data/images            # a folder
    python detect.py --weights best.onnx --source "shots/*.jpg" --save-txt --save-conf
    python detect.py --weights best.pt --source clip.mp4 --conf-thres 0.4

Results go to ``--project/--name`` (runs/detect/exp, exp2, ... unless ``--exist-ok``): one
annotated image per input image, one annotated .mp4 per video, and with ``--save-txt`` a
``labels/<stem>.txt`` per image (``<stem>_<frame>.txt`` per video frame) holding one row
``class xc yc w h [conf]`` per detection, normalised to the original image size.

Pipeline per frame: letterbox → backend (PyTorch or onnxruntime, same interface) → NMS
(score = objectness × class probability) → boxes mapped back to the original pixels.
"""

from __future__ import annotations

import argparse
import glob
import math
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from engine.cli import require, run_guarded
from models.backends import load_backend
from utils.augment import letterbox
from utils.boxes import non_max_suppression, scale_boxes, xyxy2xywhn
from utils.files import increment_path
from utils.plots import class_color
from utils.torch_utils import parse_device, select_device

IMG_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff", ".webp"}
VID_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".wmv", ".mpg", ".mpeg"}


# -------------------------------------------------------------------------------------- sources


def list_sources(source: str | Path) -> list[Path]:
    """Image/video files named by ``source``: one file, a folder (sorted, not recursive) or a glob."""
    s = str(source)
    p = Path(s)
    if any(c in s for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(s, recursive=True))
    elif p.is_dir():
        files = sorted(p.iterdir())
    elif p.is_file():
        files = [p]
    else:
        raise FileNotFoundError(f"--source {s}: no such file, folder or glob match")
    media = [f for f in files if f.is_file() and f.suffix.lower() in IMG_SUFFIXES | VID_SUFFIXES]
    if not media:
        raise FileNotFoundError(
            f"--source {s}: no images ({', '.join(sorted(IMG_SUFFIXES))}) or videos "
            f"({', '.join(sorted(VID_SUFFIXES))}) found"
        )
    return media


@dataclass
class Frame:
    """One picture to process: ``image`` BGR uint8 (h, w, 3); ``frame`` index for videos, else None."""

    path: Path
    image: np.ndarray
    frame: int | None = None
    n_frames: int = 0
    fps: float = 30.0


def _skip(path: Path, why: str) -> None:
    """One warning for a source file that cannot be read; the rest of the source is still processed."""
    print(f"detect.py: warning: skipped {path}: {why}", file=sys.stderr)


def iter_frames(files: list[Path]) -> Iterator[Frame]:
    """Yield every image, and every frame of every video, in order; unreadable files are skipped
    with one warning each."""
    for f in files:
        if f.suffix.lower() in IMG_SUFFIXES:
            im = cv2.imread(str(f))
            if im is None:
                _skip(f, "cannot decode the image (corrupt, truncated or unsupported)")
                continue
            yield Frame(f, im)
            continue
        cap = cv2.VideoCapture(str(f))
        if not cap.isOpened():
            cap.release()
            _skip(f, "cannot open the video")
            continue
        n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        fps = cap.get(cv2.CAP_PROP_FPS) or 30.0
        try:
            i = 0
            while True:
                ok, im = cap.read()
                if not ok:
                    break
                yield Frame(f, im, i, n, fps)
                i += 1
        finally:
            cap.release()


# ------------------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class BoxStyle:
    """Stroke and font sizes for annotating one picture.

    The stroke grows with the picture's diagonal, about one pixel per 450 (2 px at 640×640,
    5 px at 1920×1080); ``line_width`` (--line-width) overrides it. The label text scales with it.
    """

    stroke: int
    font_scale: float
    font_stroke: int

    @classmethod
    def for_shape(cls, shape: tuple[int, ...], line_width: int | None = None) -> BoxStyle:
        stroke = line_width or max(1, round(math.hypot(shape[0], shape[1]) / 450))
        return cls(stroke, 0.3 * stroke + 0.2, max(1, stroke // 2))


def _ink_for(fill: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black text on light fills, white on dark ones (BGR; Rec. 601 luma)."""
    b, g, r = fill
    return (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 150 else (255, 255, 255)


def _draw_tagged_box(im: np.ndarray, box: tuple[int, int, int, int], text: str, color: tuple[int, int, int],
                     style: BoxStyle) -> None:
    """One rectangle plus a filled name tag resting on its top edge, moved inside the picture when the
    tag would stick out of it (boxes touching the top or right border)."""
    x1, y1, x2, y2 = box
    cv2.rectangle(im, (x1, y1), (x2, y2), color, style.stroke, cv2.LINE_AA)
    font = cv2.FONT_HERSHEY_SIMPLEX
    (tw, th), base = cv2.getTextSize(text, font, style.font_scale, style.font_stroke)
    pad = style.font_stroke
    tag_w, tag_h = tw + 2 * pad, th + base + 2 * pad
    left = int(np.clip(x1, 0, max(im.shape[1] - tag_w, 0)))
    top = int(np.clip(y1 - tag_h, 0, max(im.shape[0] - tag_h, 0)))
    cv2.rectangle(im, (left, top), (left + tag_w, top + tag_h), color, cv2.FILLED)
    cv2.putText(im, text, (left + pad, top + pad + th), font, style.font_scale, _ink_for(color), style.font_stroke,
                cv2.LINE_AA)


def draw_detections(im: np.ndarray, det: np.ndarray, names: list[str], line_width: int | None = None) -> np.ndarray:
    """Draw (n, 6) ``x1 y1 x2 y2 conf cls`` boxes with ``name conf`` tags onto ``im`` (in place), one
    colour per class (:func:`utils.plots.class_color`, the palette of the validation plots)."""
    style = BoxStyle.for_shape(im.shape, line_width)
    for *xyxy, conf, cls in det.tolist():
        c = int(cls)
        text = f"{names[c] if 0 <= c < len(names) else c} {conf:.2f}"
        _draw_tagged_box(im, tuple(int(v) for v in xyxy), text, class_color(c, bgr=True), style)
    return im


def label_lines(det: np.ndarray, shape: tuple[int, int], save_conf: bool = False) -> list[str]:
    """YOLO label rows ``class xc yc w h [conf]`` (normalised by ``shape`` = (h, w)) for (n, 6) boxes."""
    h, w = shape
    xywhn = xyxy2xywhn(det[:, :4].astype(np.float64), w, h)
    rows = []
    for (xc, yc, bw, bh), conf, cls in zip(xywhn, det[:, 4], det[:, 5]):
        row = f"{int(cls)} {xc:.6f} {yc:.6f} {bw:.6f} {bh:.6f}"
        rows.append(f"{row} {conf:.6f}" if save_conf else row)
    return rows


# ----------------------------------------------------------------------------------------- run


@dataclass
class Detections:
    """What :func:`run` found: ``save_dir`` and, per frame, (path, frame index or None, (n, 6)
    ``x1 y1 x2 y2 conf cls`` in original-image pixels)."""

    save_dir: Path
    results: list[tuple[Path, int | None, np.ndarray]] = field(default_factory=list)


def _imgsz(imgsz: int | list[int] | tuple[int, ...], stride: int) -> tuple[int, int]:
    sizes = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    sizes = sizes * 2 if len(sizes) == 1 else sizes
    if len(sizes) != 2 or min(sizes) <= 0:
        raise ValueError(f"--imgsz {imgsz}: give one size or two (height width), positive")
    return tuple(-(-int(s) // stride) * stride for s in sizes)  # round up to a stride multiple


class StageClock:
    """Wall time per named pipeline stage: ``last`` (the latest pass) and ``total`` (all passes)."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.total: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.last[stage] = time.perf_counter() - start
            self.total[stage] += self.last[stage]


def _to_input(image: np.ndarray, shape: tuple[int, int], auto: bool, stride: int):
    """Letterboxed model input for a BGR uint8 (h0, w0, 3) picture.

    Returns the (1, 3, h, w) RGB float tensor in 0-1, the letterboxed (h, w), and ``((rh, rw),
    (padw, padh))``, what `scale_boxes` needs to map boxes back to the picture.
    """
    boxed, (rw, rh), pad = letterbox(image, shape, auto=auto, stride=stride)
    rgb_chw = torch.from_numpy(boxed).flip(-1).permute(2, 0, 1)
    return rgb_chw.float().div(255).unsqueeze(0).contiguous(), boxed.shape[:2], ((rh, rw), pad)


def _to_original_pixels(det: torch.Tensor, letterboxed: tuple[int, int], original: tuple[int, int],
                        ratio_pad: tuple) -> np.ndarray:
    """(n, 6) ``x1 y1 x2 y2 conf cls`` from letterboxed to original-picture pixels, as numpy."""
    det = det.clone()
    det[:, :4] = scale_boxes(letterboxed, det[:, :4], original, ratio_pad=ratio_pad)
    return det.cpu().numpy()


def _frame_report(fr: Frame, letterboxed: tuple[int, int], det: np.ndarray, names: list[str], seconds: float) -> str:
    """``path [frame i/n] HxW: 2 car, 1 person, 3.1ms`` for the console."""
    classes, counts = np.unique(det[:, 5].astype(int), return_counts=True)
    found = ", ".join(f"{n} {names[c]}" for c, n in zip(classes, counts)) or "no detections"
    where = "" if fr.frame is None else f" frame {fr.frame + 1}/{fr.n_frames}"
    return f"{fr.path}{where} {letterboxed[0]}x{letterboxed[1]}: {found}, {seconds * 1e3:.1f}ms"


class _Outputs:
    """Writes what a run keeps: annotated pictures, one .mp4 per video, YOLO label files."""

    def __init__(self, save_dir: Path, save_txt: bool, save_conf: bool) -> None:
        self.save_dir, self.save_conf = save_dir, save_conf
        self.videos: dict[Path, cv2.VideoWriter] = {}
        if save_txt:
            (save_dir / "labels").mkdir(exist_ok=True)

    def labels(self, fr: Frame, det: np.ndarray) -> None:
        """``labels/<stem>.txt`` (``<stem>_<frame>.txt`` for a video frame); none without detections."""
        if len(det):
            stem = fr.path.stem if fr.frame is None else f"{fr.path.stem}_{fr.frame}"
            rows = label_lines(det, fr.image.shape[:2], self.save_conf)
            (self.save_dir / "labels" / f"{stem}.txt").write_text("\n".join(rows) + "\n")

    def picture(self, fr: Frame, annotated: np.ndarray) -> None:
        if fr.frame is None:
            cv2.imwrite(str(self.save_dir / fr.path.name), annotated)
            return
        writer = self.videos.get(fr.path)
        if writer is None:
            size = (annotated.shape[1], annotated.shape[0])
            writer = cv2.VideoWriter(str(self.save_dir / f"{fr.path.stem}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"),
                                     fr.fps, size)
            self.videos[fr.path] = writer
        writer.write(annotated)

    def close(self) -> None:
        for writer in self.videos.values():
            writer.release()


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
) -> Detections:
    """Detect objects in ``source`` with ``weights`` (.pt or .onnx); see the module docstring.

    Images are letterboxed to ``imgsz`` (h, w): to the full size for an ONNX file with a static
    input, otherwise only to the smallest stride multiple holding the resized image (less padding,
    same scale). Returns the save folder and the per-frame detections.
    """
    dev = select_device(device)
    backend = load_backend(weights, dev, half)
    shape = backend.fixed_shape or _imgsz(imgsz, backend.stride)
    auto = backend.fixed_shape is None
    files = list_sources(source)
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)
    sink = _Outputs(save_dir, save_txt, save_conf)
    out = Detections(save_dir)
    clock = StageClock()
    try:
        for fr in iter_frames(files):
            with clock("pre-process"):
                x, letterboxed, ratio_pad = _to_input(fr.image, shape, auto, backend.stride)
            with clock("inference"):
                pred = backend(x)
            with clock("NMS"):
                kept = non_max_suppression(pred, conf_thres, iou_thres, classes=classes, max_det=max_det)[0]
                det = _to_original_pixels(kept, letterboxed, fr.image.shape[:2], ratio_pad)
            out.results.append((fr.path, fr.frame, det))
            if save_txt:
                sink.labels(fr, det)
            if nosave and not view_img:
                annotated = None
            else:
                annotated = draw_detections(fr.image.copy(), det, backend.names, line_width)
            if not nosave:
                sink.picture(fr, annotated)
            if view_img:
                cv2.imshow(str(fr.path), annotated)
                cv2.waitKey(1)
            if verbose:
                print(_frame_report(fr, letterboxed, det, backend.names, clock.last["inference"]))
    finally:
        sink.close()
        if view_img:
            cv2.destroyAllWindows()
    if not out.results:
        raise ValueError(f"--source {source}: none of its {len(files)} file(s) could be read")
    if verbose:
        n = len(out.results)
        print("speed per image: " + ", ".join(f"{t / n * 1e3:.1f}ms {stage}" for stage, t in clock.total.items()))
        print(f"results saved to {save_dir}")
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
    ],
    "which detections": [
        ("--conf-thres", "score threshold (objectness × class)", {"type": float, "default": 0.25}),
        ("--iou-thres", "NMS IoU threshold", {"type": float, "default": 0.45}),
        ("--max-det", "most detections per image", {"type": int, "default": 1000}),
        ("--classes", "keep only these class ids", {"nargs": "+", "type": int}),
    ],
    "output": [
        ("--project", "results go to project/name", {"default": "runs/detect"}),
        ("--name", "results go to project/name", {"default": "exp"}),
        ("--exist-ok", "reuse project/name instead of incrementing it", _SWITCH),
        ("--nosave", "do not save annotated images/videos", _SWITCH),
        ("--save-txt", "save YOLO-format labels to labels/*.txt", _SWITCH),
        ("--save-conf", "append the score to each --save-txt row", _SWITCH),
        ("--line-width", "box line width in pixels (default: by picture size)", {"type": int}),
        ("--view-img", "show results in a window", _SWITCH),
    ],
}


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the `CLI_FLAGS` command line."""
    parser = argparse.ArgumentParser(description="Detect objects in images and videos")
    for title, flags in CLI_FLAGS.items():
        group = parser.add_argument_group(title)
        for names, text, options in flags:
            group.add_argument(*((names,) if isinstance(names, str) else names), help=text, **options)
    return parser.parse_args(argv)


def check_options(opt: argparse.Namespace) -> argparse.Namespace:
    """One-line ValueError naming the flag for values no detection run can use."""
    require(all(s >= 1 for s in opt.imgsz), f"--imgsz {' '.join(map(str, opt.imgsz))}: sizes must be positive")
    require(0.0 <= opt.conf_thres <= 1.0, f"--conf-thres {opt.conf_thres}: a score threshold in [0, 1]")
    require(0.0 <= opt.iou_thres <= 1.0, f"--iou-thres {opt.iou_thres}: an IoU threshold in [0, 1]")
    require(opt.max_det >= 1, f"--max-det {opt.max_det}: must be at least 1")
    require(opt.line_width is None or opt.line_width >= 1, f"--line-width {opt.line_width}: must be at least 1")
    parse_device(opt.device)
    return opt


def main(argv: list[str] | None = None) -> int:
    """CLI entry: returns the exit status (0 ok, 2 with a one-line message on bad input, 130 on Ctrl-C)."""
    opt = parse_opt(argv)
    status, _ = run_guarded("detect.py", lambda: run(**vars(check_options(opt))), extra_errors=(ImportError,))
    return status


if __name__ == "__main__":
    sys.exit(main())
