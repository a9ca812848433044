"""Student → teacher feature connectors, and the small shape helpers the feature losses share.

A connector is trained together with the student (the optimiser gets ``Distiller.parameters()``),
is saved apart from the student (``last.pt['adapters']``) and is thrown away after training: the
deployed student never contains it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Connector(nn.Module):
    """1×1 convolution (no bias when followed by BN) mapping C_s student channels to C_t, + optional BN.

    Shapes: (N, C_s, H, W) → (N, C_t, H, W).

    Initialisation — identity-like: weight[i, i] = 1 for i < min(C_s, C_t), every other entry 0
    (bias 0; BN weight 1, bias 0). Why: with equal widths the connector starts as a no-op, so the
    distillation signal on step 0 is exactly the raw student/teacher mismatch rather than the
    mismatch with a random projection, and the "student equals teacher ⇒ loss 0" limit holds at
    initialisation. With different widths the first min(C_s, C_t) channels are passed through and
    the rest start at zero; the zero rows/columns still receive gradient (∂L/∂W = δ·xᵀ is non-zero),
    so they train like a zero-initialised linear layer. Any channel pairing is arbitrary between two
    independently trained networks; this one is simply the cheapest neutral start.
    """

    def __init__(self, c_s: int, c_t: int, bn: bool = False) -> None:
        super().__init__()
        self.c_s, self.c_t = int(c_s), int(c_t)
        self.conv = nn.Conv2d(self.c_s, self.c_t, kernel_size=1, bias=not bn)
        self.bn = nn.BatchNorm2d(self.c_t) if bn else nn.Identity()
        self.reset_identity()

    @torch.no_grad()
    def reset_identity(self) -> None:
        """Set the identity-like initialisation described in the class docstring."""
        self.conv.weight.zero_()
        k = min(self.c_s, self.c_t)
        idx = torch.arange(k)
        self.conv.weight[idx, idx, 0, 0] = 1.0
        if self.conv.bias is not None:
            self.conv.bias.zero_()
        if isinstance(self.bn, nn.modules.batchnorm._BatchNorm):
            self.bn.reset_parameters()
            self.bn.reset_running_stats()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Connectors run in fp32 even when the student's forward ran under autocast: KD targets are
        # compared in fp32 and the adapter's tiny gradients should not underflow.
        return self.bn(self.conv(x.float()))


def make_connectors(c_s: list[int], c_t: list[int], always: bool, bn: bool = False) -> nn.ModuleList:
    """One connector per level; where ``always`` is False, levels with C_s == C_t get ``nn.Identity``."""
    if len(c_s) != len(c_t):
        raise ValueError(f"connectors: student has {len(c_s)} feature levels, teacher {len(c_t)}")
    return nn.ModuleList(
        Connector(s, t, bn=bn) if (always or s != t) else nn.Identity() for s, t in zip(c_s, c_t)
    )


def resize_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Bilinearly resize ``x`` (N, C, h, w) to the spatial size of ``ref`` (N, C', H, W) if they differ."""
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


def check_levels(s: list[torch.Tensor], t: list[torch.Tensor], name: str) -> None:
    """Raise a clear error when the two feature lists cannot be paired level by level."""
    if len(s) != len(t) or not s:
        raise ValueError(f"{name}: need the same non-zero number of student and teacher levels, got "
                         f"{len(s)} and {len(t)}")


__all__ = ["Connector", "check_levels", "make_connectors", "resize_to"]
