"""YOLOv5 detection model built from a model yaml, with the official module tree and state_dict layout.

A model yaml (REFERENCE §1) holds `nc`, `depth_multiple`, `width_multiple`, `anchors` and two lists
of rows `[from, number, module, args]` (`backbone`, then `head`); the rows are numbered 0, 1, ... in
that order and become `model.0`, `model.1`, ... of the state_dict.

How a row becomes a layer is table-driven: `LAYER_RULES` maps every module name a yaml may use to
a `LayerRule`, i.e. the class to build and a planning function. The builder hands the planner a
`RowContext` (the row's arguments with yaml symbols resolved, the channel widths of the layers it
reads, its depth-scaled repeat count, the width multiple) and gets back a `LayerPlan`: constructor
arguments, output width and how many stacked copies to build. Names are looked up in the table,
never evaluated, so a yaml can only build known layer types. Supporting a new block is one entry.

Size: one subject, the model yaml → module tree (Detect head, row planners, DetectionModel); the
yaml grammar and the state_dict layout it must reproduce are read together.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.common import C3, SPP, SPPF, Bottleneck, Concat, Conv, Focus
from utils.anchors import placeholder_anchors

LOGGER = logging.getLogger(__name__)

# Activations a yaml's optional `activation:` entry may name, e.g. "nn.LeakyReLU(0.1)".
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "SiLU": nn.SiLU,
    "ReLU": nn.ReLU,
    "ReLU6": nn.ReLU6,
    "LeakyReLU": nn.LeakyReLU,
    "Hardswish": nn.Hardswish,
    "Mish": nn.Mish,
    "Sigmoid": nn.Sigmoid,
    "GELU": nn.GELU,
    "Identity": nn.Identity,
}

# Sides of the square dummy images used to measure strides: the small one is enough (and cheap)
# for P5 models; the larger one serves deeper (P6) ones, whose coarsest map would be 1 px.
_STRIDE_PROBES = (64, 256)

# Prior quantities of the Detect bias initialisation (REFERENCE §1): about 8 objects in a
# 640×640 image, and 60 % of the class probability mass spread over the nc classes.
PRIOR_OBJECTS_PER_IMAGE = 8.0
PRIOR_IMAGE_SIDE = 640.0
PRIOR_CLASS_MASS = 0.6
PRIOR_CLASS_COUNT_OFFSET = 0.99999  # the divisor is nc − 0.99999 (finite for nc = 1)

_REQUIRED_KEYS = ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head")


# ------------------------------------------------------------------------------------- helpers
def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of `divisor` that is >= x (YOLOv5 channel rounding, REFERENCE §1)."""
    return divisor * int(math.ceil(x / divisor))


def scale_repeats(n: int, depth_multiple: float) -> int:
    """Repeat count after depth scaling: 1 stays 1, larger counts become max(round(n·gd), 1)."""
    return n if n <= 1 else max(1, round(n * depth_multiple))


def parse_activation(spec: str, where: str = "model yaml") -> nn.Module:
    """Build an activation from a string such as 'nn.SiLU()' or 'nn.LeakyReLU(0.1)' (no eval)."""
    match = re.fullmatch(r"\s*(?:torch\.)?(?:nn\.)?(\w+)\s*(?:\((.*)\))?\s*", str(spec))
    if not match or match.group(1) not in ACTIVATIONS:
        raise ValueError(f"{where}: unsupported activation {spec!r}; known: {sorted(ACTIVATIONS)}")
    numbers: list[float] = []
    for token in filter(None, (t.strip() for t in (match.group(2) or "").split(","))):
        value = token.rpartition("=")[2].strip()  # keyword or positional, the value is what counts
        if value in ("True", "False"):
            continue  # `inplace=` flags do not change results
        try:
            numbers.append(float(value))
        except ValueError as e:
            raise ValueError(f"{where}: cannot parse activation argument {token!r} in {spec!r}") from e
    return ACTIVATIONS[match.group(1)](*numbers)


def absolute_sources(f: int | list[int], index: int) -> list[int]:
    """Layer indices that row `index` reads, in `from` order.

    Non-negative entries are absolute; negative ones count back from the row (-1 = the previous
    layer). Layer 0 reading -1 gets index -1, which stands for the input image.
    """
    entries = [f] if isinstance(f, int) else list(f)
    return [j if j >= 0 else index + j for j in entries]


def retained_outputs(layers: Iterable[nn.Module]) -> list[int]:
    """Sorted indices of the layers whose output some layer names by an explicit index.

    An entry -1 in `from` means "the output just produced", which the forward pass always has
    at hand; every other entry points at an output that must be held until it is read. This
    list is the model's `save` attribute: YOLOv5's own forward reads that attribute from pickled
    models with the same meaning, so it must name e.g. 23 although Detect (24) follows it.
    """
    named: set[int] = set()
    for layer in layers:
        entries = [layer.f] if isinstance(layer.f, int) else list(layer.f)
        named.update(src for entry, src in zip(entries, absolute_sources(layer.f, layer.i)) if entry != -1)
    return sorted(named)


def anchor_levels_reversed(pixel_anchors: torch.Tensor, strides: torch.Tensor) -> bool:
    """True when the mean anchor area (pixels²) strictly decreases as the level stride grows.

    pixel_anchors (nl, na, 2), strides (nl,). Fine levels (small stride) must hold small anchors;
    sets listed from coarse to fine show a strictly decreasing area and are the only ones to
    reverse. Areas are compared in pixels: in grid units a correct set whose area grows less
    than stride² per level would look decreasing.
    """
    area = pixel_anchors.prod(-1).mean(-1)[torch.argsort(strides)]
    steps = area.diff()
    return steps.numel() > 0 and bool((steps < 0).all())


def detect_bias_prior(nc: int, na: int, stride: float) -> torch.Tensor:
    """Initial output bias (na·(nc+5),) of one Detect level, REFERENCE §1 (focal-loss style prior).

    Per anchor: 0 for x, y, w, h; objectness log(objects / cells) with PRIOR_OBJECTS_PER_IMAGE
    objects over (PRIOR_IMAGE_SIDE/stride)² cells (for a small p, logit(p) ≈ log p); every class
    log(PRIOR_CLASS_MASS / (nc − PRIOR_CLASS_COUNT_OFFSET)).
    """
    cells = (PRIOR_IMAGE_SIDE / stride) ** 2
    objectness = math.log(PRIOR_OBJECTS_PER_IMAGE / cells)
    class_logit = math.log(PRIOR_CLASS_MASS / (nc - PRIOR_CLASS_COUNT_OFFSET))
    per_anchor = [0.0, 0.0, 0.0, 0.0, objectness] + [class_logit] * nc
    return torch.tensor(per_anchor).repeat(na)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run a probe in eval mode (BatchNorm statistics untouched), restoring every module's flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# ------------------------------------------------------------------------------------- Detect
class Detect(nn.Module):
    """YOLOv5 detection head: one 1×1 conv per level predicting na·(nc+5) channels per cell.

    Attributes: `nc`, `no` (= nc + 5), `nl` levels, `na` anchors per level, buffer `anchors`
    (nl, na, 2) in GRID units of each level, plain tensor attribute `stride` (nl,) in pixels.

    forward(list of nl tensors (bs, ch_i, ny_i, nx_i)):
      training: list of raw logits (bs, na, ny_i, nx_i, no).
      eval:     (decoded (bs, Σ na·ny_i·nx_i, no), raw list) with
                xy = (2σ(t_xy) − 0.5 + cell)·stride, wh = (2σ(t_wh))²·anchor_px,
                objectness and class scores = σ(logits);
                with `raw_only` set: the raw list alone, as in training (a distillation teacher
                needs no decoding: ~5 passes over its largest outputs saved per step).
    """

    raw_only: bool = False

    def __init__(self, nc: int = 80, anchors: list | tuple = (), ch: list[int] | tuple[int, ...] = ()) -> None:
        super().__init__()
        if not anchors or not ch or len(anchors) != len(ch):
            raise ValueError(f"Detect needs one anchor set per input level (got {len(anchors)} sets, {len(ch)} levels)")
        self.nc = int(nc)
        self.no = self.nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        # Filled in by DetectionModel once the strides are measured.
        self.stride = torch.zeros(self.nl)
        # Cell-offset grids keyed by (ny, nx, device, dtype); they depend on nothing else.
        self._grids: dict[tuple, torch.Tensor] = {}

    def _apply(self, fn, recurse: bool = True):
        # `stride` is a plain attribute (not a buffer, to keep the official state_dict keys), so
        # it has to follow .to()/.cuda()/.half() by hand; cached grids are rebuilt lazily.
        super()._apply(fn, recurse)
        self.stride = fn(self.stride)
        self._grids = {}
        return self

    def _grid(self, ny: int, nx: int, ref: torch.Tensor) -> torch.Tensor:
        """(1, 1, ny, nx, 2) tensor of (x, y) cell indices minus 0.5, cached per shape/device/dtype."""
        key = (ny, nx, ref.device, ref.dtype)
        grid = self._grids.get(key)
        if grid is None:
            ys = torch.arange(ny, device=ref.device, dtype=ref.dtype)
            xs = torch.arange(nx, device=ref.device, dtype=ref.dtype)
            yv, xv = torch.meshgrid(ys, xs, indexing="ij")
            grid = (torch.stack((xv, yv), 2) - 0.5).view(1, 1, ny, nx, 2)
            self._grids[key] = grid
        return grid

    def forward(self, x: list[torch.Tensor]):
        """See the class docstring for shapes."""
        raw: list[torch.Tensor] = []
        decoded: list[torch.Tensor] = []
        for i in range(self.nl):
            p = self.m[i](x[i])
            bs, _, ny, nx = p.shape
            # (bs, na·no, ny, nx) -> (bs, na, ny, nx, no)
            p = p.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            raw.append(p)
            if not (self.training or self.raw_only):
                # bf16 (8 mantissa bits) would round decoded coordinates to ~1 px at 160-640 px:
                # decode in fp32 (measured: mAP50-95 -0.005 otherwise, benchmarks/precision_val.py)
                s = (p.float() if p.dtype == torch.bfloat16 else p).sigmoid()
                stride = self.stride[i].to(s)
                anchor_px = (self.anchors[i] * stride).view(1, self.na, 1, 1, 2).to(s)
                xy = (s[..., 0:2] * 2 + self._grid(ny, nx, s)) * stride
                wh = (s[..., 2:4] * 2) ** 2 * anchor_px
                decoded.append(torch.cat((xy, wh, s[..., 4:]), -1).view(bs, -1, self.no))
        if self.training or self.raw_only:
            return raw
        return torch.cat(decoded, 1), raw



# ------------------------------------------------------------------------------ layer planning
@dataclass(frozen=True)
class RowContext:
    """What a planner may know about one yaml row.

    args: the row's arguments with yaml symbols ('nc', 'anchors', 'None', ...) resolved.
    in_widths: output channels of each layer the row reads, in `from` order (the image: `ch`).
    repeats: the row's `number` after depth scaling.
    """

    args: tuple[Any, ...]
    in_widths: tuple[int, ...]
    repeats: int
    width_multiple: float

    def nominal_width(self) -> int:
        """args[0] as the yaml's nominal output width, scaled by the width multiple."""
        if not self.args or isinstance(self.args[0], bool) or not isinstance(self.args[0], (int, float)):
            raise ValueError(f"the first argument must be the output channels, got {list(self.args)}")
        return make_divisible(self.args[0] * self.width_multiple)

    def single_input(self) -> int:
        """The width of the one tensor a block reads (blocks other than Concat/Detect read one)."""
        if len(self.in_widths) != 1:
            raise ValueError(f"reads {len(self.in_widths)} layers, but this block takes one input")
        return self.in_widths[0]


@dataclass(frozen=True)
class LayerPlan:
    """How to construct one layer: `copies` instances of cls(*args) (a Sequential if > 1)."""

    args: tuple[Any, ...]
    out_width: int | None  # None: the layer's output is not a feature map (Detect)
    copies: int = 1


@dataclass(frozen=True)
class LayerRule:
    """Table entry: the class a module name builds and the function planning its arguments."""

    cls: type[nn.Module]
    plan: Callable[[RowContext], LayerPlan]


def _plan_conv_like(row: RowContext) -> LayerPlan:
    """Blocks constructed as (c_in, c_out, *rest): args[0] is the nominal width; repeats stack."""
    c_out = row.nominal_width()
    return LayerPlan((row.single_input(), c_out, *row.args[1:]), c_out, row.repeats)


def _plan_csp(row: RowContext) -> LayerPlan:
    """C3 is constructed as (c_in, c_out, n, *rest): the repeats become its inner bottlenecks."""
    c_out = row.nominal_width()
    return LayerPlan((row.single_input(), c_out, row.repeats, *row.args[1:]), c_out)


def _plan_concat(row: RowContext) -> LayerPlan:
    """Channel concatenation: the widths of the inputs add up."""
    return LayerPlan(row.args, sum(row.in_widths), row.repeats)


def _plan_same_width(row: RowContext) -> LayerPlan:
    """Layers that keep the channel count (resampling)."""
    return LayerPlan(row.args, row.single_input(), row.repeats)


def _anchor_sets(anchors: Any, levels: int) -> list[list[float]]:
    """The yaml's anchors as `levels` lists of 2·na pixel sizes; a bare count gives zeros.

    All-zero sets are the marker DetectionModel replaces with `placeholder_anchors` once the
    strides are known.
    """
    if isinstance(anchors, int) and not isinstance(anchors, bool):
        if anchors < 1:
            raise ValueError(f"anchors: {anchors} must be a positive number of anchors per level")
        return [[0.0] * (2 * anchors) for _ in range(levels)]
    if not isinstance(anchors, (list, tuple)) or len(anchors) != levels:
        raise ValueError(f"needs {levels} anchor sets (one per input level), got {anchors!r}")
    sizes = {len(a) if isinstance(a, (list, tuple)) else -1 for a in anchors}
    if len(sizes) != 1 or min(sizes) < 2 or min(sizes) % 2:
        raise ValueError(f"every anchor set must list the same even number of w,h values, got {anchors!r}")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for a in anchors for v in a):
        raise ValueError(f"anchor sizes must be positive numbers (pixels), got {anchors!r}")
    return [[float(v) for v in a] for a in anchors]


def _plan_detect(row: RowContext) -> LayerPlan:
    """Detect is constructed as (nc, anchor sets in pixels, input widths); it is never repeated."""
    if len(row.args) < 2:
        raise ValueError(f"Detect takes [nc, anchors], got {list(row.args)}")
    nc, anchors = row.args[:2]
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise ValueError(f"Detect needs a positive class count, got {nc!r}")
    return LayerPlan((nc, _anchor_sets(anchors, len(row.in_widths)), list(row.in_widths)), None)


LAYER_RULES: dict[str, LayerRule] = {
    "Conv": LayerRule(Conv, _plan_conv_like),
    "Focus": LayerRule(Focus, _plan_conv_like),
    "Bottleneck": LayerRule(Bottleneck, _plan_conv_like),
    "SPP": LayerRule(SPP, _plan_conv_like),
    "SPPF": LayerRule(SPPF, _plan_conv_like),
    "C3": LayerRule(C3, _plan_csp),
    "Concat": LayerRule(Concat, _plan_concat),
    "nn.Upsample": LayerRule(nn.Upsample, _plan_same_width),
    "Detect": LayerRule(Detect, _plan_detect),
}

# Layer types a model yaml may name (the classes of LAYER_RULES).
MODULES: dict[str, type[nn.Module]] = {name: rule.cls for name, rule in LAYER_RULES.items()}


# --------------------------------------------------------------------------------- building
def _load_cfg(cfg: dict | str | Path) -> tuple[dict, str]:
    """Return (a private deep copy of the model dict, a name for error messages)."""
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg), str(cfg.get("yaml_file", "<model dict>"))
    path = Path(cfg)
    if not path.is_file():
        # Bare names such as 'yolov5s.yaml' resolve to the files shipped next to this module.
        shipped = Path(__file__).parent / path.name
        if path.parent == Path(".") and shipped.is_file():
            path = shipped
        else:
            raise FileNotFoundError(f"model yaml not found: {cfg}")
    with open(path, encoding="utf-8") as f:
        d = yaml.safe_load(f)
    if not isinstance(d, dict):
        raise ValueError(f"{path}: not a model yaml (expected a mapping at top level)")
    d["yaml_file"] = path.name
    return d, str(path)


def _check_top_level(d: dict, where: str) -> None:
    """One-line ValueErrors for missing or malformed top-level entries."""
    for key in _REQUIRED_KEYS:
        if key not in d:
            raise ValueError(f"{where}: model yaml lacks the '{key}' entry")
    nc = d["nc"]
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise ValueError(f"{where}: nc must be a positive integer, got {nc!r}")
    for key in ("depth_multiple", "width_multiple"):
        v = d[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"{where}: {key} must be a positive number, got {v!r}")
    for key in ("backbone", "head"):
        if not isinstance(d[key], list):
            raise ValueError(f"{where}: '{key}' must be a list of [from, number, module, args] rows")


def _row_sources(f: Any, index: int) -> list[int]:
    """Validated `absolute_sources`: every entry an int naming an earlier layer (or the image for layer 0)."""
    entries = [f] if isinstance(f, int) else f
    if isinstance(f, bool) or not isinstance(entries, list) or not entries \
            or not all(isinstance(j, int) and not isinstance(j, bool) for j in entries):
        raise ValueError(f"'from' must be an int or a list of ints, got {f!r}")
    sources = absolute_sources(f, index)
    if not all(0 <= j < index or (index == 0 and j == -1) for j in sources):
        raise ValueError(f"'from' {f!r} must name earlier layers only")
    return sources


def _resolve_symbols(args: list, nc: int, anchors: Any) -> tuple[Any, ...]:
    """yaml strings standing for values become those values; others (e.g. 'nearest') stay."""
    symbols = {"nc": nc, "anchors": anchors, "None": None, "True": True, "False": False}
    return tuple(symbols.get(a, a) if isinstance(a, str) else a for a in args)


def _build_row(row: Any, index: int, widths: dict[int, int | None], d: dict) -> tuple[nn.Module, int | None]:
    """One yaml row -> (layer with .i .f .type .np, its output width). Raises plain ValueErrors."""
    if not isinstance(row, (list, tuple)) or len(row) != 4:
        raise ValueError(f"must be [from, number, module, args], got {row!r}")
    f, number, name, args = row
    rule = LAYER_RULES.get(name) if isinstance(name, str) else None
    if rule is None:
        raise ValueError(f"unknown module {name!r}; known: {sorted(LAYER_RULES)}")
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(f"{name}: number must be a positive integer, got {number!r}")
    if args is not None and not isinstance(args, list):
        raise ValueError(f"{name}: args must be a list, got {args!r}")
    in_widths = []
    for src in _row_sources(f, index):
        if widths[src] is None:
            raise ValueError(f"{name}: reads layer {src}, which outputs no feature map")
        in_widths.append(widths[src])
    context = RowContext(args=_resolve_symbols(args or [], int(d["nc"]), d["anchors"]),
                         in_widths=tuple(in_widths),
                         repeats=scale_repeats(number, float(d["depth_multiple"])),
                         width_multiple=float(d["width_multiple"]))
    plan = rule.plan(context)
    try:
        copies = [rule.cls(*plan.args) for _ in range(plan.copies)]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}{list(plan.args)}: {e}") from e
    layer = copies[0] if len(copies) == 1 else nn.Sequential(*copies)
    layer.i, layer.f = index, f
    layer.type = f"{rule.cls.__module__}.{rule.cls.__qualname__}"
    layer.np = sum(p.numel() for p in layer.parameters())
    return layer, plan.out_width


def build_layers(d: dict, ch: int, where: str) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a model dict: (nn.Sequential `model`, `retained_outputs` of it).

    Each layer gets `.i` (index), `.f` (the yaml `from`), `.type` (class path), `.np` (parameter
    count), as official checkpoints carry them. Errors are one-line ValueErrors naming `where`
    and the layer. The last row must be the Detect layer.
    """
    _check_top_level(d, where)
    rows = list(d["backbone"]) + list(d["head"])
    if not rows:
        raise ValueError(f"{where}: the model has no layers")
    widths: dict[int, int | None] = {-1: ch}  # output channels per layer index; -1 is the image
    layers: list[nn.Module] = []
    for index, row in enumerate(rows):
        try:
            layer, widths[index] = _build_row(row, index, widths, d)
        except ValueError as e:
            raise ValueError(f"{where}: layer {index}: {' '.join(str(e).split())}") from e
        layers.append(layer)
    if not isinstance(layers[-1], Detect):
        raise ValueError(f"{where}: layer {len(layers) - 1}: the last layer must be Detect")
    return nn.Sequential(*layers), retained_outputs(layers)


# ------------------------------------------------------------------------------------ model
class DetectionModel(nn.Module):
    """A YOLOv5 detector: yaml -> nn.Sequential `model` ending in a `Detect` layer.

    Args:
        cfg: model yaml path (or shipped name such as 'yolov5s.yaml') or an already-loaded dict.
        ch: input channels (a `ch` entry of the yaml takes precedence, as in checkpoints).
        nc: number of classes; overrides the yaml's `nc` when given.

    Attributes: `yaml` (the model dict), `yaml_file`, `model`, `save` (see `retained_outputs`),
    `nc`, `names`, `stride` (nl,) pixels, the same tensor as `detect.stride`.

    forward(x (bs, ch, H, W), H and W multiples of the largest stride):
      training -> list of raw (bs, na, H/s, W/s, nc+5) per level;
      eval -> (decoded (bs, N, nc+5), raw list) — see `Detect`.
    """

    def __init__(self, cfg: dict | str | Path = "yolov5s.yaml", ch: int = 3, nc: int | None = None) -> None:
        super().__init__()
        self.yaml, where = _load_cfg(cfg)
        self.yaml_file = self.yaml.get("yaml_file", "")
        ch = self.yaml["ch"] = int(self.yaml.get("ch", ch))
        if nc is not None:
            self.yaml["nc"] = int(nc)
        self.model, self.save = build_layers(self.yaml, ch, where)
        self.nc = int(self.yaml["nc"])
        self.names = [f"class{i}" for i in range(self.nc)]
        if self.yaml.get("activation") is not None:
            self._set_activation(self.yaml["activation"], where)

        detect = self.detect
        detect.stride = self.stride = self._measure_strides(ch)
        self._set_anchors(where)
        self._init_detect_biases()

    # ----------------------------------------------------------------------------------- build
    def _set_activation(self, spec: str, where: str) -> None:
        """Replace the default SiLU of every Conv block by the yaml's `activation`."""
        act = parse_activation(spec, where)  # fails early on an unsupported name
        for block in self.modules():
            if isinstance(block, Conv) and isinstance(block.act, nn.SiLU):
                block.act = copy.deepcopy(act)

    @torch.no_grad()
    def _measure_strides(self, ch: int) -> torch.Tensor:
        """Strides (nl,): probe image side / height of each feature map entering Detect."""
        with _eval_mode(self):
            for side in _STRIDE_PROBES:
                last = side == _STRIDE_PROBES[-1]
                try:
                    feats = self._forward_layers(torch.zeros(1, ch, side, side), stop_at_detect=True)
                except RuntimeError:  # too small for a deep model: the larger probe will do
                    if last:
                        raise
                    continue
                if last or min(t.shape[-2] for t in feats) >= 2:
                    return torch.tensor([side / t.shape[-2] for t in feats], dtype=torch.float32)
        raise AssertionError("unreachable: the last probe always returns")

    @torch.no_grad()
    def _set_anchors(self, where: str) -> None:
        """Detect's pixel anchors (as built) -> level order checked -> grid units.

        A count-only `anchors:` left all-zero sets; they become `placeholder_anchors`. The order
        check runs on pixels (see `anchor_levels_reversed`) before the division by stride.
        """
        det = self.detect
        pixels = det.anchors.clone()
        if not pixels.any():
            pixels = placeholder_anchors(det.na, det.stride)
        if pixels.is_meta:  # a shapes-only build (models.meta_shapes) made them: no values to check or report
            return
        if anchor_levels_reversed(pixels, det.stride):
            LOGGER.info("%s: anchor sets listed from coarse to fine level; reversing them", where)
            pixels = pixels.flip(0)
        det.anchors.copy_(pixels / det.stride.view(-1, 1, 1))

    @torch.no_grad()
    def _init_detect_biases(self) -> None:
        """Add `detect_bias_prior` of each level to its output conv's bias."""
        det = self.detect
        for conv, stride in zip(det.m, det.stride.tolist()):
            conv.bias.add_(detect_bias_prior(det.nc, det.na, stride).to(conv.bias))

    # --------------------------------------------------------------------------------- forward
    def _forward_layers(self, x: torch.Tensor, stop_at_detect: bool = False):
        """Run the layers in order; with stop_at_detect return the list of tensors entering Detect.

        `live` maps layer index -> output (-1: the image). Each layer looks its inputs up there;
        once layer i has run, the output of layer i-1 is released unless `save` names it.
        """
        live: dict[int, Any] = {-1: x}
        out: Any = x
        for layer in self.model:
            inputs = [live[j] for j in absolute_sources(layer.f, layer.i)]
            feed = inputs[0] if isinstance(layer.f, int) else inputs
            if stop_at_detect and isinstance(layer, Detect):
                return feed
            out = layer(feed)
            if layer.i - 1 not in self.save:
                live.pop(layer.i - 1, None)
            live[layer.i] = out
        return out

    def forward(self, x: torch.Tensor):
        """(bs, ch, H, W) -> see the class docstring."""
        return self._forward_layers(x)

    def _apply(self, fn, recurse: bool = True):
        # Keep the model-level `stride` the same tensor as Detect's after .to()/.half()/...
        super()._apply(fn, recurse)
        self.stride = self.detect.stride
        return self

    # ------------------------------------------------------------------------------- utilities
    @property
    def detect(self) -> Detect:
        """The Detect layer (the last one in `model`)."""
        for m in reversed(self.model):
            if isinstance(m, Detect):
                return m
        raise AttributeError("model has no Detect layer")

    def fuse(self) -> DetectionModel:
        """Fold every BatchNorm into its conv (inference only; changes state_dict keys)."""
        for m in self.modules():
            if isinstance(m, Conv):
                m.fuse_bn()
        return self

    def info(self, imgsz: int | tuple[int, int] = 640) -> dict[str, float | int]:
        """Parameter count and GFLOPs at `imgsz` (FLOPs = 2·MACs, the YOLOv5 convention).

        FLOPs are counted on a square image whose side is the largest stride (at least 32) and
        scaled by area, which is exact for conv layers when imgsz is a multiple of that stride.
        """
        h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
        side = max(int(self.stride.max()), 32)
        p0 = next(self.parameters())
        probe = torch.zeros(1, int(self.yaml.get("ch", 3)), side, side, device=p0.device, dtype=p0.dtype)
        counter = FlopCounterMode(display=False)
        with _eval_mode(self), torch.no_grad(), counter:
            self._forward_layers(probe)
        return {"params": sum(p.numel() for p in self.parameters()),
                "gflops": counter.get_total_flops() / 1e9 * (h / side) * (w / side),
                "layers": len(list(self.modules()))}


# Name used by YOLOv5 v5.0 - v6.1 for the same class.
Model = DetectionModel

__all__ = ["ACTIVATIONS", "LAYER_RULES", "MODULES", "Detect", "DetectionModel", "LayerPlan", "LayerRule", "Model",
           "RowContext", "absolute_sources", "anchor_levels_reversed", "build_layers", "detect_bias_prior",
           "make_divisible", "parse_activation", "placeholder_anchors", "retained_outputs", "scale_repeats"]
