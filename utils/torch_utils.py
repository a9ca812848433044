"""Torch helpers: device choice, seeding, EMA of weights, distributed-run plumbing.

Nothing here reads the environment at import time: rank and world size come from `dist_info()`,
called when needed, so a module can be imported in any process without side effects.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.optim.swa_utils import AveragedModel


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


_CUDA_INDICES = re.compile(r"(?:cuda:?)?(\d+(?:,\d+)*)")  # "0", "0,1", "cuda:1", "cuda0"


def parse_device(spec: str | int | None) -> tuple[str, tuple[int, ...]]:
    """Split a ``--device`` value into (kind, CUDA indices); kind is auto, cpu, mps or cuda.

    Accepted spellings (case and spaces ignored): '' (auto), 'cpu', 'mps', 'cuda', an index such as
    '0' or 'cuda:1', or a list such as '0,1'. Anything else is a one-line ValueError naming --device.
    """
    text = "".join(str("" if spec is None else spec).split()).lower()
    if text in ("", "cpu", "mps", "cuda"):
        return (text or "auto"), ()
    match = _CUDA_INDICES.fullmatch(text)
    if match is None:
        raise ValueError(f"--device {spec}: not a device; use cpu, mps, a CUDA index such as 0, or a list such as 0,1")
    return "cuda", tuple(int(i) for i in match.group(1).split(","))


def select_device(spec: str | int | None = "", batch_size: int | None = None, local_rank: int = -1) -> torch.device:
    """The torch device a ``--device`` value asks for (see `parse_device` for the spellings).

    Auto picks CUDA when present, else the CPU. Under torchrun (``local_rank`` >= 0) the process of
    LOCAL_RANK k takes the k-th listed GPU (``--device 2,3``: GPUs 2 and 3), or GPU k when none are
    listed. With several indices the batch must split evenly across them. Raises a one-line
    ValueError when the request cannot be met on this machine.
    """
    kind, ids = parse_device(spec)
    if kind == "cpu":
        return torch.device("cpu")
    if kind == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps requested but MPS is not available on this machine; use --device cpu")
        return torch.device("mps")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "auto" and not visible:
        return torch.device("cpu")
    if visible == 0 or any(i >= visible for i in ids):
        raise ValueError(f"--device {spec} requested but only {visible} CUDA device(s) are visible; "
                         "use --device cpu or a valid index")
    if batch_size is not None and len(ids) > 1 and batch_size % len(ids):
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the GPU count {len(ids)}")
    if local_rank >= 0:
        gpus = ids or tuple(range(visible))
        if local_rank >= len(gpus):
            raise ValueError(f"--device {spec or '(auto)'}: torchrun started local process {local_rank} but "
                             f"{len(gpus)} GPU(s) are there for it; use --nproc_per_node {len(gpus)}")
        return torch.device("cuda", gpus[local_rank])
    return torch.device("cuda", ids[0] if ids else 0)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


CUBLAS_FIXED_WORKSPACE = ":4096:8"  # what cuBLAS needs for reproducible results (CUDA's documentation)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """``--deterministic``: within the block torch runs only deterministic kernels (an op that has none
    warns instead of failing), cuDNN picks deterministic algorithms without autotuning, and cuBLAS a
    fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, unless the user set it; read when cuBLAS starts, so
    enter the block before the first CUDA matmul). All of it is put back on exit. A no-op when not
    ``enabled``: the same seed then gives the same run on the CPU, but cuDNN's fastest CUDA kernels
    may sum in a different order from run to run. The price on the project's 2-core CPU: ~15 % slower
    steps (torch also fills new tensors, so that reading one before writing it is reproducible too).
    """
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_FIXED_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


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
        # one state per GPU visible when saved; a machine (or CUDA_VISIBLE_DEVICES) with fewer GPUs
        # takes the first ones, where torch's set_rng_state_all would fail on the missing devices
        for index, gpu_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gpu_state, index)


_WRAPPER_SLOTS = ("module", "_orig_mod")  # DDP / DataParallel / AveragedModel; torch.compile


def unwrap_model(model: nn.Module) -> nn.Module:
    """The network inside its wrappers: (Distributed)DataParallel, AveragedModel, torch.compile.

    A wrapper is recognised by its structure, not its class: a module whose one and only child is
    registered as ``module`` (the DDP / DataParallel / AveragedModel convention) or ``_orig_mod``
    (torch.compile's OptimizedModule). Nested wrappers are peeled one by one.
    """
    while True:
        children = list(model._modules.items())
        if len(children) != 1 or children[0][0] not in _WRAPPER_SLOTS or children[0][1] is None:
            return model
        model = children[0][1]


def ema_decay(updates: int | float, decay: float = 0.9999, tau: float = 2000.0) -> float:
    """Weight of the old average at EMA step ``updates``: d = decay · (1 − exp(−updates / tau)).

    d(0) = 0 (the average is the model itself) and d → ``decay`` after a few ``tau`` steps, so the
    random initial weights are forgotten fast while the late average is long (YOLOv5's ramp).
    """
    return decay * -math.expm1(-updates / tau)


class WeightEMA(AveragedModel):
    """Exponential moving average of a model's floating-point state, parameters and BN buffers alike.

    A `torch.optim.swa_utils.AveragedModel` (``use_buffers=True``, so BatchNorm running mean/var are
    averaged as well rather than copied) whose averaging function is the ramped EMA of `ema_decay`:
    at step k, avg ← d(k)·avg + (1 − d(k))·model, done with one fused ``torch._foreach_lerp_`` per
    dtype. Integer buffers (BN ``num_batches_tracked``) follow the model.

    `update` pairs the tensors itself (one walk of each module tree per step) instead of calling
    ``AveragedModel.update_parameters``, which in torch 2.14 walks the tree again for every tensor:
    3.4 → 2.0 ms per step on a YOLOv5 model (~350 tensors; ~1 % of the demo's training time), for
    the same arithmetic (tested equal).

    ``.module`` is the averaged network (validated and saved as the deployable model);
    ``.updates`` is the number of EMA steps taken, as stored in checkpoints under ``updates``.
    AveragedModel's ``n_averaged`` counts the models folded in, the starting copy included, so
    ``n_averaged = updates + 1``; it stays on the CPU, so reading it never waits for a GPU.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        super().__init__(unwrap_model(model), multi_avg_fn=self._blend, use_buffers=True)
        self.decay, self.tau = decay, tau
        self.module.eval().requires_grad_(False)
        self.updates = updates

    @property
    def updates(self) -> int:
        return int(self.n_averaged) - 1

    @updates.setter
    def updates(self, value: int) -> None:
        self.n_averaged.fill_(int(value) + 1)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` (wrapped or not) into the average: one EMA step."""
        source = unwrap_model(model)
        averaged = [*self.module.parameters(), *self.module.buffers()]
        current = [*source.parameters(), *source.buffers()]
        if len(averaged) != len(current):
            raise ValueError(f"EMA: the model has {len(current)} tensors, its average {len(averaged)}")
        groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for avg, cur in zip(averaged, current):
            pair = groups.setdefault(avg.dtype, ([], []))
            pair[0].append(avg)
            pair[1].append(cur.detach().to(avg.device, avg.dtype))
        for group in groups.values():
            self._blend(*group, self.n_averaged)
        self.n_averaged += 1

    def _blend(self, averaged: list[torch.Tensor], current: list[torch.Tensor], _n: torch.Tensor) -> None:
        # Called before n_averaged is incremented (by `update`, or by AveragedModel.update_parameters,
        # which still works): this is step n_averaged.
        if not averaged[0].is_floating_point():
            torch._foreach_copy_(averaged, current)
            return
        d = ema_decay(int(self.n_averaged), self.decay, self.tau)
        torch._foreach_lerp_(averaged, current, 1.0 - d)


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


def broadcast_state(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank ``src``'s parameters and buffers of a module DDP does not wrap (the
    distillation connectors and generators: randomly initialised, and each rank seeds differently).
    Afterwards `all_reduce_grads` keeps them equal."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src)


def state_digest(*models: nn.Module) -> str:
    """SHA-256 of every parameter of ``models``, used to verify that DDP ranks hold identical weights.

    BatchNorm running statistics are left out on purpose: each rank updates them from its own
    batches and DDP re-broadcasts rank 0's copy at the next forward, so they legitimately differ
    after the last step.
    """
    h = hashlib.sha256()
    for model in models:
        for name, value in unwrap_model(model).named_parameters():
            h.update(name.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
