"""Building a training run from its flags: folders, data, student, teacher, optimizer, resume.

`resume_options(opt)` reads a resumed run's flags and state first; `prepare_run(opt, info,
device, ckpt) -> Run` does all the one-off work so that the loop in
`engine.trainer` reads as the algorithm. Each step is a small named function.

Size: about 400 lines because it is one build sequence (folders → data → models → teacher → optimizer
→ resume) read top to bottom; every step is a function under 60 lines, and each concern with its own
rules lives elsewhere (engine.runfolder, engine.checkpointing, engine.optim, utils.precision,
engine.distill_setup for the teacher's side).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml
from torch.nn.parallel import DistributedDataParallel

from distill.taps import detect_layer
from engine.checkpointing import find_last_checkpoint, namespace_to_dict
from engine.criterion import TrainingCriterion
from engine.distill_setup import adopt_teacher_anchors, build_distiller, load_run_teacher
from engine.evaluate import evaluate
from engine.logger import METRIC_COLUMNS, save_yaml, write_results
from engine.optim import YOLOV5_GROUP_ORDER, EpochLr, LrCurve, WarmupSchedule, load_optimizer_state
from engine.runfolder import archive_previous_run, new_run_id, owning_run_folder, remove_stale_temps
from engine.step import build_step_state
from models.checkpoint import CheckpointError, load_checkpoint, transfer_weights
from models.hub import find_weights
from models.yolo import DetectionModel
from utils.autoanchor import check_anchors
from utils.data_config import load_data_config
from utils.dataset import create_dataloader, default_workers, set_loader_epoch
from utils.files import find_data_yaml, increment_path
from utils.geometry import round_to_stride
from utils.loss import scale_hyp
from utils.plots import plot_labels, plot_results
from utils.precision import FP32_CPU, Precision, choose_precision
from utils.sampling import image_weights
from utils.torch_utils import (
    DistInfo,
    WeightEMA,
    broadcast_state,
    dist_info,
    parse_device,
    seed_everything,
    select_device,
)

LOGGER = logging.getLogger(__name__)


@dataclass
class Run:
    """Everything one training run holds. Built once by `prepare_run`, mutated only by the loop."""

    opt: argparse.Namespace
    info: DistInfo
    device: torch.device
    save_dir: Path
    hyp: dict
    names: list[str]
    model: nn.Module  # the student (DDP-wrapped under torchrun)
    ema: WeightEMA  # .module: the averaged student that is validated and saved
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    warmup: WarmupSchedule
    criterion: TrainingCriterion
    train_loader: torch.utils.data.DataLoader
    val_loader: torch.utils.data.DataLoader | None
    distiller: nn.Module | None = None
    teacher_metrics: dict | None = None
    start_epoch: int = 0
    epoch: int = 0  # the epoch being trained
    best_fitness: float = 0.0
    best_epoch: int = -1
    last_step: int = -1
    nonfinite_streak: int = 0
    resume_rng: dict | None = None
    history: list[dict] = field(default_factory=list)  # one results.csv row per finished epoch
    class_maps: list[float] | None = None  # per-class mAP50-95 of the last validation (--image-weights)
    trainable_parameters: list = field(default_factory=list)

    precision: Precision = FP32_CPU  # autocast dtype / channels_last / GradScaler (utils.precision)

    @property
    def weights_dir(self) -> Path:
        return self.save_dir / "weights"

    def loader_epoch(self, epoch: int) -> None:
        """Make the data order and augmentation of `epoch` a function of (seed, epoch) alone, so a
        resumed run sees exactly the batches the uninterrupted run would have seen."""
        set_loader_epoch(self.train_loader, epoch, self.opt.seed)
        if self.opt.image_weights:  # this epoch's draw favours rare and badly detected classes
            labels = self.train_loader.dataset.labels
            self.train_loader.sampler.weights = torch.as_tensor(image_weights(labels, len(self.names), self.class_maps))

    def learning_rates(self) -> list[float]:
        """The groups' current LRs in YOLOv5's group order (results.csv's x/lr0..2)."""
        groups = self.optimizer.param_groups
        return [float(groups[g]["lr"]) for g in YOLOV5_GROUP_ORDER if g < len(groups)]

    def epoch_row(self, epoch: int, losses: dict, metrics: dict | None, lrs: list[float], seconds: float) -> dict:
        """One results.csv row (see `engine.logger` for the columns); plain floats, so the history
        stays loadable with ``torch.load(weights_only=True)``. Metrics of an epoch that was not
        validated (--noval) are NaN."""
        nan = float("nan")
        metrics = metrics or {}
        det = {"det/box": "train/box_loss", "det/obj": "train/obj_loss", "det/cls": "train/cls_loss"}
        row: dict = {"epoch": int(epoch)}
        row.update({det.get(k, f"train/{k}"): float(v) for k, v in losses.items()})
        row.update({column: float(metrics.get(key, nan)) for key, column in METRIC_COLUMNS.items()})
        val_loss = metrics.get("loss")
        for j, name in enumerate(("box", "obj", "cls")):
            row[f"val/{name}_loss"] = float(val_loss[j]) if val_loss is not None else nan
        row.update({f"x/lr{j}": lr for j, lr in enumerate(lrs)})
        row["time/epoch_s"] = float(seconds)
        return row

    @property
    def results_csv(self) -> Path:
        return self.save_dir / "results.csv"

    def write_results(self) -> None:
        """results.csv from the whole history, atomically (every epoch: what --resume and readers rely on)."""
        write_results(self.results_csv, self.history)

    def plot_results(self) -> None:
        """results.png from results.csv, once at the end (a matplotlib figure per epoch cost ~1.5 s each)."""
        if not self.opt.noplots and self.results_csv.exists():
            plot_results(self.results_csv, self.save_dir / "results.png")

    def print_epoch(self, epoch: int, row: dict) -> None:
        shown = {k: v for k, v in row.items() if (k.startswith("metrics/") and v == v) or k == "time/epoch_s"}
        print(f"epoch {epoch + 1}/{self.opt.epochs}: " + "  ".join(f"{k.split('/')[-1]} {v:.4g}"
                                                                  for k, v in shown.items()))

    def write_summary(self, summary: dict) -> None:
        with open(self.save_dir / "summary.json", "w") as f:
            json.dump(summary, f, indent=2)
        student, teacher = summary.get("student"), summary.get("teacher")
        if student:
            source = summary.get("student_weights", "best.pt")
            print(f"Student ({source}): mAP50 {student['map50']:.4f}  mAP50-95 {student['map']:.4f}")
        if teacher:
            print(f"Teacher          : mAP50 {teacher['map50']:.4f}  mAP50-95 {teacher['map']:.4f}")
        files = ("weights/best.pt", "weights/last.pt", "results.csv", "summary.json")
        written = [f for f in files if (self.save_dir / f).is_file()]  # never claim a file that is not there
        print(f"Results saved to {self.save_dir} ({', '.join(written) or 'no files'})")


COLLECTIVE_TIMEOUT = datetime.timedelta(hours=3)


def setup_distributed(opt: argparse.Namespace) -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    info = dist_info()
    device = select_device(opt.device, opt.batch_size, info.local_rank)
    if device.type == "cuda":  # --device 1: kernels, pinned memory and memory figures on GPU 1, not GPU 0
        torch.cuda.set_device(device)
    if info.distributed:
        if opt.batch_size % info.world_size:
            raise ValueError(f"--batch-size {opt.batch_size} must be a multiple of WORLD_SIZE {info.world_size}")
        # Rank 0 alone builds caches, fits anchors, validates and saves while the others wait in a
        # collective: on a large dataset that outlasts NCCL's default 10-minute watchdog (YOLOv5: 3 h).
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return info, device


def prepare_run(opt: argparse.Namespace, info: DistInfo, device: torch.device, ckpt: dict | None = None) -> Run:
    """The run of ``opt`` on ``device``; ``ckpt``: the state of a resumed run, with ``opt`` its saved flags
    (both from :func:`resume_options`, which must come before the device is chosen)."""
    _locate_inputs(opt)
    seed_everything(opt.seed + max(info.rank, 0))
    hyp = _load_hyp(opt)
    data = load_data_config(opt.data)
    names = _class_names(opt, data)

    model = _build_student(opt, len(names), device, info, ckpt)
    model.names = names
    precision = _choose_precision(opt, device, model, info)
    teacher, kd_cfg = load_run_teacher(opt, hyp, device, precision)
    gs = max(int(model.stride.max()), int(detect_layer(teacher).stride.max()) if teacher is not None else 0, 32)
    imgsz = _check_imgsz(opt.imgsz, gs)  # a multiple of every stride either model has
    loss_hyp = scale_hyp(hyp, model.detect.nl, len(names), imgsz)
    if opt.workers == "auto":  # resolved once and recorded in opt.yaml, as the precision is
        opt.workers = default_workers(device, info.world_size)
        if info.is_main:
            print(f"Data loading: {opt.workers} worker processes per training process (--workers N to choose)")
    pin_memory = device.type == "cuda"  # page-locked batches only when they go to a GPU
    train_loader, train_set = create_dataloader(
        data["train"], imgsz, opt.batch_size // info.world_size, gs, hyp=hyp, augment=True, rect=opt.rect,
        workers=opt.workers, shuffle=not opt.rect, rank=info.rank, world_size=info.world_size, seed=opt.seed,
        cache=opt.cache, single_cls=opt.single_cls, nc=data["nc"], pin_memory=pin_memory,
        image_weights=opt.image_weights)
    _require_labels(train_set, data["train"])
    val_loader = None
    if info.is_main:
        val_loader, _ = create_dataloader(
            data["val"], imgsz, max(opt.batch_size // info.world_size, 1) * 2, gs, hyp=hyp, augment=False,
            rect=True, workers=opt.workers, shuffle=False, seed=opt.seed, cache=opt.cache,
            single_cls=opt.single_cls, pad=0.5, nc=data["nc"], pin_memory=pin_memory)

    if ckpt is None:  # a resumed run keeps the anchors it was trained with
        _fit_anchors(opt, model, train_set, hyp, imgsz, info, teacher if kd_cfg.output != "none" else None)
    distiller = build_distiller(kd_cfg, model, teacher, loss_hyp, device, info.is_main, resumed=ckpt is not None)
    if distiller is not None and info.distributed:
        broadcast_state(distiller)  # DDP broadcasts only the student it wraps
    nbs = opt.nominal_batch
    parts = build_step_state(model, distiller, hyp, loss_hyp, precision, opt.batch_size, nbs, opt.optimizer)
    lf = LrCurve(opt.epochs, hyp["lrf"], opt.cos_lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(parts.optimizer, lr_lambda=EpochLr(lf))
    save_dir = _save_dir(opt, info, resumed=ckpt is not None)  # only now: bad data has been refused

    run = Run(opt=opt, info=info, device=device, save_dir=save_dir, hyp=hyp, names=names, model=model,
              ema=parts.ema, optimizer=parts.optimizer, scheduler=scheduler, scaler=parts.scaler,
              warmup=WarmupSchedule.from_hyp(hyp, len(train_loader), opt.batch_size, lf, nbs),
              criterion=parts.criterion, train_loader=train_loader, val_loader=val_loader, distiller=distiller,
              trainable_parameters=parts.trainable_parameters, precision=precision)
    if ckpt is not None:
        _restore(run, ckpt)
    if info.is_main:
        _record_run(run, train_set)
        if teacher is not None and opt.t_val:
            run.teacher_metrics = _validate_teacher(run, teacher)
    if info.distributed:
        run.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return run


def _class_names(opt: argparse.Namespace, data: dict) -> list[str]:
    """The run's class names: the dataset's, or one class 'item' with --single-cls."""
    if not data["names"]:
        raise ValueError(f"--data {opt.data}: 'names' is empty; list the class names (e.g. names: [person, car])")
    return ["item"] if opt.single_cls else list(data["names"])


def _locate_inputs(opt: argparse.Namespace) -> None:
    """Resolve bare names the way YOLOv5 users expect: data/VisDrone.yaml, weights/ or an official
    release name such as yolov5s.pt (downloaded once into weights/)."""
    opt.data = str(find_data_yaml(opt.data))
    if opt.weights:
        opt.weights = str(find_weights(opt.weights))
    if getattr(opt, "t_weights", ""):
        opt.t_weights = str(find_weights(opt.t_weights, "--t_weights"))


def _load_hyp(opt: argparse.Namespace) -> dict:
    return load_hyp_file(opt.hyp, opt.label_smoothing)


def load_hyp_file(path: str | Path, label_smoothing: float = 0.0) -> dict:
    """A YOLOv5 hyper-parameter yaml (``--hyp``), checked, with ``label_smoothing`` added."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--hyp {path}: file not found (try data/hyps/hyp.scratch-low.yaml)")
    with open(path) as f:
        hyp = yaml.safe_load(f)
    if not isinstance(hyp, dict) or "lr0" not in hyp:
        raise ValueError(f"--hyp {path}: not a YOLOv5 hyper-parameter yaml (no lr0 key)")
    hyp["label_smoothing"] = label_smoothing
    return hyp


def _save_dir(opt: argparse.Namespace, info: DistInfo, resumed: bool) -> Path:
    """The run folder. A resumed run keeps its own (checked by `resume_options`); a new run gets
    project/name (numbered unless --exist-ok) and a fresh run id. Whatever an earlier run left in a
    reused folder is moved into prev-<time>/ first, and stale temp files of a killed run go."""
    if resumed:
        save_dir = Path(opt.save_dir)
    else:
        save_dir = increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
        if info.distributed:  # every rank must agree on the folder chosen by rank 0
            holder = [str(save_dir)]
            dist.broadcast_object_list(holder, src=0)
            save_dir = Path(holder[0])
        opt.save_dir, opt.run_id = str(save_dir), new_run_id()
        if info.is_main:
            archive = archive_previous_run(save_dir)
            if archive is not None:
                LOGGER.info(f"--exist-ok: moved the earlier run's files in {save_dir} to {archive}")
    if info.is_main:
        remove_stale_temps(save_dir)
        (save_dir / "weights").mkdir(parents=True, exist_ok=True)
    return save_dir


def _require_labels(train_set, sources: list[str]) -> None:
    """Refuse a train split without a single label file: that is a misplaced labels/ folder, not
    a set of background images (YOLOv5's rule: images/... -> labels/..., see utils.labels)."""
    if any(os.path.isfile(f) for f in train_set.label_files):
        return
    folders = sorted({str(Path(f).parent) for f in train_set.label_files})
    shown = ", ".join(folders[:3]) + (f" (+{len(folders) - 3} more)" if len(folders) > 3 else "")
    raise FileNotFoundError(f"--data train split {', '.join(sources)}: not a single label file; YOLO labels are "
                            f"expected in {shown} (one .txt per image, named like the image)")


def _check_imgsz(imgsz: int, gs: int) -> int:
    fixed = round_to_stride(imgsz, gs)[0]
    if fixed != imgsz:
        LOGGER.warning(f"--imgsz {imgsz} is not a multiple of the max stride {gs}; using {fixed}")
    return fixed


def _build_student(opt: argparse.Namespace, nc: int, device: torch.device, info: DistInfo,
                   resume_ckpt: dict | None) -> DetectionModel:
    """Student from --cfg and/or --weights; official YOLOv5 weights with another nc transfer what fits."""
    if resume_ckpt is not None:
        model = DetectionModel(resume_ckpt["yaml"], nc=nc)
        model.load_state_dict(resume_ckpt["model"])
    elif opt.weights:
        ckpt = load_checkpoint(opt.weights)
        model = DetectionModel(opt.cfg or ckpt["yaml"], nc=nc)
        exclude = ("anchors",) if opt.cfg else ()
        loaded, total = transfer_weights(model, ckpt["state_dict"], exclude=exclude)
        if info.is_main:
            LOGGER.info(f"Transferred {loaded}/{total} tensors from {opt.weights}")
    elif opt.cfg:
        model = DetectionModel(opt.cfg, nc=nc)
    else:
        raise ValueError("give --cfg (a model yaml such as models/yolov5s.yaml) and/or --weights (a .pt)")
    _freeze(model, opt.freeze)
    model = model.to(device)
    if opt.sync_bn and info.distributed:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif info.is_main:  # torch's SyncBatchNorm runs on CUDA only
            LOGGER.warning("--sync-bn needs CUDA devices; ignored on the CPU (each process normalises its own batch)")
    return model


def _freeze(model: DetectionModel, freeze: list[int]) -> None:
    """`--freeze 10` freezes layers 0-9; `--freeze 0 1 2` freezes exactly those layers."""
    layers = list(range(freeze[0])) if len(freeze) == 1 else list(freeze)
    prefixes = tuple(f"model.{i}." for i in layers)
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(prefixes))


def _fit_anchors(opt: argparse.Namespace, model: DetectionModel, train_set, hyp: dict, imgsz: int,
                 info: DistInfo, output_teacher: DetectionModel | None = None) -> None:
    """AutoAnchor (utils.autoanchor.check_anchors) on rank 0; every rank then holds rank 0's anchors.

    `--noautoanchor` keeps the model's anchors, except placeholders from a yaml's `anchors: N`. The
    teacher of output distillation (``output_teacher``), when its head has the student's levels,
    strides and anchors per cell, gives the student its anchors instead: output KD compares the heads
    anchor by anchor, and anchors evolved apart (another seed or image size) would switch it off.
    """
    if info.is_main and (output_teacher is None or not adopt_teacher_anchors(model, output_teacher)):
        check_anchors(model, train_set.labels, train_set.shapes, imgsz, threshold=float(hyp.get("anchor_t", 4.0)),
                      enabled=not getattr(opt, "noautoanchor", False), seed=opt.seed)
    if info.distributed:
        dist.broadcast(model.detect.anchors, src=0)


def _choose_precision(opt: argparse.Namespace, device: torch.device, model: nn.Module, info: DistInfo) -> Precision:
    """The run's precision (printed, and recorded as opt.amp in opt.yaml and checkpoints); the
    student's weights stay fp32 (master weights), in channels_last when AMP is on."""
    precision = choose_precision(device, amp=not getattr(opt, "noamp", False))
    opt.amp = precision.name
    precision.prepare(model)
    if info.is_main:
        print(precision.describe())
    return precision


def _validate_teacher(run: Run, teacher: DetectionModel) -> dict:
    metrics = evaluate(teacher, run.val_loader, run.names, run.device, precision=run.precision)
    LOGGER.info(f"Teacher {run.opt.t_weights}: mAP50 {metrics['map50']:.4f}  mAP50-95 {metrics['map']:.4f} "
                "on the val split")
    return metrics


def _record_run(run: Run, train_set) -> None:
    save_yaml(run.save_dir / "opt.yaml", namespace_to_dict(run.opt))
    save_yaml(run.save_dir / "hyp.yaml", {k: v for k, v in run.hyp.items()})
    if not run.opt.noplots and run.start_epoch == 0:
        plot_labels(train_set.labels, run.names, run.save_dir / "labels.jpg")


def resume_options(opt: argparse.Namespace) -> tuple[argparse.Namespace, dict]:
    """The saved flags of the run being resumed (only --device/--workers may change), and its state.
    Called before anything else is decided (the device above all: `setup_distributed` reads it).

    Without ``--device`` the run continues on the device it was started with (as YOLOv5's resume
    does), or on the CPU when that was a GPU and this machine has none; ``--device`` moves it
    (CPU ↔ CUDA: the precision follows the device, see `_restore`).

    Only the run folder that owns the checkpoint is written to (`engine.runfolder`)."""
    path = find_last_checkpoint(opt.project) if opt.resume is True else Path(opt.resume)
    ckpt = load_checkpoint(path)["raw"]
    if ckpt.get("optimizer") is None or ckpt.get("opt") is None:
        raise CheckpointError(f"--resume {path}: not a resumable training checkpoint (no optimizer state); "
                              "use --weights to start a new run from it")
    run_folder = owning_run_folder(path, ckpt["opt"])
    saved = argparse.Namespace(**{**vars(opt), **ckpt["opt"]})  # flags newer than the checkpoint keep defaults
    saved.resume, saved.workers = str(path), opt.workers
    saved.device = opt.device or ckpt["opt"].get("device", "")
    if not opt.device and parse_device(saved.device)[0] == "cuda" and not torch.cuda.is_available():
        LOGGER.info(f"--resume: the run was trained with --device {saved.device}; this machine has no CUDA "
                    "device, so it continues on the CPU (--device to choose)")
        saved.device = "cpu"
    saved.save_dir = str(run_folder)
    saved.run_id = ckpt["opt"].get("run_id") or new_run_id()  # checkpoints from before run ids get one now
    if ckpt["epoch"] + 1 >= saved.epochs:
        raise ValueError(f"--resume {path}: the run already finished all {saved.epochs} epochs")
    return saved, ckpt


def _restore_distiller(distiller: nn.Module, state: dict) -> None:
    """Connectors strictly; a method's extra state (MGD's mask RNG) may be absent from an older last.pt."""
    missing, unexpected = distiller.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise ValueError(f"--resume: the checkpoint's distillation state does not match this run "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same --d_* flags")


def _restore(run: Run, ckpt: dict) -> None:
    run.ema.module.load_state_dict(ckpt["ema"])
    run.ema.updates = ckpt["updates"]
    load_optimizer_state(run.optimizer, ckpt["optimizer"])
    # A run saved without loss scaling (CPU, --noamp) has an empty scaler state; resumed on CUDA
    # (fp16) the fresh scaler starts from its defaults, as a new run's would.
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    if run.distiller is not None and ckpt.get("adapters") is not None:
        _restore_distiller(run.distiller, ckpt["adapters"])
    run.start_epoch = ckpt["epoch"] + 1
    run.best_fitness = ckpt["best_fitness"]
    run.scheduler.last_epoch = ckpt["epoch"] + 1  # the optimizer state already holds that epoch's LR
    _restore_pending(run, ckpt.get("pending"))
    run.resume_rng = ckpt.get("rng")
    maps = ckpt.get("class_maps")  # absent from checkpoints older than --image-weights
    run.class_maps = [float(m) for m in maps] if isinstance(maps, list) and len(maps) == len(run.names) else None
    _restore_history(run, ckpt.get("history"))
    if run.info.is_main:
        LOGGER.info(f"Resuming {run.save_dir} from epoch {run.start_epoch + 1}/{run.opt.epochs}")


def _restore_pending(run: Run, pending: dict | None) -> None:
    """Reopen the gradient accumulation the saved epoch left open (`engine.trainer.pending_state`), so
    the next optimizer step comes where and with what it would have; without one (the epoch ended on a
    step, or an older checkpoint) the resumed run starts a fresh accumulation. Another loader length or
    world size counts batches differently: the open part is then dropped, with a warning."""
    run.last_step = run.start_epoch * len(run.train_loader) - 1
    if not pending:
        return
    same = (pending["batches_per_epoch"], pending["world_size"], len(pending["grads"])) == (
        len(run.train_loader), run.info.world_size, len(run.trainable_parameters))
    if not same:
        if run.info.is_main:
            LOGGER.warning(f"--resume: the gradients of the saved epoch's last {pending['batches']} batches (not yet "
                           "stepped) are dropped: this run has another batch count per epoch or number of processes")
        return
    run.last_step -= int(pending["batches"])
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else 1.0  # this run's loss scale
    for p, g in zip(run.trainable_parameters, pending["grads"]):
        if g is not None:
            p.grad = (g * scale).to(device=p.device, dtype=p.dtype)


def _restore_history(run: Run, history: list[dict] | None) -> None:
    """Rows of the epochs the checkpoint holds; results.csv is rewritten from them, so rows a kill
    kept out of it (or rows of epochs after the checkpoint) are made right."""
    if history is None:  # a checkpoint from before histories: keep the old file aside, start a new one
        history = []
        if run.info.is_main and run.results_csv.exists():
            kept = run.results_csv.with_name(f"results.before-epoch{run.start_epoch}.csv")
            run.results_csv.rename(kept)
            LOGGER.warning(f"{run.opt.resume} carries no epoch history; earlier rows are in {kept}")
    run.history = [dict(row) for row in history if int(row["epoch"]) < run.start_epoch]
    scored = [(row.get("metrics/fitness", float("nan")), int(row["epoch"])) for row in run.history]
    scored = [(f, e) for f, e in scored if f == f]
    if scored:  # --patience counts from the (first) best epoch so far
        run.best_epoch = max(scored, key=lambda fe: (fe[0], -fe[1]))[1]
    if run.info.is_main:
        run.write_results()

