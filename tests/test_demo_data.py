"""The synthetic demo set: deterministic bytes, valid YOLO labels, a matching COCO json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np

from utils.demo_data import NAMES, generate_demo


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = digest(generate_demo(tmp_path / "a", seed=0, n_train=6, n_val=2))
    b = digest(generate_demo(tmp_path / "b", seed=0, n_train=6, n_val=2))
    c = digest(generate_demo(tmp_path / "c", seed=1, n_train=6, n_val=2))
    assert len(a) == 6 * 2 + 2 * 2 + 1 and a == b
    assert a != c
    # val images do not depend on how many train images were asked for
    d = digest(generate_demo(tmp_path / "d", seed=0, n_train=3, n_val=2))
    assert all(d[k] == a[k] for k in d if k.startswith("images/val"))


def test_labels_valid_and_tight(tmp_path: Path) -> None:
    root = generate_demo(tmp_path / "demo", seed=0, n_train=8, n_val=4)
    colours = {0: (40, 40, 215), 1: (45, 185, 45), 2: (215, 85, 35), 3: (35, 215, 225)}  # BGR
    per_image = []
    for lb in sorted((root / "labels" / "train").glob("*.txt")):
        img = cv2.imread(str(root / "images" / "train" / f"{lb.stem}.png"))
        assert img.shape == (160, 160, 3)
        rows = [r.split() for r in lb.read_text().splitlines()]
        per_image.append(len(rows))
        for r in rows:
            assert len(r) == 5 and int(r[0]) in range(len(NAMES))
            xc, yc, w, h = map(float, r[1:])
            assert 0 <= xc - w / 2 < xc + w / 2 <= 1 and 0 <= yc - h / 2 < yc + h / 2 <= 1
            assert 12 / 160 <= max(w, h) <= 66 / 160
            x1, y1 = round((xc - w / 2) * 160), round((yc - h / 2) * 160)
            x2, y2 = round((xc + w / 2) * 160), round((yc + h / 2) * 160)
            crop = img[y1:y2, x1:x2].astype(int)
            near = (np.abs(crop - np.array(colours[int(r[0])])).max(-1) < 60).mean()
            assert near > 0.25  # the box holds mostly its own (mildly occluded) shape
    assert min(per_image) >= 1 and max(per_image) <= 4


def test_coco_json_matches_val_labels(tmp_path: Path) -> None:
    root = generate_demo(tmp_path / "demo", seed=2, n_train=1, n_val=5)
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    assert [c["id"] for c in coco["categories"]] == [0, 1, 2, 3]
    assert [c["name"] for c in coco["categories"]] == NAMES
    files = sorted(p.name for p in (root / "images" / "val").glob("*.png"))
    assert [im["file_name"] for im in coco["images"]] == files
    assert all(im["id"] == int(Path(im["file_name"]).stem) for im in coco["images"])
    for im in coco["images"]:
        rows = (root / "labels" / "val" / f"{Path(im['file_name']).stem}.txt").read_text().splitlines()
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert len(anns) == len(rows)
        for a, r in zip(anns, rows):
            c, xc, yc, w, h = map(float, r.split())
            x, y, bw, bh = a["bbox"]
            assert a["category_id"] == int(c)
            assert np.allclose([x + bw / 2, y + bh / 2, bw, bh], np.array([xc, yc, w, h]) * 160, atol=1e-3)
