"""Safe checkpoint I/O: official YOLOv5 `.pt` files and our own `yolo-kd/1` format.

Reading never runs, imports or writes anything the file names, and never calls `torch.load`:
`models.torch_zip` reads the zip archive itself, unpickles with inert stand-ins for every global,
and only afterwards turns the plain result into tensors (see that module). Official YOLOv5 files
pickle whole modules; their layers come back as `Record`s (global name + pickled state) and the
state_dict is collected from the records' `_parameters` / `_buffers` / `_modules`.

Our own checkpoints (plain dicts of tensors and builtins, still `torch.load(weights_only=True)`
compatible) go through the same reader: one code path, whoever wrote the file.
The legacy (pre-zip) torch format is refused: torch's loader for it acts on the pickle's
persistent ids (it can write `<name>.patch` files).

Sizes are checked before memory follows them: storage sizes against the zip members (in
`torch_zip`), and the model the checkpoint's yaml describes against the tensors the file holds, by
building it on the meta device first (`models.meta_shapes`); only a file whose tensors match is built
for real. So neither a declared storage size nor a yaml width can make a small file allocate much.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.meta_shapes import TooLargeError, meta_state_dict, repeat_budget
from models.torch_zip import ReadError, Record, read_torch_zip
from models.yolo import ACTIVATIONS, DetectionModel

LOGGER = logging.getLogger(__name__)

FORMAT = "yolo-kd/1"


class CheckpointError(ValueError):
    """A checkpoint could not be read or trusted; the message is one line naming the file."""


def _one_line(e: BaseException) -> str:
    try:
        text = " ".join(str(e).split())
    except Exception:  # e.g. a KeyError holding an int too long to print
        text = ""
    return (text[:200] + "...") if len(text) > 200 else text or type(e).__name__


def _label(k: Any) -> str:
    """A key from the file, safe to print (str() of a huge int raises)."""
    return k[:40] if type(k) is str else f"<{type(k).__name__}>"


def _finite(v: Any) -> bool:
    return (type(v) is int and abs(v) < 1 << 53) or (type(v) is float and math.isfinite(v))


# ------------------------------------------------------------------------------------- reading
_LEGACY = ("{path}: a bare pickle (the legacy pre-zip torch format) is refused: torch's loader for it acts "
           "on instructions inside the file (it can write files); re-save it with torch >= 1.6 where you trust it")


def _read_raw(path: Path) -> Any:
    """The unpickled top-level object of `path`, as plain data (`models.torch_zip`)."""
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the file ({_one_line(e)})") from None
    if not head:
        raise CheckpointError(f"{path}: file is empty")
    if head[:1] == b"\x80":  # a pickle: torch's legacy format (magic number, then the program)
        raise CheckpointError(_LEGACY.format(path=path))
    if not head.startswith(b"PK"):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (not a zip archive)")
    try:
        return read_torch_zip(path)
    except ReadError as e:
        raise CheckpointError(f"{path}: {_one_line(e)}") from None


def _collect(rec: Record, prefix: str, where: Path, out: dict, modules: dict, notes: list, path_ids: set) -> None:
    """Persistent parameters/buffers of a pickled module record and its children, in pickle order."""
    state = rec.state
    if not isinstance(state, dict) or id(rec) in path_ids:
        name = prefix.rstrip(".") or "model"
        raise CheckpointError(f"{where}: module record '{name}' has no state or contains itself")
    modules[prefix.rstrip(".")] = rec
    params, buffers = state.get("_parameters") or {}, state.get("_buffers") or {}
    children, skip = state.get("_modules") or {}, state.get("_non_persistent_buffers_set") or set()
    if not all(isinstance(d, dict) for d in (params, buffers, children)) or not isinstance(skip, (set, frozenset)):
        raise CheckpointError(f"{where}: module record '{prefix.rstrip('.') or 'model'}' has malformed state")
    entries = [*params.items(), *((k, v) for k, v in buffers.items() if k not in skip)]
    for k, v in entries:
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or type(k) is not str:
            raise CheckpointError(f"{where}: entry '{prefix}{_label(k)}' is a {type(v).__name__}, expected a tensor")
        if rec.type_name == "Detect" and k == "anchor_grid" and k in buffers:
            # v5.0 kept pixel anchors as a buffer; ours derives them from `anchors` and stride.
            notes.append(f"dropped v5.0 buffer '{prefix}anchor_grid' (derived from anchors at run time)")
            continue
        out[prefix + k] = v
    for k, child in children.items():
        if child is None:
            continue
        if not isinstance(child, Record) or type(k) is not str:
            kind = type(child).__name__
            raise CheckpointError(f"{where}: sub-module '{prefix}{_label(k)}' is a {kind}, not a layer")
        _collect(child, f"{prefix}{k}.", where, out, modules, notes, path_ids | {id(rec)})


def _names_list(names: Any, nc: int) -> list[str]:
    """names as list[str] from a list or {id: name} dict; 'class{i}' where missing or odd."""
    if isinstance(names, dict):
        numbered = all(type(k) is int for k in names)
        ordered = [names[k] for k in sorted(names)] if numbered else list(names.values())
    elif isinstance(names, (list, tuple)):
        ordered = list(names)
    else:
        ordered = []
    if not ordered:
        return [f"class{i}" for i in range(nc)]
    return [n if type(n) is str else str(n) if type(n) is float or (type(n) is int and abs(n) < 1 << 62)
            else f"class{i}" for i, n in enumerate(ordered)]


def _yaml_nc(cfg: Any, where: Path) -> int:
    nc = cfg.get("nc") if isinstance(cfg, dict) else None
    if type(nc) is not int or not 0 < nc < 1_000_000:
        raise CheckpointError(f"{where}: the model yaml has no valid 'nc' (number of classes)")
    return nc


def _strides(value: Any, where: Path) -> list[float]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.tolist() if value.dim() == 1 and value.numel() <= 16 and not value.is_complex() else None
    if isinstance(value, (list, tuple)) and len(value) <= 16 and all(map(_finite, value)):
        return [float(s) for s in value]
    raise CheckpointError(f"{where}: malformed 'stride' entry")


def _normalise_yolov5(raw: dict, where: Path) -> dict:
    m = raw.get("ema") if isinstance(raw.get("ema"), Record) else raw.get("model")
    if not isinstance(m, Record):
        keys = sorted(_label(k)[:20] for k in raw)[:8]
        raise CheckpointError(f"{where}: no pickled model under 'model' or 'ema' (keys: {keys})")
    cfg = m.get("yaml")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}: the pickled {m.type_name} has no 'yaml' model dict")
    sd: dict[str, torch.Tensor] = {}
    modules: dict[str, Record] = {}
    notes: list[str] = []
    _collect(m, "", where, sd, modules, notes, set())
    nc = _yaml_nc(cfg, where)
    return {"yaml": cfg, "state_dict": sd, "names": _names_list(m.get("names"), nc),
            "stride": _strides(m.get("stride"), where), "source": "yolov5", "raw": raw, "path": str(where),
            "notes": notes, "modules": modules}


def _normalise_ours(raw: dict, where: Path) -> dict:
    fmt = raw.get("format")
    if fmt != FORMAT:
        raise CheckpointError(f"{where}: unsupported checkpoint format {_label(fmt)!r} "
                              f"(this version reads {FORMAT!r})")
    sd = raw.get("ema") if raw.get("ema") is not None else raw.get("model")
    if not isinstance(sd, dict) or not isinstance(raw.get("yaml"), dict):
        raise CheckpointError(f"{where}: {FORMAT} checkpoint lacks a state_dict under 'model'/'ema' or 'yaml'")
    if not all(type(k) is str and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{where}: {FORMAT} state_dict holds entries other than named tensors")
    nc = _yaml_nc(raw["yaml"], where)
    return {"yaml": raw["yaml"], "state_dict": sd, "names": _names_list(raw.get("names"), nc),
            "stride": _strides(raw.get("stride"), where), "source": "ours", "raw": raw, "path": str(where),
            "notes": []}


def load_checkpoint(path: str | Path) -> dict:
    """Read an official YOLOv5 checkpoint or one of ours, without trusting it.

    Returns {'yaml': dict, 'state_dict': {key: tensor (fp16 or fp32)}, 'names': list[str],
    'stride': list[float], 'source': 'yolov5' | 'ours', 'raw': the unpickled dict (YOLOv5
    modules appear as inert `Record`s), 'path': str, 'notes': list[str]}; official files also
    give 'modules' {module path: Record}. The state_dict comes from `ema` when set, else `model`.
    The yaml is checked to describe exactly the state_dict's tensors (built on the meta device),
    so building `DetectionModel(ckpt['yaml'])` afterwards allocates what the file holds, no more.
    Raises CheckpointError (one line, naming the file) for anything unreadable or untrusted.
    """
    where = Path(path)
    raw = _read_raw(where)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: not a YOLOv5 or {FORMAT} checkpoint (top level is a {type(raw).__name__})")
    if "format" in raw:
        ckpt = _normalise_ours(raw, where)
    elif isinstance(raw.get("model"), Record) or isinstance(raw.get("ema"), Record):
        ckpt = _normalise_yolov5(raw, where)
    else:
        keys = sorted(_label(k)[:20] for k in raw)[:8]
        raise CheckpointError(f"{where}: not a YOLOv5 or {FORMAT} checkpoint (keys: {keys})")
    verify_yaml(ckpt)
    return ckpt


# ------------------------------------------------------------------------ shapes before memory
def _meta_state_dict(cfg: dict, n_tensors: int, where: str) -> dict[str, torch.Tensor]:
    """state_dict (meta tensors: shapes and dtypes, no memory) of the model `cfg` describes."""
    repeats, limit = repeat_budget(cfg, n_tensors)
    if repeats > limit:
        raise CheckpointError(f"{where}: the model yaml declares {repeats:.0f} layer repeats, more than the "
                              f"{n_tensors} tensors of the file can fill (limit {limit})")
    try:
        return meta_state_dict(lambda: DetectionModel(cfg))
    except TooLargeError as e:
        raise CheckpointError(f"{where}: the model yaml declares {e}, beyond any YOLOv5 model "
                              "(refused before building it)") from None
    except Exception as e:  # whatever a hostile yaml makes the builder raise
        raise CheckpointError(f"{where}: cannot build the model from its yaml: {_one_line(e)}") from None


def verify_yaml(ckpt: dict) -> None:
    """Check that ckpt['yaml'] describes exactly ckpt['state_dict'] (keys, shapes, dtype kinds).

    Done on the meta device, before any real model is allocated. Raises CheckpointError.
    """
    where, sd = ckpt.get("path", "<checkpoint>"), ckpt["state_dict"]
    own = _meta_state_dict(ckpt["yaml"], len(sd), where)
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    if missing or extra:
        raise CheckpointError(f"{where}: state_dict does not match the yaml model "
                              f"(missing {missing[:3]}, unexpected {[k[:60] for k in extra[:3]]})")
    bad = [k for k in own if tuple(own[k].shape) != tuple(sd[k].shape)
           or own[k].is_floating_point() != sd[k].is_floating_point()]
    if bad:
        k = bad[0]
        raise CheckpointError(f"{where}: tensor shapes differ from the yaml model at {bad[:3]} "
                              f"({k}: file {tuple(sd[k].shape)[:6]} {sd[k].dtype}, yaml {tuple(own[k].shape)[:6]})")
    ckpt["verified"] = True


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


def _match_activations(model: DetectionModel, modules: dict[str, Record], where: str) -> None:
    """Use the activation each pickled layer really had (a yaml may not say, e.g. custom builds)."""
    for name, mod in model.named_modules():
        rec = modules.get(name)
        if rec is None or not name.endswith(".act") or rec.type_name == type(mod).__name__:
            continue
        cls = ACTIVATIONS.get(rec.type_name)
        if cls is None:
            raise CheckpointError(f"{where}: unknown layer type '{rec.global_name}' at '{name}'")
        if rec.type_name == "LeakyReLU":
            slope = rec.get("negative_slope")
            if not _finite(slope):
                raise CheckpointError(f"{where}: LeakyReLU at '{name}' has no valid negative_slope")
            new = cls(float(slope))
        else:
            new = cls()
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, new)


def model_from_checkpoint(ckpt: dict, nc: int | None = None) -> DetectionModel:
    """Build a DetectionModel (fp32, train mode as constructed) from a `load_checkpoint` dict.

    The yaml is verified against the state_dict on the meta device first (already done by
    `load_checkpoint`). With nc None or equal to the checkpoint's, the state_dict is loaded
    strictly. With another nc only tensors of matching shape are transferred;
    `model.transfer_report` then holds (n_loaded, n_total) and it is logged. Names come from the
    checkpoint when the class count matches, else defaults.
    """
    where = ckpt.get("path", "<checkpoint>")
    if not ckpt.get("verified"):
        verify_yaml(ckpt)
    cfg = ckpt["yaml"]
    ckpt_nc = _yaml_nc(cfg, Path(where))
    sd = ckpt["state_dict"]
    try:
        model = DetectionModel(cfg, nc=nc)
        if ckpt.get("modules"):
            _match_activations(model, ckpt["modules"], where)
        if model.nc == ckpt_nc:
            own = model.state_dict()
            model.load_state_dict({k: sd[k].to(own[k].dtype) for k in own}, strict=True)
            model.transfer_report = (len(own), len(own))
        else:
            model.transfer_report = transfer_weights(model, sd)
            LOGGER.info("%s: transferred %d/%d tensors to a model with nc=%d (checkpoint nc=%d)",
                        where, *model.transfer_report, model.nc, ckpt_nc)
    except CheckpointError:
        raise
    except Exception as e:  # verified shapes make this unlikely; keep the one-line contract anyway
        raise CheckpointError(f"{where}: cannot build the model from the checkpoint: {_one_line(e)}") from None
    stride = ckpt.get("stride") or []
    if model.nc == ckpt_nc and stride and [float(s) for s in model.stride] != [float(s) for s in stride]:
        raise CheckpointError(f"{where}: checkpoint strides {stride} differ from the model's {model.stride.tolist()}")
    names = ckpt.get("names") or []
    if len(names) == model.nc:
        model.names = list(names)
    return model.float()


__all__ = ["FORMAT", "CheckpointError", "Record", "load_checkpoint", "model_from_checkpoint",
           "save_checkpoint", "transfer_weights", "verify_yaml"]
