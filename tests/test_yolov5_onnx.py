"""ONNX files exported by YOLOv5 itself: Python-literal metadata, read by our val.py and detect.py.

Fixtures (tests/fixtures/PROVENANCE.md, rebuilt by scripts/make_yolov5_onnx_fixture.py): a tiny
official-format checkpoint written by our export, the ONNX file YOLOv5 7.0's export.py made of it,
and YOLOv5's own PyTorch prediction on a fixed input.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml

import detect
import export
import val
from models import load_model
from models.backends import OnnxBackend, metadata_value, names_list, ort_providers
from utils.augment import letterbox_input
from utils.boxes import clip_boxes, non_max_suppression
from utils.labels import label_lines

pytest.importorskip("onnxruntime")
FIX = Path(__file__).parent / "fixtures"
ONNX, PT, REF = FIX / "tiny_yolov5.onnx", FIX / "tiny_yolov5.pt", FIX / "tiny_yolov5.npz"


def test_metadata_values_json_or_literal_never_code(tmp_path: Path) -> None:
    assert metadata_value('["a", "b"]') == ["a", "b"] and metadata_value("32") == 32
    assert metadata_value("{0: 'person', 1: 'bicycle'}") == {0: "person", 1: "bicycle"}
    assert metadata_value("[8.0, 16.0, 32.0]") == [8.0, 16.0, 32.0]
    marker = tmp_path / "ran"
    for text in (f"__import__('pathlib').Path({str(marker)!r}).touch()", "{0: open('x')}", "not python", None):
        assert metadata_value(text) is None
    assert not marker.exists()
    assert names_list({1: "b", 0: "a"}, 2) == ["a", "b"] and names_list({"1": "b", "0": "a"}, 2) == ["a", "b"]
    assert names_list(None, 2) == ["class0", "class1"]


def test_backend_reads_yolov5_onnx_like_yolov5_torch() -> None:
    b = OnnxBackend(ONNX, torch.device("cpu"))
    meta = b.session.get_modelmeta().custom_metadata_map
    assert meta["names"] == "{0: 'cat', 1: 'dog'}"  # the format under test: not JSON
    assert b.names == ["cat", "dog"] and b.stride == 32 and b.fixed_shape == (64, 64)
    ref = np.load(REF)
    y = b(torch.from_numpy(ref["x"])).numpy()
    assert y.shape == ref["pred"].shape == (1, 252, 7)
    assert np.abs(y - ref["pred"]).max() < 2e-3  # pixels and scores; YOLOv5's own ONNX vs its PyTorch
    assert (ref["pred"][..., 4] > 0.5).sum() > 3  # informative outputs
    # the same prediction from our loader reading the official-format .pt the ONNX was made from; relative
    # tolerance: fp32 convolutions sum in a CPU-dependent order (8 ulp at 454 px on an AMX box)
    with torch.no_grad():
        ours = load_model(PT)(torch.from_numpy(ref["x"]))[0].numpy()
    np.testing.assert_allclose(ours, ref["pred"], rtol=1e-5, atol=1e-5)


@pytest.fixture()
def pictures(tmp_path: Path) -> Path:
    folder = tmp_path / "ds" / "images" / "val"
    folder.mkdir(parents=True)
    for s in range(4):
        cv2.imwrite(str(folder / f"{s}.png"), export.synthetic_image((64, 64), 40 + s))
    return folder


def _rows(result) -> list[np.ndarray]:
    return [det.numpy() if isinstance(det, torch.Tensor) else np.asarray(det) for _, _, det in result.results]


def test_detect_and_val_on_yolov5_onnx(tmp_path: Path, pictures: Path) -> None:
    kw = dict(imgsz=64, device="cpu", nosave=True, conf_thres=0.3, verbose=False)
    on_onnx = detect.run(ONNX, pictures, project=tmp_path / "d", name="onnx", **kw)
    on_pt = detect.run(PT, pictures, project=tmp_path / "d", name="pt", save_txt=True, **kw)
    a, b = _rows(on_onnx), _rows(on_pt)
    assert sum(len(x) for x in b) >= 4 and [len(x) for x in a] == [len(x) for x in b]
    for x, y in zip(a, b):
        assert np.abs(x - y).max() < 0.05  # 64 px pictures: boxes in pixels, scores, classes

    # val.py on YOLOv5's fixed-shape ONNX (square 64 px letterbox: the pictures unchanged) writes the
    # detections the .pt gives on the same input with val's NMS (multi-label, IoU 0.6), clipped
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(pictures.parent.parent), "train": "images/val",
                                    "val": "images/val", "names": {0: "cat", 1: "dog"}}))
    r = val.run(ONNX, data, imgsz=64, batch_size=1, conf_thres=0.3, device="cpu", workers=0, plots=False,
                project=tmp_path / "v", save_txt=True, save_conf=True)
    model = load_model(PT).eval()
    for picture in sorted(pictures.glob("*.png")):
        x, hw = letterbox_input(cv2.imread(str(picture)), (64, 64))
        with torch.no_grad():
            det = non_max_suppression(model(torch.from_numpy(x)), 0.3, 0.6, multi_label=True)[0]
        det[:, :4] = clip_boxes(det[:, :4], hw)
        want = sorted(tuple(map(float, row.split())) for row in label_lines(det.numpy(), hw, save_conf=True))
        txt = r["save_dir"] / "labels" / f"{picture.stem}.txt"
        got = sorted(tuple(map(float, row.split())) for row in txt.read_text().splitlines()) if txt.exists() else []
        assert len(got) == len(want) > 0, picture.name
        for a, b in zip(got, want):
            assert a == pytest.approx(b, abs=2e-3), picture.name


def test_onnxruntime_runs_on_the_gpu_that_device_names() -> None:
    """--device 1 puts onnxruntime's CUDA provider on GPU 1 (its default is GPU 0); without CUDA in this
    onnxruntime build, or on the CPU, the CPU provider alone."""

    class Runtime:
        def __init__(self, *providers: str) -> None:
            self.providers = list(providers)

        def get_available_providers(self) -> list[str]:
            return self.providers

    gpu = Runtime("CUDAExecutionProvider", "CPUExecutionProvider")
    assert ort_providers(gpu, torch.device("cuda", 1)) == [("CUDAExecutionProvider", {"device_id": 1}),
                                                           "CPUExecutionProvider"]
    assert ort_providers(gpu, torch.device("cuda")) == [("CUDAExecutionProvider", {"device_id": 0}),
                                                        "CPUExecutionProvider"]
    assert ort_providers(gpu, torch.device("cpu")) == ["CPUExecutionProvider"]
    assert ort_providers(Runtime("CPUExecutionProvider"), torch.device("cuda", 1)) == ["CPUExecutionProvider"]
