"""Forward hooks that record the feature maps entering a YOLOv5 ``Detect`` layer.

The distiller never edits model code: it observes. ``FeatureTaps(model)`` hooks the layers whose
outputs feed ``Detect`` (``model.detect.f``, i.e. P3/P4/P5 in the standard models). With
``pre_activation=True`` it hooks the BatchNorm of each such layer's final Conv instead (C3 →
``cv3.bn``, Conv → ``bn``), so the recorded tensors are the values just before SiLU (what the
Overhaul method needs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from utils.torch_utils import unwrap_model


def detect_layer(model: nn.Module) -> nn.Module:
    """The ``Detect`` layer of a DetectionModel (``.detect``, else the last entry of ``.model``)."""
    model = unwrap_model(model)
    det = getattr(model, "detect", None)
    if det is None and isinstance(getattr(model, "model", None), nn.Sequential):
        det = model.model[-1]
    if det is None or not hasattr(det, "f"):
        raise ValueError(f"FeatureTaps: {type(model).__name__} has no Detect layer with a `.f` attribute")
    return det


def detect_inputs(model: nn.Module, levels: Sequence[int] | None = None) -> list[nn.Module]:
    """The layers whose outputs enter Detect, in Detect's level order (P3, P4, P5 …); only the
    ``levels`` given (indices into that order), in their order, when not None."""
    model = unwrap_model(model)
    det = detect_layer(model)
    f = [det.f] if isinstance(det.f, int) else list(det.f)
    i_det = int(getattr(det, "i", len(model.model) - 1))
    layers = [model.model[j if j >= 0 else i_det + j] for j in f]  # negative f counts back from Detect
    return layers if levels is None else [layers[k] for k in levels]


def final_conv(layer: nn.Module) -> nn.Module:
    """The Conv block (with ``.bn`` and ``.act``) producing ``layer``'s output.

    C3 → ``cv3``; Conv → the layer itself; SPPF / Bottleneck-like blocks (``cv2`` last) → ``cv2``.
    """
    for owner in (getattr(layer, "cv3", None), layer, getattr(layer, "cv2", None)):
        if isinstance(getattr(owner, "bn", None), nn.modules.batchnorm._BatchNorm):  # SyncBatchNorm too
            return owner
    raise ValueError(f"FeatureTaps: cannot find the pre-activation BN of a {type(layer).__name__} layer "
                     f"(fused model? pre-activation taps need the BN layers)")


def final_bn(layer: nn.Module) -> nn.BatchNorm2d:
    """The BN whose output is ``layer``'s last pre-activation tensor (see :func:`final_conv`)."""
    return final_conv(layer).bn


def detect_input_channels(model: nn.Module, levels: Sequence[int] | None = None) -> list[int]:
    """Channels of each tensor entering Detect (of the ``levels`` given), read from its 1×1 output convs."""
    channels = [int(m.in_channels) for m in detect_layer(model).m]
    return channels if levels is None else [channels[k] for k in levels]


class FeatureTaps:
    """Record the tensors entering Detect on every forward of ``model``.

    Args:
        model: a DetectionModel, possibly wrapped in DDP / DataParallel (hooks go on the inner one).
        pre_activation: record the BN outputs of the final Conv of each layer (pre-SiLU) instead of
            the layer outputs.
        levels: the Detect levels to record (indices in Detect's order; default all), e.g. the
            teacher levels whose strides match a student with fewer levels.

    ``features``: list (one per level) of the latest forward's tensors, in Detect's level order;
        it is reset at the start of every forward of ``model``. Tensors keep their autograd graph
        (the student's KD gradient flows through them).
    ``modules``: the hooked modules; ``remove()`` detaches every hook.

    Hooks are plain closures (``copy.deepcopy`` shares, not copies, them) and check the module they
    fire on, so a deep copy of the model (e.g. the EMA) does not write into this object.
    """

    def __init__(self, model: nn.Module, pre_activation: bool = False, levels: Sequence[int] | None = None) -> None:
        self.model = unwrap_model(model)
        self.pre_activation = bool(pre_activation)
        self.levels = None if levels is None else list(levels)
        layers = detect_inputs(self.model, self.levels)
        self.modules: list[nn.Module] = [final_bn(m) for m in layers] if pre_activation else layers
        self.features: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles = []
        root = self.model

        def reset(module: nn.Module, args: Any) -> None:
            if module is root:
                self.features = [None] * len(self.modules)

        self._handles.append(root.register_forward_pre_hook(reset))
        for k, mod in enumerate(self.modules):
            self._handles.append(mod.register_forward_hook(self._recorder(k, mod)))

    def _recorder(self, k: int, target: nn.Module):
        def record(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if module is target:
                self.features[k] = output

        return record

    @property
    def channels(self) -> list[int]:
        """Channels per level (from the hooked modules when they say, else from Detect's convs)."""
        if self.pre_activation:
            return [int(m.num_features) for m in self.modules]
        return detect_input_channels(self.model, self.levels)

    def get(self) -> list[torch.Tensor]:
        """The recorded features; raises if the model has not run since the taps were reset."""
        if any(f is None for f in self.features):
            raise RuntimeError("FeatureTaps: no features recorded — run the model's forward first")
        return list(self.features)  # type: ignore[arg-type]

    def clear(self) -> None:
        """Drop the references to the last forward's tensors (frees their memory once unused)."""
        self.features = [None] * len(self.modules)

    def remove(self) -> None:
        """Remove every hook; the object records nothing afterwards."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.clear()


__all__ = [
    "FeatureTaps",
    "detect_input_channels",
    "detect_inputs",
    "detect_layer",
    "final_bn",
    "final_conv",
]
