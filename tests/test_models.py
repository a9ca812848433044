"""Model building and numerical parity with the official YOLOv5 fixture (CPU, small inputs)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import models
from models import DetectionModel, load_model
from models.checkpoint import load_checkpoint
from models.common import SPP, Conv, Focus
from models.yolo import Detect

FIXTURES = Path(__file__).parent / "fixtures"
CKPT = FIXTURES / "yolov5n_nc80.pt"
NPZ = FIXTURES / "yolov5n_nc80.npz"

# Published parameter counts (nc=80), REFERENCE §1.
PARAMS = {"n": 1_872_157, "s": 7_235_389, "m": 21_190_557}



@pytest.fixture(scope="module")
def ref() -> dict[str, np.ndarray]:
    with np.load(NPZ) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def official() -> DetectionModel:
    return load_model(CKPT)


def tiny_cfg(**over) -> dict:
    """yolov5n rows at width 0.125: a few thousand parameters, milliseconds per forward."""
    with open(Path(models.__file__).parent / "yolov5n.yaml", encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    cfg.update(width_multiple=0.125, **over)
    return cfg


def test_key_set_matches_yaml_model(official: DetectionModel) -> None:
    ck = load_checkpoint(CKPT)
    built = DetectionModel("yolov5n.yaml").state_dict()
    assert list(built) == list(ck["state_dict"])  # same keys, same order
    assert all(built[k].shape == v.shape for k, v in ck["state_dict"].items())
    assert "model.0.conv.weight" in built and "model.24.anchors" in built
    assert not official.training and next(official.parameters()).dtype == torch.float32


@pytest.mark.parametrize("size", [256, 320])
def test_eval_parity(official: DetectionModel, ref: dict, size: int) -> None:
    x = torch.from_numpy(ref[f"x{size}"])
    with torch.no_grad():
        pred, raw = official(x)
    want = torch.from_numpy(ref[f"eval_pred_{size}"])
    assert pred.shape == want.shape
    assert (pred[..., :4] - want[..., :4]).abs().max() < 1e-3  # xywh pixels
    assert (pred[..., 4:] - want[..., 4:]).abs().max() < 1e-4  # sigmoid scores
    assert len(raw) == 3 and raw[0].shape == (x.shape[0], 3, size // 8, size // 8, 85)


@pytest.mark.parametrize("size", [256, 320])
def test_train_parity_fresh_copy(official: DetectionModel, ref: dict, size: int) -> None:
    model = copy.deepcopy(official).train()  # BN uses batch statistics, as in the reference
    out = model(torch.from_numpy(ref[f"x{size}"]))
    assert isinstance(out, list) and len(out) == 3
    for i, o in enumerate(out):
        want = torch.from_numpy(ref[f"train_out_{size}_{i}"])
        assert o.shape == want.shape
        assert (o.detach() - want).abs().max() < 1e-4


def test_stride_and_anchors(official: DetectionModel, ref: dict) -> None:
    assert official.stride.tolist() == ref["stride"].tolist() == [8.0, 16.0, 32.0]
    assert official.detect.stride is official.stride
    assert torch.equal(official.detect.anchors, torch.from_numpy(ref["anchors"]))
    assert "stride" not in dict(official.named_buffers())


def test_fuse_same_output(official: DetectionModel, ref: dict) -> None:
    x = torch.from_numpy(ref["x256"])
    fused = copy.deepcopy(official).fuse()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        a, _ = official(x)
        b, _ = fused(x)
    assert (a[..., 4:] - b[..., 4:]).abs().max() < 1e-4
    assert ((a[..., :4] - b[..., :4]).abs() / (1 + a[..., :4].abs())).max() < 1e-4


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_published_param_counts(name: str) -> None:
    model = DetectionModel(f"yolov5{name}.yaml")
    assert model.info()["params"] == PARAMS[name]


def test_yolov5s_gflops() -> None:
    info = DetectionModel("yolov5s.yaml").info(640)
    assert info["params"] == 7_235_389
    assert abs(info["gflops"] - 16.5) / 16.5 < 0.03


def test_build_keeps_batchnorm_statistics() -> None:
    model = DetectionModel(tiny_cfg())
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1)
            assert int(m.num_batches_tracked) == 0
            assert m.eps == 1e-3 and m.momentum == 0.03
    assert model.training and model.stride.tolist() == [8.0, 16.0, 32.0]


def test_detect_bias_prior() -> None:
    torch.manual_seed(0)
    model = DetectionModel(tiny_cfg(), nc=4)
    det = model.detect
    for conv, s in zip(det.m, det.stride):
        b = conv.bias.detach().view(det.na, -1)
        bound = 1 / math.sqrt(conv.in_channels)  # default conv bias init is U(-bound, bound)
        assert torch.all((b[:, 4] - math.log(8 / (640 / float(s)) ** 2)).abs() <= bound)
        assert torch.all((b[:, 5:] - math.log(0.6 / (4 - 0.99999))).abs() <= bound)


def test_nc_override_builds_different_head() -> None:
    a = DetectionModel(tiny_cfg())
    b = DetectionModel(tiny_cfg(), nc=3)
    assert a.nc == 80 and b.nc == 3 and b.yaml["nc"] == 3
    assert b.names == ["class0", "class1", "class2"]
    assert b.detect.m[0].weight.shape[0] == 3 * 8 and a.detect.m[0].weight.shape[0] == 3 * 85
    b.eval()
    with torch.no_grad():
        pred, raw = b(torch.rand(2, 3, 64, 96))
    # N = na · Σ (H/s)(W/s) over levels: 3 · (8·12 + 4·6 + 2·3)
    assert pred.shape == (2, 3 * (96 + 24 + 6), 8) and raw[2].shape == (2, 3, 2, 3, 8)


def test_eval_decoding_formula() -> None:
    model = DetectionModel(tiny_cfg(), nc=2).eval()
    with torch.no_grad():
        pred, raw = model(torch.rand(1, 3, 64, 64))
    det = model.detect
    p = raw[1].sigmoid()[0]  # level 1 (stride 16): (na, ny, nx, no)
    a, y, x = 2, 3, 1
    want_x = (2 * p[a, y, x, 0] - 0.5 + x) * 16
    want_w = (2 * p[a, y, x, 2]) ** 2 * det.anchors[1, a, 0] * 16
    idx = 3 * 8 * 8 + (a * 4 + y) * 4 + x  # flattened after level 0, in (na, ny, nx) order
    assert torch.allclose(pred[0, idx, 0], want_x) and torch.allclose(pred[0, idx, 2], want_w)
    assert torch.allclose(pred[0, idx, 4:], p[a, y, x, 4:])


def test_stride_follows_apply() -> None:
    model = DetectionModel(tiny_cfg()).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref, _ = model(x)
        model.double()
        assert model.stride.dtype == torch.float64 and model.detect.stride is model.stride
        out, _ = model(x.double())
    assert torch.allclose(out.float(), ref, atol=1e-4)
    model.half()
    assert model.stride.dtype == torch.float16 and model.detect.stride is model.stride


def test_unknown_module_is_named() -> None:
    cfg = tiny_cfg()
    cfg["backbone"][2] = [-1, 1, "BottleneckCSP", [128]]
    cfg["yaml_file"] = "tiny.yaml"
    with pytest.raises(ValueError, match="BottleneckCSP") as e:
        DetectionModel(cfg)
    assert "tiny.yaml" in str(e.value) and "layer 2" in str(e.value)


def test_missing_yaml_file() -> None:
    with pytest.raises(FileNotFoundError, match="no_such_model.yaml"):
        DetectionModel("no_such_model.yaml")


def test_v50_blocks_and_layout() -> None:
    cfg = v50_cfg()
    model = DetectionModel(cfg)
    assert isinstance(model.model[0], Focus) and isinstance(model.model[8], SPP)
    keys = model.state_dict()
    assert "model.0.conv.conv.weight" in keys and "model.8.cv2.bn.running_var" in keys
    assert model.stride.tolist() == [8.0, 16.0, 32.0]


def test_yaml_activation_key() -> None:
    model = DetectionModel(tiny_cfg(activation="nn.LeakyReLU(0.1)"))
    acts = [m.act for m in model.modules() if isinstance(m, Conv)]
    assert acts and all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.1 for a in acts)
    with pytest.raises(ValueError, match="unsupported activation"):
        DetectionModel(tiny_cfg(activation="os.system('x')"))


def test_load_model_from_yaml_and_detect_property() -> None:
    model = load_model("yolov5n.yaml", nc=5)
    assert not model.training and model.nc == 5 and isinstance(model.detect, Detect)
    assert model.detect.f == [17, 20, 23] and model.save == [4, 6, 10, 14, 17, 20, 23]
    assert all(hasattr(m, a) for m in model.model for a in ("i", "f", "type", "np"))


def v50_cfg() -> dict:
    """A YOLOv5 v5.0-style model dict (Focus stem, SPP at index 8), width 0.125."""
    head = copy.deepcopy(tiny_cfg()["head"])
    return {
        "nc": 80, "depth_multiple": 0.33, "width_multiple": 0.125,
        "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
        "backbone": [[-1, 1, "Focus", [64, 3]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
                     [-1, 1, "Conv", [256, 3, 2]], [-1, 9, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
                     [-1, 9, "C3", [512]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 1, "SPP", [1024, [5, 9, 13]]],
                     [-1, 3, "C3", [1024, False]]],
        "head": head,
    }
