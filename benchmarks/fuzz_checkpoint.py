"""Fuzz `models.load_model` with mutated checkpoints: it must refuse cleanly or load, nothing else.

Bases: a small model pickled the way YOLOv5 releases are (whole modules, fp16, the global names
`models.yolo.DetectionModel`, `models.common.*`, `torch.nn.modules.*`), one of our `yolo-kd/1`
training checkpoints of it (optimizer, RNG state, options), and with `--fixture` the real
official tests/fixtures/yolov5n_nc80.pt. Mutations (seeded): byte flips, truncations, random
bytes, pickle-program edits on data.pkl (inserted or substituted GLOBAL / STACK_GLOBAL / INST / OBJ /
NEWOBJ calls of dangerous callables, BUILD onto allowed globals, foreign persistent ids, EXT codes,
integer/float/string argument swaps, deleted or repeated opcodes), zip edits (member swaps,
removals, renames, duplicates, compression, forged size fields) and yaml edits (huge widths,
depths, channels, upsampling).

Size: ~670 lines because each mutation family (bytes, pickle program, zip container, yaml) needs its
own small generator and the contract checks (no file written, no global changed, one error type)
must live next to them; splitting would scatter one harness over several files.

Every case runs `load_model` in a private cwd with a private temp dir, under a time limit, and
checks: the outcome is a successful load or `CheckpointError` with a one-line message naming the
file; no file appeared anywhere under the case root (cwd, temp dir, the checkpoint's folder, the
paths the payloads aim at); no attribute of any global the unpickler accepts (nor of the modules
whose classes become records) changed.

    python -m benchmarks.fuzz_checkpoint --cases 20000 --fixture   # writes benchmarks/results/fuzz_checkpoint.*
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import pickletools
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import types
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "yolov5n_nc80.pt"

# Two detection levels, every block kind of a v6+ model; ~70 tensors, so one load takes milliseconds.
MICRO_YAML = {
    "nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0,
    "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]],
    "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "C3", [16]],
                 [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "SPPF", [16, 5]]],
    "head": [[-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 2], 1, "Concat", [1]],
             [-1, 1, "C3", [16, False]], [[7, 4], 1, "Detect", ["nc", "anchors"]]],
}

MAX_GROWTH_MB = 256  # peak RSS growth allowed per case (a clean load of any base needs far less)

DANGEROUS = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
             ("builtins", "open"), ("builtins", "getattr"), ("builtins", "__import__"), ("subprocess", "Popen"),
             ("subprocess", "run"), ("shutil", "rmtree"), ("io", "open"), ("pathlib", "Path"), ("torch", "save"),
             ("torch", "load"), ("numpy", "save"), ("pickle", "loads"), ("importlib", "import_module"),
             ("operator", "attrgetter"), ("functools", "partial"), ("runpy", "run_path"),
             ("torch.serialization", "_check_container_source"), ("sys", "exit"), ("builtins", "setattr")]
# Names the unpickler accepts; BUILD / REDUCE on them must stay inert.
ALLOWED = [("collections", "OrderedDict"), ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
           ("_codecs", "encode"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
           ("torch", "HalfStorage"), ("torch", "Size"), ("copyreg", "_reconstructor"), ("__builtin__", "set"),
           ("models.yolo", "DetectionModel"), ("models.common", "Conv"), ("torch.nn.modules.conv", "Conv2d"),
           ("argparse", "Namespace"), ("numpy", "dtype"), ("torch", "float16"), ("builtins", "object")]


# ------------------------------------------------------------------------------------ bases
def micro_model() -> Any:
    from models.yolo import DetectionModel

    torch.manual_seed(0)
    return DetectionModel(copy.deepcopy(MICRO_YAML))


def official_bytes(model: Any) -> bytes:
    """`model` pickled as a YOLOv5 release: the whole module in fp16, requires_grad False."""
    m = copy.deepcopy(model).half()
    for p in m.parameters():
        p.requires_grad_(False)
    buf = io.BytesIO()
    torch.save({"epoch": -1, "best_fitness": None, "model": m, "ema": None, "updates": None,
                "optimizer": None, "opt": None, "git": None, "date": "2024-01-01"}, buf)
    return buf.getvalue()


def ours_bytes(model: Any) -> bytes:
    """A yolo-kd/1 training checkpoint of `model` (optimizer with momentum, RNG states, options)."""
    import numpy as np

    from models.checkpoint import FORMAT

    # an SGD state_dict as torch.optim writes it (built by hand: importing torch.optim costs seconds)
    params = list(model.parameters())
    optimizer = {"state": {i: {"momentum_buffer": torch.zeros_like(p)} for i, p in enumerate(params)},
                 "param_groups": [{"lr": 0.01, "momentum": 0.9, "dampening": 0, "weight_decay": 0.0,
                                   "nesterov": True, "maximize": False, "foreach": None, "differentiable": False,
                                   "fused": None, "initial_lr": 0.01, "params": list(range(len(params)))}]}
    np_state = np.random.RandomState(0).get_state()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = {"format": FORMAT, "yaml": model.yaml, "model": sd, "ema": {k: v.clone() for k, v in sd.items()},
            "updates": 3, "names": list(model.names), "stride": [float(s) for s in model.stride], "epoch": 0,
            "best_fitness": 0.1, "optimizer": optimizer, "scaler": {"scale": 65536.0, "_growth_tracker": 0},
            "adapters": None, "opt": {"imgsz": 64, "epochs": 3, "data": "x.yaml"}, "hyp": {"lr0": 0.01},
            "rng": {"python": random.Random(0).getstate(),
                    "numpy": {"kind": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                              "pos": int(np_state[2]), "has_gauss": 0, "cached": 0.0},
                    "torch": torch.get_rng_state()},
            "date": "2024-01-01T00:00:00"}
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getvalue()


def bases(fixture: bool) -> dict[str, bytes]:
    model = micro_model()
    out = {"official": official_bytes(model), "ours": ours_bytes(model)}
    if fixture:
        out["fixture"] = FIXTURE.read_bytes()
    return out


# ----------------------------------------------------------------------------- zip plumbing
def members(blob: bytes) -> list[tuple[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return [(i.filename, z.read(i)) for i in z.infolist()]


def rezip(items: list[tuple[str, bytes]], deflate: frozenset[str] = frozenset()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in items:
            info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            with warnings_silenced():
                z.writestr(info, data)
    return buf.getvalue()


@contextlib.contextmanager
def warnings_silenced() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about duplicate names, which we make on purpose
        yield


def pickle_index(items: list[tuple[str, bytes]]) -> int:
    return next(i for i, (n, _) in enumerate(items) if n.endswith("/data.pkl"))


# ------------------------------------------------------------------------ pickle snippets
def _text(s: str) -> bytes:
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(v: int) -> bytes:
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def _glob(mod: str, name: str) -> bytes:
    return b"c" + mod.encode() + b"\n" + name.encode() + b"\n"


def _stack_glob(mod: str, name: str) -> bytes:
    return b"\x8c" + bytes([len(mod)]) + mod.encode() + b"\x8c" + bytes([len(name)]) + name.encode() + b"\x93"


def _args_for(mod: str, name: str, marker: Path) -> bytes:
    """An argument tuple with which the callable would create `marker` (were it ever called)."""
    m = str(marker)
    if name == "system":
        return b"(" + _text(f"touch '{m}'") + b"t"
    if name in ("eval", "exec"):
        return b"(" + _text(f"open({m!r}, 'w').close()") + b"t"
    if name in ("Popen", "run"):
        return b"((" + _text("touch") + _text(m) + b"ltt"
    if name in ("open", "save"):
        return b"(" + _text(m) + _text("w") + b"t"
    return b"(" + _text(m) + b"t"


def call_snippet(rng: random.Random, marker: Path) -> bytes:
    mod, name = rng.choice(DANGEROUS)
    args = _args_for(mod, name, marker)
    form = rng.randrange(5)
    if form == 0:
        return _glob(mod, name) + args + b"R"
    if form == 1:
        return _stack_glob(mod, name) + args + b"R"
    if form == 2:  # INST: MARK args i module\nname\n
        return b"(" + args[1:-1] + b"i" + mod.encode() + b"\n" + name.encode() + b"\n"
    if form == 3:  # OBJ: MARK class args o
        return b"(" + _glob(mod, name) + args[1:-1] + b"o"
    return _glob(mod, name) + args + b"\x81"  # NEWOBJ


def build_snippet(rng: random.Random, marker: Path) -> bytes:
    """BUILD onto an allowed global (class or function), or onto an instance of one."""
    mod, name = rng.choice(ALLOWED)
    attr = rng.choice(["with_suffix", "__name__", "dump_patches", "__defaults__", "__setstate__", "fromkeys",
                       "__module__", "x"])
    value = rng.choice([_text(str(marker)), b"\x88", _glob("pathlib", "PurePosixPath"), b"N", b"(t"])
    state = rng.choice([b"N}" + _text(attr) + value + b"s\x86", b"}" + _text(attr) + value + b"s"])
    target = _glob(mod, name)
    if rng.random() < 0.3:  # an instance made by REDUCE, then BUILD
        target += b")R"
    return target + state + b"b"


def pid_snippet(rng: random.Random, marker: Path) -> bytes:
    """Persistent ids other than a sane storage record."""
    form = rng.randrange(9)
    if form == 8:  # a valid storage record, then BUILD onto it (to re-key it after validation)
        pid = b"(" + _text("storage") + _glob("torch", "HalfStorage") + _text("0") + _text("cpu") + _int(1) + b"tQ"
        return pid + b"(" + _text(rng.choice(["1", "0", "../x"])) + _glob("torch", "HalfStorage") + _int(10**9) + b"tb"
    if form == 0:  # torch's legacy module record (its loader writes <name>.patch)
        body = _text("module") + _glob("_codecs", "encode") + _text(str(marker)) + _text("x = 1\n")
    elif form == 1:
        body = _text("storage") + _glob("torch", "HalfStorage") + _text("0") + _text("cpu") + _int(rng.choice(
            [10**12, 2**62, 2**31, -1]))
    elif form == 2:
        body = _text("storage") + _glob("os", "system") + _text("0") + _text("cpu") + _int(1)
    elif form == 3:
        body = _text("storage") + _glob("torch", "FloatStorage") + _text(rng.choice(["../../x", "999", "", "/"])) \
            + _text("cpu") + _int(1)
    elif form == 4:
        body = _text("storage") + _glob("torch", "FloatStorage") + _int(0) + b"N" + _int(1)
    elif form == 5:
        body = _text("storage") + _glob("torch", "FloatStorage") + _text("0")
    elif form == 6:  # text persistent id (protocol 0)
        return b"P" + str(marker).encode() + b"\n"
    else:
        body = _text("storage") + _glob("torch", "FloatStorage") + _text("0") + _text("cpu") + _int(1) + _int(1)
    return b"(" + body + b"tQ"


def tensor_snippet(rng: random.Random, marker: Path) -> bytes:
    """A tensor record with hostile size/stride/offset over storage 0."""
    size = rng.choice([(10**6, 10**6), (2**31,), (4, 4), ()])
    stride = rng.choice([(0, 0), (1,), (1, 4), (2**40,)])
    offset = rng.choice([0, 10**9, -1])
    tup = lambda xs: b"(" + b"".join(_int(x) for x in xs) + b"t"  # noqa: E731
    pid = b"(" + _text("storage") + _glob("torch", "HalfStorage") + _text("0") + _text("cpu") + _int(1) + b"tQ"
    return (_glob("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + _int(offset) + tup(size) + tup(stride)
            + b"\x89" + _glob("collections", "OrderedDict") + b")Rt" + b"R")


# Each snippet pushes one value; its label says what it is. A dangerous call or a foreign persistent id
# must always end in a refusal, wherever it lands.
SNIPPETS = {"call": call_snippet, "build": build_snippet, "pid": pid_snippet, "tensor": tensor_snippet}
ALWAYS_REFUSED = ("call", "pid")


# ------------------------------------------------------------------------------- mutations
@dataclass
class Case:
    base: str
    kind: str
    seed: int
    blob: bytes = field(repr=False, default=b"")


def _ops(data: bytes) -> list[tuple[str, Any, int, int]]:
    """(opcode name, argument, start, end) of each opcode of a pickle program."""
    out = []
    ops = list(pickletools.genops(data))
    for i, (op, arg, pos) in enumerate(ops):
        end = ops[i + 1][2] if i + 1 < len(ops) else len(data)
        out.append((op.name, arg, pos, end))
    return out


def _with_pickle(items: list[tuple[str, bytes]], data: bytes) -> bytes:
    items = list(items)
    k = pickle_index(items)
    items[k] = (items[k][0], data)
    return rezip(items)


def mutate_pickle(rng: random.Random, items: list[tuple[str, bytes]], ops: list, marker: Path) -> tuple[str, bytes]:
    data = items[pickle_index(items)][1]
    body = [o for o in ops if o[0] not in ("PROTO", "STOP")]
    op = rng.choice(body)
    choice = rng.randrange(9)
    label = rng.choice(sorted(SNIPPETS))
    if choice <= 1:  # insert a hostile value between two opcodes, then drop it (POP)
        return f"insert:{label}", data[:op[2]] + SNIPPETS[label](rng, marker) + b"0" + data[op[2]:]
    if choice == 2:  # add it to the top-level dict (before STOP), so that it is reached and thawed
        stop = ops[-1][2]
        entry = _text("fuzz") + SNIPPETS[label](rng, marker) + b"s"
        return f"entry:{label}", data[:stop] + entry + data[stop:]
    if choice == 3:  # replace an opcode by it
        return f"replace:{label}", data[:op[2]] + SNIPPETS[label](rng, marker) + data[op[3]:]
    if choice == 4:  # swap a GLOBAL's name
        globs = [o for o in ops if o[0] == "GLOBAL"]
        g = rng.choice(globs)
        mod, name = rng.choice(DANGEROUS + ALLOWED)
        label = "call" if (mod, name) in DANGEROUS else "allowed"
        return f"swap_global:{label}", data[:g[2]] + _glob(mod, name) + data[g[3]:]
    if choice == 5:  # integer argument to an extreme
        ints = [o for o in ops if o[0] in ("BININT1", "BININT2", "BININT", "LONG1")] or [op]
        o = rng.choice(ints)
        v = rng.choice([0, -1, 1, 2**31 - 1, -(2**31), 2**40, 10**12, 2**64, 255, 65536])
        return "int_arg", data[:o[2]] + _int(v) + data[o[3]:]
    if choice == 6:  # float argument (widths, depths, strides) to an extreme
        floats = [o for o in ops if o[0] == "BINFLOAT"] or [op]
        o = rng.choice(floats)
        v = rng.choice([1e3, 1e9, float("nan"), float("inf"), -1.0, 0.0, 1e-9, 64.0])
        return "float_arg", data[:o[2]] + b"G" + struct.pack(">d", v) + data[o[3]:]
    if choice == 7:  # delete or repeat a span of opcodes
        j = rng.randrange(len(ops))
        a, b = sorted((op[2], ops[min(j, len(ops) - 1)][3]))
        b = min(b, a + 64)
        if rng.random() < 0.5:
            return "delete_ops", data[:a] + data[b:]
        return "repeat_ops", data[:b] + data[a:b] + data[b:]
    extra = rng.choice([b"\x82\x01", b"\x83\x01\x00", b"\x84\x01\x00\x00\x00", b"0", b"1", b"2", b"(", b"t",
                        b"R", b"b", b"s", b"u", b"a", b"e", b"\x94", b"Q", b"\x95" + b"\xff" * 8,
                        b"\x8e" + b"\xff" * 8])
    return f"opcode:{extra[:1]!r}", data[:op[2]] + extra + data[op[2]:]


def mutate_yaml(rng: random.Random, blob: bytes, items: list[tuple[str, bytes]], ops: list) -> tuple[str, bytes]:
    """Edit the model yaml inside the pickle via its argument opcodes (width/depth/channels/upsampling)."""
    data = items[pickle_index(items)][1]
    keys = {"width_multiple": [1e3, 16.0, 64.0], "depth_multiple": [1e3, 64.0, 1e9], "nc": [10**6, 10**5, 0, -3]}
    hits = [(i, o) for i, o in enumerate(ops[:-1]) if o[0] in ("BINUNICODE", "SHORT_BINUNICODE") and o[1] in keys]
    if hits and rng.random() < 0.7:
        i, o = rng.choice(hits)
        nxt = ops[i + 1] if ops[i + 1][0] not in ("BINPUT", "LONG_BINPUT") else ops[i + 2]
        v = rng.choice(keys[o[1]])
        enc = b"G" + struct.pack(">d", v) if isinstance(v, float) else _int(v)
        return f"yaml:{o[1]}", _with_pickle(items, data[:nxt[2]] + enc + data[nxt[3]:])
    # channel / repeat / scale numbers inside the layer rows: any small BININT1 after 'backbone'
    start = next((o[2] for o in ops if o[1] == "backbone"), 0)
    small = [o for o in ops if o[0] == "BININT1" and o[2] > start][:200]
    if not small:
        return "yaml:none", blob
    o = rng.choice(small)
    return "yaml:int", _with_pickle(items, data[:o[2]] + _int(rng.choice([10**4, 10**6, 2**31 - 1, 0])) + data[o[3]:])


def mutate_zip(rng: random.Random, blob: bytes) -> tuple[str, bytes]:
    items = members(blob)
    choice = rng.randrange(9)
    i, j = rng.randrange(len(items)), rng.randrange(len(items))
    if choice == 0:
        a, b = items[i][1], items[j][1]
        items[i], items[j] = (items[i][0], b), (items[j][0], a)
        return "zip:swap", rezip(items)
    if choice == 1:
        del items[i]
        return "zip:remove", rezip(items)
    if choice == 2:
        name = items[i][0]
        new = rng.choice([name + "x", name.replace("/data/", "/data/0"), "other/" + name.split("/", 1)[-1],
                          name.replace("data.pkl", "data.pk"), "../" + name, name.upper()])
        items[i] = (new, items[i][1])
        return "zip:rename", rezip(items)
    if choice == 3:
        items.append(items[i])
        return "zip:duplicate", rezip(items)
    if choice == 4:
        return "zip:deflate", rezip(items, deflate=frozenset({items[i][0]}))
    if choice == 5:
        name, data = items[i]
        items[i] = (name, data[: rng.randrange(len(data) + 1)] if rng.random() < 0.5 else data + b"\0" * 64)
        return "zip:resize_member", rezip(items)
    if choice == 6:
        rng.shuffle(items)
        return "zip:reorder", rezip(items)
    # forge size fields of a central-directory or local header: sizes far beyond the file
    raw = bytearray(blob)
    sig = rng.choice([b"PK\x01\x02", b"PK\x03\x04"])
    spots = [k for k in range(len(raw)) if raw.startswith(sig, k)] if len(raw) < 1 << 20 else []
    if not spots:
        spots = [raw.find(sig)] if raw.find(sig) >= 0 else [0]
    k = rng.choice(spots)
    off = (20 if sig == b"PK\x01\x02" else 18) + rng.choice([0, 4])
    if k + off + 4 <= len(raw):
        raw[k + off:k + off + 4] = struct.pack("<I", rng.choice([0xFFFFFFFF, 2**31, 10**9, 1]))
    return "zip:forge_size", bytes(raw)


def mutate_bytes(rng: random.Random, blob: bytes) -> tuple[str, bytes]:
    raw = bytearray(blob)
    choice = rng.randrange(4)
    if choice == 0:
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return "bytes:flip", bytes(raw)
    if choice == 1:
        return "bytes:truncate", bytes(raw[: rng.randrange(len(raw))])
    if choice == 2:
        k = rng.randrange(len(raw))
        return "bytes:insert", bytes(raw[:k] + bytes(rng.randrange(256) for _ in range(rng.randint(1, 32))) + raw[k:])
    k = rng.randrange(len(raw))
    raw[k:k + 256] = b"\0" * len(raw[k:k + 256])
    return "bytes:zero", bytes(raw)


def make_case(base: str, blob: bytes, seed: int, marker: Path, cache: dict) -> Case:
    rng = random.Random(seed)
    family = rng.choices(["pickle", "zip", "bytes", "yaml"], weights=[5, 2, 2, 1])[0]
    if base not in cache:  # the base's members and pickle opcodes, parsed once
        items = members(blob)
        cache[base] = (items, _ops(items[pickle_index(items)][1]))
    items, ops = cache[base]
    if family == "pickle":
        kind, data = mutate_pickle(rng, items, ops, marker)
        return Case(base, kind, seed, _with_pickle(items, data))
    if family == "yaml":
        kind, out = mutate_yaml(rng, blob, items, ops)
    else:
        kind, out = {"zip": mutate_zip, "bytes": mutate_bytes}[family](rng, blob)
    return Case(base, kind, seed, out)


# ----------------------------------------------------------------------------- invariants
def _watched_objects() -> dict[str, Any]:
    """Every global the unpickler could name that is loaded here, the record modules and their classes."""
    from models.torch_zip import RECORD_PREFIXES, nameable_globals

    objs: dict[str, Any] = {}
    for full in nameable_globals():
        mod, _, name = full.rpartition(".")
        owner = sys.modules.get(mod)
        if owner is not None and hasattr(owner, name):
            objs[full] = getattr(owner, name)
    watched_modules = [m for m in list(sys.modules) if m.startswith(RECORD_PREFIXES)
                       or m in ("collections", "pathlib", "_codecs", "copyreg", "argparse", "torch._utils",
                                "torch._tensor", "models.torch_zip", "models.checkpoint", "models.meta_shapes")]
    for m in watched_modules:
        mod = sys.modules[m]
        objs[m] = mod
        for k, v in list(vars(mod).items()):
            if isinstance(v, (type, types.FunctionType)):
                objs[f"{m}.{k}"] = v
    return objs


_FUNC_SLOTS = ("__name__", "__qualname__", "__defaults__", "__kwdefaults__", "__code__", "__module__")


def snapshot(objs: dict[str, Any]) -> dict[str, tuple]:
    """(attribute names, value identities, function slot identities) of every watched object."""
    out = {}
    for key, obj in objs.items():
        d = getattr(obj, "__dict__", None) or {}
        slots = tuple(id(getattr(obj, k)) for k in _FUNC_SLOTS) if isinstance(obj, types.FunctionType) else ()
        out[key] = (tuple(d), tuple(map(id, d.values())), slots)
    return out


def _changed(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    """Watched objects whose attributes differ (a module's `__warningregistry__`, which warnings add, aside)."""

    def attrs(entry: tuple) -> tuple[dict, tuple]:
        names, ids, slots = entry
        return {n: i for n, i in zip(names, ids) if n != "__warningregistry__"}, slots

    return [k for k, was in before.items() if after.get(k) != was and attrs(after[k]) != attrs(was)]


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


class CaseTimeoutError(BaseException):
    """A BaseException, so that no `except Exception` inside the loader can turn it into a refusal."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise CaseTimeoutError in this (main) thread after `seconds` (SIGALRM; no-op elsewhere)."""
    if not hasattr(signal, "setitimer") or os.name != "posix":
        yield
        return

    def alarm(signum, frame):
        raise CaseTimeoutError(f"case exceeded {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Outcome:
    case: Case
    result: str  # 'loaded' | 'refused' | 'escaped:<type>' | 'timeout'
    seconds: float
    problems: list[str]


def run_case(case: Case, root: Path, limit_s: float, objs: dict[str, Any], before: dict[str, tuple]) -> Outcome:
    """Load one mutated file (cwd must be root/cwd) and check every invariant of the module docstring."""
    from models import load_model
    from models.checkpoint import CheckpointError

    path = root / "ckpt" / "case.pt"
    path.write_bytes(case.blob)
    files = listing(root)
    problems: list[str] = []
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    try:
        with time_limit(limit_s):
            load_model(path)
        result = "loaded"
    except CheckpointError as e:
        result = "refused"
        msg = str(e)
        if "\n" in msg or str(path) not in msg:
            problems.append(f"message not one line naming the file: {msg[:200]!r}")
    except CaseTimeoutError:
        result = "timeout"
        problems.append(f"no answer within {limit_s} s")
    except Exception as e:  # the contract under test: nothing else may escape
        result = f"escaped:{type(e).__name__}"
        problems.append(f"{type(e).__name__}: {str(e)[:200]}")
    seconds = time.perf_counter() - t0
    if seconds > limit_s and result != "timeout":  # the alarm waits for long C calls to return
        problems.append(f"took {seconds:.1f} s (limit {limit_s} s)")
    if result == "loaded" and case.kind.rsplit(":", 1)[-1] in ALWAYS_REFUSED:
        problems.append("a file naming a dangerous global or a foreign persistent id was accepted")
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0) / 1024  # ru_maxrss is in KiB
    if grew_mb > MAX_GROWTH_MB:
        problems.append(f"peak memory grew by {grew_mb:.0f} MiB")
    new = listing(root) - files
    if new:
        problems.append(f"files appeared: {sorted(new)[:5]}")
    if Path.cwd() != root / "cwd":
        problems.append(f"cwd changed to {Path.cwd()}")
    changed = _changed(before, snapshot(objs))
    if changed:
        problems.append(f"globals changed: {changed[:5]}")
    path.unlink()
    return Outcome(case, result, seconds, problems)


@contextlib.contextmanager
def sandbox(root: Path) -> Iterator[None]:
    """cwd = root/cwd, tempfile's directory = root/tmp, for the duration."""
    for sub in ("cwd", "tmp", "ckpt"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    old_cwd, old_tmp = Path.cwd(), tempfile.tempdir
    os.chdir(root / "cwd")
    tempfile.tempdir = str(root / "tmp")
    try:
        yield
    finally:
        os.chdir(old_cwd)
        tempfile.tempdir = old_tmp


def fuzz(cases: int, seed: int, root: Path, fixture: bool = False, limit_s: float = 20.0,
         fixture_share: float = 0.05, log: bool = False) -> dict:
    """Run `cases` mutations; returns the summary (counts per outcome and mutation kind, problems)."""
    blobs = bases(fixture)
    rng = random.Random(seed)
    marker = root / "pwned"
    outcomes: list[Outcome] = []
    cache: dict = {}
    with sandbox(root):
        # one clean load of each base first: it must succeed, and it imports what loading needs
        from models import load_model

        for blob in blobs.values():
            (root / "ckpt" / "base.pt").write_bytes(blob)
            load_model(root / "ckpt" / "base.pt")
            (root / "ckpt" / "base.pt").unlink()
        objs = _watched_objects()
        before = snapshot(objs)
        names = [n for n in blobs if n != "fixture"]
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(cases):
            base = "fixture" if fixture and rng.random() < fixture_share else rng.choice(names)
            case = make_case(base, blobs[base], rng.getrandbits(32), marker, cache)
            if log:
                print(f"case {len(outcomes)}: {case.base} {case.kind} {case.seed}", file=sys.stderr, flush=True)
            outcomes.append(run_case(case, root, limit_s, objs, before))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    summary = summarise(outcomes, seed, wall)
    summary["cpu_s"] = round(cpu, 2)
    return summary


def summarise(outcomes: list[Outcome], seed: int, wall: float) -> dict:
    by_result = Counter(o.result for o in outcomes)
    by_kind: dict[str, Counter] = {}
    by_full_kind: dict[str, Counter] = {}
    for o in outcomes:
        by_kind.setdefault(o.case.kind.split(":")[0], Counter())[o.result] += 1
        by_full_kind.setdefault(o.case.kind, Counter())[o.result] += 1
    bad = [o for o in outcomes if o.problems]
    slowest = max(outcomes, key=lambda o: o.seconds) if outcomes else None
    return {
        "cases": len(outcomes), "seed": seed, "wall_s": round(wall, 2),
        "per_case_ms_mean": round(1000 * wall / max(len(outcomes), 1), 2),
        "slowest_case_s": round(slowest.seconds, 3) if slowest else 0.0,
        "slowest_case": f"{slowest.case.base}/{slowest.case.kind}/{slowest.case.seed}" if slowest else "",
        "results": dict(by_result), "by_family": {k: dict(v) for k, v in sorted(by_kind.items())},
        "kinds": {k: dict(v) for k, v in sorted(by_full_kind.items())},
        "bases": dict(Counter(o.case.base for o in outcomes)),
        "failures": [{"base": o.case.base, "kind": o.case.kind, "seed": o.case.seed, "result": o.result,
                      "problems": o.problems} for o in bad[:50]],
        "n_failures": len(bad),
    }


def replay(base: str, seed: int, root: Path) -> Outcome:
    """Re-run one case (as printed in a failure: base/kind/seed) for debugging."""
    blobs = bases(base == "fixture")
    with sandbox(root):
        case = make_case(base, blobs[base], seed, root / "pwned", {})
        objs = _watched_objects()
        return run_case(case, root, 60.0, objs, snapshot(objs))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=20000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixture", action="store_true", help="also mutate the real official yolov5n fixture")
    p.add_argument("--limit", type=float, default=20.0, help="seconds allowed per case")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--log", action="store_true", help="print each case before running it (to find a crash)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="fuzz-ckpt-") as tmp:
        summary = fuzz(args.cases, args.seed, Path(tmp), fixture=args.fixture, limit_s=args.limit, log=args.log)
    summary["machine"] = {"cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
                          "torch_threads": torch.get_num_threads()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fuzz_checkpoint.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# Checkpoint fuzzing: {summary['cases']} cases, seed {args.seed}", "",
             f"{summary['n_failures']} cases broke the contract; wall {summary['wall_s']} s, CPU {summary['cpu_s']} s "
             f"({summary['per_case_ms_mean']} ms/case, slowest {summary['slowest_case_s']} s).", "",
             "| family | " + " | ".join(sorted(summary["results"])) + " |",
             "|---|" + "---|" * len(summary["results"])]
    for fam, counts in summary["by_family"].items():
        lines.append(f"| {fam} | " + " | ".join(str(counts.get(r, 0)) for r in sorted(summary["results"])) + " |")
    (args.out / "fuzz_checkpoint.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    sys.exit(1 if main()["n_failures"] else 0)
