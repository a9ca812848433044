"""Rebuild tests/fixtures/tiny_yolov5.{pt,onnx,npz}: an ONNX file exported by the REAL YOLOv5.

    python -m scripts.make_yolov5_onnx_fixture [--oracle /tmp/yolov5-oracle]

1. A yolov5n-shaped model at width 0.0625 (115k parameters, nc=2, names cat/dog, seed 0), its
   BatchNorm statistics set from generated pictures and its head rescaled so that the outputs vary
   (an untrained model predicts nothing worth comparing), written by our
   ``models.yolov5_format.save_yolov5`` -> ``tiny_yolov5.pt`` (official release layout).
2. YOLOv5 7.0's export.py (the oracle venv, run as a separate program from a scratch folder) turns it
   into ``tiny_yolov5.onnx`` (``--include onnx --imgsz 64``: static 1x3x64x64 input; YOLOv5 writes
   its metadata as Python literals, e.g. names "{0: 'cat', 1: 'dog'}").
3. YOLOv5 loads the .pt (``attempt_load``) and predicts on a fixed input; ``tiny_yolov5.npz`` keeps
   that input ``x`` (1, 3, 64, 64) and its decoded output ``pred`` (1, 252, 7).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

from scripts.oracle_yolov5_check import DEFAULT_ORACLE, find_oracle, run_oracle

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
IMGSZ = 64

_PREDICT = r"""
import sys, numpy as np, torch
from yolov5.models.experimental import attempt_load
m = attempt_load(sys.argv[1], device="cpu", fuse=True)
with torch.no_grad():
    y = m(torch.from_numpy(np.load(sys.argv[2])))
np.save(sys.argv[3], y[0].float().numpy())
"""


def tiny_model() -> torch.nn.Module:
    """The fixture's model (see the module docstring), eval mode."""
    import export
    from models.yolo import DetectionModel

    torch.manual_seed(0)
    cfg = yaml.safe_load((ROOT / "models" / "yolov5n.yaml").read_text())
    cfg.update(width_multiple=0.0625, nc=2)
    model = DetectionModel(cfg)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.momentum = 1.0  # running statistics := those of the calibration batch
    calib = np.concatenate([export.preprocess(export.synthetic_image((IMGSZ, IMGSZ), s), (IMGSZ, IMGSZ))
                            for s in range(20, 28)])
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(calib))
        for conv in model.detect.m:
            conv.weight.mul_(3.0)
            bias = conv.bias.view(model.detect.na, -1)
            bias.normal_(0.0, 0.5)
            bias[:, 4] -= 1.0
    for m in bns:
        m.momentum = 0.03
    model.names = ["cat", "dog"]
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    import export
    from models.yolov5_format import save_yolov5

    p = argparse.ArgumentParser(description="rebuild the YOLOv5-exported ONNX test fixture")
    p.add_argument("--oracle", default=str(DEFAULT_ORACLE))
    opt = p.parse_args(argv)
    py = find_oracle(Path(opt.oracle))
    if py is None:
        print(f"SKIPPED: no YOLOv5 oracle venv at {opt.oracle}")
        return 0
    with tempfile.TemporaryDirectory(prefix="yolov5-onnx-fixture-") as tmp:
        work = Path(tmp)
        pt = save_yolov5(tiny_model(), work / "tiny_yolov5.pt")
        x = export.preprocess(export.synthetic_image((48, 64), 7), (IMGSZ, IMGSZ))
        np.save(work / "x.npy", x)
        run_oracle(py, ["-m", "yolov5.export", "--weights", str(pt), "--include", "onnx", "--imgsz", str(IMGSZ),
                        "--device", "cpu"], work)
        run_oracle(py, ["-c", _PREDICT, str(pt), str(work / "x.npy"), str(work / "pred.npy")], work)
        FIXTURES.mkdir(parents=True, exist_ok=True)
        shutil.copy(pt, FIXTURES / "tiny_yolov5.pt")
        shutil.copy(work / "tiny_yolov5.onnx", FIXTURES / "tiny_yolov5.onnx")
        np.savez_compressed(FIXTURES / "tiny_yolov5.npz", x=x, pred=np.load(work / "pred.npy"))
    for name in ("tiny_yolov5.pt", "tiny_yolov5.onnx", "tiny_yolov5.npz"):
        print(f"wrote {FIXTURES / name} ({(FIXTURES / name).stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
