"""One URL into one file, safely: the transport shared by dataset archives and release checkpoints.

:func:`temp_download` streams a URL (urllib; ``https``, ``http`` or ``file``) into a temporary file
created *beside* the destination (same filesystem, so the caller's final ``os.replace`` is atomic),
with a byte cap (a hostile or wrong server cannot fill the disk) and the announced
``Content-Length`` checked against the bytes received (a cut connection is an error, not a short
file). The caller checks the file and moves it into place inside the ``with`` block; whatever is
left is deleted on the way out, so an interrupted or rejected download leaves nothing behind.

Failures are one :class:`FetchError` carrying the URL, the HTTP status if any, and a ``kind``, so
each caller words its own advice (where to put a file fetched by hand). This module knows nothing
of models or datasets and imports nothing from the project.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

CHUNK_BYTES = 1 << 20

# FetchError kinds
HTTP_ERROR, UNREACHABLE, INCOMPLETE, TOO_LARGE = "http", "unreachable", "incomplete", "too large"


class FetchError(OSError):
    """A URL that could not be fetched completely. ``kind``: one of ``'http'`` (``status`` set),
    ``'unreachable'``, ``'incomplete'``, ``'too large'``; ``detail``: the underlying reason, one line."""

    def __init__(self, message: str, url: str, kind: str, detail: str = "", status: int | None = None) -> None:
        super().__init__(message)
        self.url, self.kind, self.detail, self.status = url, kind, detail, status


class ByteLimitError(ValueError):
    """More bytes arrived than the budget of :func:`copy_capped` allows."""


def copy_capped(src: BinaryIO, dst: BinaryIO, budget: int, on_bytes: Callable[[int], None] | None = None) -> int:
    """Copy ``src`` to ``dst`` in 1 MiB chunks; return the byte count.

    Raises :class:`ByteLimitError` as soon as the count passes ``budget`` (the chunk that passes it is
    not written). ``on_bytes`` gets the running count after each chunk (progress display).
    """
    done = 0
    while chunk := src.read(CHUNK_BYTES):
        done += len(chunk)
        if done > budget:
            raise ByteLimitError(f"more than {budget:,} bytes")
        dst.write(chunk)
        if on_bytes is not None:
            on_bytes(done)
    return done


def _one_line(reason: object) -> str:
    return " ".join(str(reason).split())


class _Progress:
    """``done/total MB (pct%)`` on stderr, rewritten in place every 10 %."""

    def __init__(self, total: int | None) -> None:
        self.total, self.shown = total, -10

    def __call__(self, done: int) -> None:
        if not self.total:
            return
        pct = 100 * done // self.total
        if pct >= self.shown + 10:
            print(f"\r  {done / 1e6:.1f}/{self.total / 1e6:.1f} MB ({pct}%)", end="", file=sys.stderr, flush=True)
            self.shown = pct


def _stream(url: str, out: BinaryIO, timeout: float, max_bytes: int, agent: str, progress: bool) -> int:
    """The HTTP part of :func:`fetch`: open, check the announced length, copy capped, compare counts."""
    request = urllib.request.Request(url, headers={"User-Agent": agent})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        announced = resp.headers.get("Content-Length")
        total = int(announced) if announced and announced.isdigit() else None
        if total is not None and total > max_bytes:
            raise FetchError(f"{url} announces {total:,} bytes, more than the {max_bytes:,} allowed", url, TOO_LARGE)
        show = _Progress(total) if progress else None
        try:
            done = copy_capped(resp, out, max_bytes, show)
        except ByteLimitError:
            raise FetchError(f"{url} sent more than the {max_bytes:,} bytes allowed", url, TOO_LARGE) from None
        if show is not None and total:
            print(file=sys.stderr)
    if total is not None and done != total:
        raise FetchError(f"download of {url} stopped after {done:,} of {total:,} bytes", url, INCOMPLETE)
    return done


def fetch(url: str, out: BinaryIO, timeout: float = 60.0, max_bytes: int = 1 << 40, agent: str = "yolo-kd/1",
          progress: bool = False) -> int:
    """Stream ``url`` into the open binary file ``out``; return the byte count.

    timeout: seconds per network read. Raises :class:`FetchError` on an HTTP error status, an
    unreachable host or missing ``file://`` path, a short transfer, or more than ``max_bytes``.
    """
    try:
        return _stream(url, out, timeout, max_bytes, agent, progress)
    except urllib.error.HTTPError as e:  # before URLError: it is one
        raise FetchError(f"{url}: server answered HTTP {e.code} ({e.reason})", url, HTTP_ERROR,
                         _one_line(e.reason), e.code) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        detail = _one_line(getattr(e, "reason", e))
        raise FetchError(f"cannot reach {url} ({detail})", url, UNREACHABLE, detail) from None


@contextlib.contextmanager
def temp_download(url: str, folder: str | Path, prefix: str = ".download.", **fetch_options) -> Iterator[Path]:
    """Download ``url`` into a new hidden ``*.part`` file in ``folder`` and yield its path.

    The file is complete and flushed to disk when yielded; move it into place (``os.replace``) or
    read it inside the ``with`` block. It is removed on exit if it is still there, also when the
    fetch or the caller's checks raise. ``fetch_options``: those of :func:`fetch`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=".part")
    part = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            fetch(url, out, **fetch_options)
            out.flush()
            os.fsync(out.fileno())
        yield part
    finally:
        part.unlink(missing_ok=True)


__all__ = ["CHUNK_BYTES", "ByteLimitError", "FetchError", "copy_capped", "fetch", "temp_download"]
