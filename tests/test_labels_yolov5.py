"""Data files read as YOLOv5 7.0 reads them: which images a source lists, how label values round, the
shapes that choose rectangular batches. Each expectation was measured on the real YOLOv5 loader (its
``LoadImagesAndLabels`` and label check run as a black box on the same files, 2026-12-04)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from utils.dataset import YoloDataset
from utils.image_files import list_image_files
from utils.labels import decode_check, parse_label_file


def picture(path: Path, w: int = 48, h: int = 32, fmt: str | None = None, orientation: int | None = None) -> Path:
    """A small picture with a gradient (so that a rotation shows), in ``fmt`` (default: from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    extra = {"exif": exif} if fmt == "JPEG" else {}
    Image.fromarray(arr).save(path, format=fmt, **extra)
    return path


def label_values(tmp_path: Path, text: str) -> np.ndarray:
    f = tmp_path / "lb.txt"
    f.write_text(text)
    labels, err, _, found = parse_label_file(str(f))
    assert err == "" and found, err
    return labels


def test_values_checked_and_deduplicated_in_float32(tmp_path: Path) -> None:
    # 1.00000002 is 1.0 in float32: YOLOv5 keeps the image (a float64 check would skip it)
    np.testing.assert_array_equal(label_values(tmp_path, "0 1.00000002 0.5 0.2 0.2\n"),
                                  np.array([[0, 1, 0.5, 0.2, 0.2]], np.float32))
    # two rows equal in float32 are one row there
    assert len(label_values(tmp_path, "0 0.3 0.3 0.1 0.1\n0 0.30000001 0.3 0.1 0.1\n")) == 1
    f = tmp_path / "lb.txt"
    f.write_text("0 1.0004 0.5 0.2 0.2\n")
    assert "box value 1.0004 outside" in parse_label_file(str(f))[1]  # the value as written, not its float64 tail


def test_folder_listing_skips_hidden_and_repeats(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "images"
    kept = [picture(d / "a.png"), picture(d / "sub" / "b.jpg", fmt="JPEG")]
    picture(d / ".hidden.png")
    picture(d / ".ipynb_checkpoints" / "a-checkpoint.png")
    picture(d / "sub" / ".cache" / "c.png")
    assert list_image_files(d) == sorted(map(str, kept))
    with caplog.at_level(logging.WARNING, logger="utils"):
        assert list_image_files([d, d]) == sorted(map(str, kept))  # a folder named twice
    assert any("2 image entries" in r.getMessage() and "used once" in r.getMessage() for r in caplog.records)


def test_image_suffixes_as_yolov5(tmp_path: Path) -> None:
    d = tmp_path / "images"
    mpo = picture(d / "multi.mpo", fmt="JPEG")  # multi-picture JPEG files carry JPEG data
    dng = picture(d / "raw.dng", fmt="TIFF")  # DNG is TIFF-based
    pfm = d / "depth.pfm"
    pfm.write_bytes(b"PF\n4 4\n-1.0\n" + np.zeros((4, 4, 3), "<f4").tobytes())
    assert set(list_image_files(d)) == {str(mpo), str(dng), str(pfm)}
    ds = YoloDataset(d, imgsz=64)  # PIL cannot read PFM: YOLOv5 reports it corrupt and so do we
    assert sorted(Path(f).name for f in ds.im_files) == ["multi.mpo", "raw.dng"]
    img, *_ = ds[ds.im_files.index(str(dng))]
    assert img.shape == (3, 64, 64) and img.float().std() > 10  # decoded, not a grey stand-in


def test_list_lines_resolved_as_yolov5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ds"
    a = picture(root / "images" / "a.png")
    b = picture(root / "images" / "b.png")
    elsewhere = picture(tmp_path / "cwd" / "images" / "a.png")  # same relative path, other folder
    lst = root / "val.txt"
    lst.write_text("./images/a.png\nimages/b.png\n./images/a.png\n")
    monkeypatch.chdir(tmp_path)  # `images/b.png` is not here: under the list's folder
    assert list_image_files(lst) == [str(a), str(b)]
    lst.write_text("images/a.png\n")  # exists under the current directory: YOLOv5 takes that one
    monkeypatch.chdir(tmp_path / "cwd")
    assert [Path(f).resolve() for f in list_image_files(lst)] == [elsewhere.resolve()]
    lst.write_text("./images/a.png\n")  # './' always means the list's folder
    assert list_image_files(lst) == [str(a)]


@pytest.mark.parametrize("orientation, shape", [(1, (48, 32)), (3, (48, 32)), (6, (32, 48)), (8, (32, 48)),
                                                (5, (48, 32)), (7, (48, 32))])
def test_exif_shapes_as_yolov5(tmp_path: Path, orientation: int, shape: tuple[int, int]) -> None:
    """(w, h) for the rectangular batches: rotated for EXIF 6 and 8 only, as YOLOv5's; the picture
    itself is turned by OpenCV for 5-8 alike (checked through the loader)."""
    f = picture(tmp_path / "images" / "x.jpg", fmt="JPEG", orientation=orientation)
    assert decode_check(str(f)) == (shape, "")
    ds = YoloDataset(tmp_path / "images", imgsz=48)
    _, hw0, _ = ds.load_image(0)
    assert hw0 == ((48, 32) if orientation in (5, 6, 7, 8) else (32, 48))  # (h, w) as decoded


def test_unidentified_image_message_names_no_buffer(tmp_path: Path) -> None:
    f = tmp_path / "x.jpg"
    f.write_bytes(b"not a picture at all")
    _, why = decode_check(str(f))
    assert why.startswith("corrupt image") and "BytesIO" not in why and "0x" not in why


def test_listed_but_missing_image_says_so(tmp_path: Path) -> None:
    assert decode_check(str(tmp_path / "gone.jpg")) == ((0, 0), "image file not found")
