"""COCO-format export of predictions and labels, and the pycocotools evaluation.

Any dataset works: image ids come from the annotation json's ``file_name`` -> ``id`` mapping, and
when a dataset ships no annotation json one is generated from its YOLO labels
(:func:`labels_to_coco_json`). Class ids map to category ids through the COCO 80 -> 91 table when
the annotation json carries the COCO category ids, and identically otherwise.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# COCO's 80 detection classes are numbered 1..90 with gaps (REFERENCE §4).
COCO80_TO_91: list[int] = [
    *range(1, 12),
    *range(13, 26),
    27,
    28,
    *range(31, 45),
    *range(46, 66),
    67,
    70,
    *range(72, 83),
    *range(84, 91),
]


def category_ids(nc: int, anno: dict | None = None) -> list[int]:
    """Category id for each of our ``nc`` class indices.

    The COCO table when the annotation json's categories are exactly COCO's 80 ids (the official
    ``instances_val2017.json``); otherwise class index = category id (our generated jsons).
    """
    if anno is not None and nc == 80:
        ids = {int(c["id"]) for c in anno.get("categories", [])}
        if ids == set(COCO80_TO_91):
            return list(COCO80_TO_91)
    return list(range(nc))


class ImageIdLookup:
    """Maps an image path to the annotation json's image id by ``file_name``.

    Tried in order: the full path, the path's tail with as many parts as ``file_name`` has
    (``val2017/0001.jpg``), the base name, and — for COCO-style numeric names — the stem as int.
    """

    def __init__(self, anno: dict) -> None:
        self.by_name: dict[str, int | str] = {}
        self.ids: set[int | str] = set()
        for im in anno.get("images", []):
            self.by_name[Path(im["file_name"]).as_posix()] = im["id"]
            self.ids.add(im["id"])
        self.depths = sorted({len(Path(k).parts) for k in self.by_name}) or [1]

    def __call__(self, path: str | Path) -> int | str:
        p = Path(path)
        if p.as_posix() in self.by_name:
            return self.by_name[p.as_posix()]
        for d in self.depths:
            key = Path(*p.parts[-d:]).as_posix()
            if key in self.by_name:
                return self.by_name[key]
        if p.stem.isdecimal() and int(p.stem) in self.ids:
            return int(p.stem)
        raise ValueError(f"image {p} is not listed in the annotation json (images are matched by file_name)")


def predictions_to_coco(detections: torch.Tensor | np.ndarray, image_id: int | str,
                        cat_ids: Sequence[int]) -> list[dict]:
    """COCO result records of one image.

    detections: (n, 6) x1, y1, x2, y2, conf, cls in ORIGINAL image pixels. Each record is
    ``{image_id, category_id, bbox: [x_topleft, y_topleft, w, h], score}``.
    """
    d = detections.detach().cpu().double().numpy() if isinstance(detections, torch.Tensor) else np.asarray(detections)
    out = []
    for x1, y1, x2, y2, conf, cls in d.tolist():
        out.append(
            {
                "image_id": image_id,
                "category_id": int(cat_ids[int(cls)]),
                "bbox": [round(x1, 3), round(y1, 3), round(x2 - x1, 3), round(y2 - y1, 3)],
                "score": round(conf, 5),
            }
        )
    return out


def labels_to_coco_json(
    labels: Sequence[np.ndarray],
    im_files: Sequence[str | Path],
    shapes: Sequence[Sequence[int]],
    names: Sequence[str],
) -> dict:
    """Build a COCO annotation dict from YOLO labels.

    labels: per image an (n, 5) array cls, xc, yc, w, h normalised to 0-1; im_files: image paths;
    shapes: per image the original (height, width) in pixels; names: class names (category id =
    class index). Image ids are what YOLOv5 writes as its records' ``image_id``: the stem as a number
    when every stem is a distinct number (``000005.jpg`` → 5), else the stem itself (``img_a.jpg`` →
    ``"img_a"``) when the stems are distinct — all strings then, since pycocotools cannot sort a mix of
    numbers and strings —, else 1-based numbers in file order. ``file_name`` is the base name, or the
    full path when base names repeat. Annotation ids start at 1 (pycocotools treats id 0 as unmatched).
    """
    if not (len(labels) == len(im_files) == len(shapes)):
        raise ValueError(f"labels ({len(labels)}), im_files ({len(im_files)}) and shapes ({len(shapes)}) differ")
    base = [Path(f).name for f in im_files]
    unique = len(set(base)) == len(base)
    stems = [Path(f).stem for f in im_files]
    ids: list[int | str] = list(range(1, len(stems) + 1))
    if len(set(stems)) == len(stems):
        numeric = all(st.isdecimal() for st in stems) and len({int(st) for st in stems}) == len(stems)
        ids = [int(st) for st in stems] if numeric else list(stems)
    images, annotations = [], []
    for i, lab, f, (h, w) in zip(ids, labels, im_files, shapes):
        name = Path(f).name if unique else Path(f).as_posix()
        images.append({"id": i, "file_name": name, "height": int(h), "width": int(w)})
        for c, xc, yc, bw, bh in np.asarray(lab, dtype=float).reshape(-1, 5).tolist():
            bw, bh = bw * w, bh * h
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": int(c),
                    "bbox": [xc * w - bw / 2, yc * h - bh / 2, bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": i, "name": str(n)} for i, n in enumerate(names)]
    return {
        "info": {"description": "generated from YOLO labels"},
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }


def coco_evaluate(
    anno_json: str | Path | dict, pred_json: str | Path | list, img_ids: Sequence[int | str] | None = None
) -> dict:
    """Run the pycocotools bbox evaluation.

    anno_json: annotation file or dict; pred_json: results file or list of records; img_ids:
    restrict to these images (those that were actually predicted). Returns
    ``{'map': AP@[.5:.95], 'map50': AP@.5, 'stats': the 12 COCOeval summary numbers, 'summary': text}``.
    Note pycocotools keeps at most 100 detections per image and class.
    """
    from pycocotools.coco import COCO  # imported lazily: only needed when COCO eval is asked for
    from pycocotools.cocoeval import COCOeval

    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # pycocotools prints progress; keep only the summary
        gt = COCO()
        gt.dataset = _read_json(anno_json)
        gt.createIndex()
        preds = _read_json(pred_json)
        if not preds:  # loadRes cannot take an empty list; no detections means zero AP
            return {"map": 0.0, "map50": 0.0, "stats": [0.0] * 12, "summary": "no detections"}
        dt = gt.loadRes(preds)
        ev = COCOeval(gt, dt, "bbox")
        if img_ids is not None:
            ev.params.imgIds = sorted(set(img_ids))
        ev.evaluate()
        ev.accumulate()
        summary_start = log.tell()
        ev.summarize()
    summary = log.getvalue()[summary_start:].rstrip()
    # pycocotools marks "no ground truth in this area range" as -1
    stats = [float(s) for s in ev.stats]
    return {"map": max(stats[0], 0.0), "map50": max(stats[1], 0.0), "stats": stats, "summary": summary}


def _read_json(x: str | Path | dict | list) -> dict | list:
    if isinstance(x, (dict, list)):
        return x
    path = Path(x)
    if not path.is_file():
        raise FileNotFoundError(f"COCO json {path} not found")
    with path.open() as f:
        return json.load(f)
