"""Issue 17/18: the method table, the criterion's one weight dict, adlik vs objmse, chen's μ, overhaul's
batch-statistics teacher — on real tensors from tiny models."""

from __future__ import annotations

import argparse

import pytest
import torch
from torch import nn

from distill import FEATURE_TABLE, OUTPUT_TABLE, DistillConfig, Distiller, add_distill_args, config_from_args
from distill import methods as methods_mod
from distill.feature_mse import FeatureMSE
from distill.teacher import freeze_teacher
from engine.criterion import TrainingCriterion
from tests.test_distiller import HYP, _batch, _model
from utils.loss import DetectionLoss

FULL_HYP = {**HYP, "label_smoothing": 0.0}


def _criterion(output: str, bs: int = 4, **kw) -> tuple[TrainingCriterion, nn.Module, tuple]:
    s, t = _model(0), freeze_teacher(_model(1))
    d = Distiller(s, t, DistillConfig(output=output, hyp=HYP, **kw))
    imgs, targets = _batch(bs)
    targets = targets[targets[:, 0] < bs]
    return TrainingCriterion(DetectionLoss(s, FULL_HYP), d), s, (imgs, targets)


def _det_total(crit: TrainingCriterion, preds, targets) -> torch.Tensor:
    return crit.detection_loss(preds, targets)[0]


@pytest.mark.parametrize("bs", [1, 4])  # bs 1: one image, its boxes only
def test_adlik_is_objmse_divided_by_batch_size(bs):
    """Same terms, same weights; only objmse multiplies the KD sum by the batch size (the Adlik fork
    does not: its `bs` factor is commented out), so objmse's KD part = bs × adlik's."""
    kd = {}
    for mode in ("objmse", "adlik"):
        crit, s, (imgs, targets) = _criterion(mode, bs=bs)
        preds = s(imgs)
        total, terms = crit(imgs, preds, targets, kd_scale=1.0)
        kd[mode] = (total - _det_total(crit, preds, targets)).item()
        assert set(terms) >= {"kd/out_box", "kd/out_obj", "kd/out_cls"}
        assert crit.distiller.unscaled_terms == (set(crit.distiller.weights) if mode == "adlik" else set())
    assert kd["adlik"] > 0
    assert kd["objmse"] == pytest.approx(bs * kd["adlik"], rel=1e-4)


def test_chen_mu_one_is_hard_only_and_positives_are_assigned_once(monkeypatch):
    calls = []
    real = DetectionLoss.assign
    monkeypatch.setattr(DetectionLoss, "assign", lambda self, *a: calls.append(1) or real(self, *a))
    crit, s, (imgs, targets) = _criterion("chen", chen_mu=1.0, chen_nu=0.0)
    preds = s(imgs)
    total, terms = crit(imgs, preds, targets, kd_scale=1.0)
    assert len(calls) == 1  # the chen terms reused the detection loss's positives
    assert crit.distiller.weights["kd/soft_obj"] == 0.0 and crit.distiller.weights["kd/soft_cls"] == 0.0
    assert total.item() == _det_total(crit, preds, targets).item()  # μ = 1, ν = 0: exactly the hard loss
    # μ = 0: the hard obj/cls terms are gone, only det/box and the soft terms remain
    crit0, s0, (imgs, targets) = _criterion("chen", chen_mu=0.0, chen_nu=0.0)
    preds0 = s0(imgs)
    total0, terms0 = crit0(imgs, preds0, targets, kd_scale=1.0)
    assert terms0["det/obj"].item() == 0.0 and terms0["det/cls"].item() == 0.0
    expect = terms0["det/box"] + terms0["kd/soft_obj"] + terms0["kd/soft_cls"] + terms0["kd/bounded_box"]
    assert total0.item() == pytest.approx(4 * expect.item(), rel=1e-5)
    # as the schedule decays to 0, chen goes back to the plain detection loss
    assert crit0.weight_dict(0.0, 4)["det/obj"] == 4.0


def test_chen_soft_cls_uses_the_hard_terms_positives():
    """Positive cells only: changing the student's class logits OUTSIDE them leaves kd/soft_cls alone."""
    crit, s, (imgs, targets) = _criterion("chen")
    preds = [p.detach().clone() for p in s(imgs)]
    _, pos = crit.detection_loss.weighted_terms(preds, targets)
    ref = crit.distiller(imgs, preds, targets, positives=pos)["kd/soft_cls"].item()
    mask = torch.ones_like(preds[0][..., 0], dtype=torch.bool)
    mask[pos[0].cell_index()] = False
    moved = [p.clone() for p in preds]
    moved[0][..., 5:][mask] += 3.0
    assert crit.distiller(imgs, moved, targets, positives=pos)["kd/soft_cls"].item() == pytest.approx(ref, rel=1e-6)


def test_overhaul_batch_stats_leave_the_teacher_bit_identical():
    s, t = _model(0), freeze_teacher(_model(1))
    with torch.no_grad():  # non-trivial running statistics, so batch and running modes differ
        for m in t.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in t.state_dict().items()}
    imgs, targets = _batch()
    d = Distiller(s, t, DistillConfig(output="objmse", features=("overhaul",), overhaul_bn="batch", hyp=HYP))
    opt = torch.optim.SGD(list(s.parameters()) + list(d.parameters()), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        terms = d(imgs, s(imgs), targets)
        sum(d.weights[k] * v for k, v in terms.items()).backward()
        opt.step()
    after = t.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights, running stats, counters
    assert not t.training and not any(m.training for m in t.modules())
    # the batch-mode teacher is the teacher whose BNs use the batch's statistics (PyTorch's own
    # training-mode BN without running buffers, on an unfrozen copy) ...
    ref = _model(1)
    ref.load_state_dict(before)
    ref.eval()
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.training = False, True
    with torch.no_grad():
        out_batch = d.teacher_forward(imgs)
        out_ref = _raw(ref, imgs)
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(out_batch, out_ref))
    # ... and not the running-statistics one; the temporary hooks are gone after the forward
    with torch.no_grad():
        out_running = _raw(t, imgs)
    assert not torch.allclose(out_batch[0], out_running[0], atol=1e-3)
    n_hooks = sum(len(m._forward_hooks) for m in t.modules())
    assert n_hooks == len(d._t_pre.modules)  # only the pre-activation taps remain


def _raw(model: nn.Module, imgs: torch.Tensor) -> list[torch.Tensor]:
    out = model(imgs)
    return list(out[1]) if isinstance(out, tuple) else list(out)


def test_method_table_drives_cli_config_and_distiller(monkeypatch):
    p = argparse.ArgumentParser()
    g = add_distill_args(p)
    actions = {a.dest: a for a in g._group_actions}
    assert tuple(actions["d_output"].choices) == tuple(OUTPUT_TABLE)
    assert all(name in actions["d_feature"].help and row.summary in actions["d_feature"].help
               for name, row in FEATURE_TABLE.items())
    # adding a method = one row: config, distiller and term name follow
    row = methods_mod.FeatureMethod("toy", lambda c: FeatureMSE(c.s_channels, c.t_channels), 0.25,
                                    frozenset({methods_mod.FEATURES}), ("kd/feat_toy",), "a toy hint")
    monkeypatch.setitem(FEATURE_TABLE, "toy", row)
    monkeypatch.setitem(methods_mod.DEFAULT_F_WEIGHTS, "toy", 0.25)
    d = Distiller(_model(0), freeze_teacher(_model(1)), DistillConfig(output="none", features=("toy",), hyp=HYP))
    assert d.weights == {"kd/feat_toy": 0.25}
    imgs, targets = _batch()
    assert set(d(imgs, d.student(imgs), targets)) == {"kd/feat_toy"}


def test_cli_adlik_schedule_mu_and_kd_scale_in_one_place():
    p = argparse.ArgumentParser()
    add_distill_args(p)
    c = config_from_args(p.parse_args(["--t_weights", "t.pt", "--d_output", "adlik"]), HYP)
    assert c.output == "adlik" and c.schedule == "const"  # the published configuration
    c = config_from_args(p.parse_args(["--t_weights", "t.pt", "--d_output", "adlik", "--d_schedule", "cosine"]), HYP)
    assert c.schedule == "cosine"
    c = config_from_args(p.parse_args(["--t_weights", "t.pt", "--d_output", "chen", "--d_mu", "0.7",
                                       "--d_overhaul_bn", "batch"]), HYP)
    assert c.chen_mu == 0.7 and c.overhaul_bn == "batch" and c.schedule == "cosine"
    with pytest.raises(ValueError, match="--d_mu"):
        config_from_args(p.parse_args(["--t_weights", "t.pt", "--d_mu", "1.5"]), HYP)
    crit, _, _ = _criterion("objmse")
    assert not hasattr(DistillConfig, "scale")
    assert crit.kd_scale(5, 10) == crit.distiller.scale(5, 10) and 0 < crit.kd_scale(5, 10) < 1
    assert TrainingCriterion(crit.detection_loss).kd_scale(5, 10) == 0.0


def test_ciou_gradient_finite_for_a_vanishing_predicted_height():
    """The NaN that stopped overhaul runs (epoch 2 on the demo set): a predicted height of 1e-9 grid
    units became 0 in the xyxy round trip, and atan(w/0)'s backward is NaN."""
    from utils.loss import complete_iou

    p = torch.tensor([[0.7, 1.0, 0.5, 1e-9], [0.6, 0.9, 0.4, 0.3]], requires_grad=True)
    t = torch.tensor([[0.6, 0.9, 0.5, 0.4], [0.6, 0.9, 0.4, 0.3]])
    ciou = complete_iou(p, t)
    ciou.sum().backward()
    assert torch.isfinite(p.grad).all() and p.grad[0, :2].abs().sum() > 0
    assert ciou[1].item() == pytest.approx(1.0, abs=1e-6)  # identical boxes: untouched by the floor
