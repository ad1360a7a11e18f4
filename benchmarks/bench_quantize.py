"""Quantization speed of quantize_tensor: elements per second, per device, steps and shape.

    python benchmarks/bench_quantize.py [--device cpu|cuda] [--steps 100 500] [--backend torch]

Prints a table and writes benchmarks/results/<device>-<date>-quantize.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchlib import print_table, write_result
from easyquant import QuantConfig, quantize_tensor

SHAPES = [(4096, 4096), (11008, 4096)]


def heavy_tailed(shape: tuple[int, int], device: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(0)
    normal = torch.randn(shape, generator=gen)
    chi = torch.randn(5, *shape, generator=gen).pow(2).mean(0)  # chi-square(5) / 5
    return (normal / chi.sqrt() * 0.02).to(device=device, dtype=dtype)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    rows = []
    for shape in SHAPES:
        weight = heavy_tailed(shape, args.device, dtype)
        for steps in args.steps:
            config = QuantConfig(steps=steps)
            quantize_tensor(weight[:64], config, backend=args.backend)  # warm-up
            times = []
            for _ in range(args.repeats):
                sync(args.device)
                start = time.perf_counter()
                quantize_tensor(weight, config, backend=args.backend)
                sync(args.device)
                times.append(time.perf_counter() - start)
            seconds = sorted(times)[len(times) // 2]
            rows.append(
                {
                    "shape": f"{shape[0]}x{shape[1]}",
                    "steps": steps,
                    "backend": args.backend,
                    "seconds": round(seconds, 4),
                    "Melem/s": round(weight.numel() / seconds / 1e6, 2),
                }
            )
            print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    path = write_result("quantize", args.device, {"dtype": str(dtype), "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
