"""Issue 14, defects 1-4: one test each, each failing on the code before the fix.

Only the public API is used here (so the file runs against older code too). Payloads are
hand-written pickle programs aimed at tmp_path only.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import re
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import models
from models import DetectionModel, load_model
from models.checkpoint import CheckpointError
from tests.test_checkpoint import save_official, tiny_cfg

REPO = Path(models.__file__).resolve().parents[1]


# ------------------------------------------------------------------------- pickle program pieces
def t_(s: str) -> bytes:  # BINUNICODE
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def i_(v: int) -> bytes:  # BININT or LONG1
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def g_(module: str, name: str) -> bytes:  # GLOBAL
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def program(*body: bytes) -> bytes:
    return b"\x80\x02" + b"".join(body) + b"."


def storage(key: str, numel: int, kind: str = "FloatStorage") -> bytes:
    """A torch storage persistent id (BINPERSID)."""
    return b"(" + t_("storage") + g_("torch", kind) + t_(key) + t_("cpu") + i_(numel) + b"tQ"


def tensor(pid: bytes, offset: int, size: tuple, stride: tuple) -> bytes:
    tup = b"(" + b"".join(i_(x) for x in size) + b"t", b"(" + b"".join(i_(x) for x in stride) + b"t"
    return (g_("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + i_(offset) + tup[0] + tup[1] + b"\x89"
            + g_("collections", "OrderedDict") + b")Rt" + b"R")


def torch_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None, folder: str = "archive",
              byteorder: bytes = b"little", compress: str = "") -> Path:
    """A file laid out like torch.save's: <folder>/data.pkl, byteorder, data/<key>, version."""
    with zipfile.ZipFile(path, "w") as z:
        for name, data in [("data.pkl", pkl), ("byteorder", byteorder),
                           *((f"data/{k}", v) for k, v in (storages or {}).items()), ("version", b"3\n")]:
            kind = zipfile.ZIP_DEFLATED if name == compress else zipfile.ZIP_STORED
            z.writestr(zipfile.ZipInfo(f"{folder}/{name}", (2024, 1, 1, 0, 0, 0)), data, compress_type=kind)
    return path


def refused(path: Path, match: str = "") -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg, msg
    assert re.search(match, msg), msg
    return msg


# ----------------------------------------------------------------------------------- defect 1
def legacy_patch_payload(target: Path) -> bytes:
    """A legacy (non-zip) torch file whose pickle makes torch's legacy loader write `<target>.patch`.

    BUILD gives the allowed global `_codecs.encode` the attributes `__name__` = target and
    `dump_patches` = True; the persistent id ('module', <that global>, source_file, source) then
    makes torch's loader diff the "source" and append it to `<__name__>.patch`.
    """
    head = b"".join(pickle.dumps(x, protocol=2) for x in (
        0x1950A86A20F9469CFC6C, 1001,
        {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}))
    state = b"N}(" + t_("dump_patches") + b"\x88" + t_("__name__") + t_(str(target)) + b"u\x86"
    body = program(g_("_codecs", "encode"), b"q\x00", state, b"b0",
                   b"(" + t_("module") + b"h\x00" + t_("payload.py") + t_("x = 'written by a checkpoint'\n") + b"tQ")
    return head + body + pickle.dumps([], protocol=2)


def test_defect1_legacy_file_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    path.write_bytes(legacy_patch_payload(target))
    before = sorted(p.name for p in tmp_path.iterdir())
    refused(path, "legacy")
    assert not target.with_suffix(".patch").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ----------------------------------------------------------------------------------- defect 2
@pytest.fixture
def restore_classes():
    """Undo whatever a failing (pre-fix) run did to these classes, so later tests are unaffected."""
    classes = [pathlib.PurePosixPath, pathlib.PurePath, pathlib.PosixPath, pathlib.Path, OrderedDict]
    saved = {c: dict(vars(c)) for c in classes}
    yield saved
    for c, attrs in saved.items():
        for k in set(vars(c)) - set(attrs):
            delattr(c, k)
        for k, v in attrs.items():
            if vars(c).get(k) is not v and k not in ("__dict__", "__weakref__", "__doc__"):
                setattr(c, k, v)


def test_defect2_refused_file_changes_no_global(tmp_path: Path, restore_classes: dict) -> None:
    """BUILD onto allowed globals, then a refused name: afterwards every class is as it was."""
    onto_path = g_("pathlib", "PosixPath") + b"N}" + t_("with_suffix") + g_("pathlib", "PurePosixPath") + b"s\x86b0"
    onto_dict = g_("collections", "OrderedDict") + b"N}" + t_("fromkeys") + b"N" + b"s\x86b0"
    onto_func = g_("torch._utils", "_rebuild_tensor_v2") + b"N}" + t_("__defaults__") + b"(\x88t" + b"s\x86b0"
    for i, body in enumerate([onto_path, onto_dict, onto_func]):
        path = torch_zip(tmp_path / f"b{i}.pt", program(body, g_("os", "system"), b"}"))
        refused(path)
    assert Path("x/best.pt").with_suffix(".onnx") == Path("x/best.onnx")
    assert {c: dict(vars(c)) for c in restore_classes} == restore_classes
    assert torch._utils._rebuild_tensor_v2.__defaults__ == (None,)


# ----------------------------------------------------------------------------------- defect 3
_RSS_SCRIPT = """
import resource, sys
from models import load_model
from models.checkpoint import CheckpointError
load_model(sys.argv[1])  # a clean file first: imports and allocator warm-up are not counted
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_model(sys.argv[2])
    print("LOADED")
except CheckpointError as e:
    print("REFUSED " + str(e).replace(chr(10), "<newline>"))
print("GROWTH_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def peak_growth(clean: Path, hostile: Path) -> tuple[str, float]:
    """(outcome line, peak RSS growth in MiB) of loading `hostile` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(clean), str(hostile)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    return lines[-2], float(lines[-1].split()[1])


def test_defect3_huge_yaml_width_allocates_nothing(tmp_path: Path) -> None:
    """A 1 MB file whose yaml declares width 1e3 (or a merely large 1.0) is refused before any real build."""
    model = DetectionModel(tiny_cfg())
    clean = save_official(model, tmp_path / "clean.pt")
    for width in (1e3, 1.0):  # before the fix: a RuntimeError from the allocator, or a ~190 MB build
        hostile = save_official(model, tmp_path / f"wide{width:g}.pt", attrs={"yaml": {**model.yaml,
                                                                                       "width_multiple": width}})
        assert hostile.stat().st_size < 2 << 20
        outcome, growth = peak_growth(clean, hostile)
        assert outcome.startswith("REFUSED ") and hostile.name in outcome and "<newline>" not in outcome, outcome
        assert "tensor" in outcome and growth < 48, (outcome, growth)


# ----------------------------------------------------------------------------------- defect 4
def test_defect4_requirements_need_torch_2_6() -> None:
    """torch < 2.6 lets a crafted file run code even under torch.load(weights_only=True) (CVE-2025-32434)."""
    text = (REPO / "requirements.txt").read_text()

    def bounds(pkg: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        m = re.search(rf"^{pkg}>=([\d.]+),<=([\d.]+)\s*$", text, re.M)
        assert m, f"{pkg} needs a lower and an upper bound"
        return tuple(map(int, m[1].split("."))), tuple(map(int, m[2].split(".")))

    (t_lo, t_hi), (v_lo, v_hi) = bounds("torch"), bounds("torchvision")
    assert t_lo >= (2, 6) and v_lo >= (0, 21)  # torchvision 0.21 is the release built for torch 2.6
    assert t_hi == (2, 14, 1) and v_hi == (0, 29, 1)
