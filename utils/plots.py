"""Plots for validation and training: PR/F1 curves, confusion matrix, image grids, results, labels.

Figures are built with the object-oriented ``matplotlib.figure.Figure`` API and saved straight to
file, so no pyplot state and no global backend switch is involved: safe in headless runs and for
callers that use matplotlib interactively. Image grids are drawn with OpenCV (much faster than
matplotlib for many boxes).
"""

from __future__ import annotations

import colorsys
import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure(figsize: tuple[float, float], tight: bool = True) -> Figure:
    from matplotlib.figure import Figure  # lazy: importing this module must stay cheap

    return Figure(figsize=figsize, tight_layout=tight)


def _save(fig: Figure, save_path: str | Path, dpi: int = 150) -> Path:
    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(save_path, dpi=dpi)
    return save_path


def class_color(i: int, bgr: bool = False) -> tuple[int, int, int]:
    """A distinct, stable colour per class id: hues spaced by the golden ratio."""
    h = (int(i) * 0.618033988749895) % 1.0
    r, g, b = (int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.85, 0.95))
    return (b, g, r) if bgr else (r, g, b)


def plot_pr_curve(
    recall: np.ndarray, precision: np.ndarray, ap50: np.ndarray, names: Sequence[str], save_path: str | Path
) -> Path:
    """Precision-recall curves at IoU 0.5.

    recall: (101,) recall points; precision: (k, 101) interpolated precision per class;
    ap50: (k,) AP@0.5 per class (legend); names: (k,) names of those classes.
    """
    fig = _figure((9, 6))
    ax = fig.subplots()
    per_class_legend = 0 < len(names) < 21  # beyond that the legend hides the plot
    for i, y in enumerate(precision):
        ax.plot(recall, y, linewidth=1, label=f"{names[i]} {ap50[i]:.3f}" if per_class_legend else None)
    if len(precision):
        ax.plot(recall, precision.mean(0), linewidth=3, color="blue", label=f"all classes {np.mean(ap50):.3f} mAP@0.5")
    ax.set(xlabel="Recall", ylabel="Precision", xlim=(0, 1), ylim=(0, 1), title="Precision-Recall")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    return _save(fig, save_path)


def plot_mc_curve(
    x: np.ndarray,
    y: np.ndarray,
    names: Sequence[str],
    save_path: str | Path,
    xlabel: str = "Confidence",
    ylabel: str = "Metric",
) -> Path:
    """A metric versus confidence threshold per class (F1, P or R curve).

    x: (N,) confidence points; y: (k, N) metric per class; the mean over classes is drawn thick and
    its maximum is given in the legend.
    """
    fig = _figure((9, 6))
    ax = fig.subplots()
    per_class_legend = 0 < len(names) < 21
    for i, yi in enumerate(y):
        ax.plot(x, yi, linewidth=1, label=names[i] if per_class_legend else None)
    if len(y):
        mean = y.mean(0)
        best = int(mean.argmax())
        ax.plot(x, mean, linewidth=3, color="blue", label=f"all classes {mean[best]:.2f} at {x[best]:.3f}")
    ax.set(xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1), title=f"{ylabel}-{xlabel}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    return _save(fig, save_path)


def plot_confusion_matrix(
    matrix: np.ndarray, names: Sequence[str], save_path: str | Path, normalize: bool = True
) -> Path:
    """Heat-map of an (nc + 1, nc + 1) confusion matrix (rows predicted, columns true, last = background)."""
    nc = matrix.shape[0] - 1
    labels = [*list(names)[:nc], "background"]
    size = min(max(6.0, 0.45 * (nc + 1) + 3), 24.0)
    fig = _figure((size, size * 0.85))
    ax = fig.subplots()
    shown = np.where(matrix < 0.005, np.nan, matrix) if normalize else matrix.astype(float)
    im = ax.imshow(shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if nc < 30:  # tick labels and numbers only while they stay readable
        ax.set_xticks(range(nc + 1), labels, rotation=90, fontsize=8)
        ax.set_yticks(range(nc + 1), labels, fontsize=8)
        for (r, c), v in np.ndenumerate(matrix):
            if (normalize and v >= 0.005) or (not normalize and v > 0):
                txt = f"{v:.2f}" if normalize else str(int(v))
                ax.text(
                    c,
                    r,
                    txt,
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if v > 0.5 * np.nanmax(shown) else "black",
                )
    ax.set(xlabel="True", ylabel="Predicted", title="Confusion matrix" + (" (normalised)" if normalize else ""))
    return _save(fig, save_path)


def _draw_boxes(tile: np.ndarray, b, names: Sequence[str], scale: float, thickness: int, conf_thres: float) -> None:
    """Draw one image's (n, 5|6) ``cls x1 y1 x2 y2 [conf]`` rows (pixels before ``scale``) onto ``tile``."""
    b = b.detach().cpu().float().numpy() if isinstance(b, torch.Tensor) else np.asarray(b, dtype=float)
    for row in b:
        if row.size > 5 and row[5] < conf_thres:
            continue
        c = int(row[0])
        x1, y1, x2, y2 = (int(round(v * scale)) for v in row[1:5])
        color = class_color(c, bgr=True)
        cv2.rectangle(tile, (x1, y1), (x2, y2), color, thickness, cv2.LINE_AA)
        text = names[c] if 0 <= c < len(names) else str(c)
        if row.size > 5:
            text += f" {row[5]:.2f}"
        cv2.putText(tile, text, (x1, max(y1 - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.25 * thickness + 0.1, color, 1,
                    cv2.LINE_AA)


def plot_images(
    images: torch.Tensor | np.ndarray,
    boxes: Sequence[np.ndarray | torch.Tensor],
    names: Sequence[str],
    save_path: str | Path,
    paths: Sequence[str] | None = None,
    max_images: int = 16,
    max_size: int = 1920,
    conf_thres: float = 0.25,
) -> Path:
    """Save a grid of images with boxes drawn on them (labels or predictions).

    images: (B, 3, H, W) uint8 RGB (or float 0-1); boxes: per image an (n, 5) array
    cls, x1, y1, x2, y2 (labels) or (n, 6) with a confidence column appended (predictions), pixel
    coordinates of that image; predictions below ``conf_thres`` are not drawn.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = (images * 255 if images.max() <= 1.0 else images).clip(0, 255).astype(np.uint8)
    bs = min(len(images), max_images)
    _, _, h, w = images.shape
    ns = math.ceil(math.sqrt(bs))  # grid side
    # Shrink to fit max_size; enlarge small images (e.g. 96-160 px) so the labels stay legible.
    scale = min(max_size / (ns * max(h, w)), max(1.0, 320 / max(h, w)))
    h, w = math.ceil(h * scale), math.ceil(w * scale)
    mosaic = np.full((ns * h, ns * w, 3), 255, dtype=np.uint8)
    thickness = max(1, round(max(h, w) / 240))  # h, w are the tile size after scaling
    for i in range(bs):
        y0, x0 = (i // ns) * h, (i % ns) * w
        tile = np.ascontiguousarray(images[i].transpose(1, 2, 0)[..., ::-1])  # RGB CHW -> BGR HWC
        if scale != 1:
            tile = cv2.resize(tile, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        b = boxes[i] if i < len(boxes) else np.zeros((0, 5))
        _draw_boxes(tile, b, names, scale, thickness, conf_thres)
        if paths is not None and i < len(paths):
            cv2.putText(
                tile,
                Path(paths[i]).name[:40],
                (4, h - 6),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.4,
                (220, 220, 220),
                1,
                cv2.LINE_AA,
            )
        cv2.rectangle(tile, (0, 0), (w - 1, h - 1), (255, 255, 255), 2)
        mosaic[y0 : y0 + h, x0 : x0 + w] = tile
    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(save_path), mosaic)
    return save_path


# YOLOv5's results.png panels, in its order: train losses, P, R / val losses, mAPs.
RESULTS_PANELS = (
    "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
    "val/box_loss", "val/obj_loss", "val/cls_loss", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
)  # fmt: skip


def plot_results(csv_path: str | Path, save_path: str | Path | None = None) -> Path:
    """Plot the numeric columns of a training ``results.csv`` against the epoch, one small subplot each.

    YOLOv5's ten panels come first, in YOLOv5's layout (two rows of five), then every other numeric
    column (distillation terms, learning rates, fitness, time). Reads our file and YOLOv5's
    (space-padded fields). The x axis is the ``epoch`` column when present, else the row number.
    Returns the image path (default: ``results.png`` beside the csv).
    """
    csv_path = Path(csv_path)
    with csv_path.open(newline="") as f:
        rows = [[c.strip() for c in r] for r in csv.reader(f) if r]
    if not rows:
        raise ValueError(f"{csv_path}: empty results file, nothing to plot")
    header, body = rows[0], rows[1:]

    def as_float(v: str) -> float:
        try:
            return float(v)
        except ValueError:
            return math.nan

    data = np.array([[as_float(v) for v in r] + [math.nan] * (len(header) - len(r)) for r in body]).reshape(
        len(body), len(header)
    )
    x_col = header.index("epoch") if "epoch" in header else None
    x = data[:, x_col] if x_col is not None else np.arange(len(body))
    numeric = [i for i in range(len(header)) if i != x_col and np.isfinite(data[:, i]).any()]
    rank = {name: k for k, name in enumerate(RESULTS_PANELS)}
    cols = sorted(numeric, key=lambda i: rank.get(header[i], len(rank)))  # stable: others keep file order
    ncols = min(5, max(len(cols), 1))
    nrows = max(1, math.ceil(len(cols) / ncols))
    # fixed margins (in inches, so any number of rows looks the same): tight_layout measured every
    # tick label of the ~20 panels and took 1.1 of the 1.6 s this plot cost at the end of each run
    width, height = 3.2 * ncols, 2.6 * nrows
    fig = _figure((width, height), tight=False)
    fig.subplots_adjust(left=0.45 / width, right=1 - 0.15 / width, bottom=0.35 / height, top=1 - 0.35 / height,
                        wspace=0.3, hspace=0.45)
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    for ax, i in zip(axes, cols):
        ax.plot(x, data[:, i], marker=".", linewidth=1.5, markersize=5)
        ax.set_title(header[i], fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes[len(cols) :]:
        ax.axis("off")
    return _save(fig, save_path or csv_path.with_suffix(".png"))


def plot_labels(labels: Sequence[np.ndarray], names: Sequence[str], save_path: str | Path) -> Path:
    """Dataset label statistics: instances per class, box centres (x, y) and box sizes (w, h).

    labels: per image an (n, 5) array cls, xc, yc, w, h normalised to 0-1.
    """
    arrays = [np.asarray(a, dtype=float).reshape(-1, 5) for a in labels]
    lab = np.concatenate(arrays, 0) if arrays else np.zeros((0, 5))
    nc = max(len(names), int(lab[:, 0].max()) + 1 if len(lab) else 0)
    counts = np.bincount(lab[:, 0].astype(int), minlength=nc)
    fig = _figure((12, 4))
    ax0, ax1, ax2 = fig.subplots(1, 3)
    ax0.bar(range(nc), counts, color=[np.array(class_color(i)) / 255 for i in range(nc)])
    ax0.set(ylabel="instances", title=f"{len(lab)} labels, {len(arrays)} images")
    if nc <= 30:
        ax0.set_xticks(range(nc), [names[i] if i < len(names) else str(i) for i in range(nc)], rotation=90, fontsize=7)
    alpha = 0.5 if len(lab) < 2000 else 0.15  # dense sets need transparency to show density
    ax1.scatter(lab[:, 1], lab[:, 2], s=3, alpha=alpha, linewidths=0)
    ax1.set(xlabel="x", ylabel="y", xlim=(0, 1), ylim=(1, 0), title="box centres")
    ax2.scatter(lab[:, 3], lab[:, 4], s=3, alpha=alpha, linewidths=0)
    ax2.set(xlabel="width", ylabel="height", xlim=(0, 1), ylim=(0, 1), title="box sizes")
    return _save(fig, save_path)
