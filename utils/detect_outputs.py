"""The detector output convention, read in one place.

A YOLOv5 ``Detect`` head returns, in training mode, the list of raw per-level tensors
(bs, na, ny, nx, 5 + nc); in eval mode the pair ``(decoded (bs, N, 5 + nc), raw list)``; an
exported or wrapped model may return the decoded tensor alone. :func:`split_outputs` and
:func:`raw_outputs` are the only readers of that convention (evaluation, backends, export, the
detection loss). Imports nothing from the project (a leaf ``models/`` may use).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def split_outputs(out) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    """An eval-mode model output -> (decoded (bs, N, no), raw list or None)."""
    if isinstance(out, (tuple, list)) and len(out) == 2 and isinstance(out[0], torch.Tensor):
        return out[0], out[1]
    if isinstance(out, torch.Tensor):
        return out, None
    raise TypeError(f"unexpected model output {type(out).__name__}; expected (decoded, raw) from an eval-mode model")


def raw_outputs(out) -> Sequence[torch.Tensor]:
    """The raw per-level predictions of a model output in either mode (train: the list itself;
    eval: the second item of ``(decoded, raw)``)."""
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], list):
        return out[1]
    if isinstance(out, (list, tuple)):
        return out
    raise TypeError(f"model output {type(out).__name__}; expected a raw list or (decoded, raw)")
