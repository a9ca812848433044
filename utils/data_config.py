"""Dataset yaml: where a dataset lives and what it holds (``load_data_config``).

A YOLOv5-style yaml names a root (``path``), splits (``train``/``val``/``test``: folders of images,
``.txt`` lists, or lists of those), classes (``names``/``nc``), and how to obtain a missing set
(``download`` of zip URLs, or ``generate: demo|aerial``). Resolution rules are in
:func:`load_data_config`; each step is one function below (read, class names, root choice,
obtaining, split paths, COCO json).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from utils.data_download import fetch_dataset

LOGGER = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Dataset yaml
# --------------------------------------------------------------------------------------------
def project_root() -> Path:
    """This repository's folder (holding ``data/``, ``models/``).

    YOLOv5 resolves a relative dataset ``path`` against its own repository folder (measured with
    YOLOv5 7.0: neither the current directory nor the yaml's folder is consulted), so shipped yamls
    say ``path: ../datasets/<name>``: a ``datasets/`` folder beside the checkout. We use ours alike.
    """
    return Path(__file__).resolve().parents[1]


def root_candidates(value: str | None, yaml_file: Path) -> list[Path]:
    """Folders a yaml's ``path`` may mean, in order of preference (see :func:`load_data_config`).

    Absolute: itself. Relative (or absent, i.e. ``.``): under :func:`project_root` (YOLOv5's rule),
    then under the current directory, the yaml folder's parent and the yaml's own folder (where
    dataset exporters put ``data.yaml``). Duplicates are dropped.
    """
    p = Path(value if value not in (None, "") else ".").expanduser()
    if p.is_absolute():
        return [p]
    here = yaml_file.resolve().parent
    out: list[Path] = []
    for base in (project_root(), Path.cwd(), here.parent, here):
        c = (base / p).resolve()
        if c not in out:
            out.append(c)
    return out


def _split_paths(value: Any, root: Path) -> list[Path]:
    """A yaml split entry (str or list) as normalised paths, relative ones under ``root``."""
    entries = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for e in entries:
        q = Path(str(e)).expanduser()
        out.append(Path(os.path.normpath(q if q.is_absolute() else root / q)))
    return out


def _choose_root(cfg: dict, candidates: list[Path], require: Iterable[str]) -> Path:
    """The first candidate under which every required split exists; else the first existing one
    when the yaml names a ``path``; else the first (YOLOv5's, where a download or generator puts it)."""
    needed = [k for k in require if cfg.get(k)]
    for c in candidates:
        if all(q.exists() for k in needed for q in _split_paths(cfg[k], c)):
            return c
    if cfg.get("path"):
        for c in candidates:
            if c.exists():
                return c
    return candidates[0]


def _missing_splits(cfg: dict, root: Path, require: Iterable[str]) -> list[Path]:
    return [q for k in require if cfg.get(k) for q in _split_paths(cfg[k], root) if not q.exists()]


def _generate_into(root: Path, kind: str, seed: int) -> None:
    """Build a generated dataset at ``root`` atomically: write a sibling temp folder, then rename,
    so concurrent processes (DDP ranks) never see a half-written set."""
    # local imports: a generator is only needed on first use
    if kind == "demo":
        from utils.demo_data import generate_demo as generate
    elif kind == "aerial":
        from utils.aerial_data import generate_aerial as generate
    else:
        raise ValueError(f"unknown 'generate: {kind}' (supported: demo, aerial)")

    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    LOGGER.info("generating the %s dataset into %s", kind, root)
    generate(tmp, seed=seed)
    try:
        os.replace(tmp, root)
    except OSError:  # another process finished first (root now exists and is non-empty)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not root.exists():
            raise


def load_data_config(path: str | Path, require: Iterable[str] = ("train", "val")) -> dict[str, Any]:
    """Read a YOLOv5-style dataset yaml.

    Keys: ``path`` (dataset root), ``train``/``val``/``test`` (each a folder of images, a ``.txt``
    list of image paths, or a list of those; relative to the root), ``names`` (list, or {id: name}
    with ids 0..nc-1), optional ``nc`` (must equal len(names)), optional ``val_json`` (COCO
    annotation json for val, relative to the root), optional ``download``, optional ``generate:
    demo`` (build the synthetic demo set into the root when it is missing; ``generate_seed`` picks
    its seed).

    Where a relative ``path`` points (no ``path`` means ``.``): YOLOv5 7.0 takes it relative to its
    repository folder, whatever the current directory or the yaml's location (measured with the
    real YOLOv5), so a shipped ``path: ../datasets/coco128`` means ``datasets/`` beside the
    checkout. We take it relative to THIS repository (:func:`project_root`) first, so a yaml used
    with both tools finds the same folder; when the required splits are not there, the current
    directory, the yaml folder's parent and the yaml's own folder are tried in that order
    (:func:`root_candidates`), and the first under which every required split exists is used.

    ``download``: when the required splits are missing everywhere and the entry is a URL of a
    ``.zip`` (or a list of them), it is downloaded and unzipped into the dataset root's parent
    (YOLOv5's convention; see :mod:`utils.data_download` for the checks); any other entry (code,
    prose) is never run: a one-line :class:`DatasetUnavailableError` says what to fetch and where, as does
    a failed or offline download (the CLIs exit with status 2).

    Splits named in ``require`` must exist, others are resolved but checked only when a dataset is
    built from them (so evaluating on val does not need the train images downloaded).
    Returns the yaml's dict with ``path`` (Path), ``train``/``val``/``test`` (list[str] of absolute
    paths, or None), ``names`` (list[str]), ``nc`` (int), ``val_json`` (Path or None) and
    ``yaml_file`` (Path). Raises FileNotFoundError / ValueError naming the yaml, key and path.
    """
    yaml_file = Path(path)
    cfg = _read_yaml(yaml_file)
    cfg["names"] = _class_names(cfg, yaml_file)
    cfg["nc"] = len(cfg["names"])
    for key in ("train", "val"):
        if key in require and not cfg.get(key):
            raise ValueError(f"{yaml_file}: missing '{key}' split")
    root = _resolve_root(cfg, yaml_file, require)
    cfg["path"] = root
    for key in ("train", "val", "test"):
        cfg[key] = [str(q) for q in _split_paths(cfg[key], root)] if cfg.get(key) else None
    cfg["val_json"] = _val_json(cfg.get("val_json"), root, yaml_file) or _coco_val_json(cfg["val"], root)
    cfg["yaml_file"] = yaml_file.resolve()
    return cfg


def _read_yaml(yaml_file: Path) -> dict[str, Any]:
    """The yaml's top-level mapping (a copy)."""
    if not yaml_file.is_file():
        raise FileNotFoundError(f"dataset yaml {yaml_file} not found")
    with open(yaml_file, encoding="utf-8") as f:
        cfg = yaml.safe_load(f)
    if not isinstance(cfg, dict):
        raise ValueError(f"{yaml_file}: expected a mapping with path/train/val/names, got {type(cfg).__name__}")
    return dict(cfg)


def _class_names(cfg: dict, yaml_file: Path) -> list[str]:
    """``names`` as a list (from a list or an {id: name} mapping with ids 0..nc-1), checked against ``nc``."""
    names = cfg.get("names")
    if names is None:
        if "nc" not in cfg:
            raise ValueError(f"{yaml_file}: needs 'names' (list or {{id: name}})")
        names = [f"class{i}" for i in range(int(cfg["nc"]))]
    if isinstance(names, dict):
        ids = sorted(int(k) for k in names)
        if ids != list(range(len(ids))):
            raise ValueError(f"{yaml_file}: 'names' ids must be 0..{len(ids) - 1} without gaps, got {ids}")
        names = [str(names[k]) for k in sorted(names, key=int)]
    elif isinstance(names, (list, tuple)):
        names = [str(n) for n in names]
    else:
        raise ValueError(f"{yaml_file}: 'names' must be a list or a {{id: name}} mapping")
    if "nc" in cfg and int(cfg["nc"]) != len(names):
        raise ValueError(f"{yaml_file}: 'nc' is {cfg['nc']} but 'names' lists {len(names)} classes")
    return names


def _resolve_root(cfg: dict, yaml_file: Path, require: Iterable[str]) -> Path:
    """The dataset root holding every required split: chosen among :func:`root_candidates`,
    generated or downloaded when the yaml says how; else a FileNotFoundError naming key and path."""
    tried = root_candidates(cfg.get("path"), yaml_file)
    root = _choose_root(cfg, tried, require)
    gen = cfg.get("generate")
    if gen and not root.exists():
        _generate_into(root, str(gen), int(cfg.get("generate_seed", 0)))
    missing = _missing_splits(cfg, root, require)
    if missing and cfg.get("download"):
        # YOLOv5 unzips into the dataset root's parent (path: ../datasets/x, archive holding x/).
        fetch_dataset(cfg["download"], root.parent, f"{yaml_file}: dataset not found ({missing[0]} is missing)")
        missing = _missing_splits(cfg, root, require)
    if missing:
        where = f" (dataset root {root}; tried {', '.join(map(str, tried))})" if len(tried) > 1 else ""
        key = next(k for k in require if cfg.get(k) and missing[0] in _split_paths(cfg[k], root))
        raise FileNotFoundError(f"{yaml_file}: '{key}' path {missing[0]} not found{where}")
    return root


def _val_json(vj: Any, root: Path, yaml_file: Path) -> Path | None:
    """The COCO annotation json for val (relative to the root), or None (warned when named but absent)."""
    if not vj:
        return None
    vjp = Path(str(vj)).expanduser()
    vjp = vjp if vjp.is_absolute() else root / vjp
    if vjp.is_file():
        return vjp
    LOGGER.warning("%s: 'val_json' %s not found; --save-json scores against a json generated from the labels",
                   yaml_file, vjp)
    return None


COCO_VAL_JSON = Path("annotations") / "instances_val2017.json"


def _coco_val_json(val: list[str] | None, root: Path) -> Path | None:
    """COCO's own annotation json when the val split is YOLOv5's COCO layout (``val2017.txt`` under a root
    that holds ``annotations/instances_val2017.json``), as YOLOv5's val.py finds it for a yaml without
    ``val_json``: pycocotools then scores with COCO's crowd regions and areas."""
    if val and any(Path(v).name == "val2017.txt" for v in val) and (root / COCO_VAL_JSON).is_file():
        return root / COCO_VAL_JSON
    return None
