"""End-to-end training engine tests on CPU: learning, resume, crash safety, divergence, transfer, DDP."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from engine.trainer import NonFiniteLossError, fit
from models import load_model
from models.checkpoint import load_checkpoint
from tests.conftest import TINY_IMGSZ, train_args, write_data_yaml
from train_distill import parse_options
from utils.demo_data import generate_demo

REPO = Path(__file__).resolve().parents[1]


def _fast_overfit_hyp(tmp_path: Path) -> Path:
    """No mosaic (train images = eval images) and AdamW at a moderate LR: learns in a few hundred steps."""
    hyp = yaml.safe_load((REPO / "data/hyps/hyp.scratch-low.yaml").read_text())
    hyp.update(mosaic=0.0, translate=0.05, scale=0.2, lr0=0.004, lrf=0.1, warmup_epochs=1.0)
    path = tmp_path / "hyp.yaml"
    path.write_text(yaml.safe_dump(hyp))
    return path


@pytest.mark.slow
def test_training_drives_loss_down_and_learns_the_training_images(tmp_path: Path) -> None:
    root = tmp_path / "data"
    generate_demo(root, seed=3, n_train=16, n_val=1, imgsz=TINY_IMGSZ)
    data = write_data_yaml(root, val="images/train")  # evaluate on the images it trained on
    args = train_args(data, tmp_path, "learn", 100, "--hyp", str(_fast_overfit_hyp(tmp_path)), "--noval",
                      "--optimizer", "AdamW", "--nominal-batch", "8")  # 2 steps/epoch: 200 optimizer steps
    summary = fit(parse_options(args))
    rows = list(csv_rows(Path(summary["save_dir"]) / "results.csv"))
    for term in ("box", "cls"):
        first, last = float(rows[0][f"train/{term}_loss"]), float(rows[-1][f"train/{term}_loss"])
        assert last < 0.8 * first, f"{term} loss did not fall: {first} -> {last}"
    assert summary["student"]["map50"] > 0.15, summary["student"]


def csv_rows(path: Path):
    import csv

    with open(path, newline="") as f:
        yield from csv.DictReader(f)


class _Interrupt(Exception):  # noqa: N818 - a control-flow signal in this test, not an error
    pass


# per-epoch sampling and per-batch sizes; gradients accumulated across the cut (with a nominal batch of
# 256 the warm-up's accumulation leaves a step pending at the end of the second epoch)
@pytest.mark.parametrize("flags", [(), ("--image-weights", "--multi-scale"), ("--nominal-batch", "256")])
def test_resume_continues_exactly(tiny_data: Path, tmp_path: Path, flags: tuple[str, ...],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.setup as setup

    maps_used: list = []  # --image-weights: the per-class mAPs each epoch's draw was weighted by
    real = setup.image_weights
    monkeypatch.setattr(setup, "image_weights", lambda lab, nc, maps: maps_used.append(maps) or real(lab, nc, maps))
    full = fit(parse_options(train_args(tiny_data, tmp_path, "full", 3, *flags)))

    def stop_after_second_epoch(epoch: int, row: dict) -> None:
        if epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        fit(parse_options(train_args(tiny_data, tmp_path, "cut", 3, *flags)), on_epoch_end=stop_after_second_epoch)
    last = tmp_path / "cut" / "weights" / "last.pt"
    assert load_checkpoint(last)["raw"]["epoch"] == 1
    resumed = fit(parse_options(["--resume", str(last)]))
    assert resumed["save_dir"] == str(tmp_path / "cut")

    a = load_checkpoint(Path(full["save_dir"]) / "weights" / "last.pt")["raw"]
    b = load_checkpoint(last)["raw"]
    assert a["epoch"] == b["epoch"] == 2
    for key in ("model", "ema"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=1e-6, msg=f"{key}.{name}")
    rows = list(csv_rows(tmp_path / "cut" / "results.csv"))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"]  # YOLOv5 counts epochs from 0
    if "--image-weights" in flags:  # full run's 3 epochs, the cut run's 2, the resumed epoch: weighted as there
        assert len(maps_used) == 6 and maps_used[0] is None and maps_used[5] == maps_used[2] is not None


def test_resume_keeps_its_device_unless_told_and_may_move_to_loss_scaling(tiny_data: Path, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """--resume without --device continues where the run was started (YOLOv5 users expect that);
    with --device it moves. A CPU run (no loss scaling: empty scaler state) resumed under fp16 +
    GradScaler (CUDA; here CPU fp16 stands in) starts a fresh scaler instead of failing to load it."""
    import engine.setup
    from utils.precision import Precision

    def stop_after_first_epoch(epoch: int, row: dict) -> None:
        raise _Interrupt

    with pytest.raises(_Interrupt):
        fit(parse_options(train_args(tiny_data, tmp_path, "cut", 2)), on_epoch_end=stop_after_first_epoch)
    last = tmp_path / "cut" / "weights" / "last.pt"
    assert load_checkpoint(last)["raw"]["scaler"] == {}
    resume_options = engine.setup.resume_options
    assert resume_options(parse_options(["--resume", str(last)]))[0].device == "cpu"
    assert resume_options(parse_options(["--resume", str(last), "--device", "0"]))[0].device == "0"
    if not torch.cuda.is_available():  # a GPU run resumed here without --device: on the CPU
        raw = load_checkpoint(last)["raw"]
        gpu_run = {**raw, "opt": {**raw["opt"], "device": "0"}}
        monkeypatch.setattr(engine.setup, "load_checkpoint", lambda p: {"raw": gpu_run})
        assert resume_options(parse_options(["--resume", str(last)]))[0].device == "cpu"
        monkeypatch.undo()

    # The device is chosen from the resumed run's flags, not from the command line's empty --device
    # (which means "a GPU if there is one": a CPU run resumed on a GPU machine moved to the GPU).
    chosen: list[str] = []
    select_device = engine.setup.select_device
    monkeypatch.setattr(engine.setup, "select_device", lambda spec, *a: chosen.append(spec) or select_device(spec, *a))
    fp16 = Precision("cpu", torch.float16, "CPU fp16 standing in for CUDA")
    monkeypatch.setattr(engine.setup, "choose_precision", lambda device, amp=True: fp16)
    resumed = fit(parse_options(["--resume", str(last)]))
    assert chosen == ["cpu"]
    assert resumed["epochs_run"] == 2  # both epochs of the run
    ckpt = load_checkpoint(last)["raw"]
    assert ckpt["epoch"] == 1 and ckpt["scaler"]["scale"] > 0 and ckpt["opt"]["amp"] == "fp16"
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_cpu_training_loads_in_the_main_process_unless_told(tiny_data: Path, tmp_path: Path, monkeypatch,
                                                            capsys) -> None:
    """No --workers on a small CPU: 0 loader workers, printed at start and recorded in opt.yaml."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    args = train_args(tiny_data, tmp_path, "auto", 1)
    i = args.index("--workers")
    fit(parse_options(args[:i] + args[i + 2:]))
    assert "Data loading: 0 worker processes" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "auto" / "opt.yaml").read_text())["workers"] == 0
    assert parse_options(["--workers", "auto"]).workers == "auto"
    assert parse_options(["--workers", "3"]).workers == 3


def test_killed_mid_epoch_leaves_a_loadable_last_pt(tiny_data: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "train_distill.py", *train_args(tiny_data, tmp_path, "killed", 100), "--noval"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "weights" / "last.pt"
    try:
        deadline = time.time() + 120
        while not last.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert last.exists(), "no last.pt was written in time"
        time.sleep(1.0)  # now inside a later epoch (or inside a later save)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = load_checkpoint(last)
    assert ckpt["raw"]["epoch"] >= 0
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    model = load_model(last)
    out, _ = model(torch.zeros(1, 3, TINY_IMGSZ, TINY_IMGSZ))
    assert torch.isfinite(out).all()


def test_persistent_nonfinite_loss_stops_with_a_clear_error(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    from utils.loss import DetectionLoss

    real_terms = DetectionLoss.weighted_terms  # what the training criterion calls

    def nan_loss(self, preds, targets):
        terms, positives = real_terms(self, preds, targets)
        return terms * float("nan"), positives

    monkeypatch.setattr(DetectionLoss, "weighted_terms", nan_loss)
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        fit(parse_options(train_args(tiny_data, tmp_path, "nan", 2, "--max-nonfinite", "3")))
    assert not (tmp_path / "nan" / "weights" / "last.pt").exists()


def test_official_weights_with_another_nc_transfer_matching_tensors(tiny_data: Path, tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    args = train_args(tiny_data, tmp_path, "transfer", 1, "--weights", "tests/fixtures/yolov5n_nc80.pt", "--noval")
    args[args.index("--cfg") + 1] = ""
    with caplog.at_level(logging.INFO, logger="engine"):
        summary = fit(parse_options(args))
    line = next(m for m in caplog.messages if m.startswith("Transferred"))
    loaded, total = (int(x) for x in line.split()[1].split("/"))
    assert 0 < loaded < total  # everything but the class-dependent Detect convs
    model = load_model(Path(summary["save_dir"]) / "weights" / "best.pt")
    assert model.nc == 4 and model.yaml["width_multiple"] == 0.25


@pytest.mark.slow
@pytest.mark.parametrize("kd", [False, True], ids=["plain", "distilled"])
def test_ddp_two_cpu_processes_hold_identical_weights(tiny_data: Path, wide_teacher: Path, tmp_path: Path,
                                                      kd: bool) -> None:
    """Two gloo processes end with the same student (and connectors). Distilled: a feature method with
    connectors DDP does not wrap, and a nominal batch of 256 that leaves gradients accumulated at the end
    of epoch 1, whose connector part last.pt averages over the ranks (a collective every rank joins)."""
    extra = ["--t_weights", str(wide_teacher), "--d_feature", "pkd", "--nominal-batch", "256"] if kd else []
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000 + int(kd)), "train_distill.py",
           *train_args(tiny_data, tmp_path, "ddp", 3 if kd else 2, *extra)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    digests = summary["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    model = load_model(tmp_path / "ddp" / "weights" / "best.pt")
    assert model.nc == 4


def test_deterministic_runs_with_deterministic_kernels_resumed_too_and_puts_them_back(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seen: list[tuple] = []

    def look(epoch: int, row: dict) -> None:
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                     os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        if epoch == 0:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        fit(parse_options(train_args(tiny_data, tmp_path, "det", 2, "--deterministic", "--noval")), on_epoch_end=look)
    last = tmp_path / "det" / "weights" / "last.pt"
    assert load_checkpoint(last)["raw"]["opt"]["deterministic"] is True
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    fit(parse_options(["--resume", str(last)]), on_epoch_end=look)  # the run's own flag, not the default
    assert seen == [(True, True, ":4096:8")] * 2
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


@pytest.mark.parametrize(("patience", "epochs_run"), [(1, 2), (2, 3), (0, 4)])
def test_patience_stops_after_that_many_epochs_without_improvement_and_0_never(
        tiny_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, patience: int, epochs_run: int,
        capsys: pytest.CaptureFixture) -> None:
    import engine.trainer

    real_validate = engine.trainer.validate

    def worsening(run, model, **kwargs):  # the best epoch is the first, whatever the training did
        return {**real_validate(run, model, **kwargs), "fitness": 1.0 - 0.1 * run.epoch}

    monkeypatch.setattr(engine.trainer, "validate", worsening)
    args = train_args(tiny_data, tmp_path, f"p{patience}", 4, "--patience", str(patience))
    assert fit(parse_options(args))["epochs_run"] == epochs_run
    if patience:  # the best epoch named as results.csv (and YOLOv5) number it
        assert "best results observed at epoch 0 " in capsys.readouterr().out


def test_process_group_waits_for_rank_zero_longer_than_nccls_default(monkeypatch: pytest.MonkeyPatch) -> None:
    import datetime

    import engine.setup

    joined: list[tuple] = []
    monkeypatch.setattr(engine.setup.dist, "init_process_group", lambda *a, **k: joined.append((a, k)))
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")):
        monkeypatch.setenv(name, value)
    info, device = engine.setup.setup_distributed(parse_options(["--device", "cpu", "--batch-size", "8"]))
    assert info.rank == 1 and info.distributed and device == torch.device("cpu")
    assert joined == [(("gloo",), {"timeout": datetime.timedelta(hours=3)})]


def test_a_single_process_on_gpu_n_makes_it_the_current_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device 1 without torchrun: GPU 1 becomes torch's current device (pinned memory, kernels and
    memory figures follow it), as each torchrun process does with its own GPU."""
    import engine.setup

    current: list[torch.device] = []
    monkeypatch.setattr(engine.setup, "select_device", lambda *a: torch.device("cuda", 1))
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    info, device = engine.setup.setup_distributed(parse_options(["--device", "1"]))
    assert not info.distributed and device == torch.device("cuda", 1) and current == [device]


def test_sync_bn_converts_on_cuda_only(tiny_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SyncBatchNorm has no CPU kernel: under torchrun on CPUs (gloo) --sync-bn is ignored with a warning
    instead of failing at the first step."""
    import engine.setup
    from utils.torch_utils import DistInfo

    opt = parse_options(train_args(tiny_data, tmp_path, "sync", 1, "--sync-bn"))
    two_ranks = DistInfo(rank=0, local_rank=0, world_size=2)
    with caplog.at_level(logging.WARNING, logger="engine"):
        model = engine.setup._build_student(opt, 4, torch.device("cpu"), two_ranks, None)
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert any("--sync-bn" in m for m in caplog.messages)


@pytest.mark.slow
def test_ddp_step_equals_the_single_process_step(tmp_path: Path) -> None:
    """Two gloo ranks, each on its half of a batch, take the step one process takes on the whole batch
    (the ranks' gradients are averaged by DDP, so the loss is scaled by the world size)."""
    from tests.ddp_one_step import IMAGES_PER_SHARE, one_step, student
    from utils.torch_utils import DistInfo

    out = tmp_path / "ddp_weights.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(30500 + os.getpid() % 1000), "-m", "tests.ddp_one_step", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    alone = one_step(DistInfo(), 2 * IMAGES_PER_SHARE)
    start = {k: v.detach() for k, v in student().named_parameters()}
    step = max(float((alone[k] - start[k]).abs().max()) for k in alone)
    assert step > 1e-3  # the step moved the weights far beyond the tolerance below (a 2x gradient would show)
    for name, value in alone.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_ddp_ranks_distil_with_the_same_generators(tiny_data: Path, wide_teacher: Path, tmp_path: Path) -> None:
    """MGD's generators (and any connector) start from random weights that each rank would draw from its
    own seed: rank 0's are broadcast, so the ranks end with the same student AND the same distiller."""
    args = train_args(tiny_data, tmp_path, "ddp_mgd", 1, "--noval", "--t_weights", str(wide_teacher),
                      "--d_feature", "mgd")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(31500 + os.getpid() % 1000), "train_distill.py", *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    digests = json.loads((tmp_path / "ddp_mgd" / "summary.json").read_text())["rank_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]


def test_plots_come_once_at_the_end_and_results_png_covers_every_epoch(tiny_data: Path, tmp_path: Path) -> None:
    seen_png_during_training: list[bool] = []

    def look(epoch: int, row: dict) -> None:
        seen_png_during_training.append((tmp_path / "plots" / "results.png").exists())

    args = [a for a in train_args(tiny_data, tmp_path, "plots", 2) if a != "--noplots"]
    summary = fit(parse_options(args), on_epoch_end=look)
    save_dir = Path(summary["save_dir"])
    assert seen_png_during_training == [False, False]  # results.csv every epoch, the figure once
    for name in ("results.png", "labels.jpg", "PR_curve.png", "confusion_matrix.png"):
        assert (save_dir / name).stat().st_size > 1000, name


def test_save_period_and_nosave_as_yolov5(tiny_data: Path, tmp_path: Path) -> None:
    """--save-period N writes epoch{e}.pt after the 0-based epochs e = 0, N, 2N... (YOLOv5's names and
    epochs); --nosave writes the final last.pt only (no best.pt that would hold the final epoch under an
    earlier epoch's fitness), and the summary reports that file's final validation."""
    summary = fit(parse_options(train_args(tiny_data, tmp_path, "period", 3, "--save-period", "2", "--noval")))
    weights = Path(summary["save_dir"]) / "weights"
    assert sorted(p.name for p in weights.glob("epoch*.pt")) == ["epoch0.pt", "epoch2.pt"]
    assert load_checkpoint(weights / "epoch0.pt")["raw"]["epoch"] == 0

    summary = fit(parse_options(train_args(tiny_data, tmp_path, "nosave", 2, "--nosave")))
    weights = Path(summary["save_dir"]) / "weights"
    assert sorted(p.name for p in weights.iterdir()) == ["last.pt"]
    row = list(csv_rows(Path(summary["save_dir"]) / "results.csv"))[-1]
    assert summary["student_weights"] == "last.pt"
    assert summary["student"]["map"] == pytest.approx(float(row["metrics/mAP_0.5:0.95"]))


def test_resumed_accumulation_counts_in_batches_and_unscaled_gradients(caplog: pytest.LogCaptureFixture) -> None:
    """last.pt's open accumulation is kept as batches since the last step plus unscaled gradients: the
    resumed run reopens it in its own batch numbering and loss scale, and drops it (with a warning)
    when it counts batches differently (another loader length or number of processes)."""
    import logging
    from types import SimpleNamespace

    from engine.setup import _restore_pending

    p = torch.nn.Parameter(torch.zeros(3))

    class Scaler:  # a loss scale of 8 in the resumed run (fp16 on CUDA)
        def is_enabled(self) -> bool:
            return True

        def get_scale(self) -> float:
            return 8.0

    run = SimpleNamespace(train_loader=[0] * 5, info=SimpleNamespace(world_size=1, is_main=True), start_epoch=2,
                          trainable_parameters=[p], scaler=Scaler(), last_step=None)
    pending = {"batches": 3, "batches_per_epoch": 5, "world_size": 1, "grads": [torch.tensor([1.0, 2.0, 3.0])]}
    _restore_pending(run, pending)
    assert run.last_step == 2 * 5 - 1 - 3  # the last step was 3 batches before the end of epoch 1
    assert torch.equal(p.grad, torch.tensor([8.0, 16.0, 24.0]))  # scaled as this run's backward would
    p.grad = None
    with caplog.at_level(logging.WARNING):
        _restore_pending(run, {**pending, "batches_per_epoch": 10})
    assert run.last_step == 9 and p.grad is None and "dropped" in caplog.text
    _restore_pending(run, None)  # an epoch that ended on a step, or an older checkpoint
    assert run.last_step == 9 and p.grad is None


def test_nosave_keeps_the_epoch_an_early_stop_ends_on(tiny_data: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.trainer

    real_validate = engine.trainer.validate
    monkeypatch.setattr(engine.trainer, "validate",
                        lambda run, model, **kw: {**real_validate(run, model, **kw), "fitness": 1.0 - 0.1 * run.epoch})
    summary = fit(parse_options(train_args(tiny_data, tmp_path, "ns", 4, "--nosave", "--patience", "1")))
    assert summary["epochs_run"] == 2
    weights = Path(summary["save_dir"]) / "weights"
    assert [p.name for p in weights.iterdir()] == ["last.pt"]
    assert load_checkpoint(weights / "last.pt")["raw"]["epoch"] == 1


def test_kd_flags_without_a_teacher_are_refused_before_the_data_is_read(tmp_path: Path) -> None:
    from tests.conftest import write_data_yaml
    from utils.demo_data import generate_demo

    generate_demo(tmp_path / "d", seed=5, n_train=4, n_val=2, imgsz=TINY_IMGSZ)
    data = write_data_yaml(tmp_path / "d")
    with pytest.raises(ValueError, match="needs a teacher"):
        fit(parse_options(train_args(data, tmp_path, "kd", 1, "--d_feature", "pkd")))
    assert not list((tmp_path / "d").rglob("*.yolokd.npz"))  # no scan cache written
