"""What the command-line scripts do with errors: one line naming the flag or file, never a traceback.

``train_distill.py``, ``val.py``, ``detect.py`` and ``export.py`` run their work through
`run_guarded`. Bad input (our ValueError/FileNotFoundError family, checkpoint and run-folder
errors, YAML syntax errors) becomes ``<script>: error: <one line>`` on stderr and exit status 2
(argparse's status for bad usage); Ctrl-C becomes one line and status 130 (128 + SIGINT, what a
shell reports for an interrupted command). Anything else is a bug and keeps its traceback.

Logging is configured here, once, by the entry points (`configure_logging`): the project's loggers
(``engine``, ``distill``, ``models``, ``utils``, ``analysis``) write INFO and above to the console;
other libraries keep the WARNING default. Importing a module configures nothing.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

T = TypeVar("T")

PROJECT_LOGGERS = ("engine", "distill", "models", "utils", "analysis")

# NotADirectoryError/IsADirectoryError/PermissionError: a path flag pointing at the wrong thing.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, yaml.YAMLError,
)  # fmt: skip


class TrainingInterrupted(Exception):  # noqa: N818 - an outcome reported to the user, not a fault
    """Ctrl-C during training; ``checkpoint`` is the last.pt holding the last finished epoch (or None)."""

    def __init__(self, epoch: int, epochs: int, checkpoint: Path | None) -> None:
        self.epoch, self.epochs, self.checkpoint = epoch, epochs, checkpoint
        where = f"interrupted at epoch {epoch + 1}/{epochs}"
        if checkpoint is None:
            message = f"{where}, before the first checkpoint was saved; nothing to resume"
        else:
            message = f"{where}; resume with: python train_distill.py --resume {checkpoint}"
        super().__init__(message)


class InterruptLatch:
    """Ctrl-C that cannot be lost: SIGINT sets ``fired`` and raises KeyboardInterrupt as usual.

    Python drops an exception raised inside a finalizer (it only prints "Exception ignored in ..."),
    and a DataLoader iterator's ``__del__`` shuts its workers down at every epoch change, so a Ctrl-C
    landing there would vanish and training would go on; :meth:`check` raises it again at the next
    batch. Installed only from the main thread (the only one Python delivers signals to).
    """

    def __init__(self) -> None:
        self.fired = False
        self._previous = None

    def __enter__(self) -> InterruptLatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: object) -> None:
        self.fired = True
        raise KeyboardInterrupt

    def check(self) -> None:
        """Raise KeyboardInterrupt if a Ctrl-C arrived (even one whose exception was swallowed)."""
        if self.fired:
            raise KeyboardInterrupt


def one_line(error: BaseException) -> str:
    """The error's message on one line; a YAML syntax error says which file, line and column."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"{mark.name}: YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    if isinstance(error, yaml.YAMLError):
        return f"YAML error: {' '.join(str(error).split())}"
    text = str(error) or type(error).__name__
    return "; ".join(part.strip() for part in text.splitlines() if part.strip())


def run_guarded(prog: str, work: Callable[[], T],
                extra_errors: tuple[type[BaseException], ...] = ()) -> tuple[int, T | None]:
    """Run ``work()``; return (0, its result), or (status, None) after printing one line to stderr."""
    try:
        return 0, work()
    except TrainingInterrupted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return EXIT_INTERRUPTED, None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED, None
    except USER_ERRORS + extra_errors as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return EXIT_USAGE, None


def require(condition: bool, message: str) -> None:
    """Raise the one-line ValueError ``message`` unless ``condition``: for flag checks."""
    if not condition:
        raise ValueError(message)


class _ConsoleHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record is emitted (a redirected or captured
    stream is honoured), prefixing warnings and errors with their level."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self):  # noqa: D102 - the current sys.stdout, not the one at construction
        return sys.stdout

    @stream.setter
    def stream(self, value) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        return f"{record.levelname}: {text}" if record.levelno >= logging.WARNING else text


def configure_logging(level: int = logging.INFO) -> None:
    """Send the project's log records of ``level`` and above to the console (idempotent).

    Called by the CLI entry points (train_distill.py, val.py, export.py, detect.py, analyze_kd.py),
    never at import: a library user keeps full control of logging.
    """
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(level)
        if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
            logger.addHandler(_ConsoleHandler())


FlagTable = dict[str, list[tuple[str | tuple[str, ...], str, dict]]]


def parser_from_table(description: str, table: FlagTable) -> argparse.ArgumentParser:
    """An argparse parser with one group per ``table`` title; each row is ``(names, help, argparse options)``."""
    parser = argparse.ArgumentParser(description=description)
    for title, flags in table.items():
        group = parser.add_argument_group(title)
        for names, text, options in flags:
            group.add_argument(*((names,) if isinstance(names, str) else names), help=text, **options)
    return parser
