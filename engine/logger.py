"""results.csv, the progress-bar line, and the run folder's yaml records.

results.csv has YOLOv5's columns first, in YOLOv5's order, so scripts written for YOLOv5's file
(and YOLOv5's own ``plot_results``, which reads columns by position) read ours:

    epoch, train/box_loss, train/obj_loss, train/cls_loss, metrics/precision, metrics/recall,
    metrics/mAP_0.5, metrics/mAP_0.5:0.95, val/box_loss, val/obj_loss, val/cls_loss, x/lr0, x/lr1, x/lr2

then ours: the weighted distillation terms (``train/kd/<term>``), ``metrics/fitness`` and
``time/epoch_s``. As in YOLOv5, ``epoch`` counts from 0 and ``x/lr0..2`` are the learning rates of
the parameter groups in YOLOv5's order (biases, decayed weights, normalisation scales; see
`engine.optim.YOLOV5_GROUP_ORDER`) at the end of the epoch's last step. YOLOv5 right-aligns every
field to 20 characters; we write plain fields (the same names once stripped, which is what readers
of YOLOv5's file do), so ``csv.DictReader`` users need no stripping.

The file is a view of the run's history: it is rewritten whole (atomically) from the list of epoch
rows that every checkpoint carries, so after any kill and ``--resume`` it holds each epoch exactly
once.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

YOLOV5_COLUMNS = (
    "epoch",
    "train/box_loss", "train/obj_loss", "train/cls_loss",
    "metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95",
    "val/box_loss", "val/obj_loss", "val/cls_loss",
    "x/lr0", "x/lr1", "x/lr2",
)  # fmt: skip
TRAILING_COLUMNS = ("metrics/fitness", "time/epoch_s")
# evaluation-result key -> its results.csv column (the run summary reports the same keys)
METRIC_COLUMNS = {"precision": "metrics/precision", "recall": "metrics/recall", "map50": "metrics/mAP_0.5",
                  "map": "metrics/mAP_0.5:0.95", "fitness": "metrics/fitness"}


def results_columns(rows: Iterable[dict]) -> list[str]:
    """YOLOv5's columns, then every other column of ``rows`` in first-seen order (the distillation
    terms), then fitness and epoch time."""
    fixed = set(YOLOV5_COLUMNS) | set(TRAILING_COLUMNS)
    extra = dict.fromkeys(k for row in rows for k in row if k not in fixed)
    return [*YOLOV5_COLUMNS, *extra, *TRAILING_COLUMNS]


def _field(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_results(path: Path, rows: Sequence[dict]) -> None:
    """Write all epoch ``rows`` to ``path`` atomically (temp file + rename: a kill never leaves half
    a file). A column a row lacks (a distillation term switched off for later epochs) is written as
    0, what it contributed to the loss."""
    columns = results_columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_field(row.get(k, 0.0)) for k in columns])
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    os.replace(tmp, path)


def read_results(path: str | Path) -> list[dict[str, str]]:
    """Rows of a results.csv as dicts, names and values stripped (reads YOLOv5's padded file too)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = [c.strip() for c in rows[0]]
    return [dict(zip(header, (v.strip() for v in r))) for r in rows[1:] if r]


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
