"""--image-weights: the sampling weights (hand-worked), the weighted loader, and a training run using them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.trainer import fit
from models.checkpoint import load_checkpoint
from tests.conftest import train_args
from train_distill import parse_options
from utils.dataset import create_dataloader
from utils.sampling import image_weights, inverse_frequency

LABELS = [np.array([[0, 0.5, 0.5, 0.1, 0.1], [0, 0.2, 0.2, 0.1, 0.1]]), np.array([[1, 0.5, 0.5, 0.2, 0.2]]),
          np.zeros((0, 5))]


def test_weights_by_hand() -> None:
    # class counts 2, 1, 0 (→ 1): 1/n = 0.5, 1, 1, normalised by 2.5
    assert inverse_frequency(LABELS, 3) == pytest.approx([0.2, 0.4, 0.4])
    assert image_weights(LABELS, 3) == pytest.approx([0.4, 0.4, 0.0])  # two labels of 0.2; one of 0.4; none
    # the last validation's mAP: class 0 at 0.5 keeps (1 - 0.5)² = 1/4 of its weight, class 1 at 0 all
    assert image_weights(LABELS, 3, [0.5, 0.0, 0.3]) == pytest.approx([0.1, 0.4, 0.0])
    assert image_weights(LABELS, 3, [1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])  # nothing to favour


def test_weights_equal_yolov5s() -> None:
    """12 images, 5 classes (one without labels, some images without labels), per-class mAPs: the weights
    YOLOv5 7.0's own functions gave (tests/fixtures/PROVENANCE.md), before and after a validation."""
    oracle = json.loads((Path(__file__).parent / "fixtures" / "oracle_image_weights" / "oracle.json").read_text())
    labels = [np.array(lab, dtype=np.float64).reshape(-1, 5) for lab in oracle["labels"]]
    got = image_weights(labels, oracle["nc"], oracle["maps"])
    np.testing.assert_allclose(got, oracle["image_weights"], rtol=1e-6, atol=1e-7)  # theirs pass through float32
    np.testing.assert_allclose(image_weights(labels, oracle["nc"]), oracle["image_weights_before_val"], rtol=1e-6,
                               atol=1e-7)


def test_weighted_loader_draws_by_the_weights_it_is_given(tiny_data: Path) -> None:
    root = tiny_data.parent
    loader, data = create_dataloader(root / "images" / "train", 96, 8, 32, augment=False, workers=0, shuffle=True,
                                     image_weights=True)
    assert isinstance(loader.sampler, torch.utils.data.WeightedRandomSampler)
    favourite = data.im_files[5]
    loader.sampler.weights = torch.zeros(len(data), dtype=torch.float64).index_fill_(0, torch.tensor([5]), 1.0)
    drawn = [p for _, _, paths, _ in loader for p in paths]
    assert len(drawn) == len(data) and set(drawn) == {favourite}  # with replacement, as many as the set holds
    with pytest.raises(ValueError, match="--image-weights.*torchrun"):
        create_dataloader(root / "images" / "train", 96, 8, 32, workers=0, image_weights=True, rank=0, world_size=2)
    with pytest.raises(ValueError, match="--rect"):
        create_dataloader(root / "images" / "train", 96, 8, 32, workers=0, image_weights=True, rect=True)


def test_image_weights_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    """The loader refuses --image-weights with --rect or under DDP before it reads a single source (the
    scan and RAM cache of a large dataset would otherwise come first): no such folder is ever looked at."""
    missing = tmp_path / "no_such_images"
    with pytest.raises(ValueError, match="--image-weights .* nor with --rect"):
        create_dataloader(missing, 96, 8, 32, workers=0, image_weights=True, rect=True)
    with pytest.raises(ValueError, match="under torchrun"):
        create_dataloader(missing, 96, 8, 32, workers=0, image_weights=True, rank=1, world_size=2)
    with pytest.raises(FileNotFoundError):  # one process, no --rect: the sources are what fails
        create_dataloader(missing, 96, 8, 32, workers=0, image_weights=True)


def test_training_with_image_weights_samples_by_the_last_validation(tiny_data: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.setup as setup

    used: list[np.ndarray] = []
    real = setup.image_weights
    monkeypatch.setattr(setup, "image_weights", lambda *a: used.append(real(*a)) or used[-1])
    summary = fit(parse_options(train_args(tiny_data, tmp_path, "iw", 2, "--image-weights")))
    last = load_checkpoint(Path(summary["save_dir"]) / "weights" / "last.pt")
    maps = last["raw"]["class_maps"]
    assert len(used) == 2 and len(maps) == 4 and all(0.0 <= m <= 1.0 for m in maps)
    _, data = create_dataloader(tiny_data.parent / "images" / "train", 96, 8, 32, workers=0)
    assert used[0] == pytest.approx(image_weights(data.labels, 4))  # epoch 1: before any validation
    assert not np.allclose(used[1], used[0])  # epoch 2: the epoch-1 mAPs re-weighted the classes
