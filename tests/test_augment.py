"""Augmentation geometry: letterbox, perspective, mosaic, HSV, mixup, and boxes matching pixels."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.augment import augment_hsv, box_candidates, letterbox, mixup, mosaic4, random_perspective
from utils.boxes import xywhn2xyxy
from utils.dataset import YoloDataset

MAGENTA = (255, 0, 255)  # BGR; appears nowhere else in the test images


def magenta_mask(img_bgr: np.ndarray) -> np.ndarray:
    b, g, r = (img_bgr[..., i].astype(int) for i in range(3))
    return (r > 170) & (b > 170) & (g < 90)


@pytest.mark.parametrize(
    ("hw", "new", "kw", "out_hw", "ratio", "pad"),
    [
        ((100, 200), 320, {}, (320, 320), (1.6, 1.6), (0, 80)),
        ((100, 150), 320, {"auto": True}, (224, 320), (320 / 150, 213 / 100), (0, 5)),
        ((100, 200), 640, {"scaleup": False}, (640, 640), (1.0, 1.0), (220, 270)),
        ((100, 200), (160, 320), {}, (160, 320), (1.6, 1.6), (0, 0)),
        ((100, 200), 128, {"scale_fill": True}, (128, 128), (0.64, 1.28), (0, 0)),
    ],
)
def test_letterbox_geometry(hw, new, kw, out_hw, ratio, pad) -> None:
    im = np.zeros((*hw, 3), np.uint8)
    im[40:60, 90:110] = 255  # a white square centred at (100, 50)
    out, r, p = letterbox(im, new, **kw)
    assert out.shape[:2] == out_hw and p == pad
    assert r == pytest.approx(ratio, abs=1e-6)
    ys, xs = np.nonzero(out[..., 0] > 127)
    # the square's centre lands where the returned ratio/pad say it does
    assert xs.mean() + 0.5 == pytest.approx(100 * r[0] + p[0], abs=1.0)
    assert ys.mean() + 0.5 == pytest.approx(50 * r[1] + p[1], abs=1.0)
    if not kw.get("scale_fill") and out_hw[0] > hw[0] * r[1]:
        assert (out[0, :, 0] == 114).all()  # padding uses the YOLOv5 grey


def test_box_candidates_rule() -> None:
    before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 300, 2.5]], float).T
    after = np.array([[0, 0, 10, 10], [0, 0, 2, 10], [0, 0, 10, 0.9], [0, 0, 300, 2.5]], float).T
    # kept; too narrow (w ≤ 2 px); area ratio < 0.1; aspect ratio > 100
    assert box_candidates(before, after).tolist() == [True, False, False, False]


def test_random_perspective_identity_and_filtering() -> None:
    rng = np.random.default_rng(0)
    im = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    t = np.array([[1, 5, 5, 20, 30]], np.float32)
    out, t2 = random_perspective(im.copy(), t.copy(), 0, 0, 0, 0, 0, rng=rng)
    assert np.array_equal(out, im) and np.allclose(t2, t)
    # a pure shift pushing one box out of the picture removes it
    t = np.array([[0, 1, 1, 6, 6], [1, 30, 10, 55, 35]], np.float32)
    out, t2 = random_perspective(im, t, translate=0.0, scale=0.0, border=(0, -20), rng=rng)
    assert out.shape == (40, 20, 3)  # border shrinks the output
    assert len(t2) <= 2 and (t2[:, [1, 3]] <= 20).all() and (t2[:, [1, 2, 3, 4]] >= 0).all()


def test_mosaic4_places_each_image_and_label() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), MAGENTA]
    items = []
    for c in colours:
        im = np.full((40, 32, 3), 50, np.uint8)
        im[10:30, 8:24] = c  # box xc=16/32, yc=20/40, w=16/32, h=20/40
        items.append((im, np.array([[len(items), 0.5, 0.5, 0.5, 0.5]], np.float32)))
    canvas, labels = mosaic4(items, 40, np.random.default_rng(1))
    assert canvas.shape == (80, 80, 3) and len(labels) == 4
    for cls, x1, y1, x2, y2 in labels:
        c = np.array(colours[int(cls)], np.uint8)
        ys, xs = np.nonzero((canvas == c).all(-1))
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)


def test_augment_hsv() -> None:
    im = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(augment_hsv(im.copy(), 0, 0, 0), im)  # zero gains: no-op
    a = augment_hsv(im.copy(), 0.5, 0.7, 0.4, rng=np.random.default_rng(5))
    b = augment_hsv(im.copy(), 0.5, 0.7, 0.4, rng=np.random.default_rng(5))
    assert a.dtype == np.uint8 and np.array_equal(a, b) and not np.array_equal(a, im)


def test_mixup_blends_and_concatenates() -> None:
    a, b = np.full((8, 8, 3), 200, np.uint8), np.full((8, 8, 3), 100, np.uint8)
    out, lb = mixup(a, np.ones((2, 5)), b, np.zeros((1, 5)), rng=np.random.default_rng(0))
    assert out.shape == a.shape and 125 < out.mean() < 175 and lb.shape == (3, 5)


def _rect_dataset(tmp_path: Path) -> Path:
    """Six 96×128 images; image 0 holds one magenta rectangle (class 1), the others a green one."""
    d = tmp_path / "images" / "train"
    (tmp_path / "labels" / "train").mkdir(parents=True)
    d.mkdir(parents=True)
    for i in range(6):
        im = np.full((96, 128, 3), (70, 80, 90), np.uint8)
        x1, y1, x2, y2 = 20 + 10 * i, 15 + 5 * i, 70 + 5 * i, 60 + 4 * i
        im[y1:y2, x1:x2] = MAGENTA if i == 0 else (40, 160, 40)
        cv2.imwrite(str(d / f"{i}.png"), im)
        xc, yc, w, h = (x1 + x2) / 2 / 128, (y1 + y2) / 2 / 96, (x2 - x1) / 128, (y2 - y1) / 96
        (tmp_path / "labels" / "train" / f"{i}.txt").write_text(f"{int(i == 0)} {xc} {yc} {w} {h}\n")
    return d


def test_boxes_follow_pixels_through_mosaic_perspective_flip(tmp_path: Path) -> None:
    hyp = {"hsv_h": 0, "hsv_s": 0, "hsv_v": 0, "degrees": 10.0, "translate": 0.1, "scale": 0.5, "shear": 2.0,
           "flipud": 0.5, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0}
    ds = YoloDataset(_rect_dataset(tmp_path), imgsz=128, augment=True, hyp=hyp, seed=0)
    checked = 0
    for epoch in range(40):
        ds.set_epoch(epoch)  # a new augmentation draw for the same item
        img, labels, *_ = ds[0]  # index 0 is always the first mosaic tile
        bgr = np.ascontiguousarray(img.numpy().transpose(1, 2, 0)[..., ::-1])
        mask = magenta_mask(bgr)
        boxes = xywhn2xyxy(labels[labels[:, 1] == 1, 2:].numpy(), 128, 128)
        n, comp, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8))
        blobs = [s for s in stats[1:] if s[cv2.CC_STAT_AREA] > 30]
        for x1, y1, x2, y2 in boxes:
            # Each box covers a visible magenta blob (±2 px); it is tight when the blob is not cut by
            # the image border (a cut rotated shape keeps the enclosing box of its warped corners).
            def fits(s, x1=x1, y1=y1, x2=x2, y2=y2):
                bx1, by1, bx2, by2 = s[0], s[1], s[0] + s[2], s[1] + s[3]
                covers = x1 <= bx1 + 2 and y1 <= by1 + 2 and x2 >= bx2 - 2 and y2 >= by2 - 2
                cut = bx1 == 0 or by1 == 0 or bx2 == 128 or by2 == 128
                tight = max(abs(x1 - bx1), abs(y1 - by1), abs(x2 - bx2), abs(y2 - by2)) <= 2
                return covers and (tight or cut)

            assert any(fits(s) for s in blobs), (boxes, blobs)
            checked += 1
        for s in blobs:  # every sizeable magenta blob has its box
            if s[cv2.CC_STAT_AREA] > 150:
                assert any(b[0] <= s[0] + 2 and b[1] <= s[1] + 2 for b in boxes), (boxes, blobs)
    assert checked >= 20  # the loop really exercised the geometry


def test_boxes_follow_pixels_without_mosaic(tmp_path: Path) -> None:
    hyp = {"hsv_h": 0, "hsv_s": 0, "hsv_v": 0, "degrees": 15.0, "translate": 0.1, "scale": 0.3, "shear": 0.0,
           "perspective": 0.0005, "flipud": 0.5, "fliplr": 0.5, "mosaic": 0.0}
    ds = YoloDataset(_rect_dataset(tmp_path), imgsz=128, augment=True, hyp=hyp, seed=1)
    for _ in range(10):
        img, labels, *_ = ds[0]
        bgr = np.ascontiguousarray(img.numpy().transpose(1, 2, 0)[..., ::-1])
        ys, xs = np.nonzero(magenta_mask(bgr))
        (box,) = xywhn2xyxy(labels[:, 2:].numpy(), 128, 128)
        assert np.allclose(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], atol=2.0)


def test_dataset_augmentation_is_seeded(tmp_path: Path) -> None:
    d = _rect_dataset(tmp_path)
    a = YoloDataset(d, imgsz=64, augment=True, hyp={"mixup": 0.5}, seed=7)
    b = YoloDataset(d, imgsz=64, augment=True, hyp={"mixup": 0.5}, seed=7)
    for i in range(4):
        ia, la, *_ = a[i]
        ib, lb, *_ = b[i]
        assert np.array_equal(ia.numpy(), ib.numpy()) and np.array_equal(la.numpy(), lb.numpy())
