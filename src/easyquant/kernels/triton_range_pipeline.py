"""``quantize_tensor(..., backend="triton")`` with its finishing steps fused as well.

After the range search, quantize_tensor (in torch) rounds the scales to their storage dtype,
compares each searched range with plain RTN's, computes the codes and packs them: about twenty
passes over float32 copies of the weight, which on a GPU take as long as the 500-step search
itself. :func:`finish_ranges` does all of that in one kernel (one read of the weight and of the
zeroed rows, a write of the packed bytes), with the reference's own arithmetic (IEEE division,
``floor(x / s + 1/2)``), so that its codes are the torch path's given the same searched ranges.
:func:`quantize_tensor_triton` is the whole pipeline: outliers and their CSR lists in torch, the
search and the finish in Triton.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from easyquant.algorithm import chunking
from easyquant.algorithm.chunking import row_slices
from easyquant.algorithm.outliers import outlier_mask, zeroed_float
from easyquant.algorithm.range_init import grid_init_scales, least_squares_refine
from easyquant.algorithm.range_search import initial_scales
from easyquant.config import INIT_GRID_LOW, QuantConfig
from easyquant.format.bitpack import pack_codes, packed_length
from easyquant.format.qweight import QuantizedWeight, assemble
from easyquant.kernels.triton_range_search import (
    interpreting,
    launch_plan,
    triton_range_search_with_loss,
)

# Rows of a program and the slice of a row it works on at a time.
FINISH_TILE = 4096
# Values (of the weight) a chunk of rows holds on the GPU, about: 64 MiB as float32. The search
# keeps a chunk's rows in registers, so a chunk must be large enough to fill the GPU (H100,
# 500 steps: 2^24 as fast as one chunk on the 7B shapes; a 7B bfloat16 [11008, 4096] weight
# then peaks at 2x its size above itself instead of 3x).
GPU_CHUNK_ELEMENTS = 1 << 24
STORAGE_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _slice(ptr, rows, row_ok, n, col, PRE: tl.constexpr):
    cols = col + tl.arange(0, PRE)
    mask = row_ok[:, None] & (cols < n)[None, :]
    return tl.load(ptr + rows[:, None] * n + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _storage_round(x, SCALE_DTYPE: tl.constexpr):
    """float32 of ``x`` rounded (to nearest even) to SCALE_DTYPE; ``x`` finite and >= 0."""
    if SCALE_DTYPE == tl.bfloat16:
        # By the bits: Triton 3.6's interpreter truncates float32 -> bfloat16 conversions.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(SCALE_DTYPE).to(tl.float32)


@triton.jit
def _codes(x, scale, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """The reference's quantize_codes: clamp(floor(x / s + 1/2)), s > 0 per row."""
    q = tl.floor(tl.div_rn(x, scale[:, None]) + 0.5)
    return tl.minimum(tl.maximum(q, QMIN), QMAX)


@triton.jit
def _loss(x, scale, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """Per-row reconstruction_loss of a slice (a zero scale quantizes with 1, as there)."""
    safe = tl.where(scale > 0, scale, 1.0)
    err = _codes(x, safe, QMIN, QMAX) * safe[:, None] - x
    return tl.sum(err * err, axis=1)


@triton.jit
def _finish_kernel(
    x_ptr,
    w_ptr,
    searched_ptr,
    scale_ptr,
    out_ptr,
    num_rows,
    n,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRE: tl.constexpr,
    COMPARE_RTN: tl.constexpr,
    SCALE_DTYPE: tl.constexpr,
    PER_BYTE: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    rows = rows.to(tl.int64)
    # Scales are stored in SCALE_DTYPE and the codes are computed with the stored values.
    searched = tl.load(searched_ptr + rows, mask=row_ok, other=0.0)
    scale = _storage_round(searched, SCALE_DTYPE)
    if COMPARE_RTN:
        # Plain RTN's range (max-abs of the whole row, outliers included) is a candidate too.
        amax = tl.zeros([BLOCK_R], tl.float32)
        col = 0
        while col < n:  # while, not range(n): see triton_range_search
            amax = tl.maximum(amax, tl.max(tl.abs(_slice(w_ptr, rows, row_ok, n, col, PRE)), 1))
            col += PRE
        rtn = _storage_round(tl.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32)), SCALE_DTYPE)
        rtn_loss = tl.zeros([BLOCK_R], tl.float32)
        searched_loss = tl.zeros([BLOCK_R], tl.float32)
        col = 0
        while col < n:
            x = _slice(x_ptr, rows, row_ok, n, col, PRE)
            rtn_loss += _loss(x, rtn, QMIN, QMAX)
            searched_loss += _loss(x, scale, QMIN, QMAX)
            col += PRE
        scale = tl.where(rtn_loss < searched_loss, rtn, scale)
    tl.store(scale_ptr + rows, scale.to(SCALE_DTYPE), mask=row_ok)

    safe = tl.where(scale > 0, scale, 1.0)
    col = 0
    while col < n:
        x = _slice(x_ptr, rows, row_ok, n, col, PRE)
        unsigned = (_codes(x, safe, QMIN, QMAX) - QMIN).to(tl.int32)
        # Bit packing as format.bitpack: code k of a byte at bits k * (8 / PER_BYTE).
        if PER_BYTE == 1:
            packed = unsigned
        elif PER_BYTE == 2:
            low, high = tl.split(tl.reshape(unsigned, [BLOCK_R, PRE // 2, 2]))
            packed = low | (high << 4)
        else:  # 4 codes a byte; split the pairs (0, 2) and (1, 3) apart
            even, odd = tl.split(tl.reshape(unsigned, [BLOCK_R, PRE // 4, 2, 2]))
            c0, c2 = tl.split(even)
            c1, c3 = tl.split(odd)
            packed = c0 | (c1 << 2) | (c2 << 4) | (c3 << 6)
        width = n // PER_BYTE
        cols = col // PER_BYTE + tl.arange(0, PRE // PER_BYTE)
        mask = row_ok[:, None] & (cols < width)[None, :]
        tl.store(out_ptr + rows[:, None] * width + cols[None, :], packed.to(tl.uint8), mask=mask)
        col += PRE


def finish_block_rows(num_rows: int, n: int) -> int:
    """Rows a program of the finish kernel takes, for ``num_rows`` rows of ``n`` values."""
    pre = min(1024, triton.next_power_of_2(n))
    return max(1, min(triton.next_power_of_2(num_rows), FINISH_TILE // pre))


def finish_ranges(
    normals: torch.Tensor,
    weight_rows: torch.Tensor,
    searched: torch.Tensor,
    bits: int,
    scale_dtype: torch.dtype,
    compare_rtn: bool,
    block_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Stored scales ``[R]`` and codes of ``R`` rows, as quantize_tensor finishes them.

    ``normals`` float32 ``[R, n]`` (outliers zeroed), ``weight_rows`` the same rows of the
    weight itself (any float dtype; its max-abs gives the RTN candidate), ``searched`` float32
    ``[R]`` or ``[R, 1]``. Returns ``(scales, codes, packed)``: ``codes`` is uint8, packed as
    format.bitpack packs each row when ``packed`` (2, 4 or 8 bits and ``n`` a whole number of
    bytes), else one unsigned code per byte ``[R, n]``. ``block_rows`` (rows per program) defaults
    to :func:`finish_block_rows`; rows taken in chunks pass the whole tensor's, so that every row
    is finished by the same program shape.
    """
    num_rows, n = normals.shape
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    per_byte = 8 // bits if bits in (2, 4, 8) and n % (8 // bits) == 0 else 1
    packed = bits == 8 or per_byte > 1
    scales = torch.empty(num_rows, dtype=scale_dtype, device=normals.device)
    codes = torch.empty(num_rows, n // per_byte, dtype=torch.uint8, device=normals.device)
    pre = min(1024, triton.next_power_of_2(n))
    block_rows = block_rows or finish_block_rows(num_rows, n)
    _finish_kernel[(triton.cdiv(num_rows, block_rows),)](
        normals.contiguous(),
        weight_rows.contiguous(),
        searched.reshape(-1).float().contiguous(),
        scales,
        codes,
        num_rows,
        n,
        QMIN=qmin,
        QMAX=qmax,
        BLOCK_R=block_rows,
        PRE=pre,
        COMPARE_RTN=compare_rtn,
        SCALE_DTYPE=STORAGE_DTYPES[scale_dtype],
        PER_BYTE=per_byte,
        num_warps=4,
    )
    return scales, codes, packed


def quantize_tensor_triton(
    weight: torch.Tensor, config: QuantConfig, outliers: torch.Tensor | None = None
) -> QuantizedWeight:
    """What ``quantize_tensor(weight, config, backend="triton")`` returns, faster on a GPU.

    ``weight`` must already have passed quantize_tensor's checks (2-D, float, finite, groups
    dividing the row). Outliers (and their CSR lists) are found in torch; the search and the
    finish (storage rounding, the RTN candidate, codes, packing) run as Triton kernels, on a
    chunk of rows at a time (:func:`pipeline_chunk_rows`): besides the weight and its outlier
    mask, memory holds one chunk's float32 copy, not the weight's. ``outliers``: a mask found
    beforehand (else the config's n-sigma rule on ``weight``).
    """
    if weight.device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton pipeline runs on CUDA tensors, got one on {weight.device}")
    out_f, in_f = weight.shape
    group = config.group_size or in_f
    groups = in_f // group
    scale_dtype = getattr(torch, config.scale_dtype)
    if outliers is None:
        outliers = outlier_mask(
            weight, config.outlier_sigma, config.outlier_scope, config.group_size
        )
    # Launch shapes of the whole tensor, for every chunk: each row is searched and finished by
    # the same program shape as without chunks (chunks start at a multiple of its rows).
    search_plan = launch_plan(out_f * groups, group)
    finish_rows = finish_block_rows(out_f * groups, group)
    align = max(search_plan.block_rows, finish_rows)
    chunk = pipeline_chunk_rows(weight, config, align // math.gcd(align, groups))
    qweight = torch.empty(
        out_f, packed_length(in_f, config.bits), dtype=torch.uint8, device=weight.device
    )
    scales = torch.empty(out_f, groups, dtype=scale_dtype, device=weight.device)
    for rows in row_slices(out_f, chunk):
        w = weight[rows]
        normals = zeroed_float(w, outliers[rows]).reshape(-1, group)
        if config.method == "easyquant":
            init = None
            if config.init_grid:
                init = grid_init_scales(
                    normals, config.qmin, config.qmax, config.init_grid, INIT_GRID_LOW
                )
            searched, _ = triton_range_search_with_loss(
                normals,
                config.qmin,
                config.qmax,
                config.steps,
                config.lr,
                init_scale=init,
                plan=search_plan,
            )
            if config.refine_steps:
                # As quantize_tensor: refined from the stored ranges (the finish's own rounding
                # of already stored values changes nothing).
                searched = least_squares_refine(
                    normals,
                    searched.to(scale_dtype).float(),
                    config.qmin,
                    config.qmax,
                    config.refine_steps,
                    store=lambda s: s.to(scale_dtype).float(),
                )
        else:
            searched = initial_scales(normals, config.qmax)
        part_scales, codes, packed = finish_ranges(
            normals,
            w.reshape(-1, group),
            searched,
            config.bits,
            scale_dtype,
            compare_rtn=config.method == "easyquant",
            block_rows=finish_rows,
        )
        del normals
        codes = codes.reshape(w.shape[0], -1)
        qweight[rows] = codes if packed else pack_codes(codes, config.bits)
        scales[rows] = part_scales.reshape(-1, groups)
        del codes
    outlier_dtype = getattr(torch, config.outlier_dtype) if config.outlier_dtype else None
    return assemble(
        weight, qweight, scales, outliers, config.bits, config.group_size, outlier_dtype
    )


def pipeline_chunk_rows(weight: torch.Tensor, config: QuantConfig, align: int) -> int:
    """Weight rows quantize_tensor_triton takes at a time, a multiple of ``align``.

    The kernels do each row alone, so any chunks (aligned to their programs) give the same bits.
    The range search keeps its rows in registers: a chunk must fill the GPU, hence the chunks of
    about GPU_CHUNK_ELEMENTS values, of equal size. Torch reductions (``init_grid``,
    ``refine_steps``) are sized by the row count on CUDA: all rows at once there.
    """
    out_f = weight.shape[0]
    easyquant = config.method == "easyquant"
    if weight.device.type != "cpu" and easyquant and (config.init_grid or config.refine_steps):
        return out_f
    elements = GPU_CHUNK_ELEMENTS if weight.device.type != "cpu" else chunking.CHUNK_ELEMENTS
    count = max(1, -(-weight.numel() // elements))  # chunks
    return align * max(1, -(-out_f // (count * align)))
