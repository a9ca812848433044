"""Writing a DetectionModel as an official YOLOv5 (v7.0) release checkpoint.

YOLOv5's own tools (detect.py, val.py, export.py, ``torch.hub.load``) read a ``.pt`` by
unpickling whole module objects: a torch zip-pickle of ``{epoch: -1, best_fitness: None, model:
<module tree>, ema: None, updates: None, optimizer: None, opt: None, git: None, date: <iso>}``
(REFERENCE §2) whose module tree names YOLOv5's classes — ``models.yolo.DetectionModel``,
``models.yolo.Detect``, ``models.common.{Conv, C3, Bottleneck, SPPF, Concat}`` (v5.0 models also
``Focus``, ``SPP``) — and ``torch.nn.modules.*``, each object carrying the attributes YOLOv5's code
reads from it (taken from the data of a file written by YOLOv5 7.0, tests/fixtures/yolov5n_nc80.pt).

How it is written: nothing is imported under YOLOv5's names and our modules are not pickled as
themselves. :func:`release_images` walks the model once and describes every module as a
:class:`ModuleImage` — the class reference to emit (module, name) and the attribute dict YOLOv5 will
find on the object, built from plain data (fp16 tensor copies, ints, lists, dicts). A pickler
(:class:`_ReleasePickler`, a ``pickle._Pickler`` handed to ``torch.save`` as its pickle module)
then writes each module as the opcodes ``GLOBAL module name``, ``EMPTY_TUPLE``, ``NEWOBJ``,
``<attribute dict>``, ``BUILD`` — the protocol-2 form of "make an instance without calling
__init__, then set its __dict__" — and everything else (tensors, storages, containers) the usual
way. The source model is not modified.

Reading such a file back needs no YOLOv5 code either: :func:`models.checkpoint.load_checkpoint`
reads it through the restricted unpickler like any official checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import pickle
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.common import C3, SPP, SPPF, Bottleneck, Concat, Conv, Focus
from models.yolo import Detect, DetectionModel

# Our class -> the (module, name) YOLOv5 v7.0 pickles it under.
YOLOV5_CLASSES: dict[type[nn.Module], tuple[str, str]] = {
    DetectionModel: ("models.yolo", "DetectionModel"),
    Detect: ("models.yolo", "Detect"),
    Conv: ("models.common", "Conv"),
    C3: ("models.common", "C3"),
    Bottleneck: ("models.common", "Bottleneck"),
    SPPF: ("models.common", "SPPF"),
    SPP: ("models.common", "SPP"),
    Focus: ("models.common", "Focus"),
    Concat: ("models.common", "Concat"),
}
_TORCH_PREFIX = "torch.nn.modules."
LAYER_ATTRS = ("i", "f", "type", "np")  # what the model builder puts on each top-level layer


@dataclass
class ModuleImage:
    """How one module appears in the file: class reference and the attribute dict set on it."""

    module: str
    name: str
    state: dict[str, Any]

    @property
    def dotted(self) -> str:
        return f"{self.module}.{self.name}"


# ------------------------------------------------------------------------------- module images
def _as_release_tensor(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy; floating point becomes fp16 (release files), integers stay as they are."""
    t = t.detach().to("cpu", copy=True)
    return t.half() if t.is_floating_point() else t


def _base_state(module: nn.Module, children: dict[str, nn.Module]) -> dict[str, Any]:
    """nn.Module's own bookkeeping (fresh, empty hook tables) + fp16 parameters/buffers + children.

    The key set comes from a new ``nn.Module()`` of the running torch, as torch itself would pickle
    one; hooks are never carried over (they may hold functions of ours).
    """
    state = dict(nn.Module().__dict__)
    state["training"] = False  # eval mode
    state["_parameters"] = {
        k: None if p is None else nn.Parameter(_as_release_tensor(p), requires_grad=False)
        for k, p in module._parameters.items()
    }
    state["_buffers"] = {k: None if b is None else _as_release_tensor(b) for k, b in module._buffers.items()}
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = dict(children)
    return state


def _layer_attrs(module: nn.Module, type_name: str) -> dict[str, Any]:
    """.i .f .type .np of a top-level layer ({} for nested modules, which have none)."""
    if not hasattr(module, "i"):
        return {}
    return {"i": int(module.i), "f": copy.deepcopy(module.f), "type": type_name, "np": int(module.np)}


def _reference(module: nn.Module) -> tuple[str, str]:
    """(module, name) to pickle ``module`` under; our classes map to YOLOv5's, torch.nn's stay."""
    cls = type(module)
    if cls in YOLOV5_CLASSES:
        return YOLOV5_CLASSES[cls]
    if cls.__module__.startswith(_TORCH_PREFIX):
        return cls.__module__, cls.__qualname__
    raise ValueError(f"cannot write a {cls.__module__}.{cls.__qualname__} layer in YOLOv5's format "
                     f"(known: {', '.join(n for _, n in YOLOV5_CLASSES.values())} and torch.nn layers)")


def _torch_extras(module: nn.Module, base_keys: set[str], type_name: str) -> dict[str, Any]:
    """A torch.nn layer's own attributes (kernel sizes, eps, ...) as torch keeps them; activations
    are marked in-place as in YOLOv5's files; the layer's .i .f .type .np (if any) last."""
    extras = {k: copy.deepcopy(v) for k, v in vars(module).items() if k not in base_keys and k not in LAYER_ATTRS}
    if "inplace" in extras and isinstance(module, _ACTIVATIONS):
        extras["inplace"] = True
    return {**extras, **_layer_attrs(module, type_name)}


def _detect_extras(det: Detect, type_name: str) -> dict[str, Any]:
    """Detect as YOLOv5 7.0 keeps it: sizes, per-level grid caches (empty until its first forward),
    in-place decoding flag, layer attributes, and the level strides in fp16."""
    empty = [torch.zeros(0, dtype=torch.float16) for _ in range(det.nl)]
    return {"nc": det.nc, "no": det.no, "nl": det.nl, "na": det.na, "grid": empty,
            "anchor_grid": [t.clone() for t in empty], "inplace": True, **_layer_attrs(det, type_name),
            "stride": det.stride.detach().to("cpu", torch.float16, copy=True)}


def _own_extras(module: nn.Module, type_name: str) -> dict[str, Any]:
    """Attributes YOLOv5's code reads from its blocks besides the child layers."""
    if isinstance(module, Detect):
        return _detect_extras(module, type_name)
    extras: dict[str, Any] = {}
    if isinstance(module, Bottleneck):
        extras["add"] = bool(module.add)
    if isinstance(module, Concat):
        extras["d"] = int(module.d)
    return {**extras, **_layer_attrs(module, type_name)}


def pixel_anchor_sets(det: Detect) -> list[list[float]]:
    """Detect's anchors in pixels as yaml rows [w1, h1, w2, h2, ...] per level (fine to coarse)."""
    px = det.anchors.detach().float().cpu() * det.stride.detach().float().cpu().view(-1, 1, 1)
    return [[round(float(v), 4) for v in level.flatten()] for level in px]


def _model_extras(model: DetectionModel, hyp: dict | None) -> dict[str, Any]:
    """DetectionModel's attributes as YOLOv5's tools read them (yaml, names as {id: name}, ...).

    The yaml's ``anchors`` become the model's actual pixel anchors, so a YOLOv5 rebuilt from the
    yaml (e.g. ``train.py --weights`` on this file) starts from the same anchors as the buffer
    (AutoAnchor may have changed them, or the yaml may hold only a count).
    """
    cfg = copy.deepcopy(model.yaml)
    cfg.pop("yaml_file", None)  # kept apart, as the attribute below
    cfg["anchors"] = pixel_anchor_sets(model.detect)
    names = model.names
    names = {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) else dict(enumerate(map(str, names)))
    return {
        "yaml_file": str(model.yaml_file or model.yaml.get("yaml_file", "")),
        "yaml": cfg,
        "save": [int(j) for j in model.save],
        "names": names,
        "inplace": True,
        "stride": model.stride.detach().to("cpu", torch.float32, copy=True),
        "nc": int(model.nc),
        "hyp": copy.deepcopy(hyp or {}),
        "class_weights": torch.ones(int(model.nc), dtype=torch.float32),
    }


_ACTIVATIONS = (nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Mish, nn.Sigmoid, nn.GELU, nn.Identity)


def _shared_activations(model: nn.Module) -> dict[int, nn.Module]:
    """{id(activation): the one instance that stands for all equal ones}.

    YOLOv5's Conv blocks share a single activation object (its files pickle one SiLU that all 57
    Conv layers of a yolov5n point to); parameter-free activations of equal class and settings are
    therefore written once and referenced from every block.
    """
    first: dict[tuple, nn.Module] = {}
    out: dict[int, nn.Module] = {}
    for m in model.modules():
        if isinstance(m, _ACTIVATIONS) and not m._parameters and not m._modules:
            key = (type(m), tuple(sorted((k, repr(v)) for k, v in vars(m).items() if not k.startswith("_"))))
            out[id(m)] = first.setdefault(key, m)
    return out


def release_images(model: DetectionModel, hyp: dict | None = None) -> dict[int, ModuleImage]:
    """{id(module): ModuleImage} for every module of ``model`` (the model itself included)."""
    base_keys = set(nn.Module().__dict__)
    shared = _shared_activations(model)
    images: dict[int, ModuleImage] = {}
    for module in model.modules():
        ref = _reference(module)
        type_name = ".".join(ref)
        children = {k: shared.get(id(c), c) if c is not None else None for k, c in module._modules.items()}
        state = _base_state(module, children)
        if module is model:
            state.update(_model_extras(model, hyp))
        elif type(module) in YOLOV5_CLASSES:
            state.update(_own_extras(module, type_name))
        else:
            state.update(_torch_extras(module, base_keys, type_name))
        images[id(module)] = ModuleImage(ref[0], ref[1], state)
    return images


# ------------------------------------------------------------------------------------ pickling
class _ReleasePickler(pickle._Pickler):
    """Pure-Python pickler writing planned modules as GLOBAL/NEWOBJ/BUILD (see the module docstring).

    ``images`` is set on the subclass made per file by :func:`_pickle_module`.
    """

    images: dict[int, ModuleImage] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._class_refs: dict[tuple[str, str], object] = {}

    def _write_class(self, module: str, name: str) -> None:
        """GLOBAL 'module name', memoised so each class is spelt out once."""
        key = (module, name)
        token = self._class_refs.get(key)
        if token is not None:
            self.write(self.get(self.memo[id(token)][0]))
            return
        token = self._class_refs[key] = object()  # stands for the class in the memo
        self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.memoize(token)

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        image = self.images.get(id(obj)) if isinstance(obj, nn.Module) else None
        if image is None or id(obj) in self.memo:
            super().save(obj, save_persistent_id)
            return
        self._write_class(image.module, image.name)
        self.write(pickle.EMPTY_TUPLE + pickle.NEWOBJ)  # cls.__new__(cls): no __init__ runs on load
        self.memoize(obj)
        self.save(image.state)
        self.write(pickle.BUILD)  # obj.__setstate__(state) (nn.Module's: __dict__.update)


def _pickle_module(images: dict[int, ModuleImage]) -> types.ModuleType:
    """A module-like object for ``torch.save(pickle_module=...)`` whose Pickler knows ``images``."""
    mod = types.ModuleType("yolov5_release_pickle")
    mod.Pickler = type("ReleasePickler", (_ReleasePickler,), {"images": images})
    mod.PicklingError = pickle.PicklingError
    return mod


def release_checkpoint(model: DetectionModel, hyp: dict | None = None) -> tuple[dict, dict[int, ModuleImage]]:
    """The top-level dict of a release file and the module images its ``model`` entry is written with."""
    ckpt = {"epoch": -1, "best_fitness": None, "model": model, "ema": None, "updates": None, "optimizer": None,
            "opt": None, "git": None, "date": datetime.datetime.now().isoformat()}
    return ckpt, release_images(model, hyp)


def save_yolov5(model: DetectionModel, path: str | Path, hyp: dict | None = None) -> Path:
    """Write ``model`` (any device/dtype; unchanged) as a YOLOv5 v7.0 release checkpoint at ``path``.

    fp16 tensors, requires_grad False, eval mode; ``hyp`` becomes the model's ``hyp`` attribute
    (YOLOv5's training reads it; inference does not). Written atomically (temp file + rename).
    Raises ValueError for a layer type YOLOv5 does not have.
    """
    ckpt, images = release_checkpoint(model, hyp)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(ckpt, f, pickle_module=_pickle_module(images), pickle_protocol=2)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; this is an ordinary shareable file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


__all__ = ["LAYER_ATTRS", "YOLOV5_CLASSES", "ModuleImage", "pixel_anchor_sets", "release_checkpoint",
           "release_images", "save_yolov5"]
