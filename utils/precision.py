"""The run's arithmetic precision: which autocast dtype, memory format and loss scaling a device gets.

One `Precision` record is chosen per run (`choose_precision`) and handed to the training step, the
teacher and validation, so all three agree:

* CUDA, AMP on  → fp16 autocast + GradScaler (YOLOv5's `--amp`), channels_last;
* CPU with native bf16 (AVX512-BF16 or AMX-BF16) and AMP on → bf16 autocast, channels_last, no
  GradScaler (bf16 has fp32's exponent range, so gradients do not underflow);
* otherwise (or `--noamp`) → plain fp32, contiguous tensors: bit-for-bit the fp32 code path.

Inference in fp32 on a CPU (val.py, the final scoring of best.pt) uses `FP32_CPU_INFERENCE`: fp32
arithmetic in channels_last, which oneDNN runs without re-laying out every activation (1.7-2.5x
faster for a fused yolov5n at 320 px on this project's box); the outputs differ from contiguous fp32
by summation order only (~1e-7 relative), so the mAP stays YOLOv5's.

Weights stay fp32 (master weights) in every mode: autocast casts per op. The loss, the EMA and the
metrics are computed in fp32 (predictions are cast to float before the loss).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Precision:
    """``device_type`` 'cpu'/'cuda'; ``dtype`` the autocast dtype (None = fp32, autocast off);
    ``nhwc`` the memory format (None: channels_last exactly when autocast is on)."""

    device_type: str
    dtype: torch.dtype | None = None
    reason: str = ""
    nhwc: bool | None = None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def channels_last(self) -> bool:
        return self.enabled if self.nhwc is None else self.nhwc

    @property
    def scaler(self) -> bool:
        """Loss scaling is needed for fp16 only (bf16 keeps fp32's exponent range)."""
        return self.dtype == torch.float16

    @property
    def name(self) -> str:
        """'fp32', 'bf16' or 'fp16' (what opt.yaml records as ``amp``)."""
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast region of this precision; a no-op context when it is fp32."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def memory_format(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in channels_last when this precision uses it (4-D tensors only)."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def images(self, imgs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, 3, H, W) uint8 0-255 images as ``dtype`` 0-1 in this precision's memory format.

        The cast and the re-layout are one pass (then an in-place division): at batch 32 × 320 px
        that is 21 ms instead of 44 ms for cast, divide, re-layout — the same values. Floating
        inputs are taken as already scaled and only re-laid out.
        """
        if imgs.is_floating_point():
            return self.memory_format(imgs.to(dtype))
        layout = torch.channels_last if self.channels_last and imgs.dim() == 4 else torch.contiguous_format
        return imgs.to(dtype, memory_format=layout).div_(255)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The student in this precision's memory format (weights stay fp32: master weights)."""
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def describe(self) -> str:
        """The one line printed at the start of a run."""
        if not self.enabled:
            return f"AMP: off, fp32 ({self.reason})" if self.reason else "AMP: off, fp32"
        scaler = " + GradScaler" if self.scaler else ""
        return f"AMP: {self.name} autocast{scaler} + channels_last ({self.reason})"


FP32_CPU = Precision("cpu")
FP32_CPU_INFERENCE = Precision("cpu", None, "fp32 inference in channels_last", nhwc=True)


def cpu_bf16_support() -> str:
    """The CPU's native bf16 feature ('AMX-BF16' or 'AVX512-BF16'), or '' when it has none.

    Read from /proc/cpuinfo's flags (Linux); elsewhere from oneDNN's own bf16 check. Without native
    bf16, oneDNN emulates it and bf16 autocast is slower than fp32, so such CPUs stay in fp32.
    """
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        flags = set()
        for line in cpuinfo.read_text(errors="ignore").splitlines():
            if line.startswith("flags"):
                flags.update(line.split(":", 1)[-1].split())
                break
        if "amx_bf16" in flags:
            return "AMX-BF16"
        return "AVX512-BF16" if "avx512_bf16" in flags else ""
    try:
        return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else ""
    except (AttributeError, RuntimeError):
        return ""


def choose_precision(device: torch.device, amp: bool = True) -> Precision:
    """The precision a run on ``device`` uses; ``amp`` False (``--noamp``) forces fp32."""
    if not amp:
        return Precision(device.type, None, "--noamp")
    if device.type == "cuda":
        return Precision("cuda", torch.float16, "CUDA")
    if device.type == "cpu":
        feature = cpu_bf16_support()
        if feature:
            return Precision("cpu", torch.bfloat16, f"CPU has {feature}")
        return Precision("cpu", None, "this CPU has no native bf16")
    return Precision(device.type, None, f"no AMP on {device.type}")


def to_float(tree):
    """Floating tensors of a (nested list/tuple of) tensor(s) cast to fp32; the rest as is."""
    if isinstance(tree, torch.Tensor):
        return tree.float() if tree.is_floating_point() and tree.dtype != torch.float32 else tree
    if isinstance(tree, (list, tuple)):
        items = [to_float(t) for t in tree]
        return items if isinstance(tree, list) else tuple(items)
    return tree


__all__ = ["FP32_CPU", "FP32_CPU_INFERENCE", "Precision", "choose_precision", "cpu_bf16_support", "to_float"]
