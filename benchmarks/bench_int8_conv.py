"""Could an INT8 teacher pay on the CPU? One conv + SiLU layer in bf16 vs PyTorch's eager INT8 kernels.

Usage (from the repo root)::

    python -m benchmarks.bench_int8_conv            # yolov5s-like layers, batch 16, 320 px input

Per layer shape (the 3×3 and 1×1 convolutions of a yolov5s at 320 px input, batch 16), inference only:

- ``bf16``: conv + SiLU in bf16, channels_last (how the teacher runs today);
- ``int8 conv``: the quantized conv alone (``torch.ao.nn.quantized.Conv2d``, x86 engine) — the best
  an INT8 teacher could do per conv;
- ``int8 conv + SiLU``: what an eager INT8 teacher must do, since SiLU has no quantized kernel:
  quantized conv → dequantize → SiLU → quantize.

Scales are arbitrary (speed only, not accuracy). Medians of ``--repeats``; writes
``benchmarks/results/int8_conv.{json,md}`` (``--out``).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.ao.nn.quantized import Conv2d as QuantizedConv2d

from benchmarks.common import RESULTS_DIR, machine_info, publish, summarize, time_block

# (in channels, out channels, feature size, kernel) of yolov5s layers at 320 px input
LAYERS = [(64, 64, 80, 3), (128, 128, 40, 3), (256, 256, 20, 3), (128, 256, 40, 1)]
SCALE, ZERO = 0.05, 128  # activation quantization (speed only)
CPU = torch.device("cpu")


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``repeats`` single calls, after 3 warm-up calls."""
    time_block(fn, 3, CPU)
    return summarize([time_block(fn, 1, CPU) for _ in range(repeats)])["median"] * 1000


def quantized_conv(conv: torch.nn.Conv2d) -> QuantizedConv2d:
    """An INT8 copy of ``conv``: weights per output channel, output at (SCALE, ZERO)."""
    cout = conv.out_channels
    q = QuantizedConv2d(conv.in_channels, cout, conv.kernel_size, padding=conv.padding)
    weight = torch.quantize_per_channel(conv.weight.detach().float(), torch.full((cout,), 0.01),
                                        torch.zeros(cout, dtype=torch.long), 0, torch.qint8)
    q.set_weight_bias(weight, conv.bias.detach().float())
    q.scale, q.zero_point = SCALE, ZERO
    return q


@torch.inference_mode()
def measure(cin: int, cout: int, hw: int, k: int, batch: int, repeats: int) -> dict:
    x = torch.randn(batch, cin, hw, hw).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(cin, cout, k, padding=k // 2).eval()
    conv_bf16 = copy.deepcopy(conv).to(torch.bfloat16).to(memory_format=torch.channels_last)
    x_bf16 = x.to(torch.bfloat16)
    qconv = quantized_conv(conv)
    xq = torch.quantize_per_tensor(x, SCALE, ZERO, torch.quint8)

    def int8_then_silu() -> torch.Tensor:
        return torch.quantize_per_tensor(F.silu(qconv(xq).dequantize()), SCALE, ZERO, torch.quint8)

    return {
        "layer": f"{cin}->{cout}, {hw}x{hw}, k{k}",
        "bf16_ms": median_ms(lambda: F.silu(conv_bf16(x_bf16)), repeats),
        "int8_conv_ms": median_ms(lambda: qconv(xq), repeats),
        "int8_conv_silu_ms": median_ms(int8_then_silu, repeats),
    }


def markdown(result: dict) -> list[str]:
    lines = [
        "# INT8 vs bf16 for one teacher layer (CPU, inference)",
        "",
        f"`python -m benchmarks.bench_int8_conv` — batch {result['batch']}, medians of {result['repeats']}, "
        f"quantized engine `{result['engine']}`; {result['machine']['cpus']} CPUs "
        f"({result['machine']['cpu_model']}, bf16: {result['machine']['cpu_bf16']}), "
        f"torch {result['machine']['torch']}.",
        "",
        "| layer | bf16 conv + SiLU ms | INT8 conv alone ms | INT8 conv + dequantize/SiLU/quantize ms |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['layer']} | {r['bf16_ms']:.2f} | {r['int8_conv_ms']:.2f} | {r['int8_conv_silu_ms']:.2f} |"
              for r in result["rows"]]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=str(RESULTS_DIR / "int8_conv"))
    args = p.parse_args(argv)
    engines = torch.backends.quantized.supported_engines
    engine = "x86" if "x86" in engines else ("fbgemm" if "fbgemm" in engines else "")
    if not engine:
        print(f"SKIP bench_int8_conv: no x86/fbgemm quantized engine in this torch ({engines}); nothing measured")
        return 0
    torch.backends.quantized.engine = engine
    rows = [measure(*layer, args.batch, args.repeats) for layer in LAYERS]
    result = {"batch": args.batch, "repeats": args.repeats, "engine": engine,
              "machine": machine_info(CPU), "rows": rows}
    publish(result, markdown(result), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
