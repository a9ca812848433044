"""Building blocks of YOLOv5 (v5.0 - v7.0) detectors.

Attribute names (`conv`, `bn`, `act`, `cv1`, `cv2`, `cv3`, `m`, `d`) are chosen so that the
state_dict keys equal those of official YOLOv5 checkpoints; do not rename them.

Shapes: every block maps (B, c1, H, W) -> (B, c2, H', W') with H' = H / stride.
"""

from __future__ import annotations

import torch
from torch import nn

# BatchNorm settings used by YOLOv5 for every Conv block.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def autopad(k: int | tuple[int, int], p: int | tuple[int, int] | None = None, d: int = 1):
    """'Same' padding for an odd kernel `k` with dilation `d` (the effective kernel is d*(k-1)+1)."""
    if p is not None:
        return p
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else tuple(d * (x - 1) + 1 for x in k)
    return k // 2 if isinstance(k, int) else tuple(x // 2 for x in k)


class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d(eps 1e-3, momentum 0.03) -> activation.

    `act`: True for SiLU, False/None for identity, or an nn.Module to use as is.
    After `fuse_bn()` the BN is folded into the conv (which then has a bias) and `bn` becomes
    an nn.Identity, so the forward stays the same code path.
    """

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 d: int = 1, act: bool | nn.Module = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2, eps=BN_EPS, momentum=BN_MOMENTUM)
        if act is True:
            self.act = nn.SiLU()
        elif isinstance(act, nn.Module):
            self.act = act
        else:
            self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c1, H, W) -> (B, c2, H/s, W/s)."""
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def fuse_bn(self) -> None:
        """Fold BatchNorm into the conv: w' = w·γ/√(σ²+ε), b' = β + (b − μ)·γ/√(σ²+ε)."""
        bn = self.bn
        if not isinstance(bn, nn.BatchNorm2d):
            return  # already fused
        conv = self.conv
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                          conv.padding, dilation=conv.dilation, groups=conv.groups, bias=True)
        fused = fused.to(device=conv.weight.device, dtype=conv.weight.dtype)
        fused.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        fused.bias.copy_(bn.bias + (bias - bn.running_mean) * scale)
        fused.requires_grad_(False)
        self.conv = fused
        self.bn = nn.Identity()


class Bottleneck(nn.Module):
    """1×1 conv to int(c2·e) then 3×3 conv to c2; residual add when `shortcut` and c1 == c2."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_, c2, 3, 1, g=g)
        self.add = bool(shortcut and c1 == c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c1, H, W) -> (B, c2, H, W)."""
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C3(nn.Module):
    """CSP block with three convs: cv3(cat(m(cv1(x)), cv2(x))), hidden width int(c2·e)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1,
                 e: float = 0.5) -> None:
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0) for _ in range(n)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c1, H, W) -> (B, c2, H, W)."""
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


class SPPF(nn.Module):
    """Fast spatial pyramid pooling: three chained k×k max-pools (stride 1) instead of 5/9/13.

    cv2 sees cat(x, p(x), p(p(x)), p(p(p(x)))) with x = cv1(input) of c1//2 channels.
    """

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * 4, c2, 1, 1)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c1, H, W) -> (B, c2, H, W)."""
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(torch.cat((x, y1, y2, self.m(y2)), 1))


class SPP(nn.Module):
    """Spatial pyramid pooling (YOLOv5 v5.0): parallel max-pools of sizes `k`, concatenated."""

    def __init__(self, c1: int, c2: int, k: tuple[int, ...] | list[int] = (5, 9, 13)) -> None:
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c1, H, W) -> (B, c2, H, W)."""
        x = self.cv1(x)
        return self.cv2(torch.cat([x] + [m(x) for m in self.m], 1))


class Focus(nn.Module):
    """Space-to-depth (YOLOv5 v5.0 stem): (B, c1, H, W) -> (B, 4·c1, H/2, W/2) -> Conv to c2.

    The four pixel phases are stacked in the order (even,even), (odd,even), (even,odd),
    (odd,odd) of (row, col), which the pretrained weights of layer 0 depend on.
    """

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1,
                 act: bool | nn.Module = True) -> None:
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c1, H, W) -> (B, c2, H/2, W/2) for s=1."""
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2],
                                    x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along dimension `d` (channels by default)."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        """list of (B, c_i, H, W) -> (B, Σc_i, H, W)."""
        return torch.cat(x, self.d)
