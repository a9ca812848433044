"""Does the real YOLOv5 read what ``export.py --include yolov5`` writes, and agree with us?

Usage (from the repository root)::

    python -m scripts.oracle_yolov5_check                      # demo teacher on the demo val split
    python -m scripts.oracle_yolov5_check --weights best.pt --data data/VisDrone.yaml --imgsz 640 --max-images 200
    python -m scripts.oracle_yolov5_check --json benchmarks/results/yolov5_interop.json

Needs the YOLOv5 7.0 "oracle" venv (``bash ../shared/tools/yolov5_oracle.sh setup``, default
/tmp/yolov5-oracle, or ``--oracle VENV``); without it the script says so and exits 0 (skipped).
YOLOv5 is only ever run as a separate program (its CLI modules, or a short snippet that loads the file
through its public ``attempt_load`` / ``yolov5.load`` / ``torch.hub.load``), from a scratch folder
outside the project; nothing of it is imported here.

Checks, on the first ``--max-images`` images of the val split:
1. decoded predictions (bs, N, 5 + nc) on identical letterboxed input tensors: YOLOv5 loading the
   exported file vs our source model (fp32) and vs our loader reading the exported file;
2. YOLOv5's torch.hub-style loaders (``torch.hub.load(<package>, 'custom', source='local')`` and
   ``yolov5.load``) run on one image;
3. YOLOv5's val.py on the exported file vs our val.py on the exported file and on the source (mAP50,
   mAP50-95, P, R), and YOLOv5's detect.py vs our detect.py (box counts and coordinates);
4. YOLOv5's export.py turning the exported file into ONNX, and our val.py reading that ONNX (its
   ``names`` metadata is a Python dict literal).
YOLOv5's NMS gives up after a time limit on a loaded CPU and drops the rest of a batch; any such
warning in its logs is reported with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ORACLE = Path("/tmp/yolov5-oracle")

# Environment that keeps YOLOv5 offline and quiet (see ../shared/tools/yolov5_oracle.sh).
ORACLE_ENV = {"YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "false", "YOLOv5_AUTOINSTALL": "false",
              "ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS": "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
              "PIN_MEMORY": "false", "MPLBACKEND": "Agg"}

# Run by the oracle's interpreter: load the file the ways YOLOv5 users do, save raw predictions.
ORACLE_SNIPPET = r"""
import json, os, sys
import numpy as np, torch
import yolov5
from yolov5.models.experimental import attempt_load
weights, xfile, outfile, image, size = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
model = attempt_load(weights, device="cpu", fuse=True)
with torch.no_grad():
    y = model(torch.from_numpy(np.load(xfile)))
np.save(outfile, (y[0] if isinstance(y, (list, tuple)) else y).float().numpy())
info = {"class": type(model).__name__, "names": {int(k): v for k, v in dict(model.names).items()},
        "stride": [float(s) for s in model.stride]}
hub_dir = os.path.dirname(yolov5.__file__)
loaders = {"yolov5.load": lambda: yolov5.load(weights, device="cpu")}
if os.path.isfile(os.path.join(hub_dir, "hubconf.py")):
    loaders["torch.hub.load(custom, source=local)"] = lambda: torch.hub.load(
        hub_dir, "custom", path=weights, source="local", device="cpu", verbose=False)
for name, make in loaders.items():
    try:
        res = make()(image, size=size)
        info[name] = {"detections": int(len(res.xyxy[0]))}
    except Exception as e:  # reported, not fatal: the other checks still run
        info[name] = {"error": f"{type(e).__name__}: {e}"}
print("ORACLE-JSON " + json.dumps(info))
"""


def find_oracle(venv: Path) -> Path | None:
    """The oracle's python, or None when the venv is absent."""
    py = venv / "bin" / "python"
    return py if py.is_file() else None


def run_oracle(py: Path, args: list[str], cwd: Path, timeout: float = 1800) -> str:
    """Run the oracle interpreter with ``args``; return stdout+stderr; raise on a non-zero exit."""
    env = {**os.environ, **ORACLE_ENV, "YOLOV5_CONFIG_DIR": str(cwd / "cfg"), "YOLO_CONFIG_DIR": str(cwd / "ucfg")}
    env.pop("PYTHONPATH", None)  # nothing of ours on its path
    (cwd / "cfg").mkdir(exist_ok=True)
    (cwd / "ucfg").mkdir(exist_ok=True)
    font = cwd / "cfg" / "Arial.ttf"  # its plots would download Arial.ttf: any TTF will do
    if not font.exists():
        import matplotlib

        shutil.copy(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)
    proc = subprocess.run([str(py), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        tail = "\n".join(log.strip().splitlines()[-15:])
        raise RuntimeError(f"oracle {' '.join(args[:3])} failed (exit {proc.returncode}):\n{tail}")
    return log


def _nms_warnings(log: str) -> int:
    return log.count("NMS time limit")


def parse_oracle_val(log: str) -> dict[str, float]:
    """P, R, mAP50, mAP50-95 from the 'all' row of YOLOv5 val.py's table."""
    rows = [ln.split() for ln in log.splitlines() if ln.strip().startswith("all ")]
    if not rows:
        raise RuntimeError("no 'all' row in the oracle's val output")
    p, r, m50, m = map(float, rows[-1][-4:])
    return {"precision": p, "recall": r, "map50": m50, "map": m}


def read_txt_dir(folder: Path) -> dict[str, np.ndarray]:
    """{stem: (n, 6) rows cls xc yc w h conf} from a --save-txt labels folder (missing file: none)."""
    out = {}
    for f in sorted(folder.glob("*.txt")):
        rows = [list(map(float, ln.split())) for ln in f.read_text().splitlines() if ln.strip()]
        out[f.stem] = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return out


def compare_detections(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> dict[str, float]:
    """Box counts and, where both found the same number of boxes, the largest normalised |Δxywh|
    and |Δconf| after sorting each image's boxes by (class, confidence)."""
    stems = sorted(set(ours) | set(theirs))
    empty = np.zeros((0, 6))
    n_ours = sum(len(ours.get(s, empty)) for s in stems)
    n_theirs = sum(len(theirs.get(s, empty)) for s in stems)
    same, dxywh, dconf = 0, 0.0, 0.0
    for s in stems:
        a, b = ours.get(s, empty), theirs.get(s, empty)
        if len(a) != len(b):
            continue
        same += 1
        if len(a):
            a = a[np.lexsort((-a[:, 5], a[:, 0]))]
            b = b[np.lexsort((-b[:, 5], b[:, 0]))]
            if (a[:, 0] == b[:, 0]).all():
                dxywh = max(dxywh, float(np.abs(a[:, 1:5] - b[:, 1:5]).max()))
                dconf = max(dconf, float(np.abs(a[:, 5] - b[:, 5]).max()))
    return {"boxes_ours": n_ours, "boxes_yolov5": n_theirs, "images": len(stems),
            "images_same_count": same, "max_dxywh_norm": dxywh, "max_dconf": dconf}


def _subset_yaml(cfg: dict, work: Path, n: int) -> tuple[Path, list[str]]:
    """A dataset yaml (absolute paths) over the first ``n`` val images, via a .txt list; the files."""
    from utils.image_files import list_image_files

    files = list_image_files(cfg["val"])[:n]
    lst = work / "val_subset.txt"
    lst.write_text("".join(f"{f}\n" for f in files))
    y = work / "data.yaml"
    y.write_text(yaml.safe_dump({"path": str(work), "train": str(lst), "val": str(lst),
                                 "names": dict(enumerate(cfg["names"]))}))
    return y, files


def check(weights: Path, data: Path, imgsz: int, max_images: int, oracle_py: Path, work: Path,
          batch_size: int = 8) -> dict:
    """Run every check; return the figures (see the module docstring)."""
    import detect
    import export
    import val
    from models import load_model
    from utils.data_config import load_data_config

    results: dict = {"weights": str(weights), "data": str(data), "imgsz": imgsz}
    cfg = load_data_config(data, require=("val",))
    data_yaml, files = _subset_yaml(cfg, work, max_images)
    results["images"] = len(files)

    exported, rt = export.export_yolov5(weights, work / f"{weights.stem}_yolov5.pt", imgsz)
    results["roundtrip_ours_max_diff"] = rt

    # 1-2. decoded predictions on identical inputs; hub-style loaders
    import cv2

    x = np.concatenate([export.preprocess(cv2.imread(f), (imgsz, imgsz)) for f in files[:8]])
    np.save(work / "x.npy", x)
    log = run_oracle(oracle_py, ["-c", ORACLE_SNIPPET, str(exported), str(work / "x.npy"), str(work / "y.npy"),
                                 files[0], str(imgsz)], work)
    info = json.loads(next(ln for ln in log.splitlines() if ln.startswith("ORACLE-JSON "))[12:])
    y_oracle = np.load(work / "y.npy")
    with torch.no_grad():
        y_source = load_model(weights)(torch.from_numpy(x))[0].numpy()
        y_back = load_model(exported)(torch.from_numpy(x))[0].numpy()
    results["decoded"] = {
        "shape": list(y_oracle.shape),
        "max_abs_yolov5_vs_ours_readback": float(np.abs(y_oracle - y_back).max()),
        "max_abs_yolov5_vs_ours_source_fp32": float(np.abs(y_oracle - y_source).max()),
        "max_abs_scores_yolov5_vs_source": float(np.abs(y_oracle[..., 4:] - y_source[..., 4:]).max()),
    }
    results["oracle_load"] = info

    # 3. val both ways, detect both ways
    vlog = run_oracle(oracle_py, ["-m", "yolov5.val", "--weights", str(exported), "--data", str(data_yaml),
                                  "--imgsz", str(imgsz), "--batch-size", str(batch_size), "--device", "cpu",
                                  "--project", str(work / "oracle_val"), "--workers", "0"], work)
    results["val_yolov5_on_exported"] = {**parse_oracle_val(vlog), "nms_time_limit_warnings": _nms_warnings(vlog)}
    for key, w in (("val_ours_on_exported", exported), ("val_ours_on_source", weights)):
        r = val.run(w, data_yaml, imgsz=imgsz, batch_size=batch_size, device="cpu", workers=0, plots=False,
                    project=work / "ours_val", name=key)
        results[key] = {k: float(r[k]) for k in ("precision", "recall", "map50", "map")}

    src_dir = work / "images"
    src_dir.mkdir(exist_ok=True)
    for f in files:
        dst = src_dir / Path(f).name
        if not dst.exists():
            os.symlink(f, dst)
    dlog = run_oracle(oracle_py, ["-m", "yolov5.detect", "--weights", str(exported), "--source", str(src_dir),
                                  "--imgsz", str(imgsz), "--device", "cpu", "--save-txt", "--save-conf", "--nosave",
                                  "--project", str(work / "oracle_detect"), "--name", "exp"], work)
    detect.run(exported, src_dir, imgsz=imgsz, device="cpu", save_txt=True, save_conf=True, nosave=True,
               project=work / "ours_detect", name="exp")
    results["detect"] = {**compare_detections(read_txt_dir(work / "ours_detect" / "exp" / "labels"),
                                              read_txt_dir(work / "oracle_detect" / "exp" / "labels")),
                         "nms_time_limit_warnings": _nms_warnings(dlog)}

    # 4. YOLOv5's own ONNX export of our file, read by our val.py
    run_oracle(oracle_py, ["-m", "yolov5.export", "--weights", str(exported), "--include", "onnx",
                           "--imgsz", str(imgsz), "--device", "cpu"], work)
    onnx_file = exported.with_suffix(".onnx")
    r = val.run(onnx_file, data_yaml, imgsz=imgsz, batch_size=1, device="cpu", workers=0, plots=False,
                project=work / "ours_val", name="onnx")
    results["val_ours_on_yolov5_onnx"] = {k: float(r[k]) for k in ("precision", "recall", "map50", "map")}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=str(ROOT / "weights" / "demo_teacher.pt"))
    p.add_argument("--data", default=str(ROOT / "data" / "demo.yaml"))
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--max-images", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--oracle", default=str(DEFAULT_ORACLE), help="the YOLOv5 7.0 venv")
    p.add_argument("--json", default="", help="also write the figures to this file")
    opt = p.parse_args(argv)
    py = find_oracle(Path(opt.oracle))
    if py is None:
        print(f"SKIPPED: no YOLOv5 oracle venv at {opt.oracle} (build it with "
              "`bash ../shared/tools/yolov5_oracle.sh setup`, or pass --oracle VENV)")
        return 0
    with tempfile.TemporaryDirectory(prefix="yolov5-oracle-check-") as tmp:
        res = check(Path(opt.weights).resolve(), Path(opt.data), opt.imgsz, opt.max_images, py, Path(tmp),
                    opt.batch_size)
    text = json.dumps(res, indent=2)
    print(text)
    if opt.json:
        Path(opt.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opt.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
