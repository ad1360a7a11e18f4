"""Large batches (issue 5, stop 14): is a fused GEMM that decodes the int4 tile in registers and
writes the outliers into it before the tensor-core product faster than dequantize + cuBLAS?

    python benchmarks/explore_gemm.py [--shapes 4096x4096 11008x4096] [--batches 128 256 1024]
        [--check] [--out DIR]

Before this, the tensor-core kernels added the outliers after the product, gathering x at each
outlier's column for every batch row: ``nnz * M * 2`` bytes from L2 (460 MB for 11008x4096 at
batch 1024, more than writing the dense weight), which is why dequantize + cuBLAS took every batch
past 128. Here each row walks its (column-sorted) outliers tile by tile: ``DEPTH`` entries per row
and K tile, each one compare + select over the tile, ``DEPTH`` being the most any row has in one
tile (host-side, once per weight).

Times (``bench_kernels.gpu_time_us``, L2 cleared) for each shape and batch: fp16 cuBLAS; a dense
fp16 Triton GEMM of the same tiling (the ceiling of this kernel's structure); the library's
dequantize + cuBLAS and its word-plane kernel (the default up to MID_BATCH); the fused GEMM with
0.5% outliers and without any. ``--check`` compares the fused GEMM with the reference first
(also the only part that runs under TRITON_INTERPRET=1 on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

from bench_kernels import bench, kernel_weight, random_parts, reference, warm_up
from benchlib import write_result
from easyquant.kernels import triton_matmul as tm


@dataclass(frozen=True)
class GemmConfig:
    block_n: int = 128
    block_m: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3


@triton.jit
def _entry(
    ecol_ptr,
    eval_ptr,
    ocol_ptr,
    oval_ptr,
    rows,
    idx,
    e_cnt,
    o_start,
    total,
    SLOTS: tl.constexpr,
    HAS_OVERFLOW: tl.constexpr,
):
    """Entry ``idx`` of each row's outlier list (slots, then overflow): column (-1 past the
    row's last) and value."""
    ok = idx < total
    in_slot = ok & (idx < e_cnt)
    p = rows.to(tl.int64) * SLOTS + idx
    col = tl.load(ecol_ptr + p, mask=in_slot, other=-1).to(tl.int32)
    val = tl.load(eval_ptr + p, mask=in_slot, other=0.0)
    if HAS_OVERFLOW:
        in_over = ok & (idx >= e_cnt)
        q = o_start + idx - e_cnt
        col = tl.where(in_over, tl.load(ocol_ptr + q, mask=in_over, other=0).to(tl.int32), col)
        val = tl.where(in_over, tl.load(oval_ptr + q, mask=in_over, other=0.0), val)
    return col, val


@triton.jit
def _fetch(
    ecol_ptr,
    eval_ptr,
    ocol_ptr,
    oval_ptr,
    rows,
    pos,
    e_cnt,
    o_start,
    total,
    SLOTS: tl.constexpr,
    HAS_OVERFLOW: tl.constexpr,
    DEPTH: tl.constexpr,
    DEPTH_P2: tl.constexpr,
):
    """Entries ``pos .. pos + DEPTH`` of each row's list, ``[rows, DEPTH_P2]`` (column -1 past
    the row's last)."""
    j = tl.arange(0, DEPTH_P2)
    idx = pos[:, None] + j[None, :]
    col, val = _entry(
        ecol_ptr,
        eval_ptr,
        ocol_ptr,
        oval_ptr,
        rows[:, None],
        idx,
        e_cnt[:, None],
        o_start[:, None],
        total[:, None] * (j < DEPTH)[None, :],
        SLOTS,
        HAS_OVERFLOW,
    )
    return tl.where(idx < total[:, None], col, -1), val


# fmt: off
@triton.jit
def _gemm_kernel(
    x_ptr, q_ptr, s_ptr, ecol_ptr, eval_ptr, ecnt_ptr, oind_ptr, ocol_ptr, oval_ptr, out_ptr,
    M, N, K: tl.constexpr, row_bytes, stride_xm, stride_xk, stride_q, stride_s, stride_om,
    tptr_ptr, trc_ptr, tval_ptr,
    GROUP: tl.constexpr, ACT: tl.constexpr, SLOTS: tl.constexpr, HAS_OVERFLOW: tl.constexpr,
    DEPTH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    EMULATE_BF16: tl.constexpr, MODE: tl.constexpr, CHUNKS: tl.constexpr, CHUNK: tl.constexpr,
    SLOT_CHUNK: tl.constexpr, DEPTH_P2: tl.constexpr, ORIENT: tl.constexpr,
):
    # fmt: on
    """``out^T [BLOCK_N, BLOCK_M] = W x^T`` with W's tile decoded, scaled and given its outliers
    in registers each K step (4 bits)."""
    blocks_m = tl.cdiv(M, BLOCK_M)  # batch blocks fastest: programs sharing W rows run together
    rows = (tl.program_id(0) // blocks_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = (tl.program_id(0) % blocks_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok, m_ok = rows < N, ms < M
    if GROUP == 0:
        s_row = tl.load(s_ptr + rows * stride_s, mask=row_ok, other=0.0)
    pos = tl.zeros([BLOCK_N], dtype=tl.int32)
    e_cnt = tl.zeros([BLOCK_N], dtype=tl.int32)
    o_start = tl.zeros([BLOCK_N], dtype=tl.int32)
    total = tl.zeros([BLOCK_N], dtype=tl.int32)
    if SLOTS > 0:
        e_cnt = tl.load(ecnt_ptr + rows, mask=row_ok, other=0)
        total = e_cnt
    if HAS_OVERFLOW:
        o_start = tl.load(oind_ptr + rows, mask=row_ok, other=0)
        total += tl.load(oind_ptr + rows + 1, mask=row_ok, other=0) - o_start
    if ORIENT == 1:  # out [BLOCK_M, BLOCK_N] = x W^T: the decoded tile is the B operand (it
        # goes through shared memory whatever its register layout)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if MODE == 5:  # the walk with each tile's entries fetched one step ahead (a register ring)
        next_col, next_val = _fetch(
            ecol_ptr, eval_ptr, ocol_ptr, oval_ptr, rows, pos, e_cnt, o_start, total, SLOTS,
            HAS_OVERFLOW, DEPTH, DEPTH_P2)  # fmt: skip
    else:
        next_col = tl.zeros([BLOCK_N, DEPTH_P2], dtype=tl.int32)
        next_val = tl.zeros([BLOCK_N, DEPTH_P2], dtype=tl.float16)
    for k0 in range(0, K, BLOCK_K):
        if MODE == 5:
            cur_col, cur_val = next_col, next_val
            in_tile = (cur_col >= 0) & (cur_col < k0 + BLOCK_K)
            pos += tl.sum(in_tile.to(tl.int32), axis=1)
            next_col, next_val = _fetch(
                ecol_ptr, eval_ptr, ocol_ptr, oval_ptr, rows, pos, e_cnt, o_start, total, SLOTS,
                HAS_OVERFLOW, DEPTH, DEPTH_P2)  # fmt: skip
        u = tm._load_codes(q_ptr, rows, k0, N, row_bytes, stride_q, 4, BLOCK_K)
        kk = k0 + tl.arange(0, BLOCK_K)
        if GROUP > 0:
            s = tl.load(s_ptr + rows * stride_s + k0 // GROUP, mask=row_ok, other=0.0)
        else:
            s = s_row
        if ACT == 1:  # (u - 8) * s is exact before the fp16 product rounds it, as in fp32
            w = tm._codes_to_float(u, 4, ACT) * s.to(tl.float16)[:, None]
        else:
            w32 = (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
            w32 = w32 * s.to(tl.float32)[:, None]
            w = w32.to(tl.bfloat16) if ACT == 2 else w32
        if MODE == 3:  # this (row block, K tile)'s entries, written in by a one-hot product
            tiles: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
            t_at = tptr_ptr + (tl.program_id(0) // blocks_m) * tiles + k0 // BLOCK_K
            beg = tl.load(t_at)
            end = tl.load(t_at + 1)
            for c in tl.static_range(CHUNKS):
                if c == 0 or beg + c * CHUNK < end:  # (later chunks: only where used)
                    e = beg + c * CHUNK + tl.arange(0, CHUNK)
                    ok = e < end
                    rc = tl.load(trc_ptr + e, mask=ok, other=0)
                    v = tl.load(tval_ptr + e, mask=ok, other=0.0)
                    if EMULATE_BF16:  # (the interpreter: one-hot operands in fp32, as _mma widens)
                        v = v.to(tl.float32)
                    else:
                        v = v.to(w.dtype)
                    hit_r = ((rc >> 8)[None, :] == tl.arange(0, BLOCK_N)[:, None]) & ok[None, :]
                    a = tl.where(hit_r, v[None, :], tl.zeros_like(v)[None, :])
                    hit_c = ((rc & 255)[:, None] == tl.arange(0, BLOCK_K)[None, :]) & ok[:, None]
                    b = hit_c.to(v.dtype)
                    corr = tm._mma(
                        a, b, tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32), ACT, EMULATE_BF16
                    )
                    w = tl.where(corr != 0.0, corr.to(w.dtype), w)  # (no bf16 arithmetic: the
                    # interpreter's bf16 adds would be integer adds; outliers are never 0)
        if MODE == 5:
            jj = tl.arange(0, DEPTH_P2)
            for j in tl.static_range(DEPTH):
                col = tl.sum(tl.where(jj[None, :] == j, cur_col, 0), axis=1)
                val = tl.sum(tl.where(jj[None, :] == j, cur_val, tl.zeros_like(cur_val)), axis=1)
                w = tl.where(col[:, None] == kk[None, :], val.to(w.dtype)[:, None], w)
        if MODE == 4:  # each row's first entry in this tile, precomputed (no chain of steps)
            n_tiles: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
            first = tl.load(
                tptr_ptr + rows.to(tl.int64) * n_tiles + k0 // BLOCK_K, mask=row_ok, other=0
            )
            for j in tl.static_range(DEPTH):
                col, val = _entry(
                    ecol_ptr, eval_ptr, ocol_ptr, oval_ptr, rows, first + j, e_cnt, o_start, total,
                    SLOTS, HAS_OVERFLOW)  # fmt: skip
                w = tl.where(col[:, None] == kk[None, :], val.to(w.dtype)[:, None], w)
        if MODE == 1 and DEPTH > 0:
            seen = tl.zeros([BLOCK_N], dtype=tl.int32)
            for j in tl.static_range(DEPTH):
                col, val = _entry(
                    ecol_ptr, eval_ptr, ocol_ptr, oval_ptr, rows, pos + j, e_cnt, o_start, total,
                    SLOTS, HAS_OVERFLOW)  # fmt: skip
                seen += ((col >= 0) & (col < k0 + BLOCK_K)).to(tl.int32)
                w = tl.where(col[:, None] == kk[None, :], val.to(w.dtype)[:, None], w)
            pos += seen
        if ORIENT == 1:
            xs = tl.load(
                x_ptr + ms[:, None].to(tl.int64) * stride_xm + kk[None, :] * stride_xk,
                mask=m_ok[:, None] & (kk < K)[None, :],
                other=0.0,
            )
            acc = tm._mma(xs, tl.trans(w), acc, ACT, EMULATE_BF16)
        else:
            xt = tl.load(
                x_ptr + ms[None, :].to(tl.int64) * stride_xm + kk[:, None] * stride_xk,
                mask=m_ok[None, :] & (kk < K)[:, None],
                other=0.0,
            )
            acc = tm._mma(w, xt, acc, ACT, EMULATE_BF16)
    if MODE == 2 and (SLOTS > 0 or HAS_OVERFLOW):  # gathered after the product (as before)
        acc += tm._table_2d(
            x_ptr, ecol_ptr, eval_ptr, ecnt_ptr, oind_ptr, ocol_ptr, oval_ptr, rows, row_ok, ms,
            m_ok, stride_xm, stride_xk, 0, SLOTS, HAS_OVERFLOW, 1, SLOT_CHUNK, 8, BLOCK_N,
            BLOCK_M,
        )  # fmt: skip
    if ORIENT == 1:
        out_ptrs = out_ptr + ms[:, None].to(tl.int64) * stride_om + rows[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & row_ok[None, :])
    else:
        out_ptrs = out_ptr + ms[None, :].to(tl.int64) * stride_om + rows[:, None]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & m_ok[None, :])


@triton.jit
def _dense_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    M,
    N,
    K: tl.constexpr,
    stride_xm,
    stride_w,
    stride_om,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The same tiling on a dense fp16 weight: what this structure allows at best."""
    blocks_m = tl.cdiv(M, BLOCK_M)
    rows = (tl.program_id(0) // blocks_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = (tl.program_id(0) % blocks_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + rows[:, None].to(tl.int64) * stride_w + kk[None, :])
        xt = tl.load(x_ptr + ms[None, :].to(tl.int64) * stride_xm + kk[:, None])
        acc = tl.dot(w, xt, acc)
    tl.store(out_ptr + ms[None, :].to(tl.int64) * stride_om + rows[:, None], acc.to(tl.float16))


def outlier_depth(table: tm.OutlierTable, n: int, block_k: int) -> int:
    """The most outliers any row has in one K tile of ``block_k`` columns."""
    rows, cols, _ = all_entries(table, n)
    if rows.numel() == 0:
        return 0
    tiles = int(cols.max()) // block_k + 1
    return int(torch.bincount(rows * tiles + cols // block_k).max())


@dataclass(frozen=True)
class TileEntries:
    """The outliers regrouped by (row block, K tile): ``ptr [blocks * tiles + 1]``, each entry's
    ``local row << 8 | local column`` (int32) and value, in order."""

    ptr: torch.Tensor
    rc: torch.Tensor
    vals: torch.Tensor
    most: int  # the most entries in one (row block, K tile)


def all_entries(table: tm.OutlierTable, n: int) -> tuple[torch.Tensor, ...]:
    """(rows, cols, vals) of every outlier in the kernel table (slots, then overflow)."""
    device = table.count.device
    count = table.count.long()
    keep = torch.arange(table.slots, device=device)[None, :] < count[:, None]
    slot_rows = torch.repeat_interleave(torch.arange(n, device=device), count)
    over_counts = (table.ov_indptr[1:] - table.ov_indptr[:-1]).long()
    over_rows = torch.repeat_interleave(torch.arange(n, device=device), over_counts)
    rows = torch.cat([slot_rows, over_rows])
    cols = torch.cat([table.cols.long()[keep], table.ov_cols.long()])
    vals = torch.cat([table.vals[keep], table.ov_vals])
    return rows, cols, vals


def tile_entries(table: tm.OutlierTable, n: int, k: int, block_n: int, block_k: int):
    assert block_n <= 256 and block_k <= 256
    rows, cols, vals = all_entries(table, n)
    tiles = -(-k // block_k)
    blocks = -(-n // block_n)
    key = (rows // block_n) * tiles + cols // block_k
    order = torch.argsort(key, stable=True)
    key, rows, cols, vals = key[order], rows[order], cols[order], vals[order]
    counts = torch.bincount(key, minlength=blocks * tiles)
    ptr = torch.zeros(blocks * tiles + 1, dtype=torch.int32, device=rows.device)
    ptr[1:] = torch.cumsum(counts, 0).to(torch.int32)
    rc = ((rows % block_n) << 8 | (cols % block_k)).to(torch.int32)
    most = int(counts.max()) if counts.numel() else 0
    return TileEntries(ptr, rc, vals.contiguous(), most)


def tile_starts(table: tm.OutlierTable, n: int, k: int, block_k: int) -> torch.Tensor:
    """``[N, tiles]`` int32: the index, in each row's list, of its first entry at or past the
    tile's first column (the list is column-sorted: slots, then overflow)."""
    rows, cols, _ = all_entries(table, n)
    tiles = -(-k // block_k)
    counts = torch.bincount(rows * tiles + cols // block_k, minlength=n * tiles).view(n, tiles)
    starts = torch.zeros(n, tiles, dtype=torch.int32, device=counts.device)
    starts[:, 1:] = torch.cumsum(counts, 1)[:, :-1].to(torch.int32)
    return starts


def gemm(
    weight: tm.Weight,
    x: torch.Tensor,
    config: GemmConfig,
    depth: int = 0,
    mode: int = 1,
    tiles: TileEntries | torch.Tensor | None = None,  # mode 3: TileEntries; 4: tile_starts
    chunk: int = 64,
    slot_chunk: int = 2,
    xt: bool = False,
    orient: int = 0,
) -> torch.Tensor:
    """mode 0: no outliers; 1: per-row walk (``depth``); 2: gathered after the product;
    3: one-hot per tile; 4: walk from precomputed tile starts; 5: walk fetched a step ahead."""
    assert weight.bits == 4 and (not weight.group_size or weight.group_size % config.block_k == 0)
    m, k = x.shape
    n = weight.out_features
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    table = weight.outliers
    grid = (triton.cdiv(n, config.block_n) * triton.cdiv(m, config.block_m),)
    q = weight.qweight
    if xt:  # x^T row-major (x[m, k] at k * M + m): the outliers' gathers read rows of it
        x = tm.transposed_x(x, m)
    if mode == 3 and not tiles.most:  # no outliers at all: nothing to write in
        mode = 0
    if mode == 3:
        t_args, chunks = (tiles.ptr, tiles.rc, tiles.vals), -(-tiles.most // chunk)
    elif mode == 4:
        t_args, chunks = (tiles, table.count, table.vals), 0
    else:
        t_args, chunks = (table.count, table.count, table.vals), 0
    _gemm_kernel[grid](
        x,
        q,
        weight.scales,
        *table.tensors(),
        out,
        m,
        n,
        k,
        q.shape[1],
        x.stride(0),
        x.stride(1),
        q.stride(0),
        weight.scales.stride(0),
        out.stride(0),
        *t_args,
        GROUP=weight.group_size,
        ACT=tm.ACT_CODES[x.dtype],
        SLOTS=table.slots if mode != 3 else 0,
        HAS_OVERFLOW=table.overflow > 0 and mode != 3,
        DEPTH=depth,
        BLOCK_N=config.block_n,
        BLOCK_M=config.block_m,
        BLOCK_K=config.block_k,
        EMULATE_BF16=tm.interpreting(),
        MODE=mode,
        CHUNKS=chunks,
        CHUNK=chunk,
        SLOT_CHUNK=slot_chunk,
        DEPTH_P2=triton.next_power_of_2(max(depth, 1)),
        ORIENT=orient,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def dense(w: torch.Tensor, x: torch.Tensor, config: GemmConfig) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, config.block_n) * triton.cdiv(m, config.block_m),)
    _dense_kernel[grid](
        x,
        w,
        out,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        out.stride(0),
        BLOCK_N=config.block_n,
        BLOCK_M=config.block_m,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


# the tilings timed (the best of a wider first sweep, results/…-2026-11-23-explore-gemm.json)
CONFIGS = [
    GemmConfig(64, 128, 64, 4, 4),
    GemmConfig(128, 128, 64, 4, 4),
    GemmConfig(128, 128, 128, 8, 3),
    GemmConfig(128, 256, 64, 8, 3),
    GemmConfig(64, 64, 64, 4, 4),
]
# name: (outliers?, mode, orientation, x transposed first)
VARIANTS = {
    "no-outliers": (False, 0, 0, False),
    "no-outliers-xw": (False, 0, 1, False),
    "gather-after": (True, 2, 0, True),
    "onehot-per-tile": (True, 3, 0, False),
    "walk": (True, 1, 0, False),
    "walk-starts": (True, 4, 0, False),
    "walk-prefetch": (True, 5, 0, False),
    "walk-prefetch-xw": (True, 5, 1, False),
}


def check(device: str) -> None:
    """The fused GEMM against the reference (fp16, bf16, fp32; ragged shapes; group 128)."""

    cases = [(256, 512, 64, None, 0.005), (200, 384, 40, None, 0.05), (130, 256, 17, 128, 0.02)]
    if device == "cpu":
        cases = [(64, 128, 16, None, 0.05), (40, 128, 8, 64, 0.02)]
    for n, k, m, group, fraction in cases:
        qw = random_parts(n, k, 4, group, fraction, seed=n, device=device, extreme_rows=True)
        weight = kernel_weight(qw)
        config = GemmConfig(32, 16, 64, 4, 2) if device == "cpu" else GemmConfig(64, 32, 64, 4, 3)
        depth = outlier_depth(weight.outliers, n, config.block_k)
        tiles = tile_entries(weight.outliers, n, k, config.block_n, config.block_k)
        for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 1e-2), (torch.float32, 1e-3)):
            x = torch.randn(m, k, device=device, dtype=dtype)
            ref = reference(qw, x, None).float()
            starts = tile_starts(weight.outliers, n, k, config.block_k)
            runs = [
                (1, False, 0),
                (2, True, 0),
                (3, False, 0),
                (4, False, 0),
                (5, False, 0),
                (0, False, 1),
                (1, False, 1),
                (5, False, 1),
            ]
            for mode, xt, orient in runs:
                t_arg = starts if mode == 4 else tiles
                got = gemm(
                    weight, x, config, depth, mode, t_arg, chunk=16, xt=xt, orient=orient
                ).float()
                if mode == 0:  # (no outliers: compare with the codes alone)
                    continue
                err = float((got - ref).norm() / ref.norm())
                verdict = "ok" if err <= tol else "FAIL"
                print(
                    f"check {n}x{k} m={m} group={group} {dtype} mode {mode} depth={depth} "
                    f"tile entries<={tiles.most}: rel err {err:.2e} {verdict}",
                    flush=True,
                )
                if err > tol:
                    raise SystemExit(1)


def time_shape(shape: str, args, record) -> None:
    device = "cuda"
    n, k = (int(v) for v in shape.split("x"))
    qw = random_parts(n, k, 4, None, 0.005, seed=n + 4, device=device)
    weight = kernel_weight(qw)
    bare = kernel_weight(random_parts(n, k, 4, None, 0.0, seed=n + 4, device=device))
    w16 = torch.randn(n, k, device=device, dtype=torch.float16) * 0.02
    depths = {c.block_k: outlier_depth(weight.outliers, n, c.block_k) for c in CONFIGS}
    print(
        f"{shape}: slots {weight.outliers.slots}, overflow {weight.outliers.overflow}, "
        f"depth per block_k {depths}",
        flush=True,
    )
    for m in args.batches:
        x = torch.randn(m, k, device=device, dtype=torch.float16)
        fp16 = bench(lambda x=x: x @ w16.T)
        record(shape, m, "fp16-cublas", None, fp16, fp16)
        us = bench(lambda x=x: tm.dequant_matmul(weight, x, None))
        record(shape, m, "dequant+cublas", None, us, fp16)
        if m <= tm.MID_BATCH:  # what matmul runs there now
            config = tm.default_config(weight, m)
            us = bench(lambda x=x, c=config: tm.dot_matmul(weight, x, None, c))
            record(shape, m, "word-plane (default)", asdict(config), us, fp16)
        for config in CONFIGS:
            if config.block_m > max(m, 64):
                continue
            us = bench(lambda x=x, c=config: dense(w16, x, c))
            record(shape, m, "triton-dense-fp16", asdict(config), us, fp16)
            d = depths[config.block_k]
            tiles = tile_entries(weight.outliers, n, k, config.block_n, config.block_k)
            starts = tile_starts(weight.outliers, n, k, config.block_k)
            for name in args.variants:
                has, mode, orient, xt = VARIANTS[name]
                wt = weight if has else bare
                t_arg = starts if mode == 4 else tiles
                try:
                    us = bench(
                        lambda x=x, c=config, wt=wt, mode=mode, d=d, t=t_arg, o=orient, xt=xt: gemm(
                            wt, x, c, d, mode, t, 64, 4, xt, o
                        )
                    )
                    record(shape, m, name, asdict(config), us, fp16, d if has else 0)
                except Exception as exc:  # a config that fails to build: reported
                    print(
                        f"{shape} m={m} {name} {config}: {type(exc).__name__}: {str(exc)[:300]}",
                        flush=True,
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", nargs="+", default=["4096x4096", "11008x4096", "14336x4096"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256, 1024])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "."))
    args = parser.parse_args()
    device = "cpu" if tm.interpreting() else "cuda"
    if args.check or device == "cpu":
        check(device)
    if device == "cpu":
        return

    warm_up(device)
    rows: list[dict] = []

    def record(shape, m, kind, config, us, fp16_us, depth=None):
        row = {
            "shape": shape,
            "batch": m,
            "kind": kind,
            "config": config,
            "us": round(us, 2),
            "fp16_us": round(fp16_us, 2),
            "speedup": round(fp16_us / us, 3),
            "depth": depth,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    for shape in args.shapes:
        time_shape(shape, args, record)
        torch.cuda.empty_cache()
    note = (
        "Fused int4 GEMM prototypes for batches past 16 (benchmarks/explore_gemm.py): the "
        "decoded tile with 0.5% random outliers written in (walk: each row's column-sorted "
        "list, DEPTH compare+selects per tile; starts: each tile's first entry precomputed; "
        "prefetch: the next tile's entries loaded a step ahead; onehot-per-tile: a one-hot "
        "tensor-core product per (row block, K tile); xw: x as the left operand, the tile as "
        "the right) or gathered after the product from x^T (gather-after); against fp16 "
        "cuBLAS, a dense fp16 Triton GEMM of the same tiling, dequantize + cuBLAS and the "
        "library's default. GPU-time medians, L2 cleared (bench_kernels.gpu_time_us)."
    )
    path = write_result("explore-gemm", device, {"note": note, "rows": rows}, args.out)
    print(f"\nwrote {path}\nbest per case:")
    for shape in args.shapes:
        for m in args.batches:
            best: dict[str, dict] = {}
            for r in rows:
                if r["shape"] == shape and r["batch"] == m:
                    if r["kind"] not in best or r["us"] < best[r["kind"]]["us"]:
                        best[r["kind"]] = r
            print(
                f"  {shape} b={m}: "
                + "  ".join(f"{kind} {r['us']:.1f}" for kind, r in best.items())
            )


if __name__ == "__main__":
    main()
