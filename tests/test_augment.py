"""Augmentation geometry: letterbox, perspective, mosaic, HSV, mixup, and boxes matching pixels."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from utils.augment import (
    TILE_SIGNS,
    WarpParams,
    hsv_table,
    jitter_hsv,
    keep_visible,
    letterbox,
    mixup,
    mosaic4,
    paste,
    random_warp,
    resize_to,
    tile_origins,
    warp_boxes,
    warp_matrix,
)
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
        # odd spare: x.5; the factor as computed, not 213 / 100 (the side rounded from 213.3), as YOLOv5 scales labels
        ((100, 150), 320, {"auto": True}, (224, 320), (320 / 150, 320 / 150), (0, 5.5)),
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


def test_resize_to_picks_the_filter() -> None:
    im = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    assert resize_to(im, (40, 60)) is im  # unchanged size: no copy
    area = cv2.resize(im, (25, 17), interpolation=cv2.INTER_AREA)
    linear = cv2.resize(im, (25, 17), interpolation=cv2.INTER_LINEAR)
    assert not np.array_equal(area, linear)  # the two filters really differ on this image
    assert np.array_equal(resize_to(im, (17, 25)), area)  # shrinking: area averaging
    assert np.array_equal(resize_to(im, (17, 25), fast=True), linear)  # augmented: bilinear
    assert np.array_equal(resize_to(im, (80, 120)), cv2.resize(im, (120, 80), interpolation=cv2.INTER_LINEAR))


def test_keep_visible_limiting_cases() -> None:
    def kept(clipped, expected_area):
        return bool(keep_visible(np.array([clipped], float), np.array([expected_area], float))[0])

    assert kept([0, 0, 10, 10], 100)
    assert not kept([0, 0, 2, 10], 20)  # a side of exactly min_side (2 px) is too small
    assert kept([0, 0, 2.01, 10], 20.1)
    assert not kept([0, 0, 100, 10], 10_000)  # exactly 10 % of the expected area: dropped
    assert kept([0, 0, 100, 10.01], 10_000)
    assert not kept([0, 0, 300, 3], 900)  # aspect exactly 100: dropped
    assert kept([0, 0, 299, 3], 897)
    assert not kept([5, 5, 5, 5], 0)  # degenerate (zero-size) box
    assert not kept([0, 0, 0, 10], 150)  # wholly outside: clipped to zero width
    assert keep_visible(np.zeros((0, 4)), np.zeros(0)).shape == (0,)


def test_area_gain() -> None:
    assert WarpParams().area_gain == 1.0
    assert WarpParams(zoom=1.5, angle=33).area_gain == pytest.approx(2.25)  # rotation keeps areas
    # determinant of the shear [[1, tan 20°], [tan 10°, 1]]
    assert WarpParams(shear=(20, 10)).area_gain == pytest.approx(1 - np.tan(np.radians(20)) * np.tan(np.radians(10)))
    # measured: a warped square's area over the original, against the gain (affine: exact)
    p = WarpParams(angle=25, zoom=0.8, shear=(7, -4))
    m = warp_matrix(p, (100, 100), (100, 100))
    square = np.array([[40, 40], [60, 40], [60, 60], [40, 60]], float).reshape(-1, 1, 2)
    moved = cv2.perspectiveTransform(square, m).reshape(-1, 2)
    assert cv2.contourArea(moved.astype(np.float32)) / 400 == pytest.approx(p.area_gain, rel=1e-5)


def test_warp_matrix_hand_worked_points() -> None:
    def move(p: WarpParams, xy, src=(10, 20), dst=(10, 20)):
        x, y, w = warp_matrix(p, src, dst) @ [xy[0], xy[1], 1.0]
        return x / w, y / w

    # 10×20 (h×w) image, centre (10, 5). Identity about the centre:
    assert np.allclose(warp_matrix(WarpParams(), (10, 20), (10, 20)), np.eye(3))
    # 90° counter-clockwise on screen with zoom 2: one pixel right of the centre goes two pixels up.
    assert np.allclose(move(WarpParams(angle=90, zoom=2), (11, 5)), (10, 3))
    # The centre lands at anchor × output size: (0.25·60, 0.75·40).
    assert np.allclose(move(WarpParams(anchor=(0.25, 0.75)), (10, 5), dst=(40, 60)), (15, 30))
    # x-shear of 45°: x' = x + y about the centre.
    assert np.allclose(move(WarpParams(shear=(45, 0)), (10, 6)), (11, 6))
    # Shear acts after the rotation: (1, 0) → rotated (0, −1) → sheared (−1, −1).
    assert np.allclose(move(WarpParams(angle=90, shear=(45, 0)), (11, 5)), (9, 4))
    # Tilt divides by w = 1 + px·x about the centre; the centre itself stays put.
    assert np.allclose(move(WarpParams(tilt=(0.01, 0)), (20, 5)), (10 + 10 / 1.1, 5))
    assert np.allclose(move(WarpParams(tilt=(0.01, 0.02)), (10, 5)), (10, 5))
    assert np.allclose(warp_matrix(WarpParams(angle=30, zoom=1.3, shear=(5, -3)), (10, 20), (40, 50))[2], [0, 0, 1])


def test_warp_params_sample_the_hyp_ranges() -> None:
    rng = np.random.default_rng(0)
    draws = [WarpParams.sample(rng, degrees=10, translate=0.1, scale=0.5, shear=2, perspective=0.001)
             for _ in range(4000)]
    cols = {
        "angle": ([d.angle for d in draws], -10, 10),
        "zoom": ([d.zoom for d in draws], 0.5, 1.5),
        "shear": ([v for d in draws for v in d.shear], -2, 2),
        "tilt": ([v for d in draws for v in d.tilt], -0.001, 0.001),
        "anchor": ([v for d in draws for v in d.anchor], 0.4, 0.6),
    }
    for name, (v, lo, hi) in cols.items():
        v = np.asarray(v)
        width = hi - lo
        assert lo <= v.min() < lo + 0.01 * width and hi - 0.01 * width < v.max() <= hi, name
        assert abs(np.mean(v) - (lo + hi) / 2) < 0.02 * width, name  # uniform: centred
        assert abs(np.std(v) - width / np.sqrt(12)) < 0.02 * width, name  # uniform: its spread
    zero = WarpParams.sample(rng)
    assert zero == WarpParams()  # all ranges zero: the identity draw


def test_warp_boxes_hand_worked() -> None:
    box = np.array([[8.0, 4.0, 12.0, 6.0]])  # 4×2 box around the centre (10, 5) of a 10×20 image
    m = warp_matrix(WarpParams(angle=90), (10, 20), (10, 20))
    assert np.allclose(warp_boxes(box, m), [[9, 3, 11, 7]])  # turned a quarter: 2×4
    m = warp_matrix(WarpParams(angle=45), (10, 20), (10, 20))
    half = 3 / np.sqrt(2)  # the corner (±2, ±1) turned 45° reaches |x|, |y| ≤ 3/√2
    assert np.allclose(warp_boxes(box, m), [[10 - half, 5 - half, 10 + half, 5 + half]])
    assert warp_boxes(np.zeros((0, 4)), m).shape == (0, 4)


def test_random_warp_identity_and_filtering() -> None:
    rng = np.random.default_rng(0)
    im = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    t = np.array([[1, 5, 5, 20, 30]], np.float32)
    out, t2 = random_warp(im.copy(), t.copy(), rng)
    assert np.array_equal(out, im) and np.allclose(t2, t)
    # a smaller output keeps the centre: the 60-wide image is cropped to its middle 20 columns
    t = np.array([[0, 1, 1, 6, 6], [1, 30, 10, 55, 35]], np.float32)
    out, t2 = random_warp(im, t, rng, out_hw=(40, 20))
    assert out.shape == (40, 20, 3) and np.array_equal(out, im[:, 20:40])
    # box 0 is wholly outside (dropped); box 1 is cut to x in [10, 20] of its 25 columns (kept)
    assert t2.tolist() == [[1, 10, 10, 20, 35]]


def test_random_warp_keeps_boxes_on_their_pixels() -> None:
    im = np.full((100, 140, 3), 60, np.uint8)
    im[30:50, 40:90] = MAGENTA
    t = np.array([[3, 40, 30, 90, 50]], np.float32)
    tight = 0
    for seed in range(8):
        out, t2 = random_warp(im, t, np.random.default_rng(seed), out_hw=(90, 120), degrees=20, translate=0.1,
                              scale=0.3, shear=3, perspective=0.0005)
        ys, xs = np.nonzero(magenta_mask(out))
        blob = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        assert len(t2) == 1 and t2[0, 0] == 3
        # the enclosure of the warped corners is the warped rectangle's (bilinear edges: ±1.5 px)
        assert (np.abs(t2[0, 1:] - blob) <= 1.5).all() or blob.min() == 0 or blob[2] == 120 or blob[3] == 90
        tight += bool((np.abs(t2[0, 1:] - blob) <= 1.5).all())
    assert tight >= 4


def test_tile_origins_meet_at_the_centre() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        centre = rng.integers(20, 60, 2)
        wh = rng.integers(5, 40, (4, 2))
        origins = tile_origins(tuple(centre), [tuple(v) for v in wh])
        rects = np.concatenate((origins, origins + wh), axis=1)  # x1 y1 x2 y2
        for (x1, y1, x2, y2), (sx, sy) in zip(rects, TILE_SIGNS):
            # the corner nearest the centre is the centre; the tile lies on its own side
            assert (x1 if sx > 0 else x2) == centre[0] and (y1 if sy > 0 else y2) == centre[1]
        # four tiles around one point never overlap: the painted area is the sum of the areas
        paint = np.zeros((200, 200), int)
        for x1, y1, x2, y2 in rects + 100:
            paint[y1:y2, x1:x2] += 1
        assert paint.max() == 1 and paint.sum() == (wh[:, 0] * wh[:, 1]).sum()
    # centre in the middle of a 2s canvas with four s×s tiles: the canvas is exactly covered
    s = 16
    rects = [(x, y, x + s, y + s) for x, y in tile_origins((s, s), [(s, s)] * 4)]
    cover = np.zeros((2 * s, 2 * s), int)
    for x1, y1, x2, y2 in rects:
        cover[y1:y2, x1:x2] += 1
    assert (cover == 1).all()


def test_paste_cuts_what_falls_outside() -> None:
    im = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    for origin in [(0, 0), (-3, 2), (5, -4), (7, 9), (-8, 0), (20, 20)]:
        canvas = np.zeros((10, 12, 3), np.uint8)
        paste(canvas, im, origin)
        big = np.zeros((60, 60, 3), np.uint8)  # reference: paste on a larger canvas, then crop
        big[25 + origin[1]:31 + origin[1], 25 + origin[0]:33 + origin[0]] = im
        assert np.array_equal(canvas, big[25:35, 25:37]), origin


def test_mosaic4_places_each_image_and_label() -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), MAGENTA]
    items = []
    for c in colours:
        im = np.full((40, 32, 3), 50, np.uint8)
        im[10:30, 8:24] = c  # box xc=16/32, yc=20/40, w=16/32, h=20/40
        items.append((im, np.array([[len(items), 0.5, 0.5, 0.5, 0.5]], np.float32)))
    for seed in range(6):
        canvas, labels = mosaic4(items, 40, np.random.default_rng(seed))
        assert canvas.shape == (80, 80, 3)
        for cls, x1, y1, x2, y2 in labels:
            c = np.array(colours[int(cls)], np.uint8)
            ys, xs = np.nonzero((canvas == c).all(-1))
            # the box is its rectangle, cut by the canvas edge where the tile is
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
        assert 1 <= len(labels) <= 4


def test_mosaic4_reuses_a_buffer_and_fills_the_rest_grey() -> None:
    rng = np.random.default_rng(0)
    items = [(rng.integers(0, 100, (h, w, 3), dtype=np.uint8), np.zeros((0, 5), np.float32))
             for h, w in [(40, 25), (18, 40), (40, 40), (30, 40)]]
    fresh, _ = mosaic4(items, 40, np.random.default_rng(2))
    buffer = np.zeros((80, 80, 3), np.uint8)
    reused, labels = mosaic4(items, 40, np.random.default_rng(2), out=buffer)
    assert reused is buffer and np.array_equal(reused, fresh) and labels.shape == (0, 5)
    # every pixel is one tile's pixel or the pad grey (tile pixels are < 100)
    tiles = (fresh < 100).all(-1)
    assert ((fresh == 114).all(-1) | tiles).all()
    assert tiles.sum() <= sum(im.shape[0] * im.shape[1] for im, _ in items)


def test_hsv_table() -> None:
    unit = hsv_table((1, 1, 1))[0]
    assert (unit[:180, 0] == np.arange(180)).all()  # OpenCV's 8-bit hue only takes 0..179
    assert (unit[:, 1] == np.arange(256)).all() and (unit[:, 2] == np.arange(256)).all()
    t = hsv_table((2.0, 2.0, 0.5))[0]
    assert t.shape == (256, 3) and t.dtype == np.uint8
    assert t[100, 0] == 20 and t[89, 0] == 178  # hue wraps around OpenCV's 180
    assert t[100, 1] == 200 and t[200, 1] == 255  # saturation saturates
    assert t[255, 2] == 127  # value halves (truncated)


def test_jitter_hsv() -> None:
    im = np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    assert np.array_equal(jitter_hsv(im.copy(), 0, 0, 0), im)  # zero gains: no-op
    a = jitter_hsv(im.copy(), 0.5, 0.7, 0.4, rng=np.random.default_rng(5))
    b = jitter_hsv(im.copy(), 0.5, 0.7, 0.4, rng=np.random.default_rng(5))
    assert a.dtype == np.uint8 and np.array_equal(a, b) and not np.array_equal(a, im)
    # value only: a grey picture stays grey, its level scaled by a gain within 1 ± 0.4
    grey = np.full((4, 4, 3), 100, np.uint8)
    levels = [jitter_hsv(grey.copy(), 0, 0, 0.4, rng=np.random.default_rng(k)) for k in range(50)]
    assert all((x == x[0, 0, 0]).all() for x in levels)
    v = np.array([x[0, 0, 0] for x in levels])
    assert 60 <= v.min() < 70 and 130 < v.max() <= 140


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
        img, labels, *_ = ds[0]  # image 0 is always one of the four tiles
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


def test_mosaic_puts_the_items_own_image_in_any_tile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """YOLOv5 shuffles the item's image among the four; always up-left would bias where objects land."""
    import utils.dataset as dataset_module

    tiles: list[list[np.ndarray]] = []
    real = dataset_module.mosaic4
    monkeypatch.setattr(dataset_module, "mosaic4", lambda items, *a, **k: (tiles.append([lb for _, lb in items]),
                                                                          real(items, *a, **k))[1])
    hyp = {"hsv_h": 0, "hsv_s": 0, "hsv_v": 0, "degrees": 0.0, "translate": 0.0, "scale": 0.0, "shear": 0.0,
           "flipud": 0.0, "fliplr": 0.0, "mosaic": 1.0, "mixup": 0.0}
    ds = YoloDataset(_rect_dataset(tmp_path), imgsz=64, augment=True, hyp=hyp, seed=0)
    for epoch in range(200):
        ds.set_epoch(epoch)
        ds[3]
    own = [[lb is ds.labels[3] for lb in t] for t in tiles]
    assert len(own) == 200 and all(any(o) for o in own)
    counts = np.sum(own, 0)  # per tile, how often image 3 was there (the other three picks may hit it too)
    assert counts.min() >= 35, counts


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
