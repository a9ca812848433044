"""Hostile checkpoints: the reader's guarantees one by one (issue 14; the defects themselves are in
test_checkpoint_defects.py). Payloads are hand-written pickle programs aimed at tmp_path only."""

from __future__ import annotations

import copy
import os
import pathlib
import struct
import subprocess
import sys
import time
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import models
from models import DetectionModel, load_model
from models.checkpoint import load_checkpoint
from models.meta_shapes import ShapesOnly, meta_state_dict
from models.torch_zip import ReadError, _InertUnpickler, _Stub
from tests.test_checkpoint import CKPT, our_ckpt, save_official, tiny_cfg
from tests.test_checkpoint_defects import (
    REPO,
    g_,
    i_,
    peak_growth,
    program,
    refused,
    storage,
    t_,
    tensor,
    torch_zip,
)
from tests.test_models import v50_cfg


def test_module_persistent_id_refused_in_a_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same instructions inside a zip checkpoint: the BUILD onto a stand-in class already fails."""
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "pwned"
    pid = b"(" + t_("module") + g_("_codecs", "encode") + t_("payload.py") + t_("x = 1\n") + b"tQ"
    refused(torch_zip(tmp_path / "m.pt", program(b"}", t_("model"), pid, b"s")), "persistent id 'module'")
    state = b"N}(" + t_("dump_patches") + b"\x88" + t_("__name__") + t_(str(target)) + b"u\x86"
    refused(torch_zip(tmp_path / "b.pt", program(g_("_codecs", "encode"), state, b"b")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.pt", "m.pt"]


def test_find_class_hands_out_fresh_inert_stand_ins() -> None:
    a, b = _InertUnpickler(b"", {}), _InertUnpickler(b"", {})
    od = a.find_class("collections", "OrderedDict")
    assert od is not OrderedDict and issubclass(od, _Stub) and not issubclass(od, dict)
    assert a.find_class("collections", "OrderedDict") is od  # one stand-in per name within a load
    assert b.find_class("collections", "OrderedDict") is not od  # never shared between loads
    rebuild = a.find_class("torch._utils", "_rebuild_tensor_v2")
    assert rebuild(1, 2)._args == (1, 2)  # a call only records its arguments
    with pytest.raises(TypeError):
        rebuild.__setstate__({"x": 1})  # BUILD onto the stand-in class itself
    for module, name in [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("subprocess", "Popen"),
                         ("torch", "load"), ("torch.serialization", "_check_container_source"), ("torch", "storage")]:
        with pytest.raises(ReadError, match="references the global"):
            a.find_class(module, name)


def test_memo_index_bomb_costs_nothing(tmp_path: Path) -> None:
    """LONG_BINPUT 2**25: CPython's C unpickler would zero a 512 MiB memo array for these 10 bytes."""
    clean = save_official(DetectionModel(tiny_cfg()), tmp_path / "clean.pt")
    bomb = torch_zip(tmp_path / "memo.pt", program(b"}", b"r" + struct.pack("<I", 1 << 25)))
    outcome, growth = peak_growth(clean, bomb)
    assert outcome.startswith("REFUSED ") and growth < 48, (outcome, growth)


def test_depth_upsampling_and_pooling_bombs_refused_quickly(tmp_path: Path) -> None:
    model = DetectionModel(tiny_cfg())
    deep = {**model.yaml, "depth_multiple": 1e9}
    wide_up = copy.deepcopy(model.yaml)
    row = next(r for r in wide_up["head"] if r[2] == "nn.Upsample")
    row[3] = [None, 10_000, "nearest"]
    padded = copy.deepcopy(model.yaml)  # first conv padding 1500: 19M elements, an allowed tensor but no activation
    padded["backbone"][0][3] = [*padded["backbone"][0][3][:3], 1500]
    slow_pool = copy.deepcopy(model.yaml)  # no parameter changes; on the CPU this probe ran for minutes
    row = next(r for r in slow_pool["backbone"] if r[2] == "SPPF")
    row[3] = [row[3][0], 2**31 - 1]
    for name, cfg, match in [("deep", deep, "layer repeats"), ("upsample", wide_up, "tensor of shape"),
                             ("padded", padded, "activation of shape"),
                             ("pool", slow_pool, "max_pool2d costing")]:
        path = save_official(model, tmp_path / f"{name}.pt", attrs={"yaml": cfg})
        t0 = time.perf_counter()
        refused(path, match)
        assert time.perf_counter() - t0 < 30


# ------------------------------------------------------------------------------ storage records
@pytest.mark.parametrize(("pid", "match"), [
    (storage("0", 100), "declares 100 elements"),  # the member holds 8 bytes
    (storage("7", 1), "lacks"),
    (storage("0", -1), "declares"),
    (storage("0", 2**70), "declares"),
    (b"(" + t_("storage") + g_("torch", "FloatStorage") + t_("0") + i_(5) + i_(1) + b"tQ", "malformed"),
    (b"(" + t_("storage") + g_("torch", "FloatStorage") + t_("0") + t_("cpu") + i_(1) + i_(0) + b"tQ", "not a torch"),
    (b"(" + t_("storage") + g_("torch", "Size") + t_("0") + t_("cpu") + i_(1) + b"tQ", "unknown storage type"),
    (b"(" + t_("storage") + g_("torch", "QInt8Storage") + t_("0") + t_("cpu") + i_(1) + b"tQ", "references the global"),
    (b"P../../etc/passwd\n", "not a torch storage"),
])
def test_storage_records_validated(tmp_path: Path, pid: bytes, match: str) -> None:
    path = torch_zip(tmp_path / "s.pt", program(b"}", t_("x"), pid, b"s"), {"0": b"\0" * 8})
    refused(path, match)


def test_storage_record_cannot_be_rebuilt(tmp_path: Path) -> None:
    """BUILD onto the validated storage record (to re-key it to a smaller member) is refused."""
    body = program(b"}", t_("x"), storage("1", 64), b"(" + t_("0") + b"tb", b"s")
    refused(torch_zip(tmp_path / "rekey.pt", body, {"0": b"\0" * 4, "1": b"\0" * 256}), "BUILD onto a storage")


@pytest.mark.parametrize(("offset", "size", "stride"), [
    (0, (3,), (1,)),  # one element more than the storage holds
    (2, (1,), (1,)),
    (0, (10**6, 10**6), (0, 0)),  # a broadcast view: more elements than stored
    (0, (2, 2), (1, 1)),  # overlapping view, 4 elements of 3 distinct
    (0, (1,) * 40, (1,) * 40),  # too many dimensions
    (0, (2, 1), (1,)),  # size and stride of different lengths
])
def test_tensor_views_stay_inside_their_storage(tmp_path: Path, offset: int, size: tuple, stride: tuple) -> None:
    body = program(b"}", t_("t"), tensor(storage("0", 2), offset, size, stride), b"s")
    refused(torch_zip(tmp_path / "t.pt", body, {"0": b"\0" * 8}))


def test_shared_storage_cannot_multiply_a_small_file(tmp_path: Path) -> None:
    """300 tensors viewing one 256 KiB storage would be 75 MiB of tensors: refused."""
    n = 1 << 16
    entries = b"".join(t_(f"t{i}") + tensor(b"h\x01", 0, (n,), (1,)) + b"s" for i in range(300))
    body = program(b"}q\x00", storage("0", n), b"q\x010", entries)
    refused(torch_zip(tmp_path / "shared.pt", body, {"0": b"\0" * 4 * n}), "view more bytes")


def test_legitimate_sharing_is_accepted() -> None:
    """The official fixture shares tensors (Detect.stride, model.stride); that is within the budget."""
    ck = load_checkpoint(CKPT)
    assert ck["stride"] == [8.0, 16.0, 32.0]


# --------------------------------------------------------------------------------- structure
def test_deep_nesting_and_self_containing_modules_refused(tmp_path: Path) -> None:
    deep = program(b"]" * 5000, b"a" * 4999)
    refused(torch_zip(tmp_path / "deep.pt", deep), "nests deeper")
    # a module record whose _modules holds itself
    yaml_dict = b"}(" + t_("nc") + i_(1) + b"u"
    state = b"}(" + t_("yaml") + yaml_dict + t_("_modules") + b"}(" + t_("0") + b"h\x01u" + b"u"
    loop = program(b"}q\x00", t_("model"), g_("models.yolo", "DetectionModel"), b")\x81q\x01", state, b"bs")
    refused(torch_zip(tmp_path / "loop.pt", loop))


@pytest.mark.parametrize("kind", ["deflated", "duplicate", "outside", "no_pickle", "big_endian", "forged_size"])
def test_zip_structure_checks(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.pt"
    body = program(b"}")
    if kind == "deflated":
        torch_zip(path, body, {"0": b"\0" * 64}, compress="data/0")
    elif kind == "big_endian":
        torch_zip(path, body, byteorder=b"big")
    elif kind == "no_pickle":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/version", "3\n")
    else:
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", body)
            if kind == "duplicate":
                with pytest.warns(UserWarning):
                    z.writestr("archive/data.pkl", body)
            elif kind == "outside":
                z.writestr("other/data/0", b"\0" * 8)
            else:
                z.writestr("archive/data/0", b"\0" * 8)
        if kind == "forged_size":  # the central directory claims a 4 GiB member
            raw = bytearray(path.read_bytes())
            k = raw.rfind(b"PK\x01\x02")
            raw[k + 20:k + 28] = struct.pack("<II", 0xFFFFFFF0, 0xFFFFFFF0)
            path.write_bytes(bytes(raw))
    refused(path)


# ------------------------------------------------------------------------------ plain results
def test_paths_and_options_come_back_as_plain_data(tmp_path: Path) -> None:
    model = DetectionModel(tiny_cfg())
    path = save_official(model, tmp_path / "opt.pt", opt={"save_dir": Path("runs/x"), "imgsz": 64})
    raw = load_checkpoint(path)["raw"]
    assert raw["opt"]["save_dir"] == pathlib.PurePosixPath("runs/x")
    assert type(raw["opt"]["save_dir"]) is pathlib.PurePosixPath  # never a concrete, file-touching Path


def test_no_file_is_read_with_torch_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*a, **k):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", forbidden)
    model = DetectionModel(tiny_cfg(), nc=2)
    ours = models.save_checkpoint(our_ckpt(model), tmp_path / "ours.pt")
    assert load_model(ours).nc == 2 and load_model(CKPT).nc == 80


# -------------------------------------------------------------------------------- meta shapes
@pytest.mark.parametrize("cfg", ["yolov5n.yaml", "v50", "tiny"])
def test_meta_build_matches_the_real_build(cfg: str) -> None:
    d = v50_cfg() if cfg == "v50" else tiny_cfg() if cfg == "tiny" else cfg
    meta = meta_state_dict(lambda: DetectionModel(copy.deepcopy(d)))
    real = DetectionModel(copy.deepcopy(d)).state_dict()
    assert {k: (v.shape, v.dtype) for k, v in meta.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}
    assert all(v.is_meta for k, v in meta.items() if k.endswith(".weight"))  # data-made buffers stay on the CPU


@pytest.mark.parametrize("case", [
    ("conv", (1, 8, 17, 23), dict(weight=(4, 8, 3, 3), stride=2, padding=1)),
    ("conv", (2, 6, 16, 16), dict(weight=(6, 2, 5, 1), stride=(1, 2), padding=(2, 0), dilation=2, groups=3)),
    ("pool", (1, 3, 13, 13), dict(kernel_size=5, stride=1, padding=2)),
    ("pool", (1, 3, 13, 13), dict(kernel_size=3, stride=2, ceil_mode=True)),
    ("pool", (1, 3, 10, 11), dict(kernel_size=2)),
    ("up", (1, 3, 7, 5), dict(scale_factor=2.0)),
    ("up", (1, 3, 7, 5), dict(scale_factor=1.5)),
    ("up", (1, 3, 7, 5), dict(size=(9, 4))),
    ("cat", (1, 3, 7, 5), dict(other=(1, 4, 7, 5), dim=1)),
    ("add", (1, 3, 7, 1), dict(other=(1, 5))),
])
def test_shape_rules_agree_with_torch(case: tuple) -> None:
    op, shape, params = case

    def run(device: str) -> torch.Size:
        kw = dict(params)
        x = torch.zeros(shape, device=device)
        if op == "conv":
            return F.conv2d(x, torch.zeros(kw.pop("weight"), device=device), **kw).shape
        if op == "pool":
            return F.max_pool2d(x, **kw).shape
        if op == "up":
            return F.interpolate(x, **kw).shape
        if op == "cat":
            return torch.cat([x, torch.zeros(kw["other"], device=device)], kw["dim"]).shape
        return (x + torch.zeros(kw["other"], device=device)).shape

    expect = run("cpu")
    with ShapesOnly():
        assert run("meta") == expect


@pytest.mark.parametrize("op", [
    lambda d: F.conv2d(torch.zeros(1, 3, 4, 4, device=d), torch.zeros(8, 3, 9, 9, device=d)),  # kernel > input
    lambda d: F.conv2d(torch.zeros(1, 4, 8, 8, device=d), torch.zeros(8, 3, 1, 1, device=d)),  # channels
    lambda d: torch.cat([torch.zeros(1, 3, 8, 8, device=d), torch.zeros(1, 3, 4, 4, device=d)], 1),
    lambda d: F.max_pool2d(torch.zeros(1, 3, 2, 2, device=d), 5),
])
def test_shape_rules_fail_like_torch(op) -> None:
    """Impossible shapes raise RuntimeError on both sides (a stride probe retries on RuntimeError)."""
    with pytest.raises(RuntimeError):
        op("cpu")
    with ShapesOnly(), pytest.raises(RuntimeError):
        op("meta")


def test_shape_check_stays_light(tmp_path: Path) -> None:
    """The meta build uses our shape rules: no torch.fx / sympy import (seconds per process)."""
    code = ("import sys; from models import load_model; load_model(sys.argv[1]); "
            "print(sorted(m for m in ('sympy', 'torch.fx.experimental.symbolic_shapes', 'torch._dynamo') "
            "if m in sys.modules))")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code, str(CKPT)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
