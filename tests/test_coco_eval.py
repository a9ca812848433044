"""COCO json export and agreement of our mAP with pycocotools on the same predictions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision

from utils.coco_eval import (
    COCO80_TO_91,
    ImageIdLookup,
    category_ids,
    coco_evaluate,
    labels_to_coco_json,
    predictions_to_coco,
)
from utils.metrics import match_predictions, score_detections


def random_set(seed: int, n_images: int = 20, nc: int = 3):
    """Jittered ground truth + random false positives: per image (labels_n (m,5), dets (n,6), (h, w)).

    Detections pass class-aware NMS at IoU 0.6 as in validation, as with real detectors.
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_images):
        h, w = int(rng.integers(200, 480)), int(rng.integers(200, 640))
        m = int(rng.integers(0, 8))
        wh = rng.uniform(0.05, 0.4, (m, 2))
        c = rng.uniform(wh / 2, 1 - wh / 2)
        labels_n = np.concatenate((rng.integers(0, nc, (m, 1)), c, wh), 1)
        gt = np.concatenate((c - wh / 2, c + wh / 2), 1) * [w, h, w, h]
        dets = []
        for (cls, *_), box in zip(labels_n, gt):
            for _ in range(int(rng.integers(0, 3))):  # 0-2 detections per object (duplicates are FPs)
                size = box[2:] - box[:2]
                jit = box + rng.normal(0, 0.08, 4) * np.r_[size, size]
                pc = cls if rng.random() < 0.85 else rng.integers(0, nc)  # occasional wrong class
                dets.append([*jit, rng.random(), pc])
        for _ in range(int(rng.integers(0, 6))):  # background false positives
            xy = rng.uniform(0, 1, 2) * [w, h]
            sz = rng.uniform(10, 120, 2)
            dets.append([*xy, *(xy + sz), rng.random() * 0.7, rng.integers(0, nc)])
        d = torch.tensor(dets, dtype=torch.float32).view(-1, 6)
        d[:, [0, 2]] = d[:, [0, 2]].clamp(0, w)
        d[:, [1, 3]] = d[:, [1, 3]].clamp(0, h)
        d = d[(d[:, 2] > d[:, 0] + 1) & (d[:, 3] > d[:, 1] + 1)]
        d = d[torchvision.ops.batched_nms(d[:, :4], d[:, 4], d[:, 5].long(), 0.6)]  # sorted by score
        out.append((labels_n, d, (h, w)))
    return out


def our_map(data, convention: str = "yolov5") -> tuple[float, float]:
    stats = []
    for labels_n, d, (h, w) in data:
        lab = torch.tensor(labels_n, dtype=torch.float32).view(-1, 5)
        xyxy = torch.cat((lab[:, 1:3] - lab[:, 3:5] / 2, lab[:, 1:3] + lab[:, 3:5] / 2), 1) * torch.tensor([w, h, w, h])
        labelsn = torch.cat((lab[:, :1], xyxy), 1)
        stats.append((match_predictions(d, labelsn, convention=convention), d[:, 4], d[:, 5], lab[:, 0]))
    res = score_detections(*(torch.cat(x) for x in zip(*stats)), convention=convention)
    return res.map50, res.map


def pycoco_map(data, tmp_path) -> dict:
    files = [f"im{i:03d}.jpg" for i in range(len(data))]
    anno = labels_to_coco_json([d[0] for d in data], files, [d[2] for d in data], ["a", "b", "c"])
    lookup = ImageIdLookup(anno)
    cats = category_ids(3, anno)
    preds = [r for f, (_, d, _) in zip(files, data) for r in predictions_to_coco(d, lookup(f), cats)]
    (tmp_path / "anno.json").write_text(json.dumps(anno))
    (tmp_path / "pred.json").write_text(json.dumps(preds))
    return coco_evaluate(tmp_path / "anno.json", tmp_path / "pred.json")


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_coco_convention_reproduces_pycocotools(seed, tmp_path):
    # Same matching rule and AP arithmetic (101-point envelope mean) as pycocotools: equal to rounding.
    data = random_set(seed)
    ours50, ours = our_map(data, convention="coco")
    coco = pycoco_map(data, tmp_path)
    yolo50, yolo = our_map(data)  # the default, YOLOv5's figures: a different (documented) AP
    print(f"\nseed {seed}: coco convention mAP50 {ours50:.4f} mAP50-95 {ours:.4f} | pycocotools mAP50 "
          f"{coco['map50']:.4f} mAP50-95 {coco['map']:.4f} | yolov5 convention {yolo50:.4f} {yolo:.4f}")
    assert 0.05 < ours < 0.95  # a non-trivial case
    assert ours == pytest.approx(coco["map"], abs=1e-9) and ours50 == pytest.approx(coco["map50"], abs=1e-9)
    assert "Average Precision" in coco["summary"] and len(coco["stats"]) == 12


def test_perfect_predictions_pycocotools_one(tmp_path):
    data = random_set(5, n_images=5)
    perfect = []
    for labels_n, _, (h, w) in data:
        c, xy, wh = labels_n[:, :1], labels_n[:, 1:3], labels_n[:, 3:5]
        box = np.concatenate((xy - wh / 2, xy + wh / 2), 1) * [w, h, w, h]
        d = np.concatenate((box, np.full_like(c, 0.9), c), 1)
        perfect.append((labels_n, torch.tensor(d, dtype=torch.float32).view(-1, 6), (h, w)))
    assert our_map(perfect, convention="coco") == pytest.approx((1.0, 1.0))
    # YOLOv5's AP ends at (recall 1, precision 0): the last 0.01 of recall is a triangle, so 0.995
    assert our_map(perfect) == pytest.approx((0.995, 0.995))
    coco = pycoco_map(perfect, tmp_path)
    assert coco["map"] == pytest.approx(1.0) and coco["map50"] == pytest.approx(1.0)


def test_labels_to_coco_json_and_records():
    labels = [np.array([[1, 0.5, 0.5, 0.2, 0.4]]), np.zeros((0, 5))]
    anno = labels_to_coco_json(labels, ["/data/a/x.png", "/data/b/y.png"], [(100, 200), (50, 60)], ["p", "q"])
    assert [im["file_name"] for im in anno["images"]] == ["x.png", "y.png"]
    assert anno["images"][0]["height"] == 100 and anno["images"][0]["width"] == 200
    (a,) = anno["annotations"]
    assert a["id"] >= 1 and a["image_id"] == "x" and a["category_id"] == 1
    assert a["bbox"] == pytest.approx([80, 30, 40, 40]) and a["area"] == pytest.approx(1600)
    assert [c["id"] for c in anno["categories"]] == [0, 1]
    # repeated base names fall back to full paths, which the lookup still resolves
    dup = labels_to_coco_json(labels, ["/d/a/x.png", "/d/b/x.png"], [(10, 10)] * 2, ["p", "q"])
    lookup = ImageIdLookup(dup)
    assert lookup("/d/b/x.png") == 2
    with pytest.raises(ValueError, match="annotation json"):
        lookup("/elsewhere/z.png")

    rec = predictions_to_coco(torch.tensor([[10.0, 20.0, 30.0, 60.0, 0.5, 1.0]]), 7, [0, 5])
    assert rec == [{"image_id": 7, "category_id": 5, "bbox": [10.0, 20.0, 20.0, 40.0], "score": 0.5}]


def test_category_ids_coco_and_identity():
    assert len(COCO80_TO_91) == 80 and COCO80_TO_91[:3] == [1, 2, 3] and COCO80_TO_91[-1] == 90
    assert 12 not in COCO80_TO_91 and 26 not in COCO80_TO_91 and 83 not in COCO80_TO_91
    coco_anno = {"categories": [{"id": i} for i in COCO80_TO_91]}
    assert category_ids(80, coco_anno) == COCO80_TO_91
    assert category_ids(80, {"categories": [{"id": i} for i in range(80)]}) == list(range(80))
    assert category_ids(4, None) == [0, 1, 2, 3]
    # numeric COCO-style stems map by id when file_name differs in folder layout
    lookup = ImageIdLookup({"images": [{"id": 139, "file_name": "000000000139.jpg"}]})
    assert lookup("/coco/images/val2017/000000000139.jpg") == 139


def test_coco_evaluate_no_detections(tmp_path):
    anno = labels_to_coco_json([np.array([[0, 0.5, 0.5, 0.2, 0.2]])], ["a.png"], [(10, 10)], ["x"])
    res = coco_evaluate(anno, [])
    assert res["map"] == 0.0 and res["map50"] == 0.0


def test_non_numeric_stems_become_string_ids_as_yolov5_writes_them(tmp_path):
    # YOLOv5's --save-json writes image_id = int(stem) for numeric stems, the stem string otherwise
    labels = [np.array([[0, 0.5, 0.5, 0.2, 0.4]]), np.array([[1, 0.3, 0.3, 0.2, 0.2]])]
    files = ["/d/img_a.jpg", "/d/img_b.jpg"]
    anno = labels_to_coco_json(labels, files, [(100, 200), (50, 60)], ["p", "q"])
    assert [im["id"] for im in anno["images"]] == ["img_a", "img_b"]
    lookup = ImageIdLookup(anno)
    dets = [torch.tensor([[80.0, 30.0, 120.0, 70.0, 0.9, 0.0]]), torch.tensor([[12.0, 10.0, 24.0, 20.0, 0.8, 1.0]])]
    preds = [r for f, d in zip(files, dets) for r in predictions_to_coco(d, lookup(f), [0, 1])]
    assert [r["image_id"] for r in preds] == ["img_a", "img_b"]
    res = coco_evaluate(anno, preds, img_ids=[lookup(f) for f in files])
    assert res["map50"] == pytest.approx(1.0) and res["map"] == pytest.approx(1.0)
    # a mix of numeric and other stems: all strings (pycocotools sorts the ids); repeated stems: 1, 2, ...
    mixed = labels_to_coco_json(labels, ["/d/0005.jpg", "/d/x.jpg"], [(10, 10)] * 2, ["p", "q"])
    assert [im["id"] for im in mixed["images"]] == ["0005", "x"]
    repeated = labels_to_coco_json(labels, ["/d/a/x.jpg", "/d/b/x.png"], [(10, 10)] * 2, ["p", "q"])
    assert [im["id"] for im in repeated["images"]] == [1, 2]
    # numerals that are not decimal digits ("一", "½") are names, not numbers
    other = labels_to_coco_json(labels, ["/d/一.jpg", "/d/½.jpg"], [(10, 10)] * 2, ["p", "q"])
    assert [im["id"] for im in other["images"]] == ["一", "½"]
