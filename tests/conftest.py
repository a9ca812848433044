"""Shared fixtures: a tiny generated dataset and a briefly trained tiny checkpoint (made once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from utils.demo_data import NAMES, generate_demo

TINY_IMGSZ = 96


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest single-threaded, and two threads per process oversubscribe a shared
    2-core machine badly (seen: 40× slower steps); restored at the end of the session."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_data_yaml(root: Path, train: str = "images/train", val: str = "images/val") -> Path:
    path = root / "data.yaml"
    path.write_text(yaml.safe_dump({"path": str(root), "train": train, "val": val, "names": list(NAMES),
                                    "val_json": "annotations/instances_val.json"}))
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 32-train / 12-val demo set at 96 px; returns its dataset yaml."""
    root = tmp_path_factory.mktemp("tiny_demo")
    generate_demo(root, seed=1, n_train=32, n_val=12, imgsz=TINY_IMGSZ)
    return write_data_yaml(root)


def train_args(data: Path, project: Path, name: str, epochs: int = 2, *extra: str) -> list[str]:
    """Flags of a fast CPU training run of the pico model."""
    return ["--data", str(data), "--cfg", "models/yolov5p.yaml", "--imgsz", str(TINY_IMGSZ),
            "--epochs", str(epochs), "--batch-size", "8", "--workers", "0", "--device", "cpu",
            "--project", str(project), "--name", name, "--noplots", *extra]


@pytest.fixture(scope="session")
def tiny_trained(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a 2-epoch pico run on the tiny set (weights move away from their init)."""
    from engine.trainer import fit
    from train_distill import parse_options

    project = tmp_path_factory.mktemp("tiny_runs")
    summary = fit(parse_options(train_args(tiny_data, project, "base", 2)))
    return Path(summary["save_dir"]) / "weights" / "best.pt"


@pytest.fixture(scope="session")
def wide_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) yolov5n teacher for the demo classes: twice the student's width, so every feature
    method needs connectors, while anchors and strides match for output distillation."""
    import torch

    from engine.checkpointing import model_checkpoint
    from models.checkpoint import save_checkpoint
    from models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("models/yolov5n.yaml", nc=len(NAMES))
    model.names = list(NAMES)
    return save_checkpoint(model_checkpoint(model), tmp_path_factory.mktemp("teacher") / "yolov5n_demo.pt")
