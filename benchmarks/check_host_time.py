"""How long the host takes to issue one ``matmul`` call, against the GPU spin that
``bench_kernels.gpu_time_us`` puts before each timed call (issue 5, stop 15; CUDA only).

    python benchmarks/check_host_time.py [--out DIR] [--layer | --reduce-overhead]

For each shape and batch (4-bit, 0.5% random outliers, fp16 x, the default kernel): the host
time of 200 calls issued while the GPU spins (median, 90th percentile, max), and the kernel's
median GPU time with the old fixed spin (``SLEEP_CYCLES``, ~155 us on the H100) and with the
adaptive one. Where the host's time reaches the spin, the timed region waits for the host.

``--layer``: the steady-state host time per call of a whole layer as eager PyTorch runs it
(``nn.Linear`` in fp16 against ``QuantLinear`` on the fused kernels, and against ``QuantLinear``
with ``EASYQUANT_DIRECT_LAUNCH=0``; 11008x4096, batch 1 and 16:
300 calls queued back to back behind a long GPU spin, so that the host never waits for the
GPU), and where ``QuantLinear``'s time goes (cProfile, the top functions by own time).

``--reduce-overhead``: a stack of eight ``QuantLinear`` layers (4096 -> 11008 -> 4096, batch 1)
eager, under ``torch.compile`` (default mode) and under ``torch.compile(mode="reduce-overhead")``
(CUDA graphs through torch's cudagraph trees): the same outputs, and the wall time per forward of
each (synchronised, 200 calls).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import bench_kernels as bk
from benchlib import write_result
from easyquant.kernels import triton_matmul as tm

CASES = [(14336, 4096), (4096, 11008), (11008, 4096), (4096, 4096)]
BATCHES = (1, 16, 32, 64)


def per_call_us(fn, calls: int = 300) -> float:
    """Host microseconds per call, the GPU kept busy (so no call waits for it)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(700_000_000)  # (~0.5 s: longer than the calls take to issue; few calls,
    # so the launch queue never fills)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = time.perf_counter() - start
    torch.cuda.synchronize()
    return seconds / calls * 1e6


def layer_host_time(out: Path) -> None:
    import cProfile
    import io
    import pstats

    from torch import nn

    from easyquant import QuantConfig, QuantLinear

    torch.manual_seed(0)
    n, k = 11008, 4096
    linear = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
    layer = QuantLinear.from_linear(linear, QuantConfig(method="rtn")).cuda()
    # the same codes with the kernels launched through Triton on every call (the layer's
    # plans still cached: easyquant.kernels.launch reads the switch at each Triton launch)
    bound = QuantLinear.from_linear(linear, QuantConfig(method="rtn")).cuda()
    rows, profiles = [], {}
    for m in (1, 16):
        x = torch.randn(1, m, k, device="cuda", dtype=torch.float16)
        with torch.no_grad():
            fp16 = per_call_us(lambda x=x: linear(x))
            quant = per_call_us(lambda x=x: layer(x))
            os.environ["EASYQUANT_DIRECT_LAUNCH"] = "0"
            through_triton = per_call_us(lambda x=x: bound(x))
            del os.environ["EASYQUANT_DIRECT_LAUNCH"]
            same = torch.equal(layer(x), bound(x))
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(500):
                layer(x)
            profiler.disable()
        torch.cuda.synchronize()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        profiles[f"batch {m}"] = text.getvalue()
        row = {"shape": f"{n}x{k}", "batch": m, "nn_linear_fp16_us": round(fp16, 1),
               "quant_linear_us": round(quant, 1),
               "quant_linear_through_triton_us": round(through_triton, 1),
               "same_output": same}  # fmt: skip
        rows.append(row)
        print(row, flush=True)
        print(text.getvalue(), flush=True)
    note = (
        "Host time per call of one layer in eager PyTorch, steady state (300 calls queued "
        "behind a GPU spin): nn.Linear fp16 against QuantLinear on the fused kernels (4-bit "
        "RTN codes; through_triton: with EASYQUANT_DIRECT_LAUNCH=0, each kernel launched "
        "through Triton's JITFunction.run; same_output: the two layers' outputs equal), and "
        "cProfile's top functions of 500 QuantLinear calls."
    )
    path = write_result("host-time-layer", "cuda", {"note": note, "rows": rows,
                                                     "profiles": profiles}, out)  # fmt: skip
    print(f"wrote {path}")


def reduce_overhead(out: Path) -> None:
    from torch import nn

    from easyquant import QuantConfig, QuantLinear

    torch.manual_seed(0)
    layers = []
    for i in range(8):
        n, k = (11008, 4096) if i % 2 == 0 else (4096, 11008)
        linear = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
        layers.append(QuantLinear.from_linear(linear, QuantConfig(method="rtn")).cuda())
    stack = nn.Sequential(*layers)
    fp16 = nn.Sequential(*[nn.Linear(q.in_features, q.out_features, bias=False, device="cuda",
                                     dtype=torch.float16) for q in layers])  # fmt: skip
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)

    def wall_us(fn, calls: int = 200) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls * 1e6

    with torch.no_grad():
        eager_out = stack(x).clone()
        eager = wall_us(lambda: stack(x))
        fp16_eager = wall_us(lambda: fp16(x))
        plain = torch.compile(stack)  # default mode: no CUDA graphs, the host issues each op
        fp16_plain = torch.compile(fp16)
        plain_diff = float((plain(x).float() - eager_out.float()).abs().max())
        default_us = wall_us(lambda: plain(x))
        fp16_default_us = wall_us(lambda: fp16_plain(x))
        compiled = torch.compile(stack, mode="reduce-overhead")
        fp16_compiled = torch.compile(fp16, mode="reduce-overhead")
        got = compiled(x).clone()
        graphs = wall_us(lambda: compiled(x))
        fp16_graphs = wall_us(lambda: fp16_compiled(x))
        got = compiled(x).clone()
    diff = float((got.float() - eager_out.float()).abs().max())
    row = {
        "layers": "8 x (4096 -> 11008 -> 4096 alternating), batch 1, fp16",
        "quant_eager_us": round(eager, 1),
        "quant_reduce_overhead_us": round(graphs, 1),
        "fp16_eager_us": round(fp16_eager, 1),
        "fp16_reduce_overhead_us": round(fp16_graphs, 1),
        "quant_compile_default_us": round(default_us, 1),
        "fp16_compile_default_us": round(fp16_default_us, 1),
        "max_abs_diff_compiled_vs_eager": diff,
        "max_abs_diff_compile_default_vs_eager": plain_diff,
    }
    print(row, flush=True)
    note = (
        "Eight QuantLinear layers (4-bit RTN codes) eager, under torch.compile (default mode: "
        "no CUDA graphs) and under torch.compile(mode='reduce-overhead'), against the same "
        "stack of fp16 nn.Linear: wall time per forward (synchronised, 200 calls) and the "
        "largest differences of the compiled outputs."
    )
    path = write_result("reduce-overhead", "cuda", {"note": note, "rows": [row]}, out)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or bk.RESULTS))
    parser.add_argument("--layer", action="store_true", help="a whole layer's host time instead")
    parser.add_argument(
        "--reduce-overhead", action="store_true", help="torch.compile(mode='reduce-overhead')"
    )
    args = parser.parse_args()
    bk.warm_up("cuda")
    if args.layer:
        layer_host_time(args.out)
        return
    if args.reduce_overhead:
        reduce_overhead(args.out)
        return
    per_us = bk.spin_cycles_per_us()
    fixed_us = bk.SLEEP_CYCLES / per_us
    print(f"spin: {per_us:.0f} cycles per us; SLEEP_CYCLES = {fixed_us:.0f} us", flush=True)
    rows = []
    for n, k in CASES:
        weight = bk.kernel_weight(bk.random_parts(n, k, 4, None, 0.005, seed=n + 4, device="cuda"))
        for m in BATCHES:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)

            def fn(x=x, weight=weight):
                return tm.matmul(weight, x, None)

            fn()
            torch.cuda.synchronize()
            host = bk.host_issue_us(fn, 200, spin=2_000_000)
            adaptive = bk.gpu_time_us(fn)
            fixed = bk.gpu_time_us(fn, adaptive=False)
            row = {
                "shape": f"{n}x{k}",
                "batch": m,
                "config": str(tm.default_config(weight, m)),
                "host_us_median": round(statistics.median(host), 1),
                "host_us_p90": round(host[int(0.9 * len(host))], 1),
                "host_us_max": round(host[-1], 1),
                "gpu_us_fixed_spin": round(fixed, 2),
                "gpu_us_adaptive_spin": round(adaptive, 2),
            }
            rows.append(row)
            print(row, flush=True)
    note = (
        "Host time to issue one matmul call (perf_counter around the call while the GPU spins) "
        f"against the fixed spin before each timed call ({fixed_us:.0f} us) and the GPU-time "
        "medians with that spin and with gpu_time_us's adaptive one (4x the longest of five "
        "host times)."
    )
    path = write_result("host-time", "cuda", {"note": note, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
