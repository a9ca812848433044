"""Run folders and resume: a run writes only into its own folder, loses no epoch row after any kill,
never reports an earlier run's outputs as its own, and answers bad flags with one line.

Kills are real ``SIGKILL``s of a ``train_distill.py`` process, sent from inside it at a chosen
point (a small driver wraps the save function); the run is then resumed (in the test process).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import train_distill
import val
from engine.cli import TrainingInterrupted
from engine.logger import YOLOV5_COLUMNS, read_results
from engine.trainer import fit
from models.checkpoint import load_checkpoint
from tests.conftest import TINY_IMGSZ, train_args, write_data_yaml
from train_distill import parse_options
from utils.demo_data import generate_demo

REPO = Path(__file__).resolve().parents[1]


class _Stop(Exception):  # noqa: N818 - control flow of these tests
    pass


def _interrupted_run(data: Path, project: Path, name: str, epochs: int, stop_after: int) -> Path:
    """A run of ``epochs`` stopped (in-process) after epoch ``stop_after``; returns its last.pt."""

    def stop(epoch: int, row: dict) -> None:
        if epoch == stop_after:
            raise _Stop

    with pytest.raises(_Stop):
        fit(parse_options(train_args(data, project, name, epochs)), on_epoch_end=stop)
    return project / name / "weights" / "last.pt"


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _epochs(run: Path) -> list[int]:
    return [int(r["epoch"]) for r in read_results(run / "results.csv")]


# --------------------------------------------------------------------------------------- defect 6
def test_defect6_resume_writes_only_into_the_run_folder_that_owns_the_checkpoint(
        tiny_data: Path, tmp_path: Path, capsys) -> None:
    last = _interrupted_run(tiny_data, tmp_path, "cut", 2, stop_after=0)
    downloads = tmp_path / "elsewhere" / "downloads"
    downloads.mkdir(parents=True)
    shutil.copy(last, downloads / "last.pt")
    capsys.readouterr()
    assert train_distill.main(["--resume", str(downloads / "last.pt")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--resume" in line and f"--weights {downloads / 'last.pt'}" in line
    assert _tree(tmp_path / "elsewhere") == {"downloads/last.pt": _tree(downloads)["last.pt"]}  # nothing written

    # last.pt of this run dropped into ANOTHER run's weights/: that run's records must stay as they are
    other = Path(fit(parse_options(train_args(tiny_data, tmp_path, "other", 1, "--noval")))["save_dir"])
    shutil.copy(last, other / "weights" / "last.pt")
    before = _tree(other)
    capsys.readouterr()
    assert train_distill.main(["--resume", str(other / "weights" / "last.pt")]) == 2
    _one_error_line(capsys.readouterr().err)
    assert _tree(other) == before

    # a copy of the whole run folder is a run folder: it resumes, in the copy only
    shutil.copytree(tmp_path / "cut", tmp_path / "copy")
    original = _tree(tmp_path / "cut")
    assert train_distill.main(["--resume", str(tmp_path / "copy" / "weights" / "last.pt")]) == 0
    assert _tree(tmp_path / "cut") == original
    assert _epochs(tmp_path / "copy") == [0, 1]
    assert load_checkpoint(tmp_path / "copy" / "weights" / "last.pt")["raw"]["opt"]["save_dir"] == str(
        tmp_path / "copy")


# --------------------------------------------------------------------------------------- defect 7
def test_defect7_exist_ok_never_passes_an_old_runs_outputs_as_the_new_runs(tiny_data: Path, tmp_path: Path) -> None:
    first = Path(fit(parse_options(train_args(tiny_data, tmp_path, "same", 2)))["save_dir"])
    old = _tree(first)
    second = fit(parse_options(train_args(tiny_data, tmp_path, "same", 1, "--exist-ok")))
    assert Path(second["save_dir"]) == first

    assert _epochs(first) == [0]  # results.csv holds this run's rows only
    archives = [p for p in first.iterdir() if p.name.startswith("prev-")]
    assert len(archives) == 1 and _tree(archives[0]) == old  # the earlier run is kept whole, byte for byte
    run_id = yaml.safe_load((first / "opt.yaml").read_text())["run_id"]
    for name in ("best.pt", "last.pt"):
        assert load_checkpoint(first / "weights" / name)["raw"]["opt"]["run_id"] == run_id, name
    assert json.loads((first / "summary.json").read_text())["epochs_run"] == 1


# --------------------------------------------------------------------------------------- defect 8
KILL_DRIVER = r"""
import os, signal, sys
import torch
import engine.trainer as trainer

kill_epoch, where, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
real_save, real_torch_save, real_epoch = trainer.save_checkpoint, torch.save, trainer.train_one_epoch
armed = []

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def torch_save(obj, f, *a, **k):
    if armed:  # a kill in the middle of writing the temp file
        f.write(b"partial checkpoint")
        f.flush()
        die()
    return real_torch_save(obj, f, *a, **k)

def save(obj, path):
    hit = obj.get("epoch") == kill_epoch
    if hit and where == f"during_{path.name}":
        armed.append(1)
    out = real_save(obj, path)
    if hit and where == f"after_{path.name}":
        die()
    return out

def train_one_epoch(run, epoch, *rest):
    if where == "next_epoch" and epoch == kill_epoch + 1:
        die()
    return real_epoch(run, epoch, *rest)

torch.save, trainer.save_checkpoint, trainer.train_one_epoch = torch_save, save, train_one_epoch
import train_distill
sys.exit(train_distill.main(args))
"""


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.slow
@pytest.mark.parametrize(("where", "epoch"), [("after_last.pt", 1), ("during_last.pt", 1), ("during_best.pt", 0),
                                             ("next_epoch", 1)])
def test_defect8_after_any_kill_and_resume_results_csv_has_every_epoch_once(
        where: str, epoch: int, tiny_data: Path, tmp_path: Path) -> None:
    """--noval: best.pt is written at epoch 0 only (nothing to improve on before the final epoch)."""
    epochs = 3
    killed = _python("-c", KILL_DRIVER, str(epoch), where, *train_args(tiny_data, tmp_path, "run", epochs, "--noval"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    weights = tmp_path / "run" / "weights"
    temps = sorted(p.name for p in weights.glob(".*.tmp"))
    assert bool(temps) == where.startswith("during_"), temps  # a kill mid-save leaves its temp file

    fit(parse_options(["--resume", str(weights / "last.pt")]))  # in-process: one interpreter start less
    assert _epochs(tmp_path / "run") == list(range(epochs))  # every epoch exactly once, in order
    assert not list(weights.glob(".*.tmp"))  # stale temp files of our saves are gone
    history = load_checkpoint(weights / "last.pt")["raw"]["history"]
    assert [row["epoch"] for row in history] == list(range(epochs))


def test_checkpoint_history_is_plain_data_and_rebuilds_results_csv(tiny_data: Path, tmp_path: Path) -> None:
    last = _interrupted_run(tiny_data, tmp_path, "h", 3, stop_after=1)
    raw = torch.load(last, map_location="cpu", weights_only=True)  # plain builtins only
    assert [row["epoch"] for row in raw["history"]] == [0, 1]
    assert all(type(v) in (int, float) for row in raw["history"] for v in row.values())
    (tmp_path / "h" / "results.csv").write_text("epoch\n0\n0\n1\n5\n")  # damaged, duplicated, too long
    fit(parse_options(["--resume", str(last)]))
    assert _epochs(tmp_path / "h") == [0, 1, 2]


# --------------------------------------------------------------------------------------- issue 15 item 2
# What YOLOv5 7.0.14 (pip package, run as an oracle outside the project) wrote for a 2-epoch run on 16
# demo images at batch 8 (2 batches per epoch, warm-up of 100 iterations, hyp.scratch-low):
# its results.csv header starts with these names (each padded to 20 characters), epoch counts from 0,
# and x/lr0 is the bias group warming down from warmup_bias_lr = 0.1 while x/lr1, x/lr2 rise from 0.
ORACLE_LRS = {0: (0.0991, 0.0001, 0.0001), 1: (0.097152, 0.0001515, 0.0001515)}


def test_results_csv_has_yolov5_columns_epochs_and_learning_rates(tmp_path: Path) -> None:
    root = tmp_path / "d16"
    generate_demo(root, seed=5, n_train=16, n_val=4, imgsz=TINY_IMGSZ)
    data = write_data_yaml(root)
    summary = fit(parse_options(train_args(data, tmp_path, "cols", 2)))
    text = (Path(summary["save_dir"]) / "results.csv").read_text()
    header = text.splitlines()[0].split(",")
    assert tuple(header[: len(YOLOV5_COLUMNS)]) == YOLOV5_COLUMNS
    assert header[-2:] == ["metrics/fitness", "time/epoch_s"]
    rows = read_results(Path(summary["save_dir"]) / "results.csv")
    for row in rows:
        want = ORACLE_LRS[int(row["epoch"])]
        got = tuple(float(row[f"x/lr{j}"]) for j in range(3))
        assert got == pytest.approx(want, rel=1e-4), (row["epoch"], got)


def test_read_results_reads_yolov5s_padded_file(tmp_path: Path) -> None:
    padded = tmp_path / "results.csv"
    padded.write_text(",".join(f"{c:>20}" for c in YOLOV5_COLUMNS) + "\n"
                      + ",".join(f"{v:>20.5g}" for v in range(len(YOLOV5_COLUMNS))) + "\n")
    (row,) = read_results(padded)
    assert row["metrics/mAP_0.5:0.95"] == "7" and row["epoch"] == "0"


# --------------------------------------------------------------------------------------- defect 9
@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    generate_demo(root / "data", seed=1, n_train=8, n_val=2, imgsz=TINY_IMGSZ)
    good = write_data_yaml(root / "data")
    syntax = root / "syntax.yaml"
    syntax.write_text(good.read_text() + "extra: [a, b\n")
    empty = root / "empty_names.yaml"
    empty.write_text(yaml.safe_dump({**yaml.safe_load(good.read_text()), "names": []}))
    shutil.copytree(root / "data", root / "nolabels")
    shutil.rmtree(root / "nolabels" / "labels")
    nolabels = write_data_yaml(root / "nolabels")
    return {"good": good, "syntax": syntax, "empty": empty, "nolabels": nolabels, "root": root}


TRAIN_CASES = {
    "epochs_0": (["--epochs", "0"], "--epochs 0"),
    "epochs_negative": (["--epochs", "-1"], "--epochs -1"),
    "nominal_batch_0": (["--nominal-batch", "0"], "--nominal-batch 0"),
    "device_foo": (["--device", "foo"], "--device foo"),
    "yaml_syntax": (["--data", "{syntax}"], "syntax.yaml: YAML syntax error at line"),
    "names_empty": (["--data", "{empty}"], "empty_names.yaml: 'names' is empty"),
    "no_labels_folder": (["--data", "{nolabels}"], "not a single label file"),
    "yolov5_evolve": (["--evolve"], "--evolve: YOLOv5's hyper-parameter evolution is not part of this tool"),
    "yolov5_quad": (["--quad"], "--quad: YOLOv5's four-image collate is not supported"),
    "image_weights_rect": (["--image-weights", "--rect"], "--image-weights draws images one process at a time"),
}


def test_yolov5_only_flags_are_accepted_and_say_they_do_nothing(caplog: pytest.LogCaptureFixture) -> None:
    from engine.options import check_options

    argv = ["--local_rank", "0", "--bbox_interval", "5", "--entity", "team", "--upload_dataset"]
    opt = train_distill.parse_options(train_args(Path("data.yaml"), Path("runs"), "x", 1, *argv))
    assert opt.local_rank == 0 and opt.bbox_interval == 5 and opt.upload_dataset is True
    with caplog.at_level("WARNING"):
        check_options(opt)
    assert "--entity, --upload_dataset, --bbox_interval: YOLOv5 flag(s) with no effect here" in caplog.text
    caplog.clear()
    check_options(train_distill.parse_options(train_args(Path("data.yaml"), Path("runs"), "x", 1, "--local-rank=1")))
    assert not caplog.text  # the launcher's flag is expected, not warned about


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_defect9_train_errors_are_one_line_with_exit_code_2(case: str, bad_inputs: dict, capsys) -> None:
    extra, expected = TRAIN_CASES[case]
    extra = [a.format(**bad_inputs) for a in extra]
    project = bad_inputs["root"] / "runs"
    argv = [*train_args(bad_inputs["good"], project, case, 1), *extra]
    assert train_distill.main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("train_distill.py: error: ") and expected in line, line
    if case == "no_labels_folder":
        assert str(bad_inputs["root"] / "nolabels" / "labels" / "train") in line
    written = [p for p in (project / case).rglob("*") if p.is_file()] if (project / case).exists() else []
    assert not written  # in particular no best.pt/last.pt claimed or half-made


def test_defect9_val_imgsz_negative_is_one_line(tiny_trained: Path, bad_inputs: dict, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        val.main(["--weights", str(tiny_trained), "--data", str(bad_inputs["good"]), "--imgsz", "-32"])
    assert exit_info.value.code == 2
    assert "--imgsz -32" in _one_error_line(capsys.readouterr().err)


def test_defect9_ctrl_c_prints_how_to_resume_and_exits_130(tiny_data: Path, tmp_path: Path) -> None:
    """A real SIGINT once the first checkpoint exists: one line, status 130, last.pt intact."""
    cmd = [sys.executable, "train_distill.py", *train_args(tiny_data, tmp_path, "c", 200, "--noval")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = tmp_path / "c" / "weights" / "last.pt"
    try:
        import time

        deadline = time.time() + 300
        while not last.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert last.exists(), "no checkpoint in time"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    final = err.replace("\r", "\n").strip().splitlines()[-1]  # after the progress bar's lines
    assert final.startswith("train_distill.py: interrupted at epoch ")
    assert final.endswith(f"resume with: python train_distill.py --resume {last}")
    epoch = load_checkpoint(last)["raw"]["epoch"]
    assert f"at epoch {epoch + 2}/200" in final or f"at epoch {epoch + 1}/200" in final


def test_training_interrupted_message_without_checkpoint() -> None:
    assert "nothing to resume" in str(TrainingInterrupted(0, 5, None))


def test_resume_of_a_checkpoint_from_before_run_ids_and_histories(tiny_data: Path, tmp_path: Path) -> None:
    from models.checkpoint import save_checkpoint

    last = _interrupted_run(tiny_data, tmp_path, "old", 3, stop_after=0)
    raw = torch.load(last, map_location="cpu", weights_only=True)
    del raw["history"], raw["opt"]["run_id"]
    save_checkpoint(raw, last)
    record = yaml.safe_load((tmp_path / "old" / "opt.yaml").read_text())
    del record["run_id"]
    (tmp_path / "old" / "opt.yaml").write_text(yaml.safe_dump(record))

    fit(parse_options(["--resume", str(last)]))  # same folder on both records: still its owner
    assert _epochs(tmp_path / "old") == [1, 2]  # rows from the resume on; the earlier file is kept aside
    assert [int(r["epoch"]) for r in read_results(tmp_path / "old" / "results.before-epoch1.csv")] == [0]
    assert yaml.safe_load((tmp_path / "old" / "opt.yaml").read_text())["run_id"]


def test_run_folder_housekeeping_touches_only_what_is_ours(tmp_path: Path) -> None:
    from engine.runfolder import archive_previous_run, remove_stale_temps

    run = tmp_path / "exp"
    (run / "weights").mkdir(parents=True)
    ours = [run / "weights" / ".last.pt.k3j_x9a2.tmp", run / "weights" / ".best.pt.abcdefgh.tmp",
            run / "opt.tmp", run / ".results.csv.1234.tmp"]
    theirs = [run / "weights" / "last.pt", run / "weights" / "notes.tmp", run / "weights" / ".last.pt.tmp",
              run / "weights" / ".last.pt.toolong123.tmp", run / "data.tmp"]
    for p in ours + theirs:
        p.write_text("x")
    assert sorted(remove_stale_temps(run)) == sorted(ours)
    assert all(p.exists() for p in theirs)

    empty = tmp_path / "fresh"
    (empty / "weights").mkdir(parents=True)
    assert archive_previous_run(empty) is None  # an empty weights/ is nothing to keep
    first = archive_previous_run(run)
    assert first is not None and sorted(p.name for p in run.iterdir()) == [first.name]
    (run / "results.csv").write_text("epoch\n0\n")
    second = archive_previous_run(run)
    assert second != first and sorted(p.name for p in run.iterdir()) == sorted([first.name, second.name])
    assert (second / "results.csv").read_text() == "epoch\n0\n" and (first / "weights" / "last.pt").exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_interrupt_latch_keeps_a_ctrl_c_that_a_finalizer_swallowed() -> None:
    """A SIGINT whose KeyboardInterrupt is raised inside __del__ is lost to Python, not to the latch."""
    import gc

    from engine.cli import InterruptLatch

    class Finalizer:
        def __del__(self) -> None:  # what a DataLoader iterator's shutdown at an epoch change looks like
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):  # the handler runs between bytecodes
                pass

    before = signal.getsignal(signal.SIGINT)
    with InterruptLatch() as latch:
        latch.check()  # nothing yet
        Finalizer()
        gc.collect()  # Python prints "Exception ignored" and goes on
        assert latch.fired
        with pytest.raises(KeyboardInterrupt):
            latch.check()
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
