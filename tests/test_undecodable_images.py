"""Images whose headers survived but whose data did not: skipped with one warning per file, never a crash.

Broken files are made from a valid JPEG: cut right before its scan (headers only: PIL's structure
check passes it, OpenCV cannot read it), cut right after its scan header (no data), and a scan of
zero bytes (data lost to a zero-filled block; decoders return a flat grey picture).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import detect
import val
from engine.trainer import fit
from tests.conftest import TINY_IMGSZ, train_args, write_data_yaml
from train_distill import parse_options
from utils.dataset import YoloDataset
from utils.demo_data import generate_demo
from utils.labels import decode_check


def _scan_start(data: bytes) -> tuple[int, int]:
    """(offset of the SOS marker, offset just past its header) of a baseline JPEG."""
    sos = data.index(b"\xff\xda")
    return sos, sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")


def break_jpeg(path: Path, how: str) -> Path:
    data = path.read_bytes()
    sos, scan = _scan_start(data)
    broken = {
        "headers_only": data[:sos],
        "cut_after_scan_header": data[:scan],
        "zeroed_scan": data[:scan] + bytes(len(data) - scan - 2) + b"\xff\xd9",
    }[how]
    path.write_bytes(broken)
    return path


def jpeg_dataset(root: Path, n_train: int = 16, n_val: int = 6) -> Path:
    """The tiny demo set with every image re-encoded as JPEG (labels keep their names)."""
    generate_demo(root, seed=1, n_train=n_train, n_val=n_val, imgsz=TINY_IMGSZ)
    for png in sorted((root / "images").rglob("*.png")):
        assert cv2.imwrite(str(png.with_suffix(".jpg")), cv2.imread(str(png)))
        png.unlink()
    return write_data_yaml(root)


BREAKS = ("headers_only", "cut_after_scan_header", "zeroed_scan")


def _break_three(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.jpg"))[:3]
    return [break_jpeg(f, how) for f, how in zip(files, BREAKS)]


def _warnings_about(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and path.name in r.getMessage()]


def _passes_structure_check(path: Path) -> bool:
    """PIL's header-level check (open + verify), the kind of check that reads no pixel data."""
    try:
        with Image.open(path) as im:
            im.verify()
    except (OSError, SyntaxError):  # UnidentifiedImageError is an OSError
        return False
    return True


def test_structure_check_alone_passes_the_broken_files(tmp_path: Path) -> None:
    """Why the scan decodes: a header-level check lets broken files through (all three with the
    Pillow on this project's box; a Pillow seen on a GPU machine refused one at open already),
    while decode_check refuses every one."""
    root = tmp_path / "d"
    jpeg_dataset(root, n_train=3, n_val=1)
    broken = _break_three(root / "images" / "train")
    assert any(_passes_structure_check(f) for f in broken)
    for f in broken:
        assert decode_check(str(f))[1].startswith("corrupt image"), f.name


def test_defect5_truncated_jpeg_is_skipped_in_train_split(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = jpeg_dataset(tmp_path / "d")
    broken = _break_three(tmp_path / "d" / "images" / "train")
    with caplog.at_level(logging.WARNING):
        summary = fit(parse_options(train_args(data, tmp_path, "run", 2)))  # mosaic on: every image is drawn
    assert summary["epochs_run"] == 2 and (Path(summary["save_dir"]) / "weights" / "last.pt").is_file()
    for f in broken:
        assert len(_warnings_about(caplog, f)) == 1, (f.name, _warnings_about(caplog, f))


def test_defect5_truncated_jpeg_is_skipped_in_val_split_and_val_py(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    data = jpeg_dataset(tmp_path / "d")
    broken = _break_three(tmp_path / "d" / "images" / "val")
    with caplog.at_level(logging.WARNING):
        summary = fit(parse_options(train_args(data, tmp_path, "run", 1)))
    best = Path(summary["save_dir"]) / "weights" / "best.pt"
    assert best.is_file()
    assert all(len(_warnings_about(caplog, f)) == 1 for f in broken)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        res = val.main(["--weights", str(best), "--data", str(data), "--imgsz", str(TINY_IMGSZ), "--device", "cpu",
                        "--workers", "0", "--project", str(tmp_path / "val"), "--noplots"])
    assert res["n_images"] == 6 - len(broken)
    assert all(len(_warnings_about(caplog, f)) == 1 for f in broken)


def test_defect5_image_broken_after_the_scan_is_replaced_deterministically(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file that breaks after the scan (or that one decoder reads and another not) fails at load
    time: training takes another index drawn from (seed, epoch, index), evaluation a blank picture."""
    data_root = tmp_path / "d"
    jpeg_dataset(data_root, n_train=8, n_val=1)
    folder = data_root / "images" / "train"
    train = YoloDataset(folder, imgsz=TINY_IMGSZ, augment=True, seed=3)
    evaluation = YoloDataset(folder, imgsz=TINY_IMGSZ, augment=False, rect=True, batch_size=4)
    victim = Path(train.im_files[2])
    break_jpeg(victim, "headers_only")

    with caplog.at_level(logging.WARNING):
        items = {}
        for epoch in (0, 1):
            train.set_epoch(epoch)
            items[epoch] = [train[i] for i in range(len(train))]  # every item meets the victim via mosaic
        train.set_epoch(1)
        again = [train[i] for i in range(len(train))]
    assert len(_warnings_about(caplog, victim)) == 1  # one warning for the whole run
    for a, b in zip(items[1], again):  # the stand-ins depend on (seed, epoch, index) only
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(Path(item[2]) != victim for item in items[0] + items[1])

    k = evaluation.im_files.index(str(victim))
    img, labels, path, _, _ = evaluation[k]
    assert Path(path) == victim and len(labels) == 0  # counted once, as a background picture
    assert (img == 114).all()


def test_defect5_detect_skips_unreadable_images_and_continues(tiny_trained: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    src.mkdir()
    picture = np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        assert cv2.imwrite(str(src / name), picture)
    break_jpeg(src / "b.jpg", "headers_only")
    status = detect.main(["--weights", str(tiny_trained), "--source", str(src), "--device", "cpu", "--imgsz", "96",
                          "--project", str(tmp_path / "out")])
    assert status == 0
    out = tmp_path / "out" / "exp"
    assert sorted(p.name for p in out.glob("*.jpg")) == ["a.jpg", "c.jpg"]
    err = [line for line in capsys.readouterr().err.splitlines() if "b.jpg" in line]
    assert len(err) == 1 and "skipped" in err[0]
