"""Us beside YOLOv5 7.0.14 on the same box: training images/s, val.py images/s, peak RSS, alternating runs.

Usage (from the repo root; YOLOv5 runs ONLY as a subprocess of its own venv, see ../shared/tools)::

    source ../shared/tools/yolov5_oracle.sh env             # exports $ORACLE_PY and its offline switches
    python -m benchmarks.bench_vs_yolov5                     # yolov5n from scratch, demo set, 320 px, 3 epochs
    python -m benchmarks.bench_vs_yolov5 --epochs 1 --max-images 32 --rounds 1   # smoke run

Both tools get the same model yaml, dataset (a copy of the yaml with an absolute ``path``; with
``--max-images`` the first N images of each split as ``.txt`` lists), batch, image size, epochs
and device; ``--workers`` only when given (else each tool's default, what a user who does not say
gets: YOLOv5 caps its 8 at the CPU count, we load in the main process on a small CPU). Each measured
command is a whole process (start-up, data caching, every epoch, final validation), timed from
outside. In each of ``--rounds`` rounds both tools train, then both
validate the SAME checkpoint (YOLOv5's best.pt of that round: our val.py reads official
checkpoints), the order flipped every round so drifting machine load hits both alike; medians are
reported. Peak RSS is ``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` of a fresh wrapper process
per command: the largest resident set of any process of that command (main or a loader worker).

Our runs use their default precision (bf16 autocast on a CPU with native bf16; ``--noamp`` for fp32);
YOLOv5 7.0 uses AMP on CUDA only. Writes ``benchmarks/results/bench_vs_yolov5.json`` with the
ratios ours / YOLOv5 (> 1 = we are faster for images/s; < 1 = we use less memory for RSS). Without
``$ORACLE_PY`` (or when it cannot import yolov5) it prints one SKIP line and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import RESULTS_DIR, ROOT, machine_info
from utils.data_config import load_data_config

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
_WRAPPER = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "rc = subprocess.run(sys.argv[2:], cwd=sys.argv[1], stdout=subprocess.DEVNULL).returncode; "
            "print(rc, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def oracle_python() -> tuple[str | None, str]:
    """($ORACLE_PY, '') when it imports yolov5, else (None, why not)."""
    py = os.environ.get("ORACLE_PY", "")
    if not py or not Path(py).is_file():
        return None, "$ORACLE_PY not set or missing (source ../shared/tools/yolov5_oracle.sh env)"
    proc = subprocess.run([py, "-c", "import yolov5"], capture_output=True, text=True, check=False)
    if proc.returncode:
        return None, f"{py} cannot import yolov5"
    return py, ""


def measured(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run ``cmd`` in a fresh wrapper process: wall seconds, exit status and peak RSS (MiB)."""
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, str(cwd), *cmd], stderr=f, stdout=subprocess.PIPE,
                              text=True, check=False)
    rc, seconds, maxrss_kb = proc.stdout.split()[-3:]
    if int(rc):
        raise RuntimeError(f"{cmd[0]} {' '.join(cmd[1:4])} ... exited {rc}; see {log}")
    return {"seconds": round(float(seconds), 2), "peak_rss_mb": round(int(maxrss_kb) / 1024, 1)}


def dataset_yaml(data: str, work: Path, max_images: int) -> tuple[Path, int, int]:
    """A yaml both tools read (absolute paths); returns it and the train/val image counts."""
    cfg = load_data_config(data)
    out = {"path": str(work), "names": list(cfg["names"]), "nc": cfg["nc"]}
    counts = []
    for split in ("train", "val"):
        files = sorted(str(p) for src in cfg[split] for p in Path(src).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files = files[:max_images] if max_images > 0 else files
        (work / f"{split}.txt").write_text("\n".join(files) + "\n")
        out[split] = str(work / f"{split}.txt")
        counts.append(len(files))
    path = work / "data.yaml"
    path.write_text(yaml.safe_dump(out))
    return path, counts[0], counts[1]


def commands(args: argparse.Namespace, py: str, data: Path, work: Path, k: int) -> dict[str, list[str]]:
    """The four measured command lines of round ``k``."""
    common = ["--data", str(data), "--imgsz", str(args.imgsz), "--device", args.device]
    if args.workers is not None:  # else each tool chooses, as for a user who does not say
        common += ["--workers", str(args.workers)]
    train = [*common, "--cfg", str(Path(args.cfg).resolve()), "--weights", "", "--epochs", str(args.epochs),
             "--batch-size", str(args.batch), "--noplots", "--exist-ok"]
    best = work / f"y{k}" / "weights" / "best.pt"
    val = [*common, "--weights", str(best), "--batch-size", str(args.val_batch), "--exist-ok"]
    ours_amp = ["--noamp"] if args.noamp else []
    return {
        "train_ours": [sys.executable, str(ROOT / "train_distill.py"), *train, *ours_amp, "--project", str(work),
                       "--name", f"o{k}"],
        "train_yolov5": [py, "-m", "yolov5.train", *train, "--project", str(work), "--name", f"y{k}"],
        "val_ours": [sys.executable, str(ROOT / "val.py"), *val, "--noplots", "--project", str(work / "val"),
                     "--name", f"o{k}"],
        "val_yolov5": [py, "-m", "yolov5.val", *val, "--project", str(work / "val"), "--name", f"y{k}"],
    }


def run_rounds(args: argparse.Namespace, py: str, data: Path, work: Path) -> dict[str, list[dict]]:
    """Alternate the tools: even rounds ours first, odd rounds YOLOv5 first."""
    log = work / "commands.log"
    samples: dict[str, list[dict]] = {}
    for k in range(args.rounds):
        cmds = commands(args, py, data, work, k)
        order = ("ours", "yolov5") if k % 2 == 0 else ("yolov5", "ours")
        for stage in ("train", "val"):
            for tool in order:
                name = f"{stage}_{tool}"
                cwd = ROOT if tool == "ours" else work  # YOLOv5 runs outside the project folder
                samples.setdefault(name, []).append({**measured(cmds[name], cwd, log), "load_1m": os.getloadavg()[0]})
                print(f"round {k + 1}/{args.rounds} {name}: {samples[name][-1]}", flush=True)
    return samples


def summarize(samples: dict[str, list[dict]], n_train: int, n_val: int, epochs: int) -> dict:
    """Medians per command, images/s, and the ratios ours / YOLOv5."""
    med = {name: {k: statistics.median(s[k] for s in runs) for k in ("seconds", "peak_rss_mb")}
           for name, runs in samples.items()}
    for name, m in med.items():
        m["images_per_s"] = round((n_train * epochs if name.startswith("train") else n_val) / m["seconds"], 2)
    ratios = {}
    for stage in ("train", "val"):
        ours, ref = med[f"{stage}_ours"], med[f"{stage}_yolov5"]
        ratios[f"{stage}_images_per_s"] = round(ours["images_per_s"] / ref["images_per_s"], 3)
        ratios[f"{stage}_peak_rss"] = round(ours["peak_rss_mb"] / ref["peak_rss_mb"], 3)
    return {"median": med, "ratios_ours_over_yolov5": ratios}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "demo.yaml"))
    p.add_argument("--cfg", default=str(ROOT / "models" / "yolov5n.yaml"))
    p.add_argument("--imgsz", type=int, default=320)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--val-batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--workers", type=int, default=None,
                   help="loader workers given to both tools (default: not given; each tool's own default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (median reported)")
    p.add_argument("--max-images", type=int, default=0, help="first N images of each split (0 = all)")
    p.add_argument("--noamp", action="store_true", help="our runs in fp32")
    p.add_argument("--keep", action="store_true", help="keep the temporary run folders")
    p.add_argument("--out", default=str(RESULTS_DIR / "bench_vs_yolov5.json"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    py, why = oracle_python()
    if py is None:
        print(f"SKIP bench_vs_yolov5: {why}; nothing measured")
        return {"skipped": why}
    work = Path(tempfile.mkdtemp(prefix="bench_vs_yolov5_"))
    data, n_train, n_val = dataset_yaml(args.data, work, args.max_images)
    load_start = os.getloadavg()
    samples = run_rounds(args, py, data, work)
    result = {
        "benchmark": "bench_vs_yolov5", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": {k: getattr(args, k) for k in ("cfg", "imgsz", "batch", "val_batch", "epochs", "workers", "device",
                                                  "rounds", "max_images", "noamp")} | {"data": Path(args.data).name},
        "images": {"train": n_train, "val": n_val},
        "machine": {**machine_info(torch.device("cpu")), "load_average_start": list(load_start),
                    "load_average_end": list(os.getloadavg())},
        **summarize(samples, n_train, n_val, args.epochs),
        "samples": samples, "work_dir": str(work) if args.keep else None,
    }
    result["config"]["cfg"] = os.path.relpath(args.cfg, ROOT)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios_ours_over_yolov5"]))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
