"""The training objective: YOLOv5 detection loss plus named distillation terms, weighted in ONE place.

Every term is reported under its own name (`det/box`, `det/obj`, `det/cls`, `kd/out_box`,
`kd/feat_pkd`, ...) so the progress bar and results.csv show what the optimiser is pushing on.
"""

from __future__ import annotations

import torch

from utils.loss import DetectionLoss


class TrainingCriterion:
    """total = batch_size · (Σ det terms + kd_scale · Σ_k weight_k · kd_term_k).

    The detection part is YOLOv5's loss (already × batch size, as YOLOv5 scales it). KD terms are
    multiplied by the batch size too, so that `--d_weight`/`--f_weight` keep their meaning relative to
    the detection loss whatever the batch size. `kd_scale` carries the distillation schedule.
    """

    def __init__(self, detection_loss: DetectionLoss, distiller: torch.nn.Module | None = None) -> None:
        self.detection_loss = detection_loss
        self.distiller = distiller

    def __call__(
        self, imgs: torch.Tensor, preds: list[torch.Tensor], targets: torch.Tensor, kd_scale: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """imgs (B,3,H,W) float 0-1; preds: student raw maps per level; targets (N,6).

        Returns the scalar loss to back-propagate and the detached, weighted named terms.
        """
        total, items = self.detection_loss(preds, targets)
        terms = {"det/box": items[0], "det/obj": items[1], "det/cls": items[2]}
        if self.distiller is not None and kd_scale > 0:
            batch_size = imgs.shape[0]
            for name, value in self.distiller(imgs, preds, targets).items():
                weighted = self.distiller.weights[name] * kd_scale * value.float()
                total = total + weighted * batch_size
                terms[name] = weighted.detach()
        return total.reshape(1), terms
