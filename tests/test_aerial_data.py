"""The generated aerial set: deterministic bytes, the specified object counts and sizes, tight
honest boxes, a COCO json that matches the val labels, and the yaml `generate: aerial` dispatch."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils import aerial_data
from utils.aerial_data import NAMES, generate_aerial, render_sample
from utils.data_config import _generate_into


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_val_independent_of_n_train(tmp_path: Path) -> None:
    a = digest(generate_aerial(tmp_path / "a", seed=0, n_train=3, n_val=2))
    b = digest(generate_aerial(tmp_path / "b", seed=0, n_train=3, n_val=2))
    c = digest(generate_aerial(tmp_path / "c", seed=1, n_train=3, n_val=2))
    assert len(a) == 3 * 2 + 2 * 2 + 1 and a == b
    assert all(a[k] != c[k] for k in a if k.startswith("images/"))
    d = digest(generate_aerial(tmp_path / "d", seed=0, n_train=1, n_val=2))
    val = [k for k in a if "/val/" in k or k.startswith("annotations")]
    assert len(val) == 5 and all(d[k] == a[k] for k in val)


def test_counts_sizes_and_classes_in_range() -> None:
    counts, sides, short, classes = [], [], [], []
    for i in range(12):
        img, boxes = render_sample(np.random.default_rng([7, 0, i]))
        assert img.shape == (320, 320, 3) and img.dtype == np.uint8
        wh = boxes[:, 3:5] - boxes[:, 1:3]
        counts.append(len(boxes))
        sides += wh.max(1).tolist()
        short += wh.min(1).tolist()
        classes += boxes[:, 0].astype(int).tolist()
    assert min(counts) >= 20 and max(counts) <= 150
    assert max(counts) - min(counts) > 30  # the count really varies over the range
    assert min(sides) >= 4 and max(sides) <= 32 and min(short) >= 2
    assert np.median(sides) < 16  # mostly small objects
    assert set(classes) == set(range(len(NAMES)))


def test_boxes_are_the_exact_extent_of_unoccluded_objects() -> None:
    for i in range(4):
        _, boxes, ids = render_sample(np.random.default_rng([3, 1, i]), with_ids=True)
        assert ids.max() == len(boxes)
        for k, (_, x1, y1, x2, y2) in enumerate(boxes.astype(int), start=1):
            assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 320
            ys, xs = np.nonzero(ids == k)
            # tight: the visible pixels touch all four sides of the box, and none lie outside it
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
            # honest: objects keep a 1 px gap, so no object was painted over another
            grown = cv2.dilate((ids == k).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            assert set(np.unique(ids[grown]).tolist()) <= {0, k}
            inside = ids[y1:y2, x1:x2]
            assert (inside == k).mean() > 0.15


def test_coco_json_matches_val_labels(tmp_path: Path) -> None:
    root = generate_aerial(tmp_path / "aerial", seed=2, n_train=1, n_val=3)
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    assert [c["name"] for c in coco["categories"]] == NAMES and [c["id"] for c in coco["categories"]] == list(range(10))
    assert [im["file_name"] for im in coco["images"]] == sorted(p.name for p in (root / "images" / "val").iterdir())
    for im in coco["images"]:
        rows = np.loadtxt(root / "labels" / "val" / f"{Path(im['file_name']).stem}.txt", ndmin=2)
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert len(anns) == len(rows) >= 20
        got = np.array([[a["category_id"], a["bbox"][0] + a["bbox"][2] / 2, a["bbox"][1] + a["bbox"][3] / 2,
                         a["bbox"][2], a["bbox"][3]] for a in anns])
        assert np.allclose(got, rows * [1, 320, 320, 320, 320], atol=1e-3)
        assert (rows[:, 1:3] - rows[:, 3:5] / 2 > -1e-6).all() and (rows[:, 1:3] + rows[:, 3:5] / 2 < 1 + 1e-6).all()


def test_yaml_generate_key_dispatches_to_aerial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = functools.partial(generate_aerial, n_train=2, n_val=1)
    monkeypatch.setattr(aerial_data, "generate_aerial", small)
    _generate_into(tmp_path / "set", "aerial", seed=0)
    assert len(list((tmp_path / "set" / "images" / "train").glob("*.jpg"))) == 2
    assert not list(tmp_path.glob(".set.tmp-*"))  # the temp folder was renamed away
    with pytest.raises(ValueError, match="aerial"):
        _generate_into(tmp_path / "other", "nope", seed=0)
