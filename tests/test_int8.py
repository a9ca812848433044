"""INT8 ONNX export (onnxruntime static QDQ) and val.py on .onnx files, with tiny models."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import export
import val
from tests.test_export import make_tiny_checkpoint
from utils import onnx_int8 as q
from utils.demo_data import NAMES as DEMO_NAMES
from utils.demo_data import generate_demo

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

ROOT = Path(__file__).resolve().parents[1]
IMGSZ = 128
CALIB_SEEDS = range(100, 116)  # generated pictures for calibration
TEST_SEEDS = range(200, 204)  # other pictures of the same kind ("calibration-like")



def make_quantizable_checkpoint(path: Path, names: list[str], seed: int = 0) -> Path:
    """A yolov5n-shaped model at width 0.125 whose outputs are informative AND not chaotic.

    tests/test_export.py's tiny model (BatchNorm statistics from a batch of generated pictures and a
    rescaled Detect head, so some cells score high and boxes vary with the image), with one change: every BN's
    affine part is set to γ = 0.5, β = 1 before its statistics are taken. A randomly initialised
    BN network sits in the chaotic regime — a perturbation as small as int8 rounding grows layer
    after layer until the outputs are unrelated (weight-only int8 already moves scores by up to
    0.9 with γ = 1, β = 0); a trained detector does not behave like that. With γ = 0.5, β = 1 the
    SiLUs work mostly in their near-linear range and rounding errors stay of their own size, which
    is what a quantisation test needs to measure.
    """
    return make_tiny_checkpoint(path, seed, names, bn_affine=(0.5, 1.0))


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """8 train / 8 val demo images at 96 px and their yaml."""
    root = tmp_path_factory.mktemp("int8_demo")
    generate_demo(root, seed=3, n_train=8, n_val=8, imgsz=96)
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                    "names": list(DEMO_NAMES)}))
    return data


@pytest.fixture(scope="module")
def pt3(tmp_path_factory) -> Path:
    return make_quantizable_checkpoint(tmp_path_factory.mktemp("w3") / "tiny.pt", ["cat", "dog", "bird"])


@pytest.fixture(scope="module")
def fp32(pt3: Path, tmp_path_factory) -> Path:
    path, _ = export.run(pt3, imgsz=IMGSZ, output=tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return path


def _pictures(seeds) -> list[np.ndarray]:
    return [export.synthetic_image((110 + 7 * (s % 5), 150), seed=s) for s in seeds]


# ------------------------------------------------------------------------------------ the graph
def test_float_tail_is_the_decode_and_head_convs(fp32: Path):
    model = onnx.load(str(fp32))
    tail = set(q.float_tail_nodes(model))
    by_name = {n.name: n for n in model.graph.node}
    convs = [n for n in tail if by_name[n].op_type == "Conv"]
    assert len(convs) == 3 and all("model.24" in n for n in convs)  # the Detect 1×1 convs, nothing else
    sigmoids = [n.name for n in model.graph.node if n.op_type == "Sigmoid" and "model.24" in n.name]
    assert len(sigmoids) == 3 and set(sigmoids) <= tail  # the decode
    assert all("model.24" in n or by_name[n].op_type == "Constant" for n in tail)  # nothing of the backbone
    assert not any(by_name[n].op_type == "Conv" for n in q.float_tail_nodes(model, include_head_convs=False))
    assert q.int8_path("a/best.onnx") == Path("a/best.int8.onnx")


# ------------------------------------------------------------------------------------ INT8 file
def test_int8_stays_close_to_fp32_on_calibration_like_images(fp32: Path, tmp_path: Path):
    path = q.quantize_int8(fp32, _pictures(CALIB_SEEDS), output=tmp_path / "tiny.int8.onnx")
    model = onnx.load(str(path))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["names"]) == ["cat", "dog", "bird"] and json.loads(meta["stride"]) == 32
    assert json.loads(meta["quantization"])["format"] == "QDQ"
    # the head convs kept float weights; every other conv reads int8 weights through a DequantizeLinear
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert sum(n.input[1] in floats for n in convs) == 3
    assert q.file_mb(path) < 0.6 * q.file_mb(fp32)

    s32 = q.ort_session(fp32)
    s8 = q.ort_session(path)
    confident = 0
    for im in _pictures(TEST_SEEDS):
        x = export.preprocess(im, (IMGSZ, IMGSZ))
        a = q.output_agreement(s32.run(None, {"images": x})[0], s8.run(None, {"images": x})[0])
        print(a)
        assert a["score_max"] <= q.INT8_TOL_SCORE_MAX, a
        assert a["score_mean"] <= q.INT8_TOL_SCORE_MEAN, a
        assert a["box_iou_mean"] >= q.INT8_TOL_BOX_IOU, a
        confident += a["confident"]
    assert confident > 20  # the comparison covered real candidate boxes

    lat = q.ort_latency(path, repeats=3, warmup=1)
    assert lat["median_ms"] > 0 and lat["batch"] == 1 and lat["shape"] == [IMGSZ, IMGSZ] and lat["threads"] == 1


def test_export_cli_int8(pt3: Path, demo: Path, tmp_path: Path, capsys, monkeypatch):
    out = tmp_path / "cli.onnx"
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "tiny.pt").write_bytes(pt3.read_bytes())
    monkeypatch.chdir(tmp_path)  # relative paths, as users type them (the pre-processing runs in a temp folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = export.main(["--weights", "w/tiny.pt", "--imgsz", "96", "--dynamic", "--int8", "--data", str(demo),
                          "--calib-images", "4", "--output", "cli.onnx"])
    assert not [w for w in caught if "quant_pre_process failed" in str(w.message)]
    text = capsys.readouterr().out
    assert rc == 0, text
    int8 = tmp_path / "cli.int8.onnx"
    assert out.is_file() and int8.is_file()
    assert "4 train images for calibration" in text and "INT8 vs fp32" in text and "latency" in text
    sess = q.ort_session(int8)
    assert sess.get_inputs()[0].shape[2:] == ["height", "width"]  # the dynamic axes survive quantisation
    x = export.preprocess(export.synthetic_image((90, 120), 1), (64, 96))
    assert sess.run(None, {"images": x})[0].shape == (1, 3 * (8 * 12 + 4 * 6 + 2 * 3), 8)


def test_int8_errors(pt3: Path, fp32: Path, demo: Path, tmp_path: Path, capsys):
    assert export.main(["--weights", str(pt3), "--int8", "--output", str(tmp_path / "a.onnx")]) == 2
    assert "--int8 needs --data" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert export.main(["--weights", str(pt3), "--int8", "--half", "--data", str(demo)]) == 2
        assert "drop --half" in capsys.readouterr().err
    files = q.calibration_images(demo, "train", 3)
    assert len(files) == 3 and files[0].endswith("000001.png") and files[-1].endswith("000008.png")
    assert len(q.calibration_images(demo, "val", 100)) == 8
    with pytest.raises(ValueError, match="--calib-images 0"):
        q.calibration_images(demo, "train", 0)
    with pytest.raises(ValueError, match="calibration method"):
        q.quantize_int8(fp32, [np.zeros((8, 8, 3), np.uint8)], calibrate_method="kl")
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        q.quantize_int8(tmp_path / "missing.onnx", [np.zeros((8, 8, 3), np.uint8)])


# ----------------------------------------------------------------------------------- val on ONNX
def _self_labelled_demo(root: Path, pt: Path) -> Path:
    """A demo set whose val labels are ``pt``'s own confident detections (score > 0.4, sides > 5 %).

    An untrained model scores ~0 mAP on the real labels, which any two pipelines "agree" on; against
    its own detections it scores well, so a difference between the .pt and .onnx paths would show.
    """
    generate_demo(root, seed=3, n_train=8, n_val=8, imgsz=96)
    data = root / "data.yaml"
    data.write_text(yaml.safe_dump({"path": str(root), "train": "images/train", "val": "images/val",
                                    "names": list(DEMO_NAMES)}))
    r = val.run(pt, data, imgsz=96, batch_size=4, device="cpu", workers=0, plots=False, project=root / "runs",
                conf_thres=0.4, save_txt=True)
    for f in (root / "labels").glob("*.yolokd.npz"):
        f.unlink()
    for f in (root / "labels" / "val").glob("*.txt"):
        found = Path(r["save_dir"]) / "labels" / f.name
        rows = found.read_text().splitlines() if found.is_file() else []
        keep = [x for x in rows if min(map(float, x.split()[3:5])) > 0.05]
        f.write_text("".join(f"{x}\n" for x in keep))
    return data


def test_val_onnx_matches_pt(tmp_path: Path, capsys):
    pt = make_quantizable_checkpoint(tmp_path / "demo.pt", list(DEMO_NAMES))
    data = _self_labelled_demo(tmp_path / "demo", pt)
    dyn, _ = export.run(pt, imgsz=96, dynamic=True, output=tmp_path / "demo.onnx")
    kw = dict(imgsz=96, batch_size=4, device="cpu", workers=0, plots=False, project=tmp_path / "runs")
    r_pt = val.run(pt, data, **kw)
    r_onnx = val.run(dyn, data, rect=True, **kw)  # the .pt's rectangular batches (default: YOLOv5's square ones)
    assert r_pt["n_images"] == r_onnx["n_images"] == 8 and r_pt["n_instances"] > 10
    assert r_pt["map50"] > 0.5  # not a trivial agreement on zero
    for k in ("map50", "map", "precision", "recall"):
        assert r_onnx[k] == pytest.approx(r_pt[k], abs=1e-3), k
    m = json.loads((Path(r_onnx["save_dir"]) / "metrics.json").read_text())
    assert m["backend"] == "onnxruntime"
    # INT8 of the same dynamic file through the same path: it runs and keeps most of the mAP50
    # (rect too: the labels are the .pt's own rectangular-batch predictions, which square padding changes)
    r_int8 = val.run(q.quantize_int8(dyn, q.calibration_images(data, "train", 8)), data, rect=True, **kw)
    assert r_int8["map50"] > 0.5 * r_pt["map50"]

    # a fixed-shape (and INT8) file: square letterboxed batches of its own size, said on the console
    fixed, _ = export.run(pt, imgsz=128, output=tmp_path / "fixed.onnx")
    int8 = q.quantize_int8(fixed, q.calibration_images(data, "train", 8))
    capsys.readouterr()
    for f in (fixed, int8):
        r = val.run(f, data, **{**kw, "batch_size": 8})
        assert r["n_images"] == 8 and 0.0 <= r["map"] <= 1.0
    out = capsys.readouterr().out
    assert "using --imgsz 128" in out and "rect off" in out and "using --batch-size 1" in out
    nonsquare, _ = export.run(pt, imgsz=[64, 96], output=tmp_path / "wide.onnx")
    with pytest.raises(ValueError, match="fixed 64x96 input"):
        val.run(nonsquare, data, **kw)
