"""The images of the knowledge analysis: letterboxed inputs with their boxes and content area."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from analysis.knowledge.concepts import box_cell_mask


@dataclass
class Sample:
    """One letterboxed input.

    image: float (3, H, W) RGB 0-1 (the model's input); boxes: (n, 4) ground-truth x1 y1 x2 y2 in
    the letterboxed pixels; classes: (n,); content: x1 y1 x2 y2 of the real image inside the padding.
    """

    path: str
    image: torch.Tensor
    boxes: np.ndarray
    classes: np.ndarray
    content: tuple[float, float, float, float]

    def masks(self, cell: int) -> tuple[np.ndarray, np.ndarray]:
        """(fg, valid) bool (gh, gw) unit maps: units overlapping a box / the image content."""
        shape = (int(self.image.shape[1]), int(self.image.shape[2]))
        valid = box_cell_mask(np.asarray([self.content]), shape, cell)
        return box_cell_mask(self.boxes, shape, cell) & valid, valid


def _xywhn_to_pixels(xywhn: np.ndarray, width: int, height: int) -> np.ndarray:
    """(n, 4) normalised centre/size boxes → (n, 4) x1 y1 x2 y2 in pixels of a width×height image."""
    centre, half = xywhn[:, :2], xywhn[:, 2:] / 2
    scale = np.array([width, height], dtype=np.float64)
    return np.concatenate([(centre - half) * scale, (centre + half) * scale], axis=1)


def load_samples(
    sources: str | Path | Sequence[str | Path],
    imgsz: int,
    n: int,
    seed: int = 0,
    stride: int = 32,
    nc: int | None = None,
) -> list[Sample]:
    """``n`` images (all if fewer) picked at random with ``seed``, letterboxed to imgsz×imgsz.

    Uses :class:`utils.dataset.YoloDataset` without augmentation (the validation pipeline: resize
    so the long side is imgsz, never enlarging, then pad), whose labels already follow the
    letterbox: a normalised box (xc, yc, w, h) of the original image lands at
    x = xc·w0·r + padw, … with r the resize ratio, which we read back in pixels.
    """
    from utils.dataset import YoloDataset  # local: only the CLI path needs the data stack

    ds = YoloDataset(sources, imgsz=imgsz, batch_size=1, augment=False, rect=False, stride=stride, nc=nc)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(ds), size=min(int(n), len(ds)), replace=False))
    samples = []
    for i in picks:
        img, labels, path, (h0, w0), ((rh, rw), (padw, padh)) = ds[int(i)]
        boxes = _xywhn_to_pixels(labels[:, 2:6].numpy().astype(np.float64), int(img.shape[2]), int(img.shape[1]))
        content = (float(padw), float(padh), float(padw + w0 * rw), float(padh + h0 * rh))
        samples.append(Sample(str(path), img.float() / 255.0, boxes, labels[:, 1].numpy().astype(int), content))
    return samples
