"""Validation loop: mAP50, mAP50-95, P, R (and optionally loss, COCO json, plots) of a detector.

Used by training (every epoch, on the EMA model) and wrapped by ``val.py``. Predictions and labels
are compared in ORIGINAL image pixels: both are mapped back from the letterboxed batch image by the
inverse of the letterbox (:class:`Unletterbox`), so the numbers do not depend on the inference
resolution's padding. The figures follow YOLOv5's val.py conventions (``utils.metrics``, convention
``"yolov5"``); with ``save_json`` pycocotools adds the COCO figure.

Two pipeline details that YOLOv5 does differently and that we keep: NMS keeps classes apart exactly
(``utils.boxes.batched_nms``: NMS per class, or integer class shifts in float64) where YOLOv5 shifts
boxes by class × 7680 px in float32 before one NMS; that shift's rounding changed 6 of 149k kept
boxes in a synthetic 80-class test with 3-15 px boxes, 0 with larger boxes, and nothing on the
oracle fixture. Rect batches depend on how images of equal aspect ratio are ordered
(utils/dataset.py); the oracle fixture gives every image its own ratio.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from utils.boxes import clip_boxes, non_max_suppression, xywh2xyxy, xyxy2xywh
from utils.coco_eval import ImageIdLookup, category_ids, coco_evaluate, labels_to_coco_json, predictions_to_coco
from utils.detect_outputs import split_outputs
from utils.labels import label_lines
from utils.metrics import IOU_THRESHOLDS, ConfusionMatrix, fitness, match_predictions, score_detections
from utils.precision import Precision
from utils.torch_utils import unwrap_model

LOGGER = logging.getLogger(__name__)

PLOT_BATCHES = 3  # image grids are drawn for the first few batches only


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # kernels are asynchronous: time them only after they finish
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Unletterbox:
    """The inverse of one image's letterbox: batch-image pixels -> original-image pixels.

    The loader resized the original (h0, w0) by (gain_h, gain_w) and padded it by ``pad`` =
    (pad_w, pad_h) on the left/top. A point maps back as x0 = (x - pad_w) / gain_h,
    y0 = (y - pad_h) / gain_h — the height's gain on both axes, as YOLOv5's val.py maps labels and
    predictions (its COCO json boxes are these; the two gains differ only by the rounding of the
    resized sides, and labels and predictions move alike, so IoUs and mAP are unchanged) — then
    clipped to the original image. Float64 throughout.
    """

    shape0: tuple[int, int]  # (h0, w0)
    gain: float  # gain_h: the loader's height gain, used on both axes
    pad: tuple[float, float]  # (pad_w, pad_h)

    @classmethod
    def from_loader(cls, shape: tuple) -> Unletterbox:
        """From the loader's per-image record ``((h0, w0), ((gain_h, gain_w), (pad_w, pad_h)))``."""
        (h0, w0), ((gh, _), (pw, ph)) = shape
        return cls((int(h0), int(w0)), float(gh), (float(pw), float(ph)))

    def pixels(self, xyxy: torch.Tensor) -> torch.Tensor:
        """(n, 4) xyxy in batch-image pixels -> (n, 4) float64 xyxy in original pixels."""
        offset = torch.tensor(self.pad * 2, dtype=torch.float64)  # (pw, ph, pw, ph)
        return clip_boxes((xyxy.double() - offset) / self.gain, self.shape0)

    def normalised(self, cxcywh: torch.Tensor, batch_hw: tuple[int, int]) -> torch.Tensor:
        """(n, 4) centre/size boxes normalised to the batch image (the loader's label rows) ->
        (n, 4) float64 xyxy in original pixels."""
        h, w = batch_hw
        size = torch.tensor((w, h, w, h), dtype=torch.float64)
        return self.pixels(xywh2xyxy(cxcywh.double()) * size)


@dataclass(frozen=True)
class EvalSettings:
    """How :func:`evaluate` scores and what it writes (every field has the val.py default).

    ``half`` on CUDA runs an fp16 model as is, an fp32 one under autocast (weights never converted, so
    a training model is left as it was); ``precision`` (:mod:`utils.precision`) replaces ``half``: an
    fp32 model runs under its autocast (bf16 on CPU, fp16 on CUDA). ``compute_loss(raw_preds, targets)
    -> (total, items (3,))`` adds the mean validation loss. ``save_json`` writes ``save_dir/json_name``
    (COCO) for pycocotools against ``anno_json`` (generated from the labels when None). ``plots``,
    ``save_json`` and ``save_txt`` need a ``save_dir``.
    """

    conf_thres: float = 0.001
    iou_thres: float = 0.6
    max_det: int = 300
    half: bool = False
    save_dir: str | Path | None = None
    plots: bool = False
    save_json: bool = False
    anno_json: str | Path | None = None
    verbose: bool = False
    multi_label: bool = True
    compute_loss: Callable | None = None
    save_txt: bool = False
    save_conf: bool = False
    json_name: str = "predictions.json"
    precision: Precision | None = None
    single_cls: bool = False  # every label is class 0 (the loader's); NMS across classes, predictions class 0


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    names: Sequence[str],
    device: torch.device | str,
    settings: EvalSettings | None = None,
    **options,
) -> dict:
    """Evaluate ``model`` on every batch of ``loader`` with ``settings`` (:class:`EvalSettings`;
    keyword ``options`` override its fields, e.g. ``evaluate(m, loader, names, dev, conf_thres=0.25)``).

    loader batches: ``(imgs uint8 (B, 3, H, W), targets (N, 6) [batch_idx, cls, xc, yc, w, h]
    normalised to the batch image, paths, shapes)`` with shapes[i] = ``((h0, w0), ((rh, rw), (padw, padh)))``.
    The model's train/eval flags are restored on exit.

    Returns a dict: ``map50``, ``map`` (mAP50-95), ``precision``, ``recall`` (as YOLOv5 7.0's val.py
    computes them: :mod:`utils.metrics`, convention ``"yolov5"``), ``fitness``,
    ``per_class`` (list of dicts: class, name, images, instances, precision, recall, map50, map),
    ``maps`` (nc,) mAP50-95 per class (the overall mAP for classes without labels), ``loss``
    (list of 3 floats or None), ``speed_ms`` {pre, inf, nms} per image, ``coco`` (pycocotools result
    or None), ``n_images``, ``n_instances``, ``conf_best``, ``pred_json`` (path or None).
    """
    s = replace(settings or EvalSettings(), **options)
    device = torch.device(device)
    model = unwrap_model(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    if s.precision is None:
        s = replace(s, precision=Precision(device.type, torch.float16 if s.half and device.type == "cuda" else None))
    try:
        return _evaluate(model, loader, list(names), device, s)
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class _Tally:
    """What the batch loop accumulates over the whole loader."""

    nc: int
    stats: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    images_per_class: np.ndarray | None = None
    confusion: ConfusionMatrix | None = None  # only for the plots: about half the per-image matching time
    loss_sum: torch.Tensor | None = None
    n_batches: int = 0
    seen: int = 0
    times: dict[str, float] = field(default_factory=lambda: {"pre": 0.0, "inf": 0.0, "nms": 0.0})
    records: list[tuple[str, tuple[int, int], torch.Tensor, torch.Tensor]] = field(default_factory=list)  # COCO

    def __post_init__(self) -> None:
        self.images_per_class = np.zeros(self.nc, dtype=np.int64)


def _evaluate(model: nn.Module, loader: Iterable, names: list[str], device: torch.device, s: EvalSettings) -> dict:
    save_dir = Path(s.save_dir) if s.save_dir is not None else None
    if save_dir is None and (s.plots or s.save_json or s.save_txt):
        raise ValueError("evaluate: plots/save_json/save_txt need a save_dir")
    if save_dir is not None:
        save_dir.mkdir(parents=True, exist_ok=True)
    tally = _run_batches(model, loader, names, device, s, save_dir)
    out, res = _summary(tally, names)
    if s.plots:
        _plot_curves(res, names, tally.confusion, save_dir)
    if s.save_json:
        out["pred_json"], out["coco"] = _coco(tally.records, names, s.anno_json, save_dir, s.json_name)
    if s.verbose:
        LOGGER.info("\n%s", results_table(out, verbose=True))
    return out


def _run_batches(model: nn.Module, loader: Iterable, names: list[str], device: torch.device, s: EvalSettings,
                 save_dir: Path | None) -> _Tally:
    """The batch loop: pre-process, forward (+ loss), NMS, then per-image matching (timed per stage)."""
    param = next(model.parameters(), None)
    low = param is not None and param.dtype in (torch.float16, torch.bfloat16)  # a teacher stored low
    in_dtype = param.dtype if low else torch.float32
    # An fp32 model is run under autocast rather than converted: .half() then .float() would round
    # the caller's weights (e.g. the training EMA) to fp16.
    amp = s.precision.autocast() if not low else nullcontext()
    tally = _Tally(len(names), confusion=ConfusionMatrix(len(names)) if s.plots else None)
    for bi, (imgs, targets, paths, shapes) in enumerate(loader):
        _sync(device)
        t0 = time.perf_counter()
        imgs = s.precision.images(imgs.to(device, non_blocking=True), in_dtype)
        targets = targets.to(device)
        _sync(device)
        t1 = time.perf_counter()
        with amp:
            decoded, raw = split_outputs(model(imgs))
        _sync(device)
        t2 = time.perf_counter()
        if s.compute_loss is not None and raw is not None:
            items = s.compute_loss([r.float() for r in raw], targets)[1].detach().float().view(-1)
            tally.loss_sum = items if tally.loss_sum is None else tally.loss_sum + items
        tally.n_batches += 1

        _sync(device)
        t3 = time.perf_counter()
        preds = non_max_suppression(decoded.float(), s.conf_thres, s.iou_thres, multi_label=s.multi_label,
                                    max_det=s.max_det, agnostic=s.single_cls)
        if s.single_cls:  # one class: every prediction is class 0
            preds = [torch.cat((p[:, :5], torch.zeros_like(p[:, 5:])), 1) for p in preds]
        _sync(device)
        t4 = time.perf_counter()
        for key, dt in (("pre", t1 - t0), ("inf", t2 - t1), ("nms", t4 - t3)):
            tally.times[key] += dt
        _match_batch(tally, imgs, targets, preds, paths, shapes, s, save_dir)
        if s.plots and bi < PLOT_BATCHES:
            _plot_batch(imgs, targets, preds, paths, names, save_dir, bi)
    return tally


def _match_batch(tally: _Tally, imgs, targets, preds, paths, shapes, s: EvalSettings, save_dir: Path | None) -> None:
    """Match each image's detections with its labels, in original-image pixels (see :class:`Unletterbox`)."""
    # Per-image bookkeeping on the CPU: one transfer per batch instead of many tiny GPU kernels.
    nc = tally.nc
    batch_hw = tuple(imgs.shape[2:])
    targets_cpu = targets.float().cpu()
    for si, pred in enumerate(p.float().cpu() for p in preds):
        tally.seen += 1
        inverse = Unletterbox.from_loader(shapes[si])
        rows = targets_cpu[targets_cpu[:, 0] == si]  # (m, 6) image, cls, xc, yc, w, h normalised
        tcls = rows[:, 1]
        labelsn = torch.cat((tcls[:, None].double(), inverse.normalised(rows[:, 2:6], batch_hw)), 1)
        if len(tcls):
            tally.images_per_class[np.unique(tcls.long().clamp(0, nc - 1).numpy())] += 1
        predn = torch.cat((inverse.pixels(pred[:, :4]), pred[:, 4:6].double()), 1)
        correct = match_predictions(predn, labelsn, IOU_THRESHOLDS)
        tally.stats.append((correct, pred[:, 4], pred[:, 5], tcls.long()))
        if tally.confusion is not None:
            tally.confusion.add_image(predn, labelsn)
        if s.save_json:
            tally.records.append((str(paths[si]), inverse.shape0, predn, labelsn))
        if s.save_txt:
            _save_txt(predn, inverse.shape0, s.save_conf, save_dir / "labels" / f"{Path(paths[si]).stem}.txt")


def _summary(tally: _Tally, names: list[str]) -> tuple[dict, object]:
    """Metrics over all images: the result dict (``coco``/``pred_json`` still None) and the AP record."""
    nc = len(names)
    if tally.stats:
        correct, conf, pcls, tcls = (torch.cat(x, 0) for x in zip(*tally.stats))
    else:  # an empty loader
        correct, conf, pcls, tcls = torch.zeros(0, len(IOU_THRESHOLDS), dtype=torch.bool), *(torch.zeros(0),) * 3
    res = score_detections(correct, conf, pcls, tcls)
    map50, map5095 = res.map50, res.map
    maps = np.full(nc, map5095)
    per_class = []
    for i, c in enumerate(res.classes):
        known = 0 <= c < nc
        if known:
            maps[c] = res.ap5095[i]
        per_class.append({
            "class": int(c),
            "name": names[c] if known else str(c),
            "images": int(tally.images_per_class[c]) if known else 0,
            "instances": int(res.n_labels[i]),
            "precision": float(res.p[i]),
            "recall": float(res.r[i]),
            "map50": float(res.ap50[i]),
            "map": float(res.ap5095[i]),
        })
    seen = max(tally.seen, 1)
    out = {
        "map50": map50,
        "map": map5095,
        "precision": res.mp,
        "recall": res.mr,
        "fitness": fitness(map50, map5095),
        "per_class": per_class,
        "maps": maps.tolist(),
        "loss": (tally.loss_sum / max(tally.n_batches, 1)).cpu().tolist() if tally.loss_sum is not None else None,
        "speed_ms": {k: 1e3 * t / seen for k, t in tally.times.items()},
        "coco": None,
        "n_images": tally.seen,
        "n_instances": int(len(tcls)),
        "conf_best": res.conf_best,
        "pred_json": None,
    }
    return out, res


def _save_txt(predn: torch.Tensor, shape0: tuple[int, int], save_conf: bool, path: Path) -> None:
    """One line per detection: cls xc yc w h [conf], normalised to the original image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{row}\n" for row in label_lines(predn.cpu().double().numpy(), shape0, save_conf)))


def _plot_batch(imgs, targets, preds, paths, names, save_dir: Path, bi: int) -> None:
    """val_batch{bi}_labels.jpg and val_batch{bi}_pred.jpg, boxes in the letterboxed batch image."""
    from utils.plots import plot_images

    H, W = imgs.shape[2:]
    scale = torch.tensor((W, H, W, H), device=targets.device, dtype=torch.float32)
    t = targets.float()
    labels = [
        torch.cat((t[t[:, 0] == i, 1:2], xywh2xyxy(t[t[:, 0] == i, 2:6]) * scale), 1).cpu()
        for i in range(len(imgs))
    ]
    dets = [torch.cat((p[:, 5:6], p[:, :4], p[:, 4:5]), 1).float().cpu() for p in preds]
    img_u8 = (imgs.float() * 255).round().byte().cpu()
    plot_images(img_u8, labels, names, save_dir / f"val_batch{bi}_labels.jpg", paths=paths)
    plot_images(img_u8, dets, names, save_dir / f"val_batch{bi}_pred.jpg", paths=paths)


def _plot_curves(res, names: list[str], confusion: ConfusionMatrix, save_dir: Path) -> None:
    from utils.metrics import CONF_POINTS, RECALL_POINTS
    from utils.plots import plot_mc_curve, plot_pr_curve

    cls_names = [names[c] if 0 <= c < len(names) else str(c) for c in res.classes]
    plot_pr_curve(RECALL_POINTS, res.pr_curve, res.ap50, cls_names, save_dir / "PR_curve.png")
    for curve, label, file in (
        (res.f1_curve, "F1", "F1_curve.png"),
        (res.p_curve, "Precision", "P_curve.png"),
        (res.r_curve, "Recall", "R_curve.png"),
    ):
        plot_mc_curve(CONF_POINTS, curve, cls_names, save_dir / file, ylabel=label)
    confusion.plot(save_dir / "confusion_matrix.png", names, normalize=True)


def _coco(records, names, anno_json, save_dir: Path, json_name: str) -> tuple[str, dict | None]:
    """Write the COCO predictions json and evaluate it with pycocotools.

    Without an annotation json one is generated from the labels the loop saw (in original pixels),
    so the ground truth is exactly the one our own mAP used.
    """
    if anno_json is None:
        labels, files, shapes = [], [], []
        for path, (h0, w0), _, labelsn in records:
            xywh = xyxy2xywh(labelsn[:, 1:5]) / torch.tensor((w0, h0, w0, h0), dtype=torch.float64)
            labels.append(torch.cat((labelsn[:, :1], xywh), 1).numpy())
            files.append(path)
            shapes.append((h0, w0))
        anno = labels_to_coco_json(labels, files, shapes, names)
        anno_json = save_dir / "annotations.json"
        anno_json.write_text(json.dumps(anno))
    else:
        anno_json = Path(anno_json)
        if not anno_json.is_file():
            raise FileNotFoundError(f"annotation json {anno_json} not found; omit it to generate one from the labels")
        anno = json.loads(anno_json.read_text())
    lookup = ImageIdLookup(anno)
    cats = category_ids(len(names), anno)
    dets, img_ids = [], []
    for path, _, predn, _ in records:
        image_id = lookup(path)
        img_ids.append(image_id)
        dets.extend(predictions_to_coco(predn, image_id, cats))
    pred_json = save_dir / json_name
    pred_json.write_text(json.dumps(dets))
    try:
        coco = coco_evaluate(anno_json, pred_json, img_ids=img_ids)
    except Exception as e:  # a broken/foreign annotation file must not lose the rest of the results
        LOGGER.warning("pycocotools evaluation failed: %s", e)
        coco = None
    if coco is not None:
        (save_dir / "coco_summary.txt").write_text(coco["summary"] + "\n")
    return str(pred_json), coco


def results_table(results: dict, verbose: bool = False) -> str:
    """YOLOv5's text table: Class Images Instances P R mAP50 mAP50-95 (per class with ``verbose``; the
    Images column is the number of images on every row, as YOLOv5 prints it: the images holding a
    class are in ``per_class``)."""
    head = f"{'Class':>22}{'Images':>11}{'Instances':>11}{'P':>11}{'R':>11}{'mAP50':>11}{'mAP50-95':>11}"
    row = "{:>22}{:>11}{:>11}{:>11.3g}{:>11.3g}{:>11.3g}{:>11.3g}"
    rows = [("all", results["n_instances"], results["precision"], results["recall"], results["map50"], results["map"])]
    if verbose:
        rows += [(c["name"][:22], c["instances"], c["precision"], c["recall"], c["map50"], c["map"])
                 for c in results["per_class"]]
    lines = [head] + [row.format(name, results["n_images"], *rest) for name, *rest in rows]
    return "\n".join(lines)
