"""Fused Triton kernels for ``QuantLinear``: packed 2/3/4/8-bit codes times activations, with the
row-compressed outliers added in the same kernel.

Three kernels read the stored format of :mod:`easyquant.format.qweight` as it is (no repacked copy):

- ``_gemv_kernel`` (batch 1): streams the codes as int32 words, turns each code ``u`` into the
  float ``1 + u / 2^bits`` with two integer ops (no int->float conversion instruction), and
  accumulates ``w * x`` in fp32 on the CUDA cores; ``sum((u - offset) * x)`` is recovered at the
  end from ``sum(x)``. The outliers of each row are added from its CSR slice before the store.
- ``_dot_kernel`` (any batch): computes ``out^T = W @ x^T`` so that the weight tile, decoded in
  registers to the activation dtype, is the left operand of ``tl.dot`` (tensor cores) and the batch
  is the narrow side (16 wide at small batch). Small batch adds outliers per row (gathering
  ``x[m, col]``); large batch adds them as a one-hot ``[rows, chunk] @ x[cols]`` product.
- ``_dequant_kernel`` + ``_scatter_outliers_kernel``: the dense weight in the activation dtype
  (outliers scattered in), for ``dequantize + cuBLAS`` at large batch.

Codes are unsigned ``u = q - qmin`` (``qmin = -2^(bits-1)``), so ``q = u - 2^(bits-1)``. Outlier
positions hold ``q = 0``: an outlier adds exactly ``value * x[col]`` and nothing is subtracted.
Per-channel scales multiply the fp32 accumulator once; group scales multiply it per K tile (the
tile never straddles a group).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Which stored bit widths each kernel decodes (the reference torch path covers everything else).
SUPPORTED_BITS = (2, 3, 4, 8)
# Activation dtype codes passed to the kernels as constexpr.
ACT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Codes per int32 word for the GEMV's word loads (3-bit: 32 codes in three words).
GEMV_WORD_CODES = {2: 16, 3: 32, 4: 8, 8: 4}


# ---- decoding helpers ---------------------------------------------------------------------------
@triton.jit
def _load_codes(
    q_ptr,
    rows,
    k0,
    N,
    row_bytes,
    stride_q,
    BITS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Unsigned codes (int32) ``[len(rows), BLOCK_K]`` of columns ``k0 ..`` (k0 % 8 == 0)."""
    base = q_ptr + rows[:, None].to(tl.int64) * stride_q
    row_ok = (rows < N)[:, None]
    if BITS == 8:
        b = k0 + tl.arange(0, BLOCK_K)
        return tl.load(base + b[None, :], mask=row_ok & (b < row_bytes)[None, :], other=0).to(
            tl.int32
        )
    elif BITS == 4:
        b = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(base + b[None, :], mask=row_ok & (b < row_bytes)[None, :], other=0)
        byte = byte.to(tl.int32)
        return tl.interleave(byte & 15, byte >> 4)
    elif BITS == 2:
        b = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        byte = tl.load(base + b[None, :], mask=row_ok & (b < row_bytes)[None, :], other=0)
        byte = byte.to(tl.int32)
        even = tl.interleave(byte & 3, (byte >> 4) & 3)  # codes 0, 2 of each byte
        odd = tl.interleave((byte >> 2) & 3, byte >> 6)  # codes 1, 3
        return tl.interleave(even, odd)
    else:  # 3 bits: eight codes in each little-endian 24-bit word
        w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        ok = row_ok & (3 * w < row_bytes)[None, :]
        b0 = tl.load(base + 3 * w[None, :], mask=ok, other=0).to(tl.int32)
        b1 = tl.load(base + 3 * w[None, :] + 1, mask=ok, other=0).to(tl.int32)
        b2 = tl.load(base + 3 * w[None, :] + 2, mask=ok, other=0).to(tl.int32)
        word = b0 | (b1 << 8) | (b2 << 16)
        c04 = tl.interleave(word & 7, (word >> 12) & 7)
        c26 = tl.interleave((word >> 6) & 7, (word >> 18) & 7)
        c15 = tl.interleave((word >> 3) & 7, (word >> 15) & 7)
        c37 = tl.interleave((word >> 9) & 7, (word >> 21) & 7)
        return tl.interleave(tl.interleave(c04, c26), tl.interleave(c15, c37))


@triton.jit
def _codes_to_float(u, BITS: tl.constexpr, ACT: tl.constexpr):
    """Signed value ``u - 2^(BITS-1)`` exactly, in the activation dtype, without an int->float
    conversion instruction where a mantissa trick fits (the OR puts ``u`` in the mantissa of a
    power of two; subtracting that power and the offset is exact)."""
    offset: tl.constexpr = 1 << (BITS - 1)
    if ACT == 1:  # float16: 1024 + u for u < 1024
        magic16 = (u | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        value = magic16 - (1024.0 + offset)
    else:  # float32 (and bfloat16 through it: Triton's interpreter has no bfloat16 constants)
        magic32 = (u | 0x4B000000).to(tl.float32, bitcast=True)  # 2^23 + u
        value = magic32 - (8388608.0 + offset)
        if ACT == 2:
            value = value.to(tl.bfloat16)
    return value


@triton.jit
def _mma(a, b, ACT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """``a @ b`` with fp32 accumulation. fp32 operands are multiplied exactly (not tf32); under
    Triton 3.6's interpreter, whose dot multiplies bfloat16 bit patterns as integers, bfloat16
    operands are widened first (same products: bf16 x bf16 is exact in fp32)."""
    if ACT == 0:
        return tl.dot(a, b, input_precision="ieee")
    elif ACT == 2 and EMULATE_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _gemv_plane(w0, w1, w2, k: tl.constexpr, BITS: tl.constexpr):
    """Code ``k`` of each int32 word (or of each 3-word group for 3 bits), as the fp32 value
    ``1 + u / 2^BITS`` built by OR-ing ``u`` into the mantissa of 1.0."""
    mask: tl.constexpr = (1 << BITS) - 1
    if BITS == 3:
        bit: tl.constexpr = 3 * k
        if bit + 3 <= 32:
            u = (w0 >> bit) & mask
        elif bit < 32:  # code 10 straddles words 0 and 1
            u = ((w0 >> bit) & ((1 << (32 - bit)) - 1)) | ((w1 << (32 - bit)) & mask)
        elif bit + 3 <= 64:
            u = (w1 >> (bit - 32)) & mask
        elif bit < 64:  # code 21 straddles words 1 and 2
            u = ((w1 >> (bit - 32)) & ((1 << (64 - bit)) - 1)) | ((w2 << (64 - bit)) & mask)
        else:
            u = (w2 >> (bit - 64)) & mask
    else:
        u = (w0 >> (BITS * k)) & mask
    return ((u << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)


# ---- batch 1: CUDA-core GEMV ---------------------------------------------------------------------
@triton.jit
def _gemv_kernel(
    x_ptr,
    q_ptr,  # int32 view of qweight [N, row_words]
    s_ptr,
    indptr_ptr,
    idx_ptr,
    val_ptr,
    bias_ptr,
    out_ptr,
    N,
    K: tl.constexpr,  # constexpr: the main loop's trip count must be static for the interpreter
    row_words,
    stride_s,
    GROUP: tl.constexpr,  # 0: one scale per row; else columns per group (BLOCK_W words divide it)
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_OUTLIERS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,  # words (3 bits: word triples) per row per step
    OUT_CHUNK: tl.constexpr,
):
    # codes per word group and int32 words per group
    PER: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    WPG: tl.constexpr = 3 if BITS == 3 else 1
    BLOCK_K: tl.constexpr = BLOCK_W * PER
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    qrow = q_ptr + rows[:, None].to(tl.int64) * row_words
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    xsum = tl.zeros([BLOCK_W], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        g = k0 // PER + tl.arange(0, BLOCK_W)  # word group index
        ok = row_ok[:, None] & (g < (K + PER - 1) // PER)[None, :]
        w0 = tl.load(qrow + WPG * g[None, :], mask=ok, other=0)
        if BITS == 3:
            w1 = tl.load(qrow + 3 * g[None, :] + 1, mask=ok, other=0)
            w2 = tl.load(qrow + 3 * g[None, :] + 2, mask=ok, other=0)
        else:
            w1 = w0
            w2 = w0
        if GROUP > 0:
            s = tl.load(s_ptr + rows * stride_s + k0 // GROUP, mask=row_ok, other=0.0)
            s = s.to(tl.float32)
            s_mul = s * (1 << BITS)
            s_add = -s * ((1 << BITS) + (1 << (BITS - 1)))
        for k in tl.static_range(PER):
            col = k0 + PER * tl.arange(0, BLOCK_W) + k
            xk = tl.load(x_ptr + col, mask=col < K, other=0.0).to(tl.float32)
            f = _gemv_plane(w0, w1, w2, k, BITS)
            if GROUP > 0:
                acc += (f * s_mul[:, None] + s_add[:, None]) * xk[None, :]
            else:
                acc += f * xk[None, :]
                xsum += xk
    total = tl.sum(acc, axis=1)
    if GROUP == 0:
        # sum((1 + u/2^B) x) = sum(x) + sum(u x)/2^B and q = u - 2^(B-1)
        x_total = tl.sum(xsum, axis=0)
        s = tl.load(s_ptr + rows * stride_s, mask=row_ok, other=0.0).to(tl.float32)
        total = s * ((1 << BITS) * total - ((1 << BITS) + (1 << (BITS - 1))) * x_total)
    if HAS_OUTLIERS:
        # Each row's outliers, OUT_CHUNK at a time, after the code stream. (Spreading them over
        # the main loop's steps measured slower: benchmarks/notes-matmul-kernels.md.)
        start = tl.load(indptr_ptr + rows, mask=row_ok, other=0)
        count = tl.load(indptr_ptr + rows + 1, mask=row_ok, other=0) - start
        outlier_sum = tl.zeros([BLOCK_N], dtype=tl.float32)
        most = tl.max(count, axis=0)
        j0 = 0
        while j0 < most:
            r_j = j0 + tl.arange(0, OUT_CHUNK)
            r_ok = r_j[None, :] < count[:, None]
            r_p = start[:, None] + r_j[None, :]
            r_col = tl.load(idx_ptr + r_p, mask=r_ok, other=0).to(tl.int32)
            r_v = tl.load(val_ptr + r_p, mask=r_ok, other=0.0).to(tl.float32)
            r_x = tl.load(x_ptr + r_col, mask=r_ok, other=0.0).to(tl.float32)
            outlier_sum += tl.sum(r_v * r_x, axis=1)
            j0 += OUT_CHUNK
        total += outlier_sum
    if HAS_BIAS:
        total += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _rowwise_outliers(
    x_ptr, idx_ptr, val_ptr, start, count, j0, ms, m_ok, stride_xm,
    MODE: tl.constexpr, OUT_CHUNK: tl.constexpr,
):  # fmt: skip
    """``sum_j value[n, j] * x[m, col[n, j]]`` over outlier slots ``j0 .. j0 + OUT_CHUNK`` of
    each row: ``[rows, 1]`` for batch 1 (MODE 1, only column 0 is stored), ``[rows, m]``."""
    j = j0 + tl.arange(0, OUT_CHUNK)
    ok = j[None, :] < count[:, None]
    p = start[:, None] + j[None, :]
    col = tl.load(idx_ptr + p, mask=ok, other=0).to(tl.int32)
    v = tl.load(val_ptr + p, mask=ok, other=0.0).to(tl.float32)
    if MODE == 1:
        xv = tl.load(x_ptr + col, mask=ok, other=0.0).to(tl.float32)
        result = tl.sum(v * xv, axis=1)[:, None]
    else:
        xg = tl.load(
            x_ptr + ms[None, None, :].to(tl.int64) * stride_xm + col[:, :, None],
            mask=ok[:, :, None] & m_ok[None, None, :],
            other=0.0,
        ).to(tl.float32)
        result = tl.sum(v[:, :, None] * xg, axis=1)
    return result


# ---- any batch: tensor-core kernel, out^T = W @ x^T ---------------------------------------------
@triton.jit
def _dot_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    indptr_ptr,
    idx_ptr,
    val_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    K: tl.constexpr,  # constexpr: the main loop's trip count must be static for the interpreter
    row_bytes,
    stride_xm,
    stride_q,
    stride_s,
    stride_om,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    OUTLIER_MODE: tl.constexpr,  # 0 none, 1 per row (batch 1), 2 per row (batch), 3 one-hot
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    OUT_CHUNK: tl.constexpr,
    LOG_BLOCK_N: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % grid_m  # batch blocks vary fastest: blocks sharing weight rows run together
    pid_n = pid // grid_m
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    m_ok = ms < M
    if ACT == 0:
        dot_dtype = tl.float32
    elif ACT == 1:
        dot_dtype = tl.float16
    else:
        dot_dtype = tl.bfloat16
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    ROWWISE: tl.constexpr = OUTLIER_MODE == 1 or OUTLIER_MODE == 2
    K_TILES: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    PER_SPLIT: tl.constexpr = (K_TILES + SPLIT_K - 1) // SPLIT_K
    for i in range(PER_SPLIT):
        k0 = (pid_k * PER_SPLIT + i) * BLOCK_K  # past K in the last split: all loads masked
        u = _load_codes(q_ptr, rows, k0, N, row_bytes, stride_q, BITS, BLOCK_K)
        w = _codes_to_float(u, BITS, ACT)
        kk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(
            x_ptr + ms[None, :].to(tl.int64) * stride_xm + kk[:, None],
            mask=m_ok[None, :] & (kk < K)[:, None],
            other=0.0,
        )
        part = _mma(w, xt, ACT, EMULATE_BF16)
        if GROUP > 0:
            s = tl.load(s_ptr + rows * stride_s + k0 // GROUP, mask=row_ok & (k0 < K), other=0.0)
            acc += part * s.to(tl.float32)[:, None]
        else:
            acc += part
    if GROUP == 0:
        s = tl.load(s_ptr + rows * stride_s, mask=row_ok, other=0.0)
        acc = acc * s.to(tl.float32)[:, None]
    if ROWWISE:
        # each row's outliers, OUT_CHUNK at a time (only the first K split adds them)
        o_start = tl.load(indptr_ptr + rows, mask=row_ok, other=0)
        o_count = tl.load(indptr_ptr + rows + 1, mask=row_ok, other=0) - o_start
        o_count = tl.where(pid_k == 0, o_count, 0)
        o_most = tl.max(o_count, axis=0)
        outlier_acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        j0 = 0
        while j0 < o_most:
            outlier_acc += _rowwise_outliers(
                x_ptr, idx_ptr, val_ptr, o_start, o_count, j0, ms, m_ok, stride_xm,
                OUTLIER_MODE, OUT_CHUNK,
            )  # fmt: skip
            j0 += OUT_CHUNK
        acc += outlier_acc
    if OUTLIER_MODE == 3:
        if pid_k == 0:
            n0 = pid_n * BLOCK_N
            p = tl.load(indptr_ptr + n0)
            p_end = tl.load(indptr_ptr + tl.minimum(n0 + BLOCK_N, N))
            local = tl.arange(0, BLOCK_N)
            while p < p_end:
                pp = p + tl.arange(0, OUT_CHUNK)
                o_ok = pp < p_end
                col = tl.load(idx_ptr + pp, mask=o_ok, other=0).to(tl.int32)
                v = tl.load(val_ptr + pp, mask=o_ok, other=0.0)
                # local row of each outlier: the last row of the block whose CSR start is <= pp
                r = tl.zeros([OUT_CHUNK], dtype=tl.int32)
                for b in tl.static_range(LOG_BLOCK_N - 1, -1, -1):
                    cand = r + (1 << b)
                    first = tl.load(indptr_ptr + tl.minimum(n0 + cand, N))
                    r = tl.where(first <= pp, cand, r)
                onehot = tl.where(
                    (local[:, None] == r[None, :]) & o_ok[None, :], v[None, :].to(dot_dtype), 0.0
                ).to(dot_dtype)
                xg = tl.load(
                    x_ptr + ms[None, :].to(tl.int64) * stride_xm + col[:, None],
                    mask=o_ok[:, None] & m_ok[None, :],
                    other=0.0,
                )
                acc += _mma(onehot, xg, ACT, EMULATE_BF16)
                p += OUT_CHUNK
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    out_ptrs = out_ptr + ms[None, :].to(tl.int64) * stride_om + rows[:, None]
    out_mask = row_ok[:, None] & m_ok[None, :]
    if SPLIT_K > 1:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)
    else:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


# ---- large batch alternative: dense weight for cuBLAS --------------------------------------------
@triton.jit
def _dequant_kernel(
    q_ptr,
    s_ptr,
    w_ptr,
    N,
    K,
    row_bytes,
    stride_q,
    stride_s,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    u = _load_codes(q_ptr, rows, k0, N, row_bytes, stride_q, BITS, BLOCK_K)
    cols = k0 + tl.arange(0, BLOCK_K)
    if GROUP > 0:
        s = tl.load(
            s_ptr + rows[:, None] * stride_s + (cols // GROUP)[None, :],
            mask=(rows < N)[:, None] & (cols < K)[None, :],
            other=0.0,
        )
    else:
        s = tl.load(s_ptr + rows * stride_s, mask=rows < N, other=0.0)[:, None]
    # as the reference: (u - offset) * scale in fp32, rounded once to the output dtype
    w = (u - (1 << (BITS - 1))).to(tl.float32) * s.to(tl.float32)
    tl.store(
        w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
        w.to(w_ptr.dtype.element_ty),
        mask=(rows < N)[:, None] & (cols < K)[None, :],
    )


@triton.jit
def _scatter_outliers_kernel(
    indptr_ptr, idx_ptr, val_ptr, w_ptr, N, K, BLOCK_N: tl.constexpr, OUT_CHUNK: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    start = tl.load(indptr_ptr + rows, mask=row_ok, other=0)
    count = tl.load(indptr_ptr + rows + 1, mask=row_ok, other=0) - start
    most = tl.max(count, axis=0)
    j0 = 0
    while j0 < most:
        j = j0 + tl.arange(0, OUT_CHUNK)
        ok = j[None, :] < count[:, None]
        p = start[:, None] + j[None, :]
        col = tl.load(idx_ptr + p, mask=ok, other=0).to(tl.int64)
        v = tl.load(val_ptr + p, mask=ok, other=0.0)
        ptrs = w_ptr + rows[:, None].to(tl.int64) * K + col
        tl.store(ptrs, v.to(w_ptr.dtype.element_ty), mask=ok)
        j0 += OUT_CHUNK


# ---- host side -----------------------------------------------------------------------------------
def interpreting() -> bool:
    """Are kernels run by Triton's CPU interpreter (TRITON_INTERPRET=1)?"""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16
    block_w: int = 128  # int32 words (3 bits: word triples) per row per step
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class DotConfig:
    block_n: int = 64
    block_m: int = 16
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    onehot: bool = False  # outliers as a one-hot tensor-core product (else gathered per row)
    out_chunk: int = 16  # outliers per row per step when gathered (the gather is [n, chunk, m])


@dataclass(frozen=True)
class Weight:
    """The stored tensors of one quantized linear layer, as the kernels take them."""

    qweight: torch.Tensor
    scales: torch.Tensor
    indptr: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    bits: int
    group_size: int  # 0: one scale per output row
    in_features: int

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def nnz(self) -> int:
        return int(self.values.numel())


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two that divides ``n`` and is at most ``cap``."""
    return min(n & -n, cap)


def dot_block_k(weight: Weight, wanted: int) -> int | None:
    """The K tile of the tensor-core kernel: ``wanted``, or for group scales the largest power
    of two dividing the group (at least 16, the smallest ``tl.dot``); None if none fits."""
    if weight.group_size == 0:
        return wanted
    block_k = _pow2_divisor(weight.group_size, wanted)
    return block_k if block_k >= 16 else None


def gemv_block_w(weight: Weight, wanted: int) -> int | None:
    """Words per step of the GEMV, or None where the int32 word view does not apply."""
    per = GEMV_WORD_CODES[weight.bits]
    if weight.in_features % per or weight.qweight.data_ptr() % 4 or weight.qweight.stride(0) % 4:
        return None
    if weight.group_size == 0:
        return wanted
    if weight.group_size % per:
        return None
    return _pow2_divisor(weight.group_size // per, wanted)


def supports(bits: int, group_size: int | None, in_features: int) -> bool:
    """Can the fused kernels run this layer? (Else QuantLinear uses the torch path.)"""
    if bits not in SUPPORTED_BITS:
        return False
    return group_size is None or group_size % 16 == 0 or group_size == in_features


def gemv(
    weight: Weight,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    config: GemvConfig = GemvConfig(),
) -> torch.Tensor:
    """``x [K] @ W.T (+ bias)`` on the CUDA cores; x one row."""
    block_w = gemv_block_w(weight, config.block_w)
    if block_w is None:
        raise ValueError("this weight does not fit the GEMV's int32 word view")
    n, k = weight.out_features, weight.in_features
    out = torch.empty(n, device=x.device, dtype=x.dtype)
    words = weight.qweight.view(torch.int32)
    grid = (triton.cdiv(n, config.block_n),)
    _gemv_kernel[grid](
        x,
        words,
        weight.scales,
        weight.indptr,
        weight.indices,
        weight.values,
        bias if bias is not None else weight.scales,
        out,
        n,
        k,
        words.stride(0),
        weight.scales.stride(0),
        GROUP=weight.group_size,
        BITS=weight.bits,
        HAS_BIAS=bias is not None,
        HAS_OUTLIERS=weight.nnz > 0,
        BLOCK_N=config.block_n,
        BLOCK_W=block_w,
        OUT_CHUNK=16,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def dot_matmul(
    weight: Weight,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    config: DotConfig = DotConfig(),
) -> torch.Tensor:
    """``x [M, K] @ W.T (+ bias)`` on the tensor cores (any M)."""
    block_k = dot_block_k(weight, config.block_k)
    if block_k is None:
        raise ValueError(f"group size {weight.group_size} has no power-of-two K tile >= 16")
    m, k = x.shape
    n = weight.out_features
    if weight.nnz == 0:
        mode = 0
    elif config.onehot or config.block_m >= 64:
        mode = 3
    else:
        mode = 1 if m == 1 else 2
    split_k = config.split_k
    if split_k > 1:
        out = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    else:
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(n, config.block_n) * triton.cdiv(m, config.block_m), split_k)
    _dot_kernel[grid](
        x,
        weight.qweight,
        weight.scales,
        weight.indptr,
        weight.indices,
        weight.values,
        bias if bias is not None else weight.scales,
        out,
        m,
        n,
        k,
        weight.qweight.shape[1],
        x.stride(0),
        weight.qweight.stride(0),
        weight.scales.stride(0),
        out.stride(0),
        GROUP=weight.group_size,
        BITS=weight.bits,
        ACT=ACT_CODES[x.dtype],
        HAS_BIAS=bias is not None,
        OUTLIER_MODE=mode,
        BLOCK_N=config.block_n,
        BLOCK_M=config.block_m,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        OUT_CHUNK={1: 16, 2: config.out_chunk}.get(mode, 32),
        LOG_BLOCK_N=config.block_n.bit_length() - 1,
        EMULATE_BF16=interpreting(),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out.to(x.dtype) if split_k > 1 else out


def dequantize(weight: Weight, dtype: torch.dtype, block_n: int = 32, block_k: int = 128):
    """The dense weight ``[N, K]`` in ``dtype`` (outliers scattered in), as the reference."""
    n, k = weight.out_features, weight.in_features
    out = torch.empty(n, k, device=weight.qweight.device, dtype=dtype)
    if weight.group_size:
        block_k = max(_pow2_divisor(weight.group_size, block_k), 8)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _dequant_kernel[grid](
        weight.qweight,
        weight.scales,
        out,
        n,
        k,
        weight.qweight.shape[1],
        weight.qweight.stride(0),
        weight.scales.stride(0),
        GROUP=weight.group_size,
        BITS=weight.bits,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    if weight.nnz:
        _scatter_outliers_kernel[(triton.cdiv(n, 16),)](
            weight.indptr, weight.indices, weight.values, out, n, k, BLOCK_N=16, OUT_CHUNK=16
        )
    return out


def dequant_matmul(weight: Weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Large batch alternative: dense weight, then cuBLAS."""
    return torch.nn.functional.linear(x, dequantize(weight, x.dtype), bias)


# ---- dispatch ------------------------------------------------------------------------------------
# Batch 1 uses the GEMV where its word view applies; batches up to SMALL_BATCH the 16-wide
# tensor-core kernel; above LARGE_BATCH, with DEQUANT_LARGE, the dense weight + cuBLAS, which
# measured faster on the H100 than the fused kernel with one-hot outliers (4096x4096 at batch
# 1024 and 0.5% outliers: 72 vs 741 us; benchmarks/notes-matmul-kernels.md).
SMALL_BATCH = 16
LARGE_BATCH = 16
DEQUANT_LARGE = True


def gemv_config(n: int, k: int, bits: int) -> GemvConfig:
    return GemvConfig()


def small_config(n: int, k: int, m: int, bits: int) -> DotConfig:
    if n < 8192:  # fewer rows: narrower row blocks for more programs, longer K steps
        return DotConfig(block_n=32, block_m=16, block_k=512)
    return DotConfig(block_n=64, block_m=16, block_k=128)


def large_config(n: int, k: int, m: int, bits: int) -> DotConfig:
    block_m = 64 if m <= 64 else 128
    return DotConfig(block_n=128, block_m=block_m, block_k=64, num_warps=8, num_stages=3)


def matmul(weight: Weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] @ W.T + bias``, picking the kernel by batch size."""
    m = x.shape[0]
    n, k, bits = weight.out_features, weight.in_features, weight.bits
    if m == 1 and gemv_block_w(weight, 128) is not None:
        return gemv(weight, x.reshape(-1), bias, gemv_config(n, k, bits)).reshape(1, n)
    if m <= SMALL_BATCH:
        return dot_matmul(weight, x, bias, small_config(n, k, m, bits))
    if m > LARGE_BATCH and DEQUANT_LARGE:
        return dequant_matmul(weight, x, bias)
    return dot_matmul(weight, x, bias, large_config(n, k, m, bits))


@torch.library.custom_op("easyquant::quant_linear", mutates_args=())
def quant_linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    outlier_indptr: torch.Tensor,
    outlier_indices: torch.Tensor,
    outlier_values: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """The fused forward as one opaque op, so torch.compile and CUDA graphs treat it as a unit."""
    weight = Weight(
        qweight,
        scales,
        outlier_indptr,
        outlier_indices,
        outlier_values,
        bits,
        kernel_group(group_size, in_features),
        in_features,
    )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    bias_x = None if bias is None else bias.to(x.dtype)
    return matmul(weight, x2, bias_x).reshape(*lead, weight.out_features)


@quant_linear_op.register_fake
def _(x, qweight, scales, outlier_indptr, outlier_indices, outlier_values, bias, bits, group_size,
      in_features):  # fmt: skip
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def kernel_group(group_size: int | None, in_features: int) -> int:
    """The kernels' GROUP: 0 for one scale per row (also a group spanning the whole row)."""
    return 0 if group_size is None or group_size == in_features else group_size


def layer_weight(layer: torch.nn.Module) -> Weight:
    return Weight(
        layer.qweight,
        layer.scales,
        layer.outlier_indptr,
        layer.outlier_indices,
        layer.outlier_values,
        layer.bits,
        kernel_group(layer.group_size, layer.in_features),
        layer.in_features,
    )


def quant_linear_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``QuantLinear.forward`` on the fused kernels."""
    if x.dtype not in ACT_CODES:
        raise ValueError(f"QuantLinear takes float16, bfloat16 or float32 input, got {x.dtype}")
    return quant_linear_op(
        x,
        layer.qweight,
        layer.scales,
        layer.outlier_indptr,
        layer.outlier_indices,
        layer.outlier_values,
        layer.bias,
        layer.bits,
        layer.group_size or 0,
        layer.in_features,
    )
