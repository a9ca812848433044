"""Validation throughput (images/s) of a small detector on the demo set.

Usage (from the repo root; builds datasets/demo on first use)::

    python -m benchmarks.bench_val                          # yolov5n (random init), 160 and 320 px, CPU/GPU auto
    python -m benchmarks.bench_val --weights best.pt --imgsz 320 --device 0 --half

Writes ``benchmarks/results/val.json`` and ``.md``. ``images/s`` is the wall time of a whole
``engine.evaluate.evaluate`` call (data loading, inference, NMS, matching and AP) divided by the
image count, after one untimed warm-up pass; the per-image pre/inference/NMS split is evaluate's
own. A random-init model keeps few boxes above conf 0.001, so NMS and matching are cheaper than
with a trained model; the table gives detections per image so runs can be compared fairly.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import write_results
from engine.evaluate import evaluate
from models import DetectionModel, load_model
from utils.data_config import load_data_config
from utils.dataset import create_dataloader
from utils.torch_utils import select_device

ROOT = Path(__file__).resolve().parents[1]


def build_model(weights: str | None, width: float, nc: int, device: torch.device) -> torch.nn.Module:
    """A checkpoint when given, else a randomly initialised yolov5n-style model of ``width``."""
    if weights:
        return load_model(weights, device=device)
    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text())
    cfg.update(width_multiple=width, depth_multiple=0.33, nc=nc)
    torch.manual_seed(0)
    return DetectionModel(cfg).to(device).eval()


def measure(model, sources, names, imgsz: int, batch: int, workers: int, device, half: bool, conf: float) -> dict:
    stride = int(model.stride.max())
    loader, _ = create_dataloader(sources, imgsz, batch, stride, rect=True, pad=0.5, workers=workers)
    kw = dict(conf_thres=conf, half=half)
    evaluate(model, loader, names, device, **kw)  # warm-up: workers, cuDNN autotune, allocator
    t0 = time.perf_counter()
    res = evaluate(model, loader, names, device, **kw)
    dt = time.perf_counter() - t0
    n = res["n_images"]
    return {
        "imgsz": imgsz,
        "batch": batch,
        "images": n,
        "seconds": round(dt, 3),
        "images_per_s": round(n / dt, 1),
        "speed_ms": {k: round(v, 2) for k, v in res["speed_ms"].items()},
        "map50": round(res["map50"], 4),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "data" / "demo.yaml"))
    p.add_argument("--weights", default="", help="checkpoint to time (default: random-init yolov5n)")
    p.add_argument("--width", type=float, default=0.25, help="width_multiple of the random-init model")
    p.add_argument("--imgsz", type=int, nargs="+", default=[160, 320])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="")
    p.add_argument("--half", action="store_true")
    p.add_argument("--conf-thres", type=float, default=0.001)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "val"))
    args = p.parse_args(argv)
    load_at_start = os.getloadavg()[0]  # a shared machine skews timings: record how busy it was

    data = load_data_config(args.data, require=("val",))
    device = select_device(args.device)
    model = build_model(args.weights, args.width, data["nc"], device)
    half = args.half and device.type == "cuda"
    if half:
        model.half()
    info = model.info(imgsz=max(args.imgsz)) if hasattr(model, "info") else {}
    rows = [
        measure(model, data["val"], data["names"], s, args.batch, args.workers, device, half, args.conf_thres)
        for s in args.imgsz
    ]
    model_desc = Path(args.weights).name if args.weights else f"yolov5n yaml, width {args.width}, random init"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    result = {
        "benchmark": "val",
        "data": Path(args.data).name,
        "model": model_desc,
        "params": info.get("params"),
        "device": f"{device} ({device_name}){' fp16' if half else ''}",
        "conf_thres": args.conf_thres,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "load_avg_1min_at_start": round(load_at_start, 2),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": rows,
    }
    md = [
        "# Validation throughput",
        "",
        f"`python -m benchmarks.bench_val` on {result['data']} (val split), {model_desc}, {result['device']}, "
        f"{os.cpu_count()} CPUs (load {result['machine']['load_avg_1min_at_start']} at start), "
        f"torch {torch.__version__}, conf {args.conf_thres}, {result['date']}.",
        "images/s = wall time of one `evaluate()` call (loading, inference, NMS, matching, AP) after a warm-up.",
        "",
        "| imgsz | batch | images | images/s | pre ms/img | inference ms/img | NMS ms/img | mAP50 |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {r['imgsz']} | {r['batch']} | {r['images']} | {r['images_per_s']} | {r['speed_ms']['pre']} | "
            f"{r['speed_ms']['inf']} | {r['speed_ms']['nms']} | {r['map50']} |"
            for r in rows
        ),
        "",
    ]
    write_results(result, md, args.out)
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
