"""One launch of each small-batch kernel, for Nsight Compute (CUDA only; issue 5).

    ncu --profile-from-start off --clock-control none --cache-control all \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python benchmarks/profile_gemv.py [--shapes 11008x4096 ...] [--batch 16]

For each shape: fp16 cuBLAS ``x @ W.T`` and the kernels that ``matmul`` picks at ``--batch`` rows
(1: the GEMV; 16: x's transposed copy, then the tensor-core kernel), on random 4-bit codes with
0.5% outliers and with none. Everything is compiled and run once first; only the launches
between ``cudaProfilerStart`` and ``cudaProfilerStop`` are profiled, in that order (fp16, GEMV
with outliers, GEMV without). ``--cache-control all`` makes Nsight Compute invalidate the caches
before each one, so every launch reads its weight from device memory with a clean L2.
"""

from __future__ import annotations

import argparse

import torch

from bench_kernels import random_weight
from easyquant.kernels import triton_matmul as tm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "14336x4096"])
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    cases = []
    for text in args.shapes:
        n, k = (int(v) for v in text.split("x"))
        dense = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        x = torch.randn(args.batch, k, device="cuda", dtype=torch.float16)
        with_outliers = random_weight(n, k, 4, None, 0.005, seed=n, device="cuda")
        without = random_weight(n, k, 4, None, 0.0, seed=n, device="cuda")
        calls = [
            (f"{text} fp16", lambda x=x, d=dense: x @ d.T),
            (f"{text} 0.5% outliers", lambda x=x, w=with_outliers: tm.matmul(w, x, None)),
            (f"{text} no outliers", lambda x=x, w=without: tm.matmul(w, x, None)),
        ]
        for name, call in calls:
            call()  # compile outside the profiled range
            config = "" if "fp16" in name else tm.default_config(with_outliers, args.batch)
            print(name, config, flush=True)
        cases += calls
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for _, call in cases:
        call()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()


if __name__ == "__main__":
    main()
