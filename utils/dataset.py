"""The YOLO dataset (loading, letterbox/mosaic augmentation, rect batches) and its loader.

Files come from :mod:`utils.image_files`, labels from :mod:`utils.labels` (scan + cache), the yaml from
:mod:`utils.data_config`. Problems in the data never crash an epoch: the scan's drops are
reported in ONE summary warning (count + first files). An image whose label file has an
out-of-range class (``0 <= cls < nc`` fails) is dropped as a whole rather than trained with some
of its objects missing (which would teach the model that those objects are background). An
image that cannot be read at load time is replaced by another one (with a warning).

Size: one class, :class:`YoloDataset` (~270 lines: item loading, RAM cache, mosaic/mixup/warp
augmentation, stand-ins for unreadable images, all sharing its per-epoch state), plus the loader.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, WeightedRandomSampler, get_worker_info

from utils.augment import jitter_hsv, letterbox, mixup, mosaic4, random_warp, resize_to
from utils.boxes import xywhn2xyxy, xyxy2xywhn
from utils.image_files import img2label_paths, list_image_files
from utils.labels import (
    IMAGE_PROBLEMS,
    MAX_LISTED,
    UnreadableImageError,
    cache_path_for,
    scan_dataset,
    warn_each_unreadable,
)

LOGGER = logging.getLogger(__name__)

STAND_IN_TRIES = 8  # other images tried in place of one that cannot be read at load time

# Augmentation defaults = data/hyps/hyp.scratch-low.yaml, used for keys a given hyp lacks.
AUG_DEFAULTS: dict[str, float] = {
    "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5,
    "shear": 0.0, "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0,
}


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------
def load_bgr(path: str) -> np.ndarray:
    """Read an image as HWC uint8 BGR (OpenCV first, PIL as a fallback for formats it lacks)."""
    im = cv2.imread(path, cv2.IMREAD_COLOR)
    if im is None:
        try:
            with Image.open(path) as pil:
                im = cv2.cvtColor(np.asarray(pil.convert("RGB")), cv2.COLOR_RGB2BGR)
        except Exception as e:
            raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e
    return im


AUTO_CACHE_FRACTION = 0.125  # --cache auto: at most 1/8 of the available memory per process


def available_memory() -> int:
    """Bytes of memory available to new allocations (Linux MemAvailable); 0 when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def long_side_hw(hw: tuple[int, int], size: int) -> tuple[int, int]:
    """(h, w) scaled by one factor f = size / max(h, w), each side rounded UP: (⌈h·f⌉, ⌈w·f⌉).

    YOLOv5's loader sizes images this way (measured on its 7.0 loader with odd-sized images: a
    159×289 image at 160 px becomes 89×160, not 88×160), floating point included: 163×281 at 160 px
    becomes 93×161, since 281·(160/281) = 160.00000000000003. Same input pixels, same predictions.
    """
    factor = size / max(hw)
    return max(math.ceil(hw[0] * factor), 1), max(math.ceil(hw[1] * factor), 1)


def rect_batch_shapes(aspect: np.ndarray, batch_size: int, imgsz: int, stride: int, pad: float) -> np.ndarray:
    """Per-batch (h, w) input shapes (nb, 2) int for rectangular batches of images sorted by aspect.

    aspect: (n,) h/w of each image, in batch order; batch b holds images [b·bs, (b+1)·bs).
    An image scaled to long side ``imgsz`` is ``imgsz·(a, 1)`` when a ≤ 1 and ``imgsz·(1, 1/a)``
    otherwise, so the batch needs height ``imgsz·min(1, max a)`` and width ``imgsz·min(1, 1/min a)``.
    Each side then gets ``pad`` strides of margin (YOLOv5 validation uses 0.5) and goes up to the
    next multiple of ``stride``: ``stride·ceil(need/stride + pad)``.
    """
    starts = np.arange(0, len(aspect), max(int(batch_size), 1))
    tallest = np.maximum.reduceat(aspect, starts)
    widest = np.minimum.reduceat(aspect, starts)
    need = np.stack((np.minimum(tallest, 1.0), np.minimum(1.0 / widest, 1.0)), axis=1) * imgsz
    return np.ceil(need / stride + pad).astype(int) * stride


class YoloDataset(Dataset):
    """Images + YOLO labels with YOLOv5-style training augmentation.

    Attributes: ``im_files`` (list[str]), ``label_files``, ``labels`` (list of (n, 5) float32
    arrays ``[cls, xc, yc, w, h]`` normalised to the original image), ``shapes`` ((N, 2) int array
    of original (w, h), YOLOv5's order), ``batch_shapes`` ((nb, 2) (h, w) when ``rect``), ``nc``.

    Item ``i`` → ``(img uint8 tensor (3, H, W) RGB, labels float32 (n, 6) [0, cls, xc, yc, w, h]
    normalised to the returned image, path, (h0, w0), ratio_pad)`` where ``ratio_pad`` =
    ``((rh, rw), (padw, padh))`` maps returned pixels back to the original
    (``x0 = (x - padw) / rw``), or None for mosaic images (several sources, no single mapping).
    Column 0 is filled with the batch index by :func:`collate_fn`.

    Augmentation (``augment=True``): mosaic with probability ``hyp['mosaic']`` (off when ``rect``),
    else letterbox; then random perspective, mixup (probability ``hyp['mixup']``, mosaic only),
    HSV jitter and flips. Each item draws its randomness from a generator seeded with
    (seed, epoch, index) — see :meth:`set_epoch` — so an epoch's batches depend on nothing else: not
    on the worker count, not on what ran before. That is what lets ``--resume`` continue exactly.
    """

    def __init__(
        self,
        sources: str | Path | Sequence[str | Path],
        imgsz: int = 640,
        batch_size: int = 16,
        augment: bool = False,
        hyp: dict | None = None,
        rect: bool = False,
        cache: str | bool | None = None,
        stride: int = 32,
        pad: float = 0.0,
        single_cls: bool = False,
        seed: int = 0,
        nc: int | None = None,
        processes: int = 1,
    ) -> None:
        self.imgsz, self.augment, self.rect, self.stride, self.pad = int(imgsz), augment, rect, int(stride), pad
        self.hyp = {**AUG_DEFAULTS, **(hyp or {})}
        self.mosaic = augment and not rect  # rectangular batches need one image per item
        self.seed, self.epoch = seed, 0
        self.rng = np.random.default_rng(seed)
        # Mosaic canvas reused item after item (each worker process has its own): a fresh 2·imgsz
        # canvas is ≥ 4 MB at 640 px, which numpy backs with huge pages that the kernel zeroes on
        # first touch; reusing it took a 640-px item from 14 to 9 ms of CPU in one process.
        self._canvas: np.ndarray | None = None
        self.nc = nc

        im_files = list_image_files(sources)
        label_files = img2label_paths(im_files)
        scan = scan_dataset(im_files, label_files, cache_path_for(label_files))
        self.scan_from_cache = scan["from_cache"]
        keep, skipped, repaired = self._filter(im_files, label_files, scan, nc)
        if not keep:
            listed = "; ".join(f"{Path(f).name}: {why}" for f, why in skipped[:MAX_LISTED])
            raise ValueError(f"no usable images in {sources}: all {len(im_files)} were skipped ({listed})")
        self._report(len(im_files), keep, skipped, repaired, scan)

        self.im_files = [im_files[i] for i in keep]
        self.label_files = [label_files[i] for i in keep]
        self.labels = [scan["labels"][i].copy() for i in keep]
        self.shapes = np.array([scan["shapes"][i] for i in keep], dtype=np.int64).reshape(-1, 2)
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0
        self.n = len(self.im_files)
        self.batch_shapes = None
        self.batch_index = np.floor(np.arange(self.n) / max(batch_size, 1)).astype(int)
        if rect:
            self._make_rect(batch_size)

        # One flag per image, in shared memory so that every loader worker sees it: set when the
        # image was found unreadable and warned about (once per file, not once per worker or epoch).
        self._warned_unreadable = torch.zeros(self.n, dtype=torch.uint8).share_memory_()
        self.ims: list[tuple | None] = [None] * self.n
        self._cache_images(cache, processes)

    # ---- construction helpers
    def _cache_images(self, cache: str | bool | None, processes: int = 1) -> None:
        """``cache='ram'`` (or True): read and resize every image now, in threads. ``'auto'``: the same
        when the resized images take at most :data:`AUTO_CACHE_FRACTION` of the available memory
        shared by ``processes`` (DDP ranks, each with its own cache); a mosaic reads four images per
        item, so a small set is then decoded once instead of ~4x per epoch, with the same batches.
        ``'none'``/None: read from disk every time."""
        if cache is True:
            cache = "ram"
        if cache not in (None, False, "ram", "auto", "none"):
            raise ValueError(f"cache={cache!r} is not supported (use 'ram', 'auto' or 'none')")
        if cache == "auto":
            need, free = self.resized_bytes(), available_memory()
            cache = "ram" if free and need * max(processes, 1) <= AUTO_CACHE_FRACTION * free else None
            if cache:
                LOGGER.info("--cache auto: the resized images (%.0f MB) fit in RAM (%.1f GB available); "
                            "--cache none reads them from disk", need / 2**20, free / 2**30)
        if cache == "ram":
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                self.ims = list(pool.map(self._read_resized_or_none, range(self.n)))
            mb = sum(x[0].nbytes for x in self.ims if x is not None) / 2**20
            LOGGER.info("cached %d images in RAM (%.0f MB)", self.n, mb)

    def resized_bytes(self) -> int:
        """Bytes the RAM cache takes: every image resized to its long side ``imgsz``, 3 channels, uint8."""
        total = 0
        for w0, h0 in self.shapes:  # scan shapes are (w, h)
            h, w = long_side_hw((int(h0), int(w0)), self.imgsz)
            total += 3 * h * w
        return total

    @staticmethod
    def _filter(im_files, label_files, scan, nc):
        keep, skipped, repaired = [], [], []
        for i, f in enumerate(im_files):
            err = scan["errors"][i]
            lb = scan["labels"][i]
            if not err and nc is not None and len(lb) and (lb[:, 0] >= nc).any():
                err = f"{Path(label_files[i]).name}: class {int(lb[:, 0].max())} out of range (nc={nc})"
            if err:
                skipped.append((f, err))
                continue
            if scan["notes"][i]:
                repaired.append((label_files[i], scan["notes"][i]))
            keep.append(i)
        return keep, skipped, repaired

    @staticmethod
    def _report(total, keep, skipped, repaired, scan):
        nbox = sum(len(scan["labels"][i]) for i in keep)
        nbg = sum(1 for i in keep if not len(scan["labels"][i]))
        src = "cache" if scan["from_cache"] else "scan"
        LOGGER.info("%d images (%d background), %d boxes, %d skipped [%s]", len(keep), nbg, nbox, len(skipped), src)
        unreadable = [(f, why) for f, why in skipped if why.startswith(IMAGE_PROBLEMS)]
        warn_each_unreadable(unreadable)
        skipped = [item for item in skipped if item not in unreadable]
        parts = []
        if skipped:
            listed = "; ".join(f"{f}: {why}" for f, why in skipped[:MAX_LISTED])
            more = f" (+{len(skipped) - MAX_LISTED} more)" if len(skipped) > MAX_LISTED else ""
            parts.append(f"skipped {len(skipped)} of {total} images: {listed}{more}")
        if repaired:
            listed = "; ".join(f"{f}: {why}" for f, why in repaired[:MAX_LISTED])
            more = f" (+{len(repaired) - MAX_LISTED} more)" if len(repaired) > MAX_LISTED else ""
            parts.append(f"repaired {len(repaired)} label file(s): {listed}{more}")
        if parts:  # one warning per dataset, however many files are affected
            LOGGER.warning("dataset problems: %s", " | ".join(parts))

    def _make_rect(self, batch_size: int) -> None:
        """Order the images by aspect ratio h/w and give each batch its own shape (:func:`rect_batch_shapes`).

        The order is numpy's default ``argsort`` (introsort, not stable), the one YOLOv5 uses: images
        of equal aspect are then in the same order as there, and so are the batches they share,
        which keeps mAP comparisons with YOLOv5 exact.
        """
        aspect = self.shapes[:, 1] / self.shapes[:, 0]  # shapes are (w, h)
        order = np.argsort(aspect)
        self.im_files, self.label_files, self.labels = (
            [seq[i] for i in order] for seq in (self.im_files, self.label_files, self.labels))
        self.shapes = self.shapes[order]
        self.batch_shapes = rect_batch_shapes(aspect[order], batch_size, self.imgsz, self.stride, self.pad)

    # ---- loading
    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of ``epoch`` (call before the loader starts its workers)."""
        self.epoch = int(epoch)

    def _read_resized(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        im = load_bgr(self.im_files[i])
        hw0 = im.shape[:2]
        hw = long_side_hw(hw0, self.imgsz)
        im = resize_to(im, hw, fast=self.augment)  # the warp resamples augmented images again
        return im, hw0, hw

    def load_image(self, i: int) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
        """(BGR image resized so its long side is imgsz, (h0, w0) original, (h, w) resized)."""
        cached = self.ims[i]
        if cached is not None:
            return cached[0].copy(), cached[1], cached[2]
        return self._read_resized(i)

    def _load_mosaic(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        picks = [index, *(int(j) for j in self.rng.integers(0, self.n, 3))]
        self.rng.shuffle(picks)  # the item's own image takes any of the four tiles, as in YOLOv5
        items = [(self.load_image(j)[0], self.labels[j]) for j in picks]
        img, px = mosaic4(items, self.imgsz, self.rng, out=self._canvas)
        self._canvas = img  # free to reuse: the warp below always writes a new (imgsz, imgsz) image
        return random_warp(img, px, self.rng, out_hw=(self.imgsz, self.imgsz), **self.warp_ranges)

    @property
    def warp_ranges(self) -> dict[str, float]:
        """The hyp entries :func:`random_warp` draws its geometry from."""
        return {k: float(self.hyp[k]) for k in ("degrees", "translate", "scale", "shear", "perspective")}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        return self._item_or_stand_in(index)

    def _build_item(self, index: int):
        h = self.hyp
        self.rng = np.random.default_rng([self.seed, self.epoch, index])
        ratio_pad = None
        if self.mosaic and self.rng.random() < h["mosaic"]:
            img, px = self._load_mosaic(index)
            if self.rng.random() < h["mixup"]:
                img2, px2 = self._load_mosaic(int(self.rng.integers(0, self.n)))
                img, px = mixup(img, px, img2, px2, self.rng)
            h0, w0 = int(self.shapes[index][1]), int(self.shapes[index][0])
        else:
            img, (h0, w0), (hr, wr) = self.load_image(index)
            shape = tuple(self.batch_shapes[self.batch_index[index]]) if self.rect else self.imgsz
            img, (rw, rh), (padw, padh) = letterbox(img, shape, auto=False, scaleup=self.augment)
            lb = self.labels[index]
            px = np.zeros((len(lb), 5), dtype=np.float32)
            if len(lb):
                px[:, 0] = lb[:, 0]
                px[:, 1:] = xywhn2xyxy(lb[:, 1:], rw * wr, rh * hr, padw=padw, padh=padh)
            ratio_pad = ((hr / h0, wr / w0), (padw, padh))
            if self.augment:
                img, px = random_warp(img, px, self.rng, **self.warp_ranges)

        H, W = img.shape[:2]
        labels = np.zeros((len(px), 5), dtype=np.float32)
        if len(px):
            labels[:, 0] = px[:, 0]
            labels[:, 1:] = xyxy2xywhn(px[:, 1:5], W, H, clip=True, eps=1e-3)
        if self.augment:
            img = jitter_hsv(img, h["hsv_h"], h["hsv_s"], h["hsv_v"], rng=self.rng)
            if self.rng.random() < h["flipud"]:
                img = np.flipud(img)
                labels[:, 2] = 1 - labels[:, 2]
            if self.rng.random() < h["fliplr"]:
                img = np.fliplr(img)
                labels[:, 1] = 1 - labels[:, 1]
            # Flips can undo ratio_pad's meaning; only un-augmented items are mapped back anyway.

        out = torch.zeros((len(labels), 6), dtype=torch.float32)
        out[:, 1:] = torch.from_numpy(labels)
        chw = np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))  # BGR HWC → RGB CHW
        return torch.from_numpy(chw), out, self.im_files[index], (h0, w0), ratio_pad


    # ---- images that cannot be read at load time (a file that broke after the scan)
    def _read_resized_or_none(self, i: int) -> tuple | None:
        """`_read_resized` for the RAM cache; None (read again, and handled, at load time) if unreadable."""
        try:
            return self._read_resized(i)
        except UnreadableImageError as e:
            self._warn_unreadable(e)
            return None

    def _warn_unreadable(self, error: UnreadableImageError) -> None:
        """One warning per file for the whole run, whichever worker process meets it first."""
        i = self.im_files.index(error.path) if error.path in self.im_files else None
        if i is not None and self._warned_unreadable[i]:
            return
        if i is not None:
            self._warned_unreadable[i] = 1
        what = "replaced by other images" if self.augment else "counted as a blank image without labels"
        LOGGER.warning("%s; %s from now on (fix or remove the file)", error, what)

    def _item_or_stand_in(self, index: int):
        """Item ``index``, or a stand-in when one of its images cannot be decoded.

        Training (``augment``) takes the item of another index drawn from a generator seeded with
        (seed, epoch, index, attempt): the epoch keeps its length and stays a function of (seed,
        epoch), so ``--resume`` still continues exactly. Evaluation must count every image once, so
        there the image becomes a blank (grey) picture without labels.
        """
        try:
            return self._build_item(index)
        except UnreadableImageError as e:
            self._warn_unreadable(e)
        if not self.augment:
            return self._blank_item(index)
        for attempt in range(1, STAND_IN_TRIES + 1):
            other = int(np.random.default_rng([self.seed, self.epoch, index, attempt]).integers(self.n))
            try:
                return self._build_item(other)
            except UnreadableImageError as e:
                self._warn_unreadable(e)
        raise UnreadableImageError(self.im_files[index], f"and {STAND_IN_TRIES} images drawn to replace it are "
                                   "unreadable too; check the dataset's files")

    def _blank_item(self, index: int):
        """Item ``index`` as a grey picture without labels (this process remembers the substitution)."""
        w0, h0 = (int(v) for v in self.shapes[index])
        r = self.imgsz / max(h0, w0)  # about the size `_read_resized` gives; no labels, so exactness is moot
        h, w = max(round(h0 * r), 1), max(round(w0 * r), 1)
        self.ims[index] = (np.full((h, w, 3), 114, dtype=np.uint8), (h0, w0), (h, w))
        self.labels[index] = np.zeros((0, 5), dtype=np.float32)
        return self._build_item(index)

def collate_fn(batch: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...], tuple]:
    """Stack a list of dataset items.

    Returns ``(imgs uint8 (B, 3, H, W), targets float32 (N, 6) [batch_idx, cls, xc, yc, w, h],
    paths, shapes)`` with ``shapes[i] = ((h0, w0), ratio_pad)``.
    """
    imgs, labels, paths, hw0, ratio_pads = zip(*batch)
    for i, lb in enumerate(labels):
        lb[:, 0] = i  # which image of the batch each box belongs to
    return torch.stack(imgs, 0), torch.cat(labels, 0), paths, tuple(zip(hw0, ratio_pads))


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive every RNG of the worker from the loader's seed.

    PyTorch gives worker k the seed ``base_seed + k`` where ``base_seed`` comes from the loader's
    generator, so a seeded generator makes every worker's augmentation reproducible.
    """
    info = get_worker_info()
    seed = info.seed % 2**32
    random.seed(seed)
    np.random.seed(seed)
    cv2.setNumThreads(0)  # workers already run in parallel; OpenCV's own threads only oversubscribe


def default_workers(device: torch.device, processes: int = 1, cpus: int | None = None) -> int:
    """Loader workers per process for ``--workers auto`` (the default).

    A model that trains on the CPU keeps every core busy with its own threads, so worker processes
    only compete with it: on the project's 2-core box the training passes took 4-9 % longer with 2
    workers than with 0 (medians of 3-4 alternating whole runs, `benchmarks/bench_workers.py`:
    yolov5n at 160 and 320 px, and the demo's distillation; benchmarks/results/loader_workers_epyc*.md).
    Hence 0 on a CPU with at most 4 cores per process; 2 otherwise (GPU training, where the CPU is
    free to decode and augment, and larger CPUs, unmeasured).
    """
    cpus = (os.cpu_count() or 1) if cpus is None else cpus
    per_process = max(cpus // max(processes, 1), 1)
    return 0 if device.type == "cpu" and per_process <= 4 else 2


def create_dataloader(
    sources: str | Path | Sequence[str | Path],
    imgsz: int,
    batch_size: int,
    stride: int,
    hyp: dict | None = None,
    augment: bool = False,
    rect: bool = False,
    workers: int = 2,
    shuffle: bool = False,
    rank: int = -1,
    world_size: int = 1,
    seed: int = 0,
    cache: str | bool | None = None,
    single_cls: bool = False,
    pad: float = 0.0,
    nc: int | None = None,
    pin_memory: bool = False,
    image_weights: bool = False,
) -> tuple[DataLoader, YoloDataset]:
    """Build a :class:`YoloDataset` and its DataLoader; returns ``(loader, dataset)``.

    Batches are :func:`collate_fn` tuples. Validation callers use ``rect=True, pad=0.5`` as YOLOv5
    does. ``world_size > 1`` adds a DistributedSampler (shuffled with ``seed``; the trainer calls
    ``loader.sampler.set_epoch(epoch)`` and ``dataset.set_epoch(epoch)``). Non-augmenting loaders keep
    their workers between epochs; augmenting ones restart them so each epoch's augmentation stream
    (seed, epoch, index) reaches them. The same seed gives the same batches. ``nc`` enables the
    class-range check on labels. ``pin_memory``: page-locked batches, only for a loader feeding a GPU
    (pinning starts CUDA). ``image_weights``: draws with replacement by a ``WeightedRandomSampler`` on the
    loader's seeded generator, uniform until the trainer re-weights it (`utils.sampling`; one process).
    """
    if image_weights and (world_size > 1 or rect):  # refused before the dataset is scanned and cached
        raise ValueError("--image-weights draws images one process at a time in random order: it works neither "
                         "under torchrun (DDP) nor with --rect; drop one of them")
    if rect and shuffle:
        LOGGER.warning("rect=True is incompatible with shuffle; shuffle disabled")
        shuffle = False
    rank_offset = max(rank, 0)  # ranks augment differently but shuffle alike (sampler seed)
    dataset = YoloDataset(sources, imgsz=imgsz, batch_size=batch_size, augment=augment, hyp=hyp, rect=rect,
                          cache=cache, stride=stride, pad=pad, single_cls=single_cls, seed=seed + rank_offset,
                          nc=nc, processes=world_size)
    batch_size = min(batch_size, len(dataset))
    nw = max(0, min(int(workers), os.cpu_count() or 1))
    generator = torch.Generator().manual_seed(seed + 1_000_003 * rank_offset)
    sampler = _sampler(dataset, generator, image_weights, world_size, rank_offset, shuffle, seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=nw,
        pin_memory=pin_memory,
        collate_fn=collate_fn,
        worker_init_fn=seed_worker,
        generator=generator,
        # Augmenting loaders restart their workers each epoch so that set_epoch() reaches them.
        persistent_workers=nw > 0 and not augment,
        drop_last=False,
    )
    return loader, dataset



def _sampler(dataset: YoloDataset, generator: torch.Generator, image_weights: bool, world_size: int,
             rank: int, shuffle: bool, seed: int) -> Sampler | None:
    """The loader's sampler: weighted draws (``image_weights``), one share per DDP rank, or None (the
    DataLoader's own sequential/shuffled order)."""
    if image_weights:
        return WeightedRandomSampler(torch.ones(len(dataset), dtype=torch.float64), len(dataset),
                                     replacement=True, generator=generator)
    if world_size > 1:
        return DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    return None


def set_loader_epoch(loader: DataLoader, epoch: int, seed: int) -> None:
    """The one epoch-seeding rule: the data order and augmentation of ``epoch`` are a function of
    (``seed``, ``epoch``) alone, so a resumed run sees exactly the batches the uninterrupted run
    would have seen (sampler epoch, loader generator ``seed + epoch``, dataset augmentation stream)."""
    sampler = loader.sampler
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    if loader.generator is not None:
        loader.generator.manual_seed(seed + epoch)
    loader.dataset.set_epoch(epoch)
