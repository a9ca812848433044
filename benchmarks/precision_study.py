"""bf16 vs fp32 training at equal epochs: student alone and distilled, several seeds (issue: AMP on CPU).

    python -m benchmarks.precision_study                          # demo set, 2 seeds, 2 runs at a time
    python -m benchmarks.precision_study --preset aerial --teacher runs/aerial_teacher/weights/best.pt

Each run is a real ``train_distill.py`` process; ``fp32`` rows add ``--noamp``. Finished runs are skipped, so
an interrupted study continues. Writes ``benchmarks/results/precision_study_<preset>.json`` and ``.md``: per
row the final EMA mAP50 / mAP50-95 (mean ± half-range over seeds), the bf16 − fp32 difference and the
seed spread it must stay within, and s/epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from benchmarks.common import machine_info, write_results

REPO = Path(__file__).resolve().parents[1]

# preset -> the flags every run shares (student from scratch, equal epochs)
PRESETS: dict[str, list[str]] = {
    "demo": ["--data", "data/demo.yaml", "--cfg", "models/yolov5p.yaml", "--imgsz", "160", "--epochs", "20",
             "--batch-size", "16", "--nominal-batch", "16"],
    "aerial": ["--data", "data/aerial.yaml", "--cfg", "models/yolov5n.yaml", "--imgsz", "320", "--epochs", "10",
               "--batch-size", "16", "--nominal-batch", "16"],
}
DEFAULT_TEACHER = {"demo": "weights/demo_teacher.pt", "aerial": ""}


def run_flags(args: argparse.Namespace, kind: str, precision: str, seed: int) -> tuple[str, list[str]]:
    """(run name, train_distill.py flags) of one cell of the study."""
    name = f"{args.preset}_{kind}_{precision}_s{seed}"
    flags = [*PRESETS[args.preset], "--epochs", str(args.epochs)] if args.epochs else list(PRESETS[args.preset])
    flags += ["--seed", str(seed), "--workers", str(args.workers), "--device", "cpu", "--project", args.runs,
              "--name", name, "--exist-ok", "--noplots", "--no-t_val"]
    flags += ["--t_weights", args.teacher] if kind == "distilled" else ["--t_weights", ""]
    return name, flags + (["--noamp"] if precision == "fp32" else [])


def run_one(args: argparse.Namespace, kind: str, precision: str, seed: int) -> Path:
    name, flags = run_flags(args, kind, precision, seed)
    folder = Path(args.runs) / name
    if (folder / "summary.json").exists():
        return folder
    log = Path(args.runs) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "train_distill.py", *flags], cwd=REPO, env=env, stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); see {log}")
    print(f"done: {name} in {time.time() - t0:.0f} s", flush=True)
    return folder


def read_run(folder: Path) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    rows = (folder / "results.csv").read_text().splitlines()
    header = [h.strip() for h in rows[0].split(",")]
    times = [float(dict(zip(header, r.split(",")))["time/epoch_s"]) for r in rows[1:]] if "time/epoch_s" in header \
        else []
    return {"map50": summary["student"]["map50"], "map": summary["student"]["map"],
            "s_per_epoch": statistics.median(times) if times else float("nan")}


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, half-range) over seeds."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def summarise(args: argparse.Namespace) -> dict:
    table: dict[str, dict] = {}
    for kind in args.kinds:
        for precision in ("bf16", "fp32"):
            runs = [read_run(Path(args.runs) / run_flags(args, kind, precision, s)[0]) for s in args.seeds]
            m50, h50 = spread([r["map50"] for r in runs])
            m, h = spread([r["map"] for r in runs])
            table[f"{kind} {precision}"] = {"map50": m50, "map50_halfrange": h50, "map": m, "map_halfrange": h,
                                           "s_per_epoch": statistics.fmean(r["s_per_epoch"] for r in runs),
                                           "per_seed": runs}
        bf, fp = table[f"{kind} bf16"], table[f"{kind} fp32"]
        seed_spread = max(bf["map_halfrange"], fp["map_halfrange"]) * 2
        table[f"{kind} bf16 - fp32"] = {"map50": bf["map50"] - fp["map50"], "map": bf["map"] - fp["map"],
                                        "seed_spread_map": seed_spread,
                                        "within_spread": abs(bf["map"] - fp["map"]) <= seed_spread}
    return table


def markdown(args: argparse.Namespace, table: dict) -> list[str]:
    lines = [f"# bf16 vs fp32 training ({args.preset}, seeds {args.seeds})", "",
             "| row | mAP50 | mAP50-95 | s/epoch |", "|---|---:|---:|---:|"]
    for key, row in table.items():
        if key.endswith("bf16 - fp32"):
            verdict = "within" if row["within_spread"] else "OUTSIDE"
            lines.append(f"| {key} | {row['map50']:+.4f} | {row['map']:+.4f} ({verdict} the seed spread "
                         f"{row['seed_spread_map']:.4f}) | |")
        else:
            lines.append(f"| {key} | {row['map50']:.4f} ± {row['map50_halfrange']:.4f} | {row['map']:.4f} ± "
                         f"{row['map_halfrange']:.4f} | {row['s_per_epoch']:.1f} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), default="demo", help="data/student/epochs preset")
    p.add_argument("--teacher", default="", help="teacher checkpoint (default: the preset's)")
    p.add_argument("--epochs", type=int, default=0, help="override the preset's epochs")
    p.add_argument("--kinds", nargs="+", default=["alone", "distilled"], choices=["alone", "distilled"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (two or more for a spread)")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    p.add_argument("--workers", type=int, default=1, help="dataloader workers per run")
    p.add_argument("--runs", default="runs/precision_study", help="folder for the run folders")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "precision_study"), help="output stem")
    args = p.parse_args(argv)
    args.teacher = args.teacher or DEFAULT_TEACHER[args.preset]
    if "distilled" in args.kinds and not args.teacher:
        p.error(f"--teacher: the {args.preset} preset has no shipped teacher; pass a checkpoint")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    jobs = [(k, p, s) for s in args.seeds for k in args.kinds for p in ("bf16", "fp32")]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda job: run_one(args, *job), jobs))
    table = summarise(args)
    result = {"preset": args.preset, "seeds": args.seeds, "machine": machine_info(torch.device("cpu")), "rows": table}
    write_results(result, markdown(args, table), f"{args.out}_{args.preset}")
    print("\n".join(markdown(args, table)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
