"""Box formats, IoU variants and non-maximum suppression.

Formats: ``xyxy`` = (x1, y1, x2, y2) corners; ``xywh`` = (xc, yc, w, h) centre and size; the ``n``
suffix means normalised to 0-1 by the image width/height. Functions accept torch tensors or numpy
arrays of shape (..., 4) and return the same type. IoU and NMS use ``torchvision.ops``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision

ArrayLike = torch.Tensor | np.ndarray


def _empty_like(x: ArrayLike) -> ArrayLike:
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xywh2xyxy(x: ArrayLike) -> ArrayLike:
    """(xc, yc, w, h) -> (x1, y1, x2, y2); shape (..., 4)."""
    y = _empty_like(x)
    y[..., 0] = x[..., 0] - x[..., 2] / 2
    y[..., 1] = x[..., 1] - x[..., 3] / 2
    y[..., 2] = x[..., 0] + x[..., 2] / 2
    y[..., 3] = x[..., 1] + x[..., 3] / 2
    return y


def xyxy2xywh(x: ArrayLike) -> ArrayLike:
    """(x1, y1, x2, y2) -> (xc, yc, w, h); shape (..., 4)."""
    y = _empty_like(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywhn2xyxy(x: ArrayLike, w: float, h: float, padw: float = 0.0, padh: float = 0.0) -> ArrayLike:
    """Normalised (xc, yc, w, h) -> pixel (x1, y1, x2, y2) in a w×h image shifted by (padw, padh)."""
    y = _empty_like(x)
    y[..., 0] = w * (x[..., 0] - x[..., 2] / 2) + padw
    y[..., 1] = h * (x[..., 1] - x[..., 3] / 2) + padh
    y[..., 2] = w * (x[..., 0] + x[..., 2] / 2) + padw
    y[..., 3] = h * (x[..., 1] + x[..., 3] / 2) + padh
    return y


def xyxy2xywhn(x: ArrayLike, w: float, h: float, clip: bool = False, eps: float = 0.0) -> ArrayLike:
    """Pixel (x1, y1, x2, y2) -> normalised (xc, yc, w, h); optionally clip to the image first."""
    if clip:
        x = clip_boxes(_empty_like(x), (h - eps, w - eps))
    y = _empty_like(x)
    y[..., 0] = ((x[..., 0] + x[..., 2]) / 2) / w
    y[..., 1] = ((x[..., 1] + x[..., 3]) / 2) / h
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def clip_boxes(boxes: ArrayLike, shape: tuple[int | float, int | float]) -> ArrayLike:
    """Clip xyxy boxes in place to an image of ``shape`` = (height, width); returns them."""
    h, w = shape[0], shape[1]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, w)
        boxes[..., 1].clamp_(0, h)
        boxes[..., 2].clamp_(0, w)
        boxes[..., 3].clamp_(0, h)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, h)
    return boxes


def scale_boxes(
    img1_shape: tuple[int, int],
    boxes: ArrayLike,
    img0_shape: tuple[int, int],
    ratio_pad: tuple | None = None,
) -> ArrayLike:
    """Map xyxy boxes from a letterboxed image (img1_shape = (h, w)) back to the original (img0_shape).

    ``ratio_pad`` = ((rh, rw), (padw, padh)) as the loader records it; when omitted the letterbox
    geometry is recomputed from the two shapes (uniform scale, centred padding).
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        padw = (img1_shape[1] - img0_shape[1] * gain) / 2
        padh = (img1_shape[0] - img0_shape[0] * gain) / 2
        gain_w = gain_h = gain
    else:
        (gain_h, gain_w), (padw, padh) = ratio_pad
    boxes[..., [0, 2]] -= padw
    boxes[..., [1, 3]] -= padh
    boxes[..., [0, 2]] /= gain_w
    boxes[..., [1, 3]] /= gain_h
    return clip_boxes(boxes, img0_shape)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU of xyxy boxes: (N, 4) × (M, 4) -> (N, M)."""
    return torchvision.ops.box_iou(boxes1, boxes2)


def bbox_ciou(box1: torch.Tensor, box2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Element-wise Complete IoU of xywh boxes, (..., 4) × (..., 4) -> (...,).

    CIoU = IoU − (ρ²/c² + α·v) (Zheng et al., AAAI 2020), where ρ is the centre distance, c the
    diagonal of the smallest enclosing box, v = 4/π²·(atan(w2/h2) − atan(w1/h1))² and
    α = v / (v − IoU + 1 + eps), the trade-off term, held constant (no gradient) as YOLOv5 does.
    """
    (x1, y1, w1, h1), (x2, y2, w2, h2) = box1.unbind(-1), box2.unbind(-1)
    b1x1, b1x2, b1y1, b1y2 = x1 - w1 / 2, x1 + w1 / 2, y1 - h1 / 2, y1 + h1 / 2
    b2x1, b2x2, b2y1, b2y2 = x2 - w2 / 2, x2 + w2 / 2, y2 - h2 / 2, y2 + h2 / 2
    h1, h2 = h1 + eps, h2 + eps  # keep atan(w/h) finite

    inter = (torch.minimum(b1x2, b2x2) - torch.maximum(b1x1, b2x1)).clamp(0) * (
        torch.minimum(b1y2, b2y2) - torch.maximum(b1y1, b2y1)
    ).clamp(0)
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union

    cw = torch.maximum(b1x2, b2x2) - torch.minimum(b1x1, b2x1)
    ch = torch.maximum(b1y2, b2y2) - torch.minimum(b1y1, b2y1)
    c2 = cw**2 + ch**2 + eps
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (rho2 / c2 + v * alpha)


def non_max_suppression(
    prediction: torch.Tensor,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    classes: list[int] | None = None,
    multi_label: bool = False,
    max_det: int = 300,
    max_nms: int = 30000,
) -> list[torch.Tensor]:
    """Class-aware NMS over decoded YOLO outputs.

    prediction: (bs, N, 5 + nc) with xywh pixels, objectness and class probabilities (sigmoid).
    Score = objectness × class probability. With ``multi_label`` every class whose score passes
    ``conf_thres`` yields its own candidate (as YOLOv5 validation does); otherwise only the best
    class. Suppression is per class via ``torchvision.ops.batched_nms``.
    Returns one (n, 6) tensor per image: x1, y1, x2, y2, score, class; at most ``max_det`` rows,
    highest score first.
    """
    if not 0 <= conf_thres <= 1 or not 0 <= iou_thres <= 1:
        raise ValueError(f"conf_thres={conf_thres} and iou_thres={iou_thres} must lie in [0, 1]")
    if isinstance(prediction, (list, tuple)):  # eval-mode model output (decoded, raw)
        prediction = prediction[0]
    nc = prediction.shape[2] - 5
    out: list[torch.Tensor] = []
    for x in prediction:  # (N, 5 + nc) per image
        x = x[x[:, 4] > conf_thres]
        if not x.shape[0]:
            out.append(torch.zeros((0, 6), device=prediction.device))
            continue
        scores = x[:, 5:] * x[:, 4:5] if nc else x[:, 4:5]
        boxes = xywh2xyxy(x[:, :4])
        if multi_label and nc > 1:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            det = torch.cat((boxes[i], scores[i, j, None], j[:, None].float()), 1)
        else:
            conf, j = scores.max(1, keepdim=True)
            det = torch.cat((boxes, conf, j.float()), 1)[conf.view(-1) > conf_thres]
        if classes is not None:
            det = det[(det[:, 5:6] == torch.tensor(classes, device=det.device)).any(1)]
        if not det.shape[0]:
            out.append(torch.zeros((0, 6), device=prediction.device))
            continue
        if det.shape[0] > max_nms:  # keep NMS time bounded on untrained models
            det = det[det[:, 4].topk(max_nms).indices]
        keep = torchvision.ops.batched_nms(det[:, :4].float(), det[:, 4].float(), det[:, 5].long(), iou_thres)
        out.append(det[keep[:max_det]])
    return out
