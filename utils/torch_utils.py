"""Torch helpers: device choice, seeding, EMA of weights, distributed-run plumbing.

Nothing here reads the environment at import time: rank and world size come from `dist_info()`,
called when needed, so a module can be imported in any process without side effects.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in a (possibly single-process) run launched by torchrun."""

    rank: int = -1  # global rank, -1 when not distributed
    local_rank: int = -1
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank in (-1, 0)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE variables (set per process by the launcher)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), world)


def select_device(spec: str = "", batch_size: int | None = None, local_rank: int = -1) -> torch.device:
    """Parse a YOLOv5-style device string: '' (auto), 'cpu', '0', '0,1', 'cuda:1', 'mps'.

    Under torchrun each process takes the GPU of its LOCAL_RANK. Raises a one-line error when a
    CUDA device is requested but unavailable.
    """
    spec = str(spec).strip().lower().replace("cuda:", "").replace(" ", "")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps requested but MPS is not available on this machine; use --device cpu")
        return torch.device("mps")
    if spec:
        ids = [int(s) for s in spec.split(",") if s != ""]
        if not torch.cuda.is_available() or max(ids) >= torch.cuda.device_count():
            raise ValueError(
                f"--device {spec} requested but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "use --device cpu or a valid index"
            )
        if batch_size is not None and len(ids) > 1 and batch_size % len(ids):
            raise ValueError(f"--batch-size {batch_size} must be a multiple of the GPU count {len(ids)}")
        index = local_rank if local_rank >= 0 else ids[0]
        return torch.device("cuda", index)
    if torch.cuda.is_available():
        return torch.device("cuda", max(local_rank, 0))
    return torch.device("cpu")


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices). `deterministic` also asks cuDNN for determinism."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def rng_state() -> dict:
    """All RNG states as tensors/plain values so the checkpoint stays `weights_only`-loadable."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of `rng_state()`."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def de_parallel(model: nn.Module) -> nn.Module:
    """The plain module inside a DataParallel / DistributedDataParallel wrapper."""
    return model.module if isinstance(model, (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel)) else model


class ModelEMA:
    """Exponential moving average of a model's floating-point state (weights and BN buffers).

    decay(updates) = d · (1 − exp(−updates / tau)) ramps the averaging in, so early noisy weights are
    forgotten quickly (YOLOv5 uses d = 0.9999, tau = 2000). The EMA copy is what gets validated and
    saved as the deployable model.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000, updates: int = 0) -> None:
        self.ema = copy.deepcopy(de_parallel(model)).eval()
        self.updates = updates
        self.decay_max, self.tau = decay, tau
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def decay(self) -> float:
        return self.decay_max * (1 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay()
        student = de_parallel(model).state_dict()
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(student[name].detach(), alpha=1 - d)


def broadcast_flag(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Share rank 0's boolean decision (e.g. early stop) with every rank."""
    if not info.distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def all_reduce_grads(module: nn.Module, world_size: int) -> None:
    """Average gradients of a module that DDP does not wrap (the distillation adapters)."""
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def state_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter, used to verify that DDP ranks hold identical weights.

    BatchNorm running statistics are left out on purpose: each rank updates them from its own
    batches and DDP re-broadcasts rank 0's copy at the next forward, so they legitimately differ
    after the last step.
    """
    h = hashlib.sha256()
    for name, value in de_parallel(model).named_parameters():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
