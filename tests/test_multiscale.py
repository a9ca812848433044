"""--multi-scale: the per-batch size draw, the batch resize, and a training run that uses them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import engine.trainer as trainer
from tests.conftest import train_args
from train_distill import parse_options
from utils.multiscale import draw_long_side, resize_batch


def test_sizes_cover_half_to_one_and_a_half_imgsz_in_stride_steps() -> None:
    sides = [draw_long_side(640, 32, seed=0, batch_index=i) for i in range(2000)]
    assert all(s % 32 == 0 for s in sides)
    assert min(sides) == 320 and max(sides) == 960  # int(640·0.5) … int(640·1.5) + 32 - 1, floored to 32
    assert len(set(sides)) == (960 - 320) // 32 + 1  # every step between is drawn
    assert abs(sum(sides) / len(sides) - 640) < 15  # centred on --imgsz
    # a pure function of (seed, batch, rank): resume draws the same; other seeds/ranks differ
    assert sides[:50] == [draw_long_side(640, 32, 0, i) for i in range(50)]
    assert sides[:50] != [draw_long_side(640, 32, 1, i) for i in range(50)]
    assert sides[:50] != [draw_long_side(640, 32, 0, i, rank=1) for i in range(50)]
    assert min(draw_long_side(40, 32, 0, i) for i in range(200)) == 32  # never below one stride


def test_resize_batch_keeps_the_aspect_on_stride_multiples_and_the_layout() -> None:
    x = torch.rand(2, 3, 64, 96).contiguous(memory_format=torch.channels_last)
    y = resize_batch(x, 192, 32)
    assert y.shape == (2, 3, 128, 192) and y.is_contiguous(memory_format=torch.channels_last)
    assert resize_batch(x, 96, 32) is x  # already that size: untouched
    assert resize_batch(x, 64, 32).shape == (2, 3, 64, 64)  # 64·(64/96) = 42.7 → rounded up to 64
    flat = torch.full((1, 3, 32, 32), 0.25)
    assert torch.allclose(resize_batch(flat, 96, 32), torch.full((1, 3, 96, 96), 0.25))  # bilinear: no new values
    with pytest.raises(TypeError, match="floating-point"):
        resize_batch(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 64, 32)


@pytest.mark.parametrize("distil", [False, True])
def test_training_with_multi_scale_feeds_batches_of_several_sizes(
        tiny_data: Path, tmp_path: Path, wide_teacher: Path, distil: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, ...]] = []
    real = trainer.train_step

    def spy(run, imgs, targets, *a, **k):
        seen.append(tuple(imgs.shape[-2:]))
        return real(run, imgs, targets, *a, **k)

    monkeypatch.setattr(trainer, "train_step", spy)
    teacher = ["--t_weights", str(wide_teacher), "--d_feature", "pkd"] if distil else []  # sees the same sizes
    opt = parse_options(train_args(tiny_data, tmp_path, "ms", 2, "--multi-scale", "--noval", *teacher))
    summary = trainer.fit(opt)
    assert len(seen) == 8 and len(set(seen)) > 1, seen  # 32 images / batch 8 × 2 epochs
    assert all(h % 32 == 0 and w % 32 == 0 and 32 <= max(h, w) <= 160 for h, w in seen), seen  # 175 // 32 · 32
    assert summary["student"]["map"] >= 0.0  # the final validation ran at --imgsz
