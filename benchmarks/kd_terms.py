"""How large is each distillation term at initialisation, relative to YOLOv5's detection loss?

    python -m benchmarks.kd_terms                 # writes benchmarks/results/kd_terms.json

The default weights in :mod:`distill.methods` are calibrated from these figures: for every method,
on the demo set (weights/demo_teacher.pt teacher, a freshly initialised yolov5p student, 160 px,
batch 16, the data written by ``utils.demo_data.generate_demo``), one training-mode forward gives

* ``det``: the detection loss as the criterion weighs it (bs · Σ det terms),
* ``kd``: the weighted KD terms as the criterion weighs them (batch size included, or not for adlik),
* ``ratio`` = kd / det, and ``grad_ratio`` = ‖∂kd/∂θ‖ / ‖∂det/∂θ‖ over the student's parameters θ,
* ``raw``: each unweighted term,

for several seeds (student init, batch choice, MGD mask). A weight is "calibrated" when its
``ratio`` sits where the demo study found it useful (pkd 1 and the old mimic 0.01, the two best
feature rows of docs/RESULTS.md, both ~12-14× the detection loss at init); see :data:`TARGET_NOTE`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml

from distill import DistillConfig, Distiller, FeatureTaps, freeze_teacher, load_teacher
from distill.feature_mimic import mimic_loss
from engine.criterion import DET_TERMS, TrainingCriterion
from models import DetectionModel
from utils.demo_data import generate_demo
from utils.loss import DetectionLoss, scale_hyp

REPO = Path(__file__).resolve().parents[1]
TARGET_NOTE = ("default feature weights put each weighted term at ~12x the detection loss at initialisation "
               "(rounded to one digit), where pkd 1 (12.5x) and the old mimic 0.01 (13.7x), the best feature rows "
               "of the demo study, sit; YOLOv5's detection loss is small at init at 160 px")

# label -> DistillConfig keyword arguments (weights are the table defaults unless given)
ROWS: dict[str, dict] = {
    "objmse (ours, x bs)": {"output": "objmse"},
    "adlik (published, no bs)": {"output": "adlik"},
    "soft": {"output": "soft"},
    "chen (mu 0.5)": {"output": "chen"},
    "mse": {"output": "none", "features": ("mse",)},
    "pkd": {"output": "none", "features": ("pkd",)},
    "overhaul (bn running)": {"output": "none", "features": ("overhaul",)},
    "overhaul (bn batch)": {"output": "none", "features": ("overhaul",), "overhaul_bn": "batch"},
    "mimic": {"output": "none", "features": ("mimic",)},
    "qmimic": {"output": "none", "features": ("qmimic",)},
    "cwd": {"output": "none", "features": ("cwd",)},
    "mgd": {"output": "none", "features": ("mgd",)},
}


def load_batch(root: Path, n: int, seed: int, imgsz: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` demo images chosen by ``seed`` → (n, 3, imgsz, imgsz) float 0-1 and (k, 6) targets."""
    files = sorted((root / "images" / "train").glob("*.png"))
    pick = np.random.default_rng(seed).choice(len(files), size=n, replace=False)
    imgs, rows = [], []
    for i, k in enumerate(pick):
        im = cv2.imread(str(files[k]))[:, :, ::-1]
        im = cv2.resize(im, (imgsz, imgsz)) if im.shape[0] != imgsz else im
        imgs.append(torch.from_numpy(im.copy()).permute(2, 0, 1).float() / 255)
        label = root / "labels" / "train" / f"{files[k].stem}.txt"
        for line in label.read_text().splitlines():
            rows.append([float(i), *map(float, line.split())])
    return torch.stack(imgs), torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


def _grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))


def _old_mimic(d: Distiller, s_taps: FeatureTaps, t_taps: FeatureTaps, targets: torch.Tensor) -> float:
    """The mimic term under the previous normalisation (Σ over channels, m_i = cells): C_l × each
    level's term, for the report's before/after figures."""
    module = d.features["mimic"]
    total = 0.0
    torch.set_grad_enabled(False)
    for a, si, ti in zip(module.adapters, s_taps.get(), t_taps.get()):
        total += ti.shape[1] * float(mimic_loss([a(si)], [ti], targets))
    torch.set_grad_enabled(True)
    return total


def measure(row: dict, teacher: torch.nn.Module, cfg_dict: dict, hyp: dict, imgs: torch.Tensor,
            targets: torch.Tensor, seed: int) -> dict:
    """One row, one seed: det, weighted kd, ratios and raw terms (see the module docstring)."""
    torch.manual_seed(seed)
    student = DetectionModel(cfg_dict).train()
    student.names = teacher.names
    d = Distiller(student, teacher, DistillConfig(hyp=hyp, mgd_seed=seed, **row))
    crit = TrainingCriterion(DetectionLoss(student, hyp), d)
    extra = (FeatureTaps(student), FeatureTaps(teacher)) if "mimic" in d.features else None
    preds = student(imgs)
    det_terms, positives = crit.detection_loss.weighted_terms(preds, targets)
    kd_raw = d(imgs, preds, targets, positives=positives)
    w = crit.weight_dict(1.0, imgs.shape[0])
    det = sum(w[k] * v for k, v in zip(DET_TERMS, det_terms))
    kd = sum(w[k] * v for k, v in kd_raw.items())
    params = [p for p in student.parameters() if p.requires_grad]
    det, kd = det.reshape(()), kd.reshape(())
    out = {"det": det.item(), "kd": kd.item(), "ratio": (kd / det).item(),
           "grad_ratio": _grad_norm(kd, params) / _grad_norm(det, params),
           "raw": {k: float(v) for k, v in kd_raw.items()}, "weights": dict(d.weights)}
    if extra is not None:
        with torch.no_grad():
            d.teacher_forward(imgs)
            student(imgs)
        out["mimic_old_normalisation_raw"] = _old_mimic(d, *extra, targets)
        for taps in extra:
            taps.remove()
    d.remove()
    return out


def summarise(per_seed: list[dict]) -> dict:
    keys = ("det", "kd", "ratio", "grad_ratio")
    s = {k: statistics.mean(r[k] for r in per_seed) for k in keys}
    s["ratio_cv"] = statistics.pstdev(r["ratio"] for r in per_seed) / max(abs(s["ratio"]), 1e-12)
    s["raw"] = {k: statistics.mean(r["raw"][k] for r in per_seed) for k in per_seed[0]["raw"]}
    s["weights"] = per_seed[0]["weights"]
    if "mimic_old_normalisation_raw" in per_seed[0]:
        s["mimic_old_normalisation_raw"] = statistics.mean(r["mimic_old_normalisation_raw"] for r in per_seed)
    s["per_seed_ratio"] = [r["ratio"] for r in per_seed]
    return s


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    teacher = freeze_teacher(load_teacher(REPO / args.teacher))
    cfg_dict = yaml.safe_load((REPO / args.student_cfg).read_text())
    cfg_dict["nc"] = int(teacher.nc)
    hyp = scale_hyp(yaml.safe_load((REPO / "data/hyps/hyp.scratch-low.yaml").read_text()), 3, cfg_dict["nc"],
                    args.imgsz)
    results: dict = {"setup": {**vars(args), "note": TARGET_NOTE}, "rows": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = generate_demo(Path(tmp) / "demo", seed=0, n_train=args.images, n_val=0, imgsz=args.imgsz)
        batches = [load_batch(root, args.batch_size, s, args.imgsz) for s in args.seeds]
    for label, row in ROWS.items():
        per_seed = [measure(row, teacher, cfg_dict, hyp, *b, seed=s) for s, b in zip(args.seeds, batches)]
        results["rows"][label] = summarise(per_seed)
        r = results["rows"][label]
        print(f"{label:28s} det {r['det']:8.3f}  kd {r['kd']:9.4f}  kd/det {r['ratio']:8.4f} (cv {r['ratio_cv']:.2f})"
              f"  grad kd/det {r['grad_ratio']:8.4f}  raw {json.dumps({k: round(v, 5) for k, v in r['raw'].items()})}")
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="weights/demo_teacher.pt")
    p.add_argument("--student-cfg", default="models/yolov5p.yaml")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--images", type=int, default=64, help="demo train images to generate and sample from")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/kd_terms.json")
    args = p.parse_args(argv)
    results = run(args)
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
