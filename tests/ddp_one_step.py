"""One training step of the pico model, in one process on a whole batch or under torchrun on each rank's
share of it (gloo, CPU). Used by `tests/test_train.py::test_ddp_step_equals_the_single_process_step`.

The batch is the same images repeated once per rank, so every rank's share holds the same images:
BatchNorm's batch statistics and the loss's per-image means are then equal on every rank and in the
whole batch, and the whole batch's loss is exactly the sum of the ranks' losses. One optimizer step must
then give the same weights either way (up to summation order).

Run from the repository root as ``python -m torch.distributed.run --nproc_per_node 2 -m tests.ddp_one_step
OUT.pt``: rank 0 saves the student's parameters after the step to OUT.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

from engine.step import build_step_state, train_step
from models import load_model
from utils.loss import scale_hyp
from utils.precision import Precision
from utils.torch_utils import DistInfo, dist_info

REPO = Path(__file__).resolve().parents[1]

IMAGES_PER_SHARE = 2
FP32 = Precision("cpu", None, "test")


def share(copies: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``copies`` repetitions of the same IMAGES_PER_SHARE images and their boxes, (B,3,64,64) uint8, (N,6)."""
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (IMAGES_PER_SHARE, 3, 64, 64), generator=g, dtype=torch.uint8)
    boxes = torch.tensor([[0, 0, 0.3, 0.4, 0.2, 0.3], [0, 1, 0.7, 0.6, 0.4, 0.5], [1, 2, 0.5, 0.5, 0.6, 0.4]])
    targets = [boxes + torch.tensor([k * IMAGES_PER_SHARE, 0, 0, 0, 0, 0]) for k in range(copies)]
    return imgs.repeat(copies, 1, 1, 1), torch.cat(targets)


def student() -> torch.nn.Module:
    """The pico student every process starts from (same seed, same weights)."""
    torch.manual_seed(0)
    return load_model(str(REPO / "models/yolov5p.yaml"), nc=3).train()


def one_step(info: DistInfo, global_batch: int) -> dict[str, torch.Tensor]:
    """The student's parameters after one step on this process's share of ``global_batch`` images."""
    model = student()
    hyp = yaml.safe_load((REPO / "data/hyps/hyp.scratch-low.yaml").read_text())
    hyp["label_smoothing"] = 0.0
    state = build_step_state(model, None, hyp, scale_hyp(hyp, 3, 3, 64), FP32, global_batch, global_batch)
    if info.distributed:
        state.model, state.info = DistributedDataParallel(model), info
    imgs, targets = share(global_batch // IMAGES_PER_SHARE // info.world_size)
    assert train_step(state, imgs, targets, ni=0, accumulate=1) is not None
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    info = dist_info()
    weights = one_step(info, IMAGES_PER_SHARE * info.world_size)
    if info.rank == 0:
        torch.save(weights, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
