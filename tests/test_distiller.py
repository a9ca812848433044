"""Teacher freezing, feature taps, compatibility checks, the Distiller and its CLI, on tiny models."""

from __future__ import annotations

import argparse
import copy
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import models
from distill import (
    DEFAULT_F_WEIGHTS,
    DistillConfig,
    Distiller,
    FeatureTaps,
    add_distill_args,
    check_compatibility,
    config_from_args,
    freeze_teacher,
    load_teacher,
)
from distill.adapters import Connector
from distill.taps import detect_input_channels, detect_inputs
from models import DetectionModel
from models.checkpoint import FORMAT, save_checkpoint

MODEL_DIR = Path(models.__file__).parent
FIXTURE = Path(__file__).parent / "fixtures" / "yolov5n_nc80.pt"
IMGSZ = 64
HYP = {"box": 0.05, "obj": 1.0, "cls": 0.5, "anchor_t": 4.0}



def _cfg(width: float = 0.125, nc: int = 3, anchors: list | None = None) -> dict:
    d = yaml.safe_load((MODEL_DIR / "yolov5p.yaml").read_text())
    d["width_multiple"], d["nc"] = width, nc
    if anchors is not None:
        d["anchors"] = anchors
    return d


def _model(seed: int, **kw) -> DetectionModel:
    torch.manual_seed(seed)
    m = DetectionModel(_cfg(**kw))
    m.names = ["a", "b", "c"][: m.nc] + [f"x{i}" for i in range(max(0, m.nc - 3))]
    return m


def _batch(bs: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(bs, 3, IMGSZ, IMGSZ, generator=g)
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.4, 0.3], [0, 2, 0.2, 0.3, 0.1, 0.2], [1, 1, 0.7, 0.6, 0.3, 0.5]])
    return imgs, targets


def _snapshot(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# -------------------------------------------------------------------------------------- taps
def test_taps_record_detect_inputs_and_pre_activation():
    m = _model(0).train()
    post, pre = FeatureTaps(m), FeatureTaps(m, pre_activation=True)
    m(_batch()[0])
    f, p = post.get(), pre.get()
    assert [x.shape[1] for x in f] == detect_input_channels(m) == pre.channels
    assert [x.shape[-1] for x in f] == [IMGSZ // 8, IMGSZ // 16, IMGSZ // 32]
    for a, b in zip(p, f):  # the C3 outputs are SiLU of the recorded BN outputs
        assert torch.allclose(F.silu(a), b, atol=1e-6)
    assert f[0].requires_grad  # the graph is kept for the student's KD gradient


def test_sync_batchnorm_models_have_pre_activation_taps_and_fold():
    """--sync-bn converts the student's BN to SyncBatchNorm before the Distiller places its taps: the
    pre-activation taps (Overhaul) find them, and folding (an exported or teacher model) folds them."""
    m = _model(0).eval()
    x = _batch()[0]
    want = FeatureTaps(m, pre_activation=True)
    with torch.no_grad():
        m(x)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(m)).eval()
    taps = FeatureTaps(synced, pre_activation=True)
    assert all(isinstance(b, torch.nn.SyncBatchNorm) for b in taps.modules)
    with torch.no_grad():
        synced(x)
    for a, b in zip(taps.get(), want.get()):
        torch.testing.assert_close(a, b)
    taps.remove()
    synced.fuse()
    assert not any(isinstance(b, torch.nn.modules.batchnorm._BatchNorm) for b in synced.modules())
    with torch.no_grad():
        torch.testing.assert_close(synced(x)[0], m(x)[0], rtol=1e-4, atol=1e-4)


def test_taps_reset_remove_and_ignore_deep_copies():
    m = _model(0).eval()
    taps = FeatureTaps(m)
    x = _batch()[0]
    m(x)
    first = taps.get()
    ema = copy.deepcopy(m)  # e.g. ModelEMA: its hooks must not write into our taps
    ema(x[:1])
    assert all(a is b for a, b in zip(taps.get(), first))
    m(x[:1])  # a new forward replaces the record
    assert taps.get()[0].shape[0] == 1
    taps.remove()
    m(x)
    assert taps.features == [None, None, None]
    with pytest.raises(RuntimeError, match="no features"):
        taps.get()


def test_taps_on_ddp_wrapped_model(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        m = _model(0).train()
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        taps = FeatureTaps(ddp)
        assert taps.model is m
        ddp(_batch()[0])
        assert len(taps.get()) == 3
        d = Distiller(ddp, freeze_teacher(_model(1)), DistillConfig(features=("mse", "overhaul"), hyp=HYP))
        imgs, targets = _batch()
        terms = d(imgs, ddp(imgs), targets)
        sum(d.weights[k] * v for k, v in terms.items()).backward()
        assert m.model[0].conv.weight.grad is not None and all(p.grad is not None for p in d.parameters())
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------- teacher
def test_frozen_teacher_stays_in_eval_and_bn_never_updates():
    t = freeze_teacher(_model(1))
    before = _snapshot(t)
    assert not any(p.requires_grad for p in t.parameters())
    assert t.train() is t and not t.training
    t.model[4].train()  # a submodule switched behind the teacher's back ...
    t.model[17].cv3.bn.train()
    out = t(_batch()[0])
    assert isinstance(out, tuple)  # ... yet it ran in eval mode (decoded, raw)
    assert not any(m.training for m in t.modules())
    after = t.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_load_teacher_official_checkpoint():
    t = load_teacher(FIXTURE, "cpu")
    assert t.nc == 80 and len(t.names) == 80 and t.names[0] == "person"
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    assert next(t.parameters()).dtype == torch.float32  # fp16 only on CUDA by default
    t.train()
    assert not t.training


def test_load_teacher_with_t_cfg_and_errors(tmp_path):
    src = _model(2)
    cfg_file = tmp_path / "teacher.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg()))
    ckpt = {"format": FORMAT, "yaml": src.yaml, "model": {k: v.half() if v.is_floating_point() else v
                                                           for k, v in src.state_dict().items()},
            "ema": None, "names": src.names, "stride": src.stride.tolist(), "epoch": 0}
    path = save_checkpoint(ckpt, tmp_path / "t.pt")
    t = load_teacher(path, "cpu", cfg=cfg_file)
    assert t.names == src.names and not t.training
    w = src.model[0].conv.weight
    assert torch.allclose(t.model[0].conv.weight, w.half().float())
    bad = tmp_path / "wide.yaml"
    bad.write_text(yaml.safe_dump(_cfg(width=0.25)))
    with pytest.raises(ValueError, match="--t_cfg"):
        load_teacher(path, "cpu", cfg=bad)
    with pytest.raises(FileNotFoundError, match="--t_weights"):
        load_teacher(tmp_path / "missing.pt", "cpu")


# ----------------------------------------------------------------------------- compatibility
def test_compatibility_nc_and_names():
    s = _model(0)
    with pytest.raises(ValueError, match="nc=4.*nc=3"):
        check_compatibility(s, _model(1, nc=4), "objmse")
    t = _model(1)
    t.names = ["a", "b", "zebra"]
    with pytest.raises(ValueError, match="zebra"):
        check_compatibility(s, t, "objmse")


def test_compatibility_anchor_mismatch_default_vs_explicit():
    s = _model(0)
    other = [[11, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
    t = freeze_teacher(_model(1, anchors=other))
    with pytest.warns(UserWarning, match="output distillation disabled: anchors differ"):
        rec = check_compatibility(s, t, "objmse", explicit=False, features=["pkd"])
    assert rec.output == "none" and "anchors" in rec.output_reason
    with pytest.raises(ValueError, match="--d_output objmse.*anchors differ"):
        check_compatibility(s, t, "objmse", explicit=True, features=["pkd"])
    # the default output KD off and no feature method: nothing would be distilled, so refuse at once
    with pytest.raises(ValueError, match=r"default output \(--d_output objmse\).*anchors differ.*--d_feature pkd"):
        check_compatibility(s, t, "objmse", explicit=False)
    with pytest.raises(ValueError, match="--d_output none without --d_feature leaves nothing to distil"):
        check_compatibility(s, _model(1), "none")
    with pytest.warns(UserWarning):
        d = Distiller(s, t, DistillConfig(output="objmse", features=("pkd",), hyp=HYP))
    assert set(d.weights) == {"kd/feat_pkd"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_compatibility(s, _model(1), "objmse").output == "objmse"


def test_feature_kd_across_widths():
    s, t = _model(0), freeze_teacher(_model(1, width=0.25))
    rec = check_compatibility(s, t, "objmse", features=["mse"])
    assert not rec.same_channels and rec.output == "objmse"
    d = Distiller(s, t, DistillConfig(features=("mse", "pkd", "overhaul", "mimic", "cwd", "mgd"), hyp=HYP))
    adapters = [m for m in d.modules() if isinstance(m, Connector)]
    assert adapters and all(a.c_s != a.c_t for a in adapters)
    imgs, targets = _batch()
    terms = d(imgs, s.train()(imgs), targets)
    assert set(terms) == set(d.weights) and all(torch.isfinite(v) for v in terms.values())


# --------------------------------------------------------------------------------- distiller
ALL = ("mse", "pkd", "overhaul", "mimic", "cwd", "mgd")


@pytest.mark.parametrize("output", ["objmse", "soft", "chen"])
def test_distiller_trains_only_student_and_adapters(output):
    s = _model(0)
    t = freeze_teacher(_model(1))
    t_before = _snapshot(t)
    d = Distiller(s, t, DistillConfig(output=output, features=ALL, hyp=HYP, mimic_conf=0.3))
    assert not any(k.startswith(("teacher", "student")) for k in d.state_dict())
    assert all(k.startswith("features.") for k in d.state_dict())
    ids = {id(p) for p in d.parameters()}
    assert not ids & {id(p) for p in s.parameters()} and not ids & {id(p) for p in t.parameters()}
    opt = torch.optim.SGD(list(s.parameters()) + list(d.parameters()), lr=0.01)
    imgs, targets = _batch()
    for _ in range(2):
        s.train()
        t.train()  # attempts to unfreeze are ignored
        opt.zero_grad()
        terms = d(imgs, s(imgs), targets)
        assert set(terms) == set(d.weights)
        assert all(v.dim() == 0 and torch.isfinite(v) for v in terms.values())
        loss = sum(d.weights[k] * v for k, v in terms.items())
        loss.backward()
        assert all(p.grad is not None for p in d.parameters())
        assert s.model[0].conv.weight.grad is not None and s.model[0].conv.weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in t.parameters())
        opt.step()
    t_after = t.state_dict()
    assert all(torch.equal(t_before[k], t_after[k]) for k in t_before)  # weights AND BN buffers
    assert not t.training


def test_distiller_weights():
    d = Distiller(_model(0), freeze_teacher(_model(1)),
                  DistillConfig(d_weight=10, features=("pkd", "mgd"), f_weights={"pkd": 8.0}, hyp=HYP))
    assert d.weights == pytest.approx({"kd/out_box": 0.5, "kd/out_obj": 10.0, "kd/out_cls": 5.0,
                                       "kd/feat_pkd": 8.0, "kd/feat_mgd": DEFAULT_F_WEIGHTS["mgd"]})
    # chen: (1 − μ)·gain on the soft terms (μ 0.5), ν·box on the bounded term; d_weight not used
    chen = Distiller(_model(0), freeze_teacher(_model(1)), DistillConfig(output="chen", hyp=HYP, d_weight=7))
    assert chen.weights == pytest.approx({"kd/soft_obj": 0.5, "kd/soft_cls": 0.25, "kd/bounded_box": 0.025})
    one = Distiller(_model(0, nc=1), freeze_teacher(_model(1, nc=1)), DistillConfig(output="soft", hyp=HYP))
    assert set(one.weights) == {"kd/out_box", "kd/soft_obj"}  # no class terms with one class


def test_feature_terms_stop_for_the_last_epochs_output_kd_goes_on():
    s, t = _model(0), freeze_teacher(_model(1))
    d = Distiller(s, t, DistillConfig(features=("pkd", "mse"), f_stop_epochs=2, hyp=HYP))
    imgs, targets = _batch()
    seen = []
    for epoch in range(5):
        d.set_epoch(epoch, 5)
        s.zero_grad(set_to_none=True)
        d.zero_grad(set_to_none=True)
        terms = d(imgs, s.train()(imgs), targets)
        sum(d.weights[k] * v for k, v in terms.items()).backward()
        seen.append(sorted(terms))
        feature_grads = [p.grad for p in d.features.parameters()]
        if epoch < 3:
            assert all(g is not None for g in feature_grads)
        else:  # the connectors get no gradient at all: SGD / DDP's average skip them
            assert all(g is None for g in feature_grads)
        assert all(f is None for taps in (d._s_taps, d._t_taps) for f in taps.features)  # nothing kept
    full = sorted(d.weights)
    out_only = sorted(k for k in d.weights if k.startswith("kd/out_"))
    assert seen == [full] * 3 + [out_only] * 2


def test_distiller_zero_when_student_equals_teacher():
    s = _model(0).eval()  # eval: the same BN statistics as the teacher
    t = freeze_teacher(copy.deepcopy(s))
    d = Distiller(s, t, DistillConfig(features=("mse", "pkd", "overhaul", "mimic", "cwd"), hyp=HYP)).eval()
    imgs, targets = _batch()
    terms = d(imgs, s(imgs)[1], targets)
    for k in ("kd/out_box", "kd/out_obj", "kd/out_cls", "kd/feat_mse", "kd/feat_mimic"):
        assert terms[k].item() == 0.0, k
    for k in ("kd/feat_pkd", "kd/feat_cwd", "kd/feat_overhaul"):  # eps / BN-eps level
        assert terms[k].item() == pytest.approx(0.0, abs=1e-5), k
    d.remove()


# ---------------------------------------------------------------------------------------- cli
def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_distill_args(p)
    return p.parse_args(list(argv))


def test_cli_defaults_and_translation():
    assert not config_from_args(_parse(), HYP).active
    c = config_from_args(_parse("--t_weights", "t.pt"), HYP)
    assert c.output == "objmse" and not c.output_explicit and c.d_weight == 10.0 and c.t_val
    c = config_from_args(_parse("--t_weights", "t.pt", "--d_output", "chen", "--d_feature", "pkd,cwd",
                                "--f_weight", "3", "--d_schedule", "cosine", "--d_stop_epochs", "5", "--no-t_val"),
                         {**HYP, "box": 0.1, "lr0": 0.01})
    assert c.output == "chen" and c.output_explicit and c.features == ("pkd", "cwd")
    assert c.f_weights == {"pkd": 3.0, "cwd": 3.0} and c.schedule == "cosine" and c.stop_epochs == 5
    assert c.hyp["box"] == 0.1 and not c.t_val and c.f_stop_epochs == 0
    assert config_from_args(_parse("--t_weights", "t", "--d_feature", "pkd", "--f_stop_epochs", "4"),
                            HYP).f_stop_epochs == 4
    assert config_from_args(_parse("--t_weights", "t", "--d_feature", "mse,mgd", "--f_weight", "1,2e-5"),
                            HYP).f_weights == {"mse": 1.0, "mgd": 2e-5}


def test_cli_errors():
    with pytest.raises(ValueError, match="--t_weights"):
        config_from_args(_parse("--d_feature", "pkd"), HYP)
    with pytest.raises(ValueError, match="--f_weight"):
        config_from_args(_parse("--t_weights", "t", "--d_feature", "pkd,cwd", "--f_weight", "1,2,3"), HYP)
    with pytest.raises(ValueError, match="--d_feature"):
        config_from_args(_parse("--t_weights", "t", "--d_feature", "fitnet"), HYP)
    with pytest.raises(ValueError, match="--f_stop_epochs"):
        config_from_args(_parse("--t_weights", "t", "--f_stop_epochs", "2"), HYP)
    args = _parse("--t_weights", "t", "--d_feature", "pkd", "--f_stop_epochs", "3")
    args.epochs = 3
    with pytest.raises(ValueError, match="--f_stop_epochs 3: the feature terms would never run"):
        config_from_args(args, HYP)
    with pytest.raises(SystemExit):
        _parse("--d_output", "kl")


def _p6_model(seed: int, nc: int = 3) -> DetectionModel:
    from tests.test_models import p6_cfg

    torch.manual_seed(seed)
    d = p6_cfg()
    d["nc"] = nc
    m = DetectionModel(d)
    m.names = ["a", "b", "c"]
    return m


def test_feature_kd_pairs_levels_of_equal_stride():
    """A P6 teacher (strides 8-64) teaches a P5 student (8-32) through its P3-P5 levels; a P5 teacher
    cannot teach a P6 student's stride-64 level, and output KD cannot compare the two heads."""
    s, t = _model(0), freeze_teacher(_p6_model(1))
    with pytest.warns(UserWarning, match="output distillation disabled: teacher head has 4 levels"):
        rec = check_compatibility(s, t, "objmse", features=["pkd"])
    assert rec.t_levels == [0, 1, 2] and rec.t_channels == detect_input_channels(t)[:3]
    with pytest.raises(ValueError, match="not all among the teacher's"):
        check_compatibility(_p6_model(0), freeze_teacher(_model(1)), "none", features=["pkd"])
    with pytest.raises(ValueError, match="no feature method can pair them either"):
        check_compatibility(_p6_model(0), freeze_teacher(_model(1)), "objmse")

    d = Distiller(s, t, DistillConfig(output="none", features=("pkd", "mimic", "overhaul"), hyp=HYP, mimic_conf=0.1))
    imgs, targets = _batch()
    imgs = F.interpolate(imgs, size=(128, 128))  # a multiple of the teacher's 64
    terms = d(imgs, s(imgs), targets)
    assert set(terms) == {"kd/feat_pkd", "kd/feat_mimic", "kd/feat_overhaul"}
    assert all(torch.isfinite(v) and v > 0 for v in terms.values())
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in s.model[-2].parameters())  # the student's P5 layer learns
    assert d._t_taps.modules == detect_inputs(t)[:3]  # the teacher's P3-P5 layers are tapped, not P6


def test_a_resumed_run_goes_on_as_it_began():
    """A run of an earlier version whose default output KD was switched off (anchors evolved apart) and
    that has no feature term resumes with a warning instead of failing (nothing trained is lost)."""
    other = [[11, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
    s, t = _model(0), freeze_teacher(_model(1, anchors=other))
    with pytest.warns(UserWarning, match="the resumed run goes on as it began"):
        rec = check_compatibility(s, t, "objmse", resumed=True)
    assert rec.output == "none"
    with pytest.raises(ValueError, match="anchors differ"):
        check_compatibility(s, t, "objmse", explicit=True, resumed=True)  # asked for: still an error
