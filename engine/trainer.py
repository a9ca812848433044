"""The training loop: `fit(opt)` runs a whole experiment, `train_one_epoch` one pass over the data.

Everything a run holds lives in a `Run` record built by `engine.setup.prepare_run`; this file only
orders the steps. A training step (`engine.step.train_step`): batch → student forward under the
run's autocast (`utils.precision`) → `TrainingCriterion` in fp32 (YOLOv5 loss + distillation terms,
weighted in one place) → backward (GradScaler for fp16) → optimizer step every `accumulate` batches
→ EMA update. Validation reads the EMA model.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm

from engine.checkpointing import deployable, training_checkpoint
from engine.cli import InterruptLatch, TrainingInterrupted
from engine.evaluate import evaluate
from engine.logger import METRIC_COLUMNS, progress_line
from engine.options import check_options
from engine.setup import Run, prepare_run, resume_options, setup_distributed
from engine.step import train_step
from models import load_model
from models.checkpoint import save_checkpoint
from utils.multiscale import draw_long_side, resize_batch
from utils.precision import FP32_CPU_INFERENCE, Precision
from utils.torch_utils import broadcast_flag, deterministic_algorithms, set_rng_state, state_digest

EpochHook = Callable[[int, dict], None]


class NonFiniteLossError(RuntimeError):
    """Raised when the loss stays NaN/inf for too many consecutive steps."""


def train_one_epoch(run: Run, epoch: int, latch: InterruptLatch | None = None) -> dict[str, float]:
    """One pass over the training loader; returns the mean of every named loss term. ``latch``
    re-raises a Ctrl-C that a finalizer swallowed (see :class:`engine.cli.InterruptLatch`)."""
    model, opt = run.model, run.opt
    model.train()
    if run.distiller is not None:
        run.distiller.train()
        run.distiller.set_epoch(epoch, opt.epochs)
    run.loader_epoch(epoch)
    scale = run.criterion.kd_scale(epoch, opt.epochs)
    sums: dict[str, float] = {}
    n_batches = len(run.train_loader)
    bar = tqdm(run.train_loader, total=n_batches, disable=not run.info.is_main, bar_format="{l_bar}{bar:10}{r_bar}")
    for i, (imgs, targets, _paths, _shapes) in enumerate(bar):
        if latch is not None:
            latch.check()
        ni = i + n_batches * epoch
        accumulate = run.warmup.step(run.optimizer, ni, epoch)
        imgs, targets = imgs.to(run.device, non_blocking=True), targets.to(run.device)
        if opt.multi_scale:
            imgs = _rescaled(run, imgs, ni)
        terms = train_step(run, imgs, targets, ni, accumulate, scale)
        if terms is None:
            _skip_step(run, epoch, i)
            continue
        run.nonfinite_streak = 0
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        if run.info.is_main:
            means = {k: v / (i + 1) for k, v in sums.items()}
            line = progress_line(epoch, opt.epochs, _mem_gb(run.device), means, targets.shape[0], imgs.shape[-1])
            bar.set_description(line)
    return {k: v / max(n_batches, 1) for k, v in sums.items()}


def _rescaled(run: Run, imgs: torch.Tensor, ni: int) -> torch.Tensor:
    """--multi-scale: batch ``ni`` at its drawn size (`utils.multiscale`), as float 0-1 images."""
    data = run.train_loader.dataset
    side = draw_long_side(data.imgsz, data.stride, run.opt.seed, ni, max(run.info.rank, 0))
    return resize_batch(run.precision.images(imgs), side, data.stride)


def _skip_step(run: Run, epoch: int, batch: int) -> None:
    """Count a dropped batch (train_step zeroed its gradients); give up if the loss keeps blowing up."""
    run.nonfinite_streak += 1
    if run.info.is_main:
        print(f"WARNING: non-finite loss at epoch {epoch + 1} batch {batch}; step skipped "
              f"({run.nonfinite_streak} in a row)")
    if run.nonfinite_streak >= run.opt.max_nonfinite:
        raise NonFiniteLossError(
            f"training diverged: {run.nonfinite_streak} consecutive non-finite losses at epoch {epoch + 1}; "
            f"nothing was saved from this epoch (last good weights: {run.weights_dir / 'last.pt'}); "
            "lower --hyp lr0 or the distillation weights and --resume"
        )


def _mem_gb(device: torch.device) -> float:
    """GB the caching allocator holds on the run's GPU (0 on other devices)."""
    return torch.cuda.memory_reserved(device) / 1e9 if device.type == "cuda" else 0.0


def validate(run: Run, model: torch.nn.Module, plots: bool = False, precision: Precision | None = None) -> dict:
    """mAP of `model` on the val split (rank 0 only), with the detection loss on val batches; in the
    run's precision unless `precision` is given."""
    return evaluate(
        model,
        run.val_loader,
        run.names,
        run.device,
        precision=precision or run.precision,
        save_dir=run.save_dir,
        plots=plots,
        compute_loss=run.criterion.detection_loss,
    )


def fit(opt: argparse.Namespace, on_epoch_end: EpochHook | None = None) -> dict:
    """Train (and distil, when `opt.t_weights` is set) for `opt.epochs`; returns the final summary.

    `on_epoch_end(epoch, row)` is called on rank 0 after each epoch's checkpoint and results.csv
    are on disk. Bad flags raise a one-line ValueError before anything is written; Ctrl-C raises
    `engine.cli.TrainingInterrupted`, naming the last.pt to resume from.
    """
    check_options(opt)
    opt, ckpt = resume_options(opt) if opt.resume else (opt, None)  # a resumed run's device is its own
    with deterministic_algorithms(opt.deterministic):  # before CUDA starts: cuBLAS reads its setting once
        info, device = setup_distributed(opt)
        try:
            run = prepare_run(opt, info, device, ckpt)
            try:
                with InterruptLatch() as latch:
                    return _train_loop(run, on_epoch_end, latch)
            except KeyboardInterrupt:
                raise _interrupted(run) from None
        finally:
            if info.distributed and dist.is_initialized():
                dist.destroy_process_group()


def _train_loop(run: Run, on_epoch_end: EpochHook | None, latch: InterruptLatch | None = None) -> dict:
    opt = run.opt
    if run.resume_rng is not None:
        set_rng_state(run.resume_rng)
    epoch = run.start_epoch - 1
    for epoch in range(run.start_epoch, opt.epochs):
        run.epoch = epoch
        t0 = time.time()
        losses = train_one_epoch(run, epoch, latch)
        lrs = run.learning_rates()  # those of the epoch's last step, as YOLOv5 records them
        run.scheduler.step()
        final = epoch + 1 == opt.epochs
        # every rank (it averages the connectors' gradients); not for a last.pt that will not be resumed
        pending = pending_state(run, epoch) if not (final or opt.nosave) else None
        stop = False
        if run.info.is_main:
            metrics = validate(run, run.ema.module) if (not opt.noval or final) else None
            row = run.epoch_row(epoch, losses, metrics, lrs, time.time() - t0)
            improved = metrics is not None and metrics["fitness"] > run.best_fitness
            if improved:
                run.best_fitness, run.best_epoch = metrics["fitness"], epoch
            if metrics is not None:
                run.class_maps = list(metrics["maps"])
            run.history.append(row)
            stop = metrics is not None and 0 < opt.patience <= epoch - run.best_epoch  # 0: never stop early
            # the checkpoint carries the history, row included, so a kill before results.csv is written
            # loses nothing on --resume; an early stop's epoch is a final one (--nosave saves it)
            _save(run, epoch, improved, final or stop, None if stop else pending)
            run.write_results()
            run.print_epoch(epoch, row)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)
            if stop:
                print(f"Early stop: no improvement in {opt.patience} epochs; best results observed at epoch "
                      f"{run.best_epoch} (results.csv's numbering, from 0, as YOLOv5 prints it)")
        if broadcast_flag(stop, run.info, run.device):
            break
    return _finish(run, epoch)


def pending_state(run: Run, epoch: int) -> dict | None:
    """The gradient accumulation left open at the end of ``epoch`` (None when it ended on an optimizer
    step): ``batches`` accumulated since the last step, the ``batches_per_epoch`` and ``world_size``
    they count in, and the ``grads`` so far per trainable parameter (None where none), with the loss
    scale taken out (a resumed run may scale otherwise) and, under DDP, the connectors' gradients
    averaged over ranks as the next step would (DDP already averaged the student's). Call on every rank."""
    nb = len(run.train_loader)
    batches = (epoch + 1) * nb - 1 - run.last_step
    if batches <= 0:
        return None
    scale = run.scaler.get_scale() if run.scaler.is_enabled() else 1.0
    own = {id(p) for p in run.distiller.parameters()} if run.distiller is not None else set()
    grads = []
    for p in run.trainable_parameters:
        g = None if p.grad is None else p.grad.detach().float() / scale
        if g is not None and run.info.distributed and id(p) in own:
            dist.all_reduce(g)
            g /= run.info.world_size
        grads.append(None if g is None else g.cpu())
    return {"batches": batches, "batches_per_epoch": nb, "world_size": run.info.world_size, "grads": grads}


def _save(run: Run, epoch: int, improved: bool, final: bool, pending: dict | None = None) -> None:
    if run.opt.nosave and not final:
        return
    ckpt = training_checkpoint(run.model, run.ema, run.optimizer, run.scaler, run.distiller, run.opt, run.hyp,
                               epoch, run.best_fitness, run.history, run.class_maps, pending)
    save_checkpoint(ckpt, run.weights_dir / "last.pt")
    # --nosave keeps only the final last.pt, as in YOLOv5: a best.pt written at the end would hold the
    # final epoch under an earlier epoch's best fitness
    if not run.opt.nosave and (improved or not (run.weights_dir / "best.pt").exists()):
        save_checkpoint(deployable(ckpt), run.weights_dir / "best.pt")
    if run.opt.save_period > 0 and epoch % run.opt.save_period == 0:  # YOLOv5's names: epoch0.pt, epoch2.pt...
        save_checkpoint(deployable(ckpt), run.weights_dir / f"epoch{epoch}.pt")


def _interrupted(run: Run) -> TrainingInterrupted:
    """Ctrl-C: the atomic saves leave last.pt at the last finished epoch (or absent)."""
    last = run.weights_dir / "last.pt"
    if run.info.is_main:
        run.plot_results()
    return TrainingInterrupted(run.epoch, run.opt.epochs, last if last.is_file() else None)


def _finish(run: Run, last_epoch: int) -> dict:
    """Check DDP ranks agree, validate best.pt with plots, print and return the summary."""
    digest = state_digest(run.model, *([run.distiller] if run.distiller is not None else []))
    digests = [digest]
    if run.info.distributed:
        digests = [None] * run.info.world_size
        dist.all_gather_object(digests, digest)
    summary: dict = {"save_dir": str(run.save_dir), "epochs_run": last_epoch + 1, "rank_digests": digests}
    if not run.info.is_main:
        return summary
    run.plot_results()
    best = run.weights_dir / "best.pt"
    if best.exists():
        student = load_model(best, device=run.device).eval().fuse()  # as val.py scores it
        final = run.precision if run.device.type == "cuda" else FP32_CPU_INFERENCE  # CPU: fp32, as val.py
        final.prepare(student)
        metrics = validate(run, student, plots=not run.opt.noplots, precision=final)
        summary["student"] = {k: metrics[k] for k in METRIC_COLUMNS}
    elif run.history:  # --nosave: the final epoch's validation of what last.pt holds
        row = run.history[-1]
        summary["student"] = {k: float(row[c]) for k, c in METRIC_COLUMNS.items()}
        summary["student_weights"] = "last.pt"
    if run.teacher_metrics is not None:
        summary["teacher"] = {k: run.teacher_metrics[k] for k in METRIC_COLUMNS}
    run.write_summary(summary)
    return summary
