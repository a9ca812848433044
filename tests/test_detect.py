"""detect.py: annotated output, YOLO txt rows matching PyTorch predictions, .pt vs .onnx, videos."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import detect
import export
from engine import predict, sources
from models import load_model
from models.backends import TorchBackend, load_backend
from tests.test_export import NAMES, make_tiny_checkpoint
from utils.augment import letterbox
from utils.boxes import non_max_suppression, scale_boxes, xyxy2xywhn

CONF = 0.25  # the tiny test model gives some dozens of boxes above this
IMGSZ = 160


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two generated pictures of different aspect ratios (PNG: lossless, so reads are exact)."""
    d = tmp_path_factory.mktemp("images")
    cv2.imwrite(str(d / "wide.png"), export.synthetic_image((200, 300), seed=1))
    cv2.imwrite(str(d / "tall.png"), export.synthetic_image((250, 140), seed=2))
    return d


def _reference(weights: Path, image: Path) -> np.ndarray:
    """PyTorch predictions for one image, following the documented pipeline step by step."""
    im0 = cv2.imread(str(image))
    im, _, _ = letterbox(im0, IMGSZ, auto=True, stride=32)
    x = torch.from_numpy(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1))).float()[None] / 255
    model = load_model(str(weights)).fuse()  # as detect.py runs it
    with torch.no_grad():
        det = non_max_suppression(model(x), CONF, 0.45, max_det=1000)[0]
    det[:, :4] = scale_boxes(im.shape[:2], det[:, :4], im0.shape[:2]).round()  # YOLOv5's detect.py mapping
    return det.numpy()


def _read_rows(path: Path) -> np.ndarray:
    return np.array([[float(v) for v in line.split()] for line in path.read_text().splitlines()])


def _assert_same_rows(got: np.ndarray, want: np.ndarray, atol: float) -> None:
    """Same multiset of rows (class first, exact) up to ``atol``; order-free, since detections with
    near-equal scores may come out of NMS in either order."""
    assert got.shape == want.shape
    for row in want:
        close = (got[:, 0] == row[0]) & (np.abs(got[:, 1:] - row[1:]).max(1) <= atol)
        assert close.any(), f"no detection matches {row}"


def test_image_folder_writes_annotations_and_labels(tiny_pt: Path, images: Path, tmp_path: Path) -> None:
    res = detect.run(tiny_pt, images, imgsz=IMGSZ, conf_thres=CONF, device="cpu", save_txt=True,
                     save_conf=True, project=tmp_path / "runs", name="exp", verbose=False)
    assert res.save_dir == tmp_path / "runs" / "exp"
    assert len(res.results) == 2
    for src in ("wide.png", "tall.png"):
        original = cv2.imread(str(images / src))
        annotated = cv2.imread(str(res.save_dir / src))
        assert annotated is not None and annotated.shape == original.shape
        ref = _reference(tiny_pt, images / src)
        assert len(ref) > 0, "the test model should produce detections"
        assert not np.array_equal(annotated, original)  # boxes were drawn

        rows = _read_rows(res.save_dir / "labels" / f"{Path(src).stem}.txt")
        h, w = original.shape[:2]
        want = np.concatenate((ref[:, 5:6], xyxy2xywhn(ref[:, :4].astype(np.float64), w, h), ref[:, 4:5]), 1)
        _assert_same_rows(rows, want, atol=1e-6)  # 6 significant digits
        assert ((rows[:, 1:5] >= 0) & (rows[:, 1:5] <= 1)).all()


def test_pt_and_onnx_give_the_same_boxes(tiny_pt: Path, images: Path, tmp_path: Path) -> None:
    onnx_path, _ = export.run(tiny_pt, imgsz=IMGSZ, dynamic=True, output=tmp_path / "tiny.onnx")
    kw = dict(imgsz=IMGSZ, conf_thres=CONF, device="cpu", project=tmp_path / "runs", nosave=True, verbose=False)
    a = detect.run(tiny_pt, images, name="pt", **kw)
    b = detect.run(onnx_path, images, name="onnx", **kw)
    assert len(a.results) == len(b.results) == 2
    for (pa, _, da), (pb, _, db) in zip(a.results, b.results):
        assert pa == pb and len(da) > 0
        # pixels: onnxruntime and PyTorch differ by ~1e-4 px; scores by ~1e-6
        _assert_same_rows(np.c_[da[:, 5], da[:, :5]], np.c_[db[:, 5], db[:, :5]], atol=1e-2)

def test_static_onnx_uses_its_fixed_input(tiny_pt: Path, images: Path, tmp_path: Path) -> None:
    onnx_path, _ = export.run(tiny_pt, imgsz=[128, 160], output=tmp_path / "static.onnx")
    backend = load_backend(onnx_path, torch.device("cpu"))
    assert backend.fixed_shape == (128, 160) and backend.names == NAMES and backend.stride == 32
    res = detect.run(onnx_path, str(images / "*.png"), conf_thres=CONF, device="cpu", save_txt=True,
                     project=tmp_path / "runs", verbose=False)
    assert len(res.results) == 2 and (res.save_dir / "wide.png").is_file()
    txts = sorted((res.save_dir / "labels").glob("*.txt"))
    assert len(txts) == sum(len(d) > 0 for _, _, d in res.results) > 0
    for txt in txts:
        for line in txt.read_text().splitlines():
            assert len(line.split()) == 5  # no --save-conf


def test_onnx_backend_with_a_larger_static_batch(tiny_pt: Path, tmp_path: Path) -> None:
    onnx_path, _ = export.run(tiny_pt, imgsz=64, batch_size=2, output=tmp_path / "b2.onnx")
    backend = load_backend(onnx_path, torch.device("cpu"))
    x = torch.from_numpy(export.preprocess(export.synthetic_image((64, 64), seed=3), (64, 64)))
    y = backend(x)  # one image into a batch-2 graph
    assert y.shape == (1, 3 * (8 * 8 + 4 * 4 + 2 * 2), 5 + len(NAMES))
    ref = TorchBackend(tiny_pt, torch.device("cpu"))(x)
    assert export.parity(ref.numpy(), y.numpy(), (64, 64))["max"] < 1e-3


def test_video_source(tiny_pt: Path, tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (128, 96))
    if not writer.isOpened():
        pytest.skip("OpenCV cannot write mp4v videos here")
    for i in range(4):
        writer.write(export.synthetic_image((96, 128), seed=i))
    writer.release()
    res = detect.run(tiny_pt, video, imgsz=128, conf_thres=CONF, device="cpu", save_txt=True,
                     project=tmp_path / "runs", verbose=False)
    assert [f for _, f, _ in res.results] == [1, 2, 3, 4]  # YOLOv5 numbers a video's frames from 1
    cap = cv2.VideoCapture(str(res.save_dir / "clip.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 4
    cap.release()
    labelled = {p.name for p in (res.save_dir / "labels").glob("*.txt")}
    with_boxes = {f"clip_{f}.txt" for _, f, d in res.results if len(d)}
    assert labelled == with_boxes
    strided = detect.run(tiny_pt, video, imgsz=128, conf_thres=CONF, device="cpu", vid_stride=3, nosave=True,
                         save_crop=True, project=tmp_path / "runs", verbose=False)
    crops = sorted(p.stem for p in (strided.save_dir / "crops").rglob("*.jpg"))
    n_boxes = sum(len(d) for _, _, d in strided.results)
    # YOLOv5's names: a video's frames share its stem, numbered on from the first free name
    assert len(crops) == n_boxes and all(c == "clip" or c[4:].isdecimal() for c in crops), crops
    with pytest.raises(ValueError, match="--vid-stride 0"):
        detect.run(tiny_pt, video, imgsz=128, device="cpu", vid_stride=0, nosave=True, project=tmp_path / "runs",
                   verbose=False)
    # --vid-stride 3, as YOLOv5 (measured): the last frame of each full group of 3 (0-based frame 2 of 4),
    # numbered 1; the incomplete last group is dropped
    assert [f for _, f, _ in strided.results] == [1]
    np.testing.assert_array_equal(res.results[2][2], strided.results[0][2])  # the same picture was read
    two = detect.run(tiny_pt, video, imgsz=128, conf_thres=0.0, device="cpu", vid_stride=2, nosave=True,
                     save_txt=True, project=tmp_path / "runs", verbose=False)
    assert [f for _, f, _ in two.results] == [1, 2]  # frames 1 and 3 (0-based), files clip_1, clip_2
    assert sorted(p.name for p in (two.save_dir / "labels").glob("*.txt")) == ["clip_1.txt", "clip_2.txt"]
    for (_, _, every), (_, _, second) in zip((res.results[1], res.results[3]), two.results):
        np.testing.assert_array_equal(every[every[:, 4] >= CONF], second[second[:, 4] >= CONF])


def test_crops_and_tag_options(tiny_pt: Path, images: Path, tmp_path: Path) -> None:
    res = detect.run(tiny_pt, images, imgsz=IMGSZ, conf_thres=CONF, device="cpu", save_crop=True, nosave=True,
                     project=tmp_path / "runs", verbose=False)
    crops = sorted((res.save_dir / "crops").rglob("*.jpg"))
    assert len(crops) == sum(len(d) for _, _, d in res.results) > 1  # one file per detection, none overwritten
    path, _, det = next(r for r in res.results if len(r[2]))
    x1, y1, x2, y2 = det[0, :4]
    folder = res.save_dir / "crops" / NAMES[int(det[0, 5])]
    sizes = {cv2.imread(str(f)).shape[:2] for f in folder.glob(f"{path.stem}*.jpg")}
    im = cv2.imread(str(path))
    grown = predict.crop_box(im, det[0, :4])  # 1.02 × the box + 10 px, clipped to the picture
    assert grown.shape[:2] in sizes
    assert grown.shape[0] <= min(im.shape[0], round((y2 - y1) * 1.02 + 10) + 1)
    # centre -22.5, half size (55 · 1.02 + 10) / 2 = 33.05: [-55.55, 10.55] clipped to [0, 10]
    assert predict.crop_box(im, [-50, -50, 5, 5]).shape[:2] == (10, 10)
    # tags: without labels only the boxes' pixels change; without the score the tags are narrower
    im = np.full((200, 300, 3), 255, np.uint8)
    det = np.array([[40, 60, 160, 150, 0.87, 1]], dtype=np.float32)
    bare = predict.draw_detections(im.copy(), det, NAMES, hide_labels=True)
    named = predict.draw_detections(im.copy(), det, NAMES, hide_conf=True)
    full = predict.draw_detections(im.copy(), det, NAMES)
    assert (bare != 255).any(axis=2)[:55].sum() == 0  # nothing above the box: no tag
    assert 0 < (named != bare).any(axis=2).sum() < (full != bare).any(axis=2).sum()


def test_runs_increment_and_exist_ok(tiny_pt: Path, images: Path, tmp_path: Path) -> None:
    kw = dict(imgsz=64, device="cpu", project=tmp_path / "runs", verbose=False)
    first = detect.run(tiny_pt, images / "wide.png", **kw).save_dir
    second = detect.run(tiny_pt, images / "wide.png", **kw).save_dir
    again = detect.run(tiny_pt, images / "wide.png", exist_ok=True, **kw).save_dir
    assert first.name == "exp" and second.name == "exp2" and again == first


def test_label_lines_format() -> None:
    det = np.array([[10.0, 20.0, 50.0, 60.0, 0.9, 2.0]])
    assert predict.label_lines(det, (100, 200)) == ["2 0.15 0.4 0.2 0.4"]  # YOLOv5's %g
    assert predict.label_lines(det, (100, 200), save_conf=True)[0] == "2 0.15 0.4 0.2 0.4 0.9"
    det[0, :4] = (1.0, 1.0, 2.0, 4.0)
    assert predict.label_lines(det, (300, 700)) == ["2 0.00214286 0.00833333 0.00142857 0.01"]


def test_sources_from_a_txt_list_and_literal_bracket_names(tmp_path: Path) -> None:
    """A .txt list of sources (relative lines from its folder), as YOLOv5's detect.py takes one, and a
    file whose name holds glob characters, taken literally because it exists."""
    pics = tmp_path / "pics"
    pics.mkdir()
    for name in ("a.png", "img[1].png", "b.png"):
        cv2.imwrite(str(pics / name), np.zeros((20, 20, 3), np.uint8))
    assert sources.list_sources(pics / "img[1].png") == [pics / "img[1].png"]
    (tmp_path / "list.txt").write_text(f"pics/b.png\n{pics / 'img[1].png'}\n\npics/a.png\n")
    # its lines in sorted order, as YOLOv5 reads them: the absolute path first, then pics/a, pics/b
    assert sources.list_sources(tmp_path / "list.txt") == [pics / "img[1].png", pics / "a.png", pics / "b.png"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(FileNotFoundError, match="list is empty"):
        sources.list_sources(tmp_path / "empty.txt")


def test_a_txt_list_source_writes_labels_but_no_pictures(tiny_pt: Path, images: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """As YOLOv5's detect.py (measured): a .txt source gives label files only; a relative line naming a
    file under the current directory is taken from there."""
    monkeypatch.chdir(images)
    (tmp_path / "list.txt").write_text("wide.png\ntall.png\n")  # not beside the list: under the current folder
    res = detect.run(tiny_pt, tmp_path / "list.txt", imgsz=IMGSZ, conf_thres=0.0, device="cpu", save_txt=True,
                     project=tmp_path / "runs", verbose=False)
    assert sorted(p.name for p in res.save_dir.iterdir()) == ["labels"]
    assert sorted(p.name for p in (res.save_dir / "labels").iterdir()) == ["tall.txt", "wide.txt"]


def test_bad_sources_and_weights(tiny_pt: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(FileNotFoundError, match="no such file"):
        sources.list_sources(tmp_path / "nothing_here")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no images"):
        sources.list_sources(tmp_path / "empty")
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported format"):
        load_backend(bad, torch.device("cpu"))
    assert detect.main(["--weights", str(tiny_pt), "--source", str(tmp_path / "nope.jpg")]) == 2
    assert "--source" in capsys.readouterr().err
