"""The run folder: which run owns it, what a new run does with an old one, what a crash leaves behind.

A training run writes into ONE folder (``runs/train/exp``): ``opt.yaml`` (its flags plus a random
``run_id``), ``hyp.yaml``, ``results.csv``, ``summary.json``, plots, and ``weights/last.pt``,
``best.pt``. Every checkpoint carries the same ``run_id`` in its saved flags. Three rules keep one
run's outputs from passing as another's, and keep anything trained from being lost:

* ``--resume X`` continues only in the folder that owns X: X must be ``<run>/weights/last.pt``
  with the run's ``opt.yaml`` beside, whose ``run_id`` equals the checkpoint's (a copied run folder
  is a run folder too). Anything else is refused with a one-line way forward.
* A NEW run that reuses a folder (``--exist-ok``) first moves everything an earlier run left there
  into ``prev-<timestamp>/`` inside it: nothing is deleted, nothing old is reported as new.
* Temp files of our own atomic writes that a kill left behind are removed when a run starts.
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

import yaml

ARCHIVE_PREFIX = "prev-"  # folders holding earlier runs' outputs, left alone by later runs

# Temp names of our atomic writes: models.checkpoint.save_checkpoint (tempfile.mkstemp with
# prefix ".<name>." and suffix ".tmp" -> ".last.pt.k3j_x9a2.tmp"), engine.logger.save_yaml
# ("opt.tmp", "hyp.tmp") and engine.logger.write_results (".results.csv.<pid>.tmp").
_STALE_IN_WEIGHTS = re.compile(r"\.[^/]+\.pt\.[a-z0-9_]{8}\.tmp")
_STALE_IN_RUN = re.compile(r"(opt|hyp)\.tmp|\.results\.csv\.\d+\.tmp")


class RunFolderError(ValueError):
    """A run folder cannot be used as asked; the message is one line saying what to do instead."""


def new_run_id() -> str:
    return uuid.uuid4().hex


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _same_folder(a: str | Path | None, b: Path) -> bool:
    try:
        return a is not None and Path(a).resolve() == b.resolve()
    except OSError:
        return False


def owning_run_folder(checkpoint: str | Path, saved_opt: dict) -> Path:
    """The run folder that owns ``checkpoint`` (whose flags are ``saved_opt``), or RunFolderError.

    Owned means: the file is ``<run>/weights/last.pt`` and ``<run>/opt.yaml`` has the checkpoint's
    ``run_id``. Checkpoints written before run ids existed are accepted when both the checkpoint
    and opt.yaml name this folder as their ``save_dir``.
    """
    path = Path(checkpoint)
    run = path.parent.parent
    refuse = (f"--resume {path}: only a run's own weights/last.pt can be resumed, in place (this file is not "
              f"REASON); to train on from it in a new run folder use --weights {path}, or copy its whole run "
              "folder and --resume the copy's weights/last.pt")
    if path.name != "last.pt" or path.parent.name != "weights":
        raise RunFolderError(refuse.replace("REASON", "<run>/weights/last.pt"))
    recorded = _read_yaml(run / "opt.yaml")
    if not recorded:
        raise RunFolderError(refuse.replace("REASON", f"beside a readable run record {run / 'opt.yaml'}"))
    run_id = saved_opt.get("run_id")
    if run_id:
        owned = recorded.get("run_id") == run_id
    else:  # a checkpoint from before run ids: both records must name this very folder
        owned = _same_folder(saved_opt.get("save_dir"), run) and _same_folder(recorded.get("save_dir"), run)
    if not owned:
        raise RunFolderError(refuse.replace("REASON", f"from the run recorded in {run / 'opt.yaml'}"))
    return run


def _stamp(folder: Path) -> Path:
    """A fresh ``prev-<timestamp>`` path inside ``folder`` (numbered if that second is taken)."""
    base = f"{ARCHIVE_PREFIX}{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, n = folder / base, 2
    while candidate.exists():
        candidate, n = folder / f"{base}-{n}", n + 1
    return candidate


def archive_previous_run(folder: Path) -> Path | None:
    """Move what an earlier run left in ``folder`` into ``folder/prev-<timestamp>/``; return it.

    Everything except earlier archives moves, so the new run starts in an empty folder and its
    best.pt, results.csv and summary.json can only be its own. None when there was nothing.
    """
    if not folder.is_dir():
        return None
    def left_by_a_run(p: Path) -> bool:  # earlier archives stay where they are; empty folders hold nothing
        return not (p.is_dir() and (p.name.startswith(ARCHIVE_PREFIX) or not any(p.iterdir())))

    leftovers = [p for p in folder.iterdir() if left_by_a_run(p)]
    if not leftovers:
        return None
    archive = _stamp(folder)
    archive.mkdir()
    for p in leftovers:
        p.rename(archive / p.name)
    return archive


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete temp files of our own atomic writes left in ``folder`` and ``folder/weights`` by a
    killed process; files of any other name are never touched. Returns what was removed."""
    removed = []
    for where, pattern in ((folder, _STALE_IN_RUN), (folder / "weights", _STALE_IN_WEIGHTS)):
        if not where.is_dir():
            continue
        for p in where.iterdir():
            if p.is_file() and pattern.fullmatch(p.name):
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed
