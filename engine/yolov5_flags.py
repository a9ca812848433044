"""YOLOv5 flags that a script accepts without acting on them, so YOLOv5 command lines keep working.

YOLOv5's scripts carry flags for things this tool does not have (remote loggers, TensorFlow/TensorRT
export options, test-time augmentation, ...). Rather than argparse's "unrecognized arguments", each
script lists them in one table: an *ignored* flag is accepted and, when set, named in one warning
line; a *refused* flag stops the script with a one-line error saying what to do instead. Each script
adds its table as the last group of its ``--help`` ("YOLOv5 flags with no effect here").
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field

from engine.cli import require

LOGGER = logging.getLogger(__name__)
GROUP_TITLE = "YOLOv5 flags with no effect here"


@dataclass(frozen=True)
class Yolov5OnlyFlag:
    """One flag: its spellings, argparse options (the default decides what "set" means), and why it
    does nothing here. ``refused``: an error instead of a warning; ``quiet``: expected, never warned
    about (a launcher's flag)."""

    names: tuple[str, ...]
    why: str
    options: dict = field(default_factory=lambda: {"action": "store_true"})
    refused: bool = False
    quiet: bool = False

    @property
    def dest(self) -> str:
        long = next(n for n in self.names if n.startswith("--"))
        return long[2:].replace("-", "_")

    @property
    def default(self) -> object:
        return self.options.get("default", False if self.options.get("action") == "store_true" else None)


def add_yolov5_only_flags(parser: argparse.ArgumentParser, flags: list[Yolov5OnlyFlag]) -> None:
    """Add ``flags`` as the parser's group `GROUP_TITLE`."""
    group = parser.add_argument_group(GROUP_TITLE)
    for f in flags:
        group.add_argument(*f.names, help=("not available: " if f.refused else "ignored: ") + f.why, **f.options)


def check_yolov5_only_flags(opt: argparse.Namespace, flags: list[Yolov5OnlyFlag]) -> list[str]:
    """Raise one-line ValueError for a refused flag that is set; warn once about the set ignored ones.
    Returns the names of the ignored flags that were set."""
    ignored = []
    for f in flags:
        if getattr(opt, f.dest, f.default) == f.default:
            continue
        require(not f.refused, f"{f.names[0]}: {f.why}")
        if not f.quiet:
            ignored.append(f.names[0])
    if ignored:
        LOGGER.warning(f"{', '.join(ignored)}: YOLOv5 flag(s) with no effect here (see --help)")
    return ignored


def check_yolov5_only_kwargs(kwargs: dict, flags: list[Yolov5OnlyFlag], where: str) -> None:
    """A script's ``run(**kwargs)`` from Python takes YOLOv5's keywords too (``detect.run(..., dnn=True)``):
    the same warning or refusal as on the command line; a keyword that is not one of ``flags`` is a
    TypeError naming ``where``, as Python reports any unexpected keyword."""
    unknown = sorted(set(kwargs) - {f.dest for f in flags})
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    check_yolov5_only_flags(argparse.Namespace(**kwargs), flags)


__all__ = ["GROUP_TITLE", "Yolov5OnlyFlag", "add_yolov5_only_flags", "check_yolov5_only_flags",
           "check_yolov5_only_kwargs"]
