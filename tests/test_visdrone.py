"""VisDrone2019-DET → YOLO conversion on the format fixture (tests/fixtures/visdrone)."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "visdrone"


def _load_script():
    # The script is standalone (not a package module), so load it by path instead of importing.
    spec = importlib.util.spec_from_file_location("visdrone2yolo", ROOT / "data" / "scripts" / "visdrone2yolo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def split(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE, tmp_path / "VisDrone")
    return tmp_path / "VisDrone" / "VisDrone2019-DET-val"


def test_convert_split_exact_labels_and_counts(split: Path) -> None:
    counts = _load_script().convert_split(split)
    labels = split / "labels"
    assert (labels / "0000001_00001_d_0000001.txt").read_text().splitlines() == [
        "3 0.312500 0.208333 0.312500 0.208333",  # car, inside the image
        "0 0.890625 0.916667 0.218750 0.166667",  # pedestrian, clipped right/bottom
        "9 0.046875 0.041667 0.093750 0.083333",  # motor, clipped left/top
        "1 0.234375 0.718750 0.093750 0.187500",  # people, row with a trailing comma
    ]
    assert (labels / "0000001_00002_d_0000002.txt").read_text() == ""  # everything dropped
    assert (labels / "0000002_00001_d_0000003.txt").read_text() == ""  # no annotation file
    assert counts == {
        "images": 3, "rows": 11, "boxes": 4, "clipped": 2, "dropped_score0": 2, "dropped_ignored_region": 1,
        "dropped_others": 2, "dropped_zero_area": 2, "malformed_rows": 1, "missing_annotations": 1,
        "background_images": 2,
    }


def test_main_finds_splits_and_prints_counts(split: Path, capsys: pytest.CaptureFixture) -> None:
    results = _load_script().main(["--dir", str(split.parent)])
    assert list(results) == ["VisDrone2019-DET-val"]
    out = capsys.readouterr().out
    assert "4 boxes written" in out and "score0 2" in out and "others 2" in out


def test_missing_folders_raise(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="images/ and annotations/"):
        _load_script().convert_split(tmp_path)


def test_converted_split_loads_with_visdrone_names(split: Path) -> None:
    from utils.dataset import YoloDataset

    _load_script().convert_split(split)
    ds = YoloDataset(split / "images", imgsz=64, nc=10)
    assert len(ds) == 3 and sum(len(lb) for lb in ds.labels) == 4
