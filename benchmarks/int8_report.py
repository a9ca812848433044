"""INT8 deployment report: ONNX size, onnxruntime latency and mAP of fp32 vs INT8, per checkpoint.

Usage (from the repo root)::

    python -m benchmarks.int8_report --data data/VisDrone.yaml --imgsz 640 \\
        --weights runs/alone/weights/best.pt runs/kd/weights/best.pt runs/qmimic/weights/best.pt \\
        --labels "student alone" "distilled" "qmimic-distilled"

For every checkpoint: ``engine.export.export_weights`` (export.py's work) writes the fp32 ONNX file
(``--dynamic`` by default, so validation uses the same rectangular batches as the .pt; ``--static``
for a fixed square input), :func:`utils.onnx_int8.quantize_int8` the INT8 one (calibrated on
``--calib-images`` images of ``--calib-split``), and ``engine.validate.validate`` (val.py's work)
measures mAP50 / mAP50-95 of the .pt (PyTorch, the reference), the fp32 file and the INT8 file on
the val split. Latency = median wall time of one onnxruntime ``run`` at batch 1 and ``--imgsz``²
(``--repeats`` runs after a warm-up, ``--threads`` intra-op
threads, CPU provider), without pre-processing or NMS. The table has one fp32 and one INT8 row
per checkpoint — with the labels above exactly the Adlik-style rows "student alone", "distilled",
"student alone + INT8", "distilled + INT8", "qmimic-distilled + INT8".

Writes ``--out``.json and .md (default ``benchmarks/results/int8``); exported files go to
``--project`` (default ``runs/int8_report``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any

from engine.export import export_weights
from engine.validate import validate
from utils import onnx_int8 as q

ROOT = Path(__file__).resolve().parents[1]


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "model"


def _map(res: dict) -> dict[str, float]:
    return {"map50": round(float(res["map50"]), 4), "map": round(float(res["map"]), 4)}


def measure(weights: Path, label: str, args: argparse.Namespace) -> dict[str, Any]:
    """Export, quantise, time and validate one checkpoint; returns its record."""
    folder = Path(args.project) / _slug(label)
    folder.mkdir(parents=True, exist_ok=True)
    fp32, parity = export_weights(weights, imgsz=args.imgsz, dynamic=not args.static,
                                  output=folder / f"{_slug(label)}.onnx")
    images = q.calibration_images(args.data, args.calib_split, args.calib_images)
    int8 = q.quantize_int8(fp32, images, shape=(args.imgsz, args.imgsz))
    vkw = dict(data=args.data, imgsz=args.imgsz, batch_size=args.batch_size, workers=args.workers,
               project=folder / "val", exist_ok=False)  # validate's EvalSettings default: no plots
    m_pt = _map(validate(weights, device=args.device, **vkw))
    rows = []
    for precision, path in (("fp32", fp32), ("int8", int8)):
        lat = q.ort_latency(path, (args.imgsz, args.imgsz), repeats=args.repeats, warmup=args.warmup,
                            threads=args.threads)
        m = _map(validate(path, device="cpu", rect=not args.static, **vkw))  # --dynamic: the .pt's batches
        rows.append({"precision": precision, "file": str(path), "size_mb": round(q.file_mb(path), 3),
                     "latency_ms": round(lat["median_ms"], 2), "latency_iqr_ms": round(lat["iqr_ms"], 2), **m})
    return {"label": label, "weights": str(weights), "onnx_parity": parity, "pt": m_pt, "calib_images": len(images),
            "rows": rows}


def markdown(result: dict[str, Any]) -> list[str]:
    """The report as Markdown lines."""
    a = result["args"]
    lines = [
        "# INT8 deployment: fp32 vs INT8 ONNX",
        "",
        f"`python -m benchmarks.int8_report` on {Path(a['data']).name} (val split) at {a['imgsz']} px, "
        f"{'static' if a['static'] else 'dynamic'} ONNX, INT8 = onnxruntime static QDQ (uint8 activations per "
        f"tensor, int8 weights per channel, MinMax on {a['calib_images']} {a['calib_split']} images, decode and "
        f"Detect convs in float). Latency: onnxruntime {result['machine']['onnxruntime']} CPU, batch 1, "
        f"{a['threads']} thread(s), median of {a['repeats']}; {result['machine']['cpus']} CPUs "
        f"({result['machine']['cpu']}), load {result['machine']['load_avg_1min_at_start']} at start; "
        f"{result['date']}.",
        "",
        "| model | precision | mAP50 | mAP50-95 | Δ mAP50-95 | ONNX MB | latency ms |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        base = r["rows"][0]["map"]
        for row in r["rows"]:
            name = r["label"] if row["precision"] == "fp32" else f"{r['label']} + INT8"
            delta = "" if row["precision"] == "fp32" else f"{row['map'] - base:+.4f}"
            lines.append(f"| {name} | {row['precision']} | {row['map50']:.4f} | {row['map']:.4f} | {delta} | "
                         f"{row['size_mb']:.2f} | {row['latency_ms']:.2f} |")
    lines += ["", "PyTorch (.pt) mAP50-95 of the same checkpoints, for reference: "
              + ", ".join(f"{r['label']} {r['pt']['map']:.4f}" for r in result["results"]) + "."]
    if result.get("note"):
        lines += ["", result["note"]]
    return lines + [""]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="fp32 vs INT8 ONNX: size, onnxruntime latency and mAP per checkpoint")
    p.add_argument("--weights", nargs="+", required=True, help="checkpoints (.pt), one or more")
    p.add_argument("--labels", nargs="+", default=None, help="one label per checkpoint (default: file stems)")
    p.add_argument("--data", required=True, help="dataset yaml (val split for mAP, --calib-split for calibration)")
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--static", action="store_true", help="fixed-shape export (val then letterboxes squares)")
    p.add_argument("--calib-images", type=int, default=q.DEFAULT_CALIB_IMAGES)
    p.add_argument("--calib-split", default="train", choices=("train", "val"))
    p.add_argument("--batch-size", type=int, default=16, help="validation batch size")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="", help="device of the PyTorch (.pt) validation; ONNX files run on CPU")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for the latency")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--project", default=str(ROOT / "runs" / "int8_report"), help="where the ONNX files go")
    p.add_argument("--note", default="", help="a line appended to the Markdown (e.g. what the checkpoints are)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8"))
    args = p.parse_args(argv)
    if args.labels is None:
        args.labels = [Path(w).parent.parent.name if Path(w).parent.name == "weights" else Path(w).stem
                       for w in args.weights]
    if len(args.labels) != len(args.weights):
        p.error(f"--labels: {len(args.labels)} labels for {len(args.weights)} checkpoints")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    for w in args.weights:
        if not Path(w).is_file():
            raise SystemExit(f"int8_report: error: --weights {w} not found")
    import onnxruntime  # the figures name its version

    load = os.getloadavg()[0]  # a shared machine skews timings: record how busy it was
    results = [measure(Path(w), label, args) for w, label in zip(args.weights, args.labels)]
    result = {
        "benchmark": "int8",
        "args": {k: v for k, v in vars(args).items() if k not in ("weights", "labels", "project", "out", "note")},
        "machine": {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
                    "platform": platform.platform(), "load_avg_1min_at_start": round(load, 2)},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "note": args.note,
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
