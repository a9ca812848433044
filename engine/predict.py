"""Detection on images and videos: the per-frame pipeline, drawing and saving (what ``detect.py``
runs; the files and frames a source names come from :mod:`engine.sources`).

Pipeline per frame: letterbox (:func:`utils.augment.letterbox_input`) → backend (PyTorch or
onnxruntime, same interface: :mod:`models.backends`) → NMS (score = objectness × class
probability) → boxes mapped back to the original pixels. Outputs: one annotated image per input
image, one annotated .mp4 per video, and with ``save_txt`` a ``labels/<stem>.txt`` per image
(``<stem>_<frame>.txt`` per video frame) holding one row ``class xc yc w h [conf]`` per detection,
normalised to the original image size.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from engine.sources import Frame, iter_frames, list_sources
from models.backends import load_backend
from utils.augment import letterbox_input
from utils.boxes import non_max_suppression, scale_boxes
from utils.files import increment_path
from utils.geometry import round_to_stride
from utils.labels import label_lines
from utils.plots import class_color
from utils.torch_utils import select_device

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


def draw_detections(im: np.ndarray, det: np.ndarray, names: list[str], line_width: int | None = None,
                    hide_labels: bool = False, hide_conf: bool = False) -> np.ndarray:
    """Draw (n, 6) ``x1 y1 x2 y2 conf cls`` boxes with ``name conf`` tags onto ``im`` (in place), one
    colour per class (:func:`utils.plots.class_color`, the palette of the validation plots).
    ``hide_labels``: bare boxes; ``hide_conf``: the class name only."""
    style = BoxStyle.for_shape(im.shape, line_width)
    for *xyxy, conf, cls in det.tolist():
        c = int(cls)
        box = tuple(int(v) for v in xyxy)
        if hide_labels:
            cv2.rectangle(im, box[:2], box[2:], class_color(c, bgr=True), style.stroke, cv2.LINE_AA)
            continue
        name = str(names[c]) if 0 <= c < len(names) else str(c)
        _draw_tagged_box(im, box, name if hide_conf else f"{name} {conf:.2f}", class_color(c, bgr=True), style)
    return im


def crop_box(im: np.ndarray, xyxy: Sequence[float], gain: float = 1.02, pad: int = 10) -> np.ndarray:
    """The part of ``im`` (h, w, C) under box ``xyxy``, grown about its centre to ``gain`` × its width and
    height plus ``pad`` pixels (half on each side), clipped to the picture: the cut of YOLOv5's
    --save-crop (a little context around the object). A copy."""
    x1, y1, x2, y2 = (float(v) for v in xyxy)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    half_w, half_h = ((x2 - x1) * gain + pad) / 2, ((y2 - y1) * gain + pad) / 2
    h, w = im.shape[:2]
    left, right = (int(min(max(v, 0), w)) for v in (cx - half_w, cx + half_w))
    top, bottom = (int(min(max(v, 0), h)) for v in (cy - half_h, cy + half_h))
    return im[top:bottom, left:right].copy()


# ----------------------------------------------------------------------------------------- run


@dataclass
class Detections:
    """What :func:`predict` found: ``save_dir`` and, per frame, (path, frame index or None, (n, 6)
    ``x1 y1 x2 y2 conf cls`` in original-image pixels)."""

    save_dir: Path
    results: list[tuple[Path, int | None, np.ndarray]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # total wall time per pipeline stage


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


def _to_input(image: np.ndarray, shape: tuple[int, int], auto: bool, stride: int) -> tuple[torch.Tensor, tuple]:
    """Letterboxed model input for a BGR uint8 (h0, w0, 3) picture (:func:`utils.augment.letterbox_input`):
    the (1, 3, h, w) RGB float tensor in 0-1 and the letterboxed (h, w)."""
    x, hw = letterbox_input(image, shape, auto=auto, stride=stride)
    return torch.from_numpy(x), hw


def _to_original_pixels(det: torch.Tensor, letterboxed: tuple[int, int], original: tuple[int, int]) -> np.ndarray:
    """(n, 6) ``x1 y1 x2 y2 conf cls`` from letterboxed to original-picture pixels, as numpy.

    As YOLOv5's detect.py reports boxes (measured against its --save-txt output): the letterbox is
    recomputed from the two shapes (one scale, half the spare as padding; half a pixel apart from the
    exact mapping where the spare is odd) and the corners are rounded to whole pixels."""
    det = det.clone()
    det[:, :4] = scale_boxes(letterboxed, det[:, :4], original).round()
    return det.cpu().numpy()


def _frame_report(fr: Frame, letterboxed: tuple[int, int], det: np.ndarray, names: list[str], seconds: float) -> str:
    """``path [frame i/n] HxW: 2 car, 1 person, 3.1ms`` for the console."""
    classes, counts = np.unique(det[:, 5].astype(int), return_counts=True)
    found = ", ".join(f"{n} {names[c]}" for c, n in zip(classes, counts)) or "no detections"
    where = "" if fr.frame is None else f" frame {fr.frame}/{fr.n_frames}"
    return f"{fr.path}{where} {letterboxed[0]}x{letterboxed[1]}: {found}, {seconds * 1e3:.1f}ms"


class _Outputs:
    """Writes what a run keeps: annotated pictures, one .mp4 per video, YOLO label files."""

    def __init__(self, save_dir: Path, save_txt: bool, save_conf: bool) -> None:
        self.save_dir, self.save_conf = save_dir, save_conf
        self.videos: dict[Path, cv2.VideoWriter] = {}
        self.crop_numbers: dict[tuple[Path, str], int] = {}  # next crop number to try per (folder, stem)
        if save_txt:
            (save_dir / "labels").mkdir(exist_ok=True)

    def labels(self, fr: Frame, det: np.ndarray) -> None:
        """``labels/<stem>.txt`` (``<stem>_<frame>.txt`` for a video frame, from 1); none without detections."""
        if len(det):
            stem = fr.path.stem if fr.frame is None else f"{fr.path.stem}_{fr.frame}"
            rows = label_lines(det, fr.image.shape[:2], self.save_conf)
            (self.save_dir / "labels" / f"{stem}.txt").write_text("\n".join(rows) + "\n")

    def crops(self, fr: Frame, det: np.ndarray, names: list[str]) -> None:
        """``crops/<class name>/<stem>.jpg`` per detection, then ``<stem>2.jpg``, ``<stem>3.jpg``, ... (every
        frame of a video shares its stem), as YOLOv5 names them: the first name of this stem not taken yet."""
        for *xyxy, _, cls in det.tolist():
            c = int(cls)
            folder = self.save_dir / "crops" / (str(names[c]) if 0 <= c < len(names) else str(c))
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(self._free_crop_name(folder, fr.path.stem)), crop_box(fr.image, xyxy))

    def _free_crop_name(self, folder: Path, stem: str) -> Path:
        """Only this stem's own names are tried, from where the last one was found: a folder of many
        crops costs no scan per crop."""
        n = self.crop_numbers.get((folder, stem), 1)
        while (folder / f"{stem}{n if n > 1 else ''}.jpg").exists():
            n += 1
        self.crop_numbers[(folder, stem)] = n + 1
        return folder / f"{stem}{n if n > 1 else ''}.jpg"

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


@dataclass(frozen=True)
class DetectSettings:
    """Which detections :func:`predict` keeps and what it writes (detect.py's flags)."""

    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 1000
    classes: list[int] | None = None
    view_img: bool = False
    save_txt: bool = False
    save_conf: bool = False
    nosave: bool = False
    line_width: int | None = None
    agnostic_nms: bool = False
    hide_labels: bool = False
    hide_conf: bool = False
    save_crop: bool = False
    vid_stride: int = 1


def predict(
    weights: str | Path,
    source: str | Path,
    imgsz: int | list[int] | tuple[int, ...] = 640,
    device: str = "",
    half: bool = False,
    settings: DetectSettings | None = None,
    project: str | Path = "runs/detect",
    name: str = "exp",
    exist_ok: bool = False,
    report: Callable[[str], None] | None = None,
) -> Detections:
    """Detect objects in ``source`` with ``weights`` (.pt or .onnx), writing into ``project/name``
    (incremented unless ``exist_ok``; created only once weights and source are found).

    Images are letterboxed to ``imgsz`` (h, w): to the full size for an ONNX file with a static
    input, otherwise only to the smallest stride multiple holding the resized image (less padding,
    same scale). ``report`` receives one line per frame. Returns the per-frame detections and the
    time per stage.
    """
    s = settings or DetectSettings()
    backend = load_backend(weights, select_device(device), half)
    shape = backend.fixed_shape or round_to_stride(imgsz, backend.stride)
    auto = backend.fixed_shape is None
    files = list_sources(source)
    if str(source).endswith(".txt") and not s.nosave:  # YOLOv5 saves no pictures for a list source
        s = replace(s, nosave=True)
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)
    sink = _Outputs(save_dir, s.save_txt, s.save_conf)
    out = Detections(save_dir)
    clock = StageClock()
    try:
        for fr in iter_frames(files, s.vid_stride):
            with clock("pre-process"):
                x, letterboxed = _to_input(fr.image, shape, auto, backend.stride)
            with clock("inference"):
                pred = backend(x)
            with clock("NMS"):
                kept = non_max_suppression(pred, s.conf_thres, s.iou_thres, classes=s.classes, max_det=s.max_det,
                                           agnostic=s.agnostic_nms)[0]
                det = _to_original_pixels(kept, letterboxed, fr.image.shape[:2])
            out.results.append((fr.path, fr.frame, det))
            _keep(fr, det, backend.names, s, sink)
            if report is not None:
                report(_frame_report(fr, letterboxed, det, backend.names, clock.last["inference"]))
    finally:
        sink.close()
        if s.view_img:
            cv2.destroyAllWindows()
    if not out.results:
        raise ValueError(f"--source {source}: none of its {len(files)} file(s) could be read")
    out.seconds = dict(clock.total)
    return out


def _keep(fr: Frame, det: np.ndarray, names: list[str], s: DetectSettings, sink: _Outputs) -> None:
    """Write the frame's labels and annotated picture, and show it, as the settings ask. Detections go
    out lowest score first, as YOLOv5's detect.py writes them: the same label files and crop numbers,
    and the most confident boxes drawn last, on top."""
    det = det[::-1]
    if s.save_txt:
        sink.labels(fr, det)
    if s.save_crop:
        sink.crops(fr, det, names)
    if s.nosave and not s.view_img:
        return
    annotated = draw_detections(fr.image.copy(), det, names, s.line_width, s.hide_labels, s.hide_conf)
    if not s.nosave:
        sink.picture(fr, annotated)
    if s.view_img:
        cv2.imshow(str(fr.path), annotated)
        cv2.waitKey(1)
