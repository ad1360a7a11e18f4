"""Fused EasyQuant matmul kernels against fp16 cuBLAS ``x @ W.T``, on a CUDA device.

    python benchmarks/bench_kernels.py [--quick] [--sweep] [--out DIR]

1. measures the device copy bandwidth (bytes read + written, as in the issue);
2. checks every kernel against the torch reference on fresh random inputs (ragged shapes, rows
   with no outliers and with many, fp16/bf16/fp32, 2/3/4/8 bits, batch 1/7/16/300);
3. times fp16 cuBLAS and EasyQuant for each shape x batch x outlier fraction (random codes,
   scales and outliers built with ``pack_quantized``; no range search), in the same run.
   ``--sweep`` also times the autotuner's candidate configurations at 0.5% outliers and reports
   the best (``benchmarks/explore_matmul.py`` is the wider sweep the defaults come from).

Times are medians of GPU time (``gpu_time_us``): the L2 cache is cleared before each call, so
weights that would fit in L2 (4096x4096 int4 is 8 MiB of codes) are read from device memory, and
the GPU is kept busy meanwhile, so that the host's launch time does not count (as in CUDA graphs;
``triton.testing.do_bench`` counts it whenever it exceeds the cache clear).
Prints a table and writes ``<device>-<date>-kernels.json`` (device, versions, commit, command).
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from triton.testing import do_bench

from benchlib import RESULTS, print_table, write_result
from easyquant.format.qweight import QuantizedWeight, pack_quantized
from easyquant.kernels import triton_matmul as tm

SHAPES = [(4096, 4096), (11008, 4096), (14336, 4096), (53746, 14336)]
BATCHES = [1, 16, 1024]
FRACTIONS = [0.0, 0.005, 0.01]


def random_parts(
    n: int,
    k: int,
    bits: int,
    group: int | None,
    fraction: float,
    seed: int,
    device: str,
    extreme_rows: bool = False,
) -> QuantizedWeight:
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
    return pack_quantized(weight, codes, scales, outliers, bits, group)


def kernel_weight(qw: QuantizedWeight, slots: int | None = None) -> tm.Weight:
    """The kernels' view of a stored weight (outlier table built as QuantLinear builds it)."""
    return tm.Weight.from_csr(
        qw.qweight,
        qw.scales,
        qw.outlier_indptr,
        qw.outlier_indices,
        qw.outlier_values,
        qw.bits,
        tm.kernel_group(qw.group_size, qw.in_features),
        qw.in_features,
        slots=slots,
    )


def random_weight(
    n: int, k: int, bits: int, group: int | None, fraction: float, seed: int, device: str
) -> tm.Weight:
    return kernel_weight(random_parts(n, k, bits, group, fraction, seed, device))


def reference(qw: QuantizedWeight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float64 ``x @ W.T + bias`` from the stored (CSR) form: independent of the kernels' table."""
    out = x.double() @ qw.dequantize(torch.float64).T
    return out if bias is None else out + bias.double()


def weight_bytes(weight: tm.Weight) -> int:
    """Bytes the kernels read for the weight: codes, scales and the outlier table."""
    parts = (weight.qweight, weight.scales, *weight.outliers.tensors())
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


_FLUSH: dict[str, torch.Tensor] = {}
# How the L2 is cleared before each timed call: "write" zeroes a 256 MiB buffer, as
# triton.testing.do_bench does, which leaves the L2 full of dirty lines that the timed kernel then
# writes back as it reads; "read" sums the buffer, which leaves clean lines, as the weights that
# the previous layer's matmul streamed through the L2 are when decoding.
FLUSH_MODES = ("write", "read")
FLUSH_MODE = "write"
# Cycles the GPU spins before each timed call, at least: ~155 us on the H100. gpu_time_us spins
# longer where the host takes longer to issue one call (stop 15: the tensor-core path's two Triton
# launches took a median 87-207 us of host time, results/…-host-time.json; a host that falls
# behind the GPU's repetitions leaves the timed region waiting: a possible cause, not shown, of
# the sporadic slow cases of stops 13-15, e.g. 14336x4096 at batch 16 once timed 194.7 us
# against 34.0).
SLEEP_CYCLES = 200_000


@functools.cache
def spin_cycles_per_us() -> float:
    """``torch.cuda._sleep`` cycles per microsecond on this GPU (measured once)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    torch.cuda._sleep(1_000_000)  # (the first spin also pays the clock's ramp-up)
    events[0].record()
    torch.cuda._sleep(2_000_000)
    events[1].record()
    torch.cuda.synchronize()
    return 2_000_000 / (events[0].elapsed_time(events[1]) * 1e3)


def host_issue_us(fn: Callable[[], object], calls: int, spin: int = SLEEP_CYCLES) -> list[float]:
    """The host's time to issue ``fn`` (microseconds, sorted), each call made while the GPU
    spins for ``spin`` cycles, so that no call waits for the GPU."""
    times = []
    for _ in range(calls):
        torch.cuda._sleep(spin)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
        torch.cuda.synchronize()
    return sorted(times)


def gpu_time_us(fn: Callable[[], object], rep_ms: float = 100.0, adaptive: bool = True) -> float:
    """Median GPU time of ``fn`` in microseconds. Before each timed call the L2 cache is flushed
    (FLUSH_MODE: a 256 MiB memset, as ``triton.testing.do_bench`` does, or a 256 MiB read) and
    then the GPU spins for at least SLEEP_CYCLES and 4x the longest host time of five calls, so
    that the host's launch work (Python, Triton's launcher: 20-250 us) overlaps the spin instead
    of leaving the GPU idle inside the timed region; decoding runs from CUDA graphs, where
    launches cost no host time either. ``adaptive=False``: the fixed spin alone (as before
    stop 15)."""
    device = torch.cuda.current_device()
    flush = _FLUSH.get(str(device))
    if flush is None:
        flush = _FLUSH[str(device)] = torch.zeros(256 << 20, dtype=torch.int8, device="cuda")
    flush_words = flush.view(torch.int32)
    flush_sum = torch.empty((), dtype=torch.int64, device=flush.device)
    fn()
    torch.cuda.synchronize()
    spin = SLEEP_CYCLES
    if adaptive:
        longest = host_issue_us(fn, 5)[-1]
        spin = max(SLEEP_CYCLES, int(4 * longest * spin_cycles_per_us()))
    probe = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    probe[0].record()
    for _ in range(5):
        fn()
    probe[1].record()
    torch.cuda.synchronize()
    estimate = max(probe[0].elapsed_time(probe[1]) / 5, 1e-3)
    reps = int(min(max(rep_ms / estimate, 20), 1000))
    reps = min(reps, max(50, int(300_000 * spin_cycles_per_us() / spin)))  # <= ~0.3 s of spin
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if FLUSH_MODE == "read":
            torch.sum(flush_words, 0, dtype=torch.int64, out=flush_sum)
        else:
            flush.zero_()
        torch.cuda._sleep(spin)
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(a.elapsed_time(b) for a, b in zip(starts, ends, strict=True))
    return times[len(times) // 2] * 1e3


def bench(fn: Callable[[], object]) -> float:
    """Median GPU microseconds (``gpu_time_us``); inf (and a printed reason) for a kernel that
    fails to build or run."""
    try:
        return gpu_time_us(fn)
    except Exception as exc:
        print(f"  failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        return float("inf")


# ---- correctness ---------------------------------------------------------------------------------
def check_kernels(device: str) -> list[dict]:
    rows = []
    # Few distinct in_features: K is a compile-time constant of the kernels.
    f16, b16, f32 = torch.float16, torch.bfloat16, torch.float32
    # (the full matrix, small shapes, is tests/kernels/test_triton_matmul.py; these are the
    # benchmark-sized layouts, one compile each per path: ~60 compiles)
    cases = [
        (4, None, 1000, 4096, (f16, b16, f32)),
        (4, 128, 777, 4096, (f16,)),
        (3, None, 513, 4096, (f16,)),
        (2, None, 257, 4096, (f16,)),
        (8, None, 129, 1000, (f16,)),
    ]
    seed = 100
    for bits, group, n, k, dtypes in cases:
        qw = random_parts(n, k, bits, group, 0.01, seed, device, extreme_rows=True)
        seed += 1
        # the table as QuantLinear builds it, and (first case) cut at 4 slots: overflow
        for slots in (None, 4) if seed == 101 else (None,):
            weight = kernel_weight(qw, slots)
            for dtype in dtypes:
                rows += check_weight(qw, weight, dtype, device)
    return rows


def check_paths(weight: tm.Weight, m: int) -> dict[str, Callable]:
    paths: dict[str, Callable] = {"dispatch": tm.matmul}
    configs: dict[str, tm.GemvConfig | tm.DotConfig] = {
        "small": tm.DotConfig(32, 16, 128),
        "small-xt-split": tm.DotConfig(32, 16, 256, split_k=2, xt=True),
        "planes-xt": tm.DotConfig(32, 16, 512, xt=True, planes=True),
    }
    if m == 1:
        configs["gemv"] = tm.GemvConfig(16, 128)
        configs["gemv-split-order0"] = tm.GemvConfig(8, 64, split_k=3, order=0)
        configs["gemv-order2"] = tm.GemvConfig(8, 512, num_stages=1, order=2)
    if m > 16:
        configs = {"large": tm.DotConfig(64, 64, 64)}
        paths["dequant"] = tm.dequant_matmul
    for name, config in configs.items():
        if tm.fits(weight, config):
            paths[name] = lambda w, x, b, c=config: tm._run(w, x, b, c)
    return paths


def check_weight(qw, weight: tm.Weight, dtype: torch.dtype, device: str) -> list[dict]:
    rows = []
    n, k = qw.shape
    tol = 1e-3 if dtype == torch.float32 else 1e-2
    bias = torch.randn(n, device=device).to(dtype)
    for m in (1, 16, 300):
        x = torch.randn(m, k, device=device).to(dtype)
        ref = reference(qw, x, bias)
        for name, fn in check_paths(weight, m).items():
            try:
                out = fn(weight, x, bias)
            except Exception as exc:  # a kernel that fails to build is a failed check
                print(f"  {name} {qw.bits}-bit {dtype} m={m}: {type(exc).__name__}: {exc}")
                out = torch.full_like(ref, float("nan"))
            err = float((out.double() - ref).norm() / ref.norm())
            ok = bool(torch.isfinite(out).all()) and err <= tol
            rows.append(
                {
                    "bits": qw.bits,
                    "group": qw.group_size,
                    "shape": f"{n}x{k}",
                    "slots": weight.outliers.slots,
                    "overflow": weight.outliers.overflow,
                    "dtype": str(dtype).removeprefix("torch."),
                    "batch": m,
                    "path": name,
                    "rel_err": f"{err:.1e}",
                    "ok": ok,
                }
            )
    return rows


# ---- timing --------------------------------------------------------------------------------------
def config_name(config) -> str:
    return "dequant+cublas" if config is None else f"{type(config).__name__}{config}"


def time_configs(weight, x, configs: list) -> list[tuple[float, str]]:
    results = []
    for config in configs:
        fn = lambda c=config: tm._run(weight, x, None, c)  # noqa: E731
        results.append((bench(fn), config_name(config)))
    return sorted(results)


def time_default(weight, x) -> tuple[float, str]:
    name = config_name(tm.default_config(weight, x.shape[0]))
    return bench(lambda: tm.matmul(weight, x, None)), name


def save(rows: list[dict], checks, sweeps, bandwidth: float, device: str, out: Path) -> Path:
    """Write the JSON result (outlier overhead: same kernel, shape and batch, against 0%)."""
    base = {(r["shape"], r["batch"]): r["eq_us"] for r in rows if r["outliers"] == "0.0%"}
    for r in rows:
        key = (r["shape"], r["batch"])
        if r["bits"] == 4 and r["outliers"] != "0.0%" and key in base:
            r["outlier_overhead"] = f"{r['eq_us'] / base[key] - 1:+.1%}"
    payload = {
        "copy_bandwidth_GBps": round(bandwidth),
        "timing": "median GPU time (L2 cleared, GPU kept busy before each call), microseconds",
        "weights": "random codes/scales/outliers via pack_quantized, per-channel scales, fp16 x",
        "checks": checks,
        "rows": rows,
        "sweep": sweeps,
    }
    return write_result("kernels", device, payload, out_dir=out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="first two shapes only")
    parser.add_argument("--sweep", action="store_true", help="time every candidate config")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or RESULTS))
    parser.add_argument(
        "--fractions", type=float, nargs="+", default=FRACTIONS, help="outlier fractions (4-bit)"
    )
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
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

    warm_up(device)  # the checks leave the GPU idle for minutes: clocks down
    shapes = SHAPES[:2] if args.quick else SHAPES
    rows: list[dict] = []
    sweeps: list[dict] = []
    for n, k in shapes:
        dense = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
        for bits in args.bits:
            fractions = args.fractions if bits == 4 else [0.005]
            for fraction in fractions:
                weight = random_weight(n, k, bits, None, fraction, seed=n + bits, device=device)
                for m in args.batches:
                    x = torch.randn(m, k, device=device, dtype=torch.float16)
                    fp16_us = bench(lambda x=x, d=dense: x @ d.T)
                    eq_us, name = time_default(weight, x)
                    candidates = [(eq_us, name)]
                    if args.sweep and bits == 4 and fraction == 0.005:
                        candidates += time_configs(weight, x, tm.candidates(weight, m))
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
        save(rows, checks, sweeps, bandwidth, device, args.out)  # partial results survive a cut

    path = save(rows, checks, sweeps, bandwidth, device, args.out)
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
