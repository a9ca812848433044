"""Whole training runs with and without `utils.allocator.keep_freed_memory`, alternating.

Usage (from the repo root)::

    python -m benchmarks.bench_allocator                   # yolov5n at 320 px, and the demo's distillation
    python -m benchmarks.bench_allocator --rounds 6 --runs n320

Each measurement is one ``train_distill.py`` process (``--noval``, no plots) in a scratch folder;
the 'glibc default' arm runs the same entry point with `keep_freed_memory` replaced by a no-op.
Recorded per process, from the kernel's accounting of that child (``os.wait4``): the seconds of
every epoch but the last (the last one also validates), the wall time, minor page faults, system
CPU seconds and peak RSS. Medians and every sample go to ``benchmarks/results/allocator.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, machine_info, median_run, publish, time_training_process

RUNS = {
    "n320": ["--data", "data/demo.yaml", "--cfg", "models/yolov5n.yaml", "--imgsz", "320", "--epochs", "3",
             "--batch-size", "16"],
    "demo": ["--demo", "--epochs", "4"],
}
ARMS = ("kept", "glibc default")

# The 'glibc default' arm: the training entry point with the allocator call made a no-op.
_WITHOUT = ("import sys, train_distill, utils.allocator as a; a.keep_freed_memory = lambda: 'off'; "
            "sys.exit(train_distill.main(sys.argv[1:]))")


def one_run(arm: str, flags: list[str], scratch: Path, name: str) -> dict[str, float]:
    """One training process of ``arm``: its epoch seconds and the kernel's resource accounting of it."""
    entry = ["train_distill.py"] if arm == "kept" else ["-c", _WITHOUT]
    return time_training_process(entry, flags, scratch, name, "bench_allocator")


def markdown(result: dict) -> list[str]:
    m = result["machine"]
    lines = [
        "# The allocator setting: whole training runs",
        "",
        f"`python -m benchmarks.bench_allocator` — {result['config']['rounds']} alternating rounds, medians; "
        f"{m['cpus']} CPUs ({m['cpu_model']}), torch {m['torch']}; {result['date']}. `epochs s`: every epoch but the "
        "last (which validates); faults, system time and peak RSS are the kernel's accounting of each process.",
        "",
        "| run | allocator | epochs s | wall s | minor faults | system s | peak RSS MB | epochs vs default |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run, arms in result["rows"].items():
        base = arms["glibc default"]["epochs_s"]
        for arm, r in arms.items():
            lines.append(f"| {run} | {arm} | {r['epochs_s']:.2f} | {r['wall_s']:.1f} | "
                         f"{r['minor_faults'] / 1e6:.2f} M | {r['system_s']:.1f} | {r['peak_rss_mb']:.0f} | "
                         f"{r['epochs_s'] / base:.3f} |")
    lines += ["", "Every sample (epochs s): " + "; ".join(
        f"{run} {arm}: {', '.join(f'{x:.2f}' for x in r['samples_epochs_s'])}"
        for run, arms in result["rows"].items() for arm, r in arms.items())]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(RUNS), help="which training runs")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (the order flips every round)")
    p.add_argument("--out", default=str(RESULTS_DIR / "allocator"))
    args = p.parse_args(argv)
    samples = {run: {arm: [] for arm in ARMS} for run in args.runs}
    with tempfile.TemporaryDirectory(prefix="bench_allocator_") as tmp:
        for k in range(args.rounds):
            for run in args.runs:
                for arm in (ARMS if k % 2 == 0 else ARMS[::-1]):
                    sample = one_run(arm, RUNS[run], Path(tmp), f"{run}_{k}_{arm.split()[0]}")
                    samples[run][arm].append(sample)
                    print(f"round {k + 1}: {run}, {arm}: {sample['epochs_s']:.2f} s of epochs, "
                          f"{sample['minor_faults'] / 1e6:.2f} M faults", flush=True)
    rows = {run: {arm: median_run(runs) for arm, runs in arms.items()} for run, arms in samples.items()}
    result = {"config": {"runs": {r: RUNS[r] for r in args.runs}, "rounds": args.rounds},
              "machine": machine_info(torch.device("cpu")), "date": time.strftime("%Y-%m-%d %H:%M"),
              "rows": rows}
    publish(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
