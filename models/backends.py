"""Inference backends with one interface: PyTorch (.pt) and onnxruntime (.onnx).

Used by detect.py (drawing detections) and validation (metrics on exported files, through
:class:`OnnxModel` and :func:`fit_input_to_model`), so both run the same pre- and post-processing
whatever the file format.
"""

from __future__ import annotations

import ast
import importlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import load_model
from utils.detect_outputs import split_outputs
from utils.geometry import round_to_stride


class TorchBackend:
    """PyTorch inference on a .pt checkpoint (ours or official YOLOv5), Conv+BN fused, eval mode.

    Interface shared with :class:`OnnxBackend`: ``stride`` (int, largest), ``names`` (list[str]),
    ``fixed_shape`` ((h, w) the input must have, or None when any stride multiple works),
    ``device``, and ``__call__(x (bs, 3, h, w) float 0-1) -> (bs, N, 5 + nc)`` decoded float32.
    """

    def __init__(self, weights: str | Path, device: torch.device, half: bool = False) -> None:
        self.device = device
        self.model = load_model(str(weights), device=str(device)).eval().fuse()
        self.half = half and device.type == "cuda"  # fp16 convolutions only pay off (and work) on GPU
        if self.half:
            self.model.half()
        self.stride = int(self.model.stride.max())
        names = self.model.names
        self.names = [names[k] for k in sorted(names)] if isinstance(names, dict) else list(names)
        self.fixed_shape: tuple[int, int] | None = None

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, torch.float16 if self.half else torch.float32)
        return split_outputs(self.model(x))[0].float()


def metadata_value(text: str | None) -> Any:
    """A metadata string as a Python value: JSON (our export.py) or a Python literal (YOLOv5's
    export.py writes ``str()`` of its values, e.g. ``"{0: 'person', 1: 'bicycle'}"`` and ``"32"``).

    Parsed with json.loads, then ast.literal_eval (literals only: nothing is evaluated); None when
    neither reads it.
    """
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def names_list(value: Any, nc: int) -> list[str]:
    """Class names from a list or an {id: name} dict (ids as ints or digit strings); 'class{i}'
    for anything else. ``nc`` (from the output shape; 0 if unknown) only sizes the default."""
    if isinstance(value, dict):
        try:
            return [str(value[k]) for k in sorted(value, key=int)]
        except (TypeError, ValueError):
            return [str(v) for v in value.values()]
    if isinstance(value, (list, tuple)) and value:
        return [str(v) for v in value]
    return [f"class{i}" for i in range(nc)]


def ort_providers(ort: Any, device: torch.device) -> list:
    """onnxruntime execution providers for ``device``: CUDA on that GPU (``--device 1`` → GPU 1, not
    onnxruntime's default GPU 0) when this onnxruntime has it, with the CPU as fallback."""
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxBackend:
    """onnxruntime inference on a file written by export.py or by YOLOv5's export.py (decoded
    output, first output of the graph).

    Reads ``stride`` and ``names`` from the file's metadata (see :func:`metadata_value`; defaults
    32 and class0..); a static input shape becomes ``fixed_shape``. See :class:`TorchBackend` for
    the interface.
    """

    def __init__(self, weights: str | Path, device: torch.device) -> None:
        try:
            ort = importlib.import_module("onnxruntime")
        except ImportError as e:
            raise ImportError("ONNX inference needs onnxruntime: pip install onnxruntime") from e
        self.device = device
        self.session = ort.InferenceSession(str(weights), providers=ort_providers(ort, device))
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.dtype = np.float16 if "float16" in inp.type else np.float32
        meta = self.session.get_modelmeta().custom_metadata_map
        stride = metadata_value(meta.get("stride"))
        # A stride may come as an int, a float or a per-level list: the largest is what counts.
        stride = max(stride) if isinstance(stride, (list, tuple)) and stride else stride
        self.stride = int(stride) if isinstance(stride, (int, float)) and stride > 0 else 32
        nc = self.session.get_outputs()[0].shape[-1]
        nc = nc - 5 if isinstance(nc, int) else 0
        self.names = names_list(metadata_value(meta.get("names")), nc)
        h, w = inp.shape[2], inp.shape[3]
        # Symbolic (dynamic) axes come back as strings; only integers pin the input size.
        self.fixed_shape = (h, w) if isinstance(h, int) and isinstance(w, int) else None
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().cpu().numpy().astype(self.dtype)
        n = arr.shape[0]
        if self.fixed_batch and n != self.fixed_batch:
            if n > self.fixed_batch:
                raise ValueError(f"this ONNX file takes batches of {self.fixed_batch}; re-export with --dynamic")
            # A file exported with a larger static batch: fill it with copies, keep the first n rows.
            arr = np.concatenate([arr, np.repeat(arr[-1:], self.fixed_batch - n, axis=0)])
        y = self.session.run(None, {self.input_name: arr})[0][:n]
        return torch.from_numpy(y.astype(np.float32)).to(self.device)


def load_backend(weights: str | Path, device: torch.device, half: bool = False) -> TorchBackend | OnnxBackend:
    """Choose the backend from the file suffix (.pt/.pth → PyTorch, .onnx → onnxruntime)."""
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(f"--weights {weights}: file not found")
    suffix = weights.suffix.lower()
    if suffix in (".pt", ".pth"):
        return TorchBackend(weights, device, half)
    if suffix == ".onnx":
        return OnnxBackend(weights, device)
    raise ValueError(f"--weights {weights}: unsupported format {suffix!r}; use a .pt or .onnx file")


class OnnxModel(nn.Module):
    """The evaluation model interface over :class:`OnnxBackend`: (B, 3, H, W) float 0-1 → decoded
    (B, N, 5 + nc); attributes ``nc``, ``names``, ``stride``, ``fixed_shape``, ``fixed_batch``."""

    def __init__(self, weights: str | Path, device: torch.device) -> None:
        super().__init__()
        self.backend = OnnxBackend(weights, device)
        self.names = list(self.backend.names)
        self.nc = len(self.names)
        self.stride = torch.tensor([float(self.backend.stride)])
        self.fixed_shape = self.backend.fixed_shape
        self.fixed_batch = self.backend.fixed_batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend(x)


def fit_input_to_model(model: nn.Module, weights: str | Path, imgsz: int, batch_size: int,
                       min_stride: int = 32) -> tuple[int, int, list[str]]:
    """Reconcile the requested square ``imgsz`` and ``batch_size`` with what ``model`` accepts.

    A fixed-shape ONNX file (``fixed_shape``/``fixed_batch``) imposes its own square size and at
    most its static batch; a non-square fixed input is refused (square letterboxes are all a
    validation feeds). Otherwise ``imgsz`` is rounded up to the grid stride (the model's largest
    stride, at least ``min_stride``). Returns ``(imgsz, batch_size, notes)``: one line per change,
    for the caller to show.
    """
    notes: list[str] = []
    fixed = getattr(model, "fixed_shape", None)
    if fixed:
        if fixed[0] != fixed[1]:
            raise ValueError(f"--weights {weights} has a fixed {fixed[0]}x{fixed[1]} input; validation letterboxes to "
                             f"squares: re-export with one --imgsz or with --dynamic")
        if imgsz != fixed[0]:
            notes.append(f"--weights {weights} has a fixed {fixed[0]}x{fixed[1]} input: using --imgsz {fixed[0]}")
        imgsz = fixed[0]
        notes.append(f"fixed-shape ONNX file: square letterboxed {imgsz}x{imgsz} batches (rect off)")
    fixed_batch = getattr(model, "fixed_batch", None)
    if fixed_batch and batch_size > fixed_batch:
        notes.append(f"--weights {weights} takes batches of {fixed_batch}: using --batch-size {fixed_batch}")
        batch_size = fixed_batch
    gs = max(int(model.stride.max()), min_stride)
    new = round_to_stride(imgsz, gs)[0]
    if new != imgsz:
        notes.append(f"--imgsz {imgsz} is not a multiple of the max stride {gs}; using {new}")
    return new, batch_size, notes
