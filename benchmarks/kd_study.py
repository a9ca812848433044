"""The distillation study behind docs/RESULTS.md: same student, epochs and seeds, one run per method.

    python -m benchmarks.kd_study --epochs 20 --seeds 0 1 --jobs 2

Each run is a real `train_distill.py` process (run folders under --runs, skipped when already
finished, so an interrupted study continues). The report reads every run's results.csv and
summary.json and writes docs/RESULTS.md, a per-epoch mAP plot and benchmarks/results/kd_study.json.
Hand-written analysis is kept in --notes and embedded in the report, so regenerating never loses it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from engine.logger import read_results

REPO = Path(__file__).resolve().parents[1]

# label -> extra train_distill.py flags (the teacher is added for every row but the baseline)
METHODS: dict[str, list[str]] = {
    "student alone": [],
    "output KD (objmse)": ["--d_output", "objmse"],
    "output KD (soft)": ["--d_output", "soft"],
    "output KD (chen)": ["--d_output", "chen"],
    "output KD (chen), d_weight 1": ["--d_output", "chen", "--d_weight", "1"],
    "feature mse": ["--d_output", "none", "--d_feature", "mse"],
    "feature pkd, f_weight 6 (reference)": ["--d_output", "none", "--d_feature", "pkd", "--f_weight", "6"],
    "feature overhaul": ["--d_output", "none", "--d_feature", "overhaul"],
    "feature mimic, f_weight 1 (reference)": ["--d_output", "none", "--d_feature", "mimic", "--f_weight", "1"],
    "feature cwd": ["--d_output", "none", "--d_feature", "cwd"],
    "feature mgd": ["--d_output", "none", "--d_feature", "mgd"],
    "feature qmimic, f_weight 1": ["--d_output", "none", "--d_feature", "qmimic", "--f_weight", "1"],
    "objmse + pkd, f_weight 6": ["--d_output", "objmse", "--d_feature", "pkd", "--f_weight", "6"],
    "feature pkd, f_weight 1": ["--d_output", "none", "--d_feature", "pkd", "--f_weight", "1"],
    "feature mimic, f_weight 0.01": ["--d_output", "none", "--d_feature", "mimic", "--f_weight", "0.01"],
    "feature qmimic, f_weight 0.01": ["--d_output", "none", "--d_feature", "qmimic", "--f_weight", "0.01"],
    "objmse, cosine schedule (the default)": ["--d_output", "objmse", "--d_schedule", "cosine"],
    "objmse, off for the last 5 epochs": ["--d_output", "objmse", "--d_stop_epochs", "5"],
    # issue 17: the Adlik fork's published form, the paper's batch-statistics teacher for overhaul
    "output KD (adlik)": ["--d_output", "adlik"],
    "feature overhaul, teacher BN batch": ["--d_output", "none", "--d_feature", "overhaul", "--d_overhaul_bn", "batch"],
    # calibrated default weights (benchmarks/kd_terms.py), the default schedule, and a combination
    "the default (--t_weights alone)": ["--d_schedule", "cosine"],
    "feature mimic (default weight)": ["--d_output", "none", "--d_feature", "mimic"],
    "feature cwd (default weight)": ["--d_output", "none", "--d_feature", "cwd"],
    "feature mgd (default weight)": ["--d_output", "none", "--d_feature", "mgd"],
    "objmse + pkd (default weights, cosine)": ["--d_output", "objmse", "--d_feature", "pkd", "--d_schedule", "cosine"],
    "objmse + cwd (default weights, cosine)": ["--d_output", "objmse", "--d_feature", "cwd", "--d_schedule", "cosine"],
    "objmse + mimic (default weights, cosine)": ["--d_output", "objmse", "--d_feature", "mimic",
                                                 "--d_schedule", "cosine"],
    "objmse + pkd, f_weight 0.25 (cosine)": ["--d_output", "objmse", "--d_feature", "pkd", "--f_weight", "0.25",
                                             "--d_schedule", "cosine"],
    "objmse + mimic, f_weight 0.25 (cosine)": ["--d_output", "objmse", "--d_feature", "mimic", "--f_weight", "0.25",
                                               "--d_schedule", "cosine"],
    # issue 17.6: feature terms in the first epochs only (on aerial mimic trailed the default from epoch 5 on)
    "objmse + mimic, feature terms off for the last 5 epochs (cosine)": [
        "--d_output", "objmse", "--d_feature", "mimic", "--f_stop_epochs", "5", "--d_schedule", "cosine"],
    "objmse + pkd, f_weight 0.25, feature terms off for the last 5 epochs (cosine)": [
        "--d_output", "objmse", "--d_feature", "pkd", "--f_weight", "0.25", "--f_stop_epochs", "5",
        "--d_schedule", "cosine"],
}


def slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label).strip("_").replace("__", "_")


def kd_flags(label: str) -> list[str]:
    """The row's flags; KD rows run at a constant KD weight unless the row names a schedule (the rows
    were measured with const, and that is how the cosine default was chosen)."""
    flags = METHODS[label]
    return flags if not flags or "--d_schedule" in flags else [*flags, "--d_schedule", "const"]


def run_command(args: argparse.Namespace, label: str, seed: int) -> list[str]:
    cmd = [sys.executable, "train_distill.py", "--data", args.data, "--cfg", args.student_cfg,
           "--imgsz", str(args.imgsz), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
           "--nominal-batch", str(args.nominal_batch), "--workers", str(args.workers), "--device", args.device,
           "--seed", str(seed), "--project", str(args.runs), "--name", f"{slug(label)}_s{seed}", "--exist-ok",
           "--noplots", "--no-t_val"]
    cmd += ["--cache", args.cache]
    if METHODS[label]:
        cmd += ["--t_weights", args.teacher, *kd_flags(label)]
    return cmd


def run_one(args: argparse.Namespace, label: str, seed: int) -> Path:
    folder = Path(args.runs) / f"{slug(label)}_s{seed}"
    if (folder / "summary.json").exists():
        return folder
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.time()
    log = Path(args.runs) / f"{slug(label)}_s{seed}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.run(run_command(args, label, seed), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} seed {seed} failed (exit {proc.returncode}); see {log}")
    print(f"done: {label} seed {seed} in {time.time() - t0:.0f} s", flush=True)
    return folder


def read_run(folder: Path) -> dict:
    rows = read_results(folder / "results.csv")
    summary = json.loads((folder / "summary.json").read_text())
    return {
        "map50": summary["student"]["map50"],
        "map": summary["student"]["map"],
        # runs made before results.csv took YOLOv5's column names still read (--report-only)
        "map_per_epoch": [float(r.get("metrics/mAP_0.5:0.95", r.get("metrics/mAP50-95"))) for r in rows],
        "epoch_s": statistics.median(float(r["time/epoch_s"]) for r in rows),
        "kd_terms": sorted(k for k in rows[0] if k.startswith("train/kd/")),
    }


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range (max − min)/2: with two seeds that is the honest spread to show."""
    return statistics.fmean(values), (max(values) - min(values)) / 2


def write_report(args: argparse.Namespace, results: dict[str, list[dict]], teacher: dict | None) -> None:
    out = Path(args.out)
    fig_dir = out.parent / "results"
    # docs/RESULTS.md keeps its historical figure/json names; another report gets its own beside it
    stem = "" if out.name == "RESULTS.md" else f"_{out.stem}"
    fig_dir.mkdir(parents=True, exist_ok=True)
    base = mean_spread([r["map"] for r in results["student alone"]])[0]
    base_time = statistics.fmean(r["epoch_s"] for r in results["student alone"])
    lines = [
        f"# Distillation results on {Path(args.data).stem}",
        "",
        f"Generated by `python -m benchmarks.kd_study {shlex.join(sys.argv[1:])}` — do not edit by hand; the "
        f"analysis below comes from `{args.notes}`.",
        "",
        f"Setup: student `{args.student_cfg}` from scratch, teacher `{args.teacher}`, data `{args.data}` at "
        f"{args.imgsz} px, {args.epochs} epochs, batch {args.batch_size} (nominal {args.nominal_batch}), seeds "
        f"{', '.join(map(str, args.seeds))}, device {args.device}, {args.threads} thread(s) per run, "
        f"{args.jobs}-3 run(s) in parallel (so s/epoch is only indicative; benchmarks/results/train_step.md "
        "has clean step timings). mAP of each run's best.pt (EMA) on the val split; ± is half the range over "
        "seeds. KD rows use a constant KD weight (`--d_schedule const`) unless the row names a schedule.",
        "",
    ]
    if teacher:
        lines += [f"Teacher: mAP50 {teacher['map50']:.3f}, mAP50-95 {teacher['map']:.3f}.", ""]
    lines += ["| method | mAP50 | mAP50-95 | Δ mAP50-95 vs alone | s/epoch | time vs alone | per-seed mAP50-95 |",
              "|---|---|---|---|---|---|---|"]
    summary = {}
    for label, runs in results.items():
        m50, s50 = mean_spread([r["map50"] for r in runs])
        m, s = mean_spread([r["map"] for r in runs])
        t = statistics.fmean(r["epoch_s"] for r in runs)
        seeds = ", ".join(f"{r['map']:.3f}" for r in runs) + ("" if len(runs) > 1 else " (one seed)")
        lines.append(f"| {label} | {m50:.3f} ± {s50:.3f} | {m:.3f} ± {s:.3f} | {m - base:+.3f} | {t:.1f} | "
                     f"×{t / base_time:.2f} | {seeds} |")
        summary[label] = {"map50": m50, "map50_spread": s50, "map": m, "map_spread": s, "epoch_s": t,
                          "runs": runs}
    _plot(results, fig_dir / f"map_per_epoch{stem}.png")
    lines += ["", f"![mAP50-95 per epoch](results/map_per_epoch{stem}.png)", ""]
    notes = Path(args.notes)
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    for extra in args.include:  # generated sections of other studies (INT8, knowledge analysis)
        lines += [Path(extra).read_text().strip(), ""]
    out.write_text("\n".join(lines) + "\n")
    json_path = REPO / "benchmarks" / "results" / f"kd_study{stem}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"setup": vars(args) | {"runs": str(args.runs)}, "teacher": teacher,
                                     "methods": summary}, indent=1, default=str))
    print(f"wrote {out} and {json_path}")


def _plot(results: dict[str, list[dict]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 5.5), tight_layout=True)
    ax = fig.add_subplot(1, 1, 1)
    for j, (label, runs) in enumerate(results.items()):
        curves = [r["map_per_epoch"] for r in runs]
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i] for c in curves) for i in range(n)]
        alone = label == "student alone"
        ax.plot(range(1, n + 1), mean, label=label, lw=2.5 if alone else 1.3, color="black" if alone else None,
                ls=("-", "--", ":")[(j // 10) % 3])  # matplotlib's 10 colours repeat: vary the line style
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mAP50-95 (EMA, mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.savefig(path, dpi=110)


# The study's flags: (name, default, help); the type follows the default (a list default takes
# several values of its items' type).
STUDY_FLAGS: tuple[tuple[str, object, str], ...] = (
    ("--teacher", "weights/demo_teacher.pt", "teacher checkpoint"),
    ("--student-cfg", "models/yolov5p.yaml", "student model yaml"),
    ("--data", "data/demo.yaml", "dataset yaml"),
    ("--imgsz", 160, "image size"),
    ("--epochs", 20, "epochs per run"),
    ("--batch-size", 16, "batch size"),
    ("--nominal-batch", 16, "nominal batch (gradient accumulation)"),
    ("--workers", 1, "dataloader workers per run"),
    ("--threads", 1, "torch threads per run (OMP_NUM_THREADS)"),
    ("--cache", "ram", "train_distill.py --cache of every run: ram, auto or none (the same batches either way)"),
    ("--jobs", 2, "runs in parallel"),
    ("--device", "cpu", "device for every run"),
    ("--seeds", [0, 1], "seeds (at least two for a spread)"),
    ("--runs", "runs/kd_study", "folder for the run folders"),
    ("--out", "docs/RESULTS.md", "report to write"),
    ("--notes", "docs/results/notes.md", "hand-written analysis embedded in the report"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag, default, text in STUDY_FLAGS:
        if isinstance(default, list):
            p.add_argument(flag, type=type(default[0]), nargs="+", default=default, help=text)
        else:
            p.add_argument(flag, type=type(default), default=default, help=text)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="LABEL",
                   help="rows to run (default: all)")
    p.add_argument("--include", nargs="*", default=[], help="generated markdown sections to append")
    p.add_argument("--report-only", action="store_true", help="only rebuild the report from finished runs")
    args = p.parse_args(argv)
    if "student alone" not in args.methods:
        args.methods.insert(0, "student alone")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # whole rows first, so a study cut short still has a spread for every row it finished
    jobs = [(label, seed) for label in args.methods for seed in args.seeds]
    if not args.report_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda job: run_one(args, *job), jobs))
    results = {}
    for label in args.methods:  # a row lists the seeds that have finished (a diagnostic row may have one)
        folders = [Path(args.runs) / f"{slug(label)}_s{seed}" for seed in args.seeds]
        results[label] = [read_run(f) for f in folders if (f / "summary.json").exists()]
    teacher = _teacher_metrics(args)
    write_report(args, results, teacher)
    return 0


def _teacher_metrics(args: argparse.Namespace) -> dict | None:
    """The teacher's val mAP, from a validation recorded next to the study's runs (computed once)."""
    path = Path(args.runs) / "teacher_metrics.json"
    if not path.exists():
        from engine.evaluate import EvalSettings
        from engine.validate import validate  # val.py's own code path

        res = validate(args.teacher, args.data, imgsz=args.imgsz, device=args.device, settings=EvalSettings(plots=True),
                       project=str(Path(args.runs) / "val"), name="teacher", exist_ok=True)
        path.write_text(json.dumps({"map50": res["map50"], "map": res["map"]}))
    return json.loads(path.read_text())


if __name__ == "__main__":
    sys.exit(main())
