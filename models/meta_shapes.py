"""The shapes a model yaml implies, found on the meta device: no memory, no data, bounded work.

`meta_state_dict(build)` runs `build()` (e.g. `DetectionModel(cfg)`) inside `torch.device('meta')`
under `ShapesOnly`, a torch-function mode that

* keeps tensors made from data (`torch.tensor`, `torch.as_tensor`: anchors, measured strides,
  bias priors) on the CPU with their values: their size is that of data already in memory, and
  the constructor computes with them (anchor order, bias prior);
* answers the value reads of meta tensors a constructor may still make (`bool()`, `float()`,
  `.item()`, a short `.tolist()`) with 1; no shape depends on them;
* computes output shapes of the layers' forward ops (conv2d, pooling, nearest upsampling, cat,
  batch norm, activations, broadcasting arithmetic, in-place initialisers) itself, from the
  standard output-size formula  out = floor((n + 2p - d(k - 1) - 1) / s) + 1  and broadcasting,
  instead of torch's generic meta kernels, whose first use imports sympy and torch.fx (seconds
  per process); any other op still goes to torch's meta kernel, so the result stays right;
* aborts (`TooLargeError`) when any tensor would exceed `MAX_META_ELEMENTS` elements, an output
  of conv / pooling / upsampling / cat in the stride probe `MAX_ACTIVATION_ELEMENTS`, or the probe's
  sliding-window work (conv: output elements x (c_in/groups) x kh x kw multiply-adds; pooling:
  output elements x kh x kw) `MAX_OP_WORK` in one op or `MAX_PROBE_WORK` in all: yaml numbers that
  change no parameter shape (a pooling kernel of 2**31, a huge upsampling) must not turn the real
  build into a long hang or a large allocation.

Before building, `repeat_budget` bounds the number of layers a yaml may declare (depth_multiple
times repeats), since modules are made even on the meta device.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# The largest tensor of an official model (yolov5x6) has 15M elements, the largest activation of its
# stride probe 1.3M. A yaml must stay below these per tensor (the activation cap also bounds the
# memory the real build's probe takes; parameters are checked against the file anyway).
MAX_META_ELEMENTS = 1 << 26
MAX_ACTIVATION_ELEMENTS = 1 << 23
MAX_LAYER_REPEATS = 4096
# Stride-probe work: yolov5x needs 1.0 G multiply-adds in all (largest op 0.03 G) on its 64-pixel
# probe; a P6 model probes at 256 pixels, ~16x that. Hostile yamls are stopped far below a hang.
MAX_OP_WORK = 1 << 31
MAX_PROBE_WORK = 1 << 36


class TooLargeError(Exception):
    """The yaml declares a tensor larger than `MAX_META_ELEMENTS`."""


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) in (1, 2) and all(isinstance(x, int) for x in v):
        return (v[0], v[-1])
    raise TypeError(f"expected an int or a pair of ints, got {v!r}")


def _out_len(n: int, k: int, s: int, p: int, d: int, ceil: bool = False) -> int:
    """Output length of a sliding window: floor((n + 2p - d(k - 1) - 1) / s) + 1 (ceil if asked).

    Shape errors are RuntimeErrors, as torch raises them (a model's stride probe may catch those).
    """
    span = n + 2 * p - d * (k - 1) - 1
    if s <= 0 or span < 0:
        raise RuntimeError(f"window of size {k} (stride {s}, padding {p}) does not fit an input of size {n}")
    steps = -(-span // s) if ceil else span // s
    if ceil and steps * s >= n + p:  # the last window must start inside the input or left padding
        steps -= 1
    return steps + 1


def _meta(shape: tuple[int, ...] | torch.Size, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return torch.empty(tuple(shape), dtype=dtype or like.dtype, device="meta")


# ----------------------------------------------------------------------------------- shape rules
def _conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if input.dim() != 4 or weight.dim() != 4:
        return NotImplemented
    n, c, h, w = input.shape
    if c != weight.shape[1] * groups:
        raise RuntimeError(f"conv2d: input has {c} channels, the weight expects {weight.shape[1] * groups}")
    if padding == "same":
        return _meta((n, weight.shape[0], h, w), input)
    (sh, sw), (dh, dw) = _pair(stride), _pair(dilation)
    ph, pw = (0, 0) if padding == "valid" else _pair(padding)
    kh, kw = weight.shape[2:]
    return _meta((n, weight.shape[0], _out_len(h, kh, sh, ph, dh), _out_len(w, kw, sw, pw, dw)), input)


def _max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    if input.dim() != 4 or return_indices:
        return NotImplemented
    (kh, kw), (ph, pw), (dh, dw) = _pair(kernel_size), _pair(padding), _pair(dilation)
    sh, sw = _pair(stride) if stride not in (None, ()) else (kh, kw)
    h, w = input.shape[2:]
    return _meta((*input.shape[:2], _out_len(h, kh, sh, ph, dh, ceil_mode), _out_len(w, kw, sw, pw, dw, ceil_mode)),
                 input)


def _interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                 recompute_scale_factor=None, antialias=False):
    if input.dim() != 4 or mode != "nearest" or (size is None) == (scale_factor is None):
        return NotImplemented
    if size is not None:
        out = _pair(size)
    else:
        sy, sx = (scale_factor, scale_factor) if isinstance(scale_factor, (int, float)) else tuple(scale_factor)
        out = (math.floor(input.shape[2] * sy), math.floor(input.shape[3] * sx))
    if min(out) <= 0:
        raise RuntimeError(f"upsampling to an empty size {out}")
    return _meta((*input.shape[:2], *out), input)


def _cat(tensors, dim=0):
    tensors = list(tensors)
    if not tensors or not all(isinstance(t, torch.Tensor) and t.is_meta for t in tensors):
        return NotImplemented
    first = tensors[0]
    d = dim % first.dim()
    for t in tensors[1:]:
        if t.dim() != first.dim() or any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != d):
            raise RuntimeError(f"cat: shapes {tuple(first.shape)} and {tuple(t.shape)} differ outside dim {d}")
    shape = list(first.shape)
    shape[d] = sum(t.shape[d] for t in tensors)
    return _meta(shape, first)


def _same(input, *args, **kwargs):
    return _meta(input.shape, input)


def _broadcast_shape(a: torch.Size, b: torch.Size) -> tuple[int, ...]:
    """Numpy broadcasting: align from the right; each pair of sizes must be equal or contain a 1."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        x, y = (a[-i] if i <= len(a) else 1), (b[-i] if i <= len(b) else 1)
        if x != y and 1 not in (x, y):
            raise RuntimeError(f"shapes {tuple(a)} and {tuple(b)} do not broadcast")
        out.append(y if x == 1 else x)
    return tuple(reversed(out))


def _broadcast(input, other, *args, **kwargs):
    if isinstance(other, torch.Tensor):
        dtype = torch.promote_types(input.dtype, other.dtype)
        return _meta(_broadcast_shape(input.shape, other.shape), input, dtype)
    if isinstance(other, (int, float, bool)):
        return _meta(input.shape, input)
    return NotImplemented


def _compare(input, other, *args, **kwargs):
    out = _broadcast(input, other)
    return out if out is NotImplemented else _meta(out.shape, out, torch.bool)


def _reduce(input, dim=None, keepdim=False, *args, **kwargs):
    if dim is None:
        return _meta((), input)
    if not isinstance(dim, int):
        return NotImplemented
    shape = list(input.shape)
    d = dim % max(len(shape), 1)
    if keepdim:
        shape[d] = 1
    else:
        del shape[d]
    return _meta(shape, input)


def _reduce_bool(input, dim=None, keepdim=False, *args, **kwargs):
    out = _reduce(input, dim, keepdim)
    return out if out is NotImplemented else _meta(out.shape, out, torch.bool)


def _in_place(*args, **kwargs):
    """An initialiser or in-place update (no value on the meta device; shape unchanged): its tensor.

    torch.nn.init functions pass their tensor as a keyword (`tensor=`), tensor methods positionally.
    """
    return next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), NotImplemented)


def _set_item(input, *args, **kwargs):
    return None


@lru_cache(maxsize=1)
def _rules() -> dict[Callable, Callable]:
    """torch function -> shape rule (returns NotImplemented to defer to torch's meta kernel)."""
    T = torch.Tensor
    rules: dict[Callable, Callable] = {
        F.conv2d: _conv2d, torch.conv2d: _conv2d, F.max_pool2d: _max_pool2d, torch.max_pool2d: _max_pool2d,
        F.interpolate: _interpolate, torch.cat: _cat, torch.concat: _cat, T.__setitem__: _set_item,
    }
    same = [F.batch_norm, torch.batch_norm, F.silu, F.relu, F.relu6, F.leaky_relu, F.hardswish, F.hardsigmoid,
            F.mish, F.gelu, F.elu, F.sigmoid, torch.sigmoid, T.sigmoid, F.tanh, torch.tanh, T.tanh,
            T.sign, torch.sign, T.flip, torch.flip, T.abs, T.neg, T.__neg__, T.exp, T.log, T.sqrt]
    binary = [T.add, T.sub, T.mul, T.div, T.__add__, T.__radd__, T.__sub__, T.__rsub__, T.__mul__, T.__rmul__,
              T.__truediv__, T.__rtruediv__, torch.add, torch.sub, torch.mul, torch.div]
    compare = [T.ne, T.eq, T.__ne__, T.__eq__, T.lt, T.gt, T.__lt__, T.__gt__]
    in_place = [T.add_, T.sub_, T.mul_, T.div_, T.__iadd__, T.__isub__, T.__imul__, T.__itruediv__, T.fill_,
                T.zero_, T.uniform_, T.normal_, T.copy_, T.clamp_]
    in_place += [getattr(torch.nn.init, n) for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    rules.update({f: _same for f in same})
    rules.update({f: _broadcast for f in binary})
    rules.update({f: _compare for f in compare})
    rules.update({f: _in_place for f in in_place})
    rules.update({T.mean: _reduce, T.prod: _reduce, T.sum: _reduce, torch.mean: _reduce, torch.sum: _reduce})
    rules.update({f: _reduce_bool for f in (T.any, T.all, torch.any, torch.all)})
    return rules


_signature = lru_cache(maxsize=None)(inspect.signature)
_LAYER_OPS = (_conv2d, _max_pool2d, _interpolate, _cat)


def _is_meta(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.is_meta


class ShapesOnly(TorchFunctionMode):
    """Torch-function mode for building a model on the meta device for its shapes (module docstring)."""

    _READS = {torch.Tensor.__bool__: True, torch.Tensor.__float__: 1.0, torch.Tensor.__int__: 1,
              torch.Tensor.__index__: 1, torch.Tensor.item: 1}
    _FROM_DATA = (torch.tensor, torch.as_tensor)

    def __init__(self) -> None:
        super().__init__()
        self.work = 0  # sliding-window operations of the stride probe so far

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FROM_DATA and kwargs.get("device") is None:
            kwargs = {**kwargs, "device": "cpu"}  # torch.device('meta') below would otherwise move it
        meta = any(_is_meta(a) or (isinstance(a, (list, tuple)) and any(map(_is_meta, a)))
                   for a in (*args, *kwargs.values()))
        if meta and func in self._READS:
            return self._READS[func]
        if meta and func is torch.Tensor.tolist and args[0].numel() <= 4096:
            return torch.ones(args[0].shape, device="cpu").tolist()
        out = NotImplemented
        rule = _rules().get(func) if meta else None
        if rule is not None:
            try:
                _signature(rule).bind(*args, **kwargs)
            except TypeError:
                rule = None  # a call form the rule does not cover: torch's meta kernel decides
        if rule is not None:
            out = rule(*args, **kwargs)
        if out is NotImplemented:
            out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor) and out.numel() > MAX_META_ELEMENTS:
            raise TooLargeError(f"a tensor of shape {tuple(out.shape)[:6]}")
        if rule in _LAYER_OPS and isinstance(out, torch.Tensor) and out.numel() > MAX_ACTIVATION_ELEMENTS:
            raise TooLargeError(f"an activation of shape {tuple(out.shape)[:6]} in the stride probe")
        if rule is _conv2d or rule is _max_pool2d:
            self._count(rule, args, kwargs, out)
        return out

    def _count(self, rule: Callable, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        bound = _signature(rule).bind(*args, **kwargs).arguments
        if rule is _conv2d:
            window = bound["weight"][0].numel()
        else:
            kh, kw = _pair(bound["kernel_size"])
            window = kh * kw
        work = out.numel() * window
        self.work += work
        if work > MAX_OP_WORK or self.work > MAX_PROBE_WORK:
            raise TooLargeError(f"a {rule.__name__.strip('_')} costing {work:.3g} operations in the stride probe "
                                f"({self.work:.3g} so far)")


def repeat_budget(cfg: Any, n_tensors: int) -> tuple[float, int]:
    """(layer repeats the yaml declares, the most allowed) — refuse when the first exceeds the second.

    Repeats = sum over rows of max(n, 1) * max(depth_multiple, 1): an upper bound of the modules the
    rows make. Every legitimate repeated block holds tensors, so a real checkpoint stays below
    2 x (its number of tensors) + 32; `MAX_LAYER_REPEATS` caps it absolutely.
    """
    rows = [*_as_list(cfg.get("backbone")), *_as_list(cfg.get("head"))] if isinstance(cfg, dict) else []
    gd = _number(cfg.get("depth_multiple", 1.0)) if isinstance(cfg, dict) else 1.0
    total = 0.0
    for row in rows:
        n = _number(row[1]) if isinstance(row, (list, tuple)) and len(row) > 1 else 1.0
        total += max(n, 1.0) * max(gd, 1.0)
    return total, min(2 * n_tensors + 32, MAX_LAYER_REPEATS)


def _as_list(v: Any) -> list:
    return v if isinstance(v, list) else []


def _number(v: Any) -> float:
    """A yaml count or multiplier as a float; huge ints become inf, non-numbers 1."""
    if type(v) is int:
        return float(v) if abs(v) < 1 << 53 else math.inf
    if type(v) is float:
        return v if not math.isnan(v) else math.inf
    return 1.0


def meta_state_dict(build: Callable[[], torch.nn.Module]) -> dict[str, torch.Tensor]:
    """state_dict (meta tensors: shapes and dtypes only) of the module `build()` makes, under `ShapesOnly`."""
    with torch.device("meta"), ShapesOnly():
        return build().state_dict()


__all__ = ["MAX_ACTIVATION_ELEMENTS", "MAX_LAYER_REPEATS", "MAX_META_ELEMENTS", "MAX_OP_WORK", "MAX_PROBE_WORK",
           "ShapesOnly", "TooLargeError", "meta_state_dict", "repeat_budget"]
