"""Fused EasyQuant matmul kernels against fp16 cuBLAS ``x @ W.T``, on a CUDA device.

    python benchmarks/bench_kernels.py [--quick] [--sweep] [--out DIR]

1. measures the device copy bandwidth (bytes read + written, as in the issue);
2. checks every kernel against the torch reference on fresh random inputs (ragged shapes, rows
   with no outliers and with many, fp16/bf16/fp32, 2/3/4/8 bits, batch 1/7/16/300);
3. times fp16 cuBLAS and EasyQuant for each shape x batch x outlier fraction (random codes,
   scales and outliers built with ``pack_quantized``; no range search), in the same run.
   ``--sweep`` also times every candidate kernel configuration at 0.5% outliers and reports the
   best (the default configurations of ``easyquant.kernels.triton_matmul`` come from such a sweep).

Times are ``triton.testing.do_bench`` medians; do_bench clears the L2 cache before each call, so
weights that would fit in L2 (4096x4096 int4 is 8 MiB of codes) are read from device memory.
Prints a table and writes ``<device>-<date>-kernels.json`` (device, versions, commit, command).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from triton.testing import do_bench

from benchlib import RESULTS, print_table, write_result
from easyquant.format.qweight import dequantize_parts, pack_quantized
from easyquant.kernels import triton_matmul as tm

SHAPES = [(4096, 4096), (11008, 4096), (14336, 4096), (53746, 14336)]
BATCHES = [1, 16, 1024]
FRACTIONS = [0.0, 0.005, 0.01]

GEMV_SWEEP = [
    tm.GemvConfig(16, 128, 4, 2),
    tm.GemvConfig(32, 128, 4, 2),
    tm.GemvConfig(16, 128, 4, 3),
    tm.GemvConfig(16, 64, 4, 2),
]
SMALL_SWEEP = [
    tm.DotConfig(64, 16, 128, out_chunk=4),
    tm.DotConfig(64, 16, 128, out_chunk=8),
    tm.DotConfig(32, 16, 512, out_chunk=8),
    tm.DotConfig(32, 16, 256, out_chunk=4),
    tm.DotConfig(64, 16, 256, num_stages=4, out_chunk=8),
]
# The fused kernel at large batch (one-hot outliers) measured 10x slower than dequantize + cuBLAS
# (benchmarks/notes-matmul-kernels.md), so large batches are not swept by default.
LARGE_SWEEP: list[tm.DotConfig] = []


def random_weight(
    n: int,
    k: int,
    bits: int,
    group: int | None,
    fraction: float,
    seed: int,
    device: str,
    extreme_rows: bool = False,
) -> tm.Weight:
    """Random codes, scales and outliers (``fraction`` of them in expectation), stored as a
    checkpoint would store them; ``extreme_rows``: row 0 has 30% outliers, row 1 none."""
    gen = torch.Generator(device=device).manual_seed(seed)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    weight = torch.randn(n, k, device=device, generator=gen, dtype=torch.float16) * 0.02
    codes = torch.randint(qmin, qmax + 1, (n, k), device=device, generator=gen, dtype=torch.int8)
    groups = 1 if group is None else k // group
    scales = (torch.rand(n, groups, device=device, generator=gen) * 0.004 + 0.001).half()
    outliers = torch.rand(n, k, device=device, generator=gen) < fraction
    if extreme_rows:
        outliers[0] = torch.rand(k, device=device, generator=gen) < 0.3
        outliers[1] = False
    qw = pack_quantized(weight, codes, scales, outliers, bits, group)
    del weight, codes, outliers
    return tm.Weight(
        qw.qweight,
        qw.scales,
        qw.outlier_indptr,
        qw.outlier_indices,
        qw.outlier_values,
        bits,
        tm.kernel_group(group, k),
        k,
    )


def reference(weight: tm.Weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    dense = dequantize_parts(
        weight.qweight,
        weight.scales,
        weight.indptr,
        weight.indices,
        weight.values,
        weight.bits,
        weight.in_features,
        torch.float64,
    )
    out = x.double() @ dense.T
    return out if bias is None else out + bias.double()


def weight_bytes(weight: tm.Weight) -> int:
    parts = (weight.qweight, weight.scales, weight.indptr, weight.indices, weight.values)
    return sum(t.numel() * t.element_size() for t in parts)


def copy_bandwidth(device: str) -> float:
    src = torch.empty(1 << 28, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def warm_up(device: str, seconds: float = 2.0) -> None:
    """Busy the GPU for a while first, so that the first timings do not see idle clocks."""
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()


def bench(fn: Callable[[], object]) -> float:
    """Median microseconds; inf (and a printed reason) for a kernel that fails to build or run."""
    try:
        return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    except Exception as exc:
        print(f"  failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        return float("inf")


# ---- correctness ---------------------------------------------------------------------------------
def check_kernels(device: str) -> list[dict]:
    rows = []
    # Few distinct in_features: K is a compile-time constant of the kernels.
    f16, b16, f32 = torch.float16, torch.bfloat16, torch.float32
    cases = [
        (4, None, 1000, 4096, (f16, b16, f32)),
        (4, 128, 777, 4096, (f16, b16)),
        (4, None, 300, 1000, (f16, f32)),  # in_features not a multiple of any K tile
        (3, None, 513, 4096, (f16, b16)),
        (3, 64, 300, 4096, (f16,)),
        (2, None, 257, 4096, (f16,)),
        (2, 32, 100, 4096, (f16,)),
        (8, None, 129, 1000, (f16,)),
    ]
    seed = 100
    for bits, group, n, k, dtypes in cases:
        weight = random_weight(n, k, bits, group, 0.01, seed, device, extreme_rows=True)
        seed += 1
        for dtype in dtypes:
            tol = 1e-3 if dtype == torch.float32 else 1e-2
            bias = torch.randn(n, device=device).to(dtype)
            for m in (1, 7, 16, 300):
                x = torch.randn(m, k, device=device).to(dtype)
                ref = reference(weight, x, bias)
                paths = {
                    "small": lambda w, x, b: tm.dot_matmul(w, x, b, tm.DotConfig(32, 16, 128)),
                    "large": lambda w, x, b: tm.dot_matmul(w, x, b, tm.DotConfig(64, 64, 64)),
                    "split": lambda w, x, b: tm.dot_matmul(w, x, b, tm.DotConfig(64, 16, 64, 2)),
                    "dequant": tm.dequant_matmul,
                    "dispatch": tm.matmul,
                }
                if m == 1 and tm.gemv_block_w(weight, 32) is not None:
                    paths["gemv"] = lambda w, x, b: tm.gemv(w, x[0], b).reshape(1, -1)
                for name, fn in paths.items():
                    try:
                        out = fn(weight, x, bias)
                    except Exception as exc:  # a kernel that fails to build is a failed check
                        print(f"  {name} {bits}-bit {dtype} m={m}: {type(exc).__name__}: {exc}")
                        out = torch.full_like(ref, float("nan"))
                    err = float((out.double() - ref).norm() / ref.norm())
                    ok = bool(torch.isfinite(out).all()) and err <= tol
                    rows.append(
                        {
                            "bits": bits,
                            "group": group,
                            "shape": f"{n}x{k}",
                            "dtype": str(dtype).removeprefix("torch."),
                            "batch": m,
                            "path": name,
                            "rel_err": f"{err:.1e}",
                            "ok": ok,
                        }
                    )
    return rows


# ---- timing --------------------------------------------------------------------------------------
def time_configs(weight, x, kind: str, configs: list) -> list[tuple[float, str]]:
    results = []
    for config in configs:
        if kind == "gemv":
            fn = lambda c=config: tm.gemv(weight, x[0], None, c)  # noqa: E731
        else:
            fn = lambda c=config: tm.dot_matmul(weight, x, None, c)  # noqa: E731
        results.append((bench(fn), f"{kind}:{config}"))
    return sorted(results)


def time_default(weight, x) -> tuple[float, str]:
    m = x.shape[0]
    n, k, bits = weight.out_features, weight.in_features, weight.bits
    if m == 1 and tm.gemv_block_w(weight, 32) is not None:
        config: object = tm.gemv_config(n, k, bits)
        name = f"gemv:{config}"
    elif m <= tm.SMALL_BATCH:
        name = f"dot:{tm.small_config(n, k, m, bits)}"
    elif m > tm.LARGE_BATCH and tm.DEQUANT_LARGE:
        name = "dequant+cublas"
    else:
        name = f"dot:{tm.large_config(n, k, m, bits)}"
    return bench(lambda: tm.matmul(weight, x, None)), name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="first two shapes only")
    parser.add_argument("--sweep", action="store_true", help="time every candidate config")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or RESULTS))
    args = parser.parse_args()
    device = args.device
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise SystemExit("bench_kernels needs a CUDA device (the kernels' CPU mode is for tests)")
    torch.manual_seed(0)
    warm_up(device)
    bandwidth = copy_bandwidth(device)
    print(f"device copy bandwidth: {bandwidth:.0f} GB/s (read + write)")

    checks = [] if args.skip_check else check_kernels(device)
    bad = [r for r in checks if not r["ok"]]
    print(f"correctness: {len(checks) - len(bad)}/{len(checks)} kernel runs within tolerance")
    if bad:
        print_table(bad, list(bad[0]))

    shapes = SHAPES[:2] if args.quick else SHAPES
    rows: list[dict] = []
    sweeps: list[dict] = []
    for n, k in shapes:
        dense = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
        for bits in args.bits:
            fractions = FRACTIONS if bits == 4 else [0.005]
            for fraction in fractions:
                weight = random_weight(n, k, bits, None, fraction, seed=n + bits, device=device)
                for m in BATCHES:
                    x = torch.randn(m, k, device=device, dtype=torch.float16)
                    fp16_us = bench(lambda x=x, d=dense: x @ d.T)
                    eq_us, name = time_default(weight, x)
                    candidates = [(eq_us, name)]
                    if args.sweep and bits == 4 and fraction == 0.005:
                        if m == 1:
                            candidates += time_configs(weight, x, "gemv", GEMV_SWEEP)
                        if m <= tm.SMALL_BATCH:
                            candidates += time_configs(weight, x, "dot", SMALL_SWEEP)
                        elif n * k <= 4096 * 14336:  # the fused large-batch kernel is slow
                            candidates += time_configs(weight, x, "dot", LARGE_SWEEP)
                        for us, cand in sorted(candidates):
                            sweeps.append(
                                {
                                    "shape": f"{n}x{k}",
                                    "batch": m,
                                    "us": round(us, 2),
                                    "kernel": cand,
                                }
                            )
                    if m > 1:
                        deq_us = bench(lambda x=x, w=weight: tm.dequant_matmul(w, x, None))
                        candidates.append((deq_us, "dequant+cublas"))
                    best_us, best = min(candidates)
                    moved = weight_bytes(weight) + 2 * m * (k + n)
                    rows.append(
                        {
                            "shape": f"{n}x{k}",
                            "bits": bits,
                            "batch": m,
                            "outliers": f"{fraction:.1%}",
                            "fp16_us": round(fp16_us, 1),
                            "eq_us": round(eq_us, 1),
                            "speedup": round(fp16_us / eq_us, 2),
                            "GB/s": round(moved / (eq_us * 1e-6) / 1e9),
                            "of_copy_bw": f"{moved / (eq_us * 1e-6) / 1e9 / bandwidth:.0%}",
                            "best_us": round(best_us, 1),
                            "best_kernel": best if best != name else "(default)",
                            "default_kernel": name,
                        }
                    )
                    print_table(rows[-1:], list(rows[-1]))
                    del x
                del weight
        del dense
        torch.cuda.empty_cache()

    # outlier overhead: same kernel, same shape and batch, 0.5% against 0%
    base = {(r["shape"], r["batch"]): r["eq_us"] for r in rows if r["outliers"] == "0.0%"}
    for r in rows:
        if r["bits"] == 4 and r["outliers"] != "0.0%":
            r["outlier_overhead"] = f"{r['eq_us'] / base[(r['shape'], r['batch'])] - 1:+.1%}"

    payload = {
        "copy_bandwidth_GBps": round(bandwidth),
        "timing": "triton.testing.do_bench median (L2 cleared before each call), microseconds",
        "weights": "random codes/scales/outliers via pack_quantized, per-channel scales, fp16 x",
        "checks": checks,
        "rows": rows,
        "sweep": sweeps,
    }
    path = write_result("kernels", device, payload, out_dir=args.out)
    if sweeps:
        print()
        print_table(sweeps, list(sweeps[0]))
    print()
    columns = ["shape", "bits", "batch", "outliers", "fp16_us", "eq_us", "speedup", "GB/s"]
    columns += ["of_copy_bw", "outlier_overhead", "best_us", "best_kernel"]
    print_table(rows, columns)
    print(f"\ncopy bandwidth {bandwidth:.0f} GB/s; wrote {path}")


if __name__ == "__main__":
    main()
