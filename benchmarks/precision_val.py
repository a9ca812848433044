"""mAP of the shipped demo teacher on the demo val set in fp32 vs bf16: does bf16 validation change the score?

Usage (from the repo root; builds datasets/demo on first use)::

    python -m benchmarks.precision_val                       # weights/demo_teacher.pt, 160 px, CPU
    python -m benchmarks.precision_val --weights runs/train/exp/weights/best.pt --imgsz 320

Three passes of ``engine.evaluate.evaluate`` over the same loader: fp32; bf16 autocast on the fp32
weights (how a bf16 training run validates its EMA each epoch); bf16 weights (how a bf16 run stores its
frozen teacher). Writes ``benchmarks/results/precision_val.json`` with mAP50 / mAP50-95 per pass, the
differences to fp32 and whether any exceeds ``--tolerance`` (0.002): the rule for keeping the final
best.pt validation and val.py in fp32.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, ROOT, machine_info, write_results
from distill.teacher import prepare_teacher
from engine.evaluate import evaluate
from models import load_model
from utils.data_config import load_data_config
from utils.dataset import create_dataloader
from utils.precision import Precision

PASSES = ("fp32", "bf16_autocast", "bf16_weights")


def run_pass(name: str, model: torch.nn.Module, loader, names: list[str], device: torch.device) -> dict:
    """One evaluate() call in the precision ``name`` (see the module docstring)."""
    if name == "bf16_weights":
        model = prepare_teacher(copy.deepcopy(model), Precision(device.type, torch.bfloat16))
    precision = Precision(device.type, torch.bfloat16 if name == "bf16_autocast" else None)
    t0 = time.perf_counter()
    res = evaluate(model, loader, names, device, precision=precision)
    return {"map50": res["map50"], "map": res["map"], "precision": res["precision"], "recall": res["recall"],
            "images": res["n_images"], "seconds": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=str(ROOT / "weights" / "demo_teacher.pt"))
    p.add_argument("--data", default=str(ROOT / "data" / "demo.yaml"))
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=0.002)
    p.add_argument("--out", default=str(RESULTS_DIR / "precision_val"))
    args = p.parse_args(argv)
    device = torch.device("cpu")
    load_start = os.getloadavg()
    data = load_data_config(args.data, require=("val",))
    model = load_model(args.weights, device=device).float().eval()
    loader, _ = create_dataloader(data["val"], args.imgsz, args.batch, int(model.stride.max()), rect=True, pad=0.5,
                                  workers=args.workers)
    passes = {name: run_pass(name, model, loader, list(data["names"]), device) for name in PASSES}
    base = passes["fp32"]
    for r in passes.values():
        r["d_map50"] = round(r["map50"] - base["map50"], 5)
        r["d_map"] = round(r["map"] - base["map"], 5)
    worst = max(abs(r[k]) for r in passes.values() for k in ("d_map50", "d_map"))
    result = {
        "benchmark": "precision_val",
        "weights": os.path.relpath(args.weights, ROOT),
        "data": Path(args.data).name,
        "imgsz": args.imgsz,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {**machine_info(device), "load_average_start": list(load_start),
                    "load_average_end": list(os.getloadavg())},
        "tolerance": args.tolerance,
        "max_abs_change": round(worst, 5),
        "exceeds_tolerance": worst > args.tolerance,
        "passes": passes,
    }
    md = [f"# mAP in fp32 vs bf16 ({result['weights']}, {result['data']} val, {args.imgsz} px, CPU)", "",
          "| pass | mAP50 | mAP50-95 | Δ mAP50 | Δ mAP50-95 | s |", "|---|---:|---:|---:|---:|---:|"]
    md += [f"| {k} | {r['map50']:.4f} | {r['map']:.4f} | {r['d_map50']:+.4f} | {r['d_map']:+.4f} | {r['seconds']} |"
           for k, r in passes.items()]
    md += ["", f"Largest change {worst:.4f} ({'exceeds' if worst > args.tolerance else 'within'} the "
           f"{args.tolerance} tolerance); load average {load_start[0]:.2f} at start, {result['date']}."]
    write_results(result, md, args.out)
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
