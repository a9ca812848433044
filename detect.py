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
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from models.backends import load_backend
from utils.augment import letterbox
from utils.boxes import non_max_suppression, scale_boxes, xyxy2xywhn
from utils.files import increment_path
from utils.torch_utils import select_device

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


def iter_frames(files: list[Path]) -> Iterator[Frame]:
    """Yield every image, and every frame of every video, in order."""
    for f in files:
        if f.suffix.lower() in IMG_SUFFIXES:
            im = cv2.imread(str(f))
            if im is None:
                raise ValueError(f"--source {f}: cannot read the image (corrupt or unsupported)")
            yield Frame(f, im)
            continue
        cap = cv2.VideoCapture(str(f))
        if not cap.isOpened():
            raise ValueError(f"--source {f}: cannot open the video")
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


def class_color(c: int) -> tuple[int, int, int]:
    """A stable, well-spread BGR colour per class (golden-ratio steps around the hue circle)."""
    hue = int((c * 0.618033988749895 % 1.0) * 180)
    hsv = np.array([[[hue, 220, 230]]], dtype=np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def draw_detections(im: np.ndarray, det: np.ndarray, names: list[str], line_width: int | None = None) -> np.ndarray:
    """Draw (n, 6) ``x1 y1 x2 y2 conf cls`` boxes with ``name conf`` labels onto ``im`` (in place)."""
    lw = line_width or max(round(sum(im.shape[:2]) / 2 * 0.003), 2)
    font_scale = lw / 3
    for x1, y1, x2, y2, conf, cls in det:
        c = int(cls)
        color = class_color(c)
        p1, p2 = (int(x1), int(y1)), (int(x2), int(y2))
        cv2.rectangle(im, p1, p2, color, lw, cv2.LINE_AA)
        label = f"{names[c] if c < len(names) else c} {conf:.2f}"
        (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, max(lw - 1, 1))
        above = p1[1] - th - 3 >= 0  # put the label inside the box when it would leave the image
        q1 = (p1[0], p1[1] - th - 3 if above else p1[1])
        q2 = (p1[0] + tw, p1[1] if above else p1[1] + th + 3)
        cv2.rectangle(im, q1, q2, color, -1, cv2.LINE_AA)
        cv2.putText(im, label, (q1[0], q2[1] - 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (255, 255, 255),
                    max(lw - 1, 1), cv2.LINE_AA)
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
    if save_txt:
        (save_dir / "labels").mkdir(exist_ok=True)

    out = Detections(save_dir)
    writers: dict[Path, cv2.VideoWriter] = {}
    t_pre = t_inf = t_nms = 0.0
    n_done = 0
    try:
        for fr in iter_frames(files):
            t0 = time.perf_counter()
            im, (rw, rh), pad = letterbox(fr.image, shape, auto=auto, stride=backend.stride)
            x = torch.from_numpy(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1))).float()[None] / 255.0
            t1 = time.perf_counter()
            pred = backend(x)
            t2 = time.perf_counter()
            det = non_max_suppression(pred, conf_thres, iou_thres, classes=classes, max_det=max_det)[0]
            det[:, :4] = scale_boxes(im.shape[:2], det[:, :4], fr.image.shape[:2], ratio_pad=((rh, rw), pad))
            det = det.cpu().numpy()
            t3 = time.perf_counter()
            t_pre, t_inf, t_nms, n_done = t_pre + t1 - t0, t_inf + t2 - t1, t_nms + t3 - t2, n_done + 1
            out.results.append((fr.path, fr.frame, det))

            stem = fr.path.stem if fr.frame is None else f"{fr.path.stem}_{fr.frame}"
            if save_txt and len(det):
                (save_dir / "labels" / f"{stem}.txt").write_text(
                    "\n".join(label_lines(det, fr.image.shape[:2], save_conf)) + "\n"
                )
            annotated = draw_detections(fr.image.copy(), det, backend.names, line_width) if (
                not nosave or view_img) else None
            if not nosave:
                if fr.frame is None:
                    cv2.imwrite(str(save_dir / fr.path.name), annotated)
                else:
                    if fr.path not in writers:
                        h, w = annotated.shape[:2]
                        writers[fr.path] = cv2.VideoWriter(
                            str(save_dir / f"{fr.path.stem}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fr.fps, (w, h)
                        )
                    writers[fr.path].write(annotated)
            if view_img:
                cv2.imshow(str(fr.path), annotated)
                cv2.waitKey(1)
            if verbose:
                counts = np.bincount(det[:, 5].astype(int), minlength=len(backend.names)) if len(det) else []
                found = ", ".join(f"{n} {backend.names[c]}" for c, n in enumerate(counts) if n) or "no detections"
                where = "" if fr.frame is None else f" frame {fr.frame + 1}/{fr.n_frames}"
                print(f"{fr.path}{where} {im.shape[0]}x{im.shape[1]}: {found}, {(t2 - t1) * 1e3:.1f}ms")
    finally:
        for wr in writers.values():
            wr.release()
        if view_img:
            cv2.destroyAllWindows()
    if verbose and n_done:
        ms = [t / n_done * 1e3 for t in (t_pre, t_inf, t_nms)]
        print(f"speed per image: {ms[0]:.1f}ms pre-process, {ms[1]:.1f}ms inference, {ms[2]:.1f}ms NMS")
        print(f"results saved to {save_dir}")
    return out


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags (YOLOv5 spelling)."""
    p = argparse.ArgumentParser(description="Detect objects in images and videos")
    p.add_argument("--weights", type=str, required=True, help=".pt checkpoint or .onnx file from export.py")
    p.add_argument("--source", type=str, required=True, help="image, folder, glob pattern or video")
    p.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="h w, or one size")
    p.add_argument("--conf-thres", type=float, default=0.25, help="score threshold (objectness × class)")
    p.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=1000, help="most detections per image")
    p.add_argument("--device", default="", help="cpu, or a CUDA index such as 0 (default: CUDA if available)")
    p.add_argument("--view-img", action="store_true", help="show results in a window")
    p.add_argument("--save-txt", action="store_true", help="save YOLO-format labels to labels/*.txt")
    p.add_argument("--save-conf", action="store_true", help="append the score to each --save-txt row")
    p.add_argument("--nosave", action="store_true", help="do not save annotated images/videos")
    p.add_argument("--classes", nargs="+", type=int, default=None, help="keep only these class ids")
    p.add_argument("--project", default="runs/detect", help="results go to project/name")
    p.add_argument("--name", default="exp", help="results go to project/name")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of incrementing it")
    p.add_argument("--line-width", type=int, default=None, help="box line width in pixels (default: by size)")
    p.add_argument("--half", action="store_true", help="fp16 PyTorch inference (CUDA only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry: returns the exit status (0 ok, 1 with a one-line message on bad input)."""
    opt = parse_opt(argv)
    try:
        run(**vars(opt))
    except (ImportError, ValueError, FileNotFoundError) as e:
        print(f"detect.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
