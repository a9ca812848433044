"""Stage 4 of the knowledge analysis: markdown tables and the JSON records of a run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from analysis.knowledge.concepts import mean_std
from analysis.knowledge.per_model import ModelKnowledge
from analysis.knowledge.samples import Sample

PAPER = "Cheng et al., Explaining Knowledge Distillation by Quantifying the Knowledge, CVPR 2020"


def _pm(mean: float, std: float, digits: int = 2) -> str:
    """``mean ± std`` with ``digits`` decimals; a dash when there is no value."""
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _counts_cells(s: dict[str, Any]) -> tuple[str, str]:
    return _pm(s["n_fg_mean"], s["n_fg_std"], 1), _pm(s["n_bg_mean"], s["n_bg_std"], 1)


def markdown_table(results: Sequence[ModelKnowledge]) -> str:
    """One row per model: N_fg, N_bg, ratio, entropy gap, relative feature change (mean ± std)."""
    lines = [
        "| model | N_fg | N_bg | N_fg/(N_fg+N_bg) | H̄_bg − H̄_fg (nats) | E‖Δf‖²/s_f² | images |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        s = r.summary
        ch_mean, ch_std, _ = mean_std(r.change)
        ratio = _pm(s["ratio_mean"], s["ratio_std"], 3)
        if s["ratio_images"] != s["images"]:
            ratio += f" ({s['ratio_images']} img)"
        n_fg, n_bg = _counts_cells(s)
        lines.append(f"| {r.label} | {n_fg} | {n_bg} | {ratio} | {_pm(s['h_gap_mean'], s['h_gap_std'], 3)} | "
                     f"{_pm(ch_mean, ch_std, 3)} | {s['images']} |")
    return "\n".join(lines)


def dynamics_table(per_epoch: Sequence[ModelKnowledge], dyn: dict[str, Any]) -> str:
    """One row per epoch checkpoint: N_fg, N_bg, ratio (mean ± std) and the retention of S_M."""
    lines = ["| epoch | N_fg | N_bg | N_fg/(N_fg+N_bg) | retention of final fg concepts |", "|---|---|---|---|---|"]
    for ep, r, ret in zip(dyn["epochs"], per_epoch, dyn["retention"]):
        n_fg, n_bg = _counts_cells(r.summary)
        lines.append(f"| {ep} | {n_fg} | {n_bg} | {_pm(r.summary['ratio_mean'], r.summary['ratio_std'], 3)} | "
                     f"{ret:.3f} |")
    lines.append("")
    lines.append(
        f"stability |S_M| / |∪_j S_j| = {dyn['stability']:.3f} ({dyn['final_fg_concepts']} final / "
        f"{dyn['union_fg_concepts']} ever); N_fg peaks at {_pm(dyn['peak_mean'], dyn['peak_std'], 2)} "
        f"of training"
    )
    return "\n".join(lines)


def jsonable(x: Any) -> Any:
    """NaN/inf → None, numpy scalars → Python, recursively (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


def model_record(r: ModelKnowledge, samples: Sequence[Sample]) -> dict[str, Any]:
    """One model's JSON entry: identity, feature, summary and a record per image."""
    return {
        "label": r.label,
        "weights": r.source,
        "feature": r.feature,
        "summary": r.summary,
        "per_image": [{"image": smp.path, **c.record(), "change": ch}
                      for smp, c, ch in zip(samples, r.counts, r.change)],
    }
