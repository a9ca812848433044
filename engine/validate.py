"""Validation of a weights file on a dataset split: what ``val.py`` runs, callable from Python.

:func:`validate` loads the weights (a .pt through :func:`models.load_model`, an .onnx through
:class:`models.backends.OnnxModel`), reconciles the image size and batch with the file
(:func:`models.backends.fit_input_to_model`), builds the loader, runs :func:`engine.evaluate.evaluate`
and writes ``metrics.json``. It prints nothing: the notes on changed settings come back in the
result for the caller to show (benchmarks call it without a console).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from engine.evaluate import EvalSettings, evaluate
from models import load_model
from models.backends import OnnxModel, fit_input_to_model
from models.hub import find_weights
from utils.data_config import load_data_config
from utils.dataset import create_dataloader
from utils.files import find_data_yaml, increment_path
from utils.precision import FP32_CPU_INFERENCE, Precision, choose_precision
from utils.torch_utils import select_device

TASKS = ("train", "val", "test", "speed")  # YOLOv5 also has "study" (a sweep of sizes with a plot)


def _load(weights: Path, data: Path, task: str, device: str, batch_size: int,
          single_cls: bool = False) -> tuple[dict, str, nn.Module, bool, torch.device]:
    """(data config, split, model on ``dev``, is_onnx, dev); one-line errors for a missing split or class
    mismatch (any class count goes with ``single_cls``: every label and prediction becomes class 0)."""
    split = "val" if task == "speed" else task
    cfg = load_data_config(data, require=(split,))
    if not cfg.get(split):
        raise ValueError(f"--data {data} has no '{split}' split")
    dev = select_device(device, batch_size)
    is_onnx = weights.suffix.lower() == ".onnx"
    # Conv+BN folded as YOLOv5's val.py does: one pass less per conv, the same arithmetic as its figures
    model = OnnxModel(weights, dev) if is_onnx else load_model(weights, device=dev).eval().fuse()
    if model.nc != cfg["nc"] and not single_cls:
        raise ValueError(f"--weights {weights} predicts {model.nc} classes but --data {data} has {cfg['nc']} "
                         "(a model trained with --single-cls: validate with --single-cls)")
    return cfg, split, model, is_onnx, dev


def _warm_up(model: nn.Module, imgsz: int, dev: torch.device) -> None:
    """One pass so cuDNN autotuning does not land in the timings."""
    with torch.inference_mode():
        p = next(model.parameters())
        model(torch.zeros(1, 3, imgsz, imgsz, device=dev, dtype=p.dtype))


def _rectangular(is_onnx: bool, asked: bool, speed: bool, fixed_shape: object, notes: list[str]) -> bool:
    """Whether the loader pads batches to their aspect (YOLOv5: a .pt yes, any other file no)."""
    if speed:
        return False
    if not is_onnx:
        return True
    if asked and fixed_shape:
        notes.append("--rect: this ONNX file has a fixed input, so its batches stay square")
    elif not asked and not fixed_shape:
        notes.append("ONNX file: square letterboxed batches, as YOLOv5's val.py feeds exported models "
                     "(--rect: the .pt's rectangular batches and figures)")
    return asked and not fixed_shape


def validate(
    weights: str | Path,
    data: str | Path,
    imgsz: int = 640,
    batch_size: int = 32,
    task: str = "val",
    device: str = "",
    settings: EvalSettings | None = None,
    project: str | Path = "runs/val",
    name: str = "exp",
    exist_ok: bool = False,
    workers: int = 8,
    rect: bool = False,
) -> dict:
    """Evaluate ``weights`` on the ``task`` split of ``data``; returns :func:`engine.evaluate.evaluate`'s
    dict plus ``save_dir``, ``imgsz``, ``batch_size``, ``device``, ``half``, ``arithmetic`` ('fp32', 'fp16',
    'bf16'), ``backend``, ``weights``, ``data``, ``task`` and ``notes`` (lines saying which requested
    settings the file changed).

    ``settings`` carries thresholds and outputs (``save_dir`` and ``json_name`` are set here).
    ``task='speed'`` times inference on square batches with deployment thresholds (conf 0.25,
    IoU 0.45) and skips plots and COCO json. Batches are YOLOv5's: rectangular (padded to the batch's
    aspect) for a .pt, square letterboxed ``imgsz × imgsz`` for an .onnx file; ``rect`` gives a
    ``--dynamic`` .onnx the .pt's rectangular batches (and so the .pt's figures). ``anno_json``
    defaults to the dataset's ``val_json`` for the val split; otherwise one is generated from the labels.
    Raises FileNotFoundError / ValueError (one line) for missing files or mismatched classes.
    """
    if task not in TASKS:
        raise ValueError(f"--task {task!r}: choose one of {', '.join(TASKS)}")
    weights, data = find_weights(weights), find_data_yaml(data)
    s = settings or EvalSettings()
    cfg, split, model, is_onnx, dev = _load(weights, data, task, device, batch_size, s.single_cls)
    imgsz, batch_size, notes = fit_input_to_model(model, weights, imgsz, batch_size)
    half = s.half and dev.type == "cuda" and not is_onnx  # fp16 convolutions are a CUDA feature
    if half:
        model.half()  # our own copy, so converting it is fine (evaluate never converts a caller's model)
    precision = _cpu_precision(model, s, notes) if dev.type == "cpu" and not is_onnx else s.precision
    speed = task == "speed"
    if speed:
        s = replace(s, conf_thres=0.25, iou_thres=0.45, save_json=False, plots=False)
    rect = _rectangular(is_onnx, rect, speed, getattr(model, "fixed_shape", None), notes)
    loader, _ = create_dataloader(
        cfg[split], imgsz, batch_size, max(int(model.stride.max()), 32), rect=rect, pad=0.5 if rect else 0.0,
        workers=workers, nc=cfg["nc"], pin_memory=dev.type == "cuda", single_cls=s.single_cls,
    )  # fmt: skip
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok, mkdir=True)
    anno_json = cfg.get("val_json") if s.anno_json is None and split == "val" else s.anno_json
    if dev.type == "cuda" and not is_onnx:
        _warm_up(model, imgsz, dev)
    s = replace(s, half=half, precision=precision, save_dir=save_dir, anno_json=anno_json,
                json_name=f"{weights.stem}_predictions.json")
    names = _class_names(model, cfg, s.single_cls)
    results = evaluate(model, loader, names, dev, s)
    arithmetic = "fp16" if half else (precision.name if precision is not None else "fp32")
    results.update(save_dir=save_dir, imgsz=imgsz, batch_size=batch_size, device=dev, half=half, notes=notes,
                   arithmetic=arithmetic,
                   backend="onnxruntime" if is_onnx else "pytorch", weights=weights, data=data, task=task)
    (save_dir / "metrics.json").write_text(json.dumps(metrics_record(results, s), indent=2))
    return results


def _class_names(model: torch.nn.Module, cfg: dict, single_cls: bool) -> list[str]:
    """The names the tables and plots show: the model's own, as YOLOv5's val.py shows them (measured),
    when it carries one per dataset class; else the dataset's. ``--single-cls``: the model's first."""
    own = getattr(model, "names", None)
    own = [own[k] for k in sorted(own)] if isinstance(own, dict) else list(own or [])
    if single_cls:
        return [str(n) for n in own[:1]] or ["item"]
    generic = [f"class{i}" for i in range(len(own))]  # what a file without names metadata gets
    return [str(n) for n in own] if len(own) == cfg["nc"] and own != generic else list(cfg["names"])


def _cpu_precision(model: torch.nn.Module, s: EvalSettings, notes: list[str]) -> Precision | None:
    """The CPU arithmetic of ``model`` (our own copy, put in its memory format): bf16 for ``--half``
    (:func:`_cpu_half`), else fp32 as YOLOv5 computes it, in channels_last (oneDNN's fast layout)."""
    if s.half:
        precision, note = _cpu_half(model)
        notes.append(note)
        return precision
    if s.precision is not None:
        return s.precision
    FP32_CPU_INFERENCE.prepare(model)
    return FP32_CPU_INFERENCE


def _cpu_half(model: torch.nn.Module) -> tuple[Precision, str]:
    """``--half`` on a CPU: bf16 autocast + channels_last when the CPU has native bf16, else fp32.

    fp32 stays the CPU default because it reproduces YOLOv5's val.py to 1e-6; bf16 moved the demo
    teacher's mAP50-95 by 1e-4 (benchmarks/results/precision_val.md) and runs ~2x faster with AMX.
    """
    precision = choose_precision(torch.device("cpu"))
    if not precision.enabled:
        return precision, f"--half: {precision.reason}; validating in fp32"
    precision.prepare(model)  # our own copy: channels_last for oneDNN's bf16 kernels
    return precision, f"--half on CPU: bf16 autocast ({precision.reason}); fp32 reproduces YOLOv5's figures exactly"


def metrics_record(results: dict, s: EvalSettings) -> dict:
    """The ``metrics.json`` content of a :func:`validate` result."""
    coco = results["coco"]
    return {
        "weights": str(results["weights"]),
        "data": str(results["data"]),
        "task": results["task"],
        "imgsz": results["imgsz"],
        "conf_thres": s.conf_thres,
        "iou_thres": s.iou_thres,
        "images": results["n_images"],
        "instances": results["n_instances"],
        "mAP50": results["map50"],
        "mAP50-95": results["map"],
        "P": results["precision"],
        "R": results["recall"],
        "fitness": results["fitness"],
        "per_class": results["per_class"],
        "pycocotools": None if coco is None else {k: coco[k] for k in ("map", "map50", "stats")},
        "speed_ms": results["speed_ms"],
        "device": str(results["device"]),
        "half": results["half"],
        "arithmetic": results["arithmetic"],
        "backend": results["backend"],
    }
