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
from models.yolo import (
    Detect,
    absolute_sources,
    anchor_levels_reversed,
    detect_bias_prior,
    placeholder_anchors,
    retained_outputs,
)

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


@pytest.mark.parametrize("size", "nsmlx")
def test_p6_yamls_are_the_release_models(size: str) -> None:
    """models/yolov5{n,s,m,l,x}6.yaml, found by name as YOLOv5 finds its hub yamls: one layout at the
    sizes' multiples, each with the release model's parameter count (counted on the real YOLOv5 7.0's
    models; published rounded to 0.1 M)."""
    from models.hub import PARAMS as RELEASE_PARAMS

    cfg = yaml.safe_load((Path(models.__file__).parent / f"yolov5{size}6.yaml").read_text())
    ref = p6_cfg()
    assert {k: cfg[k] for k in ("anchors", "backbone", "head")} == {k: ref[k] for k in ("anchors", "backbone", "head")}
    model = DetectionModel(f"yolov5{size}6.yaml")
    assert model.stride.tolist() == [8.0, 16.0, 32.0, 64.0]
    assert sum(p.numel() for p in model.parameters()) == RELEASE_PARAMS[f"yolov5{size}6"]


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


# ------------------------------------------------------------------------------ anchors and build
STRIDES = torch.tensor([8.0, 16.0, 32.0])


def pixel_anchors(model: DetectionModel) -> torch.Tensor:
    det = model.detect
    return det.anchors * det.stride.view(-1, 1, 1)


def test_slowly_growing_custom_anchors_kept_as_given() -> None:
    # Pixel area grows with stride, but by far less than stride² per level: in grid units the
    # area shrinks from P3 to P5, which an order check on grid units would wrongly "fix".
    slow = [[10, 10, 12, 12, 14, 14], [16, 16, 18, 18, 20, 20], [24, 24, 26, 26, 28, 28]]
    model = DetectionModel(tiny_cfg(anchors=slow))
    want = torch.tensor(slow, dtype=torch.float32).view(3, 3, 2)
    assert torch.allclose(pixel_anchors(model), want)
    grid_area = model.detect.anchors.prod(-1).mean(-1)
    assert grid_area[0] > grid_area[-1]  # the trap: decreasing in grid units


def test_reversed_anchor_sets_are_flipped() -> None:
    default = tiny_cfg()["anchors"]
    model = DetectionModel(tiny_cfg(anchors=default[::-1]))
    want = torch.tensor(default, dtype=torch.float32).view(3, 3, 2)
    assert torch.allclose(pixel_anchors(model), want)


def test_unordered_anchor_sets_are_kept() -> None:
    # Neither increasing nor strictly decreasing: not a reversed list, so left alone.
    odd = [[30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326], [10, 13, 16, 30, 33, 23]]
    model = DetectionModel(tiny_cfg(anchors=odd))
    assert torch.allclose(pixel_anchors(model), torch.tensor(odd, dtype=torch.float32).view(3, 3, 2))
    assert not anchor_levels_reversed(torch.tensor(odd, dtype=torch.float32).view(3, 3, 2), STRIDES)


def test_anchor_order_follows_stride_not_list_position() -> None:
    px = torch.tensor([[1.0, 1.0], [4.0, 4.0], [9.0, 9.0]]).view(3, 1, 2)
    assert not anchor_levels_reversed(px, STRIDES)
    assert anchor_levels_reversed(px, STRIDES.flip(0))  # the big anchors sit on the fine level
    assert not anchor_levels_reversed(px[:1], STRIDES[:1])  # one level: nothing to order


def test_anchor_count_gives_placeholders() -> None:
    model = DetectionModel(tiny_cfg(anchors=3), nc=2)
    det = model.detect
    assert det.anchors.shape == (3, 3, 2)
    cells = torch.tensor([[2.0, 2.0], [4.0, 4.0], [8.0, 8.0]])  # 2 … 8 cells, geometric steps
    assert all(torch.allclose(det.anchors[i], cells) for i in range(3))
    area = pixel_anchors(model).prod(-1).mean(-1)
    assert torch.all(area.diff() > 0)
    assert torch.equal(placeholder_anchors(1, STRIDES)[:, 0, 0], 4 * STRIDES)
    model.eval()
    with torch.no_grad():
        pred, _ = model(torch.rand(1, 3, 64, 64))
    assert torch.isfinite(pred).all()


def p6_cfg() -> dict:
    """The shipped YOLOv5 P6 layout (P3-P6 outputs, strides 8-64, models/yolov5n6.yaml) at width 0.125."""
    cfg = yaml.safe_load((Path(models.__file__).parent / "yolov5n6.yaml").read_text())
    return {**cfg, "width_multiple": 0.125}


def test_p6_layout() -> None:
    model = DetectionModel(p6_cfg())
    assert model.stride.tolist() == [8.0, 16.0, 32.0, 64.0]
    assert model.save == [4, 6, 8, 12, 16, 20, 23, 26, 29, 32]
    assert "model.33.anchors" in model.state_dict() and model.detect.anchors.shape == (4, 3, 2)
    assert torch.allclose(pixel_anchors(model), torch.tensor(p6_cfg()["anchors"], dtype=torch.float32).view(4, 3, 2))
    out = model(torch.rand(1, 3, 128, 128))
    assert [o.shape[2] for o in out] == [16, 8, 4, 2]


def keep_everything_forward(model: DetectionModel, x: torch.Tensor):
    """A plain reference forward that holds every output (no release logic)."""
    outs = {-1: x}  # -1: the image, read by layer 0
    for i, layer in enumerate(model.model):
        entries = [layer.f] if isinstance(layer.f, int) else layer.f
        feeds = [outs[j if j >= 0 else i + j] for j in entries]
        outs[i] = layer(feeds[0] if isinstance(layer.f, int) else feeds)
    return outs[len(model.model) - 1]


def test_relative_sources_and_retained_outputs() -> None:
    cfg = tiny_cfg()
    # Layer 12 reads the previous layer and, relatively, layer 6 (-6 from 12).
    cfg["head"][2] = [[-1, -6], 1, "Concat", [1]]
    model = DetectionModel(cfg).eval()
    assert model.save == [4, 6, 10, 14, 17, 20, 23] == retained_outputs(model.model)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x)[0], keep_everything_forward(model, x)[0])
    assert absolute_sources([-1, -6], 12) == [11, 6] and absolute_sources(-1, 0) == [-1]


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda c: c["head"].__setitem__(2, [[-1, 30], 1, "Concat", [1]]), "layer 12"),
    (lambda c: c["backbone"].__setitem__(1, [-1, 0, "Conv", [128, 3, 2]]), "layer 1"),
    (lambda c: c["backbone"].__setitem__(3, [-1, 1, "Conv", ["wide", 3, 2]]), "layer 3"),
    (lambda c: c["backbone"].__setitem__(4, [-1, 1, "C3"]), "layer 4"),
    (lambda c: c["backbone"].__setitem__(5, [-1, 1, "Conv", [512, 3, 2, 1, 1, 1, 1, 1, 1]]), "layer 5"),
    (lambda c: c["head"].__setitem__(-1, [[17, 20], 1, "Detect", ["nc", "anchors"]]), "layer 24"),
    (lambda c: c.__setitem__("anchors", [[10, 13, 16]] * 3), "layer 24"),
    (lambda c: c["head"].append([-1, 1, "Conv", [8, 1, 1]]), "layer 25"),
    (lambda c: c.__setitem__("nc", 0), "nc"),
    (lambda c: c.pop("width_multiple"), "width_multiple"),
])
def test_bad_yaml_errors_name_yaml_and_layer(edit, needle: str) -> None:
    cfg = tiny_cfg()
    cfg["yaml_file"] = "broken.yaml"
    edit(cfg)
    with pytest.raises(ValueError) as e:
        DetectionModel(cfg)
    msg = str(e.value)
    assert "broken.yaml" in msg and needle in msg and "\n" not in msg


def test_detect_bias_prior_values() -> None:
    prior = detect_bias_prior(nc=1, na=3, stride=32.0).view(3, 6)
    assert torch.all(prior[:, :4] == 0)
    assert torch.allclose(prior[:, 4], torch.tensor(math.log(8 / 20**2)))
    assert torch.allclose(prior[:, 5], torch.tensor(math.log(0.6 / 0.00001)), rtol=1e-6)


def test_fuse_in_training_mode_and_twice() -> None:
    model = DetectionModel(tiny_cfg())
    x = torch.rand(1, 3, 64, 64)
    for m in model.modules():  # non-trivial BN statistics and affine terms
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    model.eval()
    with torch.no_grad():
        want, _ = model(x)
    model.train().fuse().fuse()  # fusion uses running statistics whatever the mode; twice is a no-op
    convs = [m.conv for m in model.modules() if isinstance(m, Conv)]
    assert all(c.bias is not None and not c.weight.requires_grad for c in convs)
    with torch.no_grad():
        got, _ = model.eval()(x)
    assert (got[..., 4:] - want[..., 4:]).abs().max() < 1e-5
