"""Benchmarks that run whole training processes: a short real run writes sane figures."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import TINY_IMGSZ


def test_distill_cost_times_both_arms_on_real_runs(tiny_data: Path, tmp_path: Path) -> None:
    from benchmarks.bench_distill_cost import main

    out = tmp_path / "cost"
    assert main(["--data", str(tiny_data), "--student", "models/yolov5p.yaml", "--t_cfg", "models/yolov5p.yaml",
                 "--imgsz", str(TINY_IMGSZ), "--batch-size", "8", "--epochs", "2", "--rounds", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.with_suffix(".json").read_text())
    rows = result["rows"]
    assert set(rows) == {"student alone", "distilled"}
    for arm in rows.values():
        assert arm["epochs_s"] > 0 and arm["wall_s"] > arm["epochs_s"] and len(arm["samples_epochs_s"]) == 1
    assert "distilled / student alone: **" in out.with_suffix(".md").read_text()
