"""Multi-scale training (``--multi-scale``, as YOLOv5 users know it): each batch at its own random size.

The size of a batch is drawn around ``--imgsz``: an integer uniform in [imgsz/2, 3·imgsz/2 + stride),
floored to a multiple of the model's largest stride (at least one stride). The batch is then resized
bilinearly so that its long side is that size, each side rounded up to a stride multiple. Labels
are normalised to the image, so they need no change; validation stays at ``--imgsz``.

The draw is a pure function of (seed, global batch index, rank): a resumed run gets the sizes the
uninterrupted run would have had, with no generator state to save. Under DDP every rank draws its
own size (gradients are averaged whatever the input size).
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F


def draw_long_side(imgsz: int, stride: int, seed: int, batch_index: int, rank: int = 0) -> int:
    """The long side, in pixels, of global batch ``batch_index`` (a multiple of ``stride``)."""
    draw = random.Random(f"multi-scale/{seed}/{rank}/{batch_index}")  # str seeds hash stably (sha512)
    lo, hi = int(imgsz * 0.5), int(imgsz * 1.5) + stride
    return max(draw.randrange(lo, hi) // stride * stride, stride)


def resize_batch(imgs: torch.Tensor, long_side: int, stride: int) -> torch.Tensor:
    """``imgs`` (B, C, H, W) floating point, resized bilinearly so the longer of H, W becomes about
    ``long_side``; both output sides are multiples of ``stride`` (rounded up). Same memory format."""
    if not imgs.is_floating_point():
        raise TypeError(f"resize_batch needs floating-point images, got {imgs.dtype}")
    h, w = imgs.shape[-2:]
    factor = long_side / max(h, w)
    if factor == 1:
        return imgs
    size = [math.ceil(side * factor / stride) * stride for side in (h, w)]
    return F.interpolate(imgs, size=size, mode="bilinear", align_corners=False)


__all__ = ["draw_long_side", "resize_batch"]
