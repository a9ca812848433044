"""Training-loader throughput (images/s) with mosaic augmentation on the demo set.

Usage (from the repo root; builds datasets/demo on first use)::

    python -m benchmarks.bench_dataloader                 # 640 and 320 px, 2 workers, batch 16
    python -m benchmarks.bench_dataloader --imgsz 320 --workers 4 --batches 40

Writes ``benchmarks/results/dataloader.json`` and ``.md``. The time counts what a training step
waits for: reading, mosaic, perspective, HSV, flips, collation. The first batches (worker start)
are excluded as warm-up.

``--train-model models/yolov5n.yaml`` also times that model's training step at each size (synthetic
batches of the same size, the run's default precision: ``benchmarks.bench_train_step --methods none``)
and reports ``loader / train``: the loader keeps up when it is >= 2 (it then never stalls the step,
even with the variance of a shared machine).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import machine_info, write_results
from utils.data_config import load_data_config
from utils.dataset import create_dataloader

ROOT = Path(__file__).resolve().parents[1]


def measure(sources: list[str], imgsz: int, batch: int, workers: int, batches: int, warmup: int,
            hyp: dict) -> dict:
    """Images per second over ``batches`` batches after ``warmup`` batches, one pass per epoch."""
    loader, dataset = create_dataloader(sources, imgsz, batch, 32, hyp=hyp, augment=True, workers=workers,
                                        shuffle=True, seed=0)
    seen, n, t0 = 0, 0, None
    while n < warmup + batches:  # several epochs if the set is small; persistent workers carry over
        for imgs, _targets, _paths, _shapes in loader:
            n += 1
            if n == warmup:
                t0 = time.perf_counter()
            elif n > warmup:
                seen += imgs.shape[0]
            if n >= warmup + batches:
                break
    dt = time.perf_counter() - t0
    return {"imgsz": imgsz, "batch": batch, "workers": workers, "batches": batches, "images": seen,
            "seconds": round(dt, 3), "images_per_s": round(seen / dt, 1), "dataset_images": len(dataset)}


def train_images_per_s(model: str, imgsz: int, batch: int, out: str) -> tuple[float, str]:
    """The training step's images/s of ``model`` (student alone, the run's default precision); its
    own table is written next to this benchmark's, as ``<out>_train_step_<imgsz>``."""
    from benchmarks.bench_train_step import main as bench_step

    res = bench_step(["--student", model, "--teacher", model, "--methods", "none", "--imgsz", str(imgsz),
                      "--batch-size", str(batch), "--no-mem", "--repeats", "3", "--steps", "2", "--warmup", "1",
                      "--out", f"{out}_train_step_{imgsz}"])
    amp = res["config"]["amp"]  # Precision.describe(): "AMP: bf16 autocast ..." or "AMP: off, fp32 ..."
    return res["rows"][0]["images_per_s"], "fp32" if "off" in amp else amp.split()[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "demo.yaml"))
    p.add_argument("--hyp", default=str(ROOT / "data" / "hyps" / "hyp.scratch-low.yaml"))
    p.add_argument("--imgsz", type=int, nargs="+", default=[640, 320])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--train-model", default="", help="also time this model's training step (e.g. models/yolov5n.yaml)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dataloader"))
    args = p.parse_args(argv)

    load_before = os.getloadavg()[0]  # a busy machine lowers the figures; record it with them
    data = load_data_config(args.data)
    hyp = yaml.safe_load(Path(args.hyp).read_text())
    rows = [measure(data["train"], s, args.batch, args.workers, args.batches, args.warmup, hyp) for s in args.imgsz]
    if args.train_model:
        for r in rows:
            r["train_images_per_s"], r["train_precision"] = train_images_per_s(args.train_model, r["imgsz"], args.batch,
                                                                               args.out)
            r["loader_over_train"] = round(r["images_per_s"] / r["train_images_per_s"], 2)
    result = {
        "benchmark": "dataloader",
        "data": str(Path(args.data).name),
        "hyp": str(Path(args.hyp).name),
        "mosaic": hyp.get("mosaic"),
        "mixup": hyp.get("mixup"),
        "machine": {**machine_info(torch.device("cpu")), "load_avg_1m_before": round(load_before, 2)},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": rows,
    }
    md = [
        "# Data loader throughput",
        "",
        f"`python -m benchmarks.bench_dataloader` on {result['data']} with {result['hyp']} "
        f"(mosaic {result['mosaic']}, mixup {result['mixup']}), {os.cpu_count()} CPUs (1-min load average "
        f"{load_before:.1f} before the run), torch {torch.__version__}, {result['date']}.",
        "",
        "| imgsz | batch | workers | images/s | batches timed | train step images/s | loader / train |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['imgsz']} | {r['batch']} | {r['workers']} | {r['images_per_s']} | {r['batches']} | "
          f"{r.get('train_images_per_s', '—')} {r.get('train_precision', '')} | {r.get('loader_over_train', '—')} |"
          for r in rows),
        "",
        f"1-min load average {os.getloadavg()[0]:.1f} at the end.",
    ]
    write_results(result, md, args.out)
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
