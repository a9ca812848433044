"""Stage 2 of the knowledge analysis: foreground/background units, concept counts, summaries.

A unit u is a visual concept when ``H̄ − H_u > b``, with H̄ the mean entropy of the background units
(``baseline='bg'``, the paper's) or of all image units (``'all'``). Units lying entirely in
letterbox padding take no part. Per image: N_fg, N_bg and the ratio N_fg / (N_fg + N_bg).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from analysis.knowledge.entropy import grid_shape

BASELINES = ("bg", "all")


def _unit_edges(n_units: int, cell: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and end pixel of each of ``n_units`` units along one axis of ``size`` pixels."""
    start = np.arange(n_units) * cell
    return start, np.minimum(start + cell, size)


def box_cell_mask(
    boxes: np.ndarray, shape_hw: tuple[int, int], cell: int, min_overlap: float = 0.0
) -> np.ndarray:
    """Units overlapping any box: bool (gh, gw).

    boxes: (n, 4) x1 y1 x2 y2 in pixels of the (letterboxed) input. Unit (r, c) spans
    x ∈ [c·cell, min((c+1)·cell, W)), y likewise; it is marked when its intersection with some box
    has an area > ``min_overlap`` × the unit's area (by default any positive overlap: a box edge
    lying exactly on a unit border does not mark the unit beyond it).
    """
    H, W = shape_hw
    gh, gw = grid_shape(shape_hw, cell)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if not len(boxes):
        return np.zeros((gh, gw), dtype=bool)
    col_lo, col_hi = _unit_edges(gw, cell, W)
    row_lo, row_hi = _unit_edges(gh, cell, H)
    # Overlap lengths per (box, column) and (box, row); their outer product is the overlap area.
    over_x = (np.minimum(col_hi, boxes[:, [2]]) - np.maximum(col_lo, boxes[:, [0]])).clip(min=0)  # (n, gw)
    over_y = (np.minimum(row_hi, boxes[:, [3]]) - np.maximum(row_lo, boxes[:, [1]])).clip(min=0)  # (n, gh)
    area = np.einsum("nr,nc->nrc", over_y, over_x)
    unit_area = np.outer(row_hi - row_lo, col_hi - col_lo)
    return ((area > 0) & (area > min_overlap * unit_area)).any(0)


@dataclass
class ConceptCount:
    """Concept bookkeeping for one entropy map.

    n_fg / n_bg: concepts on foreground / background units; ratio: n_fg / (n_fg + n_bg) (NaN when
    the image has no concept); h_bar: the baseline entropy H̄; n_fg_units / n_bg_units: how many
    units each region has; h_fg / h_bg: mean entropy per region (NaN when empty); concepts: bool
    (gh, gw) map of the concept units.
    """

    n_fg: int
    n_bg: int
    ratio: float
    h_bar: float
    n_fg_units: int
    n_bg_units: int
    h_fg: float
    h_bg: float
    concepts: np.ndarray

    def record(self) -> dict[str, float | int]:
        """The scalar fields as a plain dict (for JSON)."""
        return {k: getattr(self, k) for k in ("n_fg", "n_bg", "ratio", "h_bar", "n_fg_units", "n_bg_units",
                                              "h_fg", "h_bg")}


def _region_mean(h: np.ndarray, region: np.ndarray) -> float:
    return float(h[region].mean()) if region.any() else float("nan")


def count_concepts(
    entropy: np.ndarray | torch.Tensor,
    fg: np.ndarray,
    valid: np.ndarray | None = None,
    b: float = 0.2,
    baseline: str = "bg",
) -> ConceptCount:
    """Concepts of one (gh, gw) entropy map: units with ``H̄ − H_u > b``.

    fg: bool (gh, gw) foreground units; valid: bool (gh, gw) units holding image content (None =
    all); background = valid & ~fg. ``baseline='bg'``: H̄ = mean H over background units (falls back
    to all valid units when the image has no background); ``'all'``: over all valid units.
    """
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    h = entropy.detach().cpu().numpy() if isinstance(entropy, torch.Tensor) else np.asarray(entropy, dtype=float)
    h = h.astype(np.float64)
    valid = np.ones(h.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if not valid.any():
        raise ValueError("count_concepts: no valid unit in the map")
    fg = np.asarray(fg, dtype=bool) & valid
    bg = valid & ~fg
    h_bar = _region_mean(h, bg if baseline == "bg" and bg.any() else valid)
    concepts = ((h_bar - h) > b) & valid
    n_fg, n_bg = int((concepts & fg).sum()), int((concepts & bg).sum())
    return ConceptCount(n_fg=n_fg, n_bg=n_bg, ratio=n_fg / (n_fg + n_bg) if n_fg + n_bg else float("nan"),
                        h_bar=h_bar, n_fg_units=int(fg.sum()), n_bg_units=int(bg.sum()),
                        h_fg=_region_mean(h, fg), h_bg=_region_mean(h, bg), concepts=concepts)


def mean_std(values: Sequence[float | None]) -> tuple[float, float, int]:
    """(mean, sample std with ddof=1 (0 for a single value), count) over the finite values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if not len(v):
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def summarize(counts: Sequence[ConceptCount]) -> dict[str, float | int]:
    """Mean and std over images of N_fg, N_bg, the ratio and the entropy gap H̄_bg − H̄_fg.

    Images without any concept have no ratio and are left out of its mean (``ratio_images`` says
    how many images it averages); images without foreground are left out of the gap.
    """
    out: dict[str, float | int] = {"images": len(counts)}
    columns = {
        "n_fg": [c.n_fg for c in counts],
        "n_bg": [c.n_bg for c in counts],
        "ratio": [c.ratio for c in counts],
        "h_gap": [c.h_bg - c.h_fg for c in counts],
    }
    for key, vals in columns.items():
        mean, std, n = mean_std(vals)
        out[f"{key}_mean"], out[f"{key}_std"] = mean, std
        if key in ("ratio", "h_gap"):
            out[f"{key}_images"] = n
    return out
