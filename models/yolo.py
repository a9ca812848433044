"""YOLOv5 detection model built from a model yaml, with the official state_dict layout.

A model yaml holds `nc`, `depth_multiple`, `width_multiple`, `anchors` and two lists of rows
`[from, number, module, args]` (`backbone`, then `head`). Module names are resolved through an
explicit table (never `eval`), so only known layer types can be built.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.common import C3, SPP, SPPF, Bottleneck, Concat, Conv, Focus

# Layer types a model yaml may name. Blocks that take (c1, c2, ...) get their channel arguments
# filled in by the parser; C3 also receives its repeat count.
MODULES: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "C3": C3,
    "SPPF": SPPF,
    "SPP": SPP,
    "Focus": Focus,
    "Bottleneck": Bottleneck,
    "Concat": Concat,
    "nn.Upsample": nn.Upsample,
}
_CHANNEL_BLOCKS = (Conv, C3, SPPF, SPP, Focus, Bottleneck)
_REPEAT_BLOCKS = (C3,)

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
# for P5/P6 models; the larger one is the fallback for deeper ones.
_STRIDE_PROBES = (64, 256)


def make_divisible(x: float, divisor: int = 8) -> int:
    """Smallest multiple of `divisor` that is >= x (YOLOv5 channel rounding)."""
    return int(math.ceil(x / divisor) * divisor)


def parse_activation(spec: str, where: str = "model yaml") -> nn.Module:
    """Build an activation from a string such as 'nn.SiLU()' or 'nn.LeakyReLU(0.1)' (no eval)."""
    match = re.fullmatch(r"\s*(?:torch\.)?(?:nn\.)?(\w+)\s*(?:\((.*)\))?\s*", str(spec))
    if not match or match.group(1) not in ACTIVATIONS:
        raise ValueError(f"{where}: unsupported activation {spec!r}; known: {sorted(ACTIVATIONS)}")
    name, arg_text = match.group(1), (match.group(2) or "").strip()
    args: list[float] = []
    for a in filter(None, (s.strip() for s in arg_text.split(","))):
        if "=" in a:
            a = a.split("=", 1)[1].strip()
        if a in ("True", "False"):
            continue  # `inplace=` flags do not change results
        try:
            args.append(float(a))
        except ValueError as e:
            raise ValueError(f"{where}: cannot parse activation argument {a!r} in {spec!r}") from e
    return ACTIVATIONS[name](*args)


class Detect(nn.Module):
    """YOLOv5 detection head: one 1×1 conv per level predicting na·(nc+5) channels per cell.

    Attributes: `nc`, `no` (= nc + 5), `nl` levels, `na` anchors per level, buffer `anchors`
    (nl, na, 2) in GRID units of each level, plain tensor attribute `stride` (nl,) in pixels.

    forward(list of nl tensors (bs, ch_i, ny_i, nx_i)):
      training: list of raw logits (bs, na, ny_i, nx_i, no).
      eval:     (decoded (bs, Σ na·ny_i·nx_i, no), raw list) with
                xy = (2σ(t_xy) − 0.5 + cell)·stride, wh = (2σ(t_wh))²·anchor_px,
                objectness and class scores = σ(logits).
    """

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
            if not self.training:
                s = p.sigmoid()
                stride = self.stride[i].to(p)
                anchor_px = (self.anchors[i] * stride).view(1, self.na, 1, 1, 2).to(p)
                xy = (s[..., 0:2] * 2 + self._grid(ny, nx, p)) * stride
                wh = (s[..., 2:4] * 2) ** 2 * anchor_px
                decoded.append(torch.cat((xy, wh, s[..., 4:]), -1).view(bs, -1, self.no))
        if self.training:
            return raw
        return torch.cat(decoded, 1), raw


MODULES["Detect"] = Detect


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


def _resolve_arg(a: Any, nc: int, anchors: Any) -> Any:
    """Map the symbolic yaml argument strings to values; other strings (e.g. 'nearest') stay."""
    if isinstance(a, str):
        table = {"nc": nc, "anchors": anchors, "None": None, "True": True, "False": False}
        if a in table:
            return table[a]
    return a


def parse_model(d: dict, ch: int, where: str) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a model dict. Returns (nn.Sequential of layers, sorted save indices).

    Each layer gets `.i` (index), `.f` (from), `.type` (class path string), `.np` (param count).
    """
    for key in ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head"):
        if key not in d:
            raise ValueError(f"{where}: model yaml lacks the '{key}' entry")
    nc, gd, gw, anchors = int(d["nc"]), float(d["depth_multiple"]), float(d["width_multiple"]), d["anchors"]
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else int(anchors)
    no = na * (nc + 5)

    layers: list[nn.Module] = []
    save: list[int] = []
    chs = [ch]  # output channels per layer; the input image before layer 0
    rows = list(d["backbone"]) + list(d["head"])
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise ValueError(f"{where}: layer {i} must be [from, number, module, args], got {row!r}")
        f, n, name, args = row
        if name not in MODULES:
            raise ValueError(f"{where}: unknown module {name!r} in layer {i}; known: {sorted(MODULES)}")
        m = MODULES[name]
        args = [_resolve_arg(a, nc, anchors) for a in (args or [])]
        n = max(round(n * gd), 1) if n > 1 else n  # depth scaling
        fs = [f] if isinstance(f, int) else list(f)

        if m in _CHANNEL_BLOCKS:
            c1, c2 = chs[f], args[0]
            if c2 != no:  # a conv that predicts outputs directly keeps its width
                c2 = make_divisible(c2 * gw, 8)
            args = [c1, c2, *args[1:]]
            if m in _REPEAT_BLOCKS:
                args.insert(2, n)
                n = 1
        elif m is Concat:
            c2 = sum(chs[x] for x in fs)
        elif m is Detect:
            args.append([chs[x] for x in fs])
            if isinstance(args[1], int):  # number of anchors only: placeholders, set by autoanchor
                args[1] = [list(range(args[1] * 2))] * len(fs)
            c2 = chs[f if isinstance(f, int) else -1]
        else:
            c2 = chs[f]

        module = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        module.i, module.f = i, f
        module.type = f"{type(module).__module__}.{type(module).__qualname__}"
        module.np = sum(p.numel() for p in module.parameters())
        save.extend(x % i for x in fs if x != -1)
        layers.append(module)
        if i == 0:
            chs = []  # from here on chs[j] is the output width of layer j
        chs.append(c2)
    return nn.Sequential(*layers), sorted(set(save))


class DetectionModel(nn.Module):
    """A YOLOv5 detector: yaml -> nn.Sequential `model` ending in a `Detect` layer.

    Args:
        cfg: model yaml path (or shipped name such as 'yolov5s.yaml') or an already-loaded dict.
        ch: input channels.
        nc: number of classes; overrides the yaml's `nc` when given.

    forward(x (bs, ch, H, W), H and W multiples of the largest stride):
      training -> list of raw (bs, na, H/s, W/s, nc+5) per level;
      eval -> (decoded (bs, N, nc+5), raw list) — see `Detect`.
    """

    def __init__(self, cfg: dict | str | Path = "yolov5s.yaml", ch: int = 3, nc: int | None = None) -> None:
        super().__init__()
        self.yaml, where = _load_cfg(cfg)
        self.yaml_file = self.yaml.get("yaml_file", "")
        ch = self.yaml["ch"] = int(self.yaml.get("ch", ch))
        if nc is not None and int(nc) != self.yaml.get("nc"):
            self.yaml["nc"] = int(nc)
        self.model, self.save = parse_model(self.yaml, ch, where)
        self.nc = int(self.yaml["nc"])
        self.names = [f"class{i}" for i in range(self.nc)]
        act = self.yaml.get("activation")
        if act is not None:
            self._set_activation(act, where)

        detect = self.detect
        detect.stride = self._measure_strides(ch)
        self.stride = detect.stride
        with torch.no_grad():
            detect.anchors /= detect.stride.view(-1, 1, 1)  # pixels -> grid units
        self._check_anchor_order()
        self._initialize_biases()

    # ----------------------------------------------------------------------------------- build
    def _set_activation(self, spec: str, where: str) -> None:
        """Replace the default SiLU of every Conv block by the yaml's `activation`."""
        parse_activation(spec, where)  # fail early on an unsupported name
        for m in self.modules():
            if isinstance(m, Conv) and isinstance(m.act, nn.SiLU):
                m.act = parse_activation(spec, where)

    @torch.no_grad()
    def _measure_strides(self, ch: int) -> torch.Tensor:
        """Strides (nl,) from the feature sizes entering Detect for a dummy image.

        Runs in eval mode so that BatchNorm running statistics stay untouched.
        """
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            for size in _STRIDE_PROBES:
                try:
                    feats = self._forward_layers(torch.zeros(1, ch, size, size), stop_at_detect=True)
                except RuntimeError:  # input too small for a deep model: try the larger probe
                    if size == _STRIDE_PROBES[-1]:
                        raise
                    continue
                if all(f.shape[-2] >= 2 for f in feats) or size == _STRIDE_PROBES[-1]:
                    break
        finally:
            for m, mode in modes:
                m.training = mode
        return torch.tensor([size / f.shape[-2] for f in feats], dtype=torch.float32)

    @torch.no_grad()
    def _check_anchor_order(self) -> None:
        """Anchor sets must grow with stride (small anchors on the fine level); flip if reversed."""
        m = self.detect
        area = m.anchors.prod(-1).mean(-1).view(-1)
        da, ds = area[-1] - area[0], m.stride[-1] - m.stride[0]
        if da and (da.sign() != ds.sign()):
            m.anchors[:] = m.anchors.flip(0)

    @torch.no_grad()
    def _initialize_biases(self) -> None:
        """Prior biases: objectness ≈ 8 objects per 640² image, class prob ≈ 0.6/nc."""
        m = self.detect
        for conv, s in zip(m.m, m.stride):
            b = conv.bias.view(m.na, -1)
            b[:, 4] += math.log(8 / (640 / float(s)) ** 2)
            b[:, 5:5 + m.nc] += math.log(0.6 / (m.nc - 0.99999))

    # --------------------------------------------------------------------------------- forward
    def _forward_layers(self, x: torch.Tensor, stop_at_detect: bool = False):
        """Run the layers; with stop_at_detect return the list of tensors entering Detect."""
        outputs: list[torch.Tensor | None] = []
        for m in self.model:
            if m.f != -1:
                x = outputs[m.f] if isinstance(m.f, int) else [x if j == -1 else outputs[j] for j in m.f]
            if stop_at_detect and isinstance(m, Detect):
                return x
            x = m(x)
            outputs.append(x if m.i in self.save else None)
        return x

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

        FLOPs are counted on an image of the largest stride and scaled by area, like YOLOv5,
        which is exact for conv layers when imgsz is a multiple of that stride.
        """
        h, w = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
        params = sum(p.numel() for p in self.parameters())
        s = max(int(self.stride.max()), 32)
        p0 = next(self.parameters())
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        counter = FlopCounterMode(display=False)
        try:
            with torch.no_grad(), counter:
                self._forward_layers(torch.zeros(1, self.yaml.get("ch", 3), s, s, device=p0.device, dtype=p0.dtype))
        finally:
            for m, mode in modes:
                m.training = mode
        gflops = counter.get_total_flops() / 1e9 * (h / s) * (w / s)
        return {"params": params, "gflops": gflops, "layers": len(list(self.modules()))}


# Name used by YOLOv5 v5.0 - v6.1 for the same class.
Model = DetectionModel

__all__ = ["ACTIVATIONS", "MODULES", "Detect", "DetectionModel", "Model", "make_divisible", "parse_model"]
