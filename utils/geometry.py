"""The image-size convention: input sizes are multiples of the model's largest stride.

One function, :func:`round_to_stride`, used by validation, export, detection and the analysis
tools. Imports nothing from the project (a leaf ``models/`` may use).
"""

from __future__ import annotations

from collections.abc import Sequence


def round_to_stride(imgsz: int | Sequence[int], stride: int) -> tuple[int, int]:
    """(h, w) from one size or two (height, width), each rounded UP to a multiple of ``stride``.

    A detector's feature maps halve the input ``log2(stride)`` times, so any other size would
    lose pixels at the border (or fail in a concat of mismatched maps).
    """
    sizes = [imgsz] if isinstance(imgsz, int) else list(imgsz)
    sizes = sizes * 2 if len(sizes) == 1 else sizes
    if len(sizes) != 2 or min(sizes) <= 0:
        raise ValueError(f"--imgsz {imgsz}: give one size or two (height width), positive")
    h, w = (-(-int(s) // stride) * stride for s in sizes)
    return h, w
