"""Check the kernels that ``matmul`` picks by default on full-size layers against a float64
reference (CUDA only): each issue-5 shape, 4 and 3 bits, fp16 and bf16 x, batch 1 and 16, 0.5%
outliers. Prints one line per case and exits non-zero if any relative error exceeds 1e-2.

    python benchmarks/check_defaults.py
"""

from __future__ import annotations

import sys

import torch

from bench_kernels import kernel_weight, random_parts, reference
from easyquant.kernels import triton_matmul as tm

SHAPES = [(4096, 4096), (11008, 4096), (14336, 4096), (53746, 14336)]


def main() -> int:
    failed = 0
    for n, k in SHAPES:
        for bits in (4, 3):
            qw = random_parts(n, k, bits, None, 0.005, seed=n + bits, device="cuda")
            weight = kernel_weight(qw)
            for dtype in (torch.float16, torch.bfloat16):
                for m in (1, 16):
                    x = torch.randn(m, k, device="cuda").to(dtype)
                    out = tm.matmul(weight, x, None).double()
                    ref = reference(qw, x, None).double()
                    err = float((out - ref).norm() / ref.norm())
                    config = tm.default_config(weight, m)
                    ok = err <= 1e-2
                    failed += not ok
                    print(f"{n}x{k} {bits}-bit {dtype} m={m}: rel err {err:.2e} "
                          f"{'ok' if ok else 'FAILED'} {config}", flush=True)  # fmt: skip
            del qw, weight
            torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
