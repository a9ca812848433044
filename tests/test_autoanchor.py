"""AutoAnchor: best-possible recall, k-means + evolution, installing anchors, and the training hook."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

from models import DetectionModel, load_model
from utils.autoanchor import (
    BPR_TARGET,
    anchor_fitness,
    best_possible_recall,
    check_anchors,
    evolve_anchors,
    has_placeholder_anchors,
    kmeans_anchors,
    pixel_anchors,
    training_label_sizes,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PX = np.array([[10, 13], [16, 30], [33, 23], [30, 61], [62, 45], [59, 119], [116, 90], [156, 198],
                       [373, 326]], dtype=np.float64)  # yolov5*.yaml anchors, pixels, fine to coarse


def bar_labels(n_images: int, seed: int, aspect: float = 20.0) -> tuple[list[np.ndarray], np.ndarray]:
    """Labels of thin bars (aspect:1, half horizontal, half vertical) on 640×480 images."""
    rng = np.random.default_rng(seed)
    labels = []
    for _ in range(n_images):
        rows = []
        for _ in range(int(rng.integers(1, 5))):
            long = rng.uniform(140, 460)  # pixels
            w, h = (long, long / aspect) if rng.random() < 0.5 else (long / aspect, long)
            rows.append([0, 0.5, 0.5, w / 640, h / 480])
        labels.append(np.array(rows))
    return labels, np.tile([640, 480], (n_images, 1))


def test_bpr_limiting_cases() -> None:
    anchors = DEFAULT_PX
    assert best_possible_recall(anchors.copy(), anchors, 4.0) == 1.0  # every label IS an anchor
    assert best_possible_recall(anchors * 10, anchors[:3], 4.0) == 0.0  # 10× beyond the small ones
    assert best_possible_recall(anchors.max(0, keepdims=True) * 10, anchors, 4.0) == 0.0
    # the threshold: a side 4× an anchor's is not learnable (match 0.25 is not > 1/4), 3.9× is
    a = np.array([[10.0, 10.0]])
    assert best_possible_recall(np.array([[40.0, 10.0]]), a, 4.0) == 0.0
    assert best_possible_recall(np.array([[39.0, 10.0], [10.0, 2.6]]), a, 4.0) == 1.0
    assert best_possible_recall(np.array([[39.0, 10.0], [10.0, 2.4]]), a, 4.0) == 0.5
    assert best_possible_recall(np.zeros((0, 2)), a, 4.0) == 0.0
    # fitness: a perfect fit scores 1, a label matched at 0.5 scores 0.5, a failing one 0
    assert anchor_fitness(np.array([[10.0, 10.0], [20.0, 10.0], [100.0, 10.0]]), a, 4.0) == pytest.approx(0.5)


def test_label_sizes_as_training_sees_them() -> None:
    labels = [np.array([[0, 0.5, 0.5, 0.5, 0.25]]), np.array([[1, 0.5, 0.5, 0.1, 0.1], [0, 0.5, 0.5, 0.0, 0.1]])]
    shapes = np.array([[1280, 640], [100, 200]])  # (w, h): long sides scaled to imgsz
    wh = training_label_sizes(labels, shapes, 320, jitter=0.0)
    np.testing.assert_allclose(wh, [[160, 40], [16, 32]])  # the zero-width row is dropped
    jittered = training_label_sizes(labels, shapes, 320, jitter=0.1, rng=np.random.default_rng(0))
    assert ((jittered / wh >= 0.9 - 1e-9) & (jittered / wh <= 1.1 + 1e-9)).all()
    assert not np.allclose(jittered, wh)


def test_kmeans_and_evolution() -> None:
    rng = np.random.default_rng(0)
    centres = np.array([[8.0, 40.0], [60.0, 12.0], [200.0, 210.0]])
    wh = np.concatenate([c * np.exp(rng.normal(0, 0.05, (200, 2))) for c in centres])
    found = kmeans_anchors(wh, 3, np.random.default_rng(1))
    np.testing.assert_allclose(found, centres[np.argsort(centres.prod(1))], rtol=0.05)  # sorted by area
    poor = np.array([[20.0, 20.0], [30.0, 30.0], [40.0, 40.0]])
    better = evolve_anchors(wh, poor, 4.0, np.random.default_rng(2), generations=100)
    assert anchor_fitness(wh, better, 4.0) > anchor_fitness(wh, poor, 4.0) + 0.1
    assert (np.diff(better.prod(1)) >= 0).all()


def test_check_anchors_on_elongated_boxes_raises_bpr_and_installs_fine_to_coarse() -> None:
    labels, shapes = bar_labels(200, seed=3)
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml")
    lines: list[str] = []
    report = check_anchors(model, labels, shapes, 640, seed=0, generations=150, log=lines.append)
    assert report.bpr_before < 0.7 and report.bpr_after > BPR_TARGET and report.replaced  # 20:1 bars
    assert any("best possible recall (BPR)" in s for s in lines) and any("installed" in s for s in lines)
    det = model.detect
    installed = pixel_anchors(det).reshape(-1, 2).numpy()
    np.testing.assert_allclose(installed, report.anchors_after, rtol=1e-5)  # fine -> coarse by area
    assert (np.diff(installed.prod(1)) >= 0).all()
    np.testing.assert_allclose(det.anchors[0].numpy(), report.anchors_after[:3] / 8, rtol=1e-5)  # grid units
    assert best_possible_recall(training_label_sizes(labels, shapes, 640, rng=np.random.default_rng(0)),
                                installed, 4.0) > BPR_TARGET

    # deterministic for a seed: the same anchors again
    again = DetectionModel("yolov5n.yaml")
    check_anchors(again, labels, shapes, 640, seed=0, generations=150, log=None)
    assert torch.equal(again.detect.anchors, det.anchors)


def test_good_anchors_kept_and_noautoanchor() -> None:
    model = DetectionModel("yolov5n.yaml")
    before = model.detect.anchors.clone()
    # labels of the anchors' own sizes: nothing to improve
    labels = [np.column_stack([np.zeros(9), np.full((9, 2), 0.5), DEFAULT_PX / 640])]
    report = check_anchors(model, labels, np.array([[640, 640]]), 640, jitter=0.0, log=None)
    assert report.bpr_before == 1.0 and report.bpr_after is None and torch.equal(model.detect.anchors, before)
    bars, shapes = bar_labels(50, seed=4)
    report = check_anchors(model, bars, shapes, 640, enabled=False, log=None)  # --noautoanchor
    assert report.bpr_before < BPR_TARGET and report.reason == "--noautoanchor"
    assert torch.equal(model.detect.anchors, before)


def test_placeholder_anchors_always_fitted() -> None:
    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text())
    cfg["anchors"] = 3
    model = DetectionModel(cfg)
    assert has_placeholder_anchors(model) and not has_placeholder_anchors(DetectionModel("yolov5n.yaml"))
    bars, shapes = bar_labels(50, seed=5)
    report = check_anchors(model, bars, shapes, 640, enabled=False, generations=50, log=None)
    assert report.replaced and report.reason == "placeholder anchors replaced"
    assert not has_placeholder_anchors(model)  # now real anchors, e.g. after a checkpoint load


def _bar_dataset(root: Path, n: int = 16, side: int = 96) -> Path:
    """Images with one thin bar each (12:1) and its label; returns a dataset yaml."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(n):
            im = np.full((side, side, 3), 40, np.uint8)
            long = int(rng.integers(48, 90))
            short = max(long // 12, 2)
            w, h = (long, short) if i % 2 else (short, long)
            x0, y0 = int(rng.integers(0, side - w + 1)), int(rng.integers(0, side - h + 1))
            cv2.rectangle(im, (x0, y0), (x0 + w - 1, y0 + h - 1), (0, 220, 255), -1)
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), im)
            xc, yc = (x0 + w / 2) / side, (y0 + h / 2) / side
            (root / "labels" / split / f"{i}.txt").write_text(f"0 {xc:.5f} {yc:.5f} {w / side:.5f} {h / side:.5f}\n")
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                    "names": ["bar"]}))
    return data


def test_training_runs_autoanchor_and_saves_the_anchors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from engine.trainer import fit
    from tests.conftest import train_args
    from train_distill import parse_options

    data = _bar_dataset(tmp_path / "bars")
    summary = fit(parse_options(train_args(data, tmp_path, "aa", 1, "--noval")))
    out = capsys.readouterr().out
    assert "AutoAnchor" in out and "installed" in out
    best = load_model(Path(summary["save_dir"]) / "weights" / "best.pt")
    default = DetectionModel(str(ROOT / "models" / "yolov5p.yaml"), nc=1).detect.anchors
    assert not torch.allclose(best.detect.anchors, default)  # the checkpoint carries the new anchors

    summary = fit(parse_options(train_args(data, tmp_path, "kept", 1, "--noval", "--noautoanchor")))
    assert "installed" not in capsys.readouterr().out
    kept = load_model(Path(summary["save_dir"]) / "weights" / "best.pt")
    torch.testing.assert_close(kept.detect.anchors, default, rtol=1e-3, atol=1e-3)  # fp16 checkpoint
