"""The sweep behind the kernel configurations of ``easyquant.kernels.triton_matmul`` (issue 5;
CUDA only).

    python benchmarks/explore_matmul.py [--workers 14] [--shapes 4096x4096 ...] [--write-table]

For each shape (the issue's four, Llama-2-7B's down projection 4096x11008, and its q/k/v and
gate/up fused: 12288x4096, 22016x4096; 4-bit, per-channel scales, fp16 x, random codes) it times
each candidate configuration of the GEMV (batch 1) and of the tensor-core kernels (batch 16) with
0.5% random outliers (kernel table at the default quantile) and with none, the GEMV also with a
table sized for the fullest row and timed by ``triton.testing.do_bench`` (for comparison), and at
batch 1024 the dense-weight kernel and dequantize + cuBLAS. ``--write-table`` records the fastest
configuration per shape for this device in ``src/easyquant/kernels/matmul_configs.json``, which
``matmul`` reads.

Triton compiles one binary per configuration and specialization, ~190 here: worker processes first
launch every candidate once on a small weight with the same specialization (same K, slots,
overflow, divisibility of N), which fills Triton's disk cache; the timing process then only loads
them. Times are GPU-time medians (``bench_kernels.gpu_time_us``: L2 cleared before each call, host
launch time excluded). Nothing else may use the GPU meanwhile: a second process's kernels
time-slice with the timed ones (run 1 of the notes lost its numbers that way). Writes
``explore.json`` (all rows) and prints the best per case.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import triton
import triton.language as tl

import bench_kernels
from easyquant.kernels import triton_matmul as tm

# the shapes, Llama-2-7B's down projection, and its q/k/v and gate/up fused
SHAPES = [
    (4096, 4096),
    (11008, 4096),
    (14336, 4096),
    (53746, 14336),
    (4096, 11008),
    (12288, 4096),
    (22016, 4096),
]
G, D = tm.GemvConfig, tm.DotConfig
SWEEP = "stop12"  # --sweep
ROUNDS = 2  # --rounds
KINDS = ("gemv", "dot", "dequant", "floor", "rows", "mid", "batches", "transpose", "pdl", "split",
         "slots", "loop", "order")


# One step per row block (stop 13): a block covers up to 512 words of each of its rows at once,
# so it waits for memory about once; the grid is then several waves of short-lived blocks
# instead of one wave of blocks each waiting four times (stop 12's Nsight Compute finding).
WIDE = [(2, 512, 4, 1), (4, 512, 4, 1), (4, 512, 8, 1), (8, 512, 8, 1), (16, 512, 8, 1),
        (2, 512, 2, 1), (2, 256, 2, 1), (4, 256, 2, 1), (8, 256, 8, 1)]  # fmt: skip
# The measured table's winners (stop 12) with the code words' loads marked evict_first (stop 13)
EVICT = [(8, 128, 2, 3, False), (16, 128, 2, 3, True), (4, 256, 2, 1, True), (8, 256, 4, 2, True),
         (4, 256, 1, 2, True)]  # fmt: skip


def gemv_candidates(bits: int = 4, sweep: str = "stop12") -> list[tm.GemvConfig]:
    if sweep == "wide":  # stop 12's two winners (same-run reference), then the one-step blocks
        return (
            [G(8, 128, 2, 3, packed=True), G(16, 128, 2, 3, packed=True, xvec=True)]
            + [
                G(bn, bw, w, s, packed=True, xvec=xv)
                for bn, bw, w, s in WIDE
                for xv in (False, True)
            ]
            + [G(bn, bw, w, s, order=2, packed=True) for bn, bw, w, s in WIDE[1:4]]
        )
    if sweep in ("evict", "packed"):
        return [
            G(bn, bw, w, s, packed=True, xvec=xv, evict_first=ev)
            for bn, bw, w, s, xv in EVICT
            for ev in (False, True)
        ]
    if bits in (2, 3):  # the fp32 decode's fallbacks, then the f16x2 dots: 3 bits the triple
        # dot (few registers first), 2 bits the word dot (stop 16)
        fp32 = [(4, 256, 1, 2), (16, 128, 2, 3)]
        packed = {
            3: [(4, 128, 4, 1), (2, 128, 4, 1), (4, 64, 2, 1), (2, 64, 2, 1), (8, 128, 8, 1)],
            2: [(8, 128, 2, 3), (4, 128, 1, 3), (8, 256, 4, 2), (16, 128, 2, 3), (4, 256, 1, 2),
                (8, 64, 2, 3), (16, 64, 4, 3), (8, 128, 4, 2)],
        }[bits]  # fmt: skip
        return [G(bn, bw, w, s) for bn, bw, w, s in fp32] + [
            G(bn, bw, w, s, packed=True) for bn, bw, w, s in packed
        ]
    # (block_n, block_w, warps, stages): the fp32 decode's winners of stop 10 (notes, v5)
    fp32_decode = [(16, 128, 2, 3), (4, 256, 1, 2)]
    # the f16x2 word dot (stop 12), x loaded per code position or as one vector per word
    packed = [(8, 128, 2, 3), (4, 128, 1, 3), (8, 256, 4, 2), (16, 128, 2, 3), (4, 256, 1, 2)]
    return (
        [G(bn, bw, w, s) for bn, bw, w, s in fp32_decode]
        + [G(bn, bw, w, s, packed=True) for bn, bw, w, s in packed]
        + [G(bn, bw, w, s, packed=True, xvec=True) for bn, bw, w, s in packed]
    )


# Batch 16, stop 13: larger and deeper word-plane blocks than stop 10's sweep tried
WIDE_PLANES = [(64, 256, 4, 3), (128, 256, 4, 3), (128, 256, 8, 3), (64, 512, 4, 3),
               (64, 512, 8, 2), (32, 256, 2, 3), (64, 128, 4, 4), (128, 512, 8, 2)]  # fmt: skip


# --sweep split (stop 15): the tensor-core winners with the K loop split over programs (fp32
# atomics into a zeroed output, then a cast): at batch 16 a row block of 11008x4096 is one chain
# of 128 small wgmmas, each waited for, and the 172 blocks fill 1.3 waves of the 132 SMs (it
# helped only where row blocks are few: 4096x11008, notes "Stop 15")
SPLITS = (1, 2, 3, 4, 6, 8)


# --sweep joined (stop 17): each pair of planes (j, j + 4) one product of 2 block_w columns against
# x copied in pair order, loaded unmasked (cp.async), against the packed kernel of the table
# (block_k, split_k, stages; 64 rows, 4 warps)
JOINED = [(512, 1, 3), (256, 1, 4), (512, 2, 3), (256, 4, 3), (256, 6, 3)]


def small_candidates(sweep: str = "stop12") -> list[tm.DotConfig]:
    if sweep == "joined":
        return [D(64, 16, 256, sk, 4, 3, xt=True, planes=True, packed=True) for sk in (1, 4, 6)] + [
            D(64, 16, bk, sk, 4, st, xt=True, planes=True, packed=True, joined=True)
            for bk, sk, st in JOINED
        ]
    if sweep == "split":
        return (
            [D(64, 16, 256, sk, 4, 3, xt=True, planes=True, packed=True) for sk in SPLITS]
            + [D(128, 16, 256, sk, 4, 3, xt=True, planes=True, packed=True) for sk in (1, 2, 4)]
            + [D(32, 16, 256, sk, 2, 3, xt=True) for sk in (1, 2, 4)]
        )
    if sweep == "wide":
        return [D(bn, 16, bk, 1, w, s, xt=True, planes=True) for bn, bk, w, s in WIDE_PLANES]
    if sweep == "evict":  # the table's winners, codes evict_first or not
        return [
            D(bn, 16, bk, 1, w, s, xt=True, planes=True, evict_first=ev)
            for bn, bk, w, s in WIDE_PLANES[:3]
            for ev in (False, True)
        ]
    if sweep == "packed":  # the table's winners, planes decoded one at a time or in pairs
        return (
            [D(32, 16, 256, 1, 2, 3, xt=True)]
            + [  # (the natural-order winner, 4096 rows)
                D(bn, 16, bk, 1, w, s, xt=True, planes=True, packed=pk)
                for bn, bk, w, s in WIDE_PLANES[:3]
                for pk in (False, True)
            ]
        )
    # (block_n, block_k, warps, stages, xt, planes)
    specs = [
        (16, 256, 1, 3, True, False),
        (16, 128, 1, 4, True, False),
        (32, 256, 2, 3, True, False),
        (64, 128, 4, 3, False, False),
        (64, 256, 4, 3, True, True),
    ]
    return [D(bn, 16, bk, 1, w, s, xt=xt, planes=p) for bn, bk, w, s, xt, p in specs]


DEQUANT = [(8, 1024, 8, 2), (4, 1024, 4, 2)]  # (block_n, block_k, warps, stages)
# --sweep dequant (stop 14): the library's default until then first (kept for grouped scales),
# then wider and deeper programs
DEQUANT_WIDE = [(16, 256, 4, 2), (8, 1024, 8, 2), (16, 512, 4, 3), (32, 256, 4, 3),
                (32, 512, 8, 3), (64, 256, 8, 3), (16, 1024, 8, 3), (4, 2048, 8, 2),
                (32, 128, 4, 4), (64, 128, 8, 4),
                # narrower and longer: the first run's trend (8abe4a1)
                (2, 2048, 4, 2), (2, 4096, 8, 1), (4, 4096, 8, 1), (8, 2048, 8, 2), (4, 2048, 4, 2),
                (2, 1024, 4, 2), (1, 4096, 4, 1), (8, 4096, 8, 1), (4, 4096, 16, 1),
                (2, 2048, 8, 2)]  # fmt: skip


# ---- stand-in weights with the same specialization, for the compile workers --------------------
def standin(
    n: int, k: int, slots: int, overflow: bool, bits: int, device: str = "cuda"
) -> tm.Weight:
    small = 256 if n % 16 == 0 else 258
    qweight = torch.randint(0, 255, (small, k * bits // 8), device=device, dtype=torch.uint8)
    scales = torch.rand(small, 1, device=device).half() * 0.01
    cols = torch.randint(0, k, (small, slots), device=device).to(torch.int16)
    vals = torch.randn(small, slots, device=device).half()
    count = torch.full((small,), slots, device=device, dtype=torch.int32)
    ov = 1 if overflow else 0
    ov_indptr = torch.zeros(small + 1, device=device, dtype=torch.int32)
    ov_indptr[1:] = ov
    ov_cols = torch.zeros(ov, device=device, dtype=torch.int16)
    ov_vals = torch.ones(ov, device=device, dtype=torch.float16)
    table = tm.OutlierTable(cols, vals, count, ov_indptr, ov_cols, ov_vals)
    return tm.Weight(qweight, scales, table, bits, 0, k, tm.split_locks(small, device))


# --sweep dequant, group-128 scales (stop 14): (16, 128) is what the old (16, 256) default became
# for them (its K tile was cut to the group)
GROUPED_DEQUANT = [(16, 128, 4, 2), (16, 256, 4, 2), (1, 4096, 4, 1), (2, 2048, 4, 2),
                   (4, 1024, 4, 2), (1, 2048, 4, 1)]  # fmt: skip


def dequant_candidates(sweep: str) -> list[tuple[int, int, int, int]]:
    return DEQUANT_WIDE if sweep == "dequant" else DEQUANT


def run_job(weight: tm.Weight, x: torch.Tensor, kind: str, config) -> torch.Tensor:
    if kind == "gemv":
        return tm.gemv(weight, x[0], None, config)
    if kind == "dot":
        return tm.dot_matmul(weight, x, None, config)
    bn, bk, warps, stages = config
    if kind == "dequant":
        return tm.dequantize(weight, x.dtype, None, bn, bk, warps, stages)
    raise ValueError(kind)


def compile_jobs(jobs: list[tuple]) -> list[str]:
    errors = []
    for n, k, slots, overflow, m, kind, config, bits in jobs:
        try:
            weight = standin(n, k, slots, overflow, bits)
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            run_job(weight, x, kind, config)
            torch.cuda.synchronize()
        except Exception as exc:
            errors.append(f"{kind} {config} k={k} slots={slots}: {type(exc).__name__}: {exc}"[:400])
    return errors


def precompile(jobs: list[tuple], workers: int) -> list[str]:
    unique = list(dict.fromkeys(jobs))
    if not unique:
        return []
    start = time.perf_counter()
    chunks = [unique[i::workers] for i in range(workers)]
    with mp.get_context("spawn").Pool(workers) as pool:
        errors = [e for part in pool.map(compile_jobs, chunks) for e in part]
    print(f"precompiled {len(unique)} variants in {time.perf_counter() - start:.0f} s", flush=True)
    for e in errors:
        print("  compile/run failed:", e, flush=True)
    return errors


# ---- timing ------------------------------------------------------------------------------------
def bench(fn) -> float:
    from bench_kernels import bench as gpu_bench

    return gpu_bench(fn)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{k}" for n, k in SHAPES])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "."))
    parser.add_argument(
        "--write-table",
        action="store_true",
        help=f"record the fastest configs for this device in {tm.CONFIG_TABLE.name}",
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=["gemv", "dot", "dequant"],
        help="time only these kernels (batch 1, 16, 1024; floor: a read of the codes alone; "
        "rows: the GEMV against the tensor-core kernel at batch 1-8; mid: the tensor-core kernel "
        "with wider batch tiles against dequantize + cuBLAS at batch 16-256; batches: what "
        "matmul picks by default, at batch 1-1024; transpose: the tensor-core kernels' x copy, "
        "one Triton pass against F.pad of x^T; pdl: each default config at batch 1-128 "
        "launched plainly and with programmatic dependent launch; split: each default "
        "word-plane config at batch 16-128 with K split 1-6 ways, summed in the kernel or by "
        "fp32 atomics; slots: each default word-plane config at batch 2-128 with the outlier "
        "slots' loads unmasked and / or summed in fp16; loop: the same with the main loop's "
        "odd planes decoded unshifted and / or its products accumulated in place; order: the "
        "joined kernel on x copied in pair order or in column order); the table keeps the "
        "others' entries",
    )
    parser.add_argument(
        "--slot-quantile",
        type=float,
        default=tm.SLOT_QUANTILE,
        help="quantile of the rows' outlier counts the fixed slots cover (the rest overflow)",
    )
    parser.add_argument(
        "--flush",
        choices=bench_kernels.FLUSH_MODES,
        default=bench_kernels.FLUSH_MODE,
        help="how the L2 is cleared before each timed call (bench_kernels.FLUSH_MODE)",
    )
    parser.add_argument(
        "--bits", type=int, choices=(2, 3, 4), default=4, help="code width of the timed weights"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="interleaved timings of each compared variant"
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", help="batch sizes of --kinds slots / loop / order"
    )
    parser.add_argument(
        "--sweep",
        choices=("stop12", "wide", "evict", "packed", "dequant", "split", "joined", "joined-split"),
        default="stop12",
        help="candidates: stop 12's; (stop 13) wide: one-step GEMV row blocks and larger "
        "word-plane blocks; evict: the winners with the codes' loads evict_first; packed: the "
        "word-plane winners with planes decoded in pairs (4 bits); (stop 14) dequant: more "
        "dense-weight kernel configs, and the same bytes written / copied by torch; (stop 15) "
        "split: the tensor-core winners with split K; (stop 17) joined: planes j and j + 4 as "
        "one product against x copied in pair order; (stop 18) joined-split: --kinds mid with "
        "split K, packed and joined",
    )
    args = parser.parse_args()
    if args.sweep != "stop12" and args.bits != 4:
        parser.error(f"--sweep {args.sweep} is a 4-bit sweep")
    global SWEEP
    SWEEP = args.sweep
    if args.bits != 4 and (args.write_table or args.kinds != ["gemv"]):
        parser.error(f"--bits {args.bits} times the GEMV only (--kinds gemv) and writes no table")
    tm.SLOT_QUANTILE = args.slot_quantile
    global ROUNDS
    ROUNDS = args.rounds
    if args.batches:
        for kind, (_, *rest) in DEFAULT_VARIANTS.items():
            DEFAULT_VARIANTS[kind] = (tuple(args.batches), *rest)
    bench_kernels.FLUSH_MODE = args.flush
    from bench_kernels import copy_bandwidth, random_parts, random_weight, warm_up

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    device = "cuda"
    warm_up(device)
    print(f"copy bandwidth {copy_bandwidth(device):.0f} GB/s", flush=True)

    # weights: 0.5% outliers (table at the default quantile, and for every row), and none
    weights: dict[tuple, tm.Weight] = {}
    for n, k in shapes:
        qw = random_parts(n, k, args.bits, None, 0.005, seed=n + 4, device=device)
        csr = (qw.outlier_indptr, qw.outlier_indices, qw.outlier_values)
        for tag, q in (("default", tm.SLOT_QUANTILE), ("max", 1.0)):
            weights[(n, k, tag)] = tm.Weight.from_csr(
                qw.qweight, qw.scales, *csr, args.bits, 0, k, quantile=q
            )
            t = weights[(n, k, tag)].outliers
            print(f"{n}x{k} {tag}: slots {t.slots}, overflow {t.overflow}", flush=True)
        weights[(n, k, "none")] = random_weight(
            n, k, args.bits, None, 0.0, seed=n + 4, device=device
        )
        del qw

    def jobs_for(n, k, tag, m, kind, configs):
        t = weights[(n, k, tag)].outliers
        return [(n, k, t.slots, t.overflow > 0, m, kind, c, args.bits) for c in configs]

    jobs = []
    kinds = set(args.kinds)
    for n, k in shapes:
        for tag in ("default", "none"):
            if "gemv" in kinds:
                jobs += jobs_for(n, k, tag, 1, "gemv", gemv_candidates(args.bits, SWEEP))
            if "dot" in kinds:
                jobs += jobs_for(n, k, tag, 16, "dot", small_candidates(SWEEP))
        if "gemv" in kinds:
            jobs += jobs_for(n, k, "max", 1, "gemv", gemv_candidates(args.bits, SWEEP)[:1])
        if "dequant" in kinds:
            jobs += jobs_for(n, k, "default", 1024, "dequant", dequant_candidates(SWEEP))
        if "pdl" in kinds:
            for m in PDL_BATCHES:
                configs = pdl_variants(tm.default_config(weights[(n, k, "default")], m))
                kind = "gemv" if is_gemv(configs) else "dot"
                jobs += jobs_for(n, k, "default", m, kind, configs)
                jobs += jobs_for(n, k, "none", m, kind, configs)
        for kind, (batches, variants, _, _) in DEFAULT_VARIANTS.items():
            if kind not in kinds:
                continue
            for m in batches:
                configs = variants(tm.default_config(weights[(n, k, "default")], m))
                jobs += jobs_for(n, k, "default", m, "dot", configs)
                jobs += jobs_for(n, k, "none", m, "dot", configs[:1])
        if "split" in kinds:
            for m in SPLIT_BATCHES:
                configs = split_variants(tm.default_config(weights[(n, k, "default")], m), m)
                jobs += jobs_for(n, k, "default", m, "dot", configs)
    precompile(jobs, args.workers)

    rows: list[dict] = []

    def record(n, k, m, tag, kind, config, us, fp16_us):
        row = {
            "shape": f"{n}x{k}",
            "batch": m,
            "outliers": tag,
            "kind": kind,
            "config": asdict(config) if hasattr(config, "__dataclass_fields__") else config,
            "us": round(us, 2),
            "fp16_us": round(fp16_us, 2),
            "speedup": round(fp16_us / us, 3) if us else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    for n, k in shapes:
        warm_up(device, 0.5)
        time_shape(n, k, weights, record, device, kinds, args.bits)
        torch.cuda.empty_cache()

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "explore.json").write_text(json.dumps(rows, indent=1) + "\n")
    if args.write_table:
        write_table(rows)
    if "pdl" in kinds:
        print_pdl(rows)
    if "split" in kinds:
        print_variants(rows, "dot-split", "split K variants, us (best of two), 0.5% outliers",
                       split_name)  # fmt: skip
    for kind, (_, _, name_of, title) in DEFAULT_VARIANTS.items():
        if kind in kinds:
            print_variants(rows, f"dot-{kind}", title, name_of)
    print("\nbest per case (outliers at the default table; none: same config, no outliers):")
    for (shape, m), group in sorted(best_rows(rows).items()):
        print(f"  {shape} b={m}: " + "  ".join(group))


def write_table(rows: list[dict]) -> None:
    """The fastest GEMV (batch 1) and small-batch (16) config per shape, with outliers, and the
    largest batch the GEMV takes (``--kinds rows``), into the kernels' config table (other
    devices' entries, and kinds not timed in this run, kept); also copied to $OUT."""
    name = torch.cuda.get_device_name()
    try:
        table = json.loads(tm.CONFIG_TABLE.read_text())
    except (OSError, ValueError):
        table = {}
    mine: dict = {"gemv": {}, "small": {}, "rows": {}}
    measured = {
        "gemv" if r["batch"] == 1 else "small" for r in rows if r["kind"] in ("gemv", "dot")
    }
    if any(r["kind"] == "gemv-rows" for r in rows):
        measured.add("rows")
        mine["rows"] = gemv_rows_limits(rows)
    for kind in set(mine) - measured:  # not timed this run: keep the recorded entries
        mine[kind] = table.get(name, {}).get(kind, {})
    best: dict = {}
    for r in rows:
        if r["outliers"] == "default" and r["kind"] in ("gemv", "dot"):
            key = (r["shape"], r["batch"])
            if key not in best or r["us"] < best[key]["us"]:
                best[key] = r
    for (shape, m), r in sorted(best.items()):
        mine["gemv" if m == 1 else "small"][shape] = r["config"]
    table[name] = mine
    text = json.dumps(table, indent=1, sort_keys=True) + "\n"
    tm.CONFIG_TABLE.write_text(text)
    out = os.environ.get("OUT")
    if out:
        (Path(out) / tm.CONFIG_TABLE.name).write_text(text)
    print(f"wrote {tm.CONFIG_TABLE}", flush=True)


def gemv_rows_limits(rows: list[dict]) -> dict[str, int]:
    """Per shape, the largest timed batch up to which the GEMV (``--kinds rows``) beat the
    tensor-core kernel at every batch."""
    limits: dict[str, int] = {}
    for shape in sorted({r["shape"] for r in rows if r["kind"] == "gemv-rows"}):
        time = {(r["kind"], r["batch"]): r["us"] for r in rows if r["shape"] == shape}
        limit = 1
        for m in ROW_BATCHES[1:]:
            if time[("gemv-rows", m)] >= time[("dot-rows", m)]:
                break
            limit = m
        limits[shape] = limit
    return limits


def print_pdl(rows: list[dict]) -> None:
    """--kinds pdl: per shape, batch and outliers, the best of the two timings of each variant."""
    times: dict = {}
    for r in rows:
        if r["kind"].startswith(("dot-pdl", "gemv-pdl")):
            key = (r["shape"], r["batch"], r["outliers"], r["kind"], r["fp16_us"])
            times.setdefault(key, {}).setdefault(r["config"]["pdl"], []).append(r["us"])
    print("\nlaunch variants (plain / programmatic dependent launch), us, fp16 us:")
    for (shape, m, tag, kind, fp16_us), by in times.items():
        best = "  ".join(f"{min(by[p]):.1f}" for p in sorted(by))
        flag = "  MISMATCH" if "MISMATCH" in kind else ""
        print(f"  {shape} b={m} {tag}: {best}  (fp16 {fp16_us}){flag}")


def print_variants(rows: list[dict], kind: str, title: str, name_of) -> None:
    """Per shape and batch, the best of the timings of each variant of ``kind`` (rows whose kind
    starts with it), named by ``name_of(row)``; with more than two rounds, best / median."""
    times: dict = {}
    for r in rows:
        if r["kind"].startswith(kind):
            key = (r["shape"], r["batch"], r["fp16_us"])
            times.setdefault(key, {}).setdefault(name_of(r), []).append(r["us"])
    print(f"\n{title}:")
    for (shape, m, fp16_us), by in times.items():
        line = "  ".join(f"{name} {min(us):.1f}" + (f"/{statistics.median(us):.1f}"
                                                        if len(us) > 2 else "")
                         for name, us in by.items())  # fmt: skip
        print(f"  {shape} b={m} (fp16 {fp16_us}): {line}")


def split_name(r: dict) -> str:
    """--kinds split: a variant's name in print_variants."""
    c = r["config"]
    how = "in-kernel" if c["reduce"] else "atomics"
    name = f"split {c['split_k']}" + (f" {how}" if c["split_k"] > 1 else "")
    name += " pdl" if c["pdl"] else ""
    name += " MISMATCH" if "MISMATCH" in r["kind"] else ""
    return name + (" (nondeterministic)" if "NONDET" in r["kind"] else "")


def best_rows(rows: list[dict]) -> dict:
    found: dict = {}
    for r in rows:
        if r["outliers"] != "default" or r["kind"] not in ("gemv", "dot"):
            continue
        key = (r["shape"], r["batch"])
        if key not in found or r["us"] < found[key]["us"]:
            found[key] = r
    out = {}
    for key, r in found.items():
        none = [
            o["us"]
            for o in rows
            if (o["shape"], o["batch"]) == key and o["outliers"] == "none"
            and o["config"] == r["config"]
        ]  # fmt: skip
        cfg = {
            k: v
            for k, v in r["config"].items()
            if v is not False and not (k in ("split_k", "order") and v == 1)
        }
        out[key] = [f"{r['us']:.1f} us (none {none[0] if none else '-'}, fp16 {r['fp16_us']})",
                    str(cfg)]  # fmt: skip
    return out


def time_shape(
    n: int, k: int, weights: dict, record, device: str, kinds: set[str], bits: int
) -> None:
    from triton.testing import do_bench

    dense = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
    xs = {m: torch.randn(m, k, device=device, dtype=torch.float16) for m in (1, 16, 1024)}
    fp16 = {m: bench(lambda x=x: x @ dense.T) for m, x in xs.items()}
    if "gemv" in kinds:
        time_gemv(n, k, weights, record, xs, fp16, do_bench, bits)
    if "dot" in kinds:
        for tag, config in [(t, c) for c in small_candidates(SWEEP) for t in ("default", "none")]:
            w = weights[(n, k, tag)]
            us = bench(lambda c=config, w=w: tm.dot_matmul(w, xs[16], None, c))
            record(n, k, 16, tag, "dot", config, us, fp16[16])
    if "rows" in kinds:  # a few batch rows: the GEMV once per row (codes shared through L2)
        # against the tensor-core kernel, each with this shape's default config
        w = weights[(n, k, "default")]
        gemv_config = tm.default_config(w, 1)
        dot_config = tm.default_config(w, tm.SMALL_BATCH)
        for m in ROW_BATCHES:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            fp16_m = bench(lambda x=x: x @ dense.T)
            us = bench(lambda x=x: tm.gemv(w, x, None, gemv_config))
            record(n, k, m, "default", "gemv-rows", gemv_config, us, fp16_m)
            us = bench(lambda x=x: tm.dot_matmul(w, x, None, dot_config))
            record(n, k, m, "default", "dot-rows", dot_config, us, fp16_m)
    if "transpose" in kinds:  # x transposed and batch-padded: one Triton pass against F.pad
        for rows, m in ((4, 16), (8, 16), (24, 32)):
            x = torch.randn(rows, k, device=device, dtype=torch.float16)
            us = bench(lambda x=x, m=m: tm.transposed_x(x, m))
            record(n, k, rows, "none", "transposed_x", [m], us, float("nan"))
            us = bench(lambda x=x, m=m: torch.nn.functional.pad(x.t(), (0, m - x.shape[0])))
            record(n, k, rows, "none", "F.pad-of-x^T", [m], us, float("nan"))
        for m in (16, 32, 64, 128):  # no padding: the kernel against torch's copy (stop 16)
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            for kernel in (True, False):
                plan = tm.transpose_plan(m, k, m, k, 1, x.dtype, kernel=kernel)
                us = bench(lambda x=x, plan=plan: plan(x))
                name = "transposed_x" if kernel else "x^T.contiguous()"
                record(n, k, m, "none", name, [m], us, float("nan"))
    if "batches" in kinds:  # what QuantLinear runs, by batch size
        w = weights[(n, k, "default")]
        for m in DEFAULT_BATCHES:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            fp16_m = bench(lambda x=x: x @ dense.T)
            us = bench(lambda x=x: tm.matmul(w, x, None))
            record(n, k, m, "default", "matmul-default", tm.default_config(w, m), us, fp16_m)
    if "mid" in kinds:  # batches past 16: wider batch tiles against dequantize + cuBLAS
        w = weights[(n, k, "default")]
        for m in MID_BATCHES:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            fp16_m = bench(lambda x=x: x @ dense.T)
            us = bench(lambda x=x: tm.dequant_matmul(w, x, None))
            record(n, k, m, "default", "dequant+cublas", None, us, fp16_m)
            for config in mid_candidates(m):
                us = bench(lambda x=x, c=config: tm.dot_matmul(w, x, None, c))
                record(n, k, m, "default", "dot-mid", config, us, fp16_m)
    if "pdl" in kinds:  # (stop 19) plain launches against programmatic dependent launch
        for m in PDL_BATCHES:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            fp16_m = bench(lambda x=x: x @ dense.T)
            for tag in ("default", "none"):
                w = weights[(n, k, tag)]
                configs = pdl_variants(tm.default_config(w, m))
                run = tm.gemv if is_gemv(configs) else None

                def call(c, w=w, x=x, run=run):
                    return run(w, x, None, c) if run else tm.dot_matmul(w, x, None, c)

                outs = [call(c) for c in configs]
                # split K over 3+ programs adds in no fixed order: compare with a tolerance there
                same = all(torch.allclose(outs[0], o, rtol=1e-3, atol=1e-3) for o in outs[1:])
                name = ("gemv-pdl" if run else "dot-pdl") + ("" if same else "-MISMATCH")
                timed = [(c, name, functools.partial(call, c)) for c in configs]
                time_interleaved(timed, record, n, k, m, tag, fp16_m)
    if "split" in kinds:  # (stop 20) split K summed in the kernel against fp32 atomics
        w = weights[(n, k, "default")]
        for m in SPLIT_BATCHES:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            fp16_m = bench(lambda x=x: x @ dense.T)
            configs = split_variants(tm.default_config(w, m), m)
            names = []
            first = tm.dot_matmul(w, x, None, configs[0]) if configs else None
            for config in configs:
                out = tm.dot_matmul(w, x, None, config)
                name = "dot-split"
                if not torch.allclose(first, out, rtol=1e-3, atol=1e-3):
                    name += "-MISMATCH"
                if not torch.equal(tm.dot_matmul(w, x, None, config), out):
                    name += "-NONDET"  # (atomics over 3+ splits add in no fixed order)
                names.append(name)
            timed = [(c, name, functools.partial(tm.dot_matmul, w, x, None, c))
                     for c, name in zip(configs, names, strict=True)]  # fmt: skip
            time_interleaved(timed, record, n, k, m, "default", fp16_m)
    for kind, (batches, variants, _, _) in DEFAULT_VARIANTS.items():
        if kind not in kinds:  # (stops 21-22) variants of each default word-plane config
            continue
        for m in batches:
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            fp16_m = bench(lambda x=x: x @ dense.T)
            w = weights[(n, k, "default")]
            configs = variants(tm.default_config(w, m))
            if not configs:
                continue
            first = tm.dot_matmul(w, x, None, configs[0])
            timed = []
            for config in configs:
                same = torch.allclose(first, tm.dot_matmul(w, x, None, config), 1e-2, 1e-2)
                name = f"dot-{kind}" + ("" if same else "-MISMATCH")
                timed.append((config, name, functools.partial(tm.dot_matmul, w, x, None, config)))
            none = weights[(n, k, "none")]
            timed.append((configs[0], f"dot-{kind}-none",
                          functools.partial(tm.dot_matmul, none, x, None, configs[0])))  # fmt: skip
            time_interleaved(timed, record, n, k, m, "default", fp16_m)
    if "floor" in kinds:  # the same code bytes read by a kernel that does nothing else
        words = weights[(n, k, "none")].qweight.view(torch.int32).reshape(-1)
        out = torch.empty(triton.cdiv(words.numel(), 1024), device=device, dtype=torch.int32)
        for block, warps in READ_CONFIGS:
            grid = (triton.cdiv(words.numel(), block),)
            us = bench(
                lambda b=block, w=warps, g=grid: _read_kernel[g](
                    words, out, words.numel(), BLOCK=b, num_warps=w
                )
            )
            record(n, k, 1, "none", "read-codes-only", [block, warps], us, fp16[1])
    if "dequant" in kinds:
        base = weights[(n, k, "default")]
        for config in dequant_candidates(SWEEP):
            us = bench(lambda c=config: tm.dequantize(base, torch.float16, None, *c))
            record(n, k, 0, "default", "dequant-only", config, us, float("nan"))
        if SWEEP == "dequant":  # the same bytes written (and read) by torch alone
            buffer = torch.empty(n, k, device=device, dtype=torch.float16)
            us = bench(lambda: buffer.fill_(1.0))
            record(n, k, 0, "none", "write-dense-only (fill_)", None, us, float("nan"))
            us = bench(lambda: buffer.copy_(dense))
            record(n, k, 0, "none", "copy-dense (read + write)", None, us, float("nan"))
            del buffer
            # group-128 scales: the 16 x 128 programs they took before stop 14 against wider ones
            from bench_kernels import kernel_weight, random_parts

            grouped = kernel_weight(random_parts(n, k, 4, 128, 0.005, seed=n + 4, device=device))
            for config in GROUPED_DEQUANT:
                us = bench(lambda c=config: tm.dequantize(grouped, torch.float16, None, *c))
                record(n, k, 0, "g128", "dequant-only", config, us, float("nan"))
            del grouped
            # dequantize + cuBLAS with the programs before stop 14 and with today's, same run
            for m in (256, 1024):
                x = torch.randn(m, k, device=device, dtype=torch.float16)
                fp16_m = bench(lambda x=x: x @ dense.T)
                for config in (DEQUANT_WIDE[0], tm.DENSE_PER_ROW):  # (16 x 256: before)
                    us = bench(lambda x=x, c=config: tm.dequant_matmul(base, x, None, program=c))
                    record(n, k, m, "default", "dequant+cublas", config, us, fp16_m)
        us = bench(lambda: tm.dequant_matmul(base, xs[1024], None))
        record(n, k, 1024, "default", "dequant+cublas", None, us, fp16[1024])


def time_interleaved(timed: list[tuple], record, n, k, m, tag: str, fp16_us: float) -> None:
    """Each (config, name, call) timed ROUNDS times, the rounds interleaved (the differences
    compared are a few percent), and recorded for this shape, batch and outlier tag."""
    for _ in range(ROUNDS):
        for config, name, call in timed:
            record(n, k, m, tag, name, config, bench(call), fp16_us)


# batch sizes of --kinds batches
DEFAULT_BATCHES = (1, 2, 3, 4, 8, 16, 24, 32, 64, 128, 256, 1024)
# batch sizes of --kinds mid, and the word-plane configs tried there: (block_n, block_m, warps)
MID_BATCHES = (16, 32, 64, 128, 256)
MID_TILES = [(64, 16, 4), (64, 32, 4), (64, 64, 4), (128, 64, 8), (128, 128, 8)]


def mid_candidates(m: int) -> list[tm.DotConfig]:
    if SWEEP == "joined":
        return [
            D(bn, bm, 256, 1, w, 3, xt=True, planes=True, packed=True, joined=jn)
            for bn, bm, w in MID_TILES[:4]
            for jn in (False, True)
            if bm <= max(m, 16)
        ]
    if SWEEP == "joined-split":  # (stop 18) the tiles of mid_config with split K, both kernels
        return [
            D(64, bm, 256, sk, 4, 3, xt=True, planes=True, packed=True, joined=jn)
            for bm in (16, 32, 64)
            for sk in (2, 4)
            for jn in (False, True)
            if bm <= max(m, 16)
        ]
    if SWEEP == "split":
        return [
            D(bn, bm, 256, sk, w, 3, xt=True, planes=True, packed=True)
            for bn, bm, w in MID_TILES[:3]
            for sk in (1, 2, 4)
            if bm <= max(m, 16)
        ]
    return [
        D(bn, bm, 256, 1, w, 3, xt=True, planes=True, packed=True)
        for bn, bm, w in MID_TILES
        if bm <= max(m, 16)
    ]


# batch sizes of --kinds pdl, and its variants of a default config: launched plainly and with
# programmatic dependent launch (the word-plane kernel while x is copied)
PDL_BATCHES = (1, 2, 8, 16, 32, 64, 128)


def pdl_variants(config) -> list[tm.GemvConfig | tm.DotConfig]:
    plain_dot = isinstance(config, tm.DotConfig) and not (config.planes and config.xt)
    if config is None or plain_dot:
        return []
    return [replace(config, pdl=p) for p in (False, True)]


# batch sizes of --kinds split, and its variants of a default word-plane config: K split 1-6
# ways summed in the kernel, and by fp32 atomics (the library before stop 20) as many ways as the
# default splits (else 2); past batch 16 also launched while x is copied (PDL is the default up
# to 16)
SPLIT_BATCHES = (16, 32, 64, 128)


def split_variants(config, m: int) -> list[tm.DotConfig]:
    if not (isinstance(config, tm.DotConfig) and config.planes and config.xt):
        return []
    found = [config]
    found += [replace(config, split_k=s, reduce=True) for s in (1, 2, 3, 4, 6)]
    found.append(replace(config, split_k=max(config.split_k, 2), reduce=False))
    if m > tm.SMALL_BATCH:
        found.append(replace(config, pdl=True))
    # stages: 3 with split; without, the default's, or small_config's 4 up to batch 16
    unsplit = config.num_stages if config.split_k == 1 else 4 if m <= tm.SMALL_BATCH else 3
    found = [replace(c, num_stages=3 if c.split_k > 1 else unsplit) for c in found]
    return list(dict.fromkeys(found))


# batch sizes of --kinds slots, and its variants of a default word-plane config: the outlier
# slots' loads without masks and / or each chunk's products summed in fp16, 8 or 16 slots per
# chunk. (Stop 21's first runs, both slower or even: a chunk summed in each main-loop step,
# d533809, e.g. 11008x4096 batch 16 28.1-32.3 against 24.9 us; the next chunk's gather issued
# before this chunk's sum, dc41986, 25.1 against 24.4 us.)
SLOTS_BATCHES = (2, 8, 16, 32, 64, 128)


def slots_variants(config) -> list[tm.DotConfig]:
    if not (isinstance(config, tm.DotConfig) and config.planes):
        return []
    found = [config] + [replace(config, slot_unmasked=u, slot_half=h, slot_chunk=c)
                        for u, h, c in ((False, False, 8), (True, False, 8), (False, True, 8),
                                        (True, True, 8), (False, False, 16), (True, True, 16))
                        ]  # fmt: skip
    return list(dict.fromkeys(found))


def slots_name(r: dict) -> str:
    """--kinds slots: a variant's name in print_variants."""
    c = r["config"]
    if r["kind"] == "dot-slots-none":
        return "none"
    name = ("unmasked " if c["slot_unmasked"] else "") + ("half " if c["slot_half"] else "")
    return name + f"/{c['slot_chunk']}" + (" MISMATCH" if "MISMATCH" in r["kind"] else "")


# batch sizes of --kinds loop, and its variants of a default word-plane config: fp16's odd planes
# decoded unshifted (one shift per word, not three) and / or the products accumulated straight
# into the output tile (no per-step partial sum and its add).
LOOP_BATCHES = (2, 8, 16, 32, 64, 128)


def loop_variants(config) -> list[tm.DotConfig]:
    if not (isinstance(config, tm.DotConfig) and config.planes):
        return []
    found = [config] + [replace(config, pair_in_place=p, acc_in_place=a)
                        for p, a in ((False, False), (True, False), (False, True), (True, True))
                        ]  # fmt: skip
    return list(dict.fromkeys(found))


def loop_name(r: dict) -> str:
    """--kinds loop: a variant's name in print_variants."""
    c = r["config"]
    if r["kind"].endswith("-none"):
        return "none"
    name = ("pair " if c["pair_in_place"] else "") + ("acc " if c["acc_in_place"] else "")
    return (name or "before ") + ("MISMATCH " if "MISMATCH" in r["kind"] else "")


# batch sizes of --kinds order, and its variants of a default joined config: x copied in pair order
# (each pair of planes one run of the copy's rows) or in column order (every 4th row: no pair
# position to compute for the outlier gather, a plain transpose for the copy).
ORDER_BATCHES = (2, 8, 16, 32, 64, 128)


def order_variants(config) -> list[tm.DotConfig]:
    if not (isinstance(config, tm.DotConfig) and config.joined):
        return []
    return list(dict.fromkeys([config, replace(config, pair_order=not config.pair_order)]))


def order_name(r: dict) -> str:
    """--kinds order: a variant's name in print_variants."""
    if r["kind"].endswith("-none"):
        return "none"
    name = "pair-order" if r["config"]["pair_order"] else "column-order"
    return name + (" MISMATCH" if "MISMATCH" in r["kind"] else "")


# --kinds that time variants of each shape's default config: kind -> (batches, variants of a
# config, name of a recorded row, title of the printed summary)
DEFAULT_VARIANTS = {
    "slots": (SLOTS_BATCHES, slots_variants, slots_name,
              "outlier slots: loads unmasked, chunks summed in half, /slots per chunk; us (best "
              "of the rounds / their median past two), 0.5% outliers; none: no outliers"),
    "loop": (LOOP_BATCHES, loop_variants, loop_name,
             "main loop: pair = odd planes unshifted, acc = products accumulated in place; us "
             "(best of the rounds / their median past two), 0.5% outliers; none: no outliers, "
             "both"),
    "order": (ORDER_BATCHES, order_variants, order_name,
              "x's copy: pair order against column order; us (best of the rounds / their median "
              "past two), 0.5% outliers; none: no outliers, the default"),
}  # fmt: skip


def is_gemv(configs: list) -> bool:
    return bool(configs) and isinstance(configs[0], tm.GemvConfig)


# batch sizes of --kinds rows (timed with the batch-16 default of the tensor-core kernel)
ROW_BATCHES = (1, 2, 3, 4, 6, 8)
# (words per program, warps) of the read-only floor kernel
READ_CONFIGS = [(1024, 4), (2048, 4), (4096, 8), (8192, 8)]


@triton.jit
def _read_kernel(q_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """Reads ``BLOCK`` int32 words per program and keeps only their xor: the time any kernel
    needs to bring these bytes in, with no math and one wave after another of programs."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    words = tl.load(q_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + tl.program_id(0), tl.xor_sum(words, axis=0))


def time_gemv(n: int, k: int, weights: dict, record, xs, fp16, do_bench, bits: int) -> None:
    for tag_config in [(t, c) for c in gemv_candidates(bits, SWEEP) for t in ("default", "none")]:
        tag, config = tag_config
        w = weights[(n, k, tag)]
        us = bench(lambda c=config, w=w: tm.gemv(w, xs[1][0], None, c))
        record(n, k, 1, tag, "gemv", config, us, fp16[1])
    first = gemv_candidates(bits, SWEEP)[0]
    w = weights[(n, k, "max")]
    us = bench(lambda: tm.gemv(w, xs[1][0], None, first))
    record(n, k, 1, "max", "gemv-table-for-every-row", first, us, fp16[1])
    w = weights[(n, k, "default")]
    us = do_bench(lambda: tm.gemv(w, xs[1][0], None, first), return_mode="median") * 1e3
    record(n, k, 1, "default", "gemv-timed-by-do_bench", first, us, fp16[1])


if __name__ == "__main__":
    main()
