"""Whole training runs with different ``--workers``, alternating, to choose the loader's default.

Usage (from the repo root)::

    python -m benchmarks.bench_workers                          # demo set, 160 and 320 px, workers 0 vs 2
    python -m benchmarks.bench_workers --imgsz 320 --workers 0 1 2 --rounds 3

Each measurement is one ``train_distill.py`` process (``--epochs`` epochs, ``--noval``, no plots) in a
scratch folder; the figure kept is the sum of the ``time/epoch_s`` of every epoch but the last (the
last one also validates), i.e. the training passes alone: loading, forward, backward, optimizer and
EMA. Settings alternate inside each round so that drifting machine load hits all alike; medians and
every sample are written to ``benchmarks/results/loader_workers.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, machine_info, publish, time_training_process


def train_seconds(workers: int, imgsz: int, args: argparse.Namespace, scratch: Path) -> float:
    """Seconds of the training passes (every epoch but the last) of one fresh training process."""
    flags = ["--data", args.data, "--cfg", args.cfg, "--imgsz", str(imgsz), "--epochs", str(args.epochs),
             "--batch-size", str(args.batch), "--workers", str(workers)]
    if args.t_weights:
        flags += ["--t_weights", args.t_weights]
    run = time_training_process(["train_distill.py"], flags, scratch, f"w{workers}_{imgsz}", "bench_workers")
    return run["epochs_s"]


def markdown(result: dict) -> list[str]:
    cfg = result["config"]
    lines = [
        "# Loader workers: whole training passes",
        "",
        f"`python -m benchmarks.bench_workers` — `{cfg['cfg']}` on `{cfg['data']}`"
        f"{' distilled from ' + cfg['t_weights'] if cfg['t_weights'] else ''}, batch {cfg['batch']}, "
        f"{cfg['epochs']} epochs (seconds of the first {cfg['epochs'] - 1}, which do not validate), "
        f"{cfg['rounds']} alternating rounds; {result['machine']['cpus']} CPUs ({result['machine']['cpu_model']}), "
        f"torch {result['machine']['torch']}.",
        "",
        "| imgsz | workers | median s | samples s | vs workers 0 |",
        "|---:|---:|---:|---|---:|",
    ]
    for imgsz, rows in result["rows"].items():
        base = rows[str(cfg["workers"][0])]["median_s"]
        for w, r in rows.items():
            lines.append(f"| {imgsz} | {w} | {r['median_s']:.2f} | {', '.join(f'{x:.2f}' for x in r['samples_s'])} "
                         f"| {r['median_s'] / base:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/demo.yaml")
    p.add_argument("--cfg", default="models/yolov5n.yaml")
    p.add_argument("--t_weights", default="", help="a teacher, to time distillation runs")
    p.add_argument("--imgsz", type=int, nargs="+", default=[160, 320])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS_DIR / "loader_workers"))
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the last epoch validates and is not counted)")
    samples: dict[int, dict[int, list[float]]] = {s: {w: [] for w in args.workers} for s in args.imgsz}
    with tempfile.TemporaryDirectory(prefix="bench_workers_") as tmp:
        for k in range(args.rounds):
            for imgsz in args.imgsz:
                order = args.workers if k % 2 == 0 else args.workers[::-1]
                for w in order:
                    samples[imgsz][w].append(train_seconds(w, imgsz, args, Path(tmp)))
                    print(f"round {k + 1}: {imgsz} px, workers {w}: {samples[imgsz][w][-1]:.2f} s", flush=True)
    result = {
        "config": {k: getattr(args, k) for k in ("data", "cfg", "t_weights", "imgsz", "workers", "epochs", "batch",
                                                 "rounds")},
        "machine": machine_info(torch.device("cpu")),
        "rows": {str(s): {str(w): {"median_s": statistics.median(v), "samples_s": v} for w, v in rows.items()}
                 for s, rows in samples.items()},
    }
    publish(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
