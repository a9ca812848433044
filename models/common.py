"""Building blocks of YOLOv5 (v5.0 - v7.0) detectors.

Attribute names (`conv`, `bn`, `act`, `cv1`, `cv2`, `cv3`, `m`, `d`) are chosen so that the
state_dict keys equal those of official YOLOv5 checkpoints; do not rename them.

Shapes: every block maps (B, c1, H, W) -> (B, c2, H', W') with H' = H / stride.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

# BatchNorm settings used by YOLOv5 for every Conv block.
BN_EPS = 1e-3
BN_MOMENTUM = 0.03


def autopad(k: int | tuple[int, int], p: int | tuple[int, int] | None = None, d: int = 1):
    """Padding for kernel `k` (int or per-axis) and dilation `d`; an explicit `p` wins.

    Half the effective kernel size d·(k−1)+1, rounded down: 'same' output size at stride 1 for odd k.
    """
    if p is not None:
        return p

    def half(size: int) -> int:
        return (d * (size - 1) + 1) // 2

    return half(k) if isinstance(k, int) else tuple(half(x) for x in k)


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
        """Fold the BatchNorm into the conv for inference (running statistics, not batch ones).

        y = γ·(W∗x − μ)/√(σ²+ε) + β is a conv with weight W·γ/√(σ²+ε) and bias β − μ·γ/√(σ²+ε);
        torch.nn.utils.fusion computes it. Afterwards `bn` is an nn.Identity, so `forward` is
        unchanged. No-op when already fused.
        """
        if not isinstance(self.bn, nn.modules.batchnorm._BatchNorm):  # BatchNorm2d or SyncBatchNorm
            return
        fused = copy.deepcopy(self.conv)  # same geometry, device and dtype; gains a bias below
        fused.weight, fused.bias = fuse_conv_bn_weights(
            self.conv.weight, self.conv.bias, self.bn.running_mean, self.bn.running_var, self.bn.eps,
            self.bn.weight, self.bn.bias)
        self.conv = fused.requires_grad_(False)
        self.bn = nn.Identity()


class Bottleneck(nn.Module):
    """1×1 conv to int(c2·e) then 3×3 conv to c2; residual add when `shortcut` and c1 == c2."""

    def __init__(self, c1: int, c2: int, shortcut: bool = True, g: int = 1, e: float = 0.5) -> None:
        super().__init__()
        hidden = int(c2 * e)
        self.cv1 = Conv(c1, hidden)  # 1×1 squeeze
        self.cv2 = Conv(hidden, c2, k=3, g=g)
        self.add = bool(shortcut and c1 == c2)  # attribute name read by YOLOv5 on pickled models

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c1, H, W) -> (B, c2, H, W)."""
        out = self.cv2(self.cv1(x))
        return out + x if self.add else out


class C3(nn.Module):
    """CSP block with three convs: cv3(cat(m(cv1(x)), cv2(x))), hidden width int(c2·e)."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1,
                 e: float = 0.5) -> None:
        super().__init__()
        hidden = int(c2 * e)
        # Registration order cv1, cv2, cv3, m is the official state_dict key order.
        self.cv1 = Conv(c1, hidden)  # into the bottleneck stack
        self.cv2 = Conv(c1, hidden)  # bypass
        self.cv3 = Conv(hidden * 2, c2)  # merges both paths
        self.m = nn.Sequential(*[Bottleneck(hidden, hidden, shortcut, g, e=1.0) for _ in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c1, H, W) -> (B, c2, H, W)."""
        deep = self.m(self.cv1(x))  # bottleneck path
        shallow = self.cv2(x)  # bypass path
        return self.cv3(torch.cat([deep, shallow], dim=1))


class SPPF(nn.Module):
    """Fast spatial pyramid pooling: three chained k×k max-pools (stride 1) instead of 5/9/13.

    cv2 sees cat(x, p(x), p(p(x)), p(p(p(x)))) with x = cv1(input) of c1//2 channels.
    """

    def __init__(self, c1: int, c2: int, k: int = 5) -> None:
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden)
        self.cv2 = Conv(hidden * 4, c2)  # the input and its three pooled versions
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c1, H, W) -> (B, c2, H, W)."""
        pyramid = [self.cv1(x)]
        for _ in range(3):  # each pass widens the receptive field by k - 1
            pyramid.append(self.m(pyramid[-1]))
        return self.cv2(torch.cat(pyramid, dim=1))


class SPP(nn.Module):
    """Spatial pyramid pooling (YOLOv5 v5.0): parallel max-pools of sizes `k`, concatenated."""

    def __init__(self, c1: int, c2: int, k: tuple[int, ...] | list[int] = (5, 9, 13)) -> None:
        super().__init__()
        hidden = c1 // 2
        self.cv1 = Conv(c1, hidden)
        self.cv2 = Conv(hidden * (len(k) + 1), c2)  # the input and one pooled version per size
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c1, H, W) -> (B, c2, H, W)."""
        reduced = self.cv1(x)
        pooled = [pool(reduced) for pool in self.m]
        return self.cv2(torch.cat([reduced, *pooled], dim=1))


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
        phases = [x[..., row::2, col::2] for col in (0, 1) for row in (0, 1)]
        return self.conv(torch.cat(phases, dim=1))


class Concat(nn.Module):
    """Concatenate a list of tensors along dimension `d` (channels by default)."""

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        """list of (B, c_i, H, W) -> (B, Σc_i, H, W)."""
        return torch.cat(x, self.d)
