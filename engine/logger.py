"""results.csv, the progress-bar line, and the run folder's yaml records."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import yaml


class ResultsLog:
    """Append one row per epoch to `results.csv`; the header is the first row's keys.

    Columns are fixed by the first epoch (the set of loss terms does not change during a run), and a
    resumed run appends to the same file.
    """

    def __init__(self, save_dir: Path) -> None:
        self.path = Path(save_dir) / "results.csv"

    def append(self, row: dict[str, float]) -> None:
        new_file = not self.path.exists()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if new_file:
                writer.writerow(list(row))
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row.values()])

    def rows(self) -> list[dict[str, str]]:
        if not self.path.exists():
            return []
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))


def save_yaml(path: Path, data: dict) -> None:
    """Write a yaml atomically (a crash never leaves half a file)."""
    tmp = Path(path).with_suffix(".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    os.replace(tmp, path)


def progress_line(epoch: int, epochs: int, mem_gb: float, means: dict[str, float], n_instances: int, size: int) -> str:
    """'  3/30  0.0G  det/box 0.0512  det/obj ...  inst 34  160' for the tqdm description."""
    losses = "  ".join(f"{k} {v:.4g}" for k, v in means.items())
    return f"{epoch + 1:>4}/{epochs}  {mem_gb:.2f}G  {losses}  inst {n_instances}  {size}"
