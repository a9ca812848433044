"""Where --data / --weights names are looked for (utils/files.py, models/hub.py), as YOLOv5 users expect;
run folder numbering."""

from __future__ import annotations

import pytest

import models.hub as dl
from models.hub import find_weights
from utils.files import REPO_ROOT, find_data_yaml, increment_path


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


def test_increment_path_numbers_runs_after_the_highest(tmp_path) -> None:
    exp = tmp_path / "runs" / "exp"
    assert increment_path(exp) == exp  # free: returned as is, nothing made
    assert not exp.exists()
    assert increment_path(exp, mkdir=True) == exp and exp.is_dir()
    assert increment_path(exp) == exp.with_name("exp2")
    assert increment_path(exp, exist_ok=True) == exp  # reuse the run folder
    made = [increment_path(exp, mkdir=True) for _ in range(3)]
    assert [p.name for p in made] == ["exp2", "exp3", "exp4"] and all(p.is_dir() for p in made)
    made[0].rmdir()  # a deleted older run does not make later numbers go back
    (exp.parent / "exp_old").mkdir()  # other names do not count
    (exp.parent / "exp7x").mkdir()
    assert increment_path(exp) == exp.with_name("exp5")
    assert increment_path(exp, sep="_") == exp.with_name("exp_2")


def test_increment_path_keeps_a_file_suffix(tmp_path) -> None:
    csv = tmp_path / "results.csv"
    csv.write_text("x")
    assert increment_path(csv) == tmp_path / "results2.csv"
    (tmp_path / "results2.csv").write_text("x")
    (tmp_path / "results3.txt").write_text("x")  # another suffix: not a sibling of results.csv
    assert increment_path(csv) == tmp_path / "results3.csv"
    folder = tmp_path / "v1.0"  # a folder's dots are part of its name
    folder.mkdir()
    assert increment_path(folder) == tmp_path / "v1.02"


def test_increment_path_retries_when_another_process_wins_the_race(tmp_path, monkeypatch) -> None:
    import utils.files as files

    exp = tmp_path / "exp"
    exp.mkdir()
    real_scan = files._numbered_siblings
    calls = []

    def scan_then_lose_the_race(base, sep, suffix):
        numbers = real_scan(base, sep, suffix)
        if not calls:  # a concurrent run makes the folder this call is about to claim
            (tmp_path / f"exp{max(numbers, default=1) + 1}").mkdir()
        calls.append(numbers)
        return numbers

    monkeypatch.setattr(files, "_numbered_siblings", scan_then_lose_the_race)
    assert increment_path(exp, mkdir=True) == tmp_path / "exp3"
    assert calls == [[], [2]]
