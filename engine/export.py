"""ONNX and YOLOv5-format export of a detector, with the parity checks (what ``export.py`` runs).

The exported graph is the model in eval mode with Conv+BN fused, input ``images`` (bs, 3, H, W)
RGB 0-1 and a single output ``output0`` (bs, N, 5 + nc): the decoded tensor YOLOv5's ONNX files
carry (NMS is left to the caller); ``stride``, ``names``, ``imgsz``, ``nc``, ``dynamic`` and
``format`` are JSON strings in ``metadata_props``. After writing, the file is run in onnxruntime on
one letterboxed image and compared with PyTorch (:func:`parity`); ``int8`` then quantises the fp32
file (:mod:`utils.onnx_int8`). Progress goes to the ``engine.export`` logger.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from models import load_checkpoint, load_model
from models.backends import ort_providers
from models.yolov5_format import save_yolov5
from utils.augment import letterbox_input
from utils.detect_outputs import split_outputs
from utils.geometry import round_to_stride
from utils.torch_utils import select_device

LOGGER = logging.getLogger(__name__)

# Default largest difference allowed between onnxruntime and PyTorch (see `parity`). fp16 files
# keep ~3 significant digits, so they are held to a looser bound.
TOL_FP32 = 1e-3
TOL_FP16 = 1e-2
DEFAULT_OPSET = 17

_INSTALL_HINT = "ONNX export needs the onnx and onnxruntime packages: pip install onnx onnxruntime"


def _require_onnx():
    """Import onnx and onnxruntime, or fail with a one-line install hint."""
    try:
        onnx = importlib.import_module("onnx")
        ort = importlib.import_module("onnxruntime")
    except ImportError as e:
        raise ImportError(f"{_INSTALL_HINT} ({e.name} is missing)") from e
    return onnx, ort


class _DecodedOnly(nn.Module):
    """Wraps a DetectionModel so the traced graph returns only the decoded (bs, N, 5 + nc) tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return split_outputs(self.model(x))[0]


def check_imgsz(imgsz: int | list[int] | tuple[int, ...], stride: int) -> tuple[int, int]:
    """(h, w) from one or two sizes, each rounded UP to a multiple of ``stride`` (the model needs it)."""
    out = round_to_stride(imgsz, stride)
    sizes = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    if list(out) != (sizes * 2 if len(sizes) == 1 else sizes):
        LOGGER.info(f"--imgsz {sizes} is not a multiple of the stride {stride}; using {list(out)}")
    return out


def synthetic_image(shape: tuple[int, int] = (480, 640), seed: int = 0) -> np.ndarray:
    """A deterministic BGR uint8 picture with gradients and filled shapes (not flat, so every
    part of the network sees varied input). ``shape`` = (h, w)."""
    h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    im = np.stack((xx / w * 255, yy / h * 255, (xx + yy) / (h + w) * 255), 2).astype(np.uint8)
    for _ in range(8):
        x1, y1 = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        x2, y2 = x1 + int(rng.integers(10, w // 3)), y1 + int(rng.integers(10, h // 3))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            cv2.rectangle(im, (x1, y1), (x2, y2), color, -1)
        else:
            cv2.circle(im, ((x1 + x2) // 2, (y1 + y2) // 2), max((x2 - x1) // 2, 5), color, -1)
    return im


def preprocess(im_bgr: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Letterbox a BGR image to ``shape`` (h, w) → float32 (1, 3, h, w) RGB in 0-1."""
    return letterbox_input(im_bgr, shape)[0]


def parity(ref: np.ndarray, out: np.ndarray, imgsz: tuple[int, int]) -> dict[str, float]:
    """Disagreement between two decoded outputs (bs, N, 5 + nc).

    Coordinates are compared relative to the input size: Δx/W, Δy/H, Δw/W, Δh/H (a 640 px image
    makes 1e-3 ≈ 0.6 px); scores (objectness, classes, in 0-1) absolutely. ``max`` is the larger of
    the two, the single parity figure that is checked; ``xywh_px`` is the raw pixel difference.
    """
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: PyTorch {ref.shape} vs ONNX {out.shape}")
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    h, w = imgsz
    norm = np.array([w, h, w, h], dtype=np.float64)
    d = np.abs(ref - out)
    xywh = float((d[..., :4] / norm).max())
    scores = float(d[..., 4:].max())
    return {"max": max(xywh, scores), "xywh_rel": xywh, "scores": scores, "xywh_px": float(d[..., :4].max())}


def _simplify(model_proto):
    """Run onnxslim (preferred) or onnx-simplifier when installed; otherwise say so and keep the graph."""
    if importlib.util.find_spec("onnxslim"):
        onnxslim = importlib.import_module("onnxslim")
        LOGGER.info("simplifying with onnxslim")
        return onnxslim.slim(model_proto)
    if importlib.util.find_spec("onnxsim"):
        onnxsim = importlib.import_module("onnxsim")
        LOGGER.info("simplifying with onnxsim")
        simplified, ok = onnxsim.simplify(model_proto)
        if not ok:
            LOGGER.info("onnxsim could not verify the simplified graph; keeping the original")
            return model_proto
        return simplified
    LOGGER.info("--simplify skipped: neither onnxslim nor onnxsim is installed (pip install onnxslim)")
    return model_proto


FORMATS = ("onnx", "yolov5")
ONNX_FORMAT = "yolo-kd/onnx-1"  # the "format" metadata entry of our ONNX files
DEFAULT_HYP = Path(__file__).resolve().parents[1] / "data" / "hyps" / "hyp.scratch-low.yaml"


def _checkpoint_hyp(ckpt: dict) -> dict:
    """The training hyper-parameters a checkpoint carries (ours: 'hyp'; YOLOv5's: model.hyp), else
    YOLOv5's defaults (hyp.scratch-low). YOLOv5 keeps them on the model; only its training reads them."""
    raw = ckpt.get("raw") if isinstance(ckpt.get("raw"), dict) else {}
    found = [raw.get("hyp")]
    for key in ("ema", "model"):  # official files: an attribute of the pickled model (a record)
        m = raw.get(key)
        if m is not None and not isinstance(m, dict) and callable(getattr(m, "get", None)):
            found.append(m.get("hyp"))
    for hyp in found:
        if isinstance(hyp, dict) and hyp:
            return dict(hyp)
    import yaml

    return yaml.safe_load(DEFAULT_HYP.read_text()) if DEFAULT_HYP.is_file() else {}


def export_yolov5(
    weights: str | Path,
    output: str | Path | None = None,
    imgsz: int | list[int] | tuple[int, ...] = 640,
    check_image: str | Path | None = None,
    tol: float = TOL_FP16,
) -> tuple[Path, float]:
    """Write ``weights`` as a YOLOv5 v7.0 release checkpoint; return ``(path, parity)``.

    ``path``: ``output`` or ``<weights stem>_yolov5.pt`` beside the weights. ``parity``: the
    :func:`parity` figure between the source model (fp32) and the written file read back through
    :func:`models.load_model` (the restricted unpickler), on one letterboxed image at ``imgsz``;
    above ``tol`` (fp16 rounding stays far below) a RuntimeError is raised.
    """
    weights = Path(weights)
    out = Path(output) if output else weights.with_name(f"{weights.stem}_yolov5.pt")
    if out.resolve() == weights.resolve():
        raise ValueError(f"--output {out} would overwrite the weights; choose another name")
    model = load_model(str(weights))
    hyp = _checkpoint_hyp(load_checkpoint(str(weights)))
    t0 = time.perf_counter()
    save_yolov5(model, out, hyp=hyp)
    LOGGER.info(f"saved {out} (YOLOv5 v7.0 release format, fp16, {out.stat().st_size / 1e6:.1f} MB) "
                f"in {time.perf_counter() - t0:.1f}s")
    shape = check_imgsz(imgsz, int(model.stride.max()))
    x = torch.from_numpy(preprocess(_check_picture(check_image), shape))
    back = load_model(str(out))
    with torch.no_grad():
        stats = parity(split_outputs(model(x))[0].numpy(), split_outputs(back(x))[0].numpy(), shape)
    LOGGER.info(f"read back through the restricted unpickler: max diff {stats['max']:.3g} vs the fp32 source "
                f"(scores {stats['scores']:.3g}, xywh {stats['xywh_px']:.3g} px); tolerance {tol:g}")
    if not stats["max"] <= tol:
        raise RuntimeError(f"{out}: read back, its output differs from the source by {stats['max']:.3g} > {tol:g}")
    return out, stats["max"]


@dataclass(frozen=True)
class OnnxRequest:
    """What an ONNX export writes (see :func:`export_weights`)."""

    imgsz: int | list[int] | tuple[int, ...] = 640
    batch_size: int = 1
    dynamic: bool = False
    half: bool = False
    opset: int = DEFAULT_OPSET
    simplify: bool = False
    check_image: str | Path | None = None
    tol: float | None = None


def export_weights(
    weights: str | Path,
    imgsz: int | list[int] | tuple[int, ...] = 640,
    batch_size: int = 1,
    include: tuple[str, ...] | list[str] = ("onnx",),
    dynamic: bool = False,
    half: bool = False,
    opset: int = DEFAULT_OPSET,
    simplify: bool = False,
    device: str = "cpu",
    output: str | Path | None = None,
    check_image: str | Path | None = None,
    tol: float | None = None,
    int8: bool = False,
    data: str | Path | None = None,
    calib_images: int = 64,
    calib_split: str = "train",
) -> tuple[Path, float]:
    """Export ``weights`` to each format of ``include`` (``onnx``, ``yolov5``); return the ONNX
    file's ``(path, parity)``, or the yolov5 file's when ONNX is not included.

    ONNX: ``parity`` is the ``max`` figure of :func:`parity` (scores absolute, xywh relative to
    the input size) on one image; it must not exceed ``tol`` (default 1e-3 for fp32, 1e-2 for
    ``half``), or a RuntimeError is raised after the file is written. The file goes to ``output``
    or next to the weights with the suffix ``.onnx``. With ``int8`` the INT8 file is written next
    to it as ``<name>.int8.onnx`` (:func:`utils.onnx_int8.int8_path`), calibrated on images of
    ``data``. yolov5: see :func:`export_yolov5` (``output`` names it when it is the only format).
    """
    formats = list(dict.fromkeys(f.lower().lstrip(".") for f in include))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"--include {unknown or formats}: choose from {', '.join(FORMATS)}")
    if output and len(formats) > 1:
        raise ValueError("--output names one file: give a single --include format with it")
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"--weights {weights}: file not found")
    result = None
    if "yolov5" in formats:
        result = export_yolov5(weights, output, imgsz, check_image)
    if "onnx" not in formats:
        return result
    req = OnnxRequest(imgsz, batch_size, dynamic, half, opset, simplify, check_image, tol)
    path, fit, x, y_onnx = export_onnx(weights, req, device, output, int8=int8, data=data)
    if int8:
        _export_int8(path, data, calib_images, calib_split, (x.shape[2], x.shape[3]), x, y_onnx)
    return path, fit


def _prepare(weights: Path, req: OnnxRequest, dev: torch.device) -> tuple[nn.Module, tuple[int, int], int, list]:
    """The fused eval-mode model wrapped to return the decoded tensor, its (h, w), stride and names."""
    model = load_model(str(weights), device=str(dev))
    model.eval().fuse()
    for p in model.parameters():
        p.requires_grad_(False)
    stride = int(model.stride.max())
    shape = check_imgsz(req.imgsz, stride)
    names = list(model.names) if not isinstance(model.names, dict) else [model.names[k] for k in sorted(model.names)]
    if req.half:
        model.half()
    # The wrapper must be in eval mode too: the exporter restores the top module's train flag onto
    # all children when it finishes.
    return _DecodedOnly(model).eval(), shape, stride, names


def export_onnx(weights: Path, req: OnnxRequest, device: str = "cpu", output: str | Path | None = None,
                int8: bool = False, data: str | Path | None = None) -> tuple[Path, float, np.ndarray, np.ndarray]:
    """Write ``weights`` as an ONNX file and check it in onnxruntime against PyTorch.

    Returns ``(path, parity max, the check input (bs, 3, h, w), the onnxruntime output)``.
    ``int8``/``data``: a following INT8 step and its calibration dataset, checked here before any work.
    """
    onnx, ort = _require_onnx()
    if req.batch_size < 1:
        raise ValueError(f"--batch-size {req.batch_size} must be >= 1")
    dev = select_device(device)
    if req.half and dev.type != "cuda":
        raise ValueError("--half needs a CUDA device (fp16 convolutions): add --device 0, or drop --half")
    tol = (TOL_FP16 if req.half else TOL_FP32) if req.tol is None else req.tol
    if int8 and (req.half or not data):
        raise ValueError("--int8 quantises the fp32 file: drop --half" if req.half else
                         "--int8 needs --data <dataset.yaml> (calibration images)")
    wrapped, shape, stride, names = _prepare(weights, req, dev)
    dtype = torch.float16 if req.half else torch.float32
    dummy = torch.zeros(req.batch_size, 3, *shape, device=dev, dtype=dtype)
    with torch.no_grad():
        wrapped(dummy)  # one dry run: fails here, with a clear trace, if the model cannot run this size
    out_path = Path(output) if output else weights.with_suffix(".onnx")
    t0 = time.perf_counter()
    _write_onnx(onnx, wrapped, dummy, out_path, weights, req, shape)
    _finish_onnx(onnx, out_path, req, meta_for(stride, names, shape, req.dynamic))
    LOGGER.info(f"saved {out_path} ({out_path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    # Parity on one real (letterboxed) image, repeated to fill a fixed batch. An fp32 file is checked
    # on the CPU on both sides: CUDA convolutions may run in TF32 (~1e-3 relative; an fp32 export
    # from an H200 missed the 1e-3 tolerance by that alone), which says nothing about the file.
    check_dev = dev if req.half else torch.device("cpu")
    x = np.repeat(preprocess(_check_picture(req.check_image), shape), req.batch_size, axis=0)
    session = ort.InferenceSession(str(out_path), providers=ort_providers(ort, check_dev))
    y_onnx = session.run(["output0"], {"images": x.astype(np.float16 if req.half else np.float32)})[0]
    with torch.no_grad():
        y_torch = wrapped.to(check_dev)(torch.from_numpy(x).to(check_dev, dtype)).float().cpu().numpy()
    stats = parity(y_torch, y_onnx.astype(np.float32), shape)
    LOGGER.info(f"onnxruntime vs PyTorch: max diff {stats['max']:.3g} (scores {stats['scores']:.3g}, "
                f"xywh {stats['xywh_px']:.3g} px = {stats['xywh_rel']:.3g} of the input size); tolerance {tol:g}")
    if not stats["max"] <= tol:  # also catches NaN
        raise RuntimeError(f"{out_path}: ONNX output differs from PyTorch by {stats['max']:.3g} > {tol:g}")
    return out_path, stats["max"], x, y_onnx


def _check_picture(check_image: str | Path | None) -> np.ndarray:
    """The parity check's BGR picture: ``check_image`` or the generated test picture."""
    im0 = cv2.imread(str(check_image)) if check_image else synthetic_image()
    if im0 is None:
        raise FileNotFoundError(f"--check-image {check_image}: cannot read the image")
    return im0


def meta_for(stride: int, names: list[str], shape: tuple[int, int], dynamic: bool) -> dict[str, str]:
    """The ONNX file's ``metadata_props``: JSON strings, plus the ONNX format tag."""
    return {
        "stride": json.dumps(stride),
        "names": json.dumps(names),
        "nc": json.dumps(len(names)),
        "imgsz": json.dumps(list(shape)),
        "dynamic": json.dumps(bool(dynamic)),
        "format": ONNX_FORMAT,
    }


def _write_onnx(onnx, wrapped: nn.Module, dummy: torch.Tensor, out_path: Path, weights: Path, req: OnnxRequest,
                shape: tuple[int, int]) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_axes = None
    if req.dynamic:
        dynamic_axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output0": {0: "batch", 1: "anchors"}}
    LOGGER.info(f"exporting {weights} -> {out_path} (opset {req.opset}, {'fp16' if req.half else 'fp32'}, "
                f"input {req.batch_size}x3x{shape[0]}x{shape[1]}{', dynamic' if req.dynamic else ''})")
    with warnings.catch_warnings():
        # The TorchScript-based exporter is used on purpose (the torch.export one needs onnxscript);
        # its deprecation and tracer warnings are noise here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped,
            (dummy,),
            str(out_path),
            dynamo=False,
            opset_version=req.opset,
            input_names=["images"],
            output_names=["output0"],
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


def _finish_onnx(onnx, out_path: Path, req: OnnxRequest, meta: dict[str, str]) -> None:
    """Check the written graph, simplify it on request and store ``meta``."""
    proto = onnx.load(str(out_path))
    onnx.checker.check_model(proto)
    if req.simplify:
        proto = _simplify(proto)
    del proto.metadata_props[:]
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(out_path))


def _export_int8(
    fp32: Path, data: str | Path, n: int, split: str, shape: tuple[int, int], x: np.ndarray, y32: np.ndarray
) -> Path:
    """Write ``<name>.int8.onnx`` and print sizes, latencies and the INT8-vs-fp32 output agreement."""
    from utils import onnx_int8 as q

    images = q.calibration_images(data, split, n)
    t0 = time.perf_counter()
    path = q.quantize_int8(fp32, images, shape=shape)
    LOGGER.info(f"saved {path} (INT8 QDQ, {len(images)} {split} images for calibration) "
                f"in {time.perf_counter() - t0:.1f}s")
    y8 = q.ort_session(path, threads=0).run(None, {"images": x})[0]
    a = q.output_agreement(y32, y8)
    lat = {p: q.ort_latency(p, shape, repeats=20, warmup=3)["median_ms"] for p in (fp32, path)}
    LOGGER.info(f"INT8 vs fp32 on the check image: scores max {a['score_max']:.3g} mean {a['score_mean']:.3g}; "
                f"boxes with fp32 objectness > 0.25: mean IoU {a['box_iou_mean']:.3f}, "
                f"|Δxywh| {a['box_px_mean']:.2f} px")
    LOGGER.info(f"size fp32 {q.file_mb(fp32):.2f} MB -> int8 {q.file_mb(path):.2f} MB; onnxruntime latency "
                f"(1 thread, batch {x.shape[0]}, median of 20) fp32 {lat[fp32]:.1f} ms -> int8 {lat[path]:.1f} ms")
    return path


