"""Distillation losses on small hand-worked tensors, plus their limiting cases and invariances."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distill.adapters import Connector, make_connectors
from distill.feature_cwd import FeatureCWD, cwd_loss
from distill.feature_mgd import FeatureMGD, random_spatial_mask
from distill.feature_mimic import FeatureMimic, box_cells, mimic_loss
from distill.feature_mse import FeatureMSE, hint_mse
from distill.feature_overhaul import (
    SILU_ARGMIN,
    FeatureOverhaul,
    activation_floor,
    gaussian_margin,
    overhaul_loss,
    partial_l2,
    silu_margin,
)
from distill.feature_pkd import FeaturePKD, pkd_loss
from distill.output import (
    bounded_regression,
    chen_bounded_box,
    chen_soft_terms,
    decode_cells,
    objectness_weighted_mse,
    soft_label_bce,
    soft_output_terms,
)
from distill.schedule import kd_scale


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _head(xywh, obj, cls) -> torch.Tensor:
    """One (1, 1, 1, 1, 5 + nc) head tensor from plain numbers."""
    return torch.tensor([*xywh, obj, *cls], dtype=torch.float32).view(1, 1, 1, 1, -1)


# ------------------------------------------------------------------------------------------ output
def test_objectness_weighted_mse_hand_values():
    s = _head([0, 0, 0, 0], 2.0, [0, 0])
    t = _head([1, 2, 0, 0], 0.0, [1, -1])  # σ(0) = 0.5
    r = objectness_weighted_mse([s], [t], nc=2)
    assert r["box"].item() == pytest.approx(0.5 * (1 + 4) / 4)
    assert r["obj"].item() == pytest.approx(0.5 * 4.0)
    assert r["cls"].item() == pytest.approx(0.5 * (1 + 1) / 2)
    r2 = objectness_weighted_mse([s, s], [t, t], nc=2)  # summed over levels
    assert r2["box"].item() == pytest.approx(2 * r["box"].item())
    r1 = objectness_weighted_mse([s[..., :6]], [t[..., :6]], nc=1)
    assert r1["cls"].item() == 0.0


def test_objectness_weighted_mse_limits():
    torch.manual_seed(0)
    s = torch.randn(2, 3, 4, 4, 7, requires_grad=True)
    assert all(v.item() == 0 for v in objectness_weighted_mse([s], [s.detach()], 2).values())
    t = torch.randn(2, 3, 4, 4, 7)
    t[..., 4] = -100.0  # the teacher sees only background: nothing to imitate
    r = objectness_weighted_mse([s], [t], 2)
    assert all(v.item() < 1e-30 for v in r.values())
    sum(r.values()).backward()
    assert s.grad is not None


def _objmse_by_autograd(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The docstring's formula, term by term, differentiated by autograd (the reference)."""
    w = t[..., 4:5].sigmoid()
    err = w * (s - t) ** 2
    return torch.stack([err[..., :4].mean(), err[..., 4].mean(), err[..., 5:].mean()])


@pytest.mark.parametrize("no", [6, 7, 85])
def test_objectness_weighted_mse_gradient_is_the_formulas(no):
    from distill.output import _WeightedSquaredError

    torch.manual_seed(no)
    s = torch.randn(2, 3, 4, 5, no, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 4, 5, no, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: _WeightedSquaredError.apply(x, t), (s,))
    g = torch.tensor([0.05, 1.0, 0.5], dtype=torch.float64)
    ours = torch.autograd.grad((_WeightedSquaredError.apply(s, t) * g).sum(), s)[0]
    ref = torch.autograd.grad((_objmse_by_autograd(s, t) * g).sum(), s)[0]
    torch.testing.assert_close(_WeightedSquaredError.apply(s, t), _objmse_by_autograd(s, t))
    torch.testing.assert_close(ours, ref)
    # the public function: fp32, two levels summed, bf16 student logits get a bf16 gradient
    s16 = s.detach().to(torch.bfloat16).requires_grad_()
    r = objectness_weighted_mse([s16, s16[:, :, :2]], [t.float(), t[:, :, :2].float()], nc=no - 5)
    ref = _objmse_by_autograd(s16.double(), t) + _objmse_by_autograd(s16.double()[:, :, :2], t[:, :, :2])
    if no == 6:
        ref[2] = 0.0  # one class: no class term
    torch.testing.assert_close(torch.stack([r["box"], r["obj"], r["cls"]]).double(), ref, rtol=1e-5, atol=1e-6)
    (r["box"] + r["obj"]).backward()
    assert s16.grad.dtype == torch.bfloat16 and s16.grad[..., 5:].abs().max() == 0  # cls weight 0 here


def test_soft_label_bce_hand_values():
    s, t = torch.tensor([1.0]), torch.tensor([-1.0])
    pt = 1 / (1 + math.exp(1))
    expect = -(pt * _logsig(1.0) + (1 - pt) * _logsig(-1.0))
    assert soft_label_bce(s, t).item() == pytest.approx(expect, rel=1e-6)
    expect_bg = -(pt * _logsig(1.0) + 1.5 * (1 - pt) * _logsig(-1.0))
    assert soft_label_bce(s, t, neg_weight=1.5).item() == pytest.approx(expect_bg, rel=1e-6)
    # T = 2 with s = t = 0: p = 0.5 both, BCE = log 2, times T² = 4
    z = torch.zeros(3)
    assert soft_label_bce(z, z, T=2.0).item() == pytest.approx(4 * math.log(2), rel=1e-6)
    # T = 2 hand value: logits halved, result × 4
    pt2 = 1 / (1 + math.exp(0.5))
    expect2 = -4 * (pt2 * _logsig(0.5) + (1 - pt2) * _logsig(-0.5))
    assert soft_label_bce(s, t, T=2.0).item() == pytest.approx(expect2, rel=1e-6)
    # weights: mean(w · ℓ)
    w = torch.tensor([0.0, 1.0])
    two = soft_label_bce(torch.tensor([1.0, 1.0]), torch.tensor([-1.0, -1.0]), weights=w)
    assert two.item() == pytest.approx(expect / 2, rel=1e-6)


def test_soft_label_bce_gradient_vanishes_at_teacher():
    t = torch.randn(5, 4)
    s = t.clone().requires_grad_(True)
    soft_label_bce(s, t, T=3.0).backward()
    assert s.grad.abs().max().item() < 1e-6


def test_soft_output_terms_weighting():
    s = _head([0, 0, 0, 0], 0.0, [0.0, 0.0])
    t = _head([0, 0, 0, 0], 0.0, [10.0, -10.0])
    r = soft_output_terms([s], [t], nc=2, T=1.0)
    assert r["obj"].item() == pytest.approx(math.log(2), rel=1e-6)
    p1 = 1 / (1 + math.exp(-10))
    ce = -(p1 * _logsig(0) + (1 - p1) * _logsig(0))  # = log 2 for any target when s = 0
    assert r["cls"].item() == pytest.approx(0.5 * ce, rel=1e-6)
    assert soft_output_terms([s[..., :6]], [t[..., :6]], nc=1)["cls"].item() == 0.0


def test_bounded_regression_hand_values():
    y = torch.tensor([[0.5, 0, 0, 0]])
    t = torch.tensor([[1.0, 0, 0, 0]])  # e_t = 0.25
    s_equal = torch.tensor([[0.0, 0, 0, 0]])  # e_s = 0.25: not worse than the teacher
    assert bounded_regression(s_equal, t, y).item() == 0.0
    assert bounded_regression(s_equal, t, y, margin=0.1).item() == pytest.approx(0.25)
    s_worse = torch.tensor([[2.0, 0, 0, 0]])  # e_s = 2.25
    assert bounded_regression(s_worse, t, y).item() == pytest.approx(2.25)
    both = bounded_regression(torch.cat((s_equal, s_worse)), t.repeat(2, 1), y.repeat(2, 1))
    assert both.item() == pytest.approx(2.25 / 2)  # mean over boxes, the bounded one counts 0
    empty = torch.zeros(0, 4, requires_grad=True)
    z = bounded_regression(empty, torch.zeros(0, 4), torch.zeros(0, 4))
    z.backward()
    assert z.item() == 0.0 and empty.grad is not None


def test_chen_bounded_box_decodes_cells():
    anchors = torch.tensor([[2.0, 3.0]])
    row = decode_cells(torch.zeros(1, 5), anchors)
    assert row.tolist() == [[0.5, 0.5, 2.0, 3.0]]  # 2σ(0) − 0.5 = 0.5, (2σ(0))² · anchor = anchor
    s = torch.zeros(1, 1, 2, 2, 6)
    t = torch.zeros(1, 1, 2, 2, 6)
    idx = (torch.tensor([0]), torch.tensor([0]), torch.tensor([1]), torch.tensor([1]))
    # Compared anchor-relative: (x/a_w, y/a_h, log(w/a_w), log(h/a_h)). The student decodes
    # (0.5, 0.5, 2, 3) → (0.25, 1/6, 0, 0); the label (0.5, 0.5, 2, 4) → (0.25, 1/6, 0, log 4/3).
    gt = torch.tensor([[0.5, 0.5, 2.0, 4.0]])  # e_s = (log 4/3)²
    t[0, 0, 1, 1, :2] = 10.0  # teacher xy → ≈1.5: e_t ≈ 0.5² + (1/3)² + (log 4/3)², worse than the student
    assert chen_bounded_box([s], [t], [gt], [idx], [anchors]).item() == 0.0
    p = math.sqrt(4.0 / 3.0) / 2  # teacher exact: xy logit 0, (2σ(h))²·3 = 4
    t[0, 0, 1, 1, :2] = 0.0
    t[0, 0, 1, 1, 3] = math.log(p / (1 - p))
    assert chen_bounded_box([s], [t], [gt], [idx], [anchors]).item() == pytest.approx(math.log(4 / 3) ** 2, rel=1e-5)


# ------------------------------------------------------------------------------------- adapters
def test_connector_identity_init():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(Connector(3, 3)(x), x)
    y = Connector(3, 5)(x)
    assert torch.equal(y[:, :3], x) and y[:, 3:].abs().max() == 0
    assert torch.equal(Connector(3, 2)(x), x[:, :2])
    mods = make_connectors([3, 4], [3, 8], always=False)
    assert isinstance(mods[0], nn.Identity) and isinstance(mods[1], Connector)


# ------------------------------------------------------------------------------------- features
def test_hint_mse_values_and_resize():
    s = [torch.ones(1, 2, 2, 2)]
    t = [torch.zeros(1, 2, 2, 2)]
    assert hint_mse(s, t).item() == pytest.approx(1.0)
    assert hint_mse([torch.full((1, 2, 1, 1), 3.0)], [torch.ones(1, 2, 4, 4)]).item() == pytest.approx(4.0)
    m = FeatureMSE([2, 4], [2, 4])
    f = [torch.randn(2, 2, 4, 4), torch.randn(2, 4, 2, 2)]
    assert m(f, [x.clone() for x in f]).item() == 0.0


def test_pkd_hand_value():
    s = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    t = torch.tensor([4.0, 3.0, 2.0, 1.0]).view(1, 1, 2, 2)
    # z_t = −z_s; mean(z_s²) = (n−1)/n with the unbiased std → MSE = 4·0.75 = 3, halved = 1.5
    assert pkd_loss([s], [t]).item() == pytest.approx(1.5, rel=1e-5)
    assert pkd_loss([s], [s.clone()]).item() == 0.0
    # one value per channel (batch 1 on a 1×1 map): no spread to standardise by; 0, not NaN
    one = pkd_loss([torch.randn(1, 2, 1, 1)], [torch.randn(1, 2, 1, 1)])
    assert one.item() == 0.0


def test_chen_soft_terms_hand_value():
    """s = t = 0 logits (p = 0.5 on both sides), one level of 1×2 cells, nc = 2, cell 0 positive:
    obj = balance · mean over ALL cells of −[½·log ½ + 1.5·½·log ½] = 4 · 1.25·log 2 = 5·log 2;
    cls = mean over the POSITIVE cell's classes of −[½·log ½ + ½·log ½] = log 2. Cell 1's class logits
    disagree wildly: a class term averaged over every cell (not the hard loss's positives) would show."""
    s, t = torch.zeros(1, 1, 1, 2, 7), torch.zeros(1, 1, 1, 2, 7)
    s[0, 0, 0, 1, 5:], t[0, 0, 0, 1, 5:] = 5.0, -5.0
    positive = tuple(torch.tensor([0]) for _ in range(4))  # (b, a, gj, gi) of cell 0
    terms = chen_soft_terms([s], [t], [positive], nc=2, balance=[4.0])
    assert terms["obj"].item() == pytest.approx(5 * math.log(2), rel=1e-6)
    assert terms["cls"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert chen_soft_terms([s], [t], [positive], nc=1, balance=[4.0])["cls"].item() == 0.0


def test_pkd_invariant_to_per_channel_affine_student():
    torch.manual_seed(1)
    s = [torch.randn(2, 4, 5, 5), torch.randn(2, 4, 3, 3)]
    t = [torch.randn(2, 4, 5, 5), torch.randn(2, 4, 3, 3)]
    base = pkd_loss(s, t)
    a = torch.tensor([0.1, 2.0, 7.0, 0.5]).view(1, 4, 1, 1)
    b = torch.tensor([-3.0, 0.0, 5.0, 100.0]).view(1, 4, 1, 1)
    assert pkd_loss([x * a + b for x in s], t).item() == pytest.approx(base.item(), rel=1e-4)
    assert pkd_loss([t[0] * a + b, t[1] * a], t).item() < 1e-6
    assert base.item() > 0.5
    # resized student, and the module with an adapter on the mismatched level
    m = FeaturePKD([4, 6], [4, 4])
    assert isinstance(m.adapters[0], nn.Identity)
    out = m([torch.randn(2, 4, 5, 5), torch.randn(2, 6, 2, 2)], t)
    assert torch.isfinite(out)


def test_cwd_hand_value_and_limits():
    t = torch.zeros(1, 1, 1, 2)
    s = torch.tensor([math.log(3.0), 0.0]).view(1, 1, 1, 2)  # p_s = (0.75, 0.25), p_t = (0.5, 0.5)
    expect = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert cwd_loss([s], [t]).item() == pytest.approx(expect, rel=1e-5)
    r3 = math.sqrt(3.0)  # τ = 2: logits halved, p_s = (√3, 1)/(1 + √3); result × τ²
    ps = (r3 / (1 + r3), 1 / (1 + r3))
    expect2 = 4 * (0.5 * math.log(0.5 / ps[0]) + 0.5 * math.log(0.5 / ps[1]))
    assert cwd_loss([s], [t], tau=2.0).item() == pytest.approx(expect2, rel=1e-5)
    # divided by N·C: two identical maps give the same value
    assert cwd_loss([s.repeat(2, 3, 1, 1)], [t.repeat(2, 3, 1, 1)]).item() == pytest.approx(expect, rel=1e-5)
    torch.manual_seed(2)
    x = torch.randn(2, 3, 4, 4)
    assert cwd_loss([x], [x.clone()]).item() == pytest.approx(0.0, abs=1e-6)
    assert cwd_loss([x + 5.0], [x]).item() == pytest.approx(0.0, abs=1e-5)  # shift-invariant softmax
    assert cwd_loss([torch.randn(2, 3, 4, 4)], [x]).item() > 0
    assert FeatureCWD([3], [3])([x], [x]).item() == pytest.approx(0.0, abs=1e-6)


def test_mgd_hand_value_and_gradients():
    torch.manual_seed(3)
    m = FeatureMGD([2], [3])
    t = [torch.randn(2, 3, 4, 4)]
    with torch.no_grad():
        for p in m.generators.parameters():
            p.zero_()
    # a zero generator rebuilds 0: loss = mean over every value of t² (Σ / (N·C·H·W))
    s = [torch.randn(2, 2, 4, 4, requires_grad=True)]
    assert m(s, t).item() == pytest.approx(t[0].pow(2).sum().item() / (2 * 3 * 4 * 4), rel=1e-6)
    # per value: the same statistics at 4× the resolution give the same magnitude (not 4²× larger)
    big = [t[0].repeat_interleave(4, 2).repeat_interleave(4, 3)]
    assert m([torch.randn(2, 2, 16, 16)], big).item() == pytest.approx(m(s, t).item(), rel=1e-6)
    m2 = FeatureMGD([2], [3])
    loss = m2(s, t)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m2.generators.parameters())
    assert m2.adapters[0].conv.weight.grad is not None and s[0].grad is not None
    # its own seeded generator: two modules with the same seed draw the same masks, whatever the global RNG
    a, b = FeatureMGD([2], [3], seed=5), FeatureMGD([2], [3], seed=5)
    b.load_state_dict(a.state_dict())
    torch.manual_seed(0)
    va = a(s, t).item()
    torch.manual_seed(123)
    assert b(s, t).item() == va
    c = FeatureMGD([2], [3], seed=6)
    c.load_state_dict(a.state_dict())
    assert c(s, t).item() != va  # another seed, another mask
    # a mask-RNG state saved on CUDA (16 bytes) resumed on the CPU (--resume --device cpu): warned, not fatal
    d = FeatureMGD([2], [3], seed=5)
    d.load_state_dict({**a.state_dict(), "_extra_state": torch.zeros(16, dtype=torch.uint8)})
    with pytest.warns(UserWarning, match="another device"):
        fresh = d(s, t).item()
    e = FeatureMGD([2], [3], seed=5)
    e.load_state_dict({k: v for k, v in a.state_dict().items() if k != "_extra_state"}, strict=False)
    assert fresh == e(s, t).item()  # the masks continue from the seed
    mask = random_spatial_mask(torch.zeros(8, 5, 32, 32))
    assert mask.shape == (8, 1, 32, 32)
    assert mask.mean().item() == pytest.approx(0.35, abs=0.03)


def test_overhaul_margin_values():
    gamma, beta = torch.tensor([1.0, 1.0, 3.0]), torch.tensor([0.0, 4.0, 0.0])
    m = gaussian_margin(gamma, beta)
    assert m[0].item() == pytest.approx(-(1 / math.sqrt(2 * math.pi)) / 0.5, rel=1e-5)  # −φ(0)/Φ(0)
    assert m[1].item() == pytest.approx(-3.0)  # Φ(−4) < 0.001 → −3|γ|
    assert m[2].item() == pytest.approx(3 * m[0].item(), rel=1e-5)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(gamma)
        bn.bias.copy_(beta)
    sm = silu_margin(bn)
    assert sm[0].item() == pytest.approx(m[0].item())  # inside SiLU's monotone part: unchanged
    assert sm[1].item() == pytest.approx(SILU_ARGMIN) and sm[2].item() == pytest.approx(SILU_ARGMIN)
    assert torch.equal(silu_margin(bn, floor=None), m)
    assert activation_floor(nn.SiLU()) == SILU_ARGMIN and activation_floor(nn.ReLU()) is None
    x = torch.tensor(SILU_ARGMIN, requires_grad=True)  # SiLU's minimum: zero derivative
    nn.functional.silu(x).backward()
    assert abs(x.grad.item()) < 1e-6


def test_overhaul_partial_l2_and_loss():
    target = torch.tensor([1.0, -0.5, -0.5, -0.5])
    s = torch.tensor([0.0, -1.0, 0.0, -0.5])
    assert partial_l2(s, target).item() == pytest.approx(1.0 + 0.25)
    # teacher −2 is raised to the margin −0.8; a student below it costs nothing, above it does
    t = torch.full((2, 1, 1, 2), -2.0)
    margin = [torch.tensor([-0.8])]
    below = torch.full((2, 1, 1, 2), -3.0)
    assert overhaul_loss([below], [t], margin).item() == 0.0
    above = torch.zeros(2, 1, 1, 2)
    assert overhaul_loss([above], [t], margin).item() == pytest.approx(0.64 * 4 / 2)  # Σ / N
    # per-level weights 1/2^(L−l−1): two levels → 0.5, 1
    two = overhaul_loss([above, above], [t, t], margin * 2)
    assert two.item() == pytest.approx(1.5 * 0.64 * 2)


def test_overhaul_module_zero_when_student_equals_teacher():
    torch.manual_seed(4)
    bns = [nn.BatchNorm2d(4), nn.BatchNorm2d(6)]
    m = FeatureOverhaul([4, 6], [4, 6], bns).eval()  # eval BN with fresh stats ≈ identity connector
    f = [torch.randn(2, 4, 4, 4), torch.randn(2, 6, 2, 2)]
    assert m(f, [x.clone() for x in f]).item() == pytest.approx(0.0, abs=1e-5)
    assert m(f, [x + 1 for x in f]).item() > 0
    assert not any(k.startswith("margin") for k in m.state_dict())  # derived from the teacher, not saved


def test_mimic_hand_value_and_outside_invariance():
    t = torch.zeros(1, 2, 4, 4)
    s = torch.zeros(1, 2, 4, 4)
    s[:, :, :2, :2] = 1.0  # inside the box: Σ_{c,cells} diff² = 2·4 = 8
    box = torch.tensor([[0, 0, 0.25, 0.25, 0.5, 0.5]])  # covers cells x,y ∈ [0, 2)
    assert box_cells(box, 4, 4).tolist() == [[0, 0, 0, 2, 2]]
    # Li et al.: 1/(2N) · (1/m)·Σ with m = C·cells = 2·4, N = 1 → 8/8/2
    assert mimic_loss([s], [t], box).item() == pytest.approx(0.5)
    s2 = s.clone()
    s2[:, :, 2:, :] = torch.randn(1, 2, 2, 4)  # change everything outside the box
    s2[:, :, :, 2:] = 7.0
    assert mimic_loss([s2], [t], box).item() == pytest.approx(0.5)
    # two regions of different size count equally: (1 + 0)/(2·2)
    small = torch.tensor([[0, 0, 0.875, 0.875, 0.25, 0.25]])  # one cell (3, 3), diff 0 there
    assert mimic_loss([s], [t], torch.cat((box, small))).item() == pytest.approx(1.0 / 4)


def test_mimic_scale_invariant_to_channels():
    """m_i = C·cells: the same per-value error on 4× the channels gives the same term (before the
    fix it grew C×, so wide P5 maps outweighed P3 ones)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
    boxes = torch.tensor([[0, 1, 0.5, 0.5, 0.4, 0.3], [1, 0, 0.3, 0.6, 0.2, 0.5]])
    one = mimic_loss([s], [t], boxes).item()
    assert mimic_loss([s.repeat(1, 4, 1, 1)], [t.repeat(1, 4, 1, 1)], boxes).item() == pytest.approx(one, rel=1e-6)
    # two levels of different widths carrying the same per-value error contribute equally
    two = mimic_loss([s, s.repeat(1, 8, 1, 1)], [t, t.repeat(1, 8, 1, 1)], boxes).item()
    assert two == pytest.approx(2 * one, rel=1e-6)
    # partial cells count as covered: x ∈ [0.3, 0.4]·4 = [1.2, 1.6] → cell 1
    assert box_cells(torch.tensor([[0, 0, 0.35, 0.35, 0.1, 0.1]]), 4, 4).tolist() == [[0, 1, 1, 2, 2]]


def test_mimic_confident_regions_and_empty():
    t = torch.zeros(2, 1, 2, 2)
    s = torch.ones(2, 1, 2, 2, requires_grad=True)
    conf = [torch.tensor([[[True, False], [False, False]], [[False, False], [False, False]]])]
    # no boxes, one confident region (image 0, one cell, diff² 1) → 1/(2·1)
    assert mimic_loss([s], [t], torch.zeros(0, 6), conf).item() == pytest.approx(0.5)
    z = mimic_loss([s], [t], torch.zeros(0, 6))
    z.backward()
    assert z.item() == 0.0 and s.grad is not None
    m = FeatureMimic([1], [1])
    assert m([t], [t], torch.tensor([[1, 0, 0.5, 0.5, 1.0, 1.0]])).item() == 0.0


# ------------------------------------------------------------------------------------- schedule
def test_kd_scale_values():
    assert kd_scale(0, 10) == 1.0 and kd_scale(9, 10) == 1.0
    assert kd_scale(0, 10, "linear") == 1.0
    assert kd_scale(5, 10, "linear") == pytest.approx(0.5)
    assert kd_scale(9, 10, "linear") == pytest.approx(0.1)
    assert kd_scale(5, 10, "cosine") == pytest.approx(0.5)
    assert kd_scale(0, 10, "cosine") == 1.0
    assert kd_scale(2.5, 10, "cosine") == pytest.approx((1 + math.cos(math.pi / 4)) / 2)
    # the last stop_epochs are 0, decay spans the active epochs only
    assert kd_scale(7, 10, "const", stop_epochs=3) == 0.0
    assert kd_scale(6, 10, "const", stop_epochs=3) == 1.0
    assert kd_scale(4, 10, "linear", stop_epochs=2) == pytest.approx(0.5)
    assert kd_scale(0, 10, warmup_epochs=3) == pytest.approx(0.25)
    assert kd_scale(2, 10, warmup_epochs=3) == pytest.approx(0.75)
    assert kd_scale(3, 10, warmup_epochs=3) == 1.0
    with pytest.raises(ValueError, match="schedule"):
        kd_scale(0, 10, "step")
