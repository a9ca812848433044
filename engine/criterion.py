"""The training objective: YOLOv5 detection loss plus named distillation terms, weighted in ONE place.

DETR-style: every term is computed unweighted under its own name (`det/box`, `det/obj`, `det/cls`,
`kd/out_box`, `kd/feat_pkd`, ...), one weight dict (:meth:`TrainingCriterion.weight_dict`) says how
much each counts, and the loss is their weighted sum. The progress bar and results.csv show each
weighted term, so what the optimiser is pushing on is visible.
"""

from __future__ import annotations

import torch

from utils.loss import DetectionLoss

DET_TERMS = ("det/box", "det/obj", "det/cls")


class TrainingCriterion:
    """total = bs · Σ_det w_k·det_k + Σ_kd w_k · kd_scale · kd_k · (bs, or 1 for Adlik's terms).

    The detection terms are YOLOv5's (after their hyp gains; YOLOv5 multiplies their sum by the batch
    size). KD terms are multiplied by the batch size too, so that `--d_weight`/`--f_weight` keep their
    meaning relative to the detection loss whatever the batch size — except the terms the distiller
    lists in `unscaled_terms` (`--d_output adlik`, the Adlik fork's published form, whose KD-to-
    detection ratio is therefore bs× weaker). Detection weights are 1 except chen's μ·hard
    (`Distiller.det_weights`). `kd_scale` (the distillation schedule) comes from :meth:`kd_scale`.
    """

    def __init__(self, detection_loss: DetectionLoss, distiller: torch.nn.Module | None = None) -> None:
        self.detection_loss = detection_loss
        self.distiller = distiller

    def kd_scale(self, epoch: float, epochs: int) -> float:
        """The distillation schedule's multiplier at ``epoch`` (0 without a distiller)."""
        return self.distiller.scale(epoch, epochs) if self.distiller is not None else 0.0

    def weight_dict(self, kd_scale: float, batch_size: int) -> dict[str, float]:
        """Term name → the factor it enters the loss with (batch size included)."""
        d = self.distiller
        w = {k: float(batch_size) for k in DET_TERMS}
        if d is None or kd_scale <= 0:
            return w
        w.update({k: v * batch_size for k, v in d.det_weights(kd_scale).items()})
        for k, v in d.weights.items():
            w[k] = v * kd_scale * (1 if k in d.unscaled_terms else batch_size)
        return w

    def __call__(
        self, imgs: torch.Tensor, preds: list[torch.Tensor], targets: torch.Tensor, kd_scale: float = 1.0
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """imgs (B,3,H,W) float 0-1; preds: student raw maps per level; targets (N,6).

        Returns the scalar loss to back-propagate and the detached weighted named terms, per image
        (the loss's weights divided by the batch size, as YOLOv5 reports its loss items).
        """
        det, positives = self.detection_loss.weighted_terms(preds, targets)
        bs = imgs.shape[0]
        weights = self.weight_dict(kd_scale, bs)
        values = dict(zip(DET_TERMS, det))
        if self.distiller is not None and kd_scale > 0:
            values.update(self.distiller(imgs, preds, targets, positives=positives))
        det_w = torch.stack([values[k] * (weights[k] / bs) for k in DET_TERMS])
        total = det_w.sum() * bs  # the same op order as DetectionLoss: its total when every weight is 1
        terms = {k: v.detach() for k, v in zip(DET_TERMS, det_w)}
        for k, v in values.items():
            if k not in terms:
                total = total + v.float() * weights[k]
                terms[k] = (v.float() * (weights[k] / bs)).detach()
        return total.reshape(1), terms
