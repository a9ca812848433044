"""results.csv, the progress-bar line, and the run folder's yaml records."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import yaml


class ResultsLog:
    """Append one row per epoch to `results.csv`; the header is the first row's keys.

    Columns are fixed by the first epoch and a resumed run appends to the same file. A term missing
    from a later row (distillation switched off for the last epochs by `--d_stop_epochs`) is written
    as 0, which is what it contributed to the loss.
    """

    def __init__(self, save_dir: Path) -> None:
        self.path = Path(save_dir) / "results.csv"

    def header(self) -> list[str] | None:
        if not self.path.exists():
            return None
        with open(self.path, newline="") as f:
            return next(csv.reader(f), None)

    def append(self, row: dict[str, float]) -> None:
        columns = self.header()
        with open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            if columns is None:
                columns = list(row)
                writer.writerow(columns)
            unknown = set(row) - set(columns)
            if unknown:
                raise ValueError(f"{self.path}: new columns {sorted(unknown)} after the header was written")
            values = [row.get(k, 0.0) for k in columns]
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in values])

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
