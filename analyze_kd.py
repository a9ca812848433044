"""Measure what distillation transferred: input entropy and visual concepts per model (Cheng et al., 2020).

    python analyze_kd.py --weights teacher.pt distilled.pt alone.pt --labels teacher distilled alone \\
        --data data/demo.yaml --imgsz 160 --images 8 --steps 200
    python analyze_kd.py --epochs-dir runs/train/exp/weights --data data/demo.yaml --imgsz 160

For each model and each of ``--images`` seeded validation images, learns how much Gaussian noise
every ``--cell``-pixel square of the input tolerates before the feature (the tensors entering
Detect, or ``--layer k``) changes, turns it into an entropy map, and counts the low-entropy
"visual concepts" on the objects (N_fg) and on the background (N_bg). Writes ``knowledge.md``,
``knowledge.json``, ``entropy.npz`` and per-image heat maps into ``runs/analyze/exp*``. The method,
our choices and how to read the numbers: docs/KNOWLEDGE.md.
"""

from __future__ import annotations

import argparse
import sys

from analysis.knowledge import BASELINES, EntropySettings, run_analysis
from engine.cli import configure_logging
from models import CheckpointError
from utils.torch_utils import select_device


def parse_opt(argv: list[str] | None = None) -> argparse.Namespace:
    d = EntropySettings()
    p = argparse.ArgumentParser(description="Quantify the knowledge (visual concepts) encoded by YOLOv5 detectors.")
    p.add_argument("--weights", nargs="*", default=[], help="checkpoints to compare (official .pt or ours)")
    p.add_argument("--labels", nargs="*", default=None, help="one name per --weights (default: file stems)")
    p.add_argument("--data", required=True, help="dataset yaml (labels give the foreground)")
    p.add_argument("--split", default="val", choices=["val", "test", "train"], help="split to sample images from")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="letterbox size (pixels)")
    p.add_argument("--images", type=int, default=8, help="images sampled (seeded) from the split")
    p.add_argument("--seed", type=int, default=0, help="image choice and noise draws")
    p.add_argument("--layer", type=int, default=None,
                   help="analyse the output of model.model[LAYER] (default: the tensors entering Detect)")
    p.add_argument("--cell", type=int, default=d.cell, help="unit side in pixels: one σ per cell (1 = per pixel)")
    p.add_argument("--steps", type=int, default=d.steps, help="Adam steps of the σ optimisation")
    p.add_argument("--samples", type=int, default=d.samples, help="noise draws per step")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate on log σ")
    p.add_argument("--lam", type=float, default=d.lam,
                   help="λ: weight of the mean log σ against the relative feature change")
    p.add_argument("--b", type=float, default=0.2, help="concept threshold: H̄ − H_u > b (nats)")
    p.add_argument("--baseline", default="bg", choices=BASELINES, help="H̄ over background units or all units")
    p.add_argument("--batch-size", type=int, default=4, help="images optimised together")
    p.add_argument("--epochs-dir", default=None,
                   help="folder of epochN.pt checkpoints (--save-period): concepts per epoch and stability")
    p.add_argument("--device", default="", help="cuda device (0) or cpu; default: first GPU if any")
    p.add_argument("--project", default="runs/analyze")
    p.add_argument("--name", default="exp")
    p.add_argument("--exist-ok", action="store_true", help="reuse project/name instead of incrementing")
    p.add_argument("--noplots", action="store_true", help="skip the heat-map figures")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    opt = parse_opt(argv)
    configure_logging()
    try:
        settings = EntropySettings(lam=opt.lam, steps=opt.steps, samples=opt.samples, lr=opt.lr, cell=opt.cell)
        settings.check()
        result = run_analysis(
            opt.weights, opt.data, labels=opt.labels, imgsz=opt.imgsz, images=opt.images, split=opt.split,
            settings=settings, b=opt.b, baseline=opt.baseline, layer=opt.layer, batch_size=opt.batch_size,
            seed=opt.seed, device=select_device(opt.device), epochs_dir=opt.epochs_dir, plots=not opt.noplots,
            project=opt.project, name=opt.name, exist_ok=opt.exist_ok, log=print,
        )
    except (FileNotFoundError, CheckpointError, ValueError) as e:
        raise SystemExit(f"analyze_kd.py: error: {e}") from None
    print(result["table"])
    print(f"Results saved to {result['save_dir']}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
