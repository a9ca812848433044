"""Where --data / --weights names are looked for, as YOLOv5 users expect."""

from __future__ import annotations

import pytest

import weights.download as dl
from utils.files import REPO_ROOT, find_data_yaml, find_weights


def test_bare_names_resolve_to_the_repository_folders(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # not the repo root: the names must still be found
    assert find_data_yaml("VisDrone.yaml") == REPO_ROOT / "data" / "VisDrone.yaml"
    assert find_weights("demo_teacher.pt") == REPO_ROOT / "weights" / "demo_teacher.pt"
    own = tmp_path / "mine.pt"
    own.write_bytes(b"x")
    assert find_weights(own) == own
    with pytest.raises(FileNotFoundError, match="--data nope.yaml not found"):
        find_data_yaml("nope.yaml")
    with pytest.raises(FileNotFoundError, match="--t_weights other/nope.pt not found"):
        find_weights("other/nope.pt", "--t_weights")


def test_official_release_names_are_downloaded_or_fail_with_one_line(tmp_path, monkeypatch) -> None:
    fetched = tmp_path / "yolov5s.pt"

    def fake_download(name, dest_dir):
        assert name == "yolov5s" and dest_dir == REPO_ROOT / "weights"
        return fetched

    monkeypatch.setattr(dl, "download", fake_download)
    assert find_weights("yolov5s.pt") == fetched

    def offline(name, dest_dir):
        raise dl.DownloadError("cannot reach the release URL: offline? fetch it by hand")

    monkeypatch.setattr(dl, "download", offline)
    with pytest.raises(FileNotFoundError, match="offline"):
        find_weights("yolov5s.pt")
