"""What distillation costs in a whole training run: the student alone vs. the same run with a teacher.

Usage (from the repo root)::

    python -m benchmarks.bench_distill_cost                       # yolov5n ← yolov5s, demo set, 320 px
    python -m benchmarks.bench_distill_cost --rounds 2 --t_weights runs/train/s/weights/best.pt

`benchmarks.bench_train_step --ratio` times single steps on one synthetic batch; this times what a
user waits for: whole ``train_distill.py`` processes on real data (loading, augmentation, the loss,
the optimizer, EMA; ``--noval``), alternating the two arms, the order flipping every round. The
measure is the seconds of the training passes (every epoch but the last, which validates). Without
``--t_weights`` a yolov5s teacher for the demo classes is first trained for one epoch here: only its
cost matters, not its accuracy. Writes ``benchmarks/results/distill_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, machine_info, median_run, publish, time_training_process

ARMS = ("student alone", "distilled")


def run_flags(args: argparse.Namespace, cfg: str, epochs: int) -> list[str]:
    """Flags of one training process of model ``cfg`` on the benchmark's data."""
    return ["--data", args.data, "--cfg", cfg, "--imgsz", str(args.imgsz), "--epochs", str(epochs),
            "--batch-size", str(args.batch_size)]


def teacher_checkpoint(args: argparse.Namespace, scratch: Path) -> str:
    """``--t_weights``, or a one-epoch ``--t_cfg`` model trained here on the same data."""
    if args.t_weights:
        return args.t_weights
    time_training_process(["train_distill.py"], run_flags(args, args.t_cfg, 1), scratch, "teacher",
                          "bench_distill_cost")
    return str(scratch / "teacher" / "weights" / "last.pt")


def markdown(result: dict) -> list[str]:
    m, c, r = result["machine"], result["config"], result["rows"]
    alone, kd = r["student alone"], r["distilled"]
    return [
        "# What distillation costs in a whole training run",
        "",
        f"`python -m benchmarks.bench_distill_cost` — student `{c['student']}`, teacher "
        f"{c['teacher']}, `{c['data']}` at {c['imgsz']} px, batch {c['batch_size']}, {c['epochs']} epochs "
        f"(`--noval`); {c['rounds']} alternating rounds, medians; {m['cpus']} CPUs ({m['cpu_model']}, "
        f"{m.get('cpu_bf16') or 'no native bf16'}), torch {m['torch']}; {result['date']}.",
        "",
        "| arm | training passes s | wall s | peak RSS MB |",
        "|---|---:|---:|---:|",
        *[f"| {arm} | {r[arm]['epochs_s']:.1f} | {r[arm]['wall_s']:.1f} | {r[arm]['peak_rss_mb']:.0f} |"
          for arm in ARMS],
        "",
        f"distilled / student alone: **{kd['epochs_s'] / alone['epochs_s']:.3f}** in training-pass time "
        f"(wall {kd['wall_s'] / alone['wall_s']:.3f}).",
        "",
        "Every sample (training passes s): " + "; ".join(
            f"{arm}: {', '.join(f'{x:.1f}' for x in r[arm]['samples_epochs_s'])}" for arm in ARMS),
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default="data/demo.yaml")
    p.add_argument("--student", default="models/yolov5n.yaml", help="student model yaml (from scratch)")
    p.add_argument("--t_weights", default="", help="teacher checkpoint (default: train --t_cfg for one epoch)")
    p.add_argument("--t_cfg", default="models/yolov5s.yaml", help="teacher yaml when --t_weights is not given")
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (the order flips every round)")
    p.add_argument("--out", default=str(RESULTS_DIR / "distill_cost"))
    args = p.parse_args(argv)
    samples: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory(prefix="bench_distill_cost_") as tmp:
        scratch = Path(tmp)
        teacher = teacher_checkpoint(args, scratch)
        student = run_flags(args, args.student, args.epochs)
        arm_flags = {"student alone": student, "distilled": [*student, "--t_weights", teacher]}
        for k in range(args.rounds):
            for arm in ARMS if k % 2 == 0 else ARMS[::-1]:
                sample = time_training_process(["train_distill.py"], arm_flags[arm], scratch,
                                               f"{k}_{arm.split()[0]}", "bench_distill_cost")
                samples[arm].append(sample)
                print(f"round {k + 1}: {arm}: {sample['epochs_s']:.1f} s of training passes", flush=True)
    rows = {arm: median_run(runs) for arm, runs in samples.items()}
    config = {**{k: v for k, v in vars(args).items() if k != "out"},
              "teacher": f"`{args.t_weights}`" if args.t_weights else f"`{args.t_cfg}` (one epoch, trained here)"}
    result = {"config": config, "machine": machine_info(torch.device("cpu")),
              "date": time.strftime("%Y-%m-%d %H:%M"), "rows": rows}
    publish(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
