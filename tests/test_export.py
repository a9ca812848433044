"""export.py: ONNX file layout, metadata, onnxruntime parity, dynamic axes, CLI errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import export
from engine.checkpointing import model_checkpoint
from models import DetectionModel, load_model
from models.checkpoint import save_checkpoint

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["cat", "dog", "bird"]


def make_tiny_checkpoint(path: Path, seed: int = 0, names: list[str] | None = None,
                         bn_affine: tuple[float, float] | None = None) -> Path:
    """A yolov5n-shaped model at width 0.125, saved in our checkpoint format.

    Untrained weights predict almost nothing, so the test makes the outputs informative: BatchNorm
    statistics are set from one batch of generated pictures like the test inputs (well-scaled
    activations, logits of a few units) and the Detect head is rescaled so that some cells score
    high and the boxes vary with the image. ``bn_affine`` = (γ, β) overrides every BN's affine part
    first (tests/test_int8.py explains why quantisation needs that).
    """
    names = list(NAMES if names is None else names)
    torch.manual_seed(seed)
    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text())
    cfg.update(width_multiple=0.125, nc=len(names))
    model = DetectionModel(cfg)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = 1.0  # running stats := this batch's stats
        if bn_affine is not None:
            with torch.no_grad():
                m.weight.fill_(bn_affine[0])
                m.bias.fill_(bn_affine[1])
    model.train()
    calib = np.concatenate([export.preprocess(export.synthetic_image((160, 160), s), (160, 160))
                            for s in range(10, 16)])
    with torch.no_grad():
        model(torch.from_numpy(calib))
        for conv in model.detect.m:
            conv.weight.mul_(2.0)  # let the features, not only the biases, drive the outputs
            bias = conv.bias.view(model.detect.na, -1)
            bias.normal_(0.0, 0.5)
            bias[:, 4] -= 1.5  # mostly background, as in a trained detector
    for m in bns:
        m.momentum = 0.03
    model.eval()
    model.names = names
    return save_checkpoint(model_checkpoint(model), path)


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt")


def _torch_decoded(weights: Path, x: np.ndarray) -> np.ndarray:
    model = load_model(str(weights)).fuse()
    with torch.no_grad():
        return model(torch.from_numpy(x))[0].numpy()


def test_export_layout_metadata_and_parity(tiny_pt: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.onnx"
    path, diff = export.run(tiny_pt, imgsz=128, output=out)
    assert path == out and out.is_file()
    assert diff < 1e-3
    proto = onnx.load(str(out))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["stride"]) == 32
    assert json.loads(meta["names"]) == NAMES
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["images"]
    assert [o.name for o in sess.get_outputs()] == ["output0"]  # decoded output only
    assert sess.get_inputs()[0].shape == [1, 3, 128, 128]
    n = 3 * (16 * 16 + 8 * 8 + 4 * 4)
    assert sess.get_outputs()[0].shape == [1, n, 5 + len(NAMES)]
    # The fused graph holds no BatchNorm.
    assert not any(node.op_type == "BatchNormalization" for node in proto.graph.node)


def test_default_output_path_next_to_weights(tiny_pt: Path, tmp_path: Path) -> None:
    weights = tmp_path / "best.pt"
    weights.write_bytes(tiny_pt.read_bytes())
    path, _ = export.run(weights, imgsz=64)
    assert path == tmp_path / "best.onnx" and path.is_file()


def test_dynamic_batch_and_size(tiny_pt: Path, tmp_path: Path) -> None:
    path, diff = export.run(tiny_pt, imgsz=128, dynamic=True, output=tmp_path / "dyn.onnx")
    assert diff < 1e-3
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for shape in [(1, 3, 128, 128), (3, 3, 128, 128), (3, 3, 96, 160)]:
        # real pictures (letterboxed), one per batch entry: uniform noise is far outside what the
        # BN statistics saw and inflates the logits, which says nothing about the export
        x = np.concatenate([export.preprocess(export.synthetic_image((120, 150), seed=s), shape[2:])
                            for s in range(shape[0])])
        y = sess.run(None, {"images": x})[0]
        ref = _torch_decoded(tiny_pt, x)
        assert y.shape == ref.shape
        stats = export.parity(ref, y, shape[2:])
        assert stats["max"] < 1e-3, (shape, stats)


def test_static_batch_size(tiny_pt: Path, tmp_path: Path) -> None:
    path, diff = export.run(tiny_pt, imgsz=[64, 96], batch_size=2, output=tmp_path / "b2.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape == [2, 3, 64, 96] and diff < 1e-3


def test_cli_simplify_and_imgsz_rounding(tiny_pt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli.onnx"
    rc = export.main(["--weights", str(tiny_pt), "--imgsz", "70", "--simplify", "--output", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "using [96, 96]" in text  # 70 rounded up to the stride
    assert "simplif" in text  # either the simplifier used or why it was skipped
    assert "max diff" in text


def test_parity_measure() -> None:
    ref = np.zeros((1, 4, 7), dtype=np.float32)
    out = ref.copy()
    out[0, 0, 0] = 6.4  # 6.4 px on a 640-wide input → 1e-2 relative
    out[0, 1, 5] = 2e-3  # a score
    stats = export.parity(ref, out, (320, 640))
    assert stats["xywh_rel"] == pytest.approx(1e-2) and stats["scores"] == pytest.approx(2e-3)
    assert stats["max"] == pytest.approx(1e-2) and stats["xywh_px"] == pytest.approx(6.4)
    with pytest.raises(ValueError, match="shapes differ"):
        export.parity(ref, ref[:, :2], (320, 640))


def test_errors_are_one_line(tiny_pt: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    assert export.main(["--weights", str(tmp_path / "missing.pt")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert export.main(["--weights", str(tiny_pt), "--include", "tflite"]) == 2
    assert "choose from onnx, yolov5" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert export.main(["--weights", str(tiny_pt), "--half", "--device", "cpu"]) == 2
        assert "--half needs a CUDA device" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    assert export.main(["--weights", str(tiny_pt), "--output", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert "pip install onnx onnxruntime" in err and len(err.strip().splitlines()) == 1
