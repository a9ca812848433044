"""Safe checkpoint loading (official YOLOv5 files, hostile files) and our own format."""

from __future__ import annotations

import copy
import os
import pickle
import shlex
import subprocess
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import models
from models import DetectionModel, load_model
from models.checkpoint import (
    FORMAT,
    CheckpointError,
    Record,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    transfer_weights,
)

CKPT = Path(__file__).parent / "fixtures" / "yolov5n_nc80.pt"



def tiny_cfg(**over) -> dict:
    with open(Path(models.__file__).parent / "yolov5n.yaml", encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    cfg.update(width_multiple=0.125, **over)
    return cfg


def save_official(model: DetectionModel, path: Path, attrs: dict | None = None, **extra) -> Path:
    """Write `model` the way a YOLOv5 release does: the whole module pickled, in fp16.

    Our classes live at `models.yolo` / `models.common`, the same global names as YOLOv5's.
    `attrs` are set on the copy after copying (deepcopy would run a payload's __reduce__).
    """
    m = copy.deepcopy(model).half()
    for k, v in (attrs or {}).items():
        setattr(m, k, v)
    for p in m.parameters():
        p.requires_grad_(False)
    ckpt = {"epoch": -1, "best_fitness": None, "model": m, "ema": None, "updates": None,
            "optimizer": None, "opt": None, "git": None, "date": "2024-01-01"}
    ckpt.update(extra)
    torch.save(ckpt, path)
    return path


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)[0]


class SystemPayload:
    """Unpickling calls os.system to create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class EvalPayload(SystemPayload):
    """Unpickling calls builtins.eval on code that creates a marker file."""

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


class PopenPayload(SystemPayload):
    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


# ------------------------------------------------------------------------------ official files
def test_official_fixture_normalised() -> None:
    ck = load_checkpoint(CKPT)
    assert ck["source"] == "yolov5" and ck["notes"] == []
    assert ck["names"][:2] == ["person", "bicycle"] and len(ck["names"]) == 80
    assert ck["stride"] == [8.0, 16.0, 32.0]
    assert ck["yaml"]["nc"] == 80 and ck["yaml"]["width_multiple"] == 0.25
    sd = ck["state_dict"]
    assert sd["model.0.conv.weight"].dtype == torch.float16
    assert sd["model.24.anchors"].shape == (3, 3, 2)
    assert sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k
               and not k.endswith("anchors")) == 1_872_157
    # The pickled modules are inert records, never the real classes.
    raw = ck["raw"]
    assert raw["epoch"] == -1 and isinstance(raw["model"], Record)
    assert raw["model"].global_name == "models.yolo.DetectionModel"
    assert not isinstance(raw["model"], nn.Module)


def test_prefers_ema_over_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, ema = DetectionModel(tiny_cfg()), DetectionModel(tiny_cfg())
    path = save_official(model, tmp_path / "train.pt", ema=copy.deepcopy(ema).half(), epoch=3)
    ck = load_checkpoint(path)
    want = ema.state_dict()["model.0.conv.weight"].half()
    assert torch.equal(ck["state_dict"]["model.0.conv.weight"], want)


def test_yolov5_package_prefix(tmp_path: Path) -> None:
    """The pip `yolov5` package pickles `yolov5.models.yolo.*`; rewrite our names to match."""
    model = DetectionModel(tiny_cfg())
    src = save_official(model, tmp_path / "plain.pt")
    dst = tmp_path / "pip.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("data.pkl"):
                # protocol 2 GLOBAL opcodes are text lines "c<module>\n<name>\n"
                data = data.replace(b"cmodels.", b"cyolov5.models.")
                assert b"yolov5.models.yolo" in data
            zout.writestr(info, data)
    ck = load_checkpoint(dst)
    assert ck["raw"]["model"].global_name == "yolov5.models.yolo.DetectionModel"
    x = torch.rand(1, 3, 64, 64)
    assert torch.equal(outputs(model_from_checkpoint(ck), x), outputs(load_model(src), x))


def test_v50_checkpoint_focus_spp_anchor_grid(tmp_path: Path) -> None:
    from tests.test_models import v50_cfg

    model = DetectionModel(v50_cfg())
    det = model.detect
    det.register_buffer("anchor_grid", (det.anchors * det.stride.view(-1, 1, 1)).view(3, 1, 3, 1, 1, 2))
    path = save_official(model, tmp_path / "v50.pt", best_fitness=__import__("numpy").array([0.42]))
    ck = load_checkpoint(path)
    assert "model.24.anchor_grid" not in ck["state_dict"]
    assert any("anchor_grid" in n for n in ck["notes"])
    assert float(ck["raw"]["best_fitness"][0]) == pytest.approx(0.42)  # numpy array (v5.0 files)
    loaded = model_from_checkpoint(ck)
    x = torch.rand(1, 3, 64, 64)
    expect = outputs(copy.deepcopy(model).half().float(), x)  # fp16-rounded weights
    assert torch.allclose(outputs(loaded, x), expect, atol=1e-4)


def test_legacy_non_zip_format_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pre-1.6 (non-zip) torch file is refused before any of it is unpickled, even a harmless one."""
    monkeypatch.chdir(tmp_path)
    model = DetectionModel(tiny_cfg())
    path = tmp_path / "legacy.pt"
    torch.save({"epoch": -1, "model": copy.deepcopy(model).half(), "ema": None}, path,
               _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy") as e:
        load_checkpoint(path)
    assert "legacy.pt" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy.pt"]


def test_activation_taken_from_pickled_layers(tmp_path: Path) -> None:
    model = DetectionModel(tiny_cfg(activation="nn.LeakyReLU(0.1)"))
    del model.yaml["activation"]  # the yaml no longer says; the pickled layers still do
    ck = load_checkpoint(save_official(model, tmp_path / "leaky.pt"))
    loaded = model_from_checkpoint(ck)
    assert isinstance(loaded.model[0].act, nn.LeakyReLU) and loaded.model[0].act.negative_slope == 0.1
    x = torch.rand(1, 3, 64, 64)
    assert torch.allclose(outputs(loaded, x), outputs(copy.deepcopy(model).half().float(), x), atol=1e-4)


def test_unknown_layer_type(tmp_path: Path) -> None:
    """A yaml naming a block we cannot build is refused when the checkpoint is read (its shapes are unknowable)."""
    model = DetectionModel(tiny_cfg())
    model.yaml["backbone"][2][2] = "BottleneckCSP"
    path = save_official(model, tmp_path / "csp.pt")
    with pytest.raises(CheckpointError, match="BottleneckCSP") as e:
        load_checkpoint(path)
    assert "csp.pt" in str(e.value) and "\n" not in str(e.value)


def test_unknown_activation_type(tmp_path: Path) -> None:
    model = DetectionModel(tiny_cfg())
    path = save_official(model, tmp_path / "act.pt")
    with zipfile.ZipFile(path) as zin:
        items = [(i, zin.read(i)) for i in zin.infolist()]
    dst = tmp_path / "odd_act.pt"
    with zipfile.ZipFile(dst, "w") as zout:
        for info, data in items:
            if info.filename.endswith("data.pkl"):  # SiLU -> Tanhshrink (a torch.nn class we do not map)
                data = data.replace(b"activation\nSiLU\n", b"activation\nTanhshrink\n")
            zout.writestr(info, data)
    ck = load_checkpoint(dst)
    with pytest.raises(CheckpointError, match="Tanhshrink") as e:
        model_from_checkpoint(ck)
    assert "odd_act.pt" in str(e.value) and "\n" not in str(e.value)


def test_nc_override_transfers_matching_tensors() -> None:
    model = load_model(CKPT, nc=3)
    n_loaded, n_total = model.transfer_report
    assert model.nc == 3 and model.detect.m[0].weight.shape[0] == 24
    assert n_total - n_loaded == 6  # the three Detect convs' weights and biases
    assert model.names == ["class0", "class1", "class2"]
    ck = load_checkpoint(CKPT)
    assert torch.equal(model.state_dict()["model.0.conv.weight"], ck["state_dict"]["model.0.conv.weight"].float())
    fresh = DetectionModel("yolov5n.yaml", nc=3)
    assert transfer_weights(fresh, ck["state_dict"]) == (n_loaded, n_total)
    assert transfer_weights(fresh, ck["state_dict"], exclude=("anchors",)) == (n_loaded - 1, n_total)


# ------------------------------------------------------------------------------ hostile files
@pytest.mark.parametrize(("payload", "global_name"), [
    (SystemPayload, "system"), (EvalPayload, "builtins.eval"), (PopenPayload, "subprocess.Popen"),
])
def test_malicious_checkpoint_refused(tmp_path: Path, payload: type, global_name: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"epoch": -1, "model": payload(marker), "ema": None}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert global_name in msg and "evil.pt" in msg and "\n" not in msg
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=global_name):
        load_model(path)
    assert not marker.exists()


def test_malicious_payload_is_real(tmp_path: Path) -> None:
    """Control: the payload does write its marker when unpickled without restrictions."""
    marker = tmp_path / "control"
    pickle.loads(pickle.dumps(EvalPayload(marker)))  # our own payload, in tmp_path
    assert marker.exists()


def test_payload_hidden_inside_model_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = DetectionModel(tiny_cfg())
    # deep inside the pickled module's attributes, after many allowed globals
    path = save_official(model, tmp_path / "hidden.pt", attrs={"hyp": {"lr0": SystemPayload(marker)}})
    with pytest.raises(CheckpointError, match="system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize("kind", ["truncated", "truncated_tail", "random", "empty", "text_zip", "corrupt"])
def test_damaged_files(tmp_path: Path, kind: str) -> None:
    data = CKPT.read_bytes()
    path = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated_tail":
        path.write_bytes(data[:-64])
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes().replace(b"PK", b"xx"))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "not a checkpoint")
    else:  # garbage in the middle of the pickle program
        with zipfile.ZipFile(CKPT) as zin, zipfile.ZipFile(path, "w") as zout:
            for info in zin.infolist():
                blob = zin.read(info)
                if info.filename.endswith("data.pkl"):
                    blob = blob[:200] + b"\xff" * 64 + blob[264:]
                zout.writestr(info, blob)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert path.name in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------ our own format
def our_ckpt(model: DetectionModel) -> dict:
    sd = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    return {"format": FORMAT, "yaml": model.yaml, "model": sd, "ema": None, "names": model.names,
            "stride": model.stride.tolist(), "epoch": 7, "best_fitness": 0.25, "updates": 10,
            "optimizer": None, "scaler": None, "adapters": None, "opt": {"imgsz": 64}, "hyp": {"lr0": 0.01},
            "rng": None, "date": "2024-01-01T00:00:00"}


def test_round_trip_bit_identical(tmp_path: Path) -> None:
    model = DetectionModel(tiny_cfg(), nc=2)
    model.names = ["cat", "dog"]
    obj = our_ckpt(model)
    path = save_checkpoint(obj, tmp_path / "sub" / "last.pt")
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temp file left
    torch.load(path, weights_only=True)  # plain data only
    ck = load_checkpoint(path)
    assert ck["source"] == "ours" and ck["names"] == ["cat", "dog"] and ck["stride"] == [8.0, 16.0, 32.0]
    assert list(ck["state_dict"]) == list(obj["model"])
    for k, v in obj["model"].items():
        got = ck["state_dict"][k]
        assert got.dtype == v.dtype and torch.equal(got, v)
    assert {k: v for k, v in ck["raw"].items() if k != "model"} == {k: v for k, v in obj.items() if k != "model"}
    # and the model it gives computes what the fp16-rounded original computes
    x = torch.rand(1, 3, 64, 64)
    loaded = load_model(path)
    assert loaded.names == ["cat", "dog"]
    assert torch.equal(outputs(loaded, x), outputs(copy.deepcopy(model).half().float(), x))


def test_ours_prefers_ema(tmp_path: Path) -> None:
    model = DetectionModel(tiny_cfg())
    obj = our_ckpt(model)
    obj["ema"] = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in obj["model"].items()}
    ck = load_checkpoint(save_checkpoint(obj, tmp_path / "e.pt"))
    assert torch.count_nonzero(ck["state_dict"]["model.0.conv.weight"]) == 0


def test_save_failure_keeps_previous_file(tmp_path: Path) -> None:
    path = save_checkpoint({"format": FORMAT, "a": torch.ones(2)}, tmp_path / "x.pt")
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever pickle raises for a lambda
        save_checkpoint({"bad": lambda: 0}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_unsupported_format_version(tmp_path: Path) -> None:
    path = save_checkpoint({"format": "yolo-kd/99"}, tmp_path / "v99.pt")
    with pytest.raises(CheckpointError, match="yolo-kd/99"):
        load_checkpoint(path)


def test_plain_state_dict_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "sd.pt"
    torch.save(DetectionModel(tiny_cfg()).state_dict(), path)
    with pytest.raises(CheckpointError, match="not a YOLOv5"):
        load_checkpoint(path)


def test_count_only_anchors_load_without_a_false_reversal_note(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """A yaml with `anchors: 3` keeps that count in its checkpoints; the shapes-only check of the yaml at
    load (built on the meta device, where values read as 1) must not report a reversed anchor order."""
    import logging

    from engine.checkpointing import model_checkpoint

    model = DetectionModel(tiny_cfg(anchors=3))
    with torch.no_grad():
        model.detect.anchors.copy_(torch.arange(1, 19, dtype=torch.float32).view(3, 3, 2) / 4)  # as AutoAnchor
    path = save_checkpoint(model_checkpoint(model), tmp_path / "a.pt")
    with caplog.at_level(logging.INFO, logger="models"):
        loaded = load_model(path)
    assert not any("reversing" in r.getMessage() for r in caplog.records)
    assert torch.equal(loaded.detect.anchors, model.detect.anchors)
