"""End to end: a tiny teacher → student distillation run per method; the result is a plain YOLOv5 student."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pytest
import torch

import val
from engine.trainer import fit
from models import load_model
from models.checkpoint import load_checkpoint
from tests.conftest import TINY_IMGSZ, train_args
from train_distill import parse_options

METHODS = [
    ["--d_output", "objmse"],
    ["--d_output", "soft"],
    ["--d_output", "chen"],
    ["--d_output", "none", "--d_feature", "mse"],
    ["--d_output", "none", "--d_feature", "pkd"],
    ["--d_output", "none", "--d_feature", "overhaul"],
    ["--d_output", "none", "--d_feature", "mimic"],
    ["--d_output", "none", "--d_feature", "cwd"],
    ["--d_output", "none", "--d_feature", "mgd"],
    ["--d_output", "objmse", "--d_feature", "pkd,mimic", "--f_weight", "6,1", "--d_schedule", "cosine"],
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS, ids=lambda m: "+".join(a for a in m if not a.startswith("-")))
def test_distillation_run_per_method(method: list[str], tiny_data: Path, wide_teacher: Path, tmp_path: Path) -> None:
    teacher_hash = _sha(wide_teacher)
    teacher_before = load_checkpoint(wide_teacher)["state_dict"]
    args = train_args(tiny_data, tmp_path, "kd", 1, "--t_weights", str(wide_teacher), *method)
    summary = fit(parse_options(args))
    save_dir = Path(summary["save_dir"])

    with open(save_dir / "results.csv", newline="") as f:
        row = next(csv.DictReader(f))
    kd_columns = [k for k in row if k.startswith("train/kd/")]
    assert kd_columns, row.keys()
    assert all(float(row[k]) >= 0 and float(row[k]) == float(row[k]) for k in kd_columns)
    assert summary["teacher"]["map50"] >= 0  # the teacher was validated before the first step

    # The saved student is a plain YOLOv5 model: official key layout, no connectors, loads in val.py.
    best = save_dir / "weights" / "best.pt"
    student = load_model(best)
    assert set(student.state_dict()) == set(load_model("models/yolov5p.yaml", nc=4).state_dict())
    assert load_checkpoint(best)["raw"]["adapters"] is None
    last = load_checkpoint(save_dir / "weights" / "last.pt")["raw"]
    if "--d_feature" in method:  # the teacher is wider: every feature method trains connectors
        assert last["adapters"], "connectors must be saved in last.pt for --resume"
        assert all(torch.isfinite(v).all() for v in last["adapters"].values())
    res = val.run(weights=best, data=tiny_data, imgsz=TINY_IMGSZ, device="cpu", project=tmp_path / "val",
                  workers=0, plots=False)
    assert 0 <= res["map"] <= 1

    # The teacher file and weights are untouched.
    assert _sha(wide_teacher) == teacher_hash
    for k, v in load_checkpoint(wide_teacher)["state_dict"].items():
        assert torch.equal(v, teacher_before[k])


def test_kd_flags_without_teacher_are_refused(tiny_data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--t_weights"):
        fit(parse_options(train_args(tiny_data, tmp_path, "bad", 1, "--d_feature", "pkd")))


def test_teacher_with_other_classes_is_refused(tiny_data: Path, tmp_path: Path) -> None:
    args = train_args(tiny_data, tmp_path, "bad", 1, "--t_weights", "tests/fixtures/yolov5n_nc80.pt")
    with pytest.raises(ValueError, match="nc=80"):
        fit(parse_options(args))


def test_kd_switched_off_for_the_last_epochs_logs_zero(tiny_data: Path, wide_teacher: Path, tmp_path: Path) -> None:
    args = train_args(tiny_data, tmp_path, "stop", 2, "--t_weights", str(wide_teacher), "--d_stop_epochs", "1",
                      "--no-t_val", "--noval")
    summary = fit(parse_options(args))
    with open(Path(summary["save_dir"]) / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(None not in r.values() for r in rows)  # every row has every column
    assert float(rows[0]["train/kd/out_obj"]) > 0 and float(rows[1]["train/kd/out_obj"]) == 0


def test_feature_terms_switched_off_for_the_last_epochs(tiny_data: Path, wide_teacher: Path, tmp_path: Path) -> None:
    args = train_args(tiny_data, tmp_path, "fstop", 2, "--t_weights", str(wide_teacher), "--d_feature", "pkd",
                      "--f_stop_epochs", "1", "--d_schedule", "const", "--no-t_val", "--noval")
    summary = fit(parse_options(args))
    with open(Path(summary["save_dir"]) / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(None not in r.values() for r in rows)
    assert float(rows[0]["train/kd/feat_pkd"]) > 0 and float(rows[1]["train/kd/feat_pkd"]) == 0
    assert all(float(r["train/kd/out_obj"]) > 0 for r in rows)  # output KD goes on


class _Stop(Exception):  # noqa: N818 - control flow in the test below
    pass


@pytest.mark.slow
def test_mgd_resume_draws_the_masks_of_the_uninterrupted_run(tiny_data: Path, wide_teacher: Path,
                                                            tmp_path: Path) -> None:
    kd = ["--t_weights", str(wide_teacher), "--d_output", "none", "--d_feature", "mgd"]
    full = fit(parse_options(train_args(tiny_data, tmp_path, "full", 2, *kd, "--noval")))

    def stop(epoch: int, row: dict) -> None:
        raise _Stop

    with pytest.raises(_Stop):
        fit(parse_options(train_args(tiny_data, tmp_path, "cut", 2, *kd, "--noval")), on_epoch_end=stop)
    last = tmp_path / "cut" / "weights" / "last.pt"
    saved_rng = [v for k, v in load_checkpoint(last)["raw"]["adapters"].items() if k.endswith("_extra_state")]
    assert saved_rng and saved_rng[0].dtype == torch.uint8 and saved_rng[0].numel() > 0
    fit(parse_options(["--resume", str(last)]))
    a = load_checkpoint(Path(full["save_dir"]) / "weights" / "last.pt")["raw"]
    b = load_checkpoint(last)["raw"]
    for key in ("model", "adapters"):
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=0, atol=1e-6, msg=f"{key}.{name}")


@pytest.fixture(scope="module")
def p6_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) P6 teacher (4 levels, strides 8-64) for the demo classes."""
    from engine.checkpointing import model_checkpoint
    from models.checkpoint import save_checkpoint
    from models.yolo import DetectionModel
    from tests.conftest import NAMES
    from tests.test_models import p6_cfg

    torch.manual_seed(0)
    model = DetectionModel(p6_cfg(), nc=len(NAMES))
    model.names = list(NAMES)
    return save_checkpoint(model_checkpoint(model), tmp_path_factory.mktemp("p6") / "p6_teacher.pt")


def test_p6_teacher_teaches_a_p5_student_through_equal_strides(tiny_data: Path, p6_teacher: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """Images sized for both models (96 px → 128, a multiple of the teacher's stride 64), the
    teacher validated, the feature term paired on P3-P5; the default output KD alone is refused
    before a run folder exists, since the two heads cannot be compared."""
    args = train_args(tiny_data, tmp_path, "p6", 1, "--t_weights", str(p6_teacher), "--d_feature", "pkd")
    with pytest.warns(UserWarning, match="output distillation disabled: teacher head has 4 levels"):
        summary = fit(parse_options(args))
    assert any("--imgsz 96 is not a multiple of the max stride 64; using 128" in r.getMessage() for r in caplog.records)
    with open(Path(summary["save_dir"]) / "results.csv", newline="") as f:
        row = next(csv.DictReader(f))
    assert float(row["train/kd/feat_pkd"]) > 0 and "train/kd/out_obj" not in row
    assert summary["teacher"]["map50"] >= 0

    args = train_args(tiny_data, tmp_path, "p6_out", 1, "--t_weights", str(p6_teacher))
    with pytest.raises(ValueError, match="teacher head has 4 levels.*--d_feature pkd"):
        fit(parse_options(args))
    assert not (tmp_path / "p6_out").exists()


def test_student_takes_the_teachers_anchors_for_output_kd(tiny_data: Path, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Output KD compares heads anchor by anchor: a teacher trained with other (e.g. evolved) anchors
    gives them to the student instead of switching output KD off; AutoAnchor is not run then."""
    import logging

    import yaml

    from engine.checkpointing import model_checkpoint
    from models.checkpoint import save_checkpoint
    from models.yolo import DetectionModel
    from tests.conftest import NAMES

    cfg = yaml.safe_load(Path("models/yolov5p.yaml").read_text())
    cfg["anchors"] = [[12, 14, 18, 31, 35, 25], [31, 60, 64, 47, 60, 118], [118, 92, 158, 200, 370, 330]]
    torch.manual_seed(0)
    teacher = DetectionModel(cfg, nc=len(NAMES))
    teacher.names = list(NAMES)
    path = save_checkpoint(model_checkpoint(teacher), tmp_path / "t.pt")
    with caplog.at_level(logging.INFO):
        summary = fit(parse_options(train_args(tiny_data, tmp_path, "anch", 1, "--t_weights", str(path),
                                               "--no-t_val", "--noval")))
    assert any(r.getMessage().startswith("Anchors from the teacher ([12, 14, 18") for r in caplog.records)
    student = load_model(Path(summary["save_dir"]) / "weights" / "last.pt")
    assert torch.allclose(student.detect.anchors, teacher.detect.anchors)
    with open(Path(summary["save_dir"]) / "results.csv", newline="") as f:
        assert float(next(csv.DictReader(f))["train/kd/out_obj"]) > 0  # output KD ran
