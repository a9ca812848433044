"""A dataset yaml's `download:` entry: .zip URLs fetched and unzipped safely, anything else never run."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

import val
from utils.data_config import load_data_config
from utils.data_download import DatasetUnavailableError, safe_extract, zip_urls

FIXTURE = Path(__file__).parent / "fixtures" / "yolov5n_nc80.pt"


def _tiny_zip(path: Path, top: str = "tiny", extra: dict[str, bytes] | None = None) -> Path:
    """A dataset archive in YOLOv5's layout: <top>/images/val/a.png + <top>/labels/val/a.txt."""
    ok, png = cv2.imencode(".png", np.full((32, 32, 3), 128, np.uint8))
    assert ok
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{top}/images/val/a.png", png.tobytes())
        zf.writestr(f"{top}/labels/val/a.txt", "0 0.5 0.5 0.25 0.25\n")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return path


def _yaml(path: Path, root: Path, download) -> Path:
    path.write_text(yaml.safe_dump({"path": str(root), "train": "images/val", "val": "images/val",
                                    "names": ["a"], "download": download}))
    return path


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_zip_urls_accepts_only_zip_urls() -> None:
    assert zip_urls("https://host/x/coco128.zip") == ["https://host/x/coco128.zip"]
    assert zip_urls(["file:///a/b.zip", "http://h/c.ZIP?dl=1"]) == ["file:///a/b.zip", "http://h/c.ZIP?dl=1"]
    for note in ("https://host/x.tar.gz", "ftp://h/x.zip", "bash data/scripts/get_coco.sh",
                 "from utils.general import download\ndownload('https://h/x.zip')", "get it at https://h/x.zip",
                 ["https://h/x.zip", "rm -rf /"], None, 3):
        assert zip_urls(note) is None, note


def test_file_url_downloaded_into_root_parent(tmp_path: Path) -> None:
    archive = _tiny_zip(tmp_path / "tiny.zip")
    root = tmp_path / "datasets" / "tiny"
    cfg = load_data_config(_yaml(tmp_path / "d.yaml", root, archive.as_uri()))
    assert cfg["path"] == root and (root / "labels" / "val" / "a.txt").is_file()
    assert _leftovers(tmp_path / "datasets") == []  # no .part or .unzip- temporaries
    assert archive.is_file()  # the source is not touched
    # present now: a second load does not fetch again (the URL may even be gone)
    archive.unlink()
    assert load_data_config(tmp_path / "d.yaml")["path"] == root


@pytest.fixture()
def http_root(tmp_path: Path):
    """A local HTTP server for files under tmp_path/www; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_zip_downloaded(tmp_path: Path, http_root) -> None:
    www, base = http_root
    _tiny_zip(www / "tiny.zip")
    root = tmp_path / "datasets" / "tiny"
    cfg = load_data_config(_yaml(tmp_path / "d.yaml", root, f"{base}/tiny.zip"))
    assert cfg["val"] == [str(root / "images" / "val")] and (root / "images" / "val" / "a.png").is_file()
    assert _leftovers(tmp_path / "datasets") == []
    # an HTTP error: one line naming the URL and where to unzip it by hand
    root2 = tmp_path / "datasets" / "other"
    with pytest.raises(DatasetUnavailableError, match=r"HTTP 404; fetch it by hand and unzip it into .*datasets$"):
        load_data_config(_yaml(tmp_path / "e.yaml", root2, f"{base}/missing.zip"))
    assert not root2.exists() and _leftovers(tmp_path / "datasets") == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_is_one_line_and_exit_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/tiny.zip"
    y = _yaml(tmp_path / "d.yaml", tmp_path / "datasets" / "tiny", url)
    with pytest.raises(DatasetUnavailableError) as e:
        load_data_config(y)
    msg = str(e.value)
    assert "\n" not in msg and url in msg and str(tmp_path / "datasets") in msg and "offline?" in msg
    with pytest.raises(SystemExit) as done:
        val.main(["--weights", str(FIXTURE), "--data", str(y), "--device", "cpu"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("val.py: error: cannot fetch") and url in err[-1]


def test_script_download_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    script = f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
    y = _yaml(tmp_path / "d.yaml", tmp_path / "datasets" / "x", script)
    with pytest.raises(DatasetUnavailableError, match=r"does not run .*lands in .*datasets: import pathlib$"):
        load_data_config(y)
    shell = _yaml(tmp_path / "s.yaml", tmp_path / "datasets" / "x", f"touch {marker}")
    with pytest.raises(DatasetUnavailableError, match="touch"):
        load_data_config(shell)
    assert not marker.exists()


def test_unsafe_archives_are_refused(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    slip = _tiny_zip(tmp_path / "slip.zip", extra={"../evil.txt": b"x"})
    with pytest.raises(ValueError, match="outside the destination"):
        safe_extract(slip, dest)
    absolute = _tiny_zip(tmp_path / "abs.zip", extra={"/tmp/evil.txt": b"x"})
    with pytest.raises(ValueError, match="outside the destination"):
        safe_extract(absolute, dest)
    link = tmp_path / "link.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("tiny/escape")
        info.external_attr = (0o120777 << 16)  # a symbolic link
        zf.writestr(info, "/etc")
    with pytest.raises(ValueError, match="symbolic link"):
        safe_extract(link, dest)
    big = _tiny_zip(tmp_path / "big.zip", extra={"tiny/pad.bin": bytes(4096)})
    with pytest.raises(ValueError, match="exceeds the limit"):
        safe_extract(big, dest, max_bytes=1000)
    assert not (tmp_path / "evil.txt").exists() and list(dest.iterdir()) == []  # all-or-nothing
    # through the yaml: a refused archive is a one-line DatasetUnavailableError, nothing extracted
    y = _yaml(tmp_path / "d.yaml", tmp_path / "datasets" / "tiny", slip.as_uri())
    with pytest.raises(DatasetUnavailableError, match="outside the destination"):
        load_data_config(y)
    assert list((tmp_path / "datasets").iterdir()) == []


def test_existing_entries_are_kept(tmp_path: Path) -> None:
    dest = tmp_path / "datasets"
    (dest / "tiny").mkdir(parents=True)
    (dest / "tiny" / "mine.txt").write_text("keep")
    placed = safe_extract(_tiny_zip(tmp_path / "a.zip", extra={"README.txt": b"r"}), dest)
    assert placed == [dest / "README.txt"] and (dest / "tiny" / "mine.txt").read_text() == "keep"
    assert not (dest / "tiny" / "images").exists()
