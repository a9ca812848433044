"""EMA of weights (ramped decay, BN buffers), wrapper unwrapping and --device parsing."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from utils.torch_utils import WeightEMA, ema_decay, parse_device, select_device, unwrap_model


def test_ema_decay_ramp_hand_worked() -> None:
    assert ema_decay(0) == 0.0  # the first average is the model itself
    assert ema_decay(1) == pytest.approx(0.9999 * (1 - math.exp(-1 / 2000)))  # ≈ 5.0e-4
    assert ema_decay(2000) == pytest.approx(0.9999 * 0.6321205588)  # one tau: 1 − 1/e of the way
    assert ema_decay(10**6) == pytest.approx(0.9999)
    assert ema_decay(100, decay=0.5, tau=100) == pytest.approx(0.5 * (1 - math.exp(-1)))


def _scalar_model(value: float) -> nn.Module:
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(value)
    return m


def test_ema_steps_hand_worked() -> None:
    model = _scalar_model(2.0)
    ema = WeightEMA(model)
    assert ema.updates == 0 and ema.module.weight.item() == 2.0  # starts as a copy of the model
    assert not ema.module.weight.requires_grad and not ema.module.training
    with torch.no_grad():
        model.weight.fill_(4.0)
    ema.update(model)
    d1 = ema_decay(1)
    assert ema.updates == 1
    assert ema.module.weight.item() == pytest.approx(d1 * 2.0 + (1 - d1) * 4.0)  # ≈ 3.999, nearly the model
    ema.updates = 10**6  # long run: the average moves by (1 − 0.9999) of the gap per step
    before = ema.module.weight.item()
    with torch.no_grad():
        model.weight.fill_(before + 1.0)
    ema.update(model)
    assert ema.module.weight.item() == pytest.approx(before + 1e-4, abs=1e-6)
    assert ema.updates == 10**6 + 1


def test_ema_averages_batchnorm_buffers_and_unwraps() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    # wrapped, the plain network is averaged (not DataParallel: it moves the network to a GPU if any)
    ema = WeightEMA(_Holder(model), updates=2000)
    assert isinstance(ema.module, nn.Sequential) and ema.updates == 2000
    old = {k: v.clone() for k, v in ema.module.state_dict().items()}
    model.train()
    model(torch.randn(2, 3, 8, 8) * 3 + 1)  # moves running_mean/var and num_batches_tracked
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update(_Holder(model))
    d = ema_decay(2001)
    new = model.state_dict()
    for key in ("0.weight", "1.running_mean", "1.running_var"):
        torch.testing.assert_close(ema.module.state_dict()[key], d * old[key] + (1 - d) * new[key])
    assert not torch.equal(ema.module[1].running_mean, old["1.running_mean"])
    assert ema.module[1].num_batches_tracked.item() == 1  # integer buffers follow the model


def test_ema_resume_gives_the_same_average() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    ema = WeightEMA(model)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight))
        ema.update(model)
    restored = WeightEMA(model)  # as engine.setup rebuilds it, then loads the checkpoint
    restored.module.load_state_dict(ema.module.state_dict())
    restored.updates = ema.updates
    with torch.no_grad():
        model[0].weight.mul_(0.5)
    ema.update(model)
    restored.update(model)
    for a, b in zip(ema.module.state_dict().values(), restored.module.state_dict().values()):
        assert torch.equal(a, b)


class _Holder(nn.Module):
    """Looks like DistributedDataParallel: the real network sits in ``.module``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.module = inner


def test_unwrap_model() -> None:
    net = nn.Linear(2, 2)
    assert unwrap_model(net) is net
    assert unwrap_model(nn.DataParallel(net)) is net
    assert unwrap_model(_Holder(nn.DataParallel(net))) is net  # nested wrappers
    assert unwrap_model(torch.compile(net)) is net  # torch.compile keeps it in _orig_mod
    ema = WeightEMA(net)
    assert unwrap_model(ema) is ema.module
    model_with_more = _Holder(net)
    model_with_more.head = nn.Linear(2, 1)  # a real model that happens to own a `module` child
    assert unwrap_model(model_with_more) is model_with_more


def test_parse_device() -> None:
    assert parse_device("") == ("auto", ())
    assert parse_device(None) == ("auto", ())
    assert parse_device(" CPU ") == ("cpu", ())
    assert parse_device("mps") == ("mps", ())
    assert parse_device(0) == ("cuda", (0,))
    assert parse_device("cuda:1") == ("cuda", (1,))
    assert parse_device("0, 1") == ("cuda", (0, 1))
    assert parse_device("cuda") == ("cuda", ())


@pytest.mark.parametrize("bad", ["foo", "0,", "gpu0", "-1", "1.5"])
def test_bad_device_strings_give_one_line_naming_the_flag(bad: str) -> None:
    with pytest.raises(ValueError, match=f"^--device {bad}: not a device") as info:
        select_device(bad)
    assert "\n" not in str(info.value)


def test_select_device_gives_each_torchrun_process_its_listed_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """--device 2,3 under torchrun: local ranks 0 and 1 train on GPUs 2 and 3 (not 0 and 1)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [select_device("2,3", 16, rank) for rank in (0, 1)] == [torch.device("cuda", 2), torch.device("cuda", 3)]
    assert [select_device("", 16, rank) for rank in (0, 3)] == [torch.device("cuda", 0), torch.device("cuda", 3)]
    assert select_device("cuda:1") == torch.device("cuda", 1) and select_device("") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="--nproc_per_node 2"):
        select_device("2,3", 16, 2)
    with pytest.raises(ValueError, match="--nproc_per_node 4"):
        select_device("", 16, 4)


def test_rng_state_of_more_gpus_than_visible_restores_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint saved on 8 GPUs resumed on 1: GPU 0 gets its state, the rest are not there to set."""
    from utils.torch_utils import rng_state, set_rng_state

    state = rng_state()
    state["cuda"] = [torch.full((16,), k, dtype=torch.uint8) for k in range(8)]
    restored: list[tuple[int, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((int(s[0]), device)))
    set_rng_state(state)
    assert restored == [(0, 0)]


def test_select_device_on_this_machine() -> None:
    assert select_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert select_device("") == torch.device("cuda", 0)
        return
    assert select_device("") == torch.device("cpu")
    with pytest.raises(ValueError, match="--device 0 requested but only 0 CUDA device"):
        select_device("0")


def test_ema_update_equals_averaged_model_update_parameters() -> None:
    """Our pairing of tensors gives what torch's AveragedModel.update_parameters gives, step for step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 2, 1))
    model = model.to(memory_format=torch.channels_last)
    ours, library = WeightEMA(model, tau=3.0), WeightEMA(model, tau=3.0)
    model.train()
    for _ in range(4):
        model(torch.randn(2, 3, 8, 8))  # moves the BN buffers
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model)
        library.update_parameters(model)
    assert ours.updates == library.updates == 4
    expected = library.module.state_dict()
    for key, value in ours.module.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    assert ours.module[1].num_batches_tracked.item() == 4


def test_ema_update_refuses_a_different_model() -> None:
    ema = WeightEMA(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="EMA: the model has 4 tensors, its average 2"):
        ema.update(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
