"""Class-balanced image sampling (``--image-weights``, as YOLOv5 users know it).

Each epoch draws the training images with replacement, an image's chance proportional to

    w_img = Σ_{labels l in the image} c[cls(l)],    c[k] = (1 / n_k) / Σ_j (1 / n_j) · (1 − mAP_k)²

where n_k counts the training labels of class k (1 when the class has none) and mAP_k is the class's
mAP50-95 at the last validation (0 before the first, and under ``--noval``): rare classes, and
classes the model still gets wrong, are shown more often. Images without labels are never drawn
(unless no image has any weight: then all are equally likely).
The sampler is torch's ``WeightedRandomSampler``; the trainer re-weights it at each epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def inverse_frequency(labels: Sequence[np.ndarray], nc: int) -> np.ndarray:
    """(nc,) weights 1/n_k normalised to sum 1; ``labels``: per image an (n, 5+) array, class first."""
    counts = np.zeros(nc, dtype=np.float64)
    for lab in labels:
        if len(lab):
            counts += np.bincount(np.asarray(lab)[:, 0].astype(np.int64), minlength=nc)[:nc]
    weights = 1.0 / np.maximum(counts, 1.0)
    return weights / weights.sum()


def image_weights(labels: Sequence[np.ndarray], nc: int, class_maps: Sequence[float] | None = None) -> np.ndarray:
    """(n_images,) sampling weights (the module docstring's w_img); ``class_maps``: (nc,) per-class mAP50-95
    of the last validation, or None before any."""
    per_class = inverse_frequency(labels, nc)
    if class_maps is not None:
        per_class = per_class * (1.0 - np.clip(np.asarray(class_maps, dtype=np.float64), 0.0, 1.0)) ** 2
    out = np.zeros(len(labels), dtype=np.float64)
    for i, lab in enumerate(labels):
        if len(lab):
            out[i] = per_class[np.asarray(lab)[:, 0].astype(np.int64)].sum()
    return out if out.sum() > 0 else np.ones(len(labels))  # nothing left to favour (every mAP 1): uniform


__all__ = ["image_weights", "inverse_frequency"]
