"""Optimizer step time: torch's per-tensor Python loop vs foreach vs the fused kernel (engine.optim's choice).

    python -m benchmarks.bench_optimizer                      # yolov5p and yolov5n, SGD, CPU
    python -m benchmarks.bench_optimizer --models models/yolov5s.yaml --optimizer AdamW

Gradients are random; the step is what `engine.step.optimizer_step` calls once per nominal batch. The
three implementations are timed in interleaved rounds (median). Writes
``benchmarks/results/optimizer_step.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import RESULTS_DIR, machine_info, time_block, write_results
from engine.optim import build_optimizer
from models import load_model

KINDS = {"loop": {"fused": False, "foreach": False}, "foreach": {"fused": False, "foreach": True},
         "fused": {"fused": True, "foreach": False}}


def step_ms(cfg: str, optimizer: str, rounds: int, steps: int) -> dict[str, float]:
    """Median ms per optimizer step of each implementation on the model built from ``cfg``."""
    model = load_model(cfg, nc=80)
    opts = {}
    for kind, flags in KINDS.items():
        opt = build_optimizer([model], optimizer, lr=1e-4, momentum=0.9, weight_decay=5e-4)
        for group in opt.param_groups:
            group.update(flags)
        opts[kind] = opt
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    samples: dict[str, list[float]] = {k: [] for k in KINDS}
    for _ in range(rounds):
        for kind, opt in opts.items():
            samples[kind].append(1000 * time_block(opt.step, steps, torch.device("cpu")))
    return {k: round(statistics.median(v), 2) for k, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["models/yolov5p.yaml", "models/yolov5n.yaml"])
    p.add_argument("--optimizer", default="SGD", choices=["SGD", "Adam", "AdamW"])
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds (median reported)")
    p.add_argument("--steps", type=int, default=10, help="steps per implementation per round")
    p.add_argument("--out", default=str(RESULTS_DIR / "optimizer_step"), help="output path stem")
    args = p.parse_args(argv)
    rows = {cfg: step_ms(cfg, args.optimizer, args.rounds, args.steps) for cfg in args.models}
    md = [f"# {args.optimizer} step on CPU: per-tensor loop vs foreach vs fused", "",
          f"`python -m benchmarks.bench_optimizer`; {torch.get_num_threads()} torch thread(s), "
          f"load average at the end {machine_info(torch.device('cpu')).get('load_average')}.", "",
          "| model | loop ms | foreach ms | fused ms | loop / fused |", "|---|---:|---:|---:|---:|"]
    md += [f"| {cfg} | {r['loop']} | {r['foreach']} | {r['fused']} | {r['loop'] / r['fused']:.1f}× |"
           for cfg, r in rows.items()]
    write_results({"optimizer": args.optimizer, "machine": machine_info(torch.device("cpu")), "ms_per_step": rows},
                  md, args.out)
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
