"""Stage 3 of the knowledge analysis: one model on a set of images, and one run's epoch checkpoints.

Learning dynamics: with S_j the set of (image, unit) foreground concepts of the epoch-j model and
M the last epoch, ``stability = |S_M| / |⋃_j S_j|`` and ``retention_j = |S_j ∩ S_M| / |S_M|``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.knowledge.concepts import ConceptCount, count_concepts, mean_std, summarize
from analysis.knowledge.entropy import EntropySettings, learn_entropy
from analysis.knowledge.features import FeatureExtractor
from analysis.knowledge.samples import Sample
from utils.torch_utils import unwrap_model

_EPOCH_FILE = re.compile(r"^epoch(\d+)\.pt$")


@dataclass
class ModelKnowledge:
    """Per-image entropy maps and concept counts of one model, and their summary over images."""

    label: str
    source: str
    feature: str
    entropy: list[np.ndarray]
    counts: list[ConceptCount]
    change: list[float]
    summary: dict[str, float | int]


def _batch_generator(device: torch.device, seed: int, start: int) -> torch.Generator:
    """The noise source of the batch starting at image ``start``: the same for every model."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) * 1_000_003 + start)
    return gen


def analyze_model(
    model: nn.Module,
    samples: Sequence[Sample],
    settings: EntropySettings | None = None,
    b: float = 0.2,
    baseline: str = "bg",
    layer: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    label: str = "model",
    source: str = "",
    log: Callable[[str], None] | None = None,
) -> ModelKnowledge:
    """Entropy maps and concepts of ``model`` on ``samples`` (all of one size).

    Images are optimised ``batch_size`` at a time. The noise of batch k comes from a generator
    seeded with (seed, k), so every model sees the same noise draws (common random numbers make
    model-to-model differences less noisy).
    """
    s = settings or EntropySettings()
    device = next(unwrap_model(model).parameters()).device
    step = max(1, batch_size)
    out = ModelKnowledge(label, source, "", [], [], [], {})
    with FeatureExtractor(model, layer) as fx:
        out.feature = fx.description
        for start in range(0, len(samples), step):
            batch = samples[start : start + step]
            images = torch.stack([smp.image for smp in batch]).to(device)
            res = learn_entropy(fx, images, s, _batch_generator(device, seed, start))
            for smp, h, ch in zip(batch, res.entropy.cpu().numpy(), res.change.cpu().tolist()):
                out.entropy.append(h)
                out.counts.append(count_concepts(h, *smp.masks(s.cell), b=b, baseline=baseline))
                out.change.append(float(ch))
            if log is not None:
                log(f"{label}: {start + len(batch)}/{len(samples)} images")
    out.summary = summarize(out.counts)
    return out


def epoch_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of every ``epochN.pt`` in ``folder`` (written by ``--save-period``), by epoch."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--epochs-dir {folder} not found")
    matches = ((_EPOCH_FILE.match(p.name), p) for p in folder.iterdir())
    found = sorted((int(m.group(1)), p) for m, p in matches if m and p.is_file())
    if not found:
        raise FileNotFoundError(f"--epochs-dir {folder} has no epochN.pt files (train with --save-period 1)")
    return found


def concept_dynamics(epochs: Sequence[int], fg_concepts: Sequence[Sequence[np.ndarray]]) -> dict[str, Any]:
    """Stability of the foreground concepts over training.

    fg_concepts[j][k]: bool (gh, gw) foreground concepts of image k at epochs[j]; the last entry is
    the final model M. S_j = ⋃_k {(k, u)}: the (image, unit) pairs. Returns ``stability`` =
    |S_M| / |⋃_j S_j| (NaN when no epoch has a concept), per epoch ``retention`` = |S_j ∩ S_M| / |S_M|
    and ``discarded`` = |S_j \\ S_M| / |S_j| (NaN for empty denominators), and ``peak`` = per image,
    the first epoch at which its N_fg reaches its maximum, divided by the final epoch (mean and
    std over images: small = concepts learned early, in one go; an epoch-count stand-in for the
    paper's learning-effort metric, which measures progress in weight-space distance).
    """
    if len(epochs) != len(fg_concepts) or not len(epochs):
        raise ValueError("concept_dynamics: one list of concept maps per epoch is needed")
    # S_j as one bool row per epoch over the (image, unit) pairs of all images, maps laid end to end.
    sets = np.stack([np.concatenate([np.asarray(m, dtype=bool).ravel() for m in maps]) for maps in fg_concepts])
    final = sets[-1]
    n_final = int(final.sum())
    n_union = int(sets.any(0).sum())
    sizes = sets.sum(1)
    kept = (sets & final).sum(1)
    nan = float("nan")
    counts = np.asarray([[int(np.sum(m)) for m in maps] for maps in fg_concepts])  # (epochs, images) N_fg
    peak_mean, peak_std, _ = mean_std([epochs[int(j)] / epochs[-1] for j in counts.argmax(0)])
    return {
        "epochs": list(map(int, epochs)),
        "stability": n_final / n_union if n_union else nan,
        "final_fg_concepts": n_final,
        "union_fg_concepts": n_union,
        "retention": [int(k) / n_final if n_final else nan for k in kept],
        "discarded": [int(t - k) / int(t) if t else nan for t, k in zip(sizes, kept)],
        "peak_mean": peak_mean,
        "peak_std": peak_std,
    }
