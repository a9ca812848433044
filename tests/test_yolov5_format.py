"""export.py --include yolov5: the official release layout, read back by our loader (no YOLOv5 needed).

The oracle check against the real YOLOv5 is scripts/oracle_yolov5_check.py (skipped without it).
"""

from __future__ import annotations

import pickle
import pickletools
import types
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import export
from models import DetectionModel, load_checkpoint, load_model
from models.yolov5_format import save_yolov5
from tests.test_export import make_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "yolov5n_nc80.pt"  # written by the real YOLOv5 7.0
RELEASE_KEYS = ["epoch", "best_fitness", "model", "ema", "updates", "optimizer", "opt", "git", "date"]


def pickle_globals(path: Path) -> set[str]:
    """'module name' of every GLOBAL opcode in a torch zip-pickle's data.pkl (protocol 2 files)."""
    with zipfile.ZipFile(path) as zf:
        data = zf.read(next(n for n in zf.namelist() if n.endswith("/data.pkl")))
    return {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}


class _Stub:
    """Test-only stand-in for a pickled class: remembers its name and the state set on it."""

    cls_name = "?"

    def __setstate__(self, state):
        self.state = state


def stub_load(path: Path) -> dict:
    """The top-level dict of a release file with model classes as `_Stub`s (``.cls_name``, ``.state``).

    For OUR files and the fixture only (known files; never do this with an untrusted one). Our
    own loader is tested through its API (load_checkpoint / load_model); this reads the raw tree.
    """
    stubs: dict[str, type] = {}

    class StubUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            if module.startswith(("models.", "torch.nn.modules.")):
                key = f"{module}.{name}"
                return stubs.setdefault(key, type(name, (_Stub,), {"cls_name": key}))
            return super().find_class(module, name)

    mod = types.ModuleType("stub_pickle")
    mod.Unpickler, mod.load = StubUnpickler, lambda f, **kw: StubUnpickler(f, **kw).load()
    return torch.load(path, map_location="cpu", pickle_module=mod, weights_only=False)


def named_stubs(path: Path) -> dict[str, _Stub]:
    """{module path ('' for the model): stub} over the pickled model tree."""
    out: dict[str, _Stub] = {}

    def walk(obj: _Stub, prefix: str) -> None:
        out[prefix] = obj
        for k, child in obj.state["_modules"].items():
            walk(child, f"{prefix}.{k}" if prefix else k)

    walk(stub_load(path)["model"], "")
    return out


def attribute_sets(path: Path) -> dict[str, set[str]]:
    """{class name (+ '@layer' for top-level layers): attribute names} over the pickled model tree."""
    out: dict[str, set[str]] = {}
    for obj in named_stubs(path).values():
        out.setdefault(obj.cls_name + ("@layer" if "i" in obj.state else ""), set()).update(obj.state)
    return out


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("w") / "tiny.pt")


def test_cli_writes_release_file_read_back_equal(tiny_pt: Path, capsys: pytest.CaptureFixture) -> None:
    assert export.main(["--weights", str(tiny_pt), "--include", "yolov5", "--imgsz", "128"]) == 0
    out = tiny_pt.with_name("tiny_yolov5.pt")
    assert "read back through the restricted unpickler" in capsys.readouterr().out

    raw = stub_load(out)
    assert list(raw) == RELEASE_KEYS and raw["epoch"] == -1 and raw["model"].cls_name == "models.yolo.DetectionModel"
    assert all(raw[k] is None for k in ("best_fitness", "ema", "updates", "optimizer", "opt", "git"))
    ckpt = load_checkpoint(out)  # the restricted unpickler: YOLOv5 classes become inert records
    sd = ckpt["state_dict"]
    assert {t.dtype for k, t in sd.items() if not k.endswith("num_batches_tracked")} == {torch.float16}
    source = load_model(tiny_pt)
    assert ckpt["names"] == list(source.names) and set(sd) == set(source.state_dict())

    # Same network: the read-back model equals the source with its weights rounded to fp16.
    back = load_model(out)
    rounded = load_model(tiny_pt)
    with torch.no_grad():
        for t in rounded.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    x = torch.from_numpy(export.preprocess(export.synthetic_image((120, 160), 3), (128, 160)))
    with torch.no_grad():
        y_back, y_rounded, y_source = back(x)[0], rounded(x)[0], source(x)[0]
    assert torch.allclose(y_back, y_rounded, atol=1e-4, rtol=1e-5)
    # and the source itself within fp16 tolerance (scores absolute, boxes relative to the input)
    assert (y_back[..., 4:] - y_source[..., 4:]).abs().max() < export.TOL_FP16
    assert ((y_back[..., :4] - y_source[..., :4]).abs() / 160).max() < export.TOL_FP16
    assert (y_back[..., 4:] > 0.5).any()  # informative outputs, not all background

    # --output with two formats is ambiguous; overwriting the input is refused
    assert export.main(["--weights", str(tiny_pt), "--include", "yolov5", "onnx", "--output", "x.pt"]) == 2
    assert export.main(["--weights", str(tiny_pt), "--include", "yolov5", "--output", str(tiny_pt)]) == 2


def test_pickle_names_and_attributes_match_yolov5s_file(tmp_path: Path) -> None:
    """Same classes (GLOBAL opcodes) and, class by class, the same attribute names as YOLOv5's file."""
    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml")
    out = save_yolov5(model, tmp_path / "n.pt", hyp={"lr0": 0.01})
    assert pickle_globals(out) == pickle_globals(FIXTURE)
    assert "models.yolo DetectionModel" in pickle_globals(out)
    ours, theirs = attribute_sets(out), attribute_sets(FIXTURE)
    assert set(ours) == set(theirs)
    for cls, attrs in theirs.items():
        assert ours[cls] == attrs, cls


def test_release_details(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text())
    cfg.update(width_multiple=0.125, nc=2, anchors=3)  # placeholder anchors, as AutoAnchor would replace
    model = DetectionModel(cfg).eval()
    with torch.no_grad():
        model.detect.anchors.mul_(1.5)  # anchors that differ from every yaml
    model.names = ["a", "b"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = save_yolov5(model, tmp_path / "m.pt")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == before[k].dtype for k in before)

    tree = named_stubs(out)
    m = tree[""].state
    assert m["names"] == {0: "a", 1: "b"} and m["nc"] == 2 and m["save"] == model.save and m["training"] is False
    pixel = (model.detect.anchors * model.detect.stride.view(-1, 1, 1)).view(3, -1)
    assert torch.allclose(torch.tensor(m["yaml"]["anchors"]), pixel, atol=1e-3)  # the real anchors
    det = tree["model.24"].state
    assert det["_buffers"]["anchors"].dtype == torch.float16 and det["stride"].tolist() == [8, 16, 32]
    assert [(g.numel(), g.dtype) for g in det["grid"]] == [(0, torch.float16)] * 3
    assert all(not p.requires_grad for s in tree.values() for p in s.state["_parameters"].values() if p is not None)
    back = load_model(out)
    assert torch.allclose(back.detect.anchors, model.detect.anchors.half().float())
    # every Conv points at one shared activation, as in YOLOv5's files
    acts = [s for name, s in tree.items() if name.endswith(".act")]
    assert len(acts) > 10 and len({id(a) for a in acts}) == 1 and acts[0].state["inplace"] is True

    class Custom(nn.Module):
        def forward(self, x):
            return x

    model.model[0].act = Custom()
    with pytest.raises(ValueError, match="cannot write a .*Custom layer"):
        save_yolov5(model, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists() and not list(tmp_path.glob(".bad.pt*"))
