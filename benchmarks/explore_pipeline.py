"""Large batches: the dense weight written in row chunks on a side stream while cuBLAS multiplies
the previous chunk on the main stream (stop 20 experiment, H100).

Question: at batch 256-1024 the library dequantizes the whole weight, then runs cuBLAS, so the
dense write (memory-bound) and the product (tensor cores) add up: 1.31-1.39x the fp16 time on the
mid shapes. Can the two overlap? Each chunk's rows are dequantized into one of two buffers on a
side stream; the main stream multiplies the chunk as soon as it is ready, into its columns of the
output. Prints, per shape and batch: fp16 cuBLAS, the library's dequantize + cuBLAS, the
pipeline at 2 / 4 / 8 chunks, and its two parts alone (all chunks' dequantize; all chunks'
products on weights dequantized beforehand). GPU-time medians, L2 cleared (bench_kernels).

    python benchmarks/explore_pipeline.py [--shapes 11008x4096 ...] [--batches 256 1024]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from bench_kernels import bench, random_parts, warm_up
from easyquant.format.qweight import QuantizedWeight
from easyquant.kernels import triton_matmul as tm


def chunk_weights(qw: QuantizedWeight, chunks: int, align: int = 64) -> list[tm.Weight]:
    """The kernels' view of ``chunks`` row ranges of a stored weight (CSR rebased per range)."""
    n, k = qw.shape
    step = -(-n // chunks // align) * align
    indptr = qw.outlier_indptr
    found = []
    for a in range(0, n, step):
        b = min(n, a + step)
        lo, hi = int(indptr[a]), int(indptr[b])
        found.append(
            tm.Weight.from_csr(
                qw.qweight[a:b], qw.scales[a:b], indptr[a : b + 1] - indptr[a],
                qw.outlier_indices[lo:hi], qw.outlier_values[lo:hi], qw.bits,
                tm.kernel_group(qw.group_size, k), k,
            )
        )  # fmt: skip
    return found


class Pipeline:
    """x @ W.T with W dequantized chunk by chunk on a side stream, two buffers in turn."""

    def __init__(self, parts: list[tm.Weight], k: int, dtype: torch.dtype) -> None:
        self.parts = parts
        rows = max(p.out_features for p in parts)
        self.buffers = [torch.empty(rows, k, device="cuda", dtype=dtype) for _ in range(2)]
        self.side = torch.cuda.Stream()
        self.plans = [tm.dequantize_plan(p, dtype) for p in parts]
        self.n = sum(p.out_features for p in parts)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        main = torch.cuda.current_stream()
        out = torch.empty(x.shape[0], self.n, device=x.device, dtype=x.dtype)
        self.side.wait_stream(main)
        ready = [torch.cuda.Event() for _ in self.parts]
        done = [torch.cuda.Event() for _ in self.parts]
        col = 0
        for j, part in enumerate(self.parts):
            rows = part.out_features
            buffer = self.buffers[j % 2][:rows]
            with torch.cuda.stream(self.side):
                if j >= 2:
                    self.side.wait_event(done[j - 2])  # the buffer's previous chunk multiplied
                self.plans[j](part, buffer)
                ready[j].record(self.side)
            main.wait_event(ready[j])
            torch.mm(x, buffer.t(), out=out[:, col : col + rows])
            done[j].record(main)
            col += rows
        return out


def time_shape(n: int, k: int, batches: list[int], chunk_counts: list[int], record) -> None:
    shape = f"{n}x{k}"
    qw = random_parts(n, k, 4, None, 0.005, seed=n + 4, device="cuda")
    whole = tm.Weight.from_csr(
        qw.qweight, qw.scales, qw.outlier_indptr, qw.outlier_indices, qw.outlier_values, 4, 0, k
    )
    dense = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
    for m in batches:
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        fp16 = bench(lambda x=x: x @ dense.T)
        record(shape, m, "fp16 cuBLAS", fp16, fp16)
        ref = tm.dequant_matmul(whole, x, None)
        us = bench(lambda x=x: tm.dequant_matmul(whole, x, None))
        record(shape, m, "dequantize + cuBLAS", us, fp16)
        for chunks in chunk_counts:
            parts = chunk_weights(qw, chunks)
            pipe = Pipeline(parts, k, x.dtype)
            same = torch.allclose(pipe(x), ref, rtol=1e-2, atol=1e-2)
            name = f"pipeline {len(parts)} chunks" + ("" if same else " MISMATCH")
            record(shape, m, name, bench(lambda x=x, pipe=pipe: pipe(x)), fp16)
            if chunks == chunk_counts[0]:  # its two parts alone
                denses = [tm.dequantize(p, x.dtype) for p in parts]
                us = bench(lambda x=x, d=denses: [x @ w.t() for w in d])
                record(shape, m, f"  its products alone ({len(parts)})", us, fp16)
                us = bench(lambda p=parts, t=x.dtype: [tm.dequantize(w, t) for w in p])
                record(shape, m, f"  its dequantize alone ({len(parts)})", us, fp16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "14336x4096",
                                                         "4096x11008"])  # fmt: skip
    parser.add_argument("--batches", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--chunks", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args()
    warm_up("cuda")
    rows = []

    def record(shape, m, name, us, fp16_us):
        row = {"shape": shape, "batch": m, "variant": name, "us": round(us, 2),
               "ratio_to_fp16": round(us / fp16_us, 3)}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)

    for shape in args.shapes:
        n, k = (int(v) for v in shape.split("x"))
        time_shape(n, k, args.batches, args.chunks, record)
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "explore-pipeline.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
