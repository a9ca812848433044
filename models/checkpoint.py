"""Safe checkpoint I/O: official YOLOv5 `.pt` files and our own `yolo-kd/1` format.

Official YOLOv5 checkpoints pickle whole `nn.Module` objects, so a plain `torch.load` would
import and run whatever the file names. We read them through a restricted unpickler: only
tensor/storage rebuild functions and a few harmless builtins resolve to real objects; YOLOv5
and `torch.nn` classes resolve to inert `Record` stand-ins that only keep their pickled state;
every other global aborts the load with `CheckpointError`. The state_dict is then rebuilt by
walking the records' `_parameters` / `_buffers` / `_modules`.

Our own checkpoints are plain dicts of tensors and builtins (`torch.load(weights_only=True)`).
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import logging
import os
import pickle
import tempfile
import types
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from torch import nn

from models.yolo import ACTIVATIONS, DetectionModel

LOGGER = logging.getLogger(__name__)

FORMAT = "yolo-kd/1"


class CheckpointError(ValueError):
    """A checkpoint could not be read or trusted; the message is one line naming the file."""


# ------------------------------------------------------------------------------------- records
class Record:
    """Inert stand-in for a class referenced by a YOLOv5 pickle (never the real class).

    Constructing it stores the arguments; unpickling stores the state. Nothing else runs.
    `global_name` (class attribute) is the 'module.Name' the pickle referenced.
    """

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Record:
        obj = object.__new__(cls)
        obj.__dict__["args"] = args
        obj.__dict__["state"] = {}
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # arguments were recorded by __new__

    def __setstate__(self, state: Any) -> None:
        # Objects with __slots__ pickle their state as (dict, slots); keep both parts as one dict.
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            merged: dict = {}
            for part in state:
                merged.update(part or {})
            state = merged
        self.__dict__["state"] = state

    @property
    def type_name(self) -> str:
        """The class name without its module, e.g. 'Conv'."""
        return self.global_name.rsplit(".", 1)[-1]

    def get(self, key: str, default: Any = None) -> Any:
        """An attribute of the pickled object (its state dict entry)."""
        return self.state.get(key, default) if isinstance(self.state, dict) else default

    def __repr__(self) -> str:
        return f"Record({self.global_name})"


_RECORD_CLASSES: dict[str, type[Record]] = {}


def _record_class(global_name: str) -> type[Record]:
    """One Record subclass per referenced global, so records remember what they stand for."""
    cls = _RECORD_CLASSES.get(global_name)
    if cls is None:
        cls = type(f"Record[{global_name}]", (Record,), {"global_name": global_name})
        _RECORD_CLASSES[global_name] = cls
    return cls


# Module paths whose classes become records: YOLOv5's own (also under the pip package's
# `yolov5.` prefix) and torch.nn layers.
_RECORD_PREFIXES = ("models.", "yolov5.models.", "torch.nn.modules.")


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    # Protocol-2 pickles store bytes as _codecs.encode(text, 'latin1'); allow only that codec.
    if encoding not in ("latin1", "latin-1") or not isinstance(obj, str):
        raise pickle.UnpicklingError(f"_codecs.encode with codec {encoding!r} is not allowed")
    return obj.encode("latin1", errors)


def _reconstructor(cls: type, base: type, state: Any) -> Any:
    # copyreg._reconstructor (protocol 0/1 objects); only the plain-object form is needed.
    if base is not object:
        raise pickle.UnpicklingError(f"copyreg._reconstructor with base {base!r} is not allowed")
    return cls.__new__(cls)


def _allowed_globals() -> dict[str, Any]:
    """Globals that resolve to real objects. All are data constructors without side effects."""
    import torch._tensor
    import torch._utils

    allowed: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict,
        "builtins.set": set,
        "builtins.frozenset": frozenset,
        "builtins.slice": slice,
        "builtins.complex": complex,
        "builtins.bytearray": bytearray,
        "builtins.range": range,
        "_codecs.encode": _latin1_encode,
        "copyreg._reconstructor": _reconstructor,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
        "torch._tensor._rebuild_from_type_v2": torch._tensor._rebuild_from_type_v2,
        "argparse.Namespace": types.SimpleNamespace,
        # Paths in training options: the pure variants never touch the file system.
        "pathlib.PosixPath": PurePosixPath,
        "pathlib.PurePosixPath": PurePosixPath,
        "pathlib.WindowsPath": PureWindowsPath,
        "pathlib.PureWindowsPath": PureWindowsPath,
        "pathlib._local.PosixPath": PurePosixPath,
        "pathlib._local.WindowsPath": PureWindowsPath,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state", "_rebuild_from_type_v2",
                 "_rebuild_meta_tensor_no_storage"):
        fn = getattr(torch._utils, name, None)
        if fn is not None:
            allowed[f"torch._utils.{name}"] = fn
    return allowed


_ALLOWED: dict[str, Any] | None = None
_MODULE_RENAMES = {"torch.tensor": "torch._tensor"}


def _numpy_global(module: str, name: str) -> Any:
    """numpy arrays/scalars (e.g. YOLOv5 v5.0 `best_fitness`): reconstruction helpers only."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
        return getattr(core.multiarray, name)
    if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
        return core.numeric._frombuffer
    if module == "numpy" and name in ("ndarray", "dtype"):
        return getattr(np, name)
    if module == "numpy.dtypes" and name.endswith("DType") and hasattr(np, "dtypes"):
        return getattr(np.dtypes, name)
    return None


def _resolve_global(module: str, name: str, path: str) -> Any:
    """The restricted `find_class`: an allowed object, an inert record class, or CheckpointError."""
    global _ALLOWED
    if _ALLOWED is None:
        _ALLOWED = _allowed_globals()
    # Protocol-2 pickles written by Python 3 use Python 2 names ('__builtin__', 'commands.Popen');
    # map them back like pickle's fix_imports does, so the allowlist and messages see real names.
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    module = _compat_pickle.IMPORT_MAPPING.get(module, module)
    module = _MODULE_RENAMES.get(module, module)
    full = f"{module}.{name}"
    if full in _ALLOWED:
        return _ALLOWED[full]
    if module == "torch":
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.memory_format, torch.layout)):
            return obj
        if name.endswith("Storage") and isinstance(obj, type):
            return obj
    if module.startswith("numpy"):
        obj = _numpy_global(module, name)
        if obj is not None:
            return obj
    if module.startswith(_RECORD_PREFIXES) and name.isidentifier():
        return _record_class(full)
    raise CheckpointError(
        f"{path}: refusing to load, the file references the global '{full}', which a model "
        f"checkpoint never needs (the file may be malicious)"
    )


def _restricted_pickle_module(path: str) -> types.ModuleType:
    """A module-like object for `torch.load(pickle_module=...)` whose Unpickler is restricted."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            return _resolve_global(module, name, path)

    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    mod = types.ModuleType("yolo_kd_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler
    mod.load = load
    mod.UnpicklingError = pickle.UnpicklingError
    return mod


# ------------------------------------------------------------------------------------- reading
def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:200] + "...") if len(text) > 200 else text or type(e).__name__


def _read_raw(path: Path) -> tuple[Any, bool]:
    """Unpickle `path`. Returns (object, plain) where plain means weights_only=True sufficed."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: file is empty")
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(f"{path}: zip archive is truncated or corrupt (no central directory)")
    elif not head.startswith(b"\x80"):  # a legacy (pre-zip) torch file starts with a pickle
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")

    try:
        return torch.load(path, map_location="cpu", weights_only=True), True
    except pickle.UnpicklingError:
        pass  # references globals beyond plain tensors: an official YOLOv5 file (or worse)
    except Exception as e:
        raise CheckpointError(f"{path}: checkpoint is truncated or corrupt ({_one_line(e)})") from e
    try:
        with warnings.catch_warnings():
            # Legacy (pre-zip) files carry class source code that torch compares with the class;
            # our inert records have none, which is expected, not worth a warning per layer.
            warnings.filterwarnings("ignore", message="Couldn't retrieve source code")
            obj = torch.load(path, map_location="cpu", pickle_module=_restricted_pickle_module(str(path)),
                             weights_only=False)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: checkpoint is truncated or corrupt ({_one_line(e)})") from e
    return obj, False


def _as_tensor(v: Any, key: str, path: Path) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise CheckpointError(f"{path}: entry '{key}' is a {type(v).__name__}, expected a tensor")
    return v.detach()  # Parameter -> plain tensor


def _walk(rec: Record, prefix: str, path: Path, sd: dict, types_: dict, notes: list[str]) -> None:
    """Collect persistent parameters/buffers of a module record into `sd` (official key order)."""
    state = rec.state
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: module record '{prefix or 'model'}' has no state")
    types_[prefix.rstrip(".")] = rec
    for k, v in (state.get("_parameters") or {}).items():
        if v is not None:
            sd[prefix + k] = _as_tensor(v, prefix + k, path)
    skip = state.get("_non_persistent_buffers_set") or set()
    for k, v in (state.get("_buffers") or {}).items():
        if v is None or k in skip:
            continue
        if rec.type_name == "Detect" and k == "anchor_grid":
            # v5.0 kept pixel anchors as a buffer; ours derives them from `anchors` and stride.
            notes.append(f"dropped v5.0 buffer '{prefix}anchor_grid' (derived from anchors at run time)")
            continue
        sd[prefix + k] = _as_tensor(v, prefix + k, path)
    for k, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, Record):
            raise CheckpointError(f"{path}: sub-module '{prefix}{k}' is a {type(child).__name__}, not a layer")
        _walk(child, f"{prefix}{k}.", path, sd, types_, notes)


def _names_list(names: Any, nc: int) -> list[str]:
    """names as list[str] from a list or {id: name} dict; defaults 'class{i}'."""
    if isinstance(names, dict):
        try:
            return [str(names[k]) for k in sorted(names, key=int)]
        except (TypeError, ValueError):
            return [str(v) for v in names.values()]
    if isinstance(names, (list, tuple)) and names:
        return [str(n) for n in names]
    return [f"class{i}" for i in range(nc)]


def _normalise_yolov5(raw: dict, path: Path) -> dict:
    m = raw.get("ema") if isinstance(raw.get("ema"), Record) else raw.get("model")
    if not isinstance(m, Record):
        raise CheckpointError(f"{path}: no pickled model under 'model' or 'ema' (keys: {sorted(map(str, raw))})")
    cfg = m.get("yaml")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: the pickled {m.type_name} has no 'yaml' model dict")
    sd: dict[str, torch.Tensor] = {}
    modules: dict[str, Record] = {}
    notes: list[str] = []
    _walk(m, "", path, sd, modules, notes)
    stride = m.get("stride")
    nc = int(cfg.get("nc", 0) or 0)
    return {
        "yaml": cfg,
        "state_dict": sd,
        "names": _names_list(m.get("names"), nc),
        "stride": [float(s) for s in stride] if isinstance(stride, torch.Tensor) else [],
        "source": "yolov5",
        "raw": raw,
        "path": str(path),
        "notes": notes,
        "modules": modules,
    }


def _normalise_ours(raw: dict, path: Path) -> dict:
    fmt = raw.get("format")
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {fmt!r} (this version reads {FORMAT!r})")
    sd = raw.get("ema") if raw.get("ema") is not None else raw.get("model")
    if not isinstance(sd, dict) or not isinstance(raw.get("yaml"), dict):
        raise CheckpointError(f"{path}: {FORMAT} checkpoint lacks a state_dict under 'model'/'ema' or 'yaml'")
    nc = int(raw["yaml"].get("nc", 0) or 0)
    return {
        "yaml": raw["yaml"],
        "state_dict": sd,
        "names": _names_list(raw.get("names"), nc),
        "stride": [float(s) for s in (raw.get("stride") or [])],
        "source": "ours",
        "raw": raw,
        "path": str(path),
        "notes": [],
    }


def load_checkpoint(path: str | Path) -> dict:
    """Read an official YOLOv5 checkpoint (safely) or one of ours.

    Returns {'yaml': dict, 'state_dict': {key: tensor (fp16 or fp32)}, 'names': list[str],
    'stride': list[float], 'source': 'yolov5' | 'ours', 'raw': the unpickled dict (YOLOv5
    modules appear as inert `Record`s), 'path': str, 'notes': list[str]}; official files also
    give 'modules' {module path: Record}. The state_dict comes from `ema` when set, else `model`.
    Raises CheckpointError (one line, naming the file) for anything unreadable or untrusted.
    """
    path = Path(path)
    raw, plain = _read_raw(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: not a YOLOv5 or {FORMAT} checkpoint (top level is a {type(raw).__name__})")
    if "format" in raw:
        return _normalise_ours(raw, path)
    if not plain:
        return _normalise_yolov5(raw, path)
    raise CheckpointError(f"{path}: not a YOLOv5 or {FORMAT} checkpoint (keys: {sorted(map(str, raw))[:8]})")


# ------------------------------------------------------------------------------------- writing
def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """Write `obj` with torch.save atomically: temp file in the same folder, fsync, os.replace.

    A crash mid-write leaves the previous file intact. Returns the final path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # Make the rename itself durable (POSIX; a no-op where directories cannot be opened).
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


# ------------------------------------------------------------------------------ model building
def transfer_weights(model: nn.Module, state_dict: dict[str, torch.Tensor],
                     exclude: tuple[str, ...] | list[str] = ()) -> tuple[int, int]:
    """Copy every tensor of `state_dict` whose key and shape match `model`; keep the rest.

    Keys containing any substring in `exclude` (e.g. 'anchors' when the yaml sets its own)
    are skipped. Returns (n_loaded, n_total), n_total = number of entries in model.state_dict().
    """
    own = model.state_dict()
    merged = {}
    n_loaded = 0
    for k, v in own.items():
        src = None if any(x in k for x in exclude) else state_dict.get(k)
        if src is not None and tuple(src.shape) == tuple(v.shape):
            merged[k] = src.to(dtype=v.dtype) if v.is_floating_point() else src.to(v.dtype)
            n_loaded += 1
        else:
            merged[k] = v
    model.load_state_dict(merged, strict=True)
    return n_loaded, len(own)


def _match_activations(model: DetectionModel, modules: dict[str, Record], path: str) -> None:
    """Use the activation each pickled layer really had (a yaml may not say, e.g. custom builds)."""
    for name, mod in model.named_modules():
        rec = modules.get(name)
        if rec is None or not name.endswith(".act") or rec.type_name == type(mod).__name__:
            continue
        cls = ACTIVATIONS.get(rec.type_name)
        if cls is None:
            raise CheckpointError(f"{path}: unknown layer type '{rec.global_name}' at '{name}'")
        parent_name, _, attr = name.rpartition(".")
        new = cls(rec.get("negative_slope")) if rec.type_name == "LeakyReLU" else cls()
        setattr(model.get_submodule(parent_name), attr, new)


def model_from_checkpoint(ckpt: dict, nc: int | None = None) -> DetectionModel:
    """Build a DetectionModel (fp32, train mode as constructed) from a `load_checkpoint` dict.

    With nc None or equal to the checkpoint's, the state_dict is loaded strictly. With another
    nc only tensors of matching shape are transferred; `model.transfer_report` then holds
    (n_loaded, n_total) and it is logged. Names come from the checkpoint when the class count
    matches, else defaults.
    """
    where = ckpt.get("path", "<checkpoint>")
    cfg = ckpt["yaml"]
    ckpt_nc = int(cfg.get("nc", 0) or 0)
    try:
        model = DetectionModel(cfg, nc=nc)
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise CheckpointError(f"{where}: cannot build the model from its yaml: {_one_line(e)}") from e
    if ckpt.get("modules"):
        _match_activations(model, ckpt["modules"], where)
    sd = ckpt["state_dict"]
    if model.nc == ckpt_nc:
        own = model.state_dict()
        missing = [k for k in own if k not in sd]
        extra = [k for k in sd if k not in own]
        if missing or extra:
            raise CheckpointError(f"{where}: state_dict does not match the yaml model "
                                  f"(missing {missing[:3]}, unexpected {extra[:3]})")
        bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)]
        if bad:
            raise CheckpointError(f"{where}: tensor shapes differ from the yaml model at {bad[:3]}")
        model.load_state_dict({k: sd[k].to(own[k].dtype) for k in own}, strict=True)
        model.transfer_report = (len(own), len(own))
        stride = ckpt.get("stride") or []
        if stride and [float(s) for s in model.stride] != [float(s) for s in stride]:
            raise CheckpointError(f"{where}: checkpoint strides {stride} differ from the model's "
                                  f"{model.stride.tolist()}")
    else:
        model.transfer_report = transfer_weights(model, sd)
        LOGGER.info("%s: transferred %d/%d tensors to a model with nc=%d (checkpoint nc=%d)",
                    where, *model.transfer_report, model.nc, ckpt_nc)
    names = ckpt.get("names") or []
    if len(names) == model.nc:
        model.names = list(names)
    return model.float()


__all__ = ["FORMAT", "CheckpointError", "Record", "load_checkpoint", "model_from_checkpoint",
           "save_checkpoint", "transfer_weights"]
