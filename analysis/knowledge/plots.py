"""Stage 4 of the knowledge analysis: figures (entropy maps per image, learning dynamics).

matplotlib is imported inside the functions: importing the analysis must stay cheap.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from analysis.knowledge.concepts import ConceptCount
from analysis.knowledge.per_model import ModelKnowledge
from analysis.knowledge.samples import Sample


def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=figsize, layout="constrained")


def _save(fig: Any, save_path: str | Path) -> Path:
    save_path = Path(save_path)
    save_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(save_path, dpi=120)
    return save_path


def _outline(ax: Any, x: float, y: float, w: float, h: float, colour: str, width: float) -> None:
    from matplotlib.patches import Rectangle

    ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=width))


def _entropy_panel(ax: Any, label: str, rel: np.ndarray, cnt: ConceptCount, cell: int, span: float) -> Any:
    """H − H̄ on a shared diverging scale, concept units outlined in white; returns the image artist."""
    ax.set_facecolor("0.8")
    gh, gw = rel.shape
    im = ax.imshow(rel, cmap="RdBu_r", vmin=-span, vmax=span, extent=(0, cell * gw, cell * gh, 0),
                   interpolation="nearest")
    for row, col in np.argwhere(cnt.concepts):
        _outline(ax, col * cell, row * cell, cell, cell, "white", 0.6)
    ax.set_title(f"{label}\nfg {cnt.n_fg}  bg {cnt.n_bg}  H̄ {cnt.h_bar:.2f}", fontsize=8)
    return im


def plot_entropy_maps(
    sample: Sample, maps: Sequence[tuple[str, np.ndarray, ConceptCount]], cell: int, save_path: str | Path
) -> Path:
    """Side-by-side figure for one image: the input, then H_u − H̄ per model with the GT boxes drawn.

    maps: (label, entropy (gh, gw), counts) per model. Entropies are drawn relative to each
    model's baseline H̄ (concepts are defined relative to it, and overall levels differ between
    models) on one diverging scale shared by all panels: blue = below H̄ = relied upon, red =
    discarded; white outlines = concept units (H̄ − H_u > b); grey = letterbox padding.
    """
    img = sample.image.permute(1, 2, 0).cpu().numpy()
    H, W = img.shape[:2]
    _, valid = sample.masks(cell)
    rel = [np.where(valid, h - cnt.h_bar, np.nan) for _, h, cnt in maps]
    span = max([float(np.nanmax(np.abs(r))) for r in rel] + [1e-6])
    fig = _figure((3.0 * (len(maps) + 1) + 0.8, 3.4))
    axes = fig.subplots(1, len(maps) + 1, squeeze=False)[0]
    axes[0].imshow(img)
    axes[0].set_title(Path(sample.path).name, fontsize=8)
    artists = [_entropy_panel(ax, label, r, cnt, cell, span) for ax, (label, _, cnt), r in zip(axes[1:], maps, rel)]
    for ax in axes:
        for x1, y1, x2, y2 in sample.boxes:
            _outline(ax, x1, y1, x2 - x1, y2 - y1, "lime", 1.0)
        ax.set(xlim=(0, W), ylim=(H, 0), xticks=[], yticks=[])
    if artists:
        fig.colorbar(artists[-1], ax=list(axes[1:]), shrink=0.8, label="H − H̄ (nats/element)")
    return _save(fig, save_path)


def plot_dynamics(per_epoch: Sequence[ModelKnowledge], dyn: dict[str, Any], save_path: str | Path) -> Path:
    """N_fg and N_bg (mean ± std over images) and the retention of the final fg concepts per epoch."""
    ep = np.asarray(dyn["epochs"])
    fig = _figure((9, 3.4))
    ax1, ax2 = fig.subplots(1, 2)
    for key, colour in (("n_fg", "tab:orange"), ("n_bg", "tab:blue")):
        m = np.asarray([r.summary[f"{key}_mean"] for r in per_epoch])
        sd = np.asarray([r.summary[f"{key}_std"] for r in per_epoch])
        ax1.plot(ep, m, "o-", color=colour, label=f"N_{key[2:]}")
        ax1.fill_between(ep, m - sd, m + sd, color=colour, alpha=0.2)
    ax1.set(xlabel="epoch", ylabel="concepts per image", title="concepts learned")
    ax1.legend()
    ax2.plot(ep, dyn["retention"], "o-", color="tab:green")
    ax2.set(xlabel="epoch", ylabel="|S_j ∩ S_M| / |S_M|", ylim=(0, 1.05),
            title=f"retention (stability {dyn['stability']:.2f})")
    return _save(fig, save_path)
