"""Compile the batch-1 GEMV for an H100 (sm_90) without a GPU, and print what ptxas made of it.

    python benchmarks/compile_gemv.py [--bits 4] [--packed] [--xvec] [--group 0] \
        [--evict-first] [--config 8,128,2,3 ...]
    python benchmarks/compile_gemv.py --planes [--packed [--joined]] [--bf16] \
        [--config 64,256,4,3 ...]

Triton's wheel carries ptxas and cuobjdump, so a kernel that would fail to build on the GPU
fails here too, and its registers per thread (which set the occupancy) and load widths can be
read before any device time is spent; ``--planes`` also counts the instructions of the main
loop per step and of the outlier slots' loop per chunk, by opcode. Each ``--config`` is
block_n,block_w,num_warps,num_stages;
K = 4096, 32 outlier slots with overflow, fp16 x, pointers and sizes specialised as divisible by
16 (as the JIT does for these shapes). Prints registers and the count of vector, 16-bit and
shared-memory loads in the PTX.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from collections import Counter

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from easyquant.kernels import triton_matmul as tm

POINTERS = {
    "x_ptr": "*fp16", "q_ptr": "*i32", "s_ptr": "*fp16", "ecol_ptr": "*i16", "eval_ptr": "*fp16",
    "ecnt_ptr": "*i32", "oind_ptr": "*i32", "ocol_ptr": "*i16", "oval_ptr": "*fp16",
    "bias_ptr": "*fp16", "out_ptr": "*fp16",
}  # fmt: skip


def compile_gemv(
    bits: int, packed: bool, xvec: bool, group: int, config: tuple[int, ...], evict: bool = False
):
    block_n, block_w, warps, stages = config
    fn = tm._gemv_kernel
    signature = {**POINTERS, **dict.fromkeys(("N", "row_words", "stride_s", "stride_xm",
                                               "stride_om"), "i32")}  # fmt: skip
    constants = dict(
        M=1,  # batch 1 (the JIT specialises an int argument equal to 1 as a constant)
        K=4096, GROUP=group, BITS=bits, HAS_BIAS=False, SLOTS=32, SLOTS_P2=32, HAS_OVERFLOW=True,
        ORDER=1, BLOCK_N=block_n, BLOCK_W=block_w, SPLIT_K=1, OUT_CHUNK=8, PACKED=packed,
        XVEC=xvec, EVICT=tm.eviction(evict), INTERPRET=False,
    )  # fmt: skip
    return build(fn, signature, constants, [*POINTERS, "N", "row_words"], warps, stages)


def build(
    fn,
    signature: dict,
    constants: dict,
    divisible: list[str],
    warps: int,
    stages: int,
    launch_pdl: bool = False,
):
    """``fn`` compiled for sm_90 with these argument types, constants and divisibility hints."""
    signature = {**signature, **dict.fromkeys(constants, "constexpr")}
    source = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()},
        attrs={(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible},
    )
    options = {"num_warps": warps, "num_stages": stages, "launch_pdl": launch_pdl}
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def compile_planes(
    packed: bool,
    act: int,
    config: tuple[int, ...],
    joined: bool = False,
    pdl: bool = False,
    split: int = 1,
    slot_unmasked: bool = False,
    slot_half: bool = False,
    pair_in_place: bool = True,
    acc_in_place: bool = True,
    block_m: int = 16,
    k: int = 4096,
    slots: int = 32,
    pair_order: bool = True,
):
    """The batch-16 word-plane kernel (4 bits, per-channel scales, xt), as the GEMV above;
    ``config`` is block_n,block_k,num_warps,num_stages (``joined``: x in pair order; ``pdl``:
    launched while x is copied; ``split`` > 1: K split, summed by each tile's last program;
    ``slot_unmasked`` / ``slot_half``: the outlier slots' loads without masks / chunks in fp16;
    ``pair_in_place`` / ``acc_in_place``: DotConfig's fields of the same names; ``block_m``,
    ``k``, ``slots``: the batch tile, K and outlier slots per row; ``pair_order``: x copied in
    pair order, else in column order)."""
    block_n, block_k, warps, stages = config
    fn = tm._dot_planes_kernel
    dtype = "*fp16" if act == 1 else "*bf16"
    pointers = {**POINTERS, "x_ptr": dtype, "out_ptr": dtype, "part_ptr": "*fp32",
                "lock_ptr": "*i32"}  # fmt: skip
    signature = {**pointers, **dict.fromkeys(("M", "N", "row_words", "stride_xk", "stride_s",
                                               "stride_om"), "i32")}  # fmt: skip
    constants = dict(
        stride_xm=1,  # x^T's batch side is contiguous (xt), which the JIT specialises as 1
        K=k, GROUP=0, BITS=4, ACT=act, HAS_BIAS=False, SLOTS=slots, HAS_OVERFLOW=True,
        BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_W=block_k // 8, SPLIT_K=split, SLOT_CHUNK=8,
        OUT_CHUNK=8, EMULATE_BF16=False, EVICT="", PACKED=packed, JOINED=joined, PDL=pdl,
        REDUCE=split > 1, SLOT_UNMASKED=slot_unmasked, SLOT_HALF=slot_half,
        PAIR_IN_PLACE=pair_in_place, ACC_IN_PLACE=acc_in_place, PAIR_ORDER=pair_order,
    )  # fmt: skip
    divisible = [*pointers, "M", "N", "row_words", "stride_xk", "stride_om"]  # M: 16 rows
    return build(fn, signature, constants, divisible, warps, stages, launch_pdl=pdl)


def cuobjdump(kernel, flag: str) -> str:
    """What Triton's cuobjdump prints for the kernel's cubin with ``flag``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
        return subprocess.run([tool, flag, path], capture_output=True, text=True).stdout


def sass_lines(sass: str) -> int:
    """Instructions in the cubin's SASS (a rough count of the work per program)."""
    return len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, flags=re.M))


def loop_bounds(branches: list[tuple[int, int | None]]) -> list[tuple[int, int]]:
    """(first, last) address of each loop among SASS ``(address, branch target or None)``
    pairs: a body runs from a backward branch's target to the branch."""
    return [(target, address) for address, target in branches
            if target is not None and target < address]  # fmt: skip


def loop_mixes(sass: str) -> list[tuple[int, dict[str, int]]]:
    """SASS instructions of each of the kernel's loops and their opcodes by count, per trip and
    warp: in the word-plane kernel the first is the main K loop, the next the outlier slots'
    chunk loop."""
    ops = []  # (address, opcode, branch target or None)
    for line in sass.splitlines():
        found = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if found:
            branch = re.search(r"BRA (0x[0-9a-f]+)", line)
            target = int(branch.group(1), 16) if branch else None
            ops.append((int(found.group(1), 16), found.group(2), target))
    mixes = []
    for first, last in loop_bounds([(address, target) for address, _, target in ops]):
        body = [op for a, op, _ in ops if first <= a <= last]
        mixes.append((len(body), dict(Counter(body).most_common())))
    return mixes


def registers(kernel) -> str:
    found = re.search(r"REG:(\d+)", cuobjdump(kernel, "-res-usage"))
    return found.group(1) if found else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, default=4, choices=tm.SUPPORTED_BITS)
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--xvec", action="store_true")
    parser.add_argument("--group", type=int, default=0)
    parser.add_argument("--evict-first", action="store_true", help="codes' loads evict_first")
    parser.add_argument("--config", nargs="+", default=["8,128,2,3"])
    parser.add_argument(
        "--planes",
        action="store_true",
        help="compile the batch-16 word-plane kernel instead (4 bits; --config "
        "block_n,block_k,warps,stages; --packed: planes in pairs; --bf16)",
    )
    parser.add_argument("--bf16", action="store_true", help="--planes: bf16 activations")
    parser.add_argument(
        "--joined", action="store_true", help="--planes --packed: planes j, j + 4 as one product"
    )
    parser.add_argument(
        "--pdl", action="store_true", help="--planes: launched while x is copied (sm_90)"
    )
    parser.add_argument(
        "--split", type=int, default=1, help="--planes: K split this many ways, summed in-kernel"
    )
    parser.add_argument("--sass", action="store_true", help="--planes: print the whole SASS")
    parser.add_argument("--pair-shifted", action="store_true",
                        help="--planes --packed: every plane pair shifted (before stop 22)")
    parser.add_argument("--block-m", type=int, default=16, help="--planes: the batch tile")
    parser.add_argument("--column-order", action="store_true",
                        help="--planes --joined: x copied in column order, not pair order")
    parser.add_argument("--k", type=int, default=4096, help="--planes: K")
    parser.add_argument("--slots", type=int, default=32, help="--planes: outlier slots per row")
    parser.add_argument("--acc-per-step", action="store_true",
                        help="--planes: each step's products summed apart (before stop 22)")
    parser.add_argument("--slot-unmasked", action="store_true",
                        help="--planes: the outlier slots' loads without masks")
    parser.add_argument("--slot-half", action="store_true",
                        help="--planes: each chunk of outlier slots summed in fp16")
    args = parser.parse_args()
    if args.planes:
        for text in args.config:
            config = tuple(int(v) for v in text.split(","))
            kernel = compile_planes(
                args.packed, 2 if args.bf16 else 1, config, args.joined, args.pdl, args.split,
                args.slot_unmasked, args.slot_half, not args.pair_shifted, not args.acc_per_step,
                args.block_m, args.k, args.slots, not args.column_order,
            )
            sass = cuobjdump(kernel, "-sass")
            if args.sass:
                print(sass, flush=True)
            (count, mix), *rest = loop_mixes(sass) or [(0, {})]
            extra = {op: sass.count(op) for op in ("ACQBULK", "PREEXIT", "ATOMG", "MEMBAR")
                     if op in sass}  # fmt: skip
            print(f"{text}: {registers(kernel)} registers, {sass_lines(sass)} SASS instructions; "
                  f"main loop {count} per step: {mix}" + (f"; {extra}" if extra else ""),
                  flush=True)  # fmt: skip
            if rest:
                chunk, chunk_mix = rest[0]
                print(f"  outlier slots: {chunk} per chunk of 8: {chunk_mix}", flush=True)
        return
    for text in args.config:
        config = tuple(int(v) for v in text.split(","))
        kernel = compile_gemv(
            args.bits, args.packed, args.xvec, args.group, config, args.evict_first
        )
        ptx = kernel.asm["ptx"]
        counts = {p: len(re.findall(re.escape(p), ptx))
                  for p in ("ld.global.v4", "ld.global.b16", "ld.shared", "bar.sync")}  # fmt: skip
        print(f"{text}: {registers(kernel)} registers, {counts}", flush=True)


if __name__ == "__main__":
    main()
