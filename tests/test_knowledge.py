"""Knowledge quantification (analysis/knowledge/, analyze_kd.py): entropy optimisation on toy
features with a known answer, concept bookkeeping, the letterbox box→cell mapping, the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from torch import nn

import analyze_kd
from analysis.knowledge import (
    HALF_LOG_2PI_E,
    EntropySettings,
    FeatureExtractor,
    Sample,
    analyze_model,
    box_cell_mask,
    concept_dynamics,
    count_concepts,
    learn_entropy,
    load_samples,
    summarize,
)
from models import DetectionModel
from models.checkpoint import save_checkpoint
from utils.demo_data import NAMES, generate_demo

REPO = Path(__file__).resolve().parents[1]



# ------------------------------------------------------------------------------ toy features
def region_mask(size: int = 64) -> torch.Tensor:
    """(1, 1, size, size) mask of the region the toy features read: rows 16-47, cols 16-31."""
    m = torch.zeros(1, 1, size, size)
    m[..., 16:48, 16:32] = 1
    return m


def test_linear_feature_matches_closed_form():
    """f(x) = x ⊙ m: the optimum is σ_u² = λ s_f² / (2 P c_u) inside, σ_max outside."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 64, 64)
    mask = region_mask()

    def f(z: torch.Tensor) -> torch.Tensor:
        return (z * mask).flatten(1)

    s = EntropySettings(lam=0.5, steps=250, samples=2, lr=0.05, cell=16)
    res = learn_entropy(f, x, s, torch.Generator().manual_seed(0))
    f0 = f(x)
    spread = float(((f0 - f0.mean()) ** 2).sum())
    expected = 0.5 * math.log(s.lam * spread / (2 * 64 * 64 * 3))  # c_u = 3 channels per pixel
    inside = res.log_sigma[0, 1:3, 1]
    assert torch.allclose(inside, torch.full_like(inside, expected), atol=0.1)
    outside = res.log_sigma[0].clone()
    outside[1:3, 1] = float("nan")
    assert torch.allclose(outside[~outside.isnan()], torch.zeros(14), atol=1e-6)  # clamped at σ_max = 1
    assert torch.allclose(res.entropy, res.log_sigma + HALF_LOG_2PI_E)
    # Each of the 2 read units carries (λ/2)·(its share of pixels) = 0.25/16 of relative change.
    assert res.change.item() == pytest.approx(2 * s.lam / 2 / 16, rel=0.3)


def test_conv_feature_concepts_fall_inside_region():
    """A conv net reading only a masked region: small σ (concepts) inside, large outside."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    mask = region_mask()
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1)).eval()
    for p in net.parameters():
        p.requires_grad_(False)

    def f(z: torch.Tensor) -> torch.Tensor:
        return net(z * mask).flatten(1)

    res = learn_entropy(f, x, EntropySettings(lam=0.5, steps=120, samples=2, lr=0.1, cell=16),
                        torch.Generator().manual_seed(1))
    assert np.mean(res.loss[-10:]) < np.mean(res.loss[:10])  # the optimisation lowers its objective
    region = box_cell_mask(np.array([[16, 16, 32, 48]]), (64, 64), 16)
    assert region.sum() == 2
    for h in res.entropy:
        assert float(h[torch.from_numpy(region)].max()) < float(h[torch.from_numpy(~region)].min()) - 1.0
        cnt = count_concepts(h, fg=region)
        assert (cnt.n_fg, cnt.n_bg, cnt.ratio) == (2, 0, 1.0)
        assert np.array_equal(cnt.concepts, region)


def test_feature_extractor_on_detection_model():
    """Default feature = the three Detect inputs, flattened and concatenated; a named layer works too;
    the model's flags are restored on close."""
    cfg = yaml.safe_load((REPO / "models" / "yolov5p.yaml").read_text())
    cfg["nc"] = 2
    model = DetectionModel(cfg).train()
    x = torch.rand(2, 3, 64, 64)
    with FeatureExtractor(model) as fx:
        f = fx(x)
        assert not model.training
        expected = sum(c * (64 // int(s)) ** 2 for c, s in zip(fx._taps.channels, model.stride))
    assert f.shape == (2, expected)
    assert model.training and all(p.requires_grad for p in model.parameters())
    with FeatureExtractor(model, layer=4) as fx:
        g = fx(x.requires_grad_())
        g.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0  # differentiable in the input
    with pytest.raises(ValueError, match="Detect"):
        FeatureExtractor(model, layer=-1)


def test_seeded_detector_result_is_pinned():
    """A regression pin: a seeded pico detector, three seeded 64 px images, 40 Adam steps. The values
    were recorded from this code (torch 2.x CPU, one thread) before the module was split into
    stages; any change of the optimisation, the noise draws, the masks or the bookkeeping moves them.
    """
    cfg = yaml.safe_load((REPO / "models" / "yolov5p.yaml").read_text())
    cfg["nc"] = 2
    torch.manual_seed(0)
    model = DetectionModel(cfg)
    gen = torch.Generator().manual_seed(3)
    samples = [Sample(f"img{k}.png", torch.rand(3, 64, 64, generator=gen), np.array([[8.0, 16.0, 40.0, 44.0]]) + 4 * k,
                      np.array([k]), (0.0, 8.0, 64.0, 56.0)) for k in range(3)]
    s = EntropySettings(steps=40, samples=2, lr=0.2, cell=16, lam=0.05)
    r = analyze_model(model, samples, s, b=0.05, batch_size=2, seed=5, label="m")
    assert r.entropy[0][0].tolist() == pytest.approx([-0.8415154, -0.8168372, -0.8565525, -0.752864], abs=2e-5)
    assert r.entropy[2][3].tolist() == pytest.approx([-0.6352164, -0.7060877, -0.6670121, -0.6527978], abs=2e-5)
    assert r.change == pytest.approx([0.0227230787, 0.0234129149, 0.0226255339], rel=1e-4)
    assert [(c.n_fg, c.n_bg) for c in r.counts] == [(4, 4), (4, 2), (4, 2)]
    assert [c.h_bar for c in r.counts] == pytest.approx([-0.7667009234, -0.7268799782, -0.7330590487], abs=2e-5)
    assert r.summary["h_gap_mean"] == pytest.approx(0.0621240920, abs=2e-5)
    assert r.summary["ratio_mean"] == pytest.approx(0.6111111111)


# ----------------------------------------------------------------------------- bookkeeping
def test_count_concepts_hand_built_map():
    h = np.array([
        [1.0, 1.0, 1.0, 1.0],
        [1.0, 0.5, 0.7, 1.0],
        [1.0, 0.9, 0.2, 0.8],
        [9.0, 9.0, 9.0, 9.0],  # padding row: excluded
    ])
    fg = np.zeros((4, 4), bool)
    fg[1:3, 1:3] = True
    valid = np.ones((4, 4), bool)
    valid[3] = False
    cnt = count_concepts(h, fg, valid, b=0.2, baseline="bg")
    # background: 8 units (7 × 1.0 and one 0.8) → H̄ = 0.975; 0.8 is only 0.175 below it
    assert cnt.h_bar == pytest.approx(0.975)
    assert (cnt.n_fg, cnt.n_bg) == (3, 0)  # 0.5, 0.7, 0.2 are > 0.2 below H̄; 0.9 is not
    assert cnt.ratio == 1.0
    assert (cnt.n_fg_units, cnt.n_bg_units) == (4, 8)
    assert cnt.h_fg == pytest.approx(0.575) and cnt.h_bg == pytest.approx(0.975)
    assert not cnt.concepts[3].any()

    cnt_all = count_concepts(h, fg, valid, b=0.2, baseline="all")
    assert cnt_all.h_bar == pytest.approx((7.8 + 2.3) / 12)  # 0.842
    assert (cnt_all.n_fg, cnt_all.n_bg) == (2, 0)  # 0.5 and 0.2 only

    # A background concept lowers H̄ (0.8625) and the ratio; 0.7 is no longer a concept.
    h2 = h.copy()
    h2[0, 0] = 0.1
    cnt2 = count_concepts(h2, fg, valid, b=0.2)
    assert (cnt2.n_fg, cnt2.n_bg) == (2, 1) and cnt2.ratio == pytest.approx(2 / 3)

    flat = count_concepts(np.ones((3, 3)), np.zeros((3, 3), bool))
    assert (flat.n_fg, flat.n_bg) == (0, 0) and math.isnan(flat.ratio)

    summary = summarize([cnt, cnt2, flat])
    assert summary["n_fg_mean"] == pytest.approx(5 / 3)
    assert summary["n_fg_std"] == pytest.approx(np.std([3, 2, 0], ddof=1))
    assert summary["ratio_mean"] == pytest.approx(5 / 6) and summary["ratio_images"] == 2  # NaN ratio left out
    assert summary["h_gap_images"] == 2  # no foreground in `flat`


def test_box_cell_mask_edges():
    # Box edges on unit borders mark only the units inside; partial overlap marks the unit.
    m = box_cell_mask(np.array([[16, 16, 48, 32]]), (64, 64), 16)
    assert np.argwhere(m).tolist() == [[1, 1], [1, 2]]
    m = box_cell_mask(np.array([[15.5, 16, 33, 32]]), (64, 64), 16)
    assert np.argwhere(m).tolist() == [[1, 0], [1, 1], [1, 2]]
    # min_overlap: the sliver units (0.5 px of 16) no longer count.
    m = box_cell_mask(np.array([[15.5, 16, 33, 32]]), (64, 64), 16, min_overlap=0.25)
    assert np.argwhere(m).tolist() == [[1, 1]]
    # Partial edge units (W not a multiple of cell) and per-pixel units.
    assert box_cell_mask(np.array([[40, 0, 50, 5]]), (10, 50), 16).tolist() == [[False, False, True, True]]
    assert box_cell_mask(np.array([[1, 1, 3, 2]]), (4, 4), 1).sum() == 2
    assert not box_cell_mask(np.zeros((0, 4)), (64, 64), 16).any()


def test_concept_dynamics_bookkeeping():
    a = np.array([[True, False], [False, False]])
    b = np.array([[True, True], [False, False]])
    c = np.array([[False, True], [True, False]])
    # one image; epochs 1, 2, 3 (final = c)
    dyn = concept_dynamics([1, 2, 3], [[a], [b], [c]])
    assert dyn["final_fg_concepts"] == 2 and dyn["union_fg_concepts"] == 3
    assert dyn["stability"] == pytest.approx(2 / 3)
    assert dyn["retention"] == pytest.approx([0.0, 0.5, 1.0])
    assert dyn["discarded"] == pytest.approx([1.0, 0.5, 0.0])
    assert dyn["peak_mean"] == pytest.approx(2 / 3)  # N_fg first peaks (2) at epoch 2 of 3


def test_letterbox_box_to_cell_mapping(tmp_path):
    """A 100×200 image at imgsz 96: resized ×0.48 to 48×96, padded 24 px top and bottom; the box
    x 50-150, y 25-75 lands at x 24-72, y 36-60 → units rows 2-3, cols 1-4; rows 0 and 5 are padding."""
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), np.full((100, 200, 3), 128, np.uint8))
    (tmp_path / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (smp,) = load_samples(str(tmp_path / "images"), imgsz=96, n=1)
    assert tuple(smp.image.shape) == (3, 96, 96)
    assert np.allclose(smp.boxes, [[24, 36, 72, 60]], atol=1e-4)
    assert smp.content == pytest.approx((0, 24, 96, 72))
    fg, valid = smp.masks(16)
    assert np.argwhere(fg).tolist() == [[r, c] for r in (2, 3) for c in (1, 2, 3, 4)]
    assert valid.tolist() == [[r not in (0, 5)] * 6 for r in range(6)]


# --------------------------------------------------------------------------------- the CLI
def tiny_checkpoint(path: Path, seed: int) -> Path:
    cfg = yaml.safe_load((REPO / "models" / "yolov5n.yaml").read_text())
    cfg.update(width_multiple=0.125, depth_multiple=0.33, nc=len(NAMES))
    torch.manual_seed(seed)
    model = DetectionModel(cfg)
    ckpt = {
        "format": "yolo-kd/1", "yaml": model.yaml, "model": model.state_dict(), "ema": None,
        "names": list(NAMES), "stride": model.stride.tolist(), "epoch": 0, "best_fitness": 0.0, "updates": 0,
        "optimizer": None, "scaler": None, "adapters": None, "opt": {}, "hyp": {}, "rng": None,
        "date": "2024-01-01T00:00:00",
    }
    return save_checkpoint(ckpt, path)


def test_cli_end_to_end(tmp_path):
    generate_demo(tmp_path / "demo", seed=0, n_train=1, n_val=2, imgsz=64)
    data = tmp_path / "demo.yaml"
    data.write_text(yaml.safe_dump({"path": str(tmp_path / "demo"), "train": "images/train", "val": "images/val",
                                    "names": list(NAMES)}))
    w1 = tiny_checkpoint(tmp_path / "w" / "a.pt", seed=0)
    w2 = tiny_checkpoint(tmp_path / "w" / "b.pt", seed=1)
    epochs = tmp_path / "run" / "weights"
    epochs.mkdir(parents=True)
    shutil.copy(w1, epochs / "epoch1.pt")
    shutil.copy(w2, epochs / "epoch2.pt")
    common = ["--data", str(data), "--imgsz", "64", "--images", "2", "--steps", "2", "--samples", "1",
              "--device", "cpu", "--project", str(tmp_path / "runs"), "--name", "exp"]

    out = analyze_kd.main(["--weights", str(w1), str(w2), "--labels", "teacher", "student", *common,
                           "--epochs-dir", str(epochs)])
    save_dir = Path(out["save_dir"])
    assert save_dir == tmp_path / "runs" / "exp"
    table = (save_dir / "knowledge.md").read_text()
    assert "| teacher |" in table and "| student |" in table and "stability" in table
    report = json.loads((save_dir / "knowledge.json").read_text())
    assert [m["label"] for m in report["models"]] == ["teacher", "student"]
    assert len(report["images"]) == 2 and report["feature"].startswith("Detect inputs")
    for m in report["models"]:
        assert m["summary"]["images"] == 2 and len(m["per_image"]) == 2
        assert {"n_fg", "n_bg", "ratio", "h_bar", "change"} <= set(m["per_image"][0])
    dyn = report["dynamics"]
    assert dyn["epochs"] == [1, 2] and len(dyn["retention"]) == 2 and len(dyn["per_epoch"]) == 2
    maps = sorted((save_dir / "maps").glob("*.png"))
    assert len(maps) == 2 and all(p.stat().st_size > 0 for p in maps)
    assert (save_dir / "dynamics.png").is_file()
    with np.load(save_dir / "entropy.npz") as z:
        assert z["teacher"].shape == (2, 4, 4) and "dynamics_epoch2" in z.files  # 64 px / 16 px units

    # A named layer, per-pixel units, second run → exp2.
    out2 = analyze_kd.main(["--weights", str(w1), *common, "--layer", "4", "--cell", "8", "--noplots"])
    assert Path(out2["save_dir"]).name == "exp2"
    rep2 = json.loads((Path(out2["save_dir"]) / "knowledge.json").read_text())
    assert rep2["feature"].startswith("layer 4") and rep2["models"][0]["label"] == "a"
    assert not (Path(out2["save_dir"]) / "maps").exists()


def test_cli_errors(tmp_path):
    with pytest.raises(SystemExit, match="--labels gives 1 names for 2"):
        analyze_kd.main(["--weights", "a.pt", "b.pt", "--labels", "x", "--data", "d.yaml",
                         "--project", str(tmp_path)])
    with pytest.raises(SystemExit, match="--weights .*missing.pt not found"):
        analyze_kd.main(["--weights", str(tmp_path / "missing.pt"), "--data", "d.yaml", "--project", str(tmp_path)])
    with pytest.raises(SystemExit, match="--weights and/or --epochs-dir"):
        analyze_kd.main(["--data", "d.yaml", "--project", str(tmp_path)])
