"""Fetching a dataset named by a dataset yaml's ``download:`` entry, when its data is missing.

Only one kind of entry is acted on: a URL (``https://``, ``http://`` or ``file://``) of a ``.zip``
archive, or a list of such URLs. Each archive is streamed into a temporary file beside the
destination (:func:`utils.downloads.temp_download`, shared with the release-checkpoint fetcher),
checked (size cap, no absolute or ``..`` member names, no links: a "zip slip" could otherwise write
outside the destination), extracted into a temporary folder and its top-level
entries renamed into place, so an interrupted fetch never leaves a half-written dataset. The
destination is the dataset root's parent, as with YOLOv5 (``path: ../datasets/coco128`` and a
``coco128.zip`` whose top folder is ``coco128/``).

Anything else under ``download:`` (Python or shell code, prose) is never executed: the caller gets a
one-line :class:`DatasetUnavailableError` saying what to fetch and where to put it. So does a failed or
offline fetch. The command-line tools turn that error into exit status 2.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tempfile
import urllib.parse
import zipfile
from pathlib import Path, PurePosixPath

from utils.downloads import HTTP_ERROR, ByteLimitError, FetchError, copy_capped, temp_download

URL_SCHEMES = ("https", "http", "file")
MAX_BYTES = 64 << 30  # largest archive, and largest extracted total, accepted (64 GiB)


class DatasetUnavailableError(FileNotFoundError):
    """The dataset is missing and could not be fetched; the message says what to fetch and where."""


def zip_urls(note: object) -> list[str] | None:
    """The ``download:`` entry as a list of .zip URLs, or None when it is anything else.

    A string must be exactly one URL (no spaces or newlines: a multi-line entry is a script); a list
    must hold only such strings. The URL's path (query string aside) must end in ``.zip``.
    """
    items = note if isinstance(note, (list, tuple)) else [note]
    urls = []
    for item in items:
        if not isinstance(item, str) or not item.strip() or any(c.isspace() for c in item.strip()):
            return None
        parts = urllib.parse.urlsplit(item.strip())
        if parts.scheme.lower() not in URL_SCHEMES or not parts.path.lower().endswith(".zip"):
            return None
        urls.append(item.strip())
    return urls or None


def first_line(note: object) -> str:
    """The first non-empty line of a ``download:`` entry (shortened), for one-line messages."""
    text = "\n".join(map(str, note)) if isinstance(note, (list, tuple)) else str(note)
    line = next((x.strip() for x in text.splitlines() if x.strip()), "")
    return line if len(line) <= 160 else line[:157] + "..."


def _member_problem(info: zipfile.ZipInfo) -> str:
    """Why a zip member must not be extracted ('' when it is an ordinary file or folder)."""
    name = info.filename.replace("\\", "/")
    parts = PurePosixPath(name).parts
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
        return f"member {info.filename!r} would land outside the destination"
    mode = info.external_attr >> 16
    if mode and stat.S_ISLNK(mode):
        return f"member {info.filename!r} is a symbolic link"
    return ""


def safe_extract(archive: Path, dest: Path, max_bytes: int = MAX_BYTES) -> list[Path]:
    """Extract ``archive`` into ``dest`` all-or-nothing; return the top-level paths placed in ``dest``.

    Every member is checked first (see :func:`_member_problem`; total declared size <= ``max_bytes``
    and below the free disk space), then written to a temporary folder inside ``dest`` with the
    actual bytes counted, and finally each top-level entry is renamed into ``dest``. Entries that
    already exist in ``dest`` are kept as they are. Raises ValueError on an unsafe or oversized
    archive, zipfile.BadZipFile on a corrupt one; nothing is left behind in either case.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        for info in infos:
            problem = _member_problem(info)
            if problem:
                raise ValueError(f"{archive.name}: refusing to extract, {problem}")
        declared = sum(i.file_size for i in infos)
        if declared > max_bytes:
            raise ValueError(f"{archive.name}: {declared / 2**30:.1f} GiB uncompressed exceeds the limit")
        if declared > shutil.disk_usage(dest).free:
            raise ValueError(f"{archive.name}: needs {declared / 2**30:.2f} GiB, more than is free in {dest}")
        staging = Path(tempfile.mkdtemp(dir=dest, prefix=".unzip-"))
        try:
            budget = max_bytes
            for info in infos:
                target = staging.joinpath(*PurePosixPath(info.filename.replace("\\", "/")).parts)
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    try:
                        budget -= copy_capped(src, dst, budget)
                    except ByteLimitError:
                        raise ValueError(f"{archive.name} is larger than the {max_bytes >> 30} GiB limit") from None
            placed = []
            for entry in sorted(staging.iterdir()):
                final = dest / entry.name
                if final.exists():
                    print(f"{final} already exists: kept, the archive's copy discarded", file=sys.stderr)
                    continue
                os.replace(entry, final)
                placed.append(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return placed


def download_zip(url: str, dest: Path, timeout: float = 60.0, max_bytes: int = MAX_BYTES) -> list[Path]:
    """Fetch the .zip at ``url`` and extract it into ``dest`` (see :func:`safe_extract`).

    Raises :class:`DatasetUnavailableError` (one line, naming the URL and ``dest``) when the archive
    cannot be fetched or is not a safe zip; the temporary download is always removed.
    """
    name = Path(urllib.parse.urlsplit(url).path).name
    print(f"Downloading {url} into {dest}", file=sys.stderr)
    try:
        with temp_download(url, dest, prefix=f".{name}.", timeout=timeout, max_bytes=max_bytes,
                           agent="yolo-kd-data/1") as part:
            placed = safe_extract(part, dest, max_bytes)
    except FetchError as e:
        raise DatasetUnavailableError(_by_hand(e, dest)) from None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DatasetUnavailableError(f"cannot fetch {url} ({' '.join(str(e).split())}): offline? Fetch it by "
                                      f"hand and unzip it into {dest}") from None
    print(f"Unzipped {name}: {', '.join(p.name for p in placed) or 'nothing new'} in {dest}", file=sys.stderr)
    return placed


def _by_hand(e: FetchError, dest: Path) -> str:
    """One line: what went wrong with the fetch and where to unzip the archive fetched by hand."""
    if e.kind == HTTP_ERROR:
        return f"{e.url}: server answered HTTP {e.status}; fetch it by hand and unzip it into {dest}"
    reason = e.detail or str(e)
    return f"cannot fetch {e.url} ({reason}): offline? Fetch it by hand and unzip it into {dest}"


def fetch_dataset(note: object, dest: Path, where: str, timeout: float = 60.0) -> None:
    """Act on a yaml's ``download:`` entry ``note`` for data that should appear under ``dest``.

    .zip URLs are downloaded and extracted into ``dest``; for anything else a DatasetUnavailableError
    says what to fetch (``note``'s first line) and where, without running it. ``where`` names
    the yaml and the missing path in messages.
    """
    urls = zip_urls(note)
    if urls is None:
        raise DatasetUnavailableError(f"{where}; this tool does not run the yaml's 'download' script or note, do it "
                                 f"by hand so the data lands in {dest}: {first_line(note)}")
    for url in urls:
        download_zip(url, dest, timeout=timeout)


__all__ = ["MAX_BYTES", "DatasetUnavailableError", "download_zip", "fetch_dataset", "first_line", "safe_extract",
           "zip_urls"]
