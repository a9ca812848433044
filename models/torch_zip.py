"""Read a torch zip checkpoint without `torch.load` and without running anything the file names.

A `torch.save` file is a zip archive: `<folder>/data.pkl` (a pickle program) and one member
`<folder>/data/<key>` of raw bytes per tensor storage. Reading it takes three separate steps, and
no step hands the file's pickle program a live object of this process:

1. `_index`: the zip's table of contents is checked: one top-level folder, no duplicate or
   compressed members (torch never compresses), every member inside the file's real length, so
   that no declared size can ask for more memory than the file holds.
2. `_InertUnpickler`: the C unpickler with a `find_class` that answers every allowed name with a
   fresh stand-in class made for this load only (a `_Stub` subclass) and refuses every other
   name. Calling a stand-in (REDUCE, NEWOBJ, INST, OBJ) only records the arguments; BUILD stores
   the state on the stand-in *instance* (BUILD onto a stand-in *class* fails: its `__setstate__`
   is an unbound function), SETITEM(S) and APPEND(S) record items. `persistent_load` accepts only
   torch storage records `('storage', <storage type>, key, location, numel)` whose key names a
   member large enough for numel elements, and answers with an immutable `StorageRef`.
   The result is a tree of builtins, stand-ins and storage references: plain data.
3. `_Thaw`: walks that tree. Stand-ins of an allow-list of constructors become values (tensors
   from our own read of the storage members, viewed with validated size/stride/offset; dicts for
   OrderedDict; sets; bytes; torch.Size/dtype; numpy arrays of plain numeric dtypes; pure paths).
   Stand-ins of YOLOv5 and `torch.nn` classes become `Record`s (global name, arguments, state).

Memory is bounded by the file: storages are read only after the checks above, tensors may not
view more elements than their storage holds, and all tensors together may view at most twice the
bytes the storage members hold (so shared storages cannot multiply a small file). The pickle
program is capped at `MAX_PICKLE_BYTES`; unpickling is linear in its length.

Size: the three steps above are one security boundary (what may run, how much memory a file may
ask for); keeping them in one file keeps every check of that boundary in one review.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import pickle
import re
import types
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

MAX_PICKLE_BYTES = 8 << 20  # official files hold < 0.5 MiB of pickle; the cap bounds object counts
MAX_MEMBERS = 1 << 16
MAX_DEPTH = 100  # container nesting; an official file nests ~25 deep
MAX_NDIM = 32
_BIG = 1 << 62  # no size, stride, offset or count in a real file comes near; bounds big-int arithmetic
_PICKLE_AMPLIFICATION = 2  # all tensors may view at most this many times the stored bytes (+1 MiB)

# Module paths whose classes become `Record`s: YOLOv5's own (also under the pip package's
# `yolov5.` prefix) and torch.nn layers.
RECORD_PREFIXES = ("models.", "yolov5.models.", "torch.nn.modules.")

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_DEVICE = re.compile(r"[a-z]{2,16}(:\d{1,4})?")
_MODULE_RENAMES = {"torch.tensor": "torch._tensor", "numpy._core": "numpy.core"}


class ReadError(ValueError):
    """The file is not a torch zip checkpoint that can be read without trusting it (no path in the text)."""


# ------------------------------------------------------------------------------- plain data out
class Record:
    """Plain data for an object the pickle described: the global it named, call arguments, state.

    Never the real class: `global_name` is only a string. `state` is what BUILD gave (for a
    pickled `nn.Module`, its `__dict__`: `_parameters`, `_buffers`, `_modules`, attributes);
    `items` are (key, value) pairs that SETITEM(S) added.
    """

    __slots__ = ("global_name", "args", "state", "items")

    def __init__(self, global_name: str, args: tuple = (), state: Any = None, items: tuple = ()) -> None:
        self.global_name = global_name
        self.args = args
        self.state = state
        self.items = items

    @property
    def type_name(self) -> str:
        """The class name without its module, e.g. 'Conv'."""
        return self.global_name.rsplit(".", 1)[-1]

    def get(self, key: str, default: Any = None) -> Any:
        """An attribute of the pickled object (an entry of its state dict)."""
        return self.state.get(key, default) if isinstance(self.state, dict) else default

    def __repr__(self) -> str:
        return f"Record({self.global_name})"


@dataclass(frozen=True)
class GlobalRef:
    """A global the pickle mentioned as a value (e.g. a class passed as an argument), by name only."""

    name: str


class StorageRef:
    """A validated torch storage record: `numel` elements of `dtype` in zip member `data/<key>`.

    The pickle machine holds these (persistent_load returns them), so they refuse every change:
    no attribute assignment, and BUILD (`__setstate__`) fails. (A frozen slots dataclass would
    not do: its generated `__setstate__` rewrites the fields.)
    """

    __slots__ = ("key", "dtype", "numel")

    def __init__(self, key: str, dtype: torch.dtype, numel: int) -> None:
        for name, value in (("key", key), ("dtype", dtype), ("numel", numel)):
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a storage record cannot change")

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD onto a storage record")

    def __repr__(self) -> str:
        return f"StorageRef({self.key!r}, {self.dtype}, {self.numel})"


# ------------------------------------------------------------------------------- the stand-ins
class _Stub:
    """Base of the per-load stand-in classes the pickle machine receives instead of any global.

    Instances only record what the pickle does to them. Subclasses are made per load by
    `_InertUnpickler.find_class` and carry the global's name in `_name`.
    """

    __slots__ = ("_args", "_state", "_items", "_built")
    _name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Stub:
        if kwargs:
            raise pickle.UnpicklingError(f"keyword arguments for {cls._name}")
        obj = object.__new__(cls)
        obj._args, obj._state, obj._items, obj._built = args, None, [], False
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # __new__ recorded the arguments

    def __setstate__(self, state: Any) -> None:
        if self._built:
            raise pickle.UnpicklingError(f"second BUILD on {self._name}")
        self._state, self._built = state, True

    def __setitem__(self, key: Any, value: Any) -> None:
        self._items.append((key, value))


# storage type -> element dtype (torch's legacy typed-storage names; UntypedStorage holds bytes)
_STORAGE_DTYPES = {
    "torch.HalfStorage": torch.float16, "torch.FloatStorage": torch.float32,
    "torch.DoubleStorage": torch.float64, "torch.BFloat16Storage": torch.bfloat16,
    "torch.ByteStorage": torch.uint8, "torch.CharStorage": torch.int8, "torch.ShortStorage": torch.int16,
    "torch.IntStorage": torch.int32, "torch.LongStorage": torch.int64, "torch.BoolStorage": torch.bool,
    "torch.ComplexFloatStorage": torch.complex64, "torch.ComplexDoubleStorage": torch.complex128,
    "torch.UntypedStorage": torch.uint8, "torch.storage.UntypedStorage": torch.uint8,
}

_NUMPY_DTYPES = frozenset({"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"})


@lru_cache(maxsize=1)
def _torch_constants() -> dict[str, Any]:
    """`torch.<name>` dtypes, layouts and memory formats (immutable singletons), read from vars(torch)."""
    kinds = (torch.dtype, torch.layout, torch.memory_format)
    return {f"torch.{k}": v for k, v in vars(torch).items() if isinstance(v, kinds)}


def _canonical(module: str, name: str) -> str:
    """'module.name' after Python 2 -> 3 renames (protocol-2 pickles say '__builtin__', 'copy_reg')."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    for old, new in _MODULE_RENAMES.items():
        if module == old or module.startswith(old + "."):
            module = new + module[len(old):]
    return f"{module}.{name}"


# ----------------------------------------------------------------------------------- step 1: zip
def _index(zf: zipfile.ZipFile, file_len: int) -> dict[str, zipfile.ZipInfo]:
    """{name inside the archive folder: member}, after the structural checks of the module docstring."""
    infos = zf.infolist()
    if not infos:
        raise ReadError("empty zip archive")
    if len(infos) > MAX_MEMBERS:
        raise ReadError(f"zip archive has {len(infos)} members")
    folder = infos[0].filename.split("/", 1)[0] + "/"
    members: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        name = info.filename
        if not name.startswith(folder) or name == folder:
            raise ReadError(f"zip member {name[:80]!r} is outside the archive folder {folder[:80]!r}")
        if name[len(folder):] in members:
            raise ReadError(f"zip member {name[:80]!r} is listed twice")
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
            raise ReadError(f"zip member {name[:80]!r} is compressed or encrypted (torch stores members as is)")
        if info.file_size != info.compress_size or info.header_offset + info.compress_size > file_len:
            raise ReadError(f"zip member {name[:80]!r} claims more bytes than the file holds")
        members[name[len(folder):]] = info
    if "data.pkl" not in members:
        raise ReadError("no data.pkl in the zip archive (not a torch checkpoint)")
    order = members.get("byteorder")
    if order is not None and (order.file_size > 16 or zf.read(order).strip() != b"little"):
        raise ReadError("tensor data is not little-endian")
    return members


# ------------------------------------------------------------------------------ step 2: unpickle
class _InertUnpickler(pickle._Unpickler):
    """The pickle machine of step 2: stand-ins for allowed names, refusal for every other name.

    The pure-Python unpickler, not the C one: the C unpickler sizes its memo array from the index
    a PUT opcode names and zeroes it, so a 9-byte pickle (`LONG_BINPUT 2**28`) costs 4 GiB; here
    the memo is a dict. It also reads counted strings without preallocating their declared size.
    """

    def __init__(self, data: bytes, members: dict[str, zipfile.ZipInfo]) -> None:
        super().__init__(io.BytesIO(data))
        self._members = members
        self._classes: dict[str, type[_Stub]] = {}

    def find_class(self, module: str, name: str) -> type[_Stub]:
        full = _canonical(str(module), str(name))
        if len(full) > 200 or not _DOTTED.fullmatch(full) or not _nameable(full):
            shown = full[:120] if _DOTTED.fullmatch(full[:120]) else ascii(full[:60])
            raise ReadError(f"refusing to load, the file references the global '{shown}', which a "
                            "model checkpoint never needs (the file may be malicious)")
        cls = self._classes.get(full)
        if cls is None:
            cls = self._classes[full] = type("Stub", (_Stub,), {"__slots__": (), "_name": full})
        return cls

    def persistent_load(self, pid: Any) -> StorageRef:
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            head = pid[0] if type(pid) is tuple and pid and type(pid[0]) is str else type(pid).__name__
            raise ReadError(f"refusing to load, persistent id {head[:40]!r} is not a torch storage record")
        _, kind, key, location, numel = pid
        dtype = _STORAGE_DTYPES.get(kind._name) if isinstance(kind, type) and issubclass(kind, _Stub) else None
        if dtype is None:
            raise ReadError("storage record with an unknown storage type")
        if type(key) is not str or type(location) is not str or len(location) > 64:
            raise ReadError("storage record with a malformed key or location")
        member = self._members.get(f"data/{key}")
        if member is None:
            raise ReadError(f"storage record names data/{key[:40]!r}, which the archive lacks")
        if type(numel) is not int or not 0 <= numel < _BIG or numel * dtype.itemsize > member.file_size:
            shown = numel if type(numel) is int and abs(numel) < _BIG else "?"
            raise ReadError(f"storage data/{key[:40]!r} declares {shown} elements "
                            f"of {dtype}, its member holds {member.file_size} bytes")
        return StorageRef(key, dtype, numel)


def _nameable(full: str) -> bool:
    """Names the pickle may mention: step 3 knows what each of them stands for."""
    return (full in _BUILDERS or full in _STORAGE_DTYPES or full in _torch_constants() or full in _PLAIN_NAMES
            or full.startswith(RECORD_PREFIXES) or _is_numpy_dtype_class(full))


def _is_numpy_dtype_class(full: str) -> bool:
    return full.startswith("numpy.dtypes.") and full.endswith("DType")


# Names that only ever appear as values (argument of a rebuild function, base of _reconstructor).
_PLAIN_NAMES = frozenset({"builtins.object", "torch.Tensor", "torch.nn.parameter.Parameter", "numpy.ndarray"})


# --------------------------------------------------------------------------------- step 3: thaw
_ATOMS = frozenset({type(None), bool, int, float, complex, str, bytes, StorageRef})


class _Thaw:
    """Turns the stand-in tree into plain data and real values (see the module docstring, step 3)."""

    def __init__(self, zf: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo]) -> None:
        self._zf, self._members = zf, members
        self._memo: dict[int, Any] = {}
        self._bytes: dict[str, torch.Tensor] = {}  # storage key -> its member's bytes (uint8)
        stored = sum(i.file_size for n, i in members.items() if n.startswith("data/"))
        self._view_budget = _PICKLE_AMPLIFICATION * stored + (1 << 20)

    def value(self, obj: Any, depth: int = 0) -> Any:
        kind = type(obj)
        if kind in _ATOMS:
            return obj
        if depth > MAX_DEPTH:
            raise ReadError(f"pickled data nests deeper than {MAX_DEPTH} levels")
        memo = self._memo
        done = memo.get(id(obj), memo)
        if done is not memo:
            return done
        depth += 1
        if kind is list:  # registered before its items: a list may contain itself
            items: list = []
            memo[id(obj)] = items
            items.extend([self.value(v, depth) for v in obj])
            return items
        if kind is dict:
            entries: dict = {}
            memo[id(obj)] = entries
            for k, v in obj.items():
                entries[self.value(k, depth)] = self.value(v, depth)
            return entries
        out: Any
        if kind is tuple or kind is set or kind is frozenset:
            out = kind([self.value(v, depth) for v in obj])
        elif kind is bytearray:
            out = bytearray(obj)
        elif isinstance(obj, _Stub):
            out = self._instance(obj, depth)
        elif isinstance(obj, type) and issubclass(obj, _Stub):
            out = self._constant(obj._name)
        else:
            raise ReadError(f"unexpected {kind.__name__} object in the pickle")
        memo[id(obj)] = out
        return out

    @staticmethod
    def _constant(name: str) -> Any:
        const = _torch_constants().get(name)
        return const if const is not None else GlobalRef(name)

    def _instance(self, stub: _Stub, depth: int) -> Any:
        name = type(stub)._name
        if name == "collections.OrderedDict" and not stub._args and not stub._items and stub._state is None:
            return {}  # the empty hook dicts every pickled module carries (most instances of a file)
        args = self.value(stub._args, depth)
        state = self.value(stub._state, depth)
        items = tuple([(self.value(k, depth), self.value(v, depth)) for k, v in stub._items])
        build = _BUILDERS.get(name)
        if build is not None:
            return build(self, args, state, items)
        if name.startswith(RECORD_PREFIXES):
            return Record(name, args, state, items)
        raise ReadError(f"the pickle calls '{name}', which only names a value")

    # ---------------------------------------------------------------------------- tensors
    def tensor(self, ref: Any, offset: Any, size: Any, stride: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`ref`'s storage viewed as `dtype` with size/stride/offset in elements, after bounds checks."""
        if type(ref) is not StorageRef:
            raise ReadError("tensor without a storage")
        if dtype is None:
            dtype = ref.dtype
        elif ref.dtype is not torch.uint8 or not isinstance(dtype, torch.dtype):
            raise ReadError("typed tensor over a typed storage")
        itemsize = dtype.itemsize
        avail = ref.numel * ref.dtype.itemsize // itemsize
        size, stride = _int_tuple(size, "size"), _int_tuple(stride, "stride")
        if type(offset) is not int or not 0 <= offset < _BIG or len(size) != len(stride):
            raise ReadError("tensor with a malformed offset or stride")
        numel = math.prod(size)
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if numel else offset
        if end > avail or numel > avail:
            raise ReadError(f"tensor of shape {size[:8]} does not fit its storage of {avail} elements")
        self._view_budget -= numel * itemsize
        if self._view_budget < 0:
            raise ReadError("tensors view more bytes than the archive stores (shared storages)")
        flat = self._storage_bytes(ref)[: avail * itemsize]
        typed = flat.ne(0) if dtype is torch.bool else flat.view(dtype)
        return torch.as_strided(typed, size, stride, offset)

    def _storage_bytes(self, ref: StorageRef) -> torch.Tensor:
        """The member's bytes, read once per storage (its size was checked against the file)."""
        data = self._bytes.get(ref.key)
        if data is None:
            info = self._members[f"data/{ref.key}"]
            data = torch.empty(info.file_size, dtype=torch.uint8)
            view, got = memoryview(data.numpy()), 0
            with self._zf.open(info) as f:
                while got < len(view):
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
                if got != info.file_size or f.read(1):
                    raise ReadError(f"storage member data/{ref.key[:40]!r} is truncated")
            self._bytes[ref.key] = data
        return data


def _int_tuple(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, (tuple, list)) or len(v) > MAX_NDIM or any(type(x) is not int or not 0 <= x < _BIG for x in v):
        raise ReadError(f"tensor {what} is not a tuple of non-negative integers")
    return tuple(v)


# ---------------------------------------------------------------------------- allowed builders
def _no_state(name: str, state: Any, items: tuple) -> None:
    if state not in (None, {}) or items:
        raise ReadError(f"unexpected state for {name}")


def _ordered_dict(t: _Thaw, args: tuple, state: Any, items: tuple) -> dict:
    """A plain dict; instance attributes (a state_dict's `_metadata`) are dropped."""
    if state is not None and not isinstance(state, dict):
        raise ReadError("unexpected state for OrderedDict")
    pairs = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else []
    if len(args) > 1 or (args and not pairs and args[0]):
        raise ReadError("malformed OrderedDict arguments")
    out = {}
    for pair in [*pairs, *items]:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ReadError("malformed OrderedDict item")
        out[pair[0]] = pair[1]
    return out


def _collection(kind: type) -> Any:
    def build(t: _Thaw, args: tuple, state: Any, items: tuple) -> Any:
        _no_state(kind.__name__, state, items)
        if not args:
            return kind()
        if len(args) == 1 and isinstance(args[0], (list, tuple)):
            return kind(args[0])
        raise ReadError(f"malformed {kind.__name__} arguments")

    return build


def _bytes_like(kind: type) -> Any:
    def build(t: _Thaw, args: tuple, state: Any, items: tuple) -> Any:
        _no_state(kind.__name__, state, items)
        if not args:
            return kind()
        if len(args) == 1 and type(args[0]) is bytes:
            return kind(args[0])
        raise ReadError(f"malformed {kind.__name__} arguments")

    return build


def _latin1(t: _Thaw, args: tuple, state: Any, items: tuple) -> bytes:
    """_codecs.encode(text, 'latin1'): how protocol-2 pickles store bytes; no other codec."""
    _no_state("_codecs.encode", state, items)
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1"):
        return args[0].encode("latin-1")
    raise ReadError("_codecs.encode is only accepted with the latin1 codec")


def _reconstructor(t: _Thaw, args: tuple, state: Any, items: tuple) -> Record:
    """copyreg._reconstructor(cls, object, None): a protocol 0/1 object; a record of cls."""
    if (len(args) == 3 and isinstance(args[0], GlobalRef) and args[0].name.startswith(RECORD_PREFIXES)
            and args[1] == GlobalRef("builtins.object") and args[2] is None):
        return Record(args[0].name, (), state, items)
    raise ReadError("copyreg._reconstructor of something other than a layer")


def _size(t: _Thaw, args: tuple, state: Any, items: tuple) -> torch.Size:
    _no_state("torch.Size", state, items)
    if len(args) == 1:
        return torch.Size(_int_tuple(args[0], "size"))
    raise ReadError("malformed torch.Size arguments")


def _device(t: _Thaw, args: tuple, state: Any, items: tuple) -> torch.device:
    _no_state("torch.device", state, items)
    if args and type(args[0]) is str and _DEVICE.fullmatch(args[0]) and (
            len(args) == 1 or (len(args) == 2 and type(args[1]) is int and 0 <= args[1] < 1024)):
        return torch.device(*args)
    raise ReadError("malformed torch.device arguments")


def _namespace(t: _Thaw, args: tuple, state: Any, items: tuple) -> types.SimpleNamespace:
    """argparse.Namespace (training options): a SimpleNamespace of its attributes."""
    if not args and not items and isinstance(state, dict) and all(type(k) is str for k in state):
        return types.SimpleNamespace(**state)
    raise ReadError("malformed argparse.Namespace")


def _pure_path(kind: type) -> Any:
    """pathlib paths in training options: the pure variant, which never touches the file system."""

    def build(t: _Thaw, args: tuple, state: Any, items: tuple) -> Any:
        _no_state("path", state, items)
        if all(type(a) is str and len(a) < 4096 for a in args):
            return kind(*args)
        raise ReadError("malformed path arguments")

    return build


# torch tensor rebuild functions: (storage, offset, size, stride, requires_grad, hooks[, dtype][, metadata])
def _no_metadata(extra: tuple) -> None:
    if any(m not in (None, {}) for m in extra) or len(extra) > 1:
        raise ReadError("tensor with metadata (conjugate/negative bits) is not supported")


def _tensor_v1(t: _Thaw, args: tuple, state: Any, items: tuple) -> torch.Tensor:
    _no_state("tensor", state, items)
    if len(args) != 4:
        raise ReadError("malformed tensor record")
    return t.tensor(*args)


def _tensor_v2(t: _Thaw, args: tuple, state: Any, items: tuple) -> torch.Tensor:
    _no_state("tensor", state, items)
    if not 6 <= len(args) <= 7:
        raise ReadError("malformed tensor record")
    _no_metadata(args[6:])
    return t.tensor(*args[:4])


def _tensor_v3(t: _Thaw, args: tuple, state: Any, items: tuple) -> torch.Tensor:
    _no_state("tensor", state, items)
    if not 7 <= len(args) <= 8:
        raise ReadError("malformed tensor record")
    _no_metadata(args[7:])
    return t.tensor(*args[:4], dtype=args[6])


def _parameter(t: _Thaw, args: tuple, state: Any, items: tuple) -> torch.Tensor:
    """A Parameter is kept as its plain data tensor; requires_grad and hooks are dropped."""
    _no_state("parameter", state, items)
    if len(args) in (3, 4) and isinstance(args[0], torch.Tensor):
        return args[0]
    raise ReadError("malformed parameter record")


def _from_type(t: _Thaw, args: tuple, state: Any, items: tuple) -> torch.Tensor:
    """torch._tensor._rebuild_from_type_v2(func, type, args, attrs): the tensor func builds, as a plain
    Tensor (the subclass and its Python attributes are dropped)."""
    _no_state("tensor", state, items)
    if (len(args) == 4 and isinstance(args[0], GlobalRef) and args[0].name in _TENSOR_BUILDERS
            and args[1] in (GlobalRef("torch.Tensor"), GlobalRef("torch.nn.parameter.Parameter"))
            and type(args[2]) is tuple):
        return _TENSOR_BUILDERS[args[0].name](t, args[2], None, ())
    raise ReadError("malformed tensor-subclass record")


def _numpy_dtype(t: _Thaw, args: tuple, state: Any, items: tuple) -> Any:
    import numpy as np

    if not items and args and args[0] in _NUMPY_DTYPES:
        dt = np.dtype(args[0])
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        if order in ("<", ">"):
            dt = dt.newbyteorder(order)
        return dt
    raise ReadError("numpy dtype other than a plain number type")


def _numpy_array(t: _Thaw, args: tuple, state: Any, items: tuple) -> Any:
    """numpy.core.multiarray._reconstruct + BUILD (1, shape, dtype, fortran, bytes): a numeric array."""
    import numpy as np

    ok = (len(args) == 3 and args[0] == GlobalRef("numpy.ndarray") and isinstance(state, tuple) and len(state) == 5
          and state[0] == 1 and isinstance(state[2], np.dtype) and type(state[3]) is bool and type(state[4]) is bytes)
    if not ok or items:
        raise ReadError("numpy array other than a plain numeric array")
    shape, dt, raw = _int_tuple(state[1], "shape"), state[2], state[4]
    if math.prod(shape) * dt.itemsize != len(raw):
        raise ReadError("numpy array data does not match its shape")
    return np.frombuffer(raw, dtype=dt).reshape(shape, order="F" if state[3] else "C").copy()


def _numpy_scalar(t: _Thaw, args: tuple, state: Any, items: tuple) -> Any:
    import numpy as np

    _no_state("numpy scalar", state, items)
    if len(args) == 2 and isinstance(args[0], np.dtype) and type(args[1]) is bytes and len(args[1]) == args[0].itemsize:
        return np.frombuffer(args[1], dtype=args[0])[0]
    raise ReadError("numpy scalar other than a plain number")


_TENSOR_BUILDERS = {
    "torch._utils._rebuild_tensor": _tensor_v1,
    "torch._utils._rebuild_tensor_v2": _tensor_v2,
    "torch._utils._rebuild_tensor_v3": _tensor_v3,
    "torch._utils._rebuild_parameter": _parameter,
    "torch._utils._rebuild_parameter_with_state": _parameter,
}

_BUILDERS = {
    **_TENSOR_BUILDERS,
    "torch._tensor._rebuild_from_type_v2": _from_type,
    "collections.OrderedDict": _ordered_dict,
    "builtins.set": _collection(set),
    "builtins.frozenset": _collection(frozenset),
    "builtins.bytes": _bytes_like(bytes),
    "builtins.bytearray": _bytes_like(bytearray),
    "_codecs.encode": _latin1,
    "copyreg._reconstructor": _reconstructor,
    "torch.Size": _size,
    "torch.device": _device,
    "argparse.Namespace": _namespace,
    "pathlib.PosixPath": _pure_path(PurePosixPath),
    "pathlib.PurePosixPath": _pure_path(PurePosixPath),
    "pathlib._local.PosixPath": _pure_path(PurePosixPath),
    "pathlib.WindowsPath": _pure_path(PureWindowsPath),
    "pathlib.PureWindowsPath": _pure_path(PureWindowsPath),
    "pathlib._local.WindowsPath": _pure_path(PureWindowsPath),
    "numpy.dtype": _numpy_dtype,
    "numpy.core.multiarray._reconstruct": _numpy_array,
    "numpy.core.multiarray.scalar": _numpy_scalar,
}


def nameable_globals() -> list[str]:
    """Every fixed global name the unpickler accepts (plus any name under `RECORD_PREFIXES`).

    For tests: none of them is ever resolved to the real object here.
    """
    return sorted({*_BUILDERS, *_STORAGE_DTYPES, *_torch_constants(), *_PLAIN_NAMES})


# ------------------------------------------------------------------------------------- entry
def _one_line(e: BaseException) -> str:
    try:
        text = " ".join(str(e).split())
    except Exception:  # e.g. a KeyError holding an int too long to print
        text = ""
    text = (text[:160] + "...") if len(text) > 160 else text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_torch_zip(path: Path) -> Any:
    """The object a `torch.save` zip file holds, as plain data (see the module docstring).

    Raises ReadError (one line, without the path) for anything unreadable or untrusted.
    """
    try:
        file_len = path.stat().st_size
        with zipfile.ZipFile(path) as zf:
            members = _index(zf, file_len)
            info = members["data.pkl"]
            if info.file_size > MAX_PICKLE_BYTES:
                raise ReadError(f"data.pkl holds {info.file_size} bytes (limit {MAX_PICKLE_BYTES})")
            tree = _InertUnpickler(zf.read(info), members).load()
            return _Thaw(zf, members).value(tree)
    except ReadError:
        raise
    except zipfile.BadZipFile as e:
        raise ReadError(f"zip archive is truncated or corrupt ({_one_line(e)})") from None
    except Exception as e:  # whatever a damaged file makes the zip reader or pickle machine raise
        raise ReadError(f"checkpoint is truncated or corrupt ({_one_line(e)})") from None


__all__ = ["MAX_PICKLE_BYTES", "RECORD_PREFIXES", "GlobalRef", "ReadError", "Record", "StorageRef",
           "nameable_globals", "read_torch_zip"]
