"""Dataset yaml parsing, label validation, scan cache, YoloDataset items and the loader."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch.utils.data import DistributedSampler

from utils.data_config import load_data_config
from utils.data_download import DatasetUnavailableError, zip_urls
from utils.dataset import (
    YoloDataset,
    collate_fn,
    create_dataloader,
    default_workers,
    long_side_hw,
    rect_batch_shapes,
)
from utils.image_files import img2label_paths
from utils.labels import parse_label_file


def write_image(path: Path, h: int = 48, w: int = 64, colour: tuple[int, int, int] = (90, 90, 90)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.full((h, w, 3), colour, dtype=np.uint8)
    cv2.rectangle(img, (w // 4, h // 4), (w // 2, h // 2), (0, 200, 0), -1)
    assert cv2.imwrite(str(path), img)
    return path


def write_label(image: Path, text: str) -> Path:
    (lb,) = img2label_paths([str(image)])
    Path(lb).parent.mkdir(parents=True, exist_ok=True)
    Path(lb).write_text(text)
    return Path(lb)


def make_split(root: Path, split: str, n: int, h: int = 48, w: int = 64) -> list[Path]:
    ims = []
    for i in range(n):
        im = write_image(root / "images" / split / f"{i:03d}.png", h, w)
        write_label(im, f"{i % 2} 0.375 0.375 0.25 0.25\n")
        ims.append(im)
    return ims


def write_yaml(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------------------------------
# yaml
# ---------------------------------------------------------------------------------------------
def test_yaml_folder_and_names_list(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_split(root, "train", 2)
    make_split(root, "val", 2)
    cfg = load_data_config(write_yaml(tmp_path / "d.yaml", {
        "path": str(root), "train": "images/train", "val": "images/val", "names": ["a", "b"]}))
    assert cfg["path"] == root and cfg["nc"] == 2 and cfg["names"] == ["a", "b"]
    assert cfg["train"] == [str(root / "images" / "train")] and cfg["test"] is None
    assert cfg["val_json"] is None and cfg["yaml_file"] == (tmp_path / "d.yaml").resolve()


def test_yaml_txt_list_and_mixed_list(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    ims = make_split(root, "train", 3)
    extra = make_split(root, "extra", 1)
    # relative lines resolve against the list's folder (the dataset root), absolute ones as they are
    (root / "train.txt").write_text(f"{ims[2]}\nimages/train/{ims[1].name}\n./images/train/{ims[0].name}\n")
    cfg = load_data_config(write_yaml(tmp_path / "d.yaml", {
        "path": str(root), "train": ["train.txt", "images/extra"], "val": "train.txt",
        "names": {0: "a", 1: "b"}, "nc": 2}))
    assert cfg["names"] == ["a", "b"]
    assert cfg["train"] == [str(root / "train.txt"), str(root / "images" / "extra")]
    ds = YoloDataset(cfg["train"], imgsz=64, nc=cfg["nc"])
    # one sorted list whatever the order of the list file and of the sources, as YOLOv5 orders them
    assert ds.im_files == sorted([str(p) for p in ims] + [str(extra[0])]) and ds.im_files[0] == str(extra[0])
    assert all(len(lb) == 1 for lb in ds.labels)


def test_yaml_errors(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    make_split(root, "train", 1)
    base = {"path": str(root), "train": "images/train", "val": "images/train"}
    with pytest.raises(ValueError, match="'nc' is 3 but 'names' lists 2"):
        load_data_config(write_yaml(tmp_path / "a.yaml", {**base, "names": ["a", "b"], "nc": 3}))
    with pytest.raises(ValueError, match="ids must be 0..1"):
        load_data_config(write_yaml(tmp_path / "b.yaml", {**base, "names": {0: "a", 2: "b"}}))
    with pytest.raises(DatasetUnavailableError, match=r"images.val is missing.*not run.*: get it from the moon$"):
        load_data_config(write_yaml(tmp_path / "c.yaml", {
            **base, "val": "images/val", "names": ["a"], "download": "get it from the moon\nsecond line"}))
    with pytest.raises(ValueError, match="missing 'train'"):
        load_data_config(write_yaml(tmp_path / "d.yaml", {"path": str(root), "val": "images/train", "names": ["a"]}))
    with pytest.raises(FileNotFoundError, match="dataset yaml"):
        load_data_config(tmp_path / "nope.yaml")
    # a split that is not required may be missing (e.g. evaluating without the train images)
    cfg = load_data_config(write_yaml(tmp_path / "e.yaml", {**base, "train": "gone", "names": ["a"]}),
                           require=("val",))
    assert cfg["train"] == [str(root / "gone")]


def test_yaml_relative_path_repo_root_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """YOLOv5's rule first (relative to the repository folder), then cwd, yaml parent, yaml folder."""
    import utils.data_config

    repo = tmp_path / "repo"
    monkeypatch.setattr(utils.data_config, "project_root", lambda: repo)
    y = write_yaml(tmp_path / "cfg" / "data" / "x.yaml", {"path": "datasets/x", "train": "images/train",
                                                          "val": "images/train", "names": ["a"]})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FileNotFoundError, match=r"'train' path .*repo.datasets.x.images.train not found"):
        load_data_config(y)  # nothing anywhere: the message names YOLOv5's location first
    make_split(tmp_path / "cfg" / "data" / "datasets" / "x", "train", 1)  # beside the yaml
    assert load_data_config(y)["path"] == tmp_path / "cfg" / "data" / "datasets" / "x"
    make_split(tmp_path / "cfg" / "datasets" / "x", "train", 1)  # the yaml folder's parent beats it
    assert load_data_config(y)["path"] == tmp_path / "cfg" / "datasets" / "x"
    make_split(elsewhere / "datasets" / "x", "train", 1)  # the current directory beats both
    assert load_data_config(y)["path"] == elsewhere / "datasets" / "x"
    make_split(repo / "datasets" / "x", "train", 1)  # the repository folder beats everything
    assert load_data_config(y)["path"] == repo / "datasets" / "x"
    # a folder that exists but lacks the split does not win over one that has it
    (repo / "datasets" / "x" / "images" / "train").rename(repo / "datasets" / "x" / "images" / "old")
    assert load_data_config(y)["path"] == elsewhere / "datasets" / "x"


def test_yaml_without_path_inside_the_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exporter's data.yaml inside the dataset folder, splits relative to it, no `path`."""
    import utils.data_config

    monkeypatch.setattr(utils.data_config, "project_root", lambda: tmp_path / "repo")
    monkeypatch.chdir(tmp_path)
    make_split(tmp_path / "export", "train", 1)
    y = write_yaml(tmp_path / "export" / "data.yaml", {"train": "images/train", "val": "images/train",
                                                       "names": ["a"]})
    cfg = load_data_config(y)
    assert cfg["path"] == tmp_path / "export" and cfg["val"] == [str(tmp_path / "export" / "images" / "train")]


def test_yaml_generate_demo_and_val_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import utils.data_config
    import utils.demo_data

    small = functools.partial(utils.demo_data.generate_demo, n_train=4, n_val=2)
    monkeypatch.setattr(utils.demo_data, "generate_demo", small)
    monkeypatch.setattr(utils.data_config, "project_root", lambda: tmp_path)  # YOLOv5's rule: repo/datasets/demo
    y = write_yaml(tmp_path / "data" / "demo.yaml", {
        "path": "datasets/demo", "train": "images/train", "val": "images/val", "generate": "demo",
        "val_json": "annotations/instances_val.json", "names": ["r", "g", "b", "y"]})
    monkeypatch.chdir(tmp_path / "data")
    cfg = load_data_config(y)
    assert cfg["path"] == tmp_path / "datasets" / "demo"
    assert len(os.listdir(cfg["train"][0])) == 4 and len(os.listdir(cfg["val"][0])) == 2
    assert cfg["val_json"] == cfg["path"] / "annotations" / "instances_val.json" and cfg["val_json"].is_file()
    assert not list((tmp_path / "datasets").glob(".demo.tmp-*"))  # temp folder renamed away


def test_yolov5_coco_yaml_finds_cocos_own_annotations(tmp_path: Path) -> None:
    """YOLOv5's coco.yaml has no val_json: a val2017.txt split under a root holding COCO's
    annotations/instances_val2017.json scores --save-json against it, as YOLOv5's val.py does."""
    root = tmp_path / "coco"
    ims = make_split(root, "val2017", 2)
    (root / "val2017.txt").write_text("".join(f"./images/val2017/{p.name}\n" for p in ims))
    y = write_yaml(tmp_path / "coco.yaml", {"path": str(root), "train": "val2017.txt", "val": "val2017.txt",
                                            "names": ["a", "b"]})
    assert load_data_config(y)["val_json"] is None  # no annotations folder: generated from the labels
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text("{}")
    assert load_data_config(y)["val_json"] == root / "annotations" / "instances_val2017.json"
    other = write_yaml(tmp_path / "other.yaml", {"path": str(root), "train": "images/val2017",
                                                 "val": "images/val2017", "names": ["a", "b"]})
    assert load_data_config(other)["val_json"] is None  # only COCO's own layout means COCO's json


def test_repo_yamls_parse() -> None:
    root = Path(__file__).resolve().parents[1] / "data"
    for name, nc in (("coco.yaml", 80), ("VisDrone.yaml", 10), ("demo.yaml", 4)):
        cfg = yaml.safe_load((root / name).read_text())
        assert len(cfg["names"]) == nc == cfg["nc"], name
    assert yaml.safe_load((root / "VisDrone.yaml").read_text())["names"][7] == "awning-tricycle"
    if (root.parent.parent / "datasets" / "coco" / "val2017.txt").exists():
        pytest.skip("COCO is present on this machine")
    with pytest.raises(DatasetUnavailableError, match="not run the yaml's 'download'.*YOLO-format labels"):
        load_data_config(root / "coco.yaml", require=("val",))
    c128 = yaml.safe_load((root / "coco128.yaml").read_text())
    assert c128["names"] == yaml.safe_load((root / "coco.yaml").read_text())["names"]
    assert c128["path"] == "../datasets/coco128" and c128["train"] == c128["val"] == "images/train2017"
    assert zip_urls(c128["download"]) == ["https://ultralytics.com/assets/coco128.zip"]


# ---------------------------------------------------------------------------------------------
# labels, scan, cache
# ---------------------------------------------------------------------------------------------
def test_label_path_rule() -> None:
    assert img2label_paths(["/a/images/b/images/x.jpg"]) == [str(Path("/a/images/b/labels/x.txt"))]
    assert img2label_paths(["/a/imgs/x.png"]) == [str(Path("/a/imgs/x.txt"))]


def test_label_edge_cases_and_one_summary_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    d = tmp_path / "images" / "train"
    ok = write_image(d / "ok.png")
    write_label(ok, "0 0.5 0.5 0.2 0.2\n")
    write_label(write_image(d / "empty.png"), "")  # background
    write_image(d / "nolabel.png")  # background
    write_label(write_image(d / "badcls.png"), "0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n")
    write_label(write_image(d / "cols.png"), "0 0.5 0.5 0.2\n")
    write_label(write_image(d / "dup.png"), "1 0.5 0.5 0.2 0.2\n1 0.5 0.5 0.2 0.2\n0 0.3 0.3 0.1 0.1\n")
    # YOLOv5's acceptance rules (measured on its 7.0 loader): any box value outside [0, 1], even by
    # round-off, skips the image; a box of zero width is kept; images under 10 px are skipped
    write_label(write_image(d / "round.png"), "1 1.0004 0.5 0.2 0.2\n")
    write_label(write_image(d / "outside.png"), "1 1.5 0.5 0.2 0.2\n")
    write_label(write_image(d / "flat.png"), "0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.0 0.2\n")
    write_label(write_image(d / "tiny.png", 9, 9), "0 0.5 0.5 0.5 0.5\n")
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "trunc.png").write_bytes(ok.read_bytes()[:60])

    with caplog.at_level(logging.WARNING, logger="utils"):
        ds = YoloDataset(d, imgsz=64, nc=2)
    names = {Path(f).name: lb for f, lb in zip(ds.im_files, ds.labels)}
    assert set(names) == {"ok.png", "empty.png", "nolabel.png", "dup.png", "flat.png"}
    assert len(names["empty.png"]) == 0 and len(names["nolabel.png"]) == 0
    # duplicates removed, the rest in YOLOv5's order then: sorted rows (measured on its 7.0 loader)
    np.testing.assert_allclose(names["dup.png"], [[0, 0.3, 0.3, 0.1, 0.1], [1, 0.5, 0.5, 0.2, 0.2]])
    np.testing.assert_allclose(names["flat.png"], [[0, 0.5, 0.5, 0.2, 0.2], [1, 0.3, 0.3, 0.0, 0.2]])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    # one warning per unusable image file (each needs fixing), ONE summary for the label problems
    unusable = sorted(Path(m.split()[2].rstrip(":")).name for m in warnings[:-1])
    assert unusable == ["corrupt.jpg", "tiny.png", "trunc.png"]
    assert any("under 10 px" in m for m in warnings[:-1])
    msg = warnings[-1]
    assert "skipped 4 of 12 images" in msg and "out of range (nc=2)" in msg and "columns" in msg
    assert "1.0004 outside [0, 1]" in msg and "duplicate" in msg and "corrupt image" not in msg
    # without nc the class range is unknown, so badcls.png is kept
    assert len(YoloDataset(d, imgsz=64)) == 6


def test_nothing_usable_is_a_clear_error(tmp_path: Path) -> None:
    d = tmp_path / "images" / "train"
    write_label(write_image(d / "a.png"), "5 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match="no usable images.*out of range"):
        YoloDataset(d, imgsz=64, nc=2)
    with pytest.raises(FileNotFoundError, match="no images"):
        YoloDataset(tmp_path / "labels", imgsz=64)


def test_cache_built_reused_rebuilt(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ims = make_split(tmp_path, "train", 3)
    cache = tmp_path / "labels" / "train.yolokd.npz"  # never YOLOv5's labels/train.cache
    (tmp_path / "labels" / "train.cache").write_bytes(b"YOLOv5's pickle")  # left alone by us
    ds = YoloDataset(tmp_path / "images" / "train", imgsz=64)
    assert not ds.scan_from_cache and cache.is_file()
    with np.load(cache, allow_pickle=False) as z:  # plain arrays, loadable without pickle
        assert set(z.files) >= {"hash", "im_files", "labels"}
    assert YoloDataset(tmp_path / "images" / "train", imgsz=64).scan_from_cache
    lb = write_label(ims[0], "1 0.5 0.5 0.5 0.5\n0 0.2 0.2 0.1 0.1\n")
    os.utime(lb, ns=(1, 10**18))  # different mtime and size → stale
    ds = YoloDataset(tmp_path / "images" / "train", imgsz=64)
    assert not ds.scan_from_cache and len(ds.labels[0]) == 2
    write_image(tmp_path / "images" / "train" / "new.png")  # file list changed → stale
    ds = YoloDataset(tmp_path / "images" / "train", imgsz=64)
    assert not ds.scan_from_cache and len(ds) == 4
    cache.write_bytes(b"garbage")  # unreadable cache → rescanned, not a crash
    assert not YoloDataset(tmp_path / "images" / "train", imgsz=64).scan_from_cache
    cache.unlink()
    cache.mkdir()  # cannot be written → warning only
    with caplog.at_level(logging.WARNING, logger="utils"):
        assert len(YoloDataset(tmp_path / "images" / "train", imgsz=64)) == 4
    assert any("cache not saved" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "labels" / "train.cache").read_bytes() == b"YOLOv5's pickle"


def test_polygon_rows_become_their_boxes(tmp_path: Path) -> None:
    """Segment rows (cls x1 y1 ... xn yn) -> bounding box of the points. In a file with polygon rows,
    YOLOv5 reads EVERY row as a polygon, a 5-column row as two points (measured on its 7.0 loader)."""
    lb = tmp_path / "a.txt"
    lb.write_text("2 0.1 0.2 0.5 0.1 0.3 0.6 0.2 0.4\n"  # 4 points: x 0.1..0.5, y 0.1..0.6
                  "1 0.9 0.9 0.95 0.8 1.0004 0.99\n")  # a point a hair outside: its box stays in [0, 1]
    labels, err, note, found = parse_label_file(str(lb))
    assert err == "" and found and note == ""
    np.testing.assert_allclose(labels, [[2, 0.3, 0.35, 0.4, 0.5], [1, 0.9502, 0.895, 0.1004, 0.19]], atol=1e-6)
    lb.write_text("2 0.1 0.2 0.5 0.1 0.3 0.6\n0 0.5 0.5 0.2 0.2\n1 0.4 0.6\n")  # + a box row, a 1-point row
    labels, err, note, _ = parse_label_file(str(lb))
    assert err == "" and "2 row(s) of under 7 columns read as polygons" in note
    # the oracle's figures for this file: the box row became (0.5, 0.5)-(0.2, 0.2), the point a flat box
    np.testing.assert_allclose(labels, [[2, 0.3, 0.35, 0.4, 0.5], [0, 0.35, 0.35, 0.3, 0.3],
                                        [1, 0.4, 0.6, 0.0, 0.0]], atol=1e-6)
    lb.write_text("0 0.1 0.1 0.2 0.1 0.3 0.1\n")  # collinear: a flat box, kept as YOLOv5 keeps it
    np.testing.assert_allclose(parse_label_file(str(lb))[0], [[0, 0.2, 0.1, 0.2, 0.0]], atol=1e-6)
    for text, why in (("0 0.1 0.1 0.2 0.2 0.3\n", "6 columns"),  # 2.5 points
                      ("0 0.1 0.1 0.2 0.2 0.3 0.3 0.4 0.4\n0 0.1 0.2 0.3 0.4 0.5 0.6 0.7\n",
                       "line 2: 8 columns do not make (x, y) points"),
                      ("0 0.5 0.5 0.2 0.2\n1 0.5 0.5\n", "line 2 has 3 columns"),  # no polygon row: boxes only
                      ("0 0.1 0.1 0.2 0.2 1.7 0.3\n", "outside"),
                      ("0 0.1 0.1 0.2 x 0.3 0.3\n", "non-numeric")):
        lb.write_text(text)
        labels, err, _, _ = parse_label_file(str(lb))
        assert why in err and labels.shape == (0, 5), text
    # through the dataset: the polygon image trains with its box
    im = write_image(tmp_path / "images" / "train" / "p.png")
    write_label(im, "0 0.25 0.25 0.5 0.25 0.5 0.5 0.25 0.5\n")
    ds = YoloDataset(tmp_path / "images" / "train", imgsz=64)
    np.testing.assert_allclose(ds.labels[0], [[0, 0.375, 0.375, 0.25, 0.25]], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# items, collate, loader
# ---------------------------------------------------------------------------------------------
def test_item_format_and_ratio_pad_maps_back(tmp_path: Path) -> None:
    im = write_image(tmp_path / "images" / "val" / "a.png", h=50, w=100)
    write_label(im, "1 0.5 0.25 0.2 0.3\n")
    ds = YoloDataset(tmp_path / "images" / "val", imgsz=64, nc=2)
    img, labels, path, (h0, w0), ((rh, rw), (padw, padh)) = ds[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 64, 64) and path == str(im)
    assert (h0, w0) == (50, 100) and labels.shape == (1, 6) and labels[0, 0] == 0 and labels[0, 1] == 1
    xc, yc = labels[0, 2] * 64, labels[0, 3] * 64  # back to original pixels via ratio_pad
    assert abs((xc - padw) / rw - 50) < 0.5 and abs((yc - padh) / rh - 12.5) < 0.5
    assert abs(labels[0, 4] * 64 / rw - 20) < 0.5 and abs(labels[0, 5] * 64 / rh - 15) < 0.5
    # RGB order: the green rectangle drawn in BGR (0, 200, 0) stays green; grey stays grey
    assert img[1].max() == 200 and img[0].max() < 200


def test_rect_batch_shapes(tmp_path: Path) -> None:
    make_split(tmp_path, "val", 3, h=32, w=64)  # wide images: h/w = 0.5
    ds = YoloDataset(tmp_path / "images" / "val", imgsz=128, batch_size=2, rect=True, stride=32, pad=0.5)
    # height: ceil(0.5·128/32 + 0.5)·32 = 96; width: ceil(128/32 + 0.5)·32 = 160
    assert ds.batch_shapes.tolist() == [[96, 160], [96, 160]]
    loader, _ = create_dataloader(tmp_path / "images" / "val", 128, 2, 32, rect=True, pad=0.5, workers=0)
    imgs, targets, paths, shapes = next(iter(loader))
    assert imgs.shape == (2, 3, 96, 160) and len(shapes) == 2


def test_loader_pins_memory_only_when_it_feeds_a_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU run on a machine with a GPU must not pin its batches (that starts CUDA for nothing)."""
    make_split(tmp_path, "val", 2, h=32, w=32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu, _ = create_dataloader(tmp_path / "images" / "val", 64, 2, 32, workers=0)
    gpu, _ = create_dataloader(tmp_path / "images" / "val", 64, 2, 32, workers=0, pin_memory=True)
    assert not cpu.pin_memory and gpu.pin_memory


def test_rect_batch_shapes_hand_worked() -> None:
    # 640 px, stride 32, validation pad 0.5; batches of two sorted aspects h/w
    shapes = rect_batch_shapes(np.array([0.5, 0.75, 1.5, 2.0, 0.5, 2.0, 0.8]), 2, 640, 32, 0.5)
    # wide pair: tallest is 0.75·640 = 480 → 480/32 + 0.5 = 15.5 → 16 strides = 512; width 640 → 20.5 → 672
    # tall pair: height 640 → 672; widest is 640/1.5 = 426.7 → 13.33 + 0.5 → 14 strides = 448
    # mixed pair: both sides full → 672 × 672; last (single) image 0.8: 512 → 16.5 → 17 strides = 544
    assert shapes.tolist() == [[512, 672], [672, 448], [672, 672], [544, 672]]
    # no pad: an exact multiple stays (480 = 15·32), anything above goes to the next one
    assert rect_batch_shapes(np.array([0.75, 0.76]), 1, 640, 32, 0.0).tolist() == [[480, 640], [512, 640]]
    assert rect_batch_shapes(np.array([0.5]), 4, 128, 32, 0.5).tolist() == [[96, 160]]


def test_rect_batch_shapes_smallest_holding_every_image() -> None:
    rng = np.random.default_rng(0)
    aspect = np.sort(np.exp(rng.uniform(-1.2, 1.2, 200)))
    bs, imgsz, stride, pad = 8, 320, 32, 0.5
    shapes = rect_batch_shapes(aspect, bs, imgsz, stride, pad)
    assert shapes.shape == (25, 2) and (shapes % stride == 0).all()
    for b, (bh, bw) in enumerate(shapes):
        hw = np.array([long_side_hw((a * 1000, 1000), imgsz) for a in aspect[b * bs:(b + 1) * bs]])
        need = hw.max(0) + pad * stride  # every image of the batch plus the margin
        assert (np.array([bh, bw]) >= need - 0.5).all()  # (±0.5: rounding of the scaled sides)
        assert (np.array([bh, bw]) - stride < need + 0.5).all()  # and one stride less would not do


def test_rect_order_is_numpy_default_argsort(tmp_path: Path) -> None:
    """Equal aspects keep numpy's default (not stable) sort order, as YOLOv5's rect batches do."""
    sizes = [(16, 32), (32, 16), (24, 24)]  # at least 10 px a side (smaller images are skipped)
    for i in range(20):
        h, w = sizes[i % 3]
        im = write_image(tmp_path / "images" / "val" / f"{i:03d}.png", h, w)
        write_label(im, f"0 0.5 0.5 0.{10 + i} 0.2\n")  # the width tells the file
    listed = YoloDataset(tmp_path / "images" / "val", imgsz=64)
    aspect = listed.shapes[:, 1] / listed.shapes[:, 0]
    expected = [Path(listed.im_files[i]).name for i in np.argsort(aspect)]
    ds = YoloDataset(tmp_path / "images" / "val", imgsz=64, batch_size=4, rect=True, stride=16, pad=0.5)
    assert [Path(f).name for f in ds.im_files] == expected
    if (np.argsort(aspect) != np.argsort(aspect, kind="stable")).any():  # true with numpy 2.x here
        assert [Path(f).name for f in ds.im_files] != sorted(expected, key=lambda n: (aspect[int(n[:3])], n))
    # labels and shapes moved with their images
    assert [round(float(lb[0, 3]) * 100) - 10 for lb in ds.labels] == [int(n[:3]) for n in expected]
    assert [tuple(wh) for wh in ds.shapes] == [tuple(listed.shapes[int(n[:3])]) for n in expected]
    assert ds.batch_shapes.shape == (5, 2)


def test_collate_batch_index(tmp_path: Path) -> None:
    ims = make_split(tmp_path, "train", 3)
    write_label(ims[1], "0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.1\n")
    ds = YoloDataset(tmp_path / "images" / "train", imgsz=64)
    imgs, targets, paths, shapes = collate_fn([ds[0], ds[1], ds[2]])
    assert imgs.shape == (3, 3, 64, 64) and imgs.dtype == torch.uint8
    assert targets.shape == (4, 6) and targets[:, 0].tolist() == [0, 1, 1, 2]
    assert paths == tuple(ds.im_files) and shapes[0][0] == (48, 64)


def _batches(loader, n: int) -> list:
    out = []
    for i, (imgs, targets, paths, _) in enumerate(loader):
        out.append((imgs.clone(), targets.clone(), paths))
        if i + 1 == n:
            break
    return out


def test_loader_deterministic_with_workers(tmp_path: Path) -> None:
    make_split(tmp_path, "train", 8)
    hyp = {"mixup": 0.5, "degrees": 5.0}
    kw = dict(hyp=hyp, augment=True, workers=2, shuffle=True, nc=2)
    a = _batches(create_dataloader(tmp_path / "images" / "train", 64, 4, 32, seed=3, **kw)[0], 2)
    b = _batches(create_dataloader(tmp_path / "images" / "train", 64, 4, 32, seed=3, **kw)[0], 2)
    c = _batches(create_dataloader(tmp_path / "images" / "train", 64, 4, 32, seed=4, **kw)[0], 2)
    for (ia, ta, pa), (ib, tb, pb) in zip(a, b):
        assert pa == pb and torch.equal(ia, ib) and torch.equal(ta, tb)
    assert any(not torch.equal(x[0], y[0]) for x, y in zip(a, c))


def test_loader_options(tmp_path: Path) -> None:
    make_split(tmp_path, "train", 5)
    loader, ds = create_dataloader(tmp_path / "images" / "train", 64, 16, 32, workers=0, world_size=2, rank=1,
                                   shuffle=True)
    assert isinstance(loader.sampler, DistributedSampler) and loader.sampler.num_replicas == 2
    assert loader.batch_size == 5 and len(list(loader.sampler)) == 3
    cached = YoloDataset(tmp_path / "images" / "train", imgsz=64, cache="ram")
    assert all(torch.equal(cached[i][0], ds[i][0]) for i in range(len(ds)))
    single = YoloDataset(tmp_path / "images" / "train", imgsz=64, single_cls=True)
    assert all((lb[:, 0] == 0).all() for lb in single.labels)
    with pytest.raises(ValueError, match="cache="):
        YoloDataset(tmp_path / "images" / "train", imgsz=64, cache="disk")



def test_augmentation_depends_on_seed_epoch_index_only(tmp_path: Path) -> None:
    """Worker count and history do not change an epoch's batches; the epoch does (exact resume needs this)."""
    make_split(tmp_path, "train", 8)
    kw = dict(hyp={"mixup": 0.5, "degrees": 5.0}, augment=True, shuffle=False, nc=2, seed=5)
    src = tmp_path / "images" / "train"
    serial, ds0 = create_dataloader(src, 64, 4, 32, workers=0, **kw)
    parallel, ds2 = create_dataloader(src, 64, 4, 32, workers=2, **kw)
    for ds in (ds0, ds2):
        ds.set_epoch(3)
    for (ia, ta, *_), (ib, tb, *_) in zip(_batches(serial, 2), _batches(parallel, 2)):
        assert torch.equal(ia, ib) and torch.equal(ta, tb)
    first = ds0[1][0]
    ds0.set_epoch(4)
    assert not torch.equal(first, ds0[1][0])
    ds0.set_epoch(3)
    assert torch.equal(first, ds0[1][0])


def test_ram_cache_gives_the_same_augmented_batches(tmp_path: Path) -> None:
    """`--cache ram` (and `auto` when it caches) only saves decoding: mosaic/mixup batches are identical."""
    make_split(tmp_path, "train", 6)
    kw = dict(hyp={"mixup": 0.5, "degrees": 5.0}, augment=True, shuffle=True, nc=2, seed=2, workers=0)
    src = tmp_path / "images" / "train"
    disk = _batches(create_dataloader(src, 64, 3, 32, **kw)[0], 2)
    ram_loader, ram_ds = create_dataloader(src, 64, 3, 32, cache="ram", **kw)
    assert all(im is not None for im in ram_ds.ims)
    ram = _batches(ram_loader, 2)
    for (ia, ta, pa), (ib, tb, pb) in zip(disk, ram):
        assert pa == pb and torch.equal(ia, ib) and torch.equal(ta, tb)


def test_auto_cache_only_when_the_images_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--cache auto` (the default) caches a set whose resized images fit in 1/8 of the free memory."""
    import utils.dataset as dataset_mod

    make_split(tmp_path, "train", 4, h=48, w=64)
    src = tmp_path / "images" / "train"
    need = 4 * 3 * 48 * 64  # long side 64 = imgsz: no resize
    assert YoloDataset(src, imgsz=64).resized_bytes() == need
    monkeypatch.setattr(dataset_mod, "available_memory", lambda: 8 * need)
    assert all(im is not None for im in YoloDataset(src, imgsz=64, cache="auto").ims)
    monkeypatch.setattr(dataset_mod, "available_memory", lambda: 8 * need - 1)
    assert all(im is None for im in YoloDataset(src, imgsz=64, cache="auto").ims)
    monkeypatch.setattr(dataset_mod, "available_memory", lambda: 16 * need)
    assert all(im is None for im in YoloDataset(src, imgsz=64, cache="auto", processes=3).ims)  # 3 ranks' caches
    monkeypatch.setattr(dataset_mod, "available_memory", lambda: 0)  # unknown: never cache
    assert all(im is None for im in YoloDataset(src, imgsz=64, cache="auto").ims)
    assert all(im is None for im in YoloDataset(src, imgsz=64, cache="none").ims)


@pytest.mark.parametrize(("device", "cpus", "processes", "want"), [
    ("cpu", 2, 1, 0),     # the measured case: the model's threads already use both cores
    ("cpu", 4, 1, 0),
    ("cpu", 16, 4, 0),    # DDP on CPU: 4 cores per process
    ("cpu", 16, 1, 2),    # a large CPU keeps the old default (unmeasured)
    ("cuda", 2, 1, 2),    # the CPU is free to decode while the GPU computes
    ("cuda", 64, 8, 2),
])
def test_default_workers(device: str, cpus: int, processes: int, want: int) -> None:
    assert default_workers(torch.device(device), processes, cpus=cpus) == want
