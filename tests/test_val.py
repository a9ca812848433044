"""evaluate() on an oracle model, val.py end to end on the demo set, CLI errors, and the plots."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import val
from engine.checkpointing import model_checkpoint
from engine.evaluate import Unletterbox, evaluate, results_table
from models import DetectionModel
from models.checkpoint import save_checkpoint
from utils.demo_data import NAMES, generate_demo
from utils.files import increment_path
from utils.plots import plot_images, plot_labels, plot_results

REPO = Path(__file__).resolve().parents[1]
N_VAL = 8
IMGSZ = 96


# ------------------------------------------------------------------------------------ fixtures
def make_checkpoint(folder: Path, nc: int) -> Path:
    """A checkpoint in our format for the end-to-end test.

    A tiny untrained yolov5n (width 0.125). To test on a briefly trained model instead, make this
    return the path of that checkpoint (its classes must be the demo set's four).
    """
    cfg = yaml.safe_load((REPO / "models" / "yolov5n.yaml").read_text())
    cfg.update(width_multiple=0.125, depth_multiple=0.33, nc=nc)
    torch.manual_seed(0)
    model = DetectionModel(cfg)
    model.names = list(NAMES)
    return save_checkpoint(model_checkpoint(model), folder / "tiny.pt")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("weights"), nc=len(NAMES))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """A tiny demo set and two yamls: with the shipped COCO json and without (json generated)."""
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root / "data", seed=0, n_train=1, n_val=N_VAL, imgsz=IMGSZ)
    base = {"path": str(root / "data"), "train": "images/train", "val": "images/val", "names": list(NAMES)}
    with_json = root / "with_json.yaml"
    with_json.write_text(yaml.safe_dump({**base, "val_json": "annotations/instances_val.json"}))
    without = root / "without_json.yaml"
    without.write_text(yaml.safe_dump(base))
    return {"with_json": with_json, "without_json": without}


# ---------------------------------------------------------------------- evaluate on an oracle
class Oracle(nn.Module):
    """Returns queued 'decoded' outputs (bs, N, 5 + nc), one per forward, like an eval-mode Detect."""

    def __init__(self, outputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.outputs = list(outputs)

    def forward(self, x: torch.Tensor):
        out = self.outputs.pop(0)
        assert x.dtype == torch.float32 and float(x.max()) <= 1.0  # normalised input
        return out, [out.view(out.shape[0], 1, 1, -1, out.shape[2])]


def letterboxed_batch(nc: int = 3):
    """Two 100×200 (h×w) originals scaled by 0.5 and padded (6 px left/right, 7 px top/bottom) to 64×112.

    Returns loader batches, oracle outputs (perfect boxes) and labels in original pixels.
    """
    h0, w0, r, padw, padh = 100, 200, 0.5, 6.0, 7.0
    H, W = 64, 112  # 0.5·(100, 200) = (50, 100) + padding 2·7, 2·6
    gt = [  # per image: cls, x1, y1, x2, y2 in ORIGINAL pixels
        np.array([[0, 10, 10, 60, 50], [2, 100, 20, 180, 90]], dtype=np.float32),
        np.array([[1, 30, 40, 90, 95]], dtype=np.float32),
    ]
    targets, decoded = [], torch.zeros(2, 10, 5 + nc)
    for i, g in enumerate(gt):
        lb = g[:, 1:] * r + [padw, padh, padw, padh]  # letterboxed pixels
        xywh = np.c_[(lb[:, :2] + lb[:, 2:]) / 2, lb[:, 2:] - lb[:, :2]]
        targets.append(np.c_[np.full(len(g), i), g[:, :1], xywh / [W, H, W, H]])
        decoded[i, : len(g), :4] = torch.from_numpy(xywh)
        decoded[i, : len(g), 4] = 0.9
        decoded[i, torch.arange(len(g)), 5 + torch.from_numpy(g[:, 0]).long()] = 1.0
    shapes = [((h0, w0), ((r, r), (padw, padh)))] * 2
    batch = (
        torch.zeros(2, 3, H, W, dtype=torch.uint8),
        torch.from_numpy(np.concatenate(targets)).float(),
        ["/imgs/a.jpg", "/imgs/b.jpg"],
        shapes,
    )
    return [batch], [decoded], gt


def test_evaluate_oracle_is_perfect_in_original_space(tmp_path):
    loader, outputs, gt = letterboxed_batch()
    oracle = Oracle(outputs)
    oracle.train()
    model = nn.DataParallel(oracle)  # evaluate unwraps (Distributed)DataParallel itself
    calls = []

    def fake_loss(raw, targets):
        calls.append(len(raw))
        return torch.ones(1), torch.tensor([0.1, 0.2, 0.3])

    res = evaluate(
        model, loader, ["a", "b", "c"], "cpu", save_dir=tmp_path, save_json=True, plots=True, compute_loss=fake_loss
    )
    assert oracle.training  # mode restored
    # YOLOv5's AP of a perfect detector is 0.995 (its curve ends at recall 1, precision 0)
    assert res["map50"] == pytest.approx(0.995) and res["map"] == pytest.approx(0.995)
    assert res["precision"] == pytest.approx(1.0) and res["recall"] == pytest.approx(1.0)
    assert res["fitness"] == pytest.approx(0.995)
    assert res["loss"] == pytest.approx([0.1, 0.2, 0.3]) and calls == [1]
    assert set(res["speed_ms"]) == {"pre", "inf", "nms"}
    assert res["n_images"] == 2 and res["n_instances"] == 3
    assert [c["instances"] for c in res["per_class"]] == [1, 1, 1]
    # COCO json: boxes in ORIGINAL pixels, generated annotation json, pycocotools agrees
    preds = json.loads(Path(res["pred_json"]).read_text())
    boxes = sorted(p["bbox"] for p in preds)
    want = sorted([float(x1), float(y1), float(x2 - x1), float(y2 - y1)] for g in gt for _, x1, y1, x2, y2 in g)
    assert np.allclose(boxes, want, atol=1e-3)
    assert res["coco"]["map"] == pytest.approx(1.0)
    for f in ("annotations.json", "PR_curve.png", "F1_curve.png", "confusion_matrix.png", "val_batch0_pred.jpg"):
        assert (tmp_path / f).is_file(), f
    assert "all" in results_table(res, verbose=True)


def test_unletterbox_inverts_the_letterbox():
    # original 90×200 (h×w), resized by (gain_h, gain_w) = (0.5, 0.48) and padded 3 px left, 11 top
    inv = Unletterbox.from_loader(((90, 200), ((0.5, 0.48), (3.0, 11.0))))
    assert inv.shape0 == (90, 200)
    boxes0 = torch.tensor([[10.0, 5.0, 60.0, 80.0], [150.0, 0.0, 190.0, 90.0]])
    letterboxed = boxes0 * torch.tensor([0.48, 0.5, 0.48, 0.5]) + torch.tensor([3.0, 11.0, 3.0, 11.0])
    back = inv.pixels(letterboxed)
    # YOLOv5's mapping: the height's gain on both axes, so x comes back × gain_w / gain_h = 0.96
    want = boxes0.double() * torch.tensor([0.96, 1.0, 0.96, 1.0], dtype=torch.float64)
    assert back.dtype == torch.float64 and torch.allclose(back, want, atol=1e-9)
    boxes0 = want  # what labels and predictions alike come back as (IoUs between them are unchanged)
    # the loader's label rows: centre/size normalised to the (H, W) = (67, 102) batch image
    H, W = 67, 102
    cx, cy = (letterboxed[:, 0] + letterboxed[:, 2]) / 2 / W, (letterboxed[:, 1] + letterboxed[:, 3]) / 2 / H
    w, h = (letterboxed[:, 2] - letterboxed[:, 0]) / W, (letterboxed[:, 3] - letterboxed[:, 1]) / H
    assert torch.allclose(inv.normalised(torch.stack((cx, cy, w, h), 1), (H, W)), boxes0.double(), atol=1e-4)
    # a prediction reaching into the padding is clipped to the original image
    assert inv.pixels(torch.tensor([[0.0, 0.0, 200.0, 100.0]])).tolist() == [[0.0, 0.0, 200.0, 90.0]]


# ------------------------------------------------------------------------------ val.py end to end
def test_val_run_end_to_end(checkpoint, demo, tmp_path, capsys):
    kw = dict(imgsz=IMGSZ, batch_size=4, device="cpu", workers=0, project=tmp_path / "runs", verbose=True)
    # An untrained model scores below the default 0.001; a lower threshold still yields detections.
    res = val.run(checkpoint, demo["with_json"], conf_thres=1e-4, save_json=True, plots=True, **kw)
    out = capsys.readouterr().out
    save_dir = Path(res["save_dir"])
    assert save_dir.name == "exp"
    m = json.loads((save_dir / "metrics.json").read_text())
    for key in ("mAP50", "mAP50-95", "P", "R", "fitness"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["images"] == N_VAL and len(m["per_class"]) >= 1 and set(m["speed_ms"]) == {"pre", "inf", "nms"}
    assert m["pycocotools"] is not None and 0.0 <= m["pycocotools"]["map"] <= 1.0
    assert len(m["pycocotools"]["stats"]) == 12
    assert (save_dir / "coco_summary.txt").read_text().count("Average Precision") == 6
    assert (save_dir / "tiny_predictions.json").is_file()
    for f in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png"):
        assert (save_dir / f).stat().st_size > 1000, f
    assert (save_dir / "val_batch0_labels.jpg").is_file() and (save_dir / "val_batch0_pred.jpg").is_file()
    assert "mAP50-95" in out and "pycocotools" in out and "Speed:" in out
    print(f"\nours mAP50-95 {m['mAP50-95']:.4f} | pycocotools {m['pycocotools']['map']:.4f}")

    # Same predictions against a json generated from the YOLO labels: same figures, next run folder.
    res2 = val.run(checkpoint, demo["without_json"], conf_thres=1e-4, save_json=True, plots=False, **kw)
    assert Path(res2["save_dir"]).name == "exp2"
    assert (Path(res2["save_dir"]) / "annotations.json").is_file()
    assert res2["map"] == pytest.approx(res["map"], abs=1e-6)
    assert res2["coco"]["map"] == pytest.approx(res["coco"]["map"], abs=2e-3)
    # --task train (as in YOLOv5): the same evaluation on the train split (1 image here)
    res3 = val.run(checkpoint, demo["without_json"], task="train", conf_thres=1e-4, plots=False, **kw)
    assert res3["n_images"] == 1 and res["n_images"] == N_VAL


def test_val_official_yolov5_checkpoint(demo, tmp_path):
    """The official-format fixture (nc=80) loads through models.load_model and evaluates."""
    cfg = yaml.safe_load(demo["without_json"].read_text())
    cfg["names"] = [*NAMES, *(f"unused{i}" for i in range(76))]
    data = tmp_path / "coco_like.yaml"
    data.write_text(yaml.safe_dump(cfg))
    weights = REPO / "tests" / "fixtures" / "yolov5n_nc80.pt"
    res = val.run(weights, data, imgsz=IMGSZ, batch_size=8, device="cpu", workers=0, project=tmp_path, plots=False)
    assert res["n_images"] == N_VAL and 0.0 <= res["map"] <= 1.0
    assert (Path(res["save_dir"]) / "metrics.json").is_file()


def test_val_cli_errors(checkpoint, demo, tmp_path, capsys):
    cfg = yaml.safe_load(demo["without_json"].read_text())
    cfg["names"] = [*NAMES, "extra"]
    five = tmp_path / "five.yaml"
    five.write_text(yaml.safe_dump(cfg))
    for argv, message in (
        (["--weights", str(checkpoint), "--data", str(five), "--device", "cpu", "--project", str(tmp_path)],
         "predicts 4 classes but --data .*five.yaml has 5"),
        (["--weights", str(tmp_path / "missing.pt"), "--data", str(demo["with_json"])],
         "--weights .*missing.pt not found"),
        (["--weights", str(checkpoint), "--data", str(tmp_path / "nope.yaml")], "--data .*nope.yaml not found"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            val.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.match(f"val.py: error: .*{message}", err[0]), err
    with pytest.raises(FileNotFoundError):
        val.run(tmp_path / "missing.pt", demo["with_json"])
    # standalone script: one line on stderr, no traceback
    p = subprocess.run(
        [sys.executable, "val.py", "--weights", str(tmp_path / "missing.pt"), "--data", str(demo["with_json"])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode != 0
    assert "not found" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_increment_path(tmp_path):
    assert increment_path(tmp_path / "exp") == tmp_path / "exp"
    (tmp_path / "exp").mkdir()
    assert increment_path(tmp_path / "exp") == tmp_path / "exp2"
    assert increment_path(tmp_path / "exp", exist_ok=True) == tmp_path / "exp"
    made = increment_path(tmp_path / "exp", mkdir=True)
    assert made == tmp_path / "exp2" and made.is_dir()
    assert increment_path(tmp_path / "exp") == tmp_path / "exp3"


# ----------------------------------------------------------------------------------------- plots
def test_training_plots(tmp_path):
    csv = tmp_path / "results.csv"
    csv.write_text(
        "epoch,train/box,train/obj,metrics/mAP50,metrics/mAP50-95,note\n0,0.1,0.2,0.3,0.1,x\n1,0.08,0.15,0.4,0.2,y\n"
    )
    png = plot_results(csv, tmp_path / "results.png")
    assert png.is_file() and png.stat().st_size > 1000
    labels = [np.array([[0, 0.5, 0.5, 0.2, 0.3], [2, 0.1, 0.2, 0.05, 0.05]]), np.zeros((0, 5))]
    assert plot_labels(labels, ["a", "b", "c"], tmp_path / "labels.jpg").stat().st_size > 1000
    imgs = torch.randint(0, 255, (3, 3, 64, 96), dtype=torch.uint8)
    boxes = [np.array([[1, 5, 5, 40, 30, 0.9]]), np.zeros((0, 6)), np.array([[0, 1, 1, 10, 10, 0.1]])]
    assert plot_images(imgs, boxes, ["a", "b"], tmp_path / "grid.jpg").is_file()


def test_cpu_validation_is_fp32_in_channels_last_with_the_contiguous_figures(demo, tmp_path, monkeypatch):
    """val.py on a CPU runs fp32 in channels_last (utils.precision.FP32_CPU_INFERENCE): the same
    arithmetic as contiguous fp32 up to summation order, so a trained model's figures agree to 1e-6."""
    import engine.validate as validate_mod
    from engine.evaluate import EvalSettings
    from utils.precision import FP32_CPU

    seen = []

    def spy(model, *args, **kwargs):
        conv = next(p for p in model.parameters() if p.dim() == 4)
        seen.append((conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous(),
                     args[-1].precision))
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(validate_mod, "evaluate", spy)
    teacher = REPO / "weights" / "demo_teacher.pt"  # trained: no near-tied scores at the threshold
    kw = dict(imgsz=128, batch_size=4, device="cpu", workers=0, project=tmp_path, exist_ok=True)
    quiet = dict(verbose=False, plots=False, save_json=False)
    nhwc = validate_mod.validate(teacher, demo["without_json"], settings=EvalSettings(**quiet), name="nhwc", **kw)
    plain = validate_mod.validate(teacher, demo["without_json"], settings=EvalSettings(precision=FP32_CPU, **quiet),
                                  name="plain", **kw)
    assert seen[0][0] and seen[0][1].channels_last and seen[0][1].dtype is None  # fp32, channels_last
    assert not seen[1][0] and not seen[1][1].channels_last
    assert nhwc["arithmetic"] == plain["arithmetic"] == "fp32"
    assert nhwc["map"] > 0.1  # a real score, not two empty runs agreeing
    for k in ("map50", "map", "precision", "recall"):
        assert nhwc[k] == pytest.approx(plain[k], abs=1e-6), k


def test_per_class_rows_show_the_models_names(checkpoint, demo, tmp_path):
    """As YOLOv5's val.py (measured): the table names the classes as the weights do, whatever the
    dataset yaml calls them (same count); the dataset's names when the weights carry none of their own."""
    from engine.validate import _class_names

    other = tmp_path / "renamed.yaml"
    other.write_text(yaml.safe_dump({**yaml.safe_load(demo["without_json"].read_text()),
                                     "names": [f"c{i}" for i in range(len(NAMES))]}))
    res = val.run(checkpoint, other, imgsz=IMGSZ, batch_size=4, device="cpu", workers=0, conf_thres=1e-4,
                  plots=False, project=tmp_path / "runs")
    assert res["per_class"] and {row["name"] for row in res["per_class"]} <= set(NAMES)
    cfg = {"nc": 2, "names": ["a", "b"]}
    assert _class_names(nn.Module(), cfg, False) == ["a", "b"]
    generic = nn.Module()
    generic.names = {0: "class0", 1: "class1"}  # an ONNX file without names metadata
    assert _class_names(generic, cfg, False) == ["a", "b"]
    generic.names = ["x", "y"]
    assert _class_names(generic, cfg, False) == ["x", "y"] and _class_names(generic, cfg, True) == ["x"]
