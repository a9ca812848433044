"""AutoAnchor: how well a detector's anchors fit a dataset's boxes, and better ones when they do not.

Training assigns a label to an anchor when neither side ratio is beyond the ``anchor_t`` threshold
(hyp, 4.0): with r = (w / a_w, h / a_h), the pair's *match* is m = min(r_w, 1/r_w, r_h, 1/r_h) ∈ (0, 1],
and the label can be learnt by that anchor when m > 1/anchor_t. So, for a set of label sizes:

- best-possible recall (BPR) = fraction of labels whose best anchor (max over anchors of m) passes;
- fitness = mean over labels of that best m, counting only the passing ones (0 otherwise); it
  rewards tighter matches, not just passing ones, and drives the search below.

Label sizes are measured as training sees them: each image resized so its long side is ``imgsz``,
times a random size jitter of ±``jitter`` per image (default 10 %, the figure YOLOv5 reports its
BPR with), so the BPR printed here is comparable with YOLOv5's.

When the BPR of the model's anchors is below :data:`BPR_TARGET`, new anchors are searched: k-means
on log(w), log(h) (sizes are scale quantities: clustering their logarithms treats 10→20 px like
100→200 px) seeded k-means++-style, then an evolution strategy that mutates all anchors
multiplicatively (log-normal steps, several step sizes per generation) and keeps a candidate only
when it raises the fitness. The result is sorted by area and dealt out fine → coarse: the smallest
``na`` anchors to the level with the smallest stride. They replace the model's anchors only when
their BPR is higher. Placeholder anchors (a yaml giving only ``anchors: 3``) are always replaced.

The model's Detect keeps anchors in grid units of each level (pixels / stride); this module works
in pixels and converts at the boundary. Randomness comes from one ``numpy.random.Generator`` seeded
by the caller: the same seed and data give the same anchors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from utils.anchors import placeholder_anchors

BPR_TARGET = 0.98  # below this, anchors are searched
MIN_SIDE_PX = 2.0  # labels smaller than this (pixels, either side) are left out of the search
DEFAULT_JITTER = 0.1
EVOLVE_GENERATIONS = 300
EVOLVE_POPULATION = 8  # candidates tried per generation
STEP_SIZES = (0.02, 0.05, 0.1, 0.25)  # σ of the log-normal mutation, one per candidate (cycled)
MAX_SEARCH_LABELS = 30_000  # the search runs on a random subset of this size; BPR always on all


# ---------------------------------------------------------------------------------- label sizes
def training_label_sizes(labels: Sequence[np.ndarray], shapes: np.ndarray, imgsz: int,
                         jitter: float = DEFAULT_JITTER, rng: np.random.Generator | None = None) -> np.ndarray:
    """(n, 2) label widths and heights in pixels as training sees them.

    labels: per image (k, 5) ``[cls, xc, yc, w, h]`` normalised; shapes: (N, 2) original (w, h) per
    image. Each image is scaled so its long side is ``imgsz``, then by a factor drawn uniformly from
    [1 − jitter, 1 + jitter]. Zero-size labels are dropped.
    """
    rng = rng or np.random.default_rng(0)
    shapes = np.asarray(shapes, dtype=np.float64).reshape(-1, 2)
    if len(labels) != len(shapes):
        raise ValueError(f"{len(labels)} label arrays for {len(shapes)} image shapes")
    resized = shapes * (imgsz / shapes.max(1, keepdims=True))  # (N, 2) pixels after resizing
    factors = rng.uniform(1 - jitter, 1 + jitter, size=len(shapes))
    parts = [np.asarray(lb, dtype=np.float64).reshape(-1, 5)[:, 3:5] * (resized[i] * factors[i])
             for i, lb in enumerate(labels)]
    wh = np.concatenate(parts, 0) if parts else np.zeros((0, 2))
    return wh[(wh > 0).all(1)]


# ---------------------------------------------------------------------------------------- metrics
def match_matrix(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(..., n, K) match m = min over w, h of min(r, 1/r), r = label side / anchor side.

    wh (n, 2) pixels; anchors (K, 2) or a population (P, K, 2) pixels.
    """
    ratio = wh[:, None, :] / anchors[..., None, :, :]  # (..., n, K, 2)
    return np.minimum(ratio, 1.0 / ratio).min(-1)  # the worse side decides


def best_match(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """(..., n) each label's match with its best anchor."""
    return match_matrix(wh, anchors).max(-1)


def best_possible_recall(wh: np.ndarray, anchors: np.ndarray, threshold: float) -> float:
    """Fraction of labels some anchor can learn (best match > 1/threshold); 0 for no labels."""
    if not len(wh):
        return 0.0
    return float((best_match(wh, anchors) > 1.0 / threshold).mean())


def anchors_per_label(wh: np.ndarray, anchors: np.ndarray, threshold: float) -> float:
    """Mean number of anchors each label passes the threshold with (how many predictions learn it)."""
    if not len(wh):
        return 0.0
    return float((match_matrix(wh, anchors) > 1.0 / threshold).sum(-1).mean())


def anchor_fitness(wh: np.ndarray, anchors: np.ndarray, threshold: float) -> np.ndarray | float:
    """Mean over labels of the best match where it passes 1/threshold (else 0); per candidate
    for a population (P, K, 2)."""
    best = best_match(wh, anchors)
    score = np.where(best > 1.0 / threshold, best, 0.0).mean(-1)
    return float(score) if np.ndim(score) == 0 else score


# ----------------------------------------------------------------------------------------- search
def _seed_centres(points: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding: each next centre drawn with probability ∝ squared distance to the nearest."""
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        d2 = ((points[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1).min(1)
        total = d2.sum()
        pick = rng.integers(len(points)) if total <= 0 else rng.choice(len(points), p=d2 / total)
        centres.append(points[pick])
    return np.asarray(centres)


def kmeans_anchors(wh: np.ndarray, k: int, rng: np.random.Generator, iterations: int = 50) -> np.ndarray:
    """(k, 2) pixel anchors: Lloyd's k-means on (log w, log h), k-means++ seeds; sorted by area.

    Fewer distinct sizes than k: the missing anchors are the existing ones scaled by 1.5 steps.
    """
    points = np.log(wh)
    distinct = np.unique(points, axis=0)
    if len(distinct) <= k:
        centres = distinct
    else:
        centres = _seed_centres(points, k, rng)
        for _ in range(iterations):
            nearest = ((points[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
            moved = np.array([points[nearest == j].mean(0) if (nearest == j).any() else centres[j] for j in range(k)])
            if np.allclose(moved, centres):
                break
            centres = moved
    anchors = np.exp(centres)
    while len(anchors) < k:
        anchors = np.concatenate([anchors, anchors[-1:] * 1.5])
    return anchors[np.argsort(anchors.prod(1))]


def evolve_anchors(wh: np.ndarray, start: np.ndarray, threshold: float, rng: np.random.Generator,
                   generations: int = EVOLVE_GENERATIONS, population: int = EVOLVE_POPULATION) -> np.ndarray:
    """Hill-climbing evolution of (K, 2) pixel anchors on :func:`anchor_fitness`.

    Each generation draws ``population`` mutants of the current best: every coordinate multiplied
    by exp(σ·z), z ~ N(0, 1), σ cycling through :data:`STEP_SIZES` (small and large steps in the same
    generation), sides kept >= MIN_SIDE_PX. The best mutant replaces the parent only if it is
    strictly fitter. Returns the final anchors sorted by area.
    """
    best = np.asarray(start, dtype=np.float64).copy()
    best_fit = anchor_fitness(wh, best, threshold)
    sigmas = np.resize(np.asarray(STEP_SIZES), population)[:, None, None]  # (P, 1, 1)
    for _ in range(generations):
        steps = rng.standard_normal((population, *best.shape)) * sigmas
        mutants = np.maximum(best[None] * np.exp(steps), MIN_SIDE_PX)  # (P, K, 2)
        fits = anchor_fitness(wh, mutants, threshold)
        j = int(np.argmax(fits))
        if fits[j] > best_fit:
            best, best_fit = mutants[j], float(fits[j])
    return best[np.argsort(best.prod(1))]


def search_anchors(wh: np.ndarray, k: int, threshold: float, rng: np.random.Generator,
                   generations: int = EVOLVE_GENERATIONS) -> np.ndarray:
    """(k, 2) pixel anchors fitted to ``wh``: k-means then evolution, on labels >= MIN_SIDE_PX."""
    usable = wh[(wh >= MIN_SIDE_PX).all(1)]
    if len(usable) == 0:
        raise ValueError(f"no labels of at least {MIN_SIDE_PX:g} px to fit anchors to")
    if len(usable) > MAX_SEARCH_LABELS:
        usable = usable[rng.choice(len(usable), MAX_SEARCH_LABELS, replace=False)]
    return evolve_anchors(usable, kmeans_anchors(usable, k, rng), threshold, rng, generations)


# ------------------------------------------------------------------------------------ the model
def pixel_anchors(detect) -> torch.Tensor:
    """(nl, na, 2) anchors of a Detect layer in pixels (its buffer holds grid units)."""
    return detect.anchors.detach().float().cpu() * detect.stride.detach().float().cpu().view(-1, 1, 1)


def has_placeholder_anchors(model) -> bool:
    """True when the yaml gave only an anchor count and the anchors are still the placeholders
    (not since loaded from a checkpoint)."""
    count = model.yaml.get("anchors")
    if not isinstance(count, int) or isinstance(count, bool):
        return False
    det = model.detect
    expected = placeholder_anchors(det.na, det.stride.detach().float().cpu())
    return bool(torch.allclose(pixel_anchors(det), expected, rtol=1e-3))


def set_pixel_anchors(detect, anchors_px: np.ndarray) -> None:
    """Write (nl·na, 2) pixel anchors sorted by area into ``detect`` fine → coarse, in grid units.

    The smallest ``na`` go to the level with the smallest stride. The buffer is updated in place,
    so references to it (loss, EMA copies made later) stay valid.
    """
    stride = detect.stride.detach().float().cpu()
    ordered = np.asarray(anchors_px, dtype=np.float64)
    ordered = ordered[np.argsort(ordered.prod(1))].reshape(detect.nl, detect.na, 2)
    grid = torch.empty(detect.nl, detect.na, 2, dtype=torch.float32)
    for rank, level in enumerate(torch.argsort(stride).tolist()):
        grid[level] = torch.from_numpy(ordered[rank]).float() / stride[level]
    with torch.no_grad():
        detect.anchors.copy_(grid.to(detect.anchors))


@dataclass
class AnchorReport:
    """What :func:`check_anchors` found and did (pixel anchors as (nl·na, 2) arrays)."""

    bpr_before: float
    anchors_per_label_before: float
    anchors_before: np.ndarray
    bpr_after: float | None = None  # None: no search was run
    anchors_after: np.ndarray | None = None
    replaced: bool = False
    reason: str = ""
    labels: int = 0


def check_anchors(model, labels: Sequence[np.ndarray], shapes: np.ndarray, imgsz: int, threshold: float = 4.0,
                  enabled: bool = True, seed: int = 0, jitter: float = DEFAULT_JITTER,
                  generations: int = EVOLVE_GENERATIONS, log: Callable[[str], None] | None = print) -> AnchorReport:
    """Measure the BPR of ``model``'s anchors on the dataset; search and install better ones if needed.

    labels/shapes: a YoloDataset's ``labels`` and ``shapes``; imgsz: the training size; threshold:
    hyp ``anchor_t``. Searches when the BPR < BPR_TARGET (and ``enabled``), or always for placeholder
    anchors (see :func:`has_placeholder_anchors`; ``enabled`` False does not keep those: they are no
    one's choice). Searched anchors replace the model's only when their BPR is higher, placeholders
    always. ``log`` gets one line per finding (None: silent).
    """
    say = log or (lambda _: None)
    rng = np.random.default_rng(seed)
    det = model.detect
    current = pixel_anchors(det).reshape(-1, 2).numpy().astype(np.float64)
    wh = training_label_sizes(labels, shapes, imgsz, jitter, rng)
    report = AnchorReport(best_possible_recall(wh, current, threshold), anchors_per_label(wh, current, threshold),
                          current, labels=len(wh))
    say(f"AutoAnchor: {report.anchors_per_label_before:.2f} anchors/label, best possible recall (BPR) "
        f"{report.bpr_before:.4f} on {len(wh)} labels at --imgsz {imgsz} (anchor_t {threshold:g})")
    placeholder = has_placeholder_anchors(model)
    if not len(wh):
        report.reason = "no labels"
        return report
    if not placeholder and not enabled:
        report.reason = "--noautoanchor"
        return report
    if not placeholder and report.bpr_before >= BPR_TARGET:
        report.reason = f"BPR >= {BPR_TARGET}: anchors kept"
        say(f"AutoAnchor: the anchors fit the data (BPR >= {BPR_TARGET}); kept")
        return report
    why = f"BPR < {BPR_TARGET}"
    if placeholder:
        why = "the yaml gives only an anchor count" + ("" if enabled else " (--noautoanchor keeps chosen anchors only)")
    say(f"AutoAnchor: {why}; searching {det.nl * det.na} anchors (k-means + evolution, {generations} generations)")
    found = search_anchors(wh, det.nl * det.na, threshold, rng, generations)
    report.anchors_after = found
    report.bpr_after = best_possible_recall(wh, found, threshold)
    report.replaced = placeholder or report.bpr_after > report.bpr_before
    if report.replaced:
        set_pixel_anchors(det, found)
        report.reason = "placeholder anchors replaced" if placeholder else "higher BPR"
        shown = ", ".join(f"{w:.0f},{h:.0f}" for w, h in found)
        say(f"AutoAnchor: new anchors BPR {report.bpr_after:.4f} (was {report.bpr_before:.4f}); installed "
            f"(pixels, fine to coarse): {shown}")
    else:
        report.reason = "search found no higher BPR"
        say(f"AutoAnchor: searched anchors BPR {report.bpr_after:.4f} is not higher than {report.bpr_before:.4f}; "
            "original anchors kept")
    return report


__all__ = ["BPR_TARGET", "AnchorReport", "anchor_fitness", "anchors_per_label", "best_match", "best_possible_recall",
           "check_anchors", "evolve_anchors", "has_placeholder_anchors", "kmeans_anchors", "match_matrix",
           "pixel_anchors", "search_anchors", "set_pixel_anchors", "training_label_sizes"]
