"""Training-step throughput and peak memory: the student alone vs. every distillation method.

Usage (from the repo root; synthetic batches, no dataset needed)::

    python -m benchmarks.bench_train_step                                   # yolov5p ← yolov5n, 160 px, CPU/GPU auto
    python -m benchmarks.bench_train_step --device 0 --imgsz 640 --batch-size 16 \\
        --student models/yolov5s.yaml --teacher yolov5m.pt
    python -m benchmarks.bench_train_step --device cpu --threads 1 --repeats 5 --methods objmse,pkd

Rows: ``student`` (detection loss only), ``teacher`` (the frozen teacher's forward pass alone, as the
Distiller runs it), the output methods ``objmse``, ``soft``, ``chen`` (each alone, no feature term)
and the feature methods ``mse``, ``pkd``, ``overhaul``, ``mimic``, ``cwd``, ``mgd`` (each alone,
``--d_output none``). A step is what ``engine.trainer`` does per batch, with an optimizer step every
batch: uint8 → float, student forward (autocast on CUDA), ``TrainingCriterion`` (``DetectionLoss``
+ ``Distiller``), GradScaler backward, unscale, grad-norm clip, SGD step over the student and the
Distiller's connectors (``engine.optim.build_optimizer``), EMA update.

Method: every row gets its own deep copies of the same initial student and teacher, built before
any hook is placed, and the same batch (random images, random boxes, fixed seed). After a warm-up,
the rows are timed in interleaved rounds (``--repeats`` rounds of ``--steps`` steps per row, the row
order rotated each round) so that drifting machine load hits every row alike; the tables give the
median. ``KD overhead`` = row − student − teacher forward: what a method costs beyond the teacher's
forward pass, which no distillation method can avoid. ``--compile-teacher`` adds each teacher row
and distillation row once more with a ``torch.compile``'d teacher (a probe, not a training option).

Size: ~460 lines: three measurement modes (per-method rows, the distill / (student + teacher) ratio,
per-row peak memory in a subprocess) share the row builders and the interleaved timing; the step
itself is `engine.step.train_step`, not re-implemented here.

Peak memory is measured in a fresh subprocess per row (``--probe``) that builds only that row and
runs a few steps: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's resident-set
high-water mark (``VmHWM``, see :func:`benchmarks.common.peak_rss_mb`), shown with its excess over
an ``idle`` probe (interpreter + torch, nothing built). ``--no-mem`` skips the probes.

A yaml teacher is randomly initialised; its BatchNorm statistics are first calibrated on two
synthetic batches so its eval-mode outputs stay in a sane range (timing is what is measured here,
not accuracy). Writes ``benchmarks/results/train_step.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from benchmarks.common import RESULTS_DIR, ROOT, machine_info, peak_rss_mb, summarize, time_block, write_results
from distill.distiller import FEATURE_METHODS, DistillConfig, Distiller
from distill.teacher import load_teacher, prepare_teacher, run_teacher
from engine.optim import NOMINAL_BATCH
from engine.setup import load_hyp_file
from engine.step import build_step_state, train_step
from models import DetectionModel, load_model
from utils.allocator import keep_freed_memory
from utils.loss import scale_hyp
from utils.precision import Precision, choose_precision
from utils.torch_utils import select_device

OUTPUT_ROWS = ("objmse", "soft", "chen")
ROWS = ("student", "teacher", *OUTPUT_ROWS, *FEATURE_METHODS)
COMPILED = " compiled"  # row-name suffix: the same row with a torch.compile'd teacher (--compile-teacher)
PROBE_PREFIX = "PROBE "


# ------------------------------------------------------------------------------------ building
def is_yaml(spec: str | Path) -> bool:
    return str(spec).lower().endswith((".yaml", ".yml"))


def resolve_spec(spec: str, flag: str) -> str:
    """A model yaml or checkpoint path; shipped yaml names (``yolov5s.yaml``) resolve to ``models/``."""
    p = Path(spec)
    if p.is_file():
        return str(p)
    if is_yaml(spec) and (ROOT / "models" / p.name).is_file():
        return str(ROOT / "models" / p.name)
    raise FileNotFoundError(f"{flag} {spec}: no such model yaml or checkpoint (try models/yolov5n.yaml)")


@torch.no_grad()
def calibrate_bn(model: nn.Module, imgsz: int, device: torch.device, batches: int = 2, batch_size: int = 4) -> None:
    """Set a random-init model's BN running statistics from ``batches`` synthetic batches.

    Eval-mode outputs of a never-trained deep network are otherwise far from its train-mode ones
    (unit running variance everywhere), which can overflow fp16 teachers.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    gen = torch.Generator(device="cpu").manual_seed(1)
    for _ in range(batches):
        model(torch.rand(batch_size, 3, imgsz, imgsz, generator=gen).to(device))
    for m, mom in zip(bns, momenta):
        m.momentum = mom
    model.eval()


def build_teacher(spec: str, device: torch.device, imgsz: int, seed: int, precision: Precision,
                  fold_bn: bool = True) -> DetectionModel:
    """A frozen teacher as the trainer builds it (:func:`distill.teacher.load_teacher` for a .pt: the
    run's dtype, channels_last, BN folded unless Overhaul needs it), else a calibrated random init."""
    if not is_yaml(spec):
        return load_teacher(spec, device, precision=precision, fold_bn=fold_bn)
    torch.manual_seed(seed + 1)
    model = load_model(spec, device=device)
    calibrate_bn(model, imgsz, device)
    return prepare_teacher(model, precision, fold_bn)


def build_teachers(args: argparse.Namespace, rows: list[str], device: torch.device,
                   precision: Precision) -> tuple[DetectionModel | None, DetectionModel | None]:
    """(BN-folded teacher, unfolded teacher), each only when a row needs it."""
    rows = [r.removesuffix(COMPILED) for r in rows]
    folded = any(r not in ("student", "overhaul") for r in rows)
    unfolded = "overhaul" in rows
    return (build_teacher(args.teacher, device, args.imgsz, args.seed, precision, True) if folded else None,
            build_teacher(args.teacher, device, args.imgsz, args.seed, precision, False) if unfolded else None)


def build_student(spec: str, nc: int | None, device: torch.device, seed: int, precision: Precision) -> DetectionModel:
    torch.manual_seed(seed)
    return precision.prepare(load_model(spec, nc=nc, device=device).train())


def synthetic_batch(batch_size: int, imgsz: int, nc: int, labels_per_image: int, device: torch.device,
                    seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (B,3,S,S) and targets (B·k, 6) ``[img, cls, xc, yc, w, h]`` normalised."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    imgs = torch.randint(0, 256, (batch_size, 3, imgsz, imgsz), generator=gen, dtype=torch.uint8)
    n = batch_size * labels_per_image
    img_idx = torch.arange(batch_size).repeat_interleave(labels_per_image).float()
    cls = torch.randint(0, nc, (n,), generator=gen).float()
    wh = 0.02 + 0.3 * torch.rand(n, 2, generator=gen)
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=gen)  # boxes inside the image
    targets = torch.cat([img_idx[:, None], cls[:, None], xy, wh], 1)
    return imgs.to(device), targets.to(device)


@dataclass
class Row:
    """One configuration being timed: a callable training step plus what it reports."""

    name: str
    step: Callable[[], None]
    kd_terms: list[str] = field(default_factory=list)
    kd_params: int = 0
    nonfinite: list[int] = field(default_factory=lambda: [0])


def compile_teacher(teacher: nn.Module, imgs_u8: torch.Tensor) -> nn.Module:
    """``teacher`` compiled in place (``nn.Module.compile``: Inductor, weights frozen into the graph as
    constants, static shapes) by one forward on the benchmark's batch, so that the timed steps exclude
    the compile (its seconds are printed). In place, after the Distiller placed its feature taps: the
    compiled graph then contains their hooks. A probe of what compiling the teacher would buy, not a
    training option (it needs a C++ compiler on the CPU and recompiles for every new input shape)."""
    import torch._inductor.config as inductor_config

    teacher.compile(dynamic=False)
    start = time.perf_counter()
    with inductor_config.patch(freezing=True):
        run_teacher(teacher, imgs_u8.float() / 255)
    print(f"teacher compiled in {time.perf_counter() - start:.1f} s", flush=True)
    return teacher


def make_row(name: str, student0: nn.Module | None, teacher0: tuple[nn.Module | None, nn.Module | None],
             hyp: dict, imgs_u8: torch.Tensor, targets: torch.Tensor, precision: Precision) -> Row:
    """Deep copies of the pristine models + the engine's own pieces (`engine.step`) for row ``name``.

    ``teacher0``: (BN-folded teacher, teacher with BN) as the trainer builds them for non-Overhaul /
    Overhaul runs (either may be None when no row needs it)."""
    label, name = name, name.removesuffix(COMPILED)
    compiled = label != name
    if name == "teacher":
        teacher = copy.deepcopy(teacher0[0])
        if compiled:
            teacher = compile_teacher(teacher, imgs_u8)
        return Row(label, lambda: run_teacher(teacher, imgs_u8.float() / 255))  # the Distiller's teacher pass

    model = copy.deepcopy(student0).train()
    det = model.detect
    loss_hyp = scale_hyp(hyp, det.nl, det.nc, imgs_u8.shape[-1])
    distiller = None
    if name != "student":
        output, features = (name, ()) if name in OUTPUT_ROWS else ("none", (name,))
        cfg = DistillConfig(output=output, output_explicit=True, features=features, hyp=loss_hyp, t_val=False)
        teacher = teacher0[name == "overhaul"]  # Overhaul taps BN outputs: its teacher keeps its BN
        if getattr(teacher, "names", None) is not None:  # a yaml student has placeholder names; the
            model.names = teacher.names  # trainer gives both the dataset's, so the benchmark does too
        teacher = copy.deepcopy(teacher)
        distiller = Distiller(model, teacher, cfg).to(imgs_u8.device).train()
        if compiled:
            compile_teacher(teacher, imgs_u8)
    # an optimizer step every batch (accumulate 1); NOMINAL_BATCH only sets the weight decay, as in training
    state = build_step_state(model, distiller, hyp, loss_hyp, precision, imgs_u8.shape[0], NOMINAL_BATCH)
    row = Row(label, lambda: None)
    counter = itertools.count()

    def step() -> None:  # engine.step.train_step: what engine.trainer runs per batch
        if train_step(state, imgs_u8, targets, next(counter), accumulate=1) is None:
            row.nonfinite[0] += 1

    row.step = step
    if distiller is not None:
        row.kd_terms = list(distiller.weights)
        row.kd_params = sum(p.numel() for p in distiller.parameters())
    return row


# ------------------------------------------------------------------------------------- measuring
def probe(args: argparse.Namespace, device: torch.device) -> dict:
    """Subprocess body: build one row only, run a few steps, report the peak memory."""
    name = args.probe
    if device.type == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(device)
    result: dict = {"row": name}
    if name != "idle":
        precision = choose_precision(device, not args.noamp)
        teacher0 = build_teachers(args, [name], device, precision)
        student0 = build_student(args.student, args.nc, device, args.seed, precision) if name != "teacher" else None
        hyp = load_hyp_file(args.hyp)
        imgs, targets = synthetic_batch(args.batch_size, args.imgsz, args.nc, args.labels_per_image, device, args.seed)
        row = make_row(name, student0, teacher0, hyp, imgs, targets, precision)
        del student0, teacher0  # the row holds its own copies; the CPU high-water mark keeps them anyway
        for _ in range(args.mem_steps):
            row.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        result["cuda_peak_alloc_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        result["cuda_peak_reserved_mb"] = round(torch.cuda.max_memory_reserved(device) / 2**20, 1)
    result["rss_peak_mb"] = round(peak_rss_mb(), 1)
    return result


def run_probe(args: argparse.Namespace, name: str, device: torch.device) -> dict:
    """Run :func:`probe` for row ``name`` in a fresh interpreter; its parsed result (or an error)."""
    dev = "cpu" if device.type == "cpu" else str(device.index or 0)
    cmd = [sys.executable, "-m", "benchmarks.bench_train_step", "--probe", name, "--student", args.student,
           "--teacher", args.teacher, "--imgsz", str(args.imgsz), "--batch-size", str(args.batch_size),
           "--device", dev, "--threads", str(args.threads), "--hyp", args.hyp, "--nc", str(args.nc),
           "--labels-per-image", str(args.labels_per_image), "--seed", str(args.seed),
           "--mem-steps", str(args.mem_steps)] + (["--noamp"] if args.noamp else [])
    env = dict(os.environ)
    if args.threads > 0:
        env["OMP_NUM_THREADS"] = str(args.threads)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(PROBE_PREFIX):
            return json.loads(line[len(PROBE_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"row": name, "error": f"probe exited {proc.returncode}: {tail[0]}"}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def measure(args: argparse.Namespace, rows: list[str], device: torch.device) -> dict:
    """Build every row in this process, warm up, then time them in interleaved rounds."""
    precision = choose_precision(device, not args.noamp)
    teacher0 = build_teachers(args, rows, device, precision)
    student0 = build_student(args.student, args.nc, device, args.seed, precision)
    hyp = load_hyp_file(args.hyp)
    imgs, targets = synthetic_batch(args.batch_size, args.imgsz, args.nc, args.labels_per_image, device, args.seed)
    built = [make_row(r, student0, teacher0, hyp, imgs, targets, precision) for r in rows]
    for row in built:
        for _ in range(args.warmup):
            row.step()
    samples: dict[str, list[float]] = {r.name: [] for r in built}
    for k in range(args.repeats):
        order = built[k % len(built):] + built[:k % len(built)]  # rotate: no row always runs first
        for row in order:
            samples[row.name].append(time_block(row.step, args.steps, device))
    return {
        "student_params": n_params(student0),
        "teacher_params": n_params(next((t for t in teacher0 if t is not None), nn.Identity())),
        "precision": precision.describe(),
        "rows": {r.name: {"samples_s": samples[r.name], "kd_terms": r.kd_terms, "kd_params": r.kd_params,
                          "nonfinite_steps": r.nonfinite[0]} for r in built},
    }


# ---------------------------------------------------------------------------------------- report
def build_table(result: dict) -> list[str]:
    """Markdown lines for the results dict written by :func:`main`."""
    m, cfg = result["machine"], result["config"]
    cuda = m["device"].startswith("cuda")
    mem_head = "peak alloc MiB" if cuda else "peak RSS MiB (over idle)"
    lines = [
        "# Training-step throughput: student alone vs. each distillation method",
        "",
        f"`python -m benchmarks.bench_train_step` — student `{cfg['student']}` ({result['student_params']:,} params) "
        + (f"← teacher `{cfg['teacher']}` ({result['teacher_params']:,} params)" if result["teacher_params"] else
           "(no teacher)")
        + f", {cfg['imgsz']} px, batch "
        f"{cfg['batch_size']}, nc {cfg['nc']}, {cfg['labels_per_image']} synthetic boxes/image; "
        f"{cfg['amp']}.",
        f"Device {m['device']} ({m['device_name']}), {m['cpus']} CPUs, {m['torch_threads']} torch thread(s), "
        f"torch {m['torch']}, Python {m['python']}"
        + (f", load average at start {m['load_average'][0]}" if m.get("load_average") else "")
        + f"; {result['date']}.",
        f"Median of {cfg['repeats']} interleaved rounds × {cfg['steps']} steps after {cfg['warmup']} warm-up steps; "
        "`KD overhead` = row − student − teacher forward.",
        "",
        f"| row | ms/step | images/s | IQR ms | Δ vs student ms | KD overhead ms | KD params | {mem_head} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        mem = r.get("memory") or {}
        if "error" in mem:
            mem_s = "error"
        elif cuda and "cuda_peak_alloc_mb" in mem:
            mem_s = f"{mem['cuda_peak_alloc_mb']:.0f}"
        elif "rss_peak_mb" in mem:
            mem_s = f"{mem['rss_peak_mb']:.0f} (+{mem['rss_over_idle_mb']:.0f})"
        else:
            mem_s = "—"
        delta = "—" if r["delta_vs_student_ms"] is None else f"{r['delta_vs_student_ms']:+.1f}"
        over = "—" if r["kd_overhead_ms"] is None else f"{r['kd_overhead_ms']:+.1f}"
        label = r["row"].replace("teacher", "teacher forward") if r["row"].startswith("teacher") else r["row"]
        lines.append(f"| {label} | {r['ms_per_step']:.1f} | {r['images_per_s']:.1f} | {r['iqr_ms']:.1f} | {delta} | "
                     f"{over} | {r['kd_params']:,} | {mem_s} |")
    bad = [r["row"] for r in result["rows"] if r.get("nonfinite_steps")]
    lines.append("")
    if bad:
        lines.append(f"Non-finite losses (steps skipped, timings slightly low) in: {', '.join(bad)}.")
    if not cuda and result.get("idle_rss_mb") is not None:
        lines.append("CPU memory is the RSS high-water mark of a fresh process that builds only that row "
                     f"(idle probe = interpreter + torch, nothing built: {result['idle_rss_mb']:.0f} MiB).")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--student", default="models/yolov5p.yaml", help="student model yaml or checkpoint")
    p.add_argument("--teacher", default="models/yolov5n.yaml",
                   help="teacher checkpoint, or a model yaml (random init, BN calibrated)")
    p.add_argument("--imgsz", type=int, default=160)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="", help="cpu, 0, ... ('' = first GPU if any); CUDA uses AMP + GradScaler")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median reported)")
    p.add_argument("--steps", type=int, default=3, help="training steps per row per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per row first")
    p.add_argument("--methods", default="all",
                   help=f"comma list of rows to compare with student and teacher; default all of "
                        f"{','.join(ROWS[2:])}; 'none': the student's step alone")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--hyp", default=str(ROOT / "data" / "hyps" / "hyp.scratch-low.yaml"))
    p.add_argument("--nc", type=int, default=0, help="classes (default: the teacher's)")
    p.add_argument("--labels-per-image", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem", action=argparse.BooleanOptionalAction, default=True,
                   help="measure peak memory per row in fresh subprocesses")
    p.add_argument("--mem-steps", type=int, default=3, help="steps each memory probe runs")
    p.add_argument("--out", default=str(RESULTS_DIR / "train_step"), help="output path stem (.json and .md)")
    p.add_argument("--noamp", action="store_true", help="fp32 (as train_distill.py --noamp); default: the "
                   "run's AMP (fp16 + GradScaler on CUDA, bf16 on CPUs with native bf16)")
    p.add_argument("--ratio", action="store_true",
                   help="ratio mode: student step, teacher forward and the --methods distillation step (default "
                        "objmse) only, no memory probes; writes distill/(student+teacher) to <out>_<fp32|bf16|fp16>")
    p.add_argument("--compile-teacher", action="store_true",
                   help="also time the teacher row and every distillation row with a torch.compile'd teacher "
                        "(Inductor, frozen weights; needs a C++ compiler on the CPU), rows suffixed 'compiled'")
    p.add_argument("--probe", default="", help=argparse.SUPPRESS)  # internal: one row, memory only
    args = p.parse_args(argv)
    if args.ratio:
        args.mem = False
        if args.methods == "all":
            args.methods = "objmse"
        if args.out == str(RESULTS_DIR / "train_step"):
            args.out = str(RESULTS_DIR / "train_step_ratio")
    args.student = resolve_spec(args.student, "--student")
    args.teacher = resolve_spec(args.teacher, "--teacher")
    if args.methods == "all":
        args.rows = list(ROWS)
    elif args.methods == "none":  # the student's step alone (e.g. training images/s for bench_dataloader)
        args.rows = ["student"]
    else:
        chosen = [m.strip() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in chosen if m not in ROWS[2:]]
        if bad:
            p.error(f"--methods {','.join(bad)}: unknown; use any of {','.join(ROWS[2:])}")
        args.rows = ["student", "teacher", *chosen]
    if args.compile_teacher:
        args.rows += [r + COMPILED for r in args.rows if r != "student"]
    for flag in ("repeats", "steps", "batch_size", "imgsz"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    return args


def teacher_nc(spec: str) -> int:
    """Classes of the teacher (yaml ``nc`` or the checkpoint's), without building it."""
    if is_yaml(spec):
        return int(yaml.safe_load(Path(spec).read_text())["nc"])
    from models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(spec)
    return int(ckpt["yaml"].get("nc") or len(ckpt["names"]))


def summary_rows(measured: dict, memory: dict[str, dict], batch_size: int) -> list[dict]:
    """Per row: median ms/step, images/s, deltas vs the student, KD overhead, the ratio row / (student
    step + teacher forward) (the distillation step's cost goal is <= 1.10) and row / student step
    (issue 16's goal: <= 1.3). A row with a compiled teacher is set against the compiled teacher's row."""
    med = {name: summarize(r["samples_s"])["median"] for name, r in measured["rows"].items()}
    mins = {name: min(r["samples_s"]) for name, r in measured["rows"].items()}
    student_s = med.get("student")
    rows = []
    for name, r in measured["rows"].items():
        st = summarize(r["samples_s"])
        kd = name != "student" and not name.startswith("teacher")
        t_row = "teacher" + COMPILED * name.endswith(COMPILED)
        teacher_s = med.get(t_row)
        rows.append({
            "row": name,
            "ms_per_step": round(st["median"] * 1e3, 2),
            "min_ms": round(st["min"] * 1e3, 2),
            "iqr_ms": round(st["iqr"] * 1e3, 2),
            "images_per_s": round(batch_size / st["median"], 1),
            "delta_vs_student_ms": round((st["median"] - student_s) * 1e3, 2) if kd else None,
            "kd_overhead_ms": round((st["median"] - student_s - teacher_s) * 1e3, 2) if kd else None,
            "ratio_vs_student_plus_teacher": round(st["median"] / (student_s + teacher_s), 3) if kd else None,
            # the fastest samples: on a shared machine the least disturbed estimate of each cost
            "ratio_of_minima": round(mins[name] / (mins["student"] + mins[t_row]), 3) if kd else None,
            "ratio_vs_student": round(st["median"] / student_s, 3) if kd else None,
            "kd_terms": r["kd_terms"],
            "kd_params": r["kd_params"],
            "nonfinite_steps": r["nonfinite_steps"],
            "memory": memory.get(name),
            "samples_ms": [round(s * 1e3, 2) for s in r["samples_s"]],
        })
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()  # as train_distill.py does: the steps timed here are the training process's
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    if args.nc <= 0:
        args.nc = teacher_nc(args.teacher)
    if args.probe:
        res = probe(args, device)
        print(PROBE_PREFIX + json.dumps(res), flush=True)
        return res

    machine = machine_info(device)
    t0 = time.perf_counter()
    measured = measure(args, args.rows, device)
    memory: dict[str, dict] = {}
    idle = None
    if args.mem:
        idle = run_probe(args, "idle", device) if device.type == "cpu" else None
        memory = {r: run_probe(args, r, device) for r in args.rows}
        if idle is not None and "rss_peak_mb" in idle:
            for mem in memory.values():
                if "rss_peak_mb" in mem:
                    mem["rss_over_idle_mb"] = round(mem["rss_peak_mb"] - idle["rss_peak_mb"], 1)

    rows = summary_rows(measured, memory, args.batch_size)
    result = {
        "benchmark": "train_step",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": machine,
        "config": {"student": os.path.relpath(args.student, ROOT), "teacher": os.path.relpath(args.teacher, ROOT),
                   "imgsz": args.imgsz, "batch_size": args.batch_size, "nc": args.nc,
                   "labels_per_image": args.labels_per_image, "amp": measured["precision"],
                   "repeats": args.repeats, "steps": args.steps, "warmup": args.warmup,
                   "hyp": Path(args.hyp).name, "memory": "cuda max_memory_allocated per row (fresh process)"
                   if device.type == "cuda" else "RSS high-water mark per row (fresh process)"},
        "student_params": measured["student_params"],
        "teacher_params": measured["teacher_params"],
        "load_average_end": list(os.getloadavg()),
        "idle_rss_mb": idle.get("rss_peak_mb") if idle else None,
        "rows": rows,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    lines = build_table(result)
    if args.ratio:
        lines += ["", *(f"ratio {r['row']} / (student + teacher forward) = {r['ratio_vs_student_plus_teacher']:.3f} "
                        f"(medians), {r['ratio_of_minima']:.3f} (fastest samples; goal <= 1.10); "
                        f"/ student alone = {r['ratio_vs_student']:.3f} (goal <= 1.3)"
                        for r in rows if r["ratio_vs_student_plus_teacher"] is not None)]
        args.out = f"{args.out}_{choose_precision(device, not args.noamp).name}"
    write_results(result, lines, args.out)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
