"""Post-training static INT8 quantisation of an exported detector (onnxruntime), and its measurements.

``export.py --include onnx --int8 --data <yaml>`` writes ``<name>.onnx`` (fp32) and then, with
:func:`quantize_int8`, ``<name>.int8.onnx``. What is quantised, and why:

* ``onnxruntime.quantization.quantize_static`` in **QDQ** format: QuantizeLinear/DequantizeLinear
  pairs around the float ops, which onnxruntime fuses into integer kernels when it loads the file;
  the result stays a standard ONNX graph that other runtimes (TensorRT, OpenVINO) read as well.
* **Activations**: asymmetric uint8, one scale and zero point per tensor, from **MinMax**
  calibration over N letterboxed images of the dataset (default 64, from the *train* split, so the
  ranges are not fitted on the images the mAP is then measured on). **Weights**: symmetric int8,
  one scale per output channel (fused Conv+BN filters differ a lot in range; one scale per tensor
  would flatten the small ones). U8S8 is the pairing onnxruntime's x86 (AVX2/VNNI) and ARM kernels
  are built for; on x86 CPUs without VNNI it can saturate, pass ``reduce_range=True`` there.
* **Kept in float** (``nodes_to_exclude``, :func:`float_tail_nodes`): the decode at the end of the
  graph — every node from which no Conv is reachable: the reshapes to (bs, na, ny, nx, no),
  Sigmoid, the grid/anchor Mul/Add/Pow, Slice and Concat — and, by default, the three Detect 1×1
  convs that produce the logits. Why: the decoded tensor mixes pixels (xy up to the image size, wh
  up to 4× the largest anchor) with 0-1 scores, so a single uint8 scale would leave steps of
  several pixels and round the low scores that the mAP ranks (down to conf 0.001) to zero; the
  logits span about ±15-20, where a uint8 step of ~0.15 moves wh = (2σ)²·anchor by up to ~7 % and
  low scores by ~15 %. The float tail is a few element-wise ops and three 1×1 convs, a small share
  of the compute (yolov5s at 80 classes: 0.73 of 16.5 GFLOPs; at 10 classes < 1 %).

Nothing is imported from onnx/onnxruntime until a function needs it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from utils.augment import letterbox_input
from utils.data_config import load_data_config
from utils.dataset import load_bgr
from utils.image_files import list_image_files

INT8_SUFFIX = ".int8.onnx"
DEFAULT_CALIB_IMAGES = 64
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")

# Documented agreement of an INT8 file with its fp32 source (tests/test_int8.py checks it on a
# tiny model and calibration-like images): score differences (objectness, classes; 0-1) at most
# INT8_TOL_SCORE_MAX anywhere and INT8_TOL_SCORE_MEAN on average; the boxes of the cells the fp32
# model is confident about (objectness > 0.25, both sides >= 4 px) overlap their fp32 boxes with a
# mean IoU of at least INT8_TOL_BOX_IOU (IoU, not pixels: it does not grow with the box size).
# Measured there: scores max 0.07-0.08, mean 0.010-0.012; box IoU mean 0.89-0.90.
INT8_TOL_SCORE_MAX = 0.15
INT8_TOL_SCORE_MEAN = 0.02
INT8_TOL_BOX_IOU = 0.85

ImageLike = str | Path | np.ndarray


def int8_path(onnx_path: str | Path) -> Path:
    """``best.onnx`` → ``best.int8.onnx`` (next to it)."""
    p = Path(onnx_path)
    return p.with_name(p.stem + INT8_SUFFIX)


def _require():
    try:
        onnx = importlib.import_module("onnx")
        ort = importlib.import_module("onnxruntime")
        quant = importlib.import_module("onnxruntime.quantization")
    except ImportError as e:
        raise ImportError(f"INT8 export needs onnx and onnxruntime: pip install onnx onnxruntime "
                          f"({e.name} is missing)") from e
    return onnx, ort, quant


# ------------------------------------------------------------------------------ calibration data
def calibration_images(data: str | Path, split: str = "train", n: int = DEFAULT_CALIB_IMAGES) -> list[str]:
    """``n`` image paths spread evenly over the ``split`` of the dataset yaml ``data`` (all if fewer).

    Evenly spaced rather than the first n: consecutive files of a split often come from one scene.
    """
    if n < 1:
        raise ValueError(f"--calib-images {n}: must be >= 1")
    cfg = load_data_config(data, require=(split,))
    if not cfg.get(split):
        raise ValueError(f"--data {data} has no '{split}' split for calibration images")
    files = list_image_files(cfg[split])
    if len(files) <= n:
        return files
    idx = np.unique(np.linspace(0, len(files) - 1, n).round().astype(int))
    return [files[i] for i in idx]


def letterboxed(image: ImageLike, shape: tuple[int, int]) -> np.ndarray:
    """An image path or BGR uint8 array → float32 (1, 3, h, w) RGB 0-1, letterboxed to ``shape`` (h, w)."""
    im = load_bgr(str(image)) if isinstance(image, (str, Path)) else image
    return letterbox_input(im, shape)[0]


def calibration_batches(images: Sequence[ImageLike], shape: tuple[int, int], batch: int = 1) -> Iterator[np.ndarray]:
    """Letterboxed ``images`` in batches of ``batch`` (the last one filled with repeats), read lazily."""
    for i in range(0, len(images), batch):
        chunk = [letterboxed(im, shape) for im in images[i : i + batch]]
        chunk += [chunk[-1]] * (batch - len(chunk))
        yield np.concatenate(chunk)


def _reader(batches: Iterator[np.ndarray], input_name: str):
    """An onnxruntime CalibrationDataReader over ``batches`` (built here: onnxruntime is imported lazily)."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = batches

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.batches, None)
            return None if x is None else {input_name: x}

    return _Reader()


# --------------------------------------------------------------------------------------- graph
def float_tail_nodes(model: Any, include_head_convs: bool = True) -> list[str]:
    """Names of the nodes to keep in float: those from which no Conv is reachable (the decode), plus
    the last Convs themselves (the Detect 1×1 convs) when ``include_head_convs``.

    ``model``: an ``onnx.ModelProto`` whose nodes all have names.
    """
    nodes = list(model.graph.node)
    consumers: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            consumers.setdefault(name, []).append(i)
    # Walk the (topologically sorted) graph backwards: a node reaches a Conv if a consumer is one or does.
    reaches = [False] * len(nodes)
    for i in reversed(range(len(nodes))):
        after = [j for o in nodes[i].output for j in consumers.get(o, ())]
        reaches[i] = any(nodes[j].op_type == "Conv" or reaches[j] for j in after)
    return [n.name for n, r in zip(nodes, reaches) if not r and (include_head_convs or n.op_type != "Conv")]


def _name_nodes(model: Any) -> None:
    seen: set[str] = set()
    for i, n in enumerate(model.graph.node):
        if not n.name or n.name in seen:
            n.name = f"{n.op_type}_{i}"
        seen.add(n.name)


def input_spec(model: Any) -> tuple[str, int | None, tuple[int, int] | None]:
    """(input name, static batch or None, static (h, w) or None) of an ONNX model."""
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inp.type.tensor_type.shape.dim]
    hw = (dims[2], dims[3]) if len(dims) == 4 and dims[2] and dims[3] else None
    return inp.name, (dims[0] or None) if dims else None, hw


def quantize_int8(
    onnx_path: str | Path,
    images: Sequence[ImageLike],
    output: str | Path | None = None,
    shape: tuple[int, int] | None = None,
    per_channel: bool = True,
    keep_head_float: bool = True,
    calibrate_method: str = "minmax",
    reduce_range: bool = False,
) -> Path:
    """Quantise the fp32 file ``onnx_path`` to INT8 (QDQ) with ``images`` as calibration data.

    Args:
        images: paths or BGR uint8 arrays; each is letterboxed to the input size (the file's static
            size, else ``shape``, else the ``imgsz`` stored by export.py).
        output: default :func:`int8_path` of ``onnx_path``.
        per_channel: per-output-channel weight scales (else one per tensor).
        keep_head_float: also keep the Detect 1×1 convs in float (the decode always is).
        calibrate_method: 'minmax' (default), 'percentile' or 'entropy'.
        reduce_range: 7-bit weights, for x86 CPUs without VNNI (see the module docstring).

    The fp32 file's metadata (stride, names, ...) is copied, plus ``quantization`` (a JSON record
    of these choices). Returns the path written.
    """
    onnx, _, quant = _require()
    src = Path(onnx_path)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: ONNX file not found")
    if not images:
        raise ValueError("INT8 calibration needs at least one image")
    if calibrate_method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method {calibrate_method!r}: use one of {', '.join(CALIBRATION_METHODS)}")
    out = Path(output) if output else int8_path(src)
    model = onnx.load(str(src))
    meta = {p.key: p.value for p in model.metadata_props}
    input_name, batch, static_hw = input_spec(model)
    hw = static_hw or (tuple(shape) if shape else None) or tuple(json.loads(meta.get("imgsz", "null")) or ())
    if len(hw) != 2:
        raise ValueError(f"{src}: dynamic input size and no imgsz metadata; pass the calibration shape")
    hw = (int(hw[0]), int(hw[1]))

    with tempfile.TemporaryDirectory(prefix="int8_") as tmp:
        pre = Path(tmp) / "pre.onnx"
        model = _pre_processed(onnx, src, pre, tmp, static=bool(static_hw))
        _name_nodes(model)
        onnx.save(model, str(pre))
        excluded = float_tail_nodes(model, include_head_convs=keep_head_float)
        reader = _reader(calibration_batches(list(images), hw, batch or 1), input_name)
        _quantize_static(quant, pre, out, reader, excluded, calibrate_method, per_channel, reduce_range)
    record = {"format": "QDQ", "activations": "uint8 per-tensor asymmetric",
              "weights": f"int8 {'per-channel' if per_channel else 'per-tensor'} symmetric",
              "calibration": f"{calibrate_method}, {len(images)} images at {hw[0]}x{hw[1]}",
              "float_nodes": len(excluded), "reduce_range": reduce_range}
    _write_metadata(onnx, out, {**meta, "quantization": json.dumps(record)})
    return out


def _quantize_static(quant, pre: Path, out: Path, reader, excluded: list[str], calibrate_method: str,
                     per_channel: bool, reduce_range: bool) -> None:
    """onnxruntime's static QDQ quantisation: uint8 asymmetric activations, int8 symmetric weights."""
    method = {"minmax": quant.CalibrationMethod.MinMax, "percentile": quant.CalibrationMethod.Percentile,
              "entropy": quant.CalibrationMethod.Entropy}[calibrate_method]
    quant.quantize_static(
        str(pre),
        str(out),
        reader,
        quant_format=quant.QuantFormat.QDQ,
        per_channel=per_channel,
        reduce_range=reduce_range,
        activation_type=quant.QuantType.QUInt8,
        weight_type=quant.QuantType.QInt8,
        nodes_to_exclude=excluded,
        calibrate_method=method,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )


def _pre_processed(onnx, src: Path, pre: Path, tmp: str, static: bool):
    """The graph after onnxruntime's quantisation pre-processing, or as exported when that fails.

    Shape inference + graph clean-up, as onnxruntime recommends before quantize_static. Its
    symbolic shape inference cannot follow the dynamic-size grid of a --dynamic export (onnx's own
    shape inference still runs), so it is skipped there; and when it fails it drops
    sym_shape_infer_temp.onnx + a .data file into the working directory, hence the chdir into our
    temporary folder ``tmp``.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    errors = []
    src, pre = src.resolve(), pre.resolve()  # before the chdir: a relative --weights is relative to here
    for skip_symbolic in (False, True) if static else (True,):
        try:
            with contextlib.chdir(tmp):
                quant_pre_process(str(src), str(pre), skip_symbolic_shape=skip_symbolic)
            return onnx.load(str(pre))
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")
    warnings.warn(f"onnxruntime quant_pre_process failed ({'; '.join(errors)}); quantising the graph as "
                  f"exported", stacklevel=3)
    return onnx.load(str(src))


def _write_metadata(onnx, path: Path, meta: dict[str, str]) -> None:
    """Replace the file's ``metadata_props`` by ``meta``."""
    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))


# -------------------------------------------------------------------------------- measurements
def ort_session(path: str | Path, threads: int = 1, providers: Sequence[str] = ("CPUExecutionProvider",)):
    """An onnxruntime session with ``threads`` intra-op threads (0 = onnxruntime's default, all cores)."""
    _, ort, _ = _require()
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=list(providers))


def ort_latency(
    path: str | Path,
    shape: tuple[int, int] | None = None,
    repeats: int = 50,
    warmup: int = 5,
    threads: int = 1,
    providers: Sequence[str] = ("CPUExecutionProvider",),
) -> dict[str, Any]:
    """Wall time of one ``session.run`` at batch 1 (or the file's static batch): median of ``repeats``.

    The input is a fixed pseudo-random image (values do not change the work: NMS is not in the
    graph). ``shape`` is needed only for dynamic files without ``imgsz`` metadata. Single-threaded
    by default: the figure is then stable on a shared machine and comparable between files.
    """
    sess = ort_session(path, threads, providers)
    inp = sess.get_inputs()[0]
    b, h, w = inp.shape[0], inp.shape[2], inp.shape[3]
    if not (isinstance(h, int) and isinstance(w, int)):
        meta = sess.get_modelmeta().custom_metadata_map
        h, w = shape or json.loads(meta.get("imgsz", "null")) or (None, None)
        if h is None:
            raise ValueError(f"{path}: dynamic input size; pass shape=(h, w)")
    b = b if isinstance(b, int) else 1
    dtype = np.float16 if "float16" in inp.type else np.float32
    x = np.random.default_rng(0).random((b, 3, int(h), int(w))).astype(dtype)
    for _ in range(max(warmup, 0)):
        sess.run(None, {inp.name: x})
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        sess.run(None, {inp.name: x})
        times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 4 else [min(times), 0, max(times)]
    return {"median_ms": statistics.median(times), "min_ms": min(times), "iqr_ms": q[2] - q[0],
            "repeats": len(times), "threads": int(threads), "batch": b, "shape": [int(h), int(w)]}


def output_agreement(ref: np.ndarray, out: np.ndarray, conf: float = 0.25, min_box: float = 4.0) -> dict[str, float]:
    """How closely a decoded output ``out`` (bs, N, 5 + nc) follows ``ref`` (e.g. INT8 vs fp32).

    ``score_max`` / ``score_mean``: absolute differences of objectness and class scores over all
    rows. Over the rows where ``ref``'s objectness exceeds ``conf`` and both box sides are at least
    ``min_box`` px (the boxes that can become detections; the IoU of a sub-pixel box says nothing;
    ``confident`` counts them): ``box_iou_mean`` / ``box_iou_min``, the IoU of each ``out`` box with
    its ``ref`` box (1 when there are none), and ``box_px_mean``, the mean |Δxywh| in pixels.
    """
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: {ref.shape} vs {out.shape}")
    ref, out = ref.astype(np.float64), out.astype(np.float64)
    ds = np.abs(ref[..., 4:] - out[..., 4:])
    keep = (ref[..., 4] > conf) & (ref[..., 2:4].min(-1) >= min_box)
    a, b = ref[keep][:, :4], out[keep][:, :4]
    ix = np.clip(np.minimum(a[:, 0] + a[:, 2] / 2, b[:, 0] + b[:, 2] / 2)
                 - np.maximum(a[:, 0] - a[:, 2] / 2, b[:, 0] - b[:, 2] / 2), 0, None)
    iy = np.clip(np.minimum(a[:, 1] + a[:, 3] / 2, b[:, 1] + b[:, 3] / 2)
                 - np.maximum(a[:, 1] - a[:, 3] / 2, b[:, 1] - b[:, 3] / 2), 0, None)
    inter = ix * iy
    iou = inter / (a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter + 1e-9)
    return {"score_max": float(ds.max()), "score_mean": float(ds.mean()),
            "box_iou_mean": float(iou.mean()) if iou.size else 1.0,
            "box_iou_min": float(iou.min()) if iou.size else 1.0,
            "box_px_mean": float(np.abs(a - b).mean()) if iou.size else 0.0, "confident": int(keep.sum())}


def file_mb(path: str | Path) -> float:
    """File size in MB (10^6 bytes)."""
    return Path(path).stat().st_size / 1e6


__all__ = [
    "CALIBRATION_METHODS",
    "DEFAULT_CALIB_IMAGES",
    "INT8_SUFFIX",
    "INT8_TOL_BOX_IOU",
    "INT8_TOL_SCORE_MAX",
    "INT8_TOL_SCORE_MEAN",
    "calibration_batches",
    "calibration_images",
    "file_mb",
    "float_tail_nodes",
    "input_spec",
    "int8_path",
    "letterboxed",
    "ort_latency",
    "ort_session",
    "output_agreement",
    "quantize_int8",
]
