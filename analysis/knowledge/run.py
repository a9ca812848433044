"""Stage 5 of the knowledge analysis: the whole run behind ``analyze_kd.py``.

Check the request → load the images once → analyse each checkpoint (and each epoch checkpoint of
one run) on the same images → write tables, JSON, entropy maps and figures into a run folder.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.knowledge.concepts import BASELINES
from analysis.knowledge.entropy import EntropySettings
from analysis.knowledge.per_model import ModelKnowledge, analyze_model, concept_dynamics, epoch_checkpoints
from analysis.knowledge.plots import plot_dynamics, plot_entropy_maps
from analysis.knowledge.report import PAPER, dynamics_table, jsonable, markdown_table, model_record
from analysis.knowledge.samples import Sample, load_samples
from utils.geometry import round_to_stride


@dataclass
class _Request:
    """The checked inputs: checkpoints with their labels, epoch checkpoints, the dataset config."""

    weights: list[Path]
    labels: list[str]
    epochs: list[tuple[int, Path]]
    data_cfg: dict[str, Any]


def _check_request(weights: Sequence[str | Path], labels: Sequence[str] | None, data: str | Path, split: str,
                   epochs_dir: str | Path | None, baseline: str) -> _Request:
    """One-line FileNotFoundError / ValueError naming the flag, before anything heavy is loaded."""
    from utils.data_config import load_data_config  # local: keeps `import analysis.knowledge` light

    if baseline not in BASELINES:
        raise ValueError(f"--baseline must be one of {BASELINES}, got {baseline!r}")
    paths = [Path(w) for w in weights]
    if not paths and epochs_dir is None:
        raise ValueError("give --weights and/or --epochs-dir")
    names = list(labels) if labels else [w.stem for w in paths]
    if len(names) != len(paths):
        raise ValueError(f"--labels gives {len(names)} names for {len(paths)} --weights")
    if len(set(names)) != len(names):
        raise ValueError(f"--labels must be distinct, got {names}")
    missing = next((w for w in paths if not w.is_file()), None)
    if missing is not None:
        raise FileNotFoundError(f"--weights {missing} not found")
    epochs = epoch_checkpoints(epochs_dir) if epochs_dir is not None else []
    if not Path(data).is_file():
        raise FileNotFoundError(f"--data {data} not found")
    cfg = load_data_config(data, require=(split,))
    if not cfg.get(split):
        raise ValueError(f"--data {data} has no '{split}' split")
    return _Request(paths, names, epochs, cfg)


def _stride_multiple(imgsz: int, model: nn.Module, log: Callable[[str], None] | None) -> tuple[int, int]:
    """(imgsz rounded up to the model's max stride (at least 32), that stride)."""
    gs = max(int(model.stride.max()), 32)
    new = round_to_stride(imgsz, gs)[0]
    if new != imgsz and log is not None:
        log(f"--imgsz {imgsz} is not a multiple of the max stride {gs}; using {new}")
    return new, gs


def _analyze_all(named: Sequence[tuple[str, Path]], first: nn.Module | None, samples: Sequence[Sample],
                 device: torch.device, options: dict[str, Any]) -> list[ModelKnowledge]:
    """``analyze_model`` on each (label, checkpoint), one model in memory at a time; ``first`` (already
    loaded) stands for the first checkpoint when given."""
    from models import load_model  # local: keeps `import analysis.knowledge` light

    results = []
    for i, (label, path) in enumerate(named):
        model = first if i == 0 and first is not None else load_model(path, device=device)
        results.append(analyze_model(model, samples, label=label, source=str(path), **options))
        del model
    return results


def _dynamics_section(per_epoch: list[ModelKnowledge], req: _Request, samples: Sequence[Sample], cell: int,
                      epochs_dir: str | Path | None) -> tuple[dict[str, Any], str]:
    """(the JSON ``dynamics`` entry, its markdown) for the epoch checkpoints' foreground concepts."""
    fg_maps = [[c.concepts & smp.masks(cell)[0] for c, smp in zip(r.counts, samples)] for r in per_epoch]
    dyn = concept_dynamics([ep for ep, _ in req.epochs], fg_maps)
    entry = {**dyn, "dir": str(epochs_dir), "per_epoch": [model_record(r, samples) for r in per_epoch]}
    return entry, f"Learning dynamics ({epochs_dir})\n\n" + dynamics_table(per_epoch, dyn)


def _header(s: EntropySettings, report: dict[str, Any], b: float, baseline: str) -> str:
    where = "background" if baseline == "bg" else "all"
    return (f"Knowledge per {s.cell}×{s.cell} px unit ({report['feature']}; {len(report['images'])} "
            f"{report['split']} images at {report['imgsz']} px; λ={s.lam}, b={b}, baseline={where} units, "
            f"{s.steps} steps × {s.samples} samples)\n\n")


def _write_outputs(save_dir: Path, text: str, report: dict[str, Any], results: Sequence[ModelKnowledge],
                   per_epoch: Sequence[ModelKnowledge], samples: Sequence[Sample], cell: int, plots: bool) -> None:
    """knowledge.md, knowledge.json, entropy.npz; with ``plots`` one entropy-map figure per image and
    dynamics.png for epoch checkpoints."""
    (save_dir / "knowledge.md").write_text(text + "\n", encoding="utf-8")
    (save_dir / "knowledge.json").write_text(json.dumps(jsonable(report), indent=2), encoding="utf-8")
    np.savez_compressed(save_dir / "entropy.npz",
                        **{r.label: np.stack(r.entropy) for r in results},
                        **{f"dynamics_{r.label}": np.stack(r.entropy) for r in per_epoch})
    if plots and per_epoch:
        plot_dynamics(per_epoch, report["dynamics"], save_dir / "dynamics.png")
    if plots and results:
        for k, smp in enumerate(samples):
            maps = [(r.label, r.entropy[k], r.counts[k]) for r in results]
            plot_entropy_maps(smp, maps, cell, save_dir / "maps" / f"{k:03d}_{Path(smp.path).stem}.png")


def run_analysis(
    weights: Sequence[str | Path],
    data: str | Path,
    labels: Sequence[str] | None = None,
    imgsz: int = 640,
    images: int = 8,
    split: str = "val",
    settings: EntropySettings | None = None,
    b: float = 0.2,
    baseline: str = "bg",
    layer: int | None = None,
    batch_size: int = 4,
    seed: int = 0,
    device: str | torch.device = "cpu",
    epochs_dir: str | Path | None = None,
    plots: bool = True,
    project: str | Path = "runs/analyze",
    name: str = "exp",
    exist_ok: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Compare checkpoints (and optionally the epoch checkpoints of one run) on the same images.

    After the inputs are checked (one-line FileNotFoundError / ValueError naming the flag), creates
    ``save_dir`` = ``project/name`` incremented (``exp``, ``exp2``, …; as is with ``exist_ok``) and
    writes into it: ``knowledge.md`` (table(s)), ``knowledge.json`` (settings, summaries,
    per-image records, dynamics), ``entropy.npz`` (the entropy maps, ``<label>`` → (N, gh, gw)),
    with ``plots`` ``maps/<image>.png`` (one per image, models side by side) and, for
    ``epochs_dir``, ``dynamics.png``; ``entropy.npz`` holds the epoch models' maps under
    ``dynamics_epoch<N>``. Returns the JSON dict plus ``save_dir``, ``table``.
    """
    from models import load_model  # local: keeps `import analysis.knowledge` light
    from utils.files import increment_path

    s = settings or EntropySettings()
    s.check()
    req = _check_request(weights, labels, data, split, epochs_dir, baseline)
    device = torch.device(device)
    first = load_model(req.weights[0] if req.weights else req.epochs[-1][1], device=device)
    imgsz, gs = _stride_multiple(imgsz, first, log)
    samples = load_samples(req.data_cfg[split], imgsz, images, seed=seed, stride=gs, nc=req.data_cfg["nc"])
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)
    options = dict(settings=s, b=b, baseline=baseline, layer=layer, batch_size=batch_size, seed=seed, log=log)
    results = _analyze_all(list(zip(req.labels, req.weights)), first if req.weights else None, samples, device,
                           options)
    del first
    per_epoch = _analyze_all([(f"epoch{ep}", p) for ep, p in req.epochs], None, samples, device, options)
    report = {"paper": PAPER, "data": str(data), "split": split, "imgsz": imgsz,
              "images": [smp.path for smp in samples], "seed": seed, "feature": (results or per_epoch)[0].feature,
              "settings": {**vars(s), "b": b, "baseline": baseline, "layer": layer},
              "models": [model_record(r, samples) for r in results], "dynamics": None}
    sections = [markdown_table(results)] if results else []
    if per_epoch:
        report["dynamics"], section = _dynamics_section(per_epoch, req, samples, s.cell, epochs_dir)
        sections.append(section)
    text = _header(s, report, b, baseline) + "\n\n".join(sections)
    _write_outputs(save_dir, text, report, results, per_epoch, samples, s.cell, plots)
    return {**report, "save_dir": save_dir, "table": text}
