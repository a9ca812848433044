"""Small helpers shared by the benchmarks: machine description, timing statistics, peak memory, output.

Nothing here runs at import time. The timing helpers synchronise CUDA around every measured block
so that asynchronous kernel launches are not mistaken for finished work.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from utils.precision import cpu_bf16_support

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="ignore").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: device name, CPU count, threads, library versions."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_bf16": cpu_bf16_support() or "none",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = props.name
        info["device_memory_gb"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    with contextlib.suppress(OSError):  # not on every platform; contention makes CPU figures noisy
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_block(fn: Callable[[], Any], n: int, device: torch.device) -> float:
    """Seconds per call of ``fn`` averaged over ``n`` back-to-back calls (device synchronised)."""
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / n


def summarize(samples: list[float]) -> dict[str, float]:
    """Median, min, max and inter-quartile range (same unit as ``samples``) of repeated timings."""
    s = sorted(samples)
    if len(s) >= 4:
        q = statistics.quantiles(s, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = s[-1] - s[0]
    return {"median": statistics.median(s), "min": s[0], "max": s[-1], "iqr": iqr}


def peak_rss_mb() -> float:
    """High-water mark of this process's resident set size, MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, which belongs to this program image. ``getrusage``'s
    ``ru_maxrss`` is not used there because Linux carries it across fork + exec, so a child started
    by a large parent would report the parent's peak. Elsewhere ``ru_maxrss`` (macOS: bytes).
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def training_pass_seconds(run_dir: str | Path) -> float:
    """Seconds of a finished run's training passes: ``time/epoch_s`` of every epoch in its results.csv
    but the last, which also validates (in a ``--noval`` run only the last epoch does)."""
    with open(Path(run_dir) / "results.csv", newline="") as f:
        epochs = [float(row["time/epoch_s"]) for row in csv.DictReader(f)]
    return sum(epochs[:-1])


def time_training_process(entry: list[str], flags: list[str], scratch: Path, name: str, label: str) -> dict[str, float]:
    """Run ``python <entry> <flags>`` as one CPU training process (``--noval``, no plots) in ``scratch/name``.

    ``entry`` is ``["train_distill.py"]`` or an equivalent (``["-c", code]``). Returns the seconds of its
    training passes (`training_pass_seconds`), its wall time, and the kernel's accounting of that child
    alone (``os.wait4``): minor page faults, system CPU seconds, peak RSS. A failed run exits the
    benchmark with ``label`` and the child's last stderr line.
    """
    cmd = [sys.executable, *entry, *flags, "--noval", "--noplots", "--device", "cpu", "--project", str(scratch),
           "--name", name, "--exist-ok"]
    log = scratch / f"{name}.stderr"
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so the child's own rusage is ours to read
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = (log.read_text().strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"{label}: training failed ({name}): {tail}")
    return {"epochs_s": training_pass_seconds(scratch / name), "wall_s": wall, "minor_faults": usage.ru_minflt,
            "system_s": usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024}


def median_run(runs: list[dict[str, float]]) -> dict[str, Any]:
    """The median of each figure over repeated `time_training_process` samples, and every sample's
    training-pass seconds (``samples_epochs_s``)."""
    return {**{key: statistics.median(r[key] for r in runs) for key in runs[0]},
            "samples_epochs_s": [r["epochs_s"] for r in runs]}


def write_results(result: dict[str, Any], md_lines: list[str], stem: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.json`` and ``<stem>.md``; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text("\n".join(md_lines).rstrip("\n") + "\n")
    return json_path, md_path


def publish(result: dict[str, Any], md_lines: list[str], stem: str | Path) -> None:
    """`write_results`, then print the markdown and where both files went."""
    json_path, md_path = write_results(result, md_lines, stem)
    print("\n".join(md_lines))
    print(f"wrote {json_path} and {md_path}")


__all__ = [
    "RESULTS_DIR",
    "ROOT",
    "machine_info",
    "peak_rss_mb",
    "publish",
    "summarize",
    "median_run",
    "synchronize",
    "time_training_process",
    "training_pass_seconds",
    "time_block",
    "write_results",
]
