"""The placeholder-anchor convention, shared by the model builder and AutoAnchor.

A model yaml may give only the number of anchors per level (``anchors: 3``). The model then holds
the placeholder set below until AutoAnchor fits real anchors to the labels; AutoAnchor recognises
a model still holding it. Both sides read this one function, so they cannot drift apart. Imports
nothing from the project (a leaf ``models/`` may use).
"""

from __future__ import annotations

import torch

# Placeholder anchor sides, in grid cells of their level: na squares from 2 to 8 cells.
PLACEHOLDER_ANCHOR_CELLS = (2.0, 8.0)


def placeholder_anchors(na: int, strides: torch.Tensor) -> torch.Tensor:
    """(nl, na, 2) pixel anchors for yamls giving only the number of anchors per level.

    AutoAnchor replaces them with anchors fitted to the labels. Until then each level holds na
    squares with sides from 2 to 8 of its grid cells (geometric steps; one anchor: 4 cells), i.e.
    2·stride … 8·stride pixels, so anchor area grows with stride as in every real anchor set.
    """
    lo, hi = PLACEHOLDER_ANCHOR_CELLS
    steps = torch.linspace(0.0, 1.0, na) if na > 1 else torch.tensor([0.5])
    cells = lo * (hi / lo) ** steps  # (na,)
    side = cells.view(1, na, 1) * strides.float().view(-1, 1, 1)  # (nl, na, 1) pixels
    return side.expand(-1, -1, 2).clone()
