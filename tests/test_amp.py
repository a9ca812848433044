"""Mixed precision (utils.precision, engine.step): bf16 training, --noamp = the fp32 numbers, the teacher."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from distill.taps import FeatureTaps
from distill.teacher import prepare_teacher, run_teacher
from engine.step import build_step_state, train_step
from models import load_model
from models.checkpoint import load_checkpoint
from tests.conftest import TINY_IMGSZ, train_args, write_data_yaml
from utils.loss import scale_hyp
from utils.precision import Precision, choose_precision, to_float

REPO = Path(__file__).resolve().parents[1]
BF16 = Precision("cpu", torch.bfloat16, "test")
FP32 = Precision("cpu", None, "test")


def _hyp() -> dict:
    hyp = yaml.safe_load((REPO / "data/hyps/hyp.scratch-low.yaml").read_text())
    hyp["label_smoothing"] = 0.0
    return hyp


def _batch(seed: int = 0, n: int = 4, nc: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, 3, 64, 64), generator=g, dtype=torch.uint8)
    wh = 0.1 + 0.3 * torch.rand(n, 2, generator=g)
    xy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
    cls = torch.randint(0, nc, (n, 1), generator=g).float()
    targets = torch.cat([torch.arange(n).float()[:, None], cls, xy, wh], 1)
    return imgs, targets


def _student(nc: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model(str(REPO / "models/yolov5p.yaml"), nc=nc).train()


def test_precision_choice_and_noamp() -> None:
    cpu = choose_precision(torch.device("cpu"), amp=True)
    assert cpu.dtype in (torch.bfloat16, None) and not cpu.scaler
    assert choose_precision(torch.device("cpu"), amp=False).name == "fp32"
    cuda = choose_precision(torch.device("cuda"), amp=True)
    assert cuda.dtype == torch.float16 and cuda.scaler and "GradScaler" in cuda.describe()
    assert to_float([torch.ones(2, dtype=torch.bfloat16)])[0].dtype == torch.float32


@pytest.mark.parametrize("nhwc", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_images_are_scaled_and_laid_out_in_one_pass(nhwc: bool, dtype: torch.dtype) -> None:
    """Precision.images gives exactly cast-then-divide, in the precision's memory format."""
    imgs = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    p = Precision("cpu", None, nhwc=nhwc)
    x = p.images(imgs, dtype)
    assert x.dtype == dtype and torch.equal(x, imgs.to(dtype) / 255)
    assert x.is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
    assert x.is_contiguous() != nhwc  # a real re-layout, not a tensor contiguous both ways
    scaled = torch.rand(2, 3, 5, 7)
    assert torch.equal(p.images(scaled), scaled)  # float input: already 0-1, only re-laid out


def test_bf16_steps_are_finite_with_fp32_master_weights_and_ema() -> None:
    model = BF16.prepare(_student())
    det = model.detect
    hyp = _hyp()
    state = build_step_state(model, None, hyp, scale_hyp(hyp, det.nl, det.nc, 64), BF16, 4, 4)
    before = [p.detach().clone() for p in model.parameters()]
    imgs, targets = _batch()
    for ni in range(4):
        terms = train_step(state, imgs, targets, ni, accumulate=1)
        assert terms is not None and all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in terms.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for v in state.ema.module.state_dict().values() if v.is_floating_point())
    assert state.ema.updates == 4 and not state.scaler.is_enabled()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "weights did not move"


def test_fp16_loss_scaling_survives_a_skipped_first_step() -> None:
    """fp16 + GradScaler (the CUDA recipe, run here with CPU fp16 autocast): when the scaler skips the
    first optimizer step for inf gradients, the following steps must still be finite. torch's fused
    SGD left its momentum buffers uninitialised after such a skip and wrote garbage into the weights
    (the fp16 demo diverged on an H200), so under loss scaling the optimizer is not the fused one."""
    fp16 = Precision("cpu", torch.float16, "test")
    model = fp16.prepare(_student())
    det = model.detect
    hyp = _hyp()
    state = build_step_state(model, None, hyp, scale_hyp(hyp, det.nl, det.nc, 64), fp16, 4, 4)
    assert state.scaler.is_enabled() and not any(g.get("fused") for g in state.optimizer.param_groups)
    # a scale so large that the first backward overflows fp16; one back-off brings it to 1
    state.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-40)
    before = [p.detach().clone() for p in model.parameters()]
    imgs, targets = _batch()
    train_step(state, imgs, targets, 0, accumulate=1)
    assert state.scaler.get_scale() == 1.0, "the first step was expected to overflow and be skipped"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "a skipped step moved weights"
    for ni in range(1, 4):
        terms = train_step(state, imgs, targets, ni, accumulate=1)
        assert terms is not None and all(torch.isfinite(v).all() for v in terms.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    buffers = [b for s in state.optimizer.state.values() for b in s.values() if torch.is_tensor(b)]
    assert buffers and all(torch.isfinite(b).all() for b in buffers)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "weights did not move"


def test_ddp_connector_gradients_are_averaged_before_the_scaler_checks_them(monkeypatch) -> None:
    """Under DDP the connectors' gradients are all-reduced by hand (DDP wraps only the student). An
    overflow on another rank reaches this rank through that all-reduce, so it must come before the
    GradScaler's inf check: then every rank skips the step together; after it, this rank would step
    with inf gradients (and its scaler would drift from the other ranks')."""
    import engine.step
    from utils.torch_utils import DistInfo

    fp16 = Precision("cpu", torch.float16, "test")
    model = fp16.prepare(_student())
    connector = torch.nn.Conv2d(4, 4, 1)
    hyp = _hyp()
    state = build_step_state(model, connector, hyp, scale_hyp(hyp, 3, 3, 64), fp16, 4, 4)
    state.info = DistInfo(rank=0, local_rank=0, world_size=2)
    state.scaler.scale(torch.ones(()))  # the scaler's state, as after this step's backward
    for p in state.trainable_parameters:
        p.grad = torch.zeros_like(p)  # finite here ...

    def other_rank_overflowed(module: torch.nn.Module, world_size: int) -> None:
        for p in module.parameters():  # ... but inf on the other rank, summed in by the all-reduce
            p.grad.fill_(float("inf"))

    monkeypatch.setattr(engine.step, "all_reduce_grads", other_rank_overflowed)
    before = [p.detach().clone() for p in state.trainable_parameters]
    scale = state.scaler.get_scale()
    engine.step.optimizer_step(state)
    assert state.scaler.get_scale() < scale  # the overflow was seen: the step was skipped
    assert all(torch.equal(a, b) for a, b in zip(before, state.trainable_parameters))


def test_teacher_outputs_and_taps_are_fp32_without_grad() -> None:
    teacher = prepare_teacher(_student().eval(), BF16, fold_bn=True)
    assert next(teacher.parameters()).dtype == torch.bfloat16 and teacher.detect.anchors.dtype == torch.float32
    taps = FeatureTaps(teacher)
    x = torch.rand(2, 3, 64, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the student's region must not leak into the teacher
        out = run_teacher(teacher, x, [taps])
    for t in [*out, *taps.get()]:
        assert t.dtype == torch.float32 and not t.requires_grad and t.grad_fn is None


def test_teacher_skips_decoding_and_gives_its_eval_raw_outputs() -> None:
    teacher = prepare_teacher(_student().eval(), FP32)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        decoded, raw = teacher(x)  # the eval-mode output: (decoded, raw)
    calls: list[int] = []
    teacher.detect._grid = lambda *a: calls.append(1)  # decoding would build cell grids
    out = run_teacher(teacher, x)
    assert not calls and not teacher.detect.raw_only  # nothing decoded; the switch is reset
    for a, b in zip(out, raw, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    del teacher.detect._grid
    assert isinstance(teacher(x), tuple)  # an ordinary eval forward still decodes


def test_teacher_bn_folding_matches_unfolded() -> None:
    base = _student().eval()
    with torch.no_grad():  # BN statistics that are not the identity, so folding has work to do
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    import copy

    folded = prepare_teacher(copy.deepcopy(base), FP32, fold_bn=True)
    plain = prepare_teacher(base, FP32, fold_bn=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(2, 3, 64, 64)
    for a, b in zip(run_teacher(folded, x), run_teacher(plain, x)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_benchmark_uses_the_engine_step() -> None:
    import benchmarks.bench_train_step as bench
    import engine.step

    assert bench.train_step is engine.step.train_step and bench.build_step_state is engine.step.build_step_state
    student = BF16.prepare(_student())
    teacher = prepare_teacher(_student().eval(), BF16, fold_bn=True)
    imgs, targets = _batch()
    row = bench.make_row("objmse", student, (teacher, None), _hyp(), imgs, targets, BF16)
    row.step()
    assert row.nonfinite == [0] and "kd/out_box" in row.kd_terms


@pytest.mark.slow
@pytest.mark.skipif(not any(shutil.which(c) for c in ("cc", "gcc", "clang")),
                    reason="torch.compile on the CPU needs a C compiler")
def test_benchmark_compiled_teacher_computes_and_records_what_the_eager_one_does() -> None:
    """bench_train_step --compile-teacher: the compiled graph keeps the feature taps' hooks (compiled in
    place after the taps are placed) and gives the eager teacher's outputs and features (fp32, so
    only summation order differs); a distillation row with a feature method runs on it."""
    import copy

    import benchmarks.bench_train_step as bench

    imgs, targets = _batch()
    eager = prepare_teacher(_student().eval(), FP32, fold_bn=True)
    compiled = copy.deepcopy(eager)
    taps_eager, taps_compiled = FeatureTaps(eager), FeatureTaps(compiled)
    assert bench.compile_teacher(compiled, imgs) is compiled
    x = imgs.float() / 255
    want = run_teacher(eager, x, [taps_eager]) + taps_eager.get()
    got = run_teacher(compiled, x, [taps_compiled]) + taps_compiled.get()
    assert len(got) == len(want) == 6
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)

    row = bench.make_row("mse" + bench.COMPILED, FP32.prepare(_student()), (eager, None), _hyp(), imgs, targets, FP32)
    row.step()
    assert row.name == "mse compiled" and row.nonfinite == [0] and "kd/feat_mse" in row.kd_terms


@pytest.mark.slow
def test_noamp_reproduces_the_fp32_numbers_and_records_amp(tmp_path: Path, monkeypatch) -> None:
    """--noamp runs the plain fp32 path: no autocast, contiguous tensors, and the numbers pinned from a
    1-epoch run of the code before mixed precision existed (seed 3, 16 images), re-pinned when mosaic
    began to shuffle its four tiles (a new training stream; with the tiles in the old order the old pins
    0.124525, 0.0145766, 0.0475908 and 4594.4224 still held). oneDNN's fp32 kernels sum in another order
    on an AMX box than on an AVX512-BF16 one (2e-4 relative after one epoch), so the numbers are
    compared at 1e-3 and the fp32 path itself is checked exactly."""
    from engine import step
    from engine.trainer import fit
    from train_distill import parse_options
    from utils.demo_data import generate_demo

    seen: list[tuple[bool, bool]] = []
    real_forward = step.train_step

    def watching_step(state, imgs, *args, **kwargs):
        seen.append((state.precision.enabled, any(p.is_contiguous(memory_format=torch.channels_last)
                                                  and not p.is_contiguous() for p in state.model.parameters())))
        return real_forward(state, imgs, *args, **kwargs)

    monkeypatch.setattr("engine.trainer.train_step", watching_step)
    generate_demo(tmp_path / "data", seed=1, n_train=16, n_val=4, imgsz=TINY_IMGSZ)
    data = write_data_yaml(tmp_path / "data")
    summary = fit(parse_options(train_args(data, tmp_path, "b", 1, "--seed", "3", "--noval", "--noamp")))
    assert seen and all(s == (False, False) for s in seen)  # no autocast, no channels_last weights
    run = Path(summary["save_dir"])
    with open(run / "results.csv", newline="") as f:
        row = next(csv.DictReader(f))
    losses = [float(row[f"train/{k}_loss"]) for k in ("box", "obj", "cls")]
    assert losses == pytest.approx([0.126389, 0.0149213, 0.0455742], rel=1e-3)
    ckpt = load_checkpoint(run / "weights/last.pt")["raw"]
    ema_sum = float(sum(v.double().sum() for v in ckpt["ema"].values() if v.is_floating_point()))
    assert ema_sum == pytest.approx(4592.907892668122, rel=1e-4)
    assert yaml.safe_load((run / "opt.yaml").read_text())["amp"] == "fp32"
    assert ckpt["opt"]["amp"] == "fp32" and ckpt["opt"]["noamp"] is True


def test_val_half_on_cpu_is_bf16_where_native_and_close_to_fp32(tiny_trained: Path, tiny_data: Path,
                                                                 tmp_path: Path) -> None:
    from engine.evaluate import EvalSettings
    from engine.validate import validate

    runs = {half: validate(tiny_trained, tiny_data, imgsz=TINY_IMGSZ, device="cpu", project=tmp_path, workers=0,
                           settings=EvalSettings(half=half)) for half in (False, True)}
    assert runs[False]["arithmetic"] == "fp32" and not runs[False]["notes"]
    native = choose_precision(torch.device("cpu")).enabled
    assert runs[True]["arithmetic"] == ("bf16" if native else "fp32")
    assert runs[True]["notes"] and "--half" in runs[True]["notes"][-1]
    assert abs(runs[True]["map50"] - runs[False]["map50"]) < 0.05  # a 2-epoch model: scores near thresholds
