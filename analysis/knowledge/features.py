"""Stage 1 of the knowledge analysis: the feature f(x) whose tolerance to input noise is measured."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distill.taps import FeatureTaps, detect_layer
from utils.torch_utils import unwrap_model


class _FeaturesReadyError(Exception):
    """Raised by a hook once every wanted tensor is recorded, so the rest of the forward is skipped."""


class FeatureExtractor:
    """Callable ``x (B, 3, H, W) → f(x) (B, D)``: a model's feature, flattened, differentiable in x.

    ``layer=None``: the tensors entering Detect (P3/P4/P5 via :class:`distill.taps.FeatureTaps`),
    each flattened to (B, C_l·H_l·W_l) and concatenated in level order. ``layer=k``: the output of
    ``model.model[k]`` (negative k counts from the end; Detect itself is refused). The forward stops
    right after the last wanted layer (nothing later is computed).

    While open, the model is in eval mode (BN uses running statistics, so the B images and noise
    samples of a batch never interact) and its parameters do not require grad (only the input
    does); :meth:`close` (or leaving the ``with`` block) restores both and removes the hooks.
    """

    def __init__(self, model: nn.Module, layer: int | None = None) -> None:
        self.model = unwrap_model(model)
        self._taps: FeatureTaps | None = None
        self._out: torch.Tensor | None = None
        self._handles: list[Any] = []
        if layer is None:
            self._hook_detect_inputs()
        else:
            self._hook_layer(int(layer))
        self._training = self.model.training
        self._grad = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self._grad:
            p.requires_grad_(False)

    def _hook_detect_inputs(self) -> None:
        self._taps = FeatureTaps(self.model)
        last = max(self._taps.modules, key=lambda m: int(getattr(m, "i", -1)))
        self._handles.append(last.register_forward_hook(self._stop))  # fires after the tap's hook
        self.description = "Detect inputs (layers " + ", ".join(str(m.i) for m in self._taps.modules) + ")"

    def _hook_layer(self, layer: int) -> None:
        layers = self.model.model
        n = len(layers)
        k = layer + n if layer < 0 else layer
        if not 0 <= k < n:
            raise ValueError(f"--layer {layer}: the model has layers 0..{n - 1}")
        if layers[k] is detect_layer(self.model):
            raise ValueError(f"--layer {layer} is the Detect layer; pick one of the layers feeding it or earlier")
        self._handles.append(layers[k].register_forward_hook(self._record))
        self.description = f"layer {k} ({type(layers[k]).__name__})"

    @staticmethod
    def _stop(module: nn.Module, args: Any, output: Any) -> None:
        raise _FeaturesReadyError

    def _record(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        self._out = output
        raise _FeaturesReadyError

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) as a (B, D) float tensor."""
        try:
            self.model(x)
        except _FeaturesReadyError:
            pass
        else:  # only reachable when a hook did not fire (e.g. a model that skips the layer)
            raise RuntimeError(f"FeatureExtractor: {self.description} was not reached in the forward pass")
        if self._taps is not None:
            feats = self._taps.get()
            self._taps.clear()
        else:
            feats, self._out = [self._out], None
        return torch.cat([f.flatten(1).float() for f in feats], 1)

    def close(self) -> None:
        """Remove the hooks; restore the model's train/eval mode and requires_grad flags."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._taps is not None:
            self._taps.remove()
            self._taps = None
        for p, flag in self._grad:
            p.requires_grad_(flag)
        self.model.train(self._training)

    def __enter__(self) -> FeatureExtractor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
