"""Quantization mimic: the uniform quantiser, the loss on hand-worked tensors, and its wiring."""

from __future__ import annotations

import argparse

import pytest
import torch

from distill import DEFAULT_F_WEIGHTS, DistillConfig, Distiller, add_distill_args, config_from_args, freeze_teacher
from distill.feature_mimic import mimic_loss
from distill.feature_qmimic import FeatureQMimic, UniformQuantizer, qmimic_loss
from tests.test_distiller import HYP, _batch, _model


def _q(t: torch.Tensor, **kw) -> UniformQuantizer:
    """A quantiser whose range was observed once on ``t``."""
    q = UniformQuantizer(t.shape[1], **kw)
    q.observe(t)
    return q


def _map(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


# ----------------------------------------------------------------------------------- quantiser
def test_quantizer_hand_values_each_mode():
    # asymmetric 2 bits over [-1, 2]: β = 3/3 = 1, zero point 1 → levels -1, 0, 1, 2
    q = _q(_map([-1.0, 2.0]), bits=2)
    beta, n_lo, n_hi = q.grid()
    assert (beta.item(), n_lo.item(), n_hi.item()) == (1.0, -1.0, 2.0)
    assert q(_map([-3.0, -0.6, 0.3, 1.7, 9.0])).flatten().tolist() == [-1.0, -1.0, 0.0, 2.0, 2.0]
    # the range always contains 0: a positive-only teacher [0.5, 3] → [0, 3], β = 1, levels 0..3
    q = _q(_map([0.5, 3.0]), bits=2)
    assert q(_map([-1.0, 0.4, 0.6, 1.4, 2.6, 3.7])).flatten().tolist() == [0.0, 0.0, 1.0, 1.0, 3.0, 3.0]
    # symmetric 3 bits: max|x| = 3 → β = 3/3, levels -3..3
    q = _q(_map([-3.0, 0.5]), bits=3, symmetric=True)
    assert q(_map([-4.0, -2.2, 0.2, 2.6, 5.0])).flatten().tolist() == [-3.0, -2.0, 0.0, 3.0, 3.0]
    # fixed step β = 0.5 over [-0.3, 1.2]: levels floor(-0.6)..ceil(2.4) = -1..3 → -0.5..1.5
    q = _q(_map([-0.3, 1.2]), step=0.5)
    assert q(_map([-2.0, -0.3, 0.7, 1.3, 4.0])).flatten().tolist() == [-0.5, -0.5, 0.5, 1.5, 1.5]


@pytest.mark.parametrize("kw", [dict(bits=8), dict(bits=4, per_channel=True), dict(bits=3, symmetric=True),
                                dict(step=0.25), dict(step=0.1, per_channel=True)])
def test_quantizer_grid_idempotent_and_clipped(kw):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(2, 3, 5, 5, generator=g) * torch.tensor([0.5, 2.0, 4.0]).view(1, 3, 1, 1)
    q = _q(t, **kw)
    x = torch.randn(4, 3, 5, 5, generator=g) * 6  # well beyond the teacher's range in places
    y = q(x)
    beta, n_lo, n_hi = (v.view(1, -1, 1, 1) for v in q.grid())
    k = y / beta
    assert torch.allclose(k, k.round(), atol=1e-4)  # on the grid β·ℤ
    assert ((k.round() >= n_lo) & (k.round() <= n_hi)).all()  # within the levels
    assert torch.equal(q(y), y)  # idempotent
    lo, hi = beta * n_lo, beta * n_hi  # clipped to the range's end levels
    assert torch.equal(y[x < lo - beta], lo.expand_as(y)[x < lo - beta])
    assert torch.equal(y[x > hi + beta], hi.expand_as(y)[x > hi + beta])
    inside = (x > lo) & (x < hi)
    assert ((y - x).abs()[inside] <= (beta / 2 + 1e-6).expand_as(y)[inside]).all()  # nearest level
    if kw.get("per_channel"):  # channels of different spread get different steps
        assert len(set(q.grid()[0].tolist())) == (1 if "step" in kw else 3)


def test_quantizer_straight_through_gradient():
    q = _q(_map([-1.0, 2.0]), bits=4)
    x = _map([-0.7, 0.01, 0.33, 1.9]).requires_grad_(True)  # inside the range
    y = q(x, ste=True)
    assert torch.equal(y.detach(), q(x.detach()))  # the value is the quantised one
    (y * torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, -1)).sum().backward()
    assert x.grad.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]  # ∂Q/∂x = identity
    # by design also beyond the range (see the module docstring): the student is pulled back
    z = _map([-5.0, 7.0]).requires_grad_(True)
    q(z, ste=True).sum().backward()
    assert z.grad.flatten().tolist() == [1.0, 1.0]
    assert not q(x).requires_grad  # without STE no gradient flows through the rounding


def test_quantizer_running_range():
    q = UniformQuantizer(1, bits=8, momentum=0.5)
    with pytest.raises(RuntimeError, match="no range observed"):
        q.grid()
    t = _map([-1.0, 4.0])
    beta, _, _ = q.grid(ref=t)  # before any observation the batch's own range is used
    assert beta.item() == pytest.approx(5 / 255)
    q.observe(t)  # the first batch sets the range
    q.observe(_map([-3.0, 2.0]))  # then EMA: lo -1 → -2, hi 4 → 3
    assert (q.lo.item(), q.hi.item(), int(q.updates)) == (-2.0, 3.0, 2)
    assert set(dict(q.named_buffers())) == {"lo", "hi", "updates"}  # saved with the adapters
    with pytest.raises(ValueError, match="--q_bits 1"):
        UniformQuantizer(1, bits=1)
    with pytest.raises(ValueError, match="--q_step"):
        UniformQuantizer(1, step=0.0)


# ---------------------------------------------------------------------------------------- loss
def _hand_maps() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher/student 4×4 maps, one channel, and one box covering cells [0, 2) × [0, 2)."""
    t = torch.zeros(1, 1, 4, 4)
    t[0, 0, :2, :2] = torch.tensor([[0.9, 2.2], [1.1, 3.0]])  # teacher range [0, 3]: 2 bits → β = 1
    s = torch.zeros(1, 1, 4, 4)
    s[0, 0, :2, :2] = torch.tensor([[1.4, 1.6], [0.2, 2.6]])
    box = torch.tensor([[0, 0, 0.25, 0.25, 0.5, 0.5]])
    return s, t, box


def test_qmimic_loss_hand_value():
    s, t, box = _hand_maps()
    m = FeatureQMimic([1], [1], bits=2)  # identity connector, so r(v) = v
    # Q(t) in the box = [1, 2, 1, 3], Q(s) = [1, 2, 0, 3]: Σ diff² = 1, m = 4 cells, N = 1 → 1/(2·4)
    assert m([s], [t], box).item() == pytest.approx(1 / 8)
    # the unquantised mimic of the same maps differs: (0.5² + 0.6² + 0.9² + 0.4²)/(2·4)
    assert mimic_loss([s], [t], box).item() == pytest.approx(1.58 / 8)
    assert m.quantizers[0].lo.item() == 0.0 and m.quantizers[0].hi.item() == 3.0  # the teacher's range
    # two levels: each contributes its own regions' average
    q2 = [_q(t, bits=2), _q(t, bits=2)]
    assert qmimic_loss([s, s], [t, t], box, q2).item() == pytest.approx(2 / 8)


def test_qmimic_zero_when_student_equals_teacher_or_same_bins():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(2, 3, 8, 8, generator=g)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.6, 0.4], [1, 0, 0.3, 0.6, 0.2, 0.5]])
    m = FeatureQMimic([3], [3], bits=4)
    assert m([t.clone()], [t], targets).item() == 0.0
    # a student in the same bins as the teacher costs nothing either: the grid absorbs sub-step noise
    q = m.quantizers[0]
    beta = q.grid()[0].item()
    s = q(t) + (torch.rand(t.shape, generator=g) - 0.5) * 0.8 * beta
    assert m.eval()([s], [t], targets).item() == 0.0


def test_qmimic_ignores_outside_boxes_and_gradient_stays_inside():
    s, t, box = _hand_maps()
    q = [_q(t, bits=2)]
    ref = qmimic_loss([s], [t], box, q).item()
    s2 = s.clone()
    s2[..., 2:, :] = torch.randn(1, 1, 2, 4) * 5  # change everything outside the box
    s2[..., :, 2:] = -7.0
    s2.requires_grad_(True)
    loss = qmimic_loss([s2], [t], box, q)
    assert loss.item() == pytest.approx(ref)
    loss.backward()
    g = s2.grad[0, 0]
    assert g[:2, :2].abs().sum() > 0 and g[2:, :].abs().sum() == 0 and g[:, 2:].abs().sum() == 0
    # ∂L/∂s = (Q(s) − Q(t))/(N·m) through the STE: only the cell whose bins differ (Q(s) 0, Q(t) 1)
    assert g[:2, :2].flatten().tolist() == pytest.approx([0.0, 0.0, -0.25, 0.0])
    # a student map of another size is resized before quantising
    big = torch.nn.functional.interpolate(s, scale_factor=2.0, mode="nearest")
    assert torch.isfinite(qmimic_loss([big], [t], box, q))


# ------------------------------------------------------------------------------------ wiring
def test_distiller_and_cli_with_qmimic():
    s, t = _model(0), freeze_teacher(_model(1, width=0.25))  # different widths: connectors adapt
    d = Distiller(s, t, DistillConfig(output="none", features=("qmimic",), hyp=HYP, q_bits=4, q_per_channel=True))
    assert d.weights == {"kd/feat_qmimic": DEFAULT_F_WEIGHTS["qmimic"]}
    imgs, targets = _batch()
    d.train()
    terms = d(imgs, s.train()(imgs), targets)
    assert set(terms) == {"kd/feat_qmimic"} and torch.isfinite(terms["kd/feat_qmimic"])
    terms["kd/feat_qmimic"].backward()
    assert all(p.grad is not None for p in d.parameters())
    assert s.model[0].conv.weight.grad.abs().sum() > 0  # the student learns through the STE
    sd = d.state_dict()
    assert any(k.endswith("quantizers.0.lo") for k in sd)
    qz = d.features["qmimic"].quantizers
    assert qz[0].bits == 4 and qz[0].per_channel and int(qz[0].updates) == 1
    assert qz[2].lo.shape == (t.detect.m[2].in_channels,)
    d.remove()

    p = argparse.ArgumentParser()
    add_distill_args(p)
    args = p.parse_args(["--t_weights", "t.pt", "--d_feature", "mimic,qmimic", "--q_step", "0.05", "--q_symmetric"])
    cfg = config_from_args(args, HYP)
    assert cfg.features == ("mimic", "qmimic") and cfg.q_step == 0.05 and cfg.q_symmetric and cfg.q_bits == 8
    assert not cfg.q_per_channel
    with pytest.raises(ValueError, match="--q_bits 1"):
        DistillConfig(features=("qmimic",), q_bits=1)
    with pytest.raises(ValueError, match="--q_step"):
        DistillConfig(features=("qmimic",), q_step=-1.0)
