"""Release checkpoints (models/hub.py, its CLI weights/download.py) and the shared transport (utils/downloads.py)
without a network: urllib's global opener is replaced by a local handler."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import urllib.error
import urllib.request
import urllib.response
from email.message import Message
from pathlib import Path

import pytest

from models import hub as dl
from utils.downloads import TOO_LARGE, FetchError, temp_download
from weights import download as cli

FIXTURE = Path(__file__).parent / "fixtures" / "yolov5n_nc80.pt"  # official v7.0 layout, yolov5n shapes


class _LocalHandler(urllib.request.BaseHandler):
    """Answers every https request with ``body`` (or raises ``error``); records the URLs asked for."""

    handler_order = 100  # before urllib's own HTTPSHandler

    def __init__(self, body: bytes = b"", error: Exception | None = None, length: int | None = None) -> None:
        self.body, self.error, self.length = body, error, length
        self.urls: list[str] = []

    def https_open(self, req: urllib.request.Request) -> urllib.response.addinfourl:
        self.urls.append(req.full_url)
        if self.error is not None:
            raise self.error
        headers = Message()
        headers["Content-Length"] = str(len(self.body) if self.length is None else self.length)
        resp = urllib.response.addinfourl(io.BytesIO(self.body), headers, req.full_url, 200)
        resp.msg = "OK"  # read by urllib's HTTPErrorProcessor
        return resp


def _serve(monkeypatch: pytest.MonkeyPatch, handler: _LocalHandler) -> _LocalHandler:
    monkeypatch.setattr(urllib.request, "_opener", urllib.request.build_opener(handler))
    return handler


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_writes_verified_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = FIXTURE.read_bytes()
    h = _serve(monkeypatch, _LocalHandler(body))
    path = dl.download("yolov5n", tmp_path / "w")
    assert path == tmp_path / "w" / "yolov5n.pt"
    assert path.read_bytes() == body
    assert h.urls == ["https://github.com/ultralytics/yolov5/releases/download/v7.0/yolov5n.pt"]
    assert _leftovers(tmp_path / "w") == ["yolov5n.pt"]  # no temporary .part file left

    # A second call finds the verified file and does not fetch again; 'yolov5n.pt' is accepted too.
    assert dl.download("yolov5n.pt", tmp_path / "w") == path
    assert len(h.urls) == 1


def test_offline_gives_one_line_with_manual_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    _serve(monkeypatch, _LocalHandler(error=urllib.error.URLError("Name or service not known")))
    with pytest.raises(dl.DownloadError, match="offline") as e:
        dl.download("yolov5s", tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert dl.release_url("yolov5s") in msg and str(tmp_path / "yolov5s.pt") in msg
    assert _leftovers(tmp_path) == []

    assert cli.main(["yolov5s", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("download.py: error: cannot reach") and "offline" in err[-1]


def test_http_error_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = dl.release_url("yolov5m")
    _serve(monkeypatch, _LocalHandler(error=urllib.error.HTTPError(url, 404, "Not Found", Message(), None)))
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.download("yolov5m", tmp_path)
    assert _leftovers(tmp_path) == []


def test_unknown_name_rejected_before_any_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = _serve(monkeypatch, _LocalHandler(FIXTURE.read_bytes()))
    for bad in ("yolov8n", "yolov5", "../yolov5s", ""):
        with pytest.raises(ValueError, match="unknown model"):
            dl.download(bad, tmp_path)
    assert h.urls == [] and _leftovers(tmp_path) == []
    assert cli.main(["yolov5q", "--dir", str(tmp_path)]) == 1


def test_truncated_download_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = FIXTURE.read_bytes()
    _serve(monkeypatch, _LocalHandler(body[: len(body) // 2], length=len(body)))
    with pytest.raises(dl.DownloadError, match="stopped after"):
        dl.download("yolov5n", tmp_path)
    assert _leftovers(tmp_path) == []


def test_wrong_or_corrupt_file_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    body = FIXTURE.read_bytes()
    _serve(monkeypatch, _LocalHandler(body))  # a yolov5n file served as yolov5s: far too small
    with pytest.raises(dl.DownloadError, match="not a plausible yolov5s.pt"):
        dl.download("yolov5s", tmp_path)
    assert _leftovers(tmp_path) == []

    junk = b"PK" + bytes(len(body) - 2)  # right size, not a checkpoint
    _serve(monkeypatch, _LocalHandler(junk))
    with pytest.raises(dl.DownloadError, match="not a loadable YOLOv5 checkpoint"):
        dl.download("yolov5n", tmp_path)
    assert _leftovers(tmp_path) == []


def test_existing_bad_file_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "yolov5n.pt").write_bytes(b"partial")
    h = _serve(monkeypatch, _LocalHandler(FIXTURE.read_bytes()))
    path = dl.download("yolov5n", tmp_path)
    assert len(h.urls) == 1 and path.stat().st_size == FIXTURE.stat().st_size


def test_every_release_model_has_a_url_and_size_window() -> None:
    assert set(dl.MODELS) == {f"yolov5{s}{p}" for s in "nsmlx" for p in ("", "6")}
    for name in dl.MODELS:
        lo, hi = dl.size_window(name)
        assert dl.release_url(name).endswith(f"/releases/download/v7.0/{name}.pt") and 0 < lo < hi
    lo, hi = dl.size_window("yolov5n")
    assert lo <= FIXTURE.stat().st_size <= hi


def test_oversized_download_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server announcing more than the model's size window allows is refused; so is one that sends more."""
    body = FIXTURE.read_bytes()
    _serve(monkeypatch, _LocalHandler(body, length=dl.size_window("yolov5n")[1] + 1))
    with pytest.raises(dl.DownloadError, match="announces .* more than"):
        dl.download("yolov5n", tmp_path)
    assert _leftovers(tmp_path) == []


def test_temp_download_cleans_up_and_caps(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(3000))
    with temp_download(src.as_uri(), tmp_path / "out", max_bytes=3000) as part:
        assert part.parent == tmp_path / "out" and part.read_bytes() == bytes(3000)
    assert _leftovers(tmp_path / "out") == []  # not moved into place: removed
    with pytest.raises(FetchError) as e, temp_download(src.as_uri(), tmp_path / "out", max_bytes=2999):
        pass
    assert e.value.kind == TOO_LARGE and _leftovers(tmp_path / "out") == []
    with pytest.raises(FetchError, match="cannot reach") as e, temp_download((tmp_path / "nope").as_uri(), tmp_path):
        pass
    assert e.value.url.endswith("/nope")


def test_cli_runs_as_a_file_from_any_folder(tmp_path: Path) -> None:
    """`python weights/download.py --list` works outside the repository root (it re-runs itself as a module)."""
    script = Path(dl.__file__).resolve().parents[1] / "weights" / "download.py"
    env_path = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(script), "--list"], cwd=tmp_path, env=env_path, capture_output=True,
                         text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split() == ["yolov5n", dl.release_url("yolov5n")]
    assert len(out.stdout.splitlines()) == len(dl.MODELS)
