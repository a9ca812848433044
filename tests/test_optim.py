"""Parameter groups, LR curves and the warm-up schedule against hand-worked values (REFERENCE §3)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from engine.optim import (
    BIAS,
    SCALE,
    WEIGHT,
    YOLOV5_GROUP_ORDER,
    EpochLr,
    LrCurve,
    WarmupSchedule,
    accumulation_steps,
    build_optimizer,
    load_optimizer_state,
    split_parameters,
)
from models.yolo import DetectionModel
from tests.test_checkpoint import tiny_cfg

HYP = {"lr0": 0.01, "momentum": 0.937, "warmup_epochs": 3.0, "warmup_momentum": 0.8, "warmup_bias_lr": 0.1}


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_groups_of_a_detection_model_follow_the_module_roles() -> None:
    model = DetectionModel(tiny_cfg())
    model.model[0].conv.weight.requires_grad_(False)  # frozen: in no group
    biases, scales, weights = split_parameters([model, model.model[1]])  # a shared module counts once
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert _ids(scales) == _ids(m.weight for m in norms)
    assert _ids(biases) == _ids([m.bias for m in norms] + [m.bias for m in convs if m.bias is not None])
    assert _ids(weights) == _ids(m.weight for m in convs[1:])
    assert len(biases) + len(scales) + len(weights) == sum(p.requires_grad for p in model.parameters())


def test_other_norm_layers_and_linear_weights_are_classified_by_role() -> None:
    net = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GroupNorm(2, 8))
    biases, scales, weights = split_parameters([net])
    assert _ids(weights) == {id(net[0].weight)}
    assert _ids(scales) == {id(net[1].weight), id(net[2].weight)}
    assert _ids(biases) == {id(net[0].bias), id(net[1].bias), id(net[2].bias)}


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_only_the_weight_group_is_decayed(name: str) -> None:
    opt = build_optimizer([DetectionModel(tiny_cfg())], name, lr=0.01, momentum=0.9, weight_decay=5e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.0, 0.0, 5e-4]
    assert all(p.ndim > 1 for p in opt.param_groups[WEIGHT]["params"])
    if name == "SGD":
        assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9
    else:
        assert opt.param_groups[0]["betas"] == (0.9, 0.999)
    with pytest.raises(ValueError, match="--optimizer RMSprop"):
        build_optimizer([nn.Linear(2, 2)], "RMSprop", 0.01, 0.9, 0.0)


def test_lr_curves() -> None:
    linear, cosine = LrCurve(10, 0.01), LrCurve(10, 0.01, cosine=True)
    assert linear(0) == pytest.approx(1.0) and cosine(0) == pytest.approx(1.0)
    assert linear(10) == pytest.approx(0.01) and cosine(10) == pytest.approx(0.01)
    assert linear(1) == pytest.approx(0.9 * 0.99 + 0.01)  # (1 − 1/10)(1 − lrf) + lrf = 0.901
    assert cosine(5) == pytest.approx(0.505)  # halfway down: (1 + lrf) / 2
    assert cosine(2) == pytest.approx(0.01 + 0.99 * (1 + math.cos(0.2 * math.pi)) / 2)
    values = [cosine(e) for e in range(11)]
    assert values == sorted(values, reverse=True)


def test_warmup_length() -> None:
    lf = LrCurve(10, 0.01)
    assert WarmupSchedule.from_hyp(HYP, n_batches=50, batch_size=16, lf=lf).iterations == 150  # 3 epochs × 50
    assert WarmupSchedule.from_hyp(HYP, n_batches=20, batch_size=16, lf=lf).iterations == 100  # at least 100
    assert WarmupSchedule.from_hyp({**HYP, "warmup_epochs": 0}, 20, 16, lf).iterations == 100  # still 100


def test_warmup_settings_hand_worked() -> None:
    schedule = WarmupSchedule.from_hyp(HYP, n_batches=50, batch_size=16, lf=LrCurve(10, 0.01))
    base = [0.01, 0.01, 0.01]
    start = schedule.settings(0, 0, base)
    assert start.lrs == pytest.approx((0.1, 0.0, 0.0))
    assert start.momentum == pytest.approx(0.8) and start.accumulate == 1
    # iteration 75 of 150 (t = 0.5) in epoch 1: target lr = 0.01 · lf(1) = 0.00901
    mid = schedule.settings(75, 1, base)
    assert mid.lrs == pytest.approx((0.1 + (0.00901 - 0.1) / 2, 0.00901 / 2, 0.00901 / 2))
    assert mid.momentum == pytest.approx((0.8 + 0.937) / 2)
    assert mid.accumulate == 2  # round(1 + (64/16 − 1)·0.5) = round(2.5), Python rounds to even
    late = schedule.settings(149, 2, base)  # just before the end: almost at the scheduled values
    assert late.lrs[BIAS] == pytest.approx(0.01 * LrCurve(10, 0.01)(2), rel=0.1)
    assert late.accumulate == 4
    end = schedule.settings(150, 3, base)  # the last warm-up iteration (t = 1): exactly the targets
    assert end.lrs == pytest.approx((0.01 * LrCurve(10, 0.01)(3),) * 3)
    assert end.momentum == pytest.approx(0.937) and end.accumulate == 4
    done = schedule.settings(151, 3, base)
    assert done.lrs is None and done.momentum is None and done.accumulate == accumulation_steps(16) == 4


def test_warmup_step_writes_into_the_optimizer() -> None:
    opt = build_optimizer([DetectionModel(tiny_cfg())], "SGD", lr=0.01, momentum=0.937, weight_decay=5e-4)
    lf = LrCurve(10, 0.01)
    torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lf)  # sets initial_lr, as in training
    schedule = WarmupSchedule.from_hyp(HYP, n_batches=50, batch_size=64, lf=lf)
    assert schedule.step(opt, 30, 0) == 1  # nominal batch reached: never accumulate
    t = 30 / 150
    assert opt.param_groups[BIAS]["lr"] == pytest.approx(0.1 + (0.01 - 0.1) * t)
    assert opt.param_groups[SCALE]["lr"] == opt.param_groups[WEIGHT]["lr"] == pytest.approx(0.01 * t)
    assert all(g["momentum"] == pytest.approx(0.8 + 0.137 * t) for g in opt.param_groups)
    schedule.step(opt, 150, 3)  # the last warm-up iteration leaves the target momentum for good
    assert all(g["momentum"] == pytest.approx(0.937) for g in opt.param_groups)
    opt.param_groups[0]["lr"] = 123.0
    schedule.step(opt, 151, 3)  # after warm-up the scheduler's values are left alone
    assert opt.param_groups[0]["lr"] == 123.0 and opt.param_groups[0]["momentum"] == pytest.approx(0.937)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_fused_optimizer_takes_the_steps_of_the_plain_loop(name: str) -> None:
    import copy

    torch.manual_seed(0)
    fused_model = DetectionModel(tiny_cfg())
    loop_model = copy.deepcopy(fused_model)
    fused = build_optimizer([fused_model], name, lr=0.01, momentum=0.9, weight_decay=5e-4)
    assert all(g["fused"] for g in fused.param_groups)
    loop = build_optimizer([loop_model], name, lr=0.01, momentum=0.9, weight_decay=5e-4)
    for g in loop.param_groups:  # the reference: torch's per-tensor Python loop
        g["fused"], g["foreach"] = False, False
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_resumed_optimizer_keeps_its_kernels_and_lays_buffers_like_its_parameters(name: str) -> None:
    """A run saved in one precision (contiguous, fused kernels) resumed in another (channels_last
    under AMP; no fused kernels under a GradScaler) steps exactly as the saved run would have."""
    import copy

    torch.manual_seed(0)
    saved_model = DetectionModel(tiny_cfg())
    saved = build_optimizer([saved_model], name, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def grads(step: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(step)
        return [torch.randn(p.shape, generator=g) for p in saved_model.parameters()]

    def step(model: nn.Module, optimizer: torch.optim.Optimizer, k: int) -> None:
        for p, grad in zip(model.parameters(), grads(k), strict=True):
            p.grad = torch.empty_like(p).copy_(grad)  # laid out like its parameter, as autograd gives it
        optimizer.step()

    step(saved_model, saved, 0)
    resumed_model = copy.deepcopy(saved_model).to(memory_format=torch.channels_last)
    resumed = build_optimizer([resumed_model], name, lr=0.01, momentum=0.9, weight_decay=5e-4, loss_scaling=True)
    load_optimizer_state(resumed, copy.deepcopy(saved.state_dict()))  # as read from last.pt: not shared
    assert all(g["fused"] for g in saved.param_groups) and not any(g.get("fused") for g in resumed.param_groups)
    for p, buffers in resumed.state.items():
        assert all(b.stride() == p.stride() for b in buffers.values() if b.shape == p.shape)
    assert any(p.ndim == 4 and not p.is_contiguous() for p in resumed_model.parameters())

    for k in (1, 2):
        step(saved_model, saved, k)
        step(resumed_model, resumed, k)
    for a, b in zip(saved_model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)

    # The harm undone: the saved (contiguous) buffers under channels_last parameters, with fused kernels.
    fused_again = build_optimizer([copy.deepcopy(resumed_model)], name, lr=0.01, momentum=0.9, weight_decay=5e-4)
    fused_again.load_state_dict(copy.deepcopy(saved.state_dict()))
    assert any(b.stride() != p.stride() for p, s in fused_again.state.items() for b in s.values() if b.shape == p.shape)


ORACLE_LR = Path(__file__).parent / "fixtures" / "oracle_lr" / "oracle_lr.json"


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # no optimizer here
@pytest.mark.parametrize("run", sorted(json.loads(ORACLE_LR.read_text())["runs"]))
def test_epoch_learning_rates_equal_yolov5s(run: str) -> None:
    """x/lr0..2 of every epoch, through warm-up (longer or shorter than 100 iterations, ending inside
    an epoch or at its end) and the epochs after it (linear and cosine, lrf 0.01 and 0.2), equal the
    real YOLOv5's results.csv (5 significant digits there); the loop drives the optimizer exactly as
    `engine.trainer` does: warm-up per iteration, the epoch scheduler after each epoch."""
    spec = json.loads(ORACLE_LR.read_text())["runs"][run]
    hyp, epochs, bs = spec["hyp"], spec["epochs"], spec["batch_size"]
    n_batches = math.ceil(spec["train_images"] / bs)
    opt = build_optimizer([nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))], spec["optimizer"], hyp["lr0"],
                          hyp["momentum"], hyp["weight_decay"])
    lf = LrCurve(epochs, hyp["lrf"], spec["cos_lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=EpochLr(lf))
    warmup = WarmupSchedule.from_hyp(hyp, n_batches, bs, lf)
    rows = []
    for epoch in range(epochs):
        for i in range(n_batches):
            warmup.step(opt, i + n_batches * epoch, epoch)
        rows.append([opt.param_groups[g]["lr"] for g in YOLOV5_GROUP_ORDER])
        scheduler.step()
    np.testing.assert_allclose(rows, spec["x_lr"], rtol=6e-5, atol=0)  # 5 digits there
