"""Odd-sized images against YOLOv5 7.0's own val.py (tests/fixtures/oracle_val_odd, PROVENANCE.md).

At --imgsz 160 and 320 no scale factor of these 40 images is a whole number and rectangular batches
pad by odd numbers of pixels: resize rounding (YOLOv5 rounds each side up) and the recorded padding
(x.5 for odd spares) decide where boxes land. (a) our loader gives each image the geometry YOLOv5's
loader gave it; (b) val.py gives YOLOv5's P, R, mAP50 and mAP50-95 (to 1e-6); (c) detect.py writes
the label rows YOLOv5's detect.py wrote (boxes rounded to whole pixels, its number format).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

import detect
import val
from utils.augment import letterbox
from utils.dataset import YoloDataset, long_side_hw

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "oracle_val_odd"
ORACLE = json.loads((FIXTURE / "oracle_figures.json").read_text())
NAMES = json.loads((REPO / "tests" / "fixtures" / "oracle_val" / "oracle_figures.json").read_text())["names"]


def test_sides_round_up_and_odd_spares_pad_by_halves() -> None:
    assert long_side_hw((159, 289), 160) == (89, 160)  # 159·160/289 = 88.03 → 89 (rounding gave 88)
    assert long_side_hw((163, 281), 160) == (93, 161)  # 281·(160/281) = 160.00000000000003 → 161
    assert long_side_hw((160, 120), 160) == (160, 120)  # a whole factor changes nothing
    blank = np.zeros((93, 161, 3), np.uint8)
    img, _, pad = letterbox(blank, (160, 192), scaleup=False)
    assert pad == (15.5, 33.5) and (img[:33] == 114).all() and (img[33:126, 15:176] == 0).all()  # starts at 15, 33
    assert letterbox(np.zeros((224, 320, 3), np.uint8), (256, 352), scaleup=False)[2] == (16.0, 16.0)


@pytest.fixture(scope="module")
def data_yaml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("oracle_val_odd")  # the loader writes a label cache beside the labels
    for sub in ("images", "labels"):
        shutil.copytree(FIXTURE / sub, root / sub)
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "train": "images/val", "val": "images/val",
                                                    "names": NAMES}))
    return root / "data.yaml"


@pytest.mark.parametrize("imgsz", [160, 320])
def test_loader_gives_each_image_yolov5s_geometry(data_yaml: Path, imgsz: int) -> None:
    want = ORACLE["loader"][str(imgsz)]
    ds = YoloDataset(data_yaml.parent / "images" / "val", imgsz=imgsz, batch_size=8, rect=True, stride=32, pad=0.5)
    seen = set()
    for i in range(len(ds)):
        img, _, path, hw0, (ratio, pad) = ds[i]
        w = want[Path(path).stem]
        seen.add(Path(path).stem)
        assert list(hw0) == w["hw0"] and list(img.shape[1:]) == w["shape"], path
        assert list(ratio) == pytest.approx(w["ratio"], abs=1e-12) and list(pad) == w["pad"], path
    assert len(seen) == len(want) == 40


@pytest.mark.parametrize("run", ["strong_160", "strong_320", "strong_320_single_cls"])
def test_val_reproduces_oracle_on_odd_sizes(data_yaml: Path, tmp_path: Path, run: str, capsys) -> None:
    """Including --single-cls: the 4-class model scored as one class (NMS across classes)."""
    want = ORACLE["runs"][run]
    res = val.run(REPO / "weights" / "demo_teacher.pt", data_yaml, imgsz=want["imgsz"], batch_size=want["batch_size"],
                  conf_thres=want["conf_thres"], iou_thres=want["iou_thres"], device="cpu", workers=0,
                  project=tmp_path / "runs", plots=False, single_cls=want.get("single_cls", False))
    assert len(res["per_class"]) == (1 if want.get("single_cls") else 4)
    table = capsys.readouterr().out  # the per-class rows without --verbose, as YOLOv5 prints 2-49 classes
    assert all((name in table) != bool(want.get("single_cls")) for name in NAMES[1:])
    ours = (res["precision"], res["recall"], res["map50"], res["map"])
    oracle = (want["P"], want["R"], want["mAP50"], want["mAP50-95"])
    print(f"\n{run}: ours {ours} oracle {oracle}")
    assert ours == pytest.approx(oracle, abs=1e-6)


def test_detect_writes_yolov5s_rows_on_odd_sizes(tmp_path: Path) -> None:
    want = ORACLE["detect_320"]["labels"]
    res = detect.run(REPO / "weights" / "demo_teacher.pt", FIXTURE / "images" / "val", imgsz=320, device="cpu",
                     save_txt=True, save_conf=True, nosave=True, project=tmp_path, name="d")
    labels = Path(res.save_dir) / "labels"
    got = {f.stem: f.read_text().split("\n")[:-1] for f in labels.glob("*.txt")}
    assert set(got) == set(want)
    for stem, rows in want.items():  # in YOLOv5's order too: lowest score first
        ours = [tuple(map(float, r.split())) for r in got[stem]]
        theirs = [tuple(map(float, r.split())) for r in rows]
        assert len(ours) == len(theirs), stem
        for a, b in zip(ours, theirs):  # same boxes; the last printed digit may differ (float32 vs 64)
            assert a == pytest.approx(b, rel=2e-6, abs=2e-6), stem


def test_detect_agnostic_nms_from_the_command_line(tmp_path: Path) -> None:
    """--agnostic-nms: no two kept boxes of any classes overlap beyond the IoU threshold; class-aware NMS
    keeps some such pairs on these pictures (the demo classes' boxes overlap)."""
    import torch

    from utils.boxes import box_iou

    def worst_overlap(results) -> float:
        worst = 0.0
        for _, _, det in results:
            if len(det) > 1:
                iou = box_iou(torch.from_numpy(det[:, :4]).double(), torch.from_numpy(det[:, :4]).double())
                worst = max(worst, float(iou.fill_diagonal_(0).max()))
        return worst

    args = ["--weights", str(REPO / "weights" / "demo_teacher.pt"), "--source", str(FIXTURE / "images" / "val"),
            "--imgsz", "160", "--device", "cpu", "--nosave", "--conf-thres", "0.05", "--project", str(tmp_path)]
    aware = detect.run(**vars(detect.parse_opt([*args, "--name", "aware"])))  # the CLI's own mapping
    agnostic = detect.run(**vars(detect.parse_opt([*args, "--name", "agnostic", "--agnostic-nms"])))
    n_aware, n_agnostic = (sum(len(d) for _, _, d in r.results) for r in (aware, agnostic))
    # (overlaps are measured on the reported boxes, rounded to whole pixels: a little above NMS's 0.45)
    assert n_agnostic < n_aware and worst_overlap(agnostic.results) < 0.5 < worst_overlap(aware.results)


def test_save_json_writes_yolov5s_records(data_yaml: Path, tmp_path: Path) -> None:
    """--save-json: the same COCO records as YOLOv5's val.py (image id = numeric stem, boxes mapped back
    with its geometry, 3 decimals), here its confident ones."""
    res = val.run(REPO / "weights" / "demo_teacher.pt", data_yaml, imgsz=320, batch_size=8, device="cpu", workers=0,
                  project=tmp_path / "runs", plots=False, save_json=True)
    ours: dict[tuple, list] = {}
    for r in json.loads(Path(res["pred_json"]).read_text()):
        ours.setdefault((r["image_id"], r["category_id"]), []).append(r)
    want = ORACLE["json_320"]["records"]
    assert len(want) > 100
    for r in want:  # the record of the same image, class and score (5 decimals, the last may differ)
        same = [o for o in ours[(r["image_id"], r["category_id"])] if abs(o["score"] - r["score"]) <= 2e-5]
        assert min(max(abs(a - b) for a, b in zip(o["bbox"], r["bbox"])) for o in same) <= 0.0015, r


SQUARE = json.loads((FIXTURE / "oracle_square.json").read_text())


@pytest.mark.parametrize("imgsz", [160, 320])
def test_square_batches_scale_labels_as_yolov5s_loader(data_yaml: Path, imgsz: int) -> None:
    """Square letterboxing (how YOLOv5 feeds exported models): a resized side of 321 px is letterboxed down
    again, and the labels follow the unrounded factor, as YOLOv5's loader scales them (0.3 px apart before)."""
    ds = YoloDataset(data_yaml.parent / "images" / "val", imgsz=imgsz, batch_size=8, rect=False, stride=32)
    for i in range(len(ds)):
        img, labels, path, _, _ = ds[i]
        want = np.array(SQUARE["labels"][str(imgsz)][Path(path).stem], dtype=np.float64).reshape(-1, 5)
        assert tuple(img.shape[1:]) == (imgsz, imgsz)
        np.testing.assert_allclose(labels[:, 1:].numpy(), want, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("imgsz", [160, 320])
def test_val_on_a_dynamic_onnx_gives_yolov5s_figures(data_yaml: Path, tmp_path: Path, imgsz: int) -> None:
    """YOLOv5's val.py feeds any exported model square letterboxed batches; so does ours (--rect: the .pt's)."""
    import export

    onnx, _ = export.run(REPO / "weights" / "demo_teacher.pt", imgsz=320, dynamic=True, output=tmp_path / "t.onnx")
    kw = dict(imgsz=imgsz, batch_size=8, device="cpu", workers=0, project=tmp_path / "runs", plots=False)
    got = val.run(onnx, data_yaml, **kw)
    want = SQUARE["runs"][f"onnx_dynamic_{imgsz}"]
    for ours, theirs in (("precision", "P"), ("recall", "R"), ("map50", "mAP50"), ("map", "mAP50-95")):
        assert got[ours] == pytest.approx(want[theirs], abs=2e-4), ours  # onnxruntime's kernels may differ by CPU
    rect = val.run(onnx, data_yaml, rect=True, **kw)
    pt = val.run(REPO / "weights" / "demo_teacher.pt", data_yaml, **kw)
    assert rect["map"] == pytest.approx(pt["map"], abs=2e-4) and abs(got["map"] - pt["map"]) > 1e-3


def test_detect_save_crop_cuts_and_numbers_as_yolov5(tmp_path: Path) -> None:
    """--save-crop: crops/<class>/<stem>.jpg, <stem>2.jpg, ... — the same files, of the same sizes, as
    YOLOv5's detect.py --save-crop wrote (oracle_crops.json: name → (h, w)); numbering follows its
    lowest-score-first order."""
    import cv2

    want = json.loads((FIXTURE / "oracle_crops.json").read_text())
    res = detect.run(REPO / "weights" / "demo_teacher.pt", FIXTURE / "images" / "val", imgsz=320, device="cpu",
                     save_crop=True, nosave=True, project=tmp_path, name="c", verbose=False)
    crops = Path(res.save_dir) / "crops"
    got = {f.relative_to(crops).as_posix(): list(cv2.imread(str(f)).shape[:2]) for f in crops.rglob("*.jpg")}
    assert got == want
