"""Fused Triton kernels for ``QuantLinear``: packed 2/3/4/8-bit codes times activations, with the
outliers added in the same kernel.

The codes and scales are read as stored by :mod:`easyquant.format.qweight`. The outliers are read
from a kernel-side copy built once per layer (:func:`build_outlier_table`, kept by ``QuantLinear``
next to the checkpoint's CSR tensors): a fixed number of slots per row (ELL: ``cols [N, S]``,
``vals [N, S]``, ``count [N]``), so a kernel loads its rows' outliers with the codes, without the
CSR's ``indptr -> indices -> x`` chain of dependent loads, plus a CSR list of the few entries of
rows holding more than ``S`` (the overflow).

- ``_gemv_kernel`` (batch 1): streams the codes as int32 words, turns each code ``u`` into the
  float ``1 + u / 2^bits`` with two integer ops (no int->float conversion instruction), and
  accumulates ``w * x`` in fp32 on the CUDA cores; ``sum((u - offset) * x)`` is recovered at the
  end from ``sum(x)``. With 4-bit codes and fp16 / bf16 activations (``GemvConfig.packed``) it
  runs the f16x2 word dot instead: pairs of codes decoded and multiplied two at a time in fp16x2
  (PTX), each word's sum accumulated in fp32. Optional split-K (fp32 atomics).
- ``_dot_kernel`` (any batch): computes ``out^T = W @ x^T`` so that the weight tile, decoded in
  registers to the activation dtype, is the left operand of ``tl.dot`` (tensor cores) and the batch
  is the narrow side (16 wide at small batch). ``_dot_planes_kernel`` is the same product over int32
  words taken one code position ("plane") at a time, so that no tile is interleaved.
- ``_dequant_kernel``: the dense weight in the activation dtype, outliers written in by the same
  program after a barrier, for ``dequantize + cuBLAS`` at large batch.
- On sm_90 a config's ``pdl`` launches its kernels with programmatic dependent launch: each
  starts before the kernel ahead of it ends and waits for it (``griddepcontrol.wait``) before
  its first load; the defaults take it for x's copy and the word-plane kernel at batches 2-16.

Codes are unsigned ``u = q - qmin`` (``qmin = -2^(bits-1)``), so ``q = u - 2^(bits-1)``. Outlier
positions hold ``q = 0``: an outlier adds exactly ``value * x[col]`` and nothing is subtracted.
Per-channel scales multiply the fp32 accumulator once; group scales multiply it per K tile (the
tile never straddles a group).
"""

from __future__ import annotations

import functools
import json
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from easyquant.kernels.launch import KernelLaunch, Slot

# Which stored bit widths each kernel decodes (the reference torch path covers everything else).
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
# Activation dtype codes passed to the kernels as constexpr.
ACT_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# Codes per int32 word group of the word-plane kernels (3 and 6 bits: 32 and 16 codes in three
# words; 5 bits have no word view).
GEMV_WORD_CODES = {2: 16, 3: 32, 4: 8, 6: 16, 8: 4}
# The fixed outlier slots per row cover this quantile of the rows' outlier counts (rounded up to
# SLOT_ALIGN); the rows above it keep their extra entries in the CSR overflow list.
SLOT_QUANTILE = 0.9
SLOT_ALIGN = 8
# The tensors each launch takes per call (``KernelLaunch`` slots): the input, the bias (or a
# stand-in pointer where there is none), the output, split K's partial sums (or a stand-in), then
# the layer's (``Weight.launch_args``): codes as stored and as int32 words, scales, the six
# tensors of the outlier table and split K's tile counters (or a stand-in).
X, BIAS, OUT, PARTIALS, CODES, WORDS, SCALES = (Slot(i) for i in range(7))
TABLE = tuple(Slot(7 + i) for i in range(6))
LOCKS = Slot(13)
# A matmul with everything but the layer's tensors, x ``[M, K]`` and the bias bound
# (``matmul_plan``): it holds no tensor, so one plan serves every layer of the same layout.
Plan = Callable[["Weight", torch.Tensor, "torch.Tensor | None"], torch.Tensor]


# ---- decoding helpers ---------------------------------------------------------------------------
@triton.jit
def _load_word24(base, row_ok, w, row_bytes):
    """The little-endian 24-bit words ``w`` (bytes 3w .. 3w + 2) of each row, as int32."""
    ok = row_ok & (3 * w < row_bytes)[None, :]
    b0 = tl.load(base + 3 * w[None, :], mask=ok, other=0).to(tl.int32)
    b1 = tl.load(base + 3 * w[None, :] + 1, mask=ok, other=0).to(tl.int32)
    b2 = tl.load(base + 3 * w[None, :] + 2, mask=ok, other=0).to(tl.int32)
    return b0 | (b1 << 8) | (b2 << 16)


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
    elif BITS == 6:  # four codes in each little-endian 24-bit word
        word = _load_word24(base, row_ok, k0 // 4 + tl.arange(0, BLOCK_K // 4), row_bytes)
        c02 = tl.interleave(word & 63, (word >> 12) & 63)
        c13 = tl.interleave((word >> 6) & 63, (word >> 18) & 63)
        return tl.interleave(c02, c13)
    elif BITS == 5:  # eight codes in each little-endian 40-bit word: bytes 0-3, then byte 4
        w = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        ok = row_ok & (5 * w < row_bytes)[None, :]
        lo = tl.load(base + 5 * w[None, :], mask=ok, other=0).to(tl.int32)
        for b in tl.static_range(1, 4):
            byte = tl.load(base + 5 * w[None, :] + b, mask=ok, other=0).to(tl.int32)
            lo = lo | (byte << (8 * b))
        hi = tl.load(base + 5 * w[None, :] + 4, mask=ok, other=0).to(tl.int32)
        c6 = ((lo >> 30) & 3) | ((hi & 7) << 2)  # code 6 straddles bytes 3 and 4
        c04 = tl.interleave(lo & 31, (lo >> 20) & 31)
        c26 = tl.interleave((lo >> 10) & 31, c6)
        c15 = tl.interleave((lo >> 5) & 31, (lo >> 25) & 31)
        c37 = tl.interleave((lo >> 15) & 31, (hi >> 3) & 31)
        return tl.interleave(tl.interleave(c04, c26), tl.interleave(c15, c37))
    else:  # 3 bits: eight codes in each little-endian 24-bit word
        word = _load_word24(base, row_ok, k0 // 8 + tl.arange(0, BLOCK_K // 8), row_bytes)
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
def _mma(a, b, acc, ACT: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation. fp32 operands are multiplied exactly (not tf32);
    under Triton 3.6's interpreter, whose dot multiplies bfloat16 bit patterns as integers,
    bfloat16 operands are widened first (same products: bf16 x bf16 is exact in fp32)."""
    if ACT == 0:
        return tl.dot(a, b, acc, input_precision="ieee")
    elif ACT == 2 and EMULATE_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _plane_code(w0, w1, w2, k: tl.constexpr, BITS: tl.constexpr):
    """Unsigned code ``k`` (int32) of each int32 word (3 and 6 bits: of each group of three
    words, 32 or 16 codes)."""
    mask: tl.constexpr = (1 << BITS) - 1
    if BITS == 3 or BITS == 6:
        bit: tl.constexpr = BITS * k
        if bit + BITS <= 32:
            u = (w0 >> bit) & mask
        elif bit < 32:  # code 10 (6 bits: 5) straddles words 0 and 1
            u = ((w0 >> bit) & ((1 << (32 - bit)) - 1)) | ((w1 << (32 - bit)) & mask)
        elif bit + BITS <= 64:
            u = (w1 >> (bit - 32)) & mask
        elif bit < 64:  # code 21 (6 bits: 10) straddles words 1 and 2
            u = ((w1 >> (bit - 32)) & ((1 << (64 - bit)) - 1)) | ((w2 << (64 - bit)) & mask)
        else:
            u = (w2 >> (bit - 64)) & mask
    else:
        u = (w0 >> (BITS * k)) & mask
    return u


# Batch 16, 4-bit codes, fp16 / bf16 activations (``DotConfig.packed``): planes j and j + 4 of a
# word (nibbles j and j + 4) decoded together, as the GEMV's word dot does: one lop3 drops both
# nibbles into the mantissas of two 1024.0s (bf16: 128.0s, 7 mantissa bits), one f16x2 (bf16x2)
# FMA subtracts the magic and the offset 8, exactly; the two halves are the two planes. fp16 reads
# odd nibbles where they are (bits 4-7 and 20-23: 1024 + 16 u, times 1/16 minus 72), so a word
# takes one shift (by 8, for planes 2 and 3) where bf16, whose 7 mantissa bits cannot hold 16 u,
# shifts by 4 j.
def plane_pair_constants(act: int, odd: bool = False) -> tuple[int, int, int, int]:
    """(lop3 mask, magic, multiplier, offset) of ``_plane_pair``'s PTX, each one half of the
    f16x2 (bf16x2) register: ``(word & mask | magic) * multiplier + offset`` is ``u - 8`` in both
    halves; ``odd``: the nibbles at bits 4-7 and 20-23 (fp16 only)."""
    if act == 2:  # bf16: 128.0, 1.0, -136.0
        assert not odd, "bf16's 7 mantissa bits cannot hold 16 u"
        return 0x000F, 0x4300, 0x3F80, 0xC308
    if odd:  # fp16: (1024 + 16 u) / 16 - 72
        return 0x00F0, 0x6400, 0x2C00, 0xD480
    return 0x000F, 0x6400, 0x3C00, 0xE408  # fp16: (1024 + u) * 1 - 1032


def _plane_pair_asm(act: int, odd: bool = False) -> str:
    mask, magic, mul, add = (f"0x{v:04X}{v:04X}" for v in plane_pair_constants(act, odd))
    fma = "fma.rn.f16x2" if act == 1 else "fma.rn.bf16x2"
    return (  # (fma takes no immediates)
        "{ .reg .b32 h, m, c; "
        f"mov.b32 m, {mul}; "
        f"mov.b32 c, {add}; "
        f"lop3.b32 h, $2, {mask}, {magic}, 0xEA; "
        f"{fma} h, h, m, c; "
        "mov.b32 {$0, $1}, h; }"
    )


_PAIR_F16 = tl.constexpr(_plane_pair_asm(1))
_PAIR_F16_ODD = tl.constexpr(_plane_pair_asm(1, odd=True))
_PAIR_BF16 = tl.constexpr(_plane_pair_asm(2))


@triton.jit
def _plane_pair(word, j: tl.constexpr, ACT: tl.constexpr, INTERPRET: tl.constexpr,
                IN_PLACE: tl.constexpr = True):
    """Planes ``j`` and ``j + 4`` (signed 4-bit codes ``u - 8``) of int32 ``word``, in the
    activation dtype (fp16: ``ACT == 1``, bf16: 2; ``IN_PLACE``: fp16's odd planes unshifted)."""
    if INTERPRET:  # the CPU interpreter cannot run PTX: the one-plane decode, same values
        lo = _codes_to_float(_plane_code(word, word, word, j, 4), 4, ACT)
        hi = _codes_to_float(_plane_code(word, word, word, j + 4, 4), 4, ACT)
        return lo, hi
    # (arithmetic shifts: the sign bits land above bit 23, which the lop3's masks drop)
    elif ACT == 1 and j % 2 == 1 and IN_PLACE:
        return _pair_asm(word >> (4 * j - 4), _PAIR_F16_ODD, tl.float16)
    elif ACT == 1:
        return _pair_asm(word >> (4 * j), _PAIR_F16, tl.float16)
    else:
        return _pair_asm(word >> (4 * j), _PAIR_BF16, tl.bfloat16)


@triton.jit
def _pair_asm(bits, ASM: tl.constexpr, DTYPE: tl.constexpr):
    """The two halves of ``_plane_pair_asm``'s PTX ``ASM`` applied to int32 ``bits``."""
    return tl.inline_asm_elementwise(
        ASM, "=h,=h,r", [bits], dtype=(DTYPE.value, DTYPE.value), is_pure=True, pack=1
    )


@triton.jit
def _gemv_plane(w0, w1, w2, k: tl.constexpr, BITS: tl.constexpr):
    """Code ``k`` as the fp32 value ``1 + u / 2^BITS`` (``u`` OR-ed into the mantissa of 1.0)."""
    u = _plane_code(w0, w1, w2, k, BITS)
    return ((u << (23 - BITS)) | 0x3F800000).to(tl.float32, bitcast=True)


# ---- batch 1, 4-bit codes with fp16 / bf16 activations: paired (f16x2) math --------------------
# One int32 word holds the 4-bit codes of columns 8w .. 8w+7 (nibble j = column 8w + j). Masking
# nibbles j and j + 4 into the mantissas of two fp16 1024.0s gives the pair (1024 + u_j,
# 1024 + u_{j+4}) in one instruction (lop3: (w & mask) | magic); one fp16x2 FMA turns it into
# ((u - 8) / 16) exactly, and four more multiply it by the matching pairs of x and sum. That is ~17
# instructions per 8 weights where the fp32 decode takes ~8 per weight (benchmarks/notes-matmul-
# kernels.md, stop 12). The codes are scaled by 1/16 so that each half's sum of four products
# stays within 2 max|x| (fp16 can overflow only where some |x| > 32752); each word's sum goes to
# fp32 before it is accumulated, and the fp32 total is multiplied by 16.
def _word_dot_asm(masks: list[tuple[int, int, int]]) -> str:
    """PTX of the f16x2 word dot: ``masks`` (lop3 mask, fp16 multiplier, fp16 offset) per code
    position group, applied to the word and to the word shifted right by 8; the pairs of x are
    operands $2.. in that order."""
    n = len(masks)
    h = [f"h{i}" for i in range(2 * n)]
    consts = [f"m{i}, c{i}" for i in range(n)]
    lines = [
        "{",
        f".reg .b32 t, {', '.join(h)}, p, {', '.join(consts)};",
        ".reg .f16 lo, hi;",
        ".reg .f32 flo, fhi, s;",
    ]
    for i, (_, mul, add) in enumerate(masks):
        lines += [f"mov.b32 m{i}, 0x{mul:04X}{mul:04X};", f"mov.b32 c{i}, 0x{add:04X}{add:04X};"]
    for i, (mask, _, _) in enumerate(masks):
        lines.append(f"lop3.b32 h{i}, $1, 0x{mask:08X}, 0x64006400, 0xEA;")
    lines.append("shr.u32 t, $1, 8;")
    for i, (mask, _, _) in enumerate(masks):
        lines.append(f"lop3.b32 h{n + i}, t, 0x{mask:08X}, 0x64006400, 0xEA;")
    for i in range(2 * n):
        lines.append(f"fma.rn.f16x2 h{i}, h{i}, m{i % n}, c{i % n};")
    lines.append("mul.rn.f16x2 p, h0, $2;")
    for i in range(1, 2 * n):
        lines.append(f"fma.rn.f16x2 p, h{i}, ${i + 2}, p;")
    lines += [
        "mov.b32 {lo, hi}, p;",
        "cvt.f32.f16 flo, lo;",
        "cvt.f32.f16 fhi, hi;",
        "add.f32 s, flo, fhi;",
        "mov.b32 $0, s;",
        "}",
    ]
    return "\n".join(lines) + "\n"


_F16X2_WORD_DOT = tl.constexpr(
    _word_dot_asm([(0x000F000F, 0x2C00, 0xD408), (0x00F000F0, 0x1C00, 0xC480)])
)
# (lop3's 0xEA is (a & b) | c; 0x2C00 = 1/16, 0xD408 = -64.5, 0x1C00 = 1/256, 0xC480 = -4.5 in
# fp16: (1024 + u) / 16 - 64.5 = (1024 + 16 u) / 256 - 4.5 = (u - 8) / 16.)


@triton.jit
def _x_pair_at(x_ptr, cols, ok, lo: tl.constexpr, hi: tl.constexpr):
    """``x[cols + lo]`` (low half) and ``x[cols + hi]`` (high half) in fp16, as one int32
    ``[1, len(cols)]``."""
    a = tl.load(x_ptr + cols + lo, mask=ok, other=0.0).to(tl.float16)
    b = tl.load(x_ptr + cols + hi, mask=ok, other=0.0).to(tl.float16)
    a_bits = a.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return (a_bits | (b.to(tl.int16, bitcast=True).to(tl.int32) << 16))[None, :]


@triton.jit
def _x_step_pairs(x_ptr, k0, K: tl.constexpr, BLOCK_W: tl.constexpr, XVEC: tl.constexpr):
    """The four x pairs ``[1, BLOCK_W]`` of the words of one GEMV step (columns ``k0 ..``)."""
    cols = k0 + 8 * tl.arange(0, BLOCK_W)
    ok = cols < K
    if XVEC:  # each word's 8 values in one 16-byte load, paired in registers
        xt = tl.load(x_ptr + cols[:, None] + tl.arange(0, 8)[None, :], mask=ok[:, None], other=0.0)
        bits = xt.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        lo, hi = tl.split(tl.permute(tl.reshape(bits, [BLOCK_W, 2, 4]), [0, 2, 1]))
        pairs = tl.reshape(lo | (hi << 16), [BLOCK_W, 2, 2])  # [w, j // 2, j % 2]
        even, odd = tl.split(pairs)  # j = 0, 2 and j = 1, 3
        p0, p2 = tl.split(even)
        p1, p3 = tl.split(odd)
        return p0[None, :], p1[None, :], p2[None, :], p3[None, :]
    else:
        p0 = _x_pair_at(x_ptr, cols, ok, 0, 4)
        p1 = _x_pair_at(x_ptr, cols, ok, 1, 5)
        p2 = _x_pair_at(x_ptr, cols, ok, 2, 6)
        p3 = _x_pair_at(x_ptr, cols, ok, 3, 7)
        return p0, p1, p2, p3


@triton.jit
def _pair_term(u_lo, u_hi, pair, OFFSET: tl.constexpr):
    """The interpreter's stand-in for one pair of the f16x2 dots, in fp32:
    ``(u_lo - OFFSET) x_lo + (u_hi - OFFSET) x_hi`` (the caller scales by 1/16)."""
    x_lo = (pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    x_hi = ((pair >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return (u_lo - OFFSET).to(tl.float32) * x_lo + (u_hi - OFFSET).to(tl.float32) * x_hi


@triton.jit
def _word_dot_f16x2(word, p0, p1, p2, p3, INTERPRET: tl.constexpr):
    """``sum_j ((u_j - 8) / 16) * x_j`` over the eight codes of each int32 word, as fp32."""
    if INTERPRET:  # the CPU interpreter cannot run PTX
        total = _pair_term(word & 15, (word >> 16) & 15, p0, 8)
        total += _pair_term((word >> 4) & 15, (word >> 20) & 15, p1, 8)
        total += _pair_term((word >> 8) & 15, (word >> 24) & 15, p2, 8)
        total += _pair_term((word >> 12) & 15, (word >> 28) & 15, p3, 8)
        return total * 0.0625
    else:
        bits = tl.inline_asm_elementwise(
            _F16X2_WORD_DOT, "=r,r,r,r,r,r", [word, p0, p1, p2, p3], dtype=tl.int32,
            is_pure=True, pack=1,
        )  # fmt: skip
        return bits.to(tl.float32, bitcast=True)


# ---- batch 1, 2-bit codes with fp16 / bf16 activations: the same paired math ------------------
# One int32 word holds the codes of columns 16w .. 16w+15 (bits 2j, 2j+1: column 16w + j). Codes j
# and j + 8 sit 16 bits apart, so one lop3 with the mask 3 << 2i (both halves) drops codes i and
# i + 8 into two fp16 mantissas as 1024 + 4^i u, and one fp16x2 FMA per mask makes ((u - 2) / 8)
# exactly; a shift by 8 does the same for codes 4..7 and 12..15. Eight pairs per word (stop 16).
# Each half's sum of eight products stays within 2 max|x|, as for 4 bits.
_F16X2_WORD2_DOT = tl.constexpr(
    _word_dot_asm([(0x00030003, 0x3000, 0xD802), (0x000C000C, 0x2800, 0xD008),
                   (0x00300030, 0x2000, 0xC820), (0x00C000C0, 0x1800, 0xC080)])
)  # fmt: skip
# (fp16: 0x3000 = 1/8, 0xD802 = -128.25; 0x2800 = 1/32, 0xD008 = -32.25; 0x2000 = 1/128, 0xC820 =
# -8.25; 0x1800 = 1/512, 0xC080 = -2.25: (1024 + 4^i u) / (8 4^i) - 128 / 4^i - 1/4 = (u - 2) / 8.)


@triton.jit
def _word2_dot_f16x2(word, pairs, INTERPRET: tl.constexpr):
    """``sum_j ((u_j - 2) / 8) * x_j`` over the sixteen 2-bit codes of each int32 word, as fp32."""
    if INTERPRET:  # the CPU interpreter cannot run PTX: the same values in fp32
        total = tl.zeros(word.shape, dtype=tl.float32)
        for j in tl.static_range(8):
            total += _pair_term((word >> (2 * j)) & 3, (word >> (16 + 2 * j)) & 3, pairs[j], 2)
        return total * 0.125
    else:
        args = [word, pairs[0], pairs[1], pairs[2], pairs[3], pairs[4], pairs[5], pairs[6],
                pairs[7]]  # fmt: skip
        bits = tl.inline_asm_elementwise(
            _F16X2_WORD2_DOT, "=r" + ",r" * 9, args, dtype=tl.int32, is_pure=True, pack=1
        )
        return bits.to(tl.float32, bitcast=True)


# ---- batch 1, 3-bit codes with fp16 / bf16 activations: the same paired math ------------------
# A triple of int32 words holds 32 codes, code k at bit 3k of the 96-bit little-endian integer
# (codes 10 and 21 straddle words). A 32-bit window of it starting at bit b (one funnel shift)
# puts code lo at bit s_lo = 3 lo - b and code hi at bit 16 + s_hi, s_hi = 3 hi - b - 16; where both
# offsets are 0..7 one lop3 drops the pair into two fp16 mantissas (1024 + u 2^s) and one fp16x2
# FMA with per-half constants makes ((u - 4) / 16) of each, exactly. Seven windows (b = 64 is word
# 2 itself) cover all 32 codes in 16 pairs (found by search: a pair needs hi - lo in 3..7):
_TRIPLE_PAIRS = (  # (window start b, lo, hi)
    (-1, 0, 5), (-1, 1, 6), (-1, 2, 7), (5, 3, 8), (5, 4, 9),
    (29, 10, 15), (29, 11, 16), (29, 12, 17), (35, 13, 18), (35, 14, 19),
    (60, 20, 26), (60, 21, 27), (64, 22, 28), (64, 23, 29), (70, 24, 30), (70, 25, 31),
)  # fmt: skip


def _half_bits(value: float) -> int:
    return int(torch.tensor(value, dtype=torch.float16).view(torch.int16)) & 0xFFFF


def triple_pair_constants() -> list[tuple[int, int, int, int, int, int]]:
    """Per pair of _TRIPLE_PAIRS: (window start b, lo, hi, lop3 mask, fp16x2 multiplier, fp16x2
    addend), the multiplier and addend turning ``1024 + u 2^s`` into ``(u - 4) / 16`` per half."""
    found = []
    for b, lo, hi in _TRIPLE_PAIRS:
        s_lo, s_hi = 3 * lo - b, 3 * hi - b - 16
        mask = (7 << s_lo) | (7 << (16 + s_hi))
        mul = (_half_bits(2.0**-s_hi / 16) << 16) | _half_bits(2.0**-s_lo / 16)
        add = (_half_bits(-(64 * 2.0**-s_hi + 0.25)) << 16) | _half_bits(-(64 * 2.0**-s_lo + 0.25))
        found.append((b, lo, hi, mask, mul, add))
    return found


def _triple_asm() -> str:
    """PTX for ``sum_k ((u_k - 4) / 16) x_k`` over one word triple: $1-$3 the words, $4-$19 the
    x pairs of _TRIPLE_PAIRS, $0 the fp32 sum (two fp16x2 chains of eight pairs each, so that a
    half's partial sum stays within 2 max|x|)."""
    words = ("$1", "$2", "$3")
    lines = [".reg .b32 r, h, m, c, pa, pb;", ".reg .f16 lo, hi;", ".reg .f32 f0, f1, f2, f3;"]
    window = None
    for i, (b, _, _, mask, mul, add) in enumerate(triple_pair_constants()):
        if b != window:
            window = b
            if b < 0:
                lines.append(f"shl.b32 r, $1, {-b};")
            elif b % 32 == 0:
                lines.append(f"mov.b32 r, {words[b // 32]};")
            elif b > 64:
                lines.append(f"shr.u32 r, $3, {b - 64};")
            else:
                low, high = words[b // 32], words[b // 32 + 1]
                lines.append(f"shf.r.clamp.b32 r, {low}, {high}, {b % 32};")
        chain = "pa" if i < 8 else "pb"
        lines += [
            f"lop3.b32 h, r, {mask:#010x}, 0x64006400, 0xEA;",
            f"mov.b32 m, {mul:#010x};",
            f"mov.b32 c, {add:#010x};",
            "fma.rn.f16x2 h, h, m, c;",
            f"mul.rn.f16x2 {chain}, h, ${4 + i};" if i in (0, 8) else
            f"fma.rn.f16x2 {chain}, h, ${4 + i}, {chain};",
        ]  # fmt: skip
    lines += [
        "mov.b32 {lo, hi}, pa;", "cvt.f32.f16 f0, lo;", "cvt.f32.f16 f1, hi;",
        "mov.b32 {lo, hi}, pb;", "cvt.f32.f16 f2, lo;", "cvt.f32.f16 f3, hi;",
        "add.f32 f0, f0, f1;", "add.f32 f2, f2, f3;", "add.f32 f0, f0, f2;", "mov.b32 $0, f0;",
    ]  # fmt: skip
    return "{\n" + "\n".join(lines) + "\n}\n"


_F16X2_TRIPLE_DOT = tl.constexpr(_triple_asm())
_TRIPLE_CONSTRAINTS = tl.constexpr("=r" + ",r" * 19)
_TRIPLE_LO = tl.constexpr(tuple(lo for _, lo, _ in _TRIPLE_PAIRS))
_TRIPLE_HI = tl.constexpr(tuple(hi for _, _, hi in _TRIPLE_PAIRS))


@triton.jit
def _x_pairs(x_ptr, k0, K: tl.constexpr, BLOCK_W: tl.constexpr, BITS: tl.constexpr):
    """The x pairs ``[1, BLOCK_W]`` of one GEMV step: 3 bits, the 16 of _TRIPLE_PAIRS per word
    triple (32 columns); 2 bits, ``(x[16w + j], x[16w + j + 8])`` for j < 8 per word."""
    PER: tl.constexpr = 32 if BITS == 3 else 16
    PAIRS: tl.constexpr = 16 if BITS == 3 else 8
    cols = k0 + PER * tl.arange(0, BLOCK_W)
    ok = cols < K
    pairs = ()
    for i in tl.static_range(PAIRS):
        # (Triton's frontend takes no starred unpacking)
        if BITS == 3:
            pairs = pairs + (_x_pair_at(x_ptr, cols, ok, _TRIPLE_LO[i], _TRIPLE_HI[i]),)  # noqa: RUF005
        else:
            pairs = pairs + (_x_pair_at(x_ptr, cols, ok, i, i + 8),)  # noqa: RUF005
    return pairs


@triton.jit
def _triple_dot_f16x2(w0, w1, w2, pairs, INTERPRET: tl.constexpr):
    """``sum_k ((u_k - 4) / 16) * x_k`` over the 32 codes of each word triple, as fp32."""
    if INTERPRET:  # the CPU interpreter cannot run PTX: the same values in fp32
        total = tl.zeros(w0.shape, dtype=tl.float32)
        for i in tl.static_range(16):
            u_lo = _plane_code(w0, w1, w2, _TRIPLE_LO[i], 3)
            u_hi = _plane_code(w0, w1, w2, _TRIPLE_HI[i], 3)
            total += _pair_term(u_lo, u_hi, pairs[i], 4)
        return total * 0.0625
    else:
        args = [w0, w1, w2, pairs[0], pairs[1], pairs[2], pairs[3], pairs[4], pairs[5],
                pairs[6], pairs[7], pairs[8], pairs[9], pairs[10], pairs[11], pairs[12],
                pairs[13], pairs[14], pairs[15]]  # fmt: skip
        bits = tl.inline_asm_elementwise(
            _F16X2_TRIPLE_DOT, _TRIPLE_CONSTRAINTS, args, dtype=tl.int32, is_pure=True, pack=1
        )
        return bits.to(tl.float32, bitcast=True)


# ---- outliers from the kernel-side table ---------------------------------------------------------
@triton.jit
def _slot_load(ecol_ptr, eval_ptr, rows, ok, SLOTS: tl.constexpr, SLOTS_P2: tl.constexpr):
    """Fixed outlier slots ``[rows, SLOTS_P2]`` (columns int32, values as stored)."""
    j = tl.arange(0, SLOTS_P2)
    p = rows[:, None].to(tl.int64) * SLOTS + j[None, :]
    col = tl.load(ecol_ptr + p, mask=ok, other=0).to(tl.int32)
    val = tl.load(eval_ptr + p, mask=ok, other=0.0)
    return col, val


@triton.jit
def _overflow_1d(x_ptr, ocol_ptr, oval_ptr, o_start, o_count, BLOCK_N: tl.constexpr,
                 OUT_CHUNK: tl.constexpr):  # fmt: skip
    """``sum v * x[col]`` over each row's overflow entries (CSR), OUT_CHUNK at a time."""
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    most = tl.max(o_count, axis=0)
    j0 = 0
    while j0 < most:
        j = j0 + tl.arange(0, OUT_CHUNK)
        ok = j[None, :] < o_count[:, None]
        p = o_start[:, None] + j[None, :]
        col = tl.load(ocol_ptr + p, mask=ok, other=0).to(tl.int32)
        v = tl.load(oval_ptr + p, mask=ok, other=0.0).to(tl.float32)
        xv = tl.load(x_ptr + col, mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(v * xv, axis=1)
        j0 += OUT_CHUNK
    return acc


@triton.jit
def _store_tile(acc, out_ptrs, out_mask, part_ptr, lock_ptr, tile, pid_k,
                SPLIT_K: tl.constexpr, REDUCE: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_M: tl.constexpr):  # fmt: skip
    """Store one program's ``[BLOCK_N, BLOCK_M]`` result. Split K (``SPLIT_K`` > 1) either adds
    it with fp32 atomics into a zeroed output (in no fixed order), or (``REDUCE``) writes it to
    its slice of the tile's partial sums and counts it in ``lock_ptr[tile]``: the tile's last
    program to arrive adds the slices in split order (the same sum on every run), stores it in
    the output's dtype and sets the counter back to zero for the next call. So no zeroed output
    and no cast: two kernels fewer per call."""
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptrs.dtype.element_ty), mask=out_mask)
    elif REDUCE:
        TILE: tl.constexpr = BLOCK_N * BLOCK_M
        offs = tl.arange(0, BLOCK_N)[:, None] * BLOCK_M + tl.arange(0, BLOCK_M)[None, :]
        first = part_ptr + tile.to(tl.int64) * (SPLIT_K * TILE)
        tl.store(first + pid_k * TILE + offs, acc)
        # every thread's stores before the count that publishes them (the atomic releases them
        # at GPU scope; the last program's atomic acquires the others')
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:
            tl.debug_barrier()
            # .cg: from L2, where the other SMs' stores are (this SM's L1 may hold old lines)
            total = tl.load(first + offs, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT_K):
                total += tl.load(first + s * TILE + offs, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptrs.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(lock_ptr + tile, 0)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


@triton.jit
def _table_2d(
    x_ptr, ecol_ptr, eval_ptr, ecnt_ptr, oind_ptr, ocol_ptr, oval_ptr,
    rows, row_ok, ms, m_ok, stride_xm, stride_xk, pid_k,
    SLOTS: tl.constexpr, HAS_OVERFLOW: tl.constexpr, SPLIT_K: tl.constexpr,
    SLOT_CHUNK: tl.constexpr, OUT_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr, PAIR_W: tl.constexpr = 0, UNMASKED: tl.constexpr = False,
    HALF: tl.constexpr = False, N=1,
):  # fmt: skip
    """``sum_j v[n, j] * x[m, col[n, j]]`` ``[BLOCK_N, BLOCK_M]`` over this K split's share of
    the slots (chunk c goes to split c % SPLIT_K) and, in split 0, the overflow entries
    (``PAIR_W``: x is the pair-ordered copy). ``UNMASKED``: the slots' loads take no masks (x is
    the padded copy and SLOTS a multiple of SLOT_CHUNK): rows past N read row N - 1, whose sums
    are not stored, and an empty slot (column 0, value 0) adds 0 * x[m, 0]. ``HALF``: each
    chunk's products and their sum in x's dtype (fp16), then added in fp32."""
    res = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    xm = x_ptr + ms[None, None, :].to(tl.int64) * stride_xm
    CHUNKS: tl.constexpr = (SLOTS + SLOT_CHUNK - 1) // SLOT_CHUNK
    if SLOTS > 0:
        if UNMASKED:
            tl.static_assert(SLOTS % SLOT_CHUNK == 0)
            p0 = tl.minimum(rows, N - 1)[:, None].to(tl.int64) * SLOTS
            p0 += tl.arange(0, SLOT_CHUNK)[None, :]
        else:
            e_cnt = tl.load(ecnt_ptr + rows, mask=row_ok, other=0)
        # a run-time loop: unrolled, the chunks' gathers would all be live at once (registers)
        for c in range(CHUNKS):
            if c % SPLIT_K == pid_k:
                if UNMASKED:
                    col = tl.load(ecol_ptr + p0 + c * SLOT_CHUNK).to(tl.int32)
                    v = tl.load(eval_ptr + p0 + c * SLOT_CHUNK)
                else:
                    j = c * SLOT_CHUNK + tl.arange(0, SLOT_CHUNK)
                    ok = row_ok[:, None] & (j < SLOTS)[None, :]
                    p = rows[:, None].to(tl.int64) * SLOTS + j[None, :]
                    col = tl.load(ecol_ptr + p, mask=ok, other=0).to(tl.int32)
                    v = tl.load(eval_ptr + p, mask=ok, other=0.0)
                    g_ok = ok & (j[None, :] < e_cnt[:, None])
                if PAIR_W > 0:
                    col = _pair_position(col, PAIR_W)
                if UNMASKED:
                    xg = tl.load(xm + col[:, :, None] * stride_xk)
                else:
                    xg = tl.load(xm + col[:, :, None] * stride_xk,
                                 mask=g_ok[:, :, None] & m_ok[None, None, :], other=0.0)
                if HALF:
                    res += tl.sum(v.to(xg.dtype)[:, :, None] * xg, axis=1).to(tl.float32)
                else:
                    res += tl.sum(v.to(tl.float32)[:, :, None] * xg.to(tl.float32), axis=1)
    if HAS_OVERFLOW:
        o_start = tl.load(oind_ptr + rows, mask=row_ok, other=0)
        o_count = tl.load(oind_ptr + rows + 1, mask=row_ok, other=0) - o_start
        o_count = tl.where(pid_k == 0, o_count, 0)
        most = tl.max(o_count, axis=0)
        j0 = 0
        while j0 < most:
            oj = j0 + tl.arange(0, OUT_CHUNK)
            o_ok = oj[None, :] < o_count[:, None]
            op = o_start[:, None] + oj[None, :]
            ocol = tl.load(ocol_ptr + op, mask=o_ok, other=0).to(tl.int32)
            if PAIR_W > 0:
                ocol = _pair_position(ocol, PAIR_W)
            ov = tl.load(oval_ptr + op, mask=o_ok, other=0.0).to(tl.float32)
            oxg = tl.load(
                xm + ocol[:, :, None] * stride_xk,
                mask=o_ok[:, :, None] & m_ok[None, None, :],
                other=0.0,
            ).to(tl.float32)
            res += tl.sum(ov[:, :, None] * oxg, axis=1)
            j0 += OUT_CHUNK
    return res


# ---- batch 1: CUDA-core GEMV ---------------------------------------------------------------------
@triton.jit
def _load_words(qrow, row_ok, step, GROUPS: tl.constexpr, WPG: tl.constexpr,
                BITS: tl.constexpr, BLOCK_W: tl.constexpr, EVICT: tl.constexpr):  # fmt: skip
    """The int32 words ``[rows, BLOCK_W]`` of one step of the word-view kernels (3 bits: the three
    words of each triple). In the GEMV Triton does not software-pipeline these loads (no dot
    consumes them); issuing the next step's before this step's math measured slower (stop 12:
    registers). ``EVICT``: "evict_first" marks the codes' L2 lines as the first to go (each code
    is read once per call), so they replace each other rather than the L2's other contents."""
    g = step * BLOCK_W + tl.arange(0, BLOCK_W)  # word group index
    ok = row_ok[:, None] & (g < GROUPS)[None, :]
    w0 = tl.load(qrow + WPG * g[None, :], mask=ok, other=0, eviction_policy=EVICT)
    if WPG == 3:
        w1 = tl.load(qrow + 3 * g[None, :] + 1, mask=ok, other=0, eviction_policy=EVICT)
        w2 = tl.load(qrow + 3 * g[None, :] + 2, mask=ok, other=0, eviction_policy=EVICT)
    else:
        w1 = w0
        w2 = w0
    return w0, w1, w2


@triton.jit
def _gemv_kernel(
    x_ptr,
    q_ptr,  # int32 view of qweight [N, row_words]
    s_ptr,
    ecol_ptr,
    eval_ptr,
    ecnt_ptr,
    oind_ptr,
    ocol_ptr,
    oval_ptr,
    bias_ptr,
    out_ptr,
    M,  # batch rows (x [M, K], out [M, N]): each program takes one row block of one batch row
    N,
    K: tl.constexpr,  # constexpr: the main loop's trip count must be static for the interpreter
    row_words,
    stride_s,
    stride_xm,
    stride_om,
    GROUP: tl.constexpr,  # 0: one scale per row; else columns per group (BLOCK_W words divide it)
    BITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SLOTS: tl.constexpr,  # fixed outlier slots per row (0: none)
    SLOTS_P2: tl.constexpr,
    HAS_OVERFLOW: tl.constexpr,
    ORDER: tl.constexpr,  # slots: 0 loaded after the codes, 1 loaded first, 2 also summed first
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,  # words (3 bits: word triples) per row per step
    SPLIT_K: tl.constexpr,
    OUT_CHUNK: tl.constexpr,
    PACKED: tl.constexpr,  # 4 / 3 / 2 bits, fp16/bf16 x: the f16x2 word (triple) dot
    XVEC: tl.constexpr,  # packed 4 bits: x read as one 16-byte vector per word
    EVICT: tl.constexpr,  # the code words' L2 eviction policy ("" or "evict_first")
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr = False,  # launched before the kernel ahead of it ends (waits first)
):
    if PDL:  # (before any load: nothing read can be stale, whatever wrote it)
        gdc_wait()
    # codes per word group and int32 words per group
    PER: tl.constexpr = 32 if BITS == 3 else 16 if BITS == 6 else 32 // BITS
    WPG: tl.constexpr = 3 if BITS == 3 or BITS == 6 else 1
    # the paired dots compute (u - offset) / 16 (4, 3 bits) or / 8 (2 bits)
    UNSCALE: tl.constexpr = 8.0 if BITS == 2 else 16.0
    BLOCK_K: tl.constexpr = BLOCK_W * PER
    GROUPS: tl.constexpr = (K + PER - 1) // PER
    STEPS: tl.constexpr = (GROUPS + BLOCK_W - 1) // BLOCK_W
    PER_SPLIT: tl.constexpr = (STEPS + SPLIT_K - 1) // SPLIT_K
    # the batch row varies fastest, so the M programs of a row block run together and its code
    # words come from DRAM once, then from L2
    pid = tl.program_id(0) // M
    pid_m = tl.program_id(0) % M
    pid_k = tl.program_id(1)
    x_ptr += pid_m.to(tl.int64) * stride_xm
    out_ptr += pid_m.to(tl.int64) * stride_om
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    qrow = q_ptr + rows[:, None].to(tl.int64) * row_words
    if SLOTS > 0:
        j_slot = tl.arange(0, SLOTS_P2)
        e_ok = row_ok[:, None] & (j_slot < SLOTS)[None, :] & (j_slot % SPLIT_K == pid_k)[None, :]
        e_cnt = tl.load(ecnt_ptr + rows, mask=row_ok, other=0)
        if ORDER >= 1:
            e_col, e_val = _slot_load(ecol_ptr, eval_ptr, rows, e_ok, SLOTS, SLOTS_P2)
            if ORDER == 2:
                g_ok = e_ok & (j_slot[None, :] < e_cnt[:, None])
                e_x = tl.load(x_ptr + e_col, mask=g_ok, other=0.0).to(tl.float32)
                slot_sum = tl.sum(e_val.to(tl.float32) * e_x, axis=1)
    if HAS_OVERFLOW:
        o_start = tl.load(oind_ptr + rows, mask=row_ok, other=0)
        o_count = tl.load(oind_ptr + rows + 1, mask=row_ok, other=0) - o_start
        o_count = tl.where(pid_k == 0, o_count, 0)
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.float32)
    xsum = tl.zeros([BLOCK_W], dtype=tl.float32)
    for i in range(PER_SPLIT):
        step = pid_k * PER_SPLIT + i
        k0 = step * BLOCK_K
        w0, w1, w2 = _load_words(qrow, row_ok, step, GROUPS, WPG, BITS, BLOCK_W, EVICT)
        if PACKED and BITS < 4:
            pairs = _x_pairs(x_ptr, k0, K, BLOCK_W, BITS)
        elif PACKED:
            p0, p1, p2, p3 = _x_step_pairs(x_ptr, k0, K, BLOCK_W, XVEC)
        if GROUP > 0:
            s = tl.load(s_ptr + rows * stride_s + k0 // GROUP, mask=row_ok & (k0 < K), other=0.0)
            s = s.to(tl.float32)
        if PACKED:
            if BITS == 3:
                part = _triple_dot_f16x2(w0, w1, w2, pairs, INTERPRET)
            elif BITS == 2:
                part = _word2_dot_f16x2(w0, pairs, INTERPRET)
            else:
                part = _word_dot_f16x2(w0, p0, p1, p2, p3, INTERPRET)
            if GROUP > 0:
                part = part * (UNSCALE * s)[:, None]
            acc += part
        else:
            if GROUP > 0:
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
    if GROUP == 0 and PACKED:
        total *= UNSCALE * tl.load(s_ptr + rows * stride_s, mask=row_ok, other=0.0).to(tl.float32)
    elif GROUP == 0:
        # sum((1 + u/2^B) x) = sum(x) + sum(u x)/2^B and q = u - 2^(B-1)
        x_total = tl.sum(xsum, axis=0)
        s_row = tl.load(s_ptr + rows * stride_s, mask=row_ok, other=0.0).to(tl.float32)
        total = s_row * ((1 << BITS) * total - ((1 << BITS) + (1 << (BITS - 1))) * x_total)
    if SLOTS > 0:
        if ORDER == 0:
            e_col, e_val = _slot_load(ecol_ptr, eval_ptr, rows, e_ok, SLOTS, SLOTS_P2)
        if ORDER < 2:
            g_ok = e_ok & (j_slot[None, :] < e_cnt[:, None])
            e_x = tl.load(x_ptr + e_col, mask=g_ok, other=0.0).to(tl.float32)
            slot_sum = tl.sum(e_val.to(tl.float32) * e_x, axis=1)
        total += slot_sum
    if HAS_OVERFLOW:
        total += _overflow_1d(x_ptr, ocol_ptr, oval_ptr, o_start, o_count, BLOCK_N, OUT_CHUNK)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        total += tl.where(pid_k == 0, bias, 0.0)
    if SPLIT_K > 1:
        tl.atomic_add(out_ptr + rows, total, mask=row_ok)
    else:
        tl.store(out_ptr + rows, total.to(out_ptr.dtype.element_ty), mask=row_ok)


# ---- any batch: tensor-core kernels, out^T = W @ x^T --------------------------------------------
@triton.jit
def _dot_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    ecol_ptr,
    eval_ptr,
    ecnt_ptr,
    oind_ptr,
    ocol_ptr,
    oval_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,  # REDUCE: fp32 partial sums [tiles, SPLIT_K, BLOCK_N * BLOCK_M]
    lock_ptr,  # REDUCE: int32 counters per tile, zero between calls
    M,
    N,
    K: tl.constexpr,  # constexpr: the main loop's trip count must be static for the interpreter
    row_bytes,
    stride_xm,
    stride_xk,
    stride_q,
    stride_s,
    stride_om,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SLOTS: tl.constexpr,
    HAS_OVERFLOW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    SLOT_CHUNK: tl.constexpr,
    OUT_CHUNK: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    REDUCE: tl.constexpr = False,  # split K summed by the tile's last program (_store_tile)
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
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    K_TILES: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    PER_SPLIT: tl.constexpr = (K_TILES + SPLIT_K - 1) // SPLIT_K
    for i in range(PER_SPLIT):
        k0 = (pid_k * PER_SPLIT + i) * BLOCK_K  # past K in the last split: all loads masked
        u = _load_codes(q_ptr, rows, k0, N, row_bytes, stride_q, BITS, BLOCK_K)
        w = _codes_to_float(u, BITS, ACT)
        kk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(
            x_ptr + ms[None, :].to(tl.int64) * stride_xm + kk[:, None] * stride_xk,
            mask=m_ok[None, :] & (kk < K)[:, None],
            other=0.0,
        )
        if GROUP > 0:
            part = _mma(w, xt, tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), ACT, EMULATE_BF16)
            s = tl.load(s_ptr + rows * stride_s + k0 // GROUP, mask=row_ok & (k0 < K), other=0.0)
            acc += part * s.to(tl.float32)[:, None]
        else:
            acc = _mma(w, xt, acc, ACT, EMULATE_BF16)
    if GROUP == 0:
        s_row = tl.load(s_ptr + rows * stride_s, mask=row_ok, other=0.0)
        acc = acc * s_row.to(tl.float32)[:, None]
    if SLOTS > 0 or HAS_OVERFLOW:
        acc += _table_2d(
            x_ptr, ecol_ptr, eval_ptr, ecnt_ptr, oind_ptr, ocol_ptr, oval_ptr,
            rows, row_ok, ms, m_ok, stride_xm, stride_xk, pid_k,
            SLOTS, HAS_OVERFLOW, SPLIT_K, SLOT_CHUNK, OUT_CHUNK, BLOCK_N, BLOCK_M,
        )  # fmt: skip
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[:, None]
    out_ptrs = out_ptr + ms[None, :].to(tl.int64) * stride_om + rows[:, None]
    out_mask = row_ok[:, None] & m_ok[None, :]
    _store_tile(acc, out_ptrs, out_mask, part_ptr, lock_ptr, pid, pid_k, SPLIT_K, REDUCE,
                BLOCK_N, BLOCK_M)  # fmt: skip


@triton.jit
def _x_plane(xrow, first, m_ok, K: tl.constexpr, stride_xk, BLOCK_W: tl.constexpr,
             PER: tl.constexpr):  # fmt: skip
    """Rows ``first + PER * w`` (w < BLOCK_W) of ``x^T``: the activations of one code plane."""
    col = first + PER * tl.arange(0, BLOCK_W)
    return tl.load(
        xrow + col[:, None] * stride_xk, mask=m_ok[None, :] & (col < K)[:, None], other=0.0
    )


@triton.jit
def _pair_position(col, PAIR_W: tl.constexpr):
    """Where column ``col`` of x sits in the pair-ordered copy (``transpose_plan(pair_w=...)``):
    step s (8 PAIR_W columns) holds planes j and j + 4 of its PAIR_W words at rows
    ``8 PAIR_W s + 2 PAIR_W j + 2 w + h`` for column ``8 PAIR_W s + 8 w + j + 4 h``: the order in
    which ``tl.join`` puts the two planes' codes."""
    # bit operations on int32 (columns are >= 0, PAIR_W a power of two): signed int64 % and //
    # cost the outlier gather 716 instructions per chunk of 8 slots, these 322 (sm_90, 64 rows,
    # block_k 512: compile_gemv.py --planes --packed --joined --config 64,512,4,3)
    tl.static_assert(PAIR_W & (PAIR_W - 1) == 0)
    r = col & (8 * PAIR_W - 1)
    t = r & 7
    return col - r + (t & 3) * (2 * PAIR_W) + ((r >> 3) << 1) + (t >> 2)


@triton.jit
def _dot_planes_kernel(
    x_ptr,
    q_ptr,  # int32 view of qweight [N, row_words]
    s_ptr,
    ecol_ptr,
    eval_ptr,
    ecnt_ptr,
    oind_ptr,
    ocol_ptr,
    oval_ptr,
    bias_ptr,
    out_ptr,
    part_ptr,  # REDUCE: fp32 partial sums [tiles, SPLIT_K, BLOCK_N * BLOCK_M]
    lock_ptr,  # REDUCE: int32 counters per tile, zero between calls
    M,
    N,
    K: tl.constexpr,
    row_words,
    stride_xm,
    stride_xk,
    stride_s,
    stride_om,
    GROUP: tl.constexpr,  # 0, or a multiple of the codes of BLOCK_W word groups
    BITS: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SLOTS: tl.constexpr,
    HAS_OVERFLOW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_W: tl.constexpr,  # word groups per step (>= 16: the K side of each dot)
    SPLIT_K: tl.constexpr,
    SLOT_CHUNK: tl.constexpr,
    OUT_CHUNK: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
    EVICT: tl.constexpr,  # the code words' L2 eviction policy ("" or "evict_first")
    PACKED: tl.constexpr,  # 4 bits, fp16 / bf16 x: two planes per lop3 + FMA (PTX)
    JOINED: tl.constexpr = False,  # PACKED: x is the pair-ordered copy, planes j, j + 4 one dot
    PDL: tl.constexpr = False,  # launched while x's copy runs (waits for it before any load)
    REDUCE: tl.constexpr = False,  # split K summed by the tile's last program (_store_tile)
    SLOT_UNMASKED: tl.constexpr = False,  # _table_2d: slot loads unmasked (x: the padded copy)
    SLOT_HALF: tl.constexpr = False,  # _table_2d: each slot chunk summed in fp16
    PAIR_IN_PLACE: tl.constexpr = True,  # PACKED, fp16: odd planes decoded unshifted (_plane_pair)
    ACC_IN_PLACE: tl.constexpr = True,  # GROUP == 0: the products accumulate straight into acc
    PAIR_ORDER: tl.constexpr = True,  # JOINED: x's copy in pair order (else columns in order)
):
    """The tensor-core product one code position at a time: plane ``k`` of a step is the tile of
    columns ``k0 + PER * w + k``, multiplied with the matching (strided) rows of ``x^T``."""
    PER: tl.constexpr = 32 if BITS == 3 else 16 if BITS == 6 else 32 // BITS
    WPG: tl.constexpr = 3 if BITS == 3 or BITS == 6 else 1
    BLOCK_K: tl.constexpr = BLOCK_W * PER
    GROUPS: tl.constexpr = (K + PER - 1) // PER
    STEPS: tl.constexpr = (GROUPS + BLOCK_W - 1) // BLOCK_W
    PER_SPLIT: tl.constexpr = (STEPS + SPLIT_K - 1) // SPLIT_K
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    pid_m = pid % grid_m
    pid_n = pid // grid_m
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    m_ok = ms < M
    qrow = q_ptr + rows[:, None].to(tl.int64) * row_words
    xrow = x_ptr + ms[None, :].to(tl.int64) * stride_xm
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    if PDL:  # (before any load)
        gdc_wait()
    for i in range(PER_SPLIT):
        step = pid_k * PER_SPLIT + i
        k0 = step * BLOCK_K
        w0, w1, w2 = _load_words(qrow, row_ok, step, GROUPS, WPG, BITS, BLOCK_W, EVICT)
        if GROUP == 0 and ACC_IN_PLACE:  # one scale per row, applied at the end
            part = acc
        else:
            part = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        if PACKED and JOINED:  # planes j and j + 4 as one product of 2 BLOCK_W columns
            for j in tl.static_range(4):
                w_lo, w_hi = _plane_pair(w0, j, ACT, EMULATE_BF16, PAIR_IN_PLACE)
                w_pair = tl.reshape(tl.join(w_lo, w_hi), [BLOCK_N, 2 * BLOCK_W])
                if PAIR_ORDER:  # one run of the copy's rows
                    q = k0 + 2 * BLOCK_W * j + tl.arange(0, 2 * BLOCK_W)
                else:  # column 2 w + h of the pair is x's column k0 + 8 w + j + 4 h
                    q = k0 + j + 4 * tl.arange(0, 2 * BLOCK_W)
                x_pair = tl.load(xrow + q[:, None] * stride_xk)  # (the copy is padded)
                part = _mma(w_pair, x_pair, part, ACT, EMULATE_BF16)
        elif PACKED:  # 4 bits, fp16 / bf16: planes j and j + 4 from one lop3 + one FMA
            for j in tl.static_range(4):
                # (EMULATE_BF16: interpreting)
                w_lo, w_hi = _plane_pair(w0, j, ACT, EMULATE_BF16, PAIR_IN_PLACE)
                x_lo = _x_plane(xrow, k0 + j, m_ok, K, stride_xk, BLOCK_W, PER)
                part = _mma(w_lo, x_lo, part, ACT, EMULATE_BF16)
                x_hi = _x_plane(xrow, k0 + j + 4, m_ok, K, stride_xk, BLOCK_W, PER)
                part = _mma(w_hi, x_hi, part, ACT, EMULATE_BF16)
        else:
            for k in tl.static_range(PER):
                xk = _x_plane(xrow, k0 + k, m_ok, K, stride_xk, BLOCK_W, PER)
                wk = _codes_to_float(_plane_code(w0, w1, w2, k, BITS), BITS, ACT)
                part = _mma(wk, xk, part, ACT, EMULATE_BF16)
        if GROUP > 0:
            s = tl.load(s_ptr + rows * stride_s + k0 // GROUP, mask=row_ok & (k0 < K), other=0.0)
            acc += part * s.to(tl.float32)[:, None]
        elif ACC_IN_PLACE:
            acc = part
        else:
            acc += part
    if GROUP == 0:
        s_row = tl.load(s_ptr + rows * stride_s, mask=row_ok, other=0.0)
        acc = acc * s_row.to(tl.float32)[:, None]
    if SLOTS > 0 or HAS_OVERFLOW:
        acc += _table_2d(
            x_ptr, ecol_ptr, eval_ptr, ecnt_ptr, oind_ptr, ocol_ptr, oval_ptr,
            rows, row_ok, ms, m_ok, stride_xm, stride_xk, pid_k,
            SLOTS, HAS_OVERFLOW, SPLIT_K, SLOT_CHUNK, OUT_CHUNK, BLOCK_N, BLOCK_M,
            BLOCK_W if JOINED and PAIR_ORDER else 0, SLOT_UNMASKED, SLOT_HALF, N,
        )  # fmt: skip
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, bias, 0.0)[:, None]
    out_ptrs = out_ptr + ms[None, :].to(tl.int64) * stride_om + rows[:, None]
    out_mask = row_ok[:, None] & m_ok[None, :]
    _store_tile(acc, out_ptrs, out_mask, part_ptr, lock_ptr, pid, pid_k, SPLIT_K, REDUCE,
                BLOCK_N, BLOCK_M)  # fmt: skip


# ---- the tensor-core kernels' x: transposed and zero-padded in one pass ------------------------
@triton.jit
def _transpose_pad_kernel(x_ptr, out_ptr, rows, K, stride_xm, m_pad, out_rows,
                          M_P2: tl.constexpr, BLOCK_K: tl.constexpr,
                          PAIR_W: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
    """``out [out_rows, m_pad]`` (row-major) = x^T with the batch zero-padded from ``rows`` to
    m_pad (M_P2: m_pad's next power of two) and rows past K zero; ``PAIR_W`` > 0: rows in the
    pair order of ``_pair_position``. ``PDL``: launched before the kernel ahead of it ends (waits
    first), and the matmul after it may start at once."""
    if PDL:  # wait for the kernel ahead, then let the matmul start while x is copied
        gdc_wait()
        gdc_launch_dependents()
    ps = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    if PAIR_W > 0:  # the inverse of _pair_position
        r = ps % (8 * PAIR_W)
        q = r % (2 * PAIR_W)
        ks = ps - r + 8 * (q // 2) + r // (2 * PAIR_W) + 4 * (q % 2)
    else:
        ks = ps
    ms = tl.arange(0, M_P2)
    v = tl.load(x_ptr + ms[None, :] * stride_xm + ks[:, None],
                mask=(ks < K)[:, None] & (ms < rows)[None, :], other=0.0)  # fmt: skip
    tl.store(out_ptr + ps[:, None] * m_pad + ms[None, :], v,
             mask=(ps < out_rows)[:, None] & (ms < m_pad)[None, :])  # fmt: skip


def transposed_x(x: torch.Tensor, m: int) -> torch.Tensor:
    """x ``[rows, K]`` (unit stride along K) as the column-major ``[m, K]`` view of one new
    ``[K, m]`` buffer, rows past ``rows`` zero: one kernel where a transpose then a pad took two
    (2-4 us more per call on the H100)."""
    return transpose_plan(x.shape[0], x.shape[1], m, x.stride(0), x.stride(1), x.dtype)(x)


def transpose_plan(
    rows: int,
    k: int,
    m: int,
    stride_xm: int,
    stride_xk: int,
    dtype: torch.dtype,
    kernel: bool | None = None,
    pair_w: int = 0,
    out_rows: int | None = None,
    pdl: bool = False,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``transposed_x`` for every x of this shape, strides and dtype (``kernel``: force the
    Triton kernel or torch's copy; None: the kernel up to 256 batch rows, padded or not: on the
    H100 4.8 against torch's 5.4 us at 16 rows of 4096, 5.7 against 7.6 at 128, stop 16,
    results/…-2026-11-23-explore-transpose-f1056f2.json). ``pair_w`` > 0: the copy's rows in
    the joined word-plane kernel's pair order, ``out_rows`` of them (rows past K zero).
    ``pdl``: launched with programmatic dependent launch, and the next launch (the matmul) may
    start while it runs."""
    out_rows = k if out_rows is None else out_rows
    if kernel is None:
        kernel = (m <= 256 or pair_w > 0) and stride_xk == 1
    if pair_w > 0 and not kernel:
        raise ValueError("the pair-ordered copy of x needs the kernel and x unit-stride along K")
    if not kernel:  # (wide batches, or x strided along K: torch's copies)

        def torch_copy(x: torch.Tensor) -> torch.Tensor:
            xt = x.t()
            if m != rows or out_rows != k:  # (zero batch columns, and rows past K)
                xt = torch.nn.functional.pad(xt, (0, m - rows, 0, out_rows - k))
            return xt.contiguous().t()

        return torch_copy
    m_p2 = triton.next_power_of_2(m)
    block_k = max(16, 4096 // m_p2)
    launch = KernelLaunch(
        _transpose_pad_kernel, (triton.cdiv(out_rows, block_k),),
        (X, OUT, rows, k, stride_xm, m, out_rows),
        dict(M_P2=m_p2, BLOCK_K=block_k, PAIR_W=pair_w, PDL=pdl, **_pdl_launch(pdl)),
    )  # fmt: skip

    def kernel_copy(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(out_rows, m, device=x.device, dtype=dtype)
        launch(x, None, out)
        return out.t()

    return kernel_copy


# ---- large batch: dense weight for cuBLAS --------------------------------------------------------
@triton.jit
def _dequant_kernel(
    q_ptr,
    s_ptr,
    ecol_ptr,
    eval_ptr,
    ecnt_ptr,
    oind_ptr,
    ocol_ptr,
    oval_ptr,
    w_ptr,
    N,
    K: tl.constexpr,
    row_bytes,
    stride_q,
    stride_s,
    stride_w,
    GROUP: tl.constexpr,
    BITS: tl.constexpr,
    SLOTS: tl.constexpr,
    SLOTS_P2: tl.constexpr,
    HAS_OVERFLOW: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    OUT_CHUNK: tl.constexpr,
):
    """One pass: rows ``BLOCK_N`` of the dense weight, K tile by K tile, then (after a barrier,
    so that they land last) the rows' outliers written over the zero codes."""
    offset: tl.constexpr = 1 << (BITS - 1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    w_row = w_ptr + rows[:, None].to(tl.int64) * stride_w
    if GROUP == 0:
        s_row = tl.load(s_ptr + rows * stride_s, mask=row_ok, other=0.0).to(tl.float32)[:, None]
    for k0 in range(0, K, BLOCK_K):
        u = _load_codes(q_ptr, rows, k0, N, row_bytes, stride_q, BITS, BLOCK_K)
        cols = k0 + tl.arange(0, BLOCK_K)
        # as the reference: (u - offset) * scale in fp32, rounded once to the output dtype
        value = (u | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + offset)
        if GROUP > 0:
            s_grp = tl.load(
                s_ptr + rows[:, None] * stride_s + (cols // GROUP)[None, :],
                mask=row_ok[:, None] & (cols < K)[None, :],
                other=0.0,
            ).to(tl.float32)
            value = value * s_grp
        else:
            value = value * s_row
        tl.store(
            w_row + cols[None, :],
            value.to(w_ptr.dtype.element_ty),
            mask=row_ok[:, None] & (cols < K)[None, :],
        )
    if SLOTS > 0 or HAS_OVERFLOW:
        tl.debug_barrier()  # the codes' stores of this program land before the outliers'
    if SLOTS > 0:
        j = tl.arange(0, SLOTS_P2)
        e_cnt = tl.load(ecnt_ptr + rows, mask=row_ok, other=0)
        e_ok = row_ok[:, None] & (j[None, :] < e_cnt[:, None])
        e_col, e_val = _slot_load(ecol_ptr, eval_ptr, rows, e_ok, SLOTS, SLOTS_P2)
        tl.store(w_row + e_col, e_val.to(w_ptr.dtype.element_ty), mask=e_ok)
    if HAS_OVERFLOW:
        o_start = tl.load(oind_ptr + rows, mask=row_ok, other=0)
        o_count = tl.load(oind_ptr + rows + 1, mask=row_ok, other=0) - o_start
        most = tl.max(o_count, axis=0)
        j0 = 0
        while j0 < most:
            oj = j0 + tl.arange(0, OUT_CHUNK)
            o_ok = oj[None, :] < o_count[:, None]
            op = o_start[:, None] + oj[None, :]
            ocol = tl.load(ocol_ptr + op, mask=o_ok, other=0).to(tl.int32)
            ov = tl.load(oval_ptr + op, mask=o_ok, other=0.0)
            tl.store(w_row + ocol, ov.to(w_ptr.dtype.element_ty), mask=o_ok)
            j0 += OUT_CHUNK


# ---- host side: the kernel-side outlier table ----------------------------------------------------
def interpreting() -> bool:
    """Are kernels run by Triton's CPU interpreter (TRITON_INTERPRET=1)?"""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Programmatic dependent launch where a config asks for it (EASYQUANT_PDL=0: never)
DEPENDENT_LAUNCH = os.environ.get("EASYQUANT_PDL", "1") not in ("", "0")


def dependent_launch(weight: Weight) -> bool:
    """Can kernels on this weight's device use programmatic dependent launch (``griddepcontrol``:
    sm_90 and later; not under the interpreter, which runs no PTX)?"""
    device = weight.words.device
    return (
        DEPENDENT_LAUNCH and device.type == "cuda" and not interpreting()
        and torch.cuda.get_device_capability(device) >= (9, 0)
    )  # fmt: skip


def _pdl_launch(pdl: bool) -> dict:
    """The launch option of a kernel launched with programmatic dependent launch."""
    return {"launch_pdl": True} if pdl else {}


@dataclass(frozen=True)
class OutlierTable:
    """The outliers as the kernels read them: ``S`` fixed slots per row, then a CSR overflow.

    ``cols [N, S]`` / ``vals [N, S]`` hold the first ``count[n] <= S`` outliers of row ``n`` (the
    rest of the row's slots are column 0, value 0); ``ov_indptr [N + 1]`` / ``ov_cols`` /
    ``ov_vals`` the entries past the first ``S`` of each row, in CSR form."""

    cols: torch.Tensor
    vals: torch.Tensor
    count: torch.Tensor
    ov_indptr: torch.Tensor
    ov_cols: torch.Tensor
    ov_vals: torch.Tensor

    @property
    def slots(self) -> int:
        return int(self.cols.shape[1])

    @property
    def overflow(self) -> int:
        return int(self.ov_vals.numel())

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.cols, self.vals, self.count, self.ov_indptr, self.ov_cols, self.ov_vals)


def choose_slots(counts: torch.Tensor, quantile: float = SLOT_QUANTILE) -> int:
    """Slots per row: the ``quantile`` of the rows' outlier counts, rounded up to SLOT_ALIGN."""
    if counts.numel() == 0:
        return 0
    most = int(counts.max())
    if most == 0:
        return 0
    wanted = most if quantile >= 1.0 else float(torch.quantile(counts.double(), quantile))
    align = SLOT_ALIGN
    return max(align, -(-int(wanted + 0.999999) // align) * align)


def build_outlier_table(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    slots: int | None = None,
    quantile: float = SLOT_QUANTILE,
) -> OutlierTable:
    """The kernel-side copy of CSR outliers (same device and dtypes), built once per layer."""
    device = indptr.device
    rows = indptr.numel() - 1
    counts = (indptr[1:] - indptr[:-1]).long()
    if slots is None:
        slots = choose_slots(counts, quantile) if values.numel() else 0
    cols = torch.zeros(rows, slots, dtype=indices.dtype, device=device)
    vals = torch.zeros(rows, slots, dtype=values.dtype, device=device)
    nnz = values.numel()
    if nnz:
        row_of = torch.repeat_interleave(torch.arange(rows, device=device), counts)
        pos = torch.arange(nnz, device=device) - indptr[:-1].long()[row_of]
        slot = pos < slots
        cols[row_of[slot], pos[slot]] = indices[slot]
        vals[row_of[slot], pos[slot]] = values[slot]
        extra = ~slot
        ov_cols, ov_vals = indices[extra].contiguous(), values[extra].contiguous()
    else:
        ov_cols, ov_vals = indices[:0].clone(), values[:0].clone()
    ov_indptr = torch.zeros(rows + 1, dtype=torch.int32, device=device)
    ov_indptr[1:] = torch.cumsum((counts - slots).clamp(min=0), dim=0).to(torch.int32)
    count = counts.clamp(max=slots).to(torch.int32)
    return OutlierTable(cols, vals, count, ov_indptr, ov_cols, ov_vals)


def split_locks(n: int, device: torch.device | str) -> torch.Tensor:
    """Zeroed tile counters for split K on a layer of ``n`` rows, one per tile of 16 rows by 16
    batch rows up to MID_BATCH (the split configs' smallest tiles and largest batch). Each layer
    keeps its own, as Marlin's users keep a workspace per layer. The kernels leave them at zero,
    but a layer run on two CUDA streams at the same time would count both calls' programs in
    them and give wrong sums: run one layer on one stream at a time."""
    return torch.zeros(triton.cdiv(n, 16) * triton.cdiv(MID_BATCH, 16), dtype=torch.int32,
                       device=device)  # fmt: skip


@dataclass(frozen=True)
class Weight:
    """The tensors of one quantized linear layer, as the kernels take them."""

    qweight: torch.Tensor
    scales: torch.Tensor
    outliers: OutlierTable
    bits: int
    group_size: int  # 0: one scale per output row
    in_features: int
    # split K's tile counters (int32 zeros, ``split_locks``; None: split K by atomics into a
    # zeroed output, then a cast)
    locks: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # the codes as int32 words (the codes themselves where the word view does not apply: see
    # gemv_block_w), and the tensors every launch takes (``KernelLaunch`` slots CODES to LOCKS),
    # made once
    words: torch.Tensor = field(init=False, repr=False, compare=False)
    launch_args: tuple[torch.Tensor, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            words = self.qweight.view(torch.int32)
        except RuntimeError:
            words = self.qweight
        object.__setattr__(self, "words", words)
        locks = self.scales if self.locks is None else self.locks  # (a stand-in pointer)
        args = (self.qweight, words, self.scales, *self.outliers.tensors(), locks)
        object.__setattr__(self, "launch_args", args)

    @classmethod
    def from_csr(
        cls,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        indptr: torch.Tensor,
        indices: torch.Tensor,
        values: torch.Tensor,
        bits: int,
        group_size: int,
        in_features: int,
        slots: int | None = None,
        quantile: float = SLOT_QUANTILE,
    ) -> Weight:
        table = build_outlier_table(indptr, indices, values, slots, quantile)
        locks = split_locks(qweight.shape[0], qweight.device)
        return cls(qweight, scales, table, bits, group_size, in_features, locks)

    @property
    def out_features(self) -> int:
        return int(self.qweight.shape[0])

    @property
    def has_outliers(self) -> bool:
        return self.outliers.slots > 0 or self.outliers.overflow > 0


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
    """Words (3 bits: word triples) per step of the word-plane kernels, or None where the int32
    word view does not apply."""
    per = GEMV_WORD_CODES.get(weight.bits)  # (5 bits: no word view; other kernels)
    if per is None or weight.in_features % per:
        return None
    if weight.qweight.data_ptr() % 4 or weight.qweight.stride(0) % 4:
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


# ---- host side: launches ------------------------------------------------------------------------
@dataclass(frozen=True)
class GemvConfig:
    block_n: int = 16
    block_w: int = 128  # int32 words (3 bits: word triples) per row per step
    num_warps: int = 4
    num_stages: int = 2
    split_k: int = 1  # > 1: K split over programs, fp32 atomics into a zeroed output
    order: int = 1  # outlier slots: 0 loaded after the codes, 1 loaded first, 2 summed first
    packed: bool = False  # 4 bits with fp16/bf16 x: f16x2 math (else, and always: fp32 decode)
    xvec: bool = False  # packed: x as one 16-byte load per word, paired in registers
    evict_first: bool = False  # the codes' L2 lines first to go (read once per call)
    pdl: bool = False  # sm_90: launched before the kernel ahead of it ends (waits in-kernel)


@dataclass(frozen=True)
class DotConfig:
    block_n: int = 64
    block_m: int = 16
    block_k: int = 128  # planes: word groups per step (block_w) = block_k // codes per word
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    reduce: bool = True  # split K summed in the kernel (needs Weight.locks; else fp32 atomics)
    xt: bool = False  # run on a transposed copy of x ([K, M]: one batch column per 32 bytes)
    planes: bool = False  # the word-plane kernel (int32 words, no interleave)
    slot_chunk: int = 8  # outlier slots per gather step (the gather is [n, chunk, m])
    out_chunk: int = 8  # overflow entries per step
    evict_first: bool = False  # word-plane kernel: the codes' L2 lines first to go
    packed: bool = False  # word-plane kernel, 4 bits, fp16 / bf16 x: planes decoded in pairs
    joined: bool = False  # packed, xt: each pair of planes one product, x copied in pair order
    pdl: bool = False  # planes, xt, sm_90: launched while x is copied (waits for it in-kernel)
    slot_unmasked: bool = False  # planes, xt: the outlier slots' loads without masks
    slot_half: bool = False  # planes, fp16 x: each chunk of slot products summed in fp16
    pair_in_place: bool = True  # packed, fp16 x: planes 1-3 and 5-7 from one shift per word
    acc_in_place: bool = True  # planes, per-channel scales: no per-step partial sum
    pair_order: bool = True  # joined: x copied in pair order (False: in column order, strided)


def _slots_p2(table: OutlierTable) -> int:
    return triton.next_power_of_2(table.slots) if table.slots else 1


def gemv(
    weight: Weight,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    config: GemvConfig = GemvConfig(),
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` on the CUDA cores; x one row ``[K]`` (out ``[N]``) or a few
    ``[M, K]`` (out ``[M, N]``: each batch row streams the codes again, through L2)."""
    rows = x if x.dim() == 2 else x[None]
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    plan = gemv_plan(weight, rows.shape[0], rows.stride(0), x.dtype, bias is not None, config)
    out = plan(weight, rows, bias)
    return out if x.dim() == 2 else out[0]


def gemv_plan(
    weight: Weight,
    m: int,
    stride_xm: int,
    dtype: torch.dtype,
    has_bias: bool,
    config: GemvConfig = GemvConfig(),
) -> Plan:
    """``gemv`` for every x ``[m, K]`` of this row stride and dtype, and every weight of this
    one's layout."""
    block_w = gemv_block_w(weight, config.block_w)
    if block_w is None:
        raise ValueError("this weight does not fit the GEMV's int32 word view")
    n, k = weight.out_features, weight.in_features
    table = weight.outliers
    pdl = config.pdl and dependent_launch(weight)
    launch = KernelLaunch(
        _gemv_kernel,
        (triton.cdiv(n, config.block_n) * m, config.split_k),
        (
            X,
            WORDS,
            SCALES,
            *TABLE,
            BIAS,
            OUT,
            m,
            n,
            k,
            weight.words.stride(0),
            weight.scales.stride(0),
            stride_xm,
            n,
        ),
        dict(
            GROUP=weight.group_size,
            BITS=weight.bits,
            HAS_BIAS=has_bias,
            SLOTS=table.slots,
            SLOTS_P2=_slots_p2(table),
            HAS_OVERFLOW=table.overflow > 0,
            ORDER=config.order,
            BLOCK_N=config.block_n,
            BLOCK_W=block_w,
            SPLIT_K=config.split_k,
            OUT_CHUNK=8,
            PACKED=packed_gemv(weight, dtype, config),
            XVEC=config.xvec,
            EVICT=eviction(config.evict_first),
            INTERPRET=interpreting(),
            PDL=pdl,
            **_pdl_launch(pdl),
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        ),
    )
    return _launch_plan(launch, n, m, m, dtype, config.split_k, _as_is)


def _as_is(x: torch.Tensor) -> torch.Tensor:
    return x


def _launch_plan(
    launch: KernelLaunch,
    n: int,
    rows: int,
    m: int,
    dtype: torch.dtype,
    split_k: int,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    partials: int = 0,
) -> Plan:
    """The plan around one matmul launch: x prepared (copied, padded), a new ``[m, N]`` output
    (for split K's atomics zeroed fp32, then cast; with ``partials`` > 0, split K summed in the
    kernel: a buffer of that many fp32 partial sums), the first ``rows`` rows returned."""
    atomics = split_k > 1 and partials == 0
    accumulate = torch.float32 if atomics else dtype
    new_out = torch.zeros if atomics else torch.empty

    def run(weight: Weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = new_out(m, n, device=x.device, dtype=accumulate)
        bias = weight.scales if bias is None else bias
        sums = torch.empty(partials, device=x.device, dtype=torch.float32) if partials else out
        launch(prepare(x), bias, out, sums, *weight.launch_args)
        if atomics:
            out = out.to(dtype)
        return out if m == rows else out[:rows]

    run.split_sum = "atomics" if atomics else "kernel" if partials else None  # type: ignore[attr-defined]
    return run


def eviction(evict_first: bool) -> str:
    """The word loads' ``eviction_policy``."""
    return "evict_first" if evict_first else ""


def packed_gemv(weight: Weight, dtype: torch.dtype, config: GemvConfig) -> bool:
    """Does ``config`` run the f16x2 word (triple) dot here? (4-, 3- and 2-bit codes and fp16 /
    bf16 x only; bf16 x is rounded to fp16 for it, which keeps more mantissa bits than bf16 has.)"""
    return config.packed and weight.bits in (2, 3, 4) and dtype in (torch.float16, torch.bfloat16)


def dot_matmul(
    weight: Weight,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    config: DotConfig = DotConfig(),
) -> torch.Tensor:
    """``x [M, K] @ W.T (+ bias)`` on the tensor cores (any M). A batch that is not a multiple
    of ``block_m`` is zero-padded to one: with M a multiple of 16 (which Triton specialises) the
    batch masks are uniform and x's loads vectorise; unpadded, batches of 2-8 ran 1.5-10x slower
    than 16 on the H100 (stop 13, results/…-2026-11-23-explore-rows-unpadded.json)."""
    plan = dot_plan(weight, x.shape[0], x.stride(0), x.stride(1), x.dtype, bias is not None, config)
    return plan(weight, x, bias)


def dot_plan(
    weight: Weight,
    rows: int,
    stride_xm: int,
    stride_xk: int,
    dtype: torch.dtype,
    has_bias: bool,
    config: DotConfig = DotConfig(),
) -> Plan:
    """``dot_matmul`` for every x ``[rows, K]`` of these strides and dtype, and every weight of
    this one's layout."""
    if not fits(weight, config):
        raise ValueError(f"{config} does not fit this weight (word view, group tiles)")
    n, k = weight.out_features, weight.in_features
    m = -(-rows // config.block_m) * config.block_m
    prepare: Callable[[torch.Tensor], torch.Tensor]
    block_w = None
    if config.planes:
        block_w = gemv_block_w(weight, config.block_k // GEMV_WORD_CODES[weight.bits])
    packed = config.planes and config.packed and weight.bits == 4 and dtype != torch.float32
    joined = packed and config.joined and config.xt  # (fits: the word view applies)
    pdl = config.pdl and config.planes and config.xt and dependent_launch(weight)
    if config.xt:  # same values, column-major (x[m, k] at k * M + m), padded in the same pass
        pair_w, out_rows = 0, k
        if joined:  # every split's steps, padded: the kernel reads them unmasked
            per_split = triton.cdiv(triton.cdiv(triton.cdiv(k, 8), block_w), config.split_k)
            pair_w = block_w if config.pair_order else 0
            out_rows = per_split * config.split_k * 8 * block_w
        prepare = transpose_plan(
            rows, k, m, stride_xm, stride_xk, dtype, None, pair_w, out_rows, pdl
        )  # fmt: skip
        stride_xm, stride_xk = 1, m
    elif m != rows:

        def prepare(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, 0, 0, m - rows))

        stride_xm, stride_xk = k, 1
    else:
        prepare = _as_is
    table = weight.outliers
    tiles = triton.cdiv(n, config.block_n) * triton.cdiv(m, config.block_m)
    grid = (tiles, config.split_k)
    locks = weight.locks
    reduce = config.split_k > 1 and config.reduce and locks is not None and tiles <= locks.numel()
    partials = tiles * config.split_k * config.block_n * config.block_m if reduce else 0
    unmasked = config.slot_unmasked and config.xt and table.slots % config.slot_chunk == 0
    common = dict(
        GROUP=weight.group_size,
        BITS=weight.bits,
        ACT=ACT_CODES[dtype],
        HAS_BIAS=has_bias,
        SLOTS=table.slots,
        HAS_OVERFLOW=table.overflow > 0,
        BLOCK_N=config.block_n,
        BLOCK_M=config.block_m,
        SPLIT_K=config.split_k,
        SLOT_CHUNK=config.slot_chunk,
        OUT_CHUNK=config.out_chunk,
        EMULATE_BF16=interpreting(),
        REDUCE=reduce,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if config.planes:
        launch = KernelLaunch(
            _dot_planes_kernel, grid,
            (X, WORDS, SCALES, *TABLE, BIAS, OUT, PARTIALS, LOCKS, m, n, k,
             weight.words.stride(0), stride_xm, stride_xk, weight.scales.stride(0), n),
            dict(BLOCK_W=block_w, EVICT=eviction(config.evict_first), PACKED=packed,
                 JOINED=joined, PDL=pdl, SLOT_UNMASKED=unmasked,
                 SLOT_HALF=config.slot_half and dtype == torch.float16,
                 PAIR_IN_PLACE=config.pair_in_place, ACC_IN_PLACE=config.acc_in_place,
                 PAIR_ORDER=config.pair_order,
                 **_pdl_launch(pdl), **common),
        )  # fmt: skip
    else:
        q = weight.qweight
        launch = KernelLaunch(
            _dot_kernel, grid,
            (X, CODES, SCALES, *TABLE, BIAS, OUT, PARTIALS, LOCKS, m, n, k, q.shape[1],
             stride_xm, stride_xk, q.stride(0), weight.scales.stride(0), n),
            dict(BLOCK_K=dot_block_k(weight, config.block_k), **common),
        )  # fmt: skip
    return _launch_plan(launch, n, rows, m, dtype, config.split_k, prepare, partials)


# The dense weight's programs (block_n, block_k, warps, stages): one row of 4096 columns each for
# one scale per row, of 2048 for group scales; on the H100 1.2-1.45x (per row) and 1.8-2.4x
# (group 128) faster than the 16 x 256 programs before (16 x 128 for groups), e.g. 11008x4096
# 45.8 against 61.2 us and 54.4 against 103.7; torch writes the same buffer in 31.4 (stop 14,
# results/…-2026-11-23-explore-dequant.json, …-explore-dequant-grouped.json).
DENSE_PER_ROW = (1, 4096, 4, 1)
DENSE_GROUPED = (1, 2048, 4, 1)


def dequantize(
    weight: Weight,
    dtype: torch.dtype,
    rows: int | None = None,
    block_n: int | None = None,
    block_k: int = 0,
    num_warps: int = 0,
    num_stages: int = 0,
) -> torch.Tensor:
    """The dense weight ``[N, K]`` in ``dtype`` (outliers written in), as the reference. With
    ``rows > N`` the result has ``rows`` rows, the ones past N left unwritten (padding). The
    program shape (``block_n`` and the rest) defaults to DENSE_PER_ROW / DENSE_GROUPED."""
    program = () if block_n is None else (block_n, block_k, num_warps, num_stages)
    return dequantize_plan(weight, dtype, rows, program)(weight)


def dequantize_plan(
    weight: Weight,
    dtype: torch.dtype,
    rows: int | None = None,
    program: tuple[int, int, int, int] | tuple[()] = (),
) -> Callable[..., torch.Tensor]:
    """``dequantize`` with these arguments (``program``: block_n, block_k, warps, stages), as a
    call that writes a new dense weight (of any weight of this one's layout), or into ``out``
    (contiguous, at least N rows of K)."""
    block_n, block_k, num_warps, num_stages = program or (
        DENSE_GROUPED if weight.group_size else DENSE_PER_ROW
    )
    n, k = weight.out_features, weight.in_features
    q, table = weight.qweight, weight.outliers
    launch = KernelLaunch(
        _dequant_kernel, (triton.cdiv(n, block_n),),
        (CODES, SCALES, *TABLE, OUT, n, k, q.shape[1], q.stride(0),
         weight.scales.stride(0), k),
        dict(GROUP=weight.group_size, BITS=weight.bits, SLOTS=table.slots,
             SLOTS_P2=_slots_p2(table), HAS_OVERFLOW=table.overflow > 0, BLOCK_N=block_n,
             BLOCK_K=block_k, OUT_CHUNK=8, num_warps=num_warps, num_stages=num_stages),
    )  # fmt: skip

    def run(weight: Weight, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(rows or n, k, device=weight.qweight.device, dtype=dtype)
        elif (
            out.dtype != dtype
            or out.shape[0] < n
            or out.shape[1:] != (k,)
            or out.stride(1) != 1
            or out.stride(0) != k
        ):
            raise ValueError(f"out must be a contiguous {dtype} buffer of at least [{n}, {k}]")
        launch(None, None, out, None, *weight.launch_args)
        return out

    return run


# cuBLAS takes a slow path when the output's row length N is not a multiple of 8 (53746x14336:
# 5.5 ms at batch 1024 against ~2.3 ms for the padded shape), so the dense weight gets padded rows.
PAD_ROWS = 8


def dequant_matmul(
    weight: Weight,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    pad: int = PAD_ROWS,
    program: tuple[int, int, int, int] | tuple[()] = (),
) -> torch.Tensor:
    """Large batch: the dense weight (rows padded to a multiple of ``pad``; ``program``:
    ``dequantize``'s program shape, default its own), then cuBLAS."""
    return dequant_matmul_plan(weight, x.dtype, pad, program)(weight, x, bias)


def dequant_matmul_plan(
    weight: Weight,
    dtype: torch.dtype,
    pad: int = PAD_ROWS,
    program: tuple[int, int, int, int] | tuple[()] = (),
) -> Plan:
    """``dequant_matmul`` for every x of this dtype."""
    n = weight.out_features
    rows = -(-n // pad) * pad
    dense_weight = dequantize_plan(weight, dtype, rows, program)

    def run(weight: Weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        dense = dense_weight(weight)
        if rows == n:
            return torch.nn.functional.linear(x, dense, bias)
        out = (x @ dense.t())[:, :n]
        return out + bias if bias is not None else out.contiguous()

    return run


# ---- dispatch ------------------------------------------------------------------------------------
# Batch 1 (4 bits: up to gemv_rows): the GEMV where its word view applies; batches up to
# SMALL_BATCH: a tensor-core kernel with 16-wide batch tiles; 4 bits up to MID_BATCH: the word-plane
# kernel with 32- or 64-wide batch tiles, 1.3-2.9x faster than dequantize + cuBLAS on the H100 at
# batch 32-128 (writing the dense weight is most of that path's time; they tie at 256: stop 13,
# results/…-2026-11-23-explore-mid.json); above: dequantize + cuBLAS (DEQUANT_LARGE), which
# measured faster on the H100 than the fused kernel at 1024 (benchmarks/notes-matmul-kernels.md).
SMALL_BATCH = 16
MID_BATCH = 128
DEQUANT_LARGE = True


# Fallbacks where the measured table (below) has no entry; picked from the same H100 sweeps
# (benchmarks/notes-matmul-kernels.md, v5).
def gemv_config(n: int, k: int, bits: int) -> GemvConfig:
    if bits == 2:  # the f16x2 word dot (stop 16, results/…-explore-2bit-f59319d.json)
        if n <= 8192:
            return GemvConfig(block_n=8, block_w=128, num_warps=4, num_stages=2, packed=True)
        return GemvConfig(block_n=16, block_w=128, num_warps=2, num_stages=3, packed=True)
    if bits == 3:  # the f16x2 triple dot won on all four shapes (…-explore-3bit.json)
        return GemvConfig(block_n=8, block_w=128, num_warps=8, num_stages=1, packed=True)
    if bits == 4:  # the f16x2 word dot's winners (stop 12, results/…-explore-xvec.json)
        if n <= 8192:
            return GemvConfig(block_n=8, block_w=256, num_warps=4, num_stages=2, packed=True)
        if k > 8192:
            return GemvConfig(block_n=16, block_w=128, num_warps=2, num_stages=3, packed=True)
        return GemvConfig(block_n=8, block_w=128, num_warps=2, num_stages=3, packed=True)
    if k > 8192:
        if n <= 8192:
            return GemvConfig(block_n=8, block_w=256, num_warps=4, num_stages=2)
        return GemvConfig(block_n=32, block_w=128, num_warps=4, num_stages=3)
    if n <= 8192:
        return GemvConfig(block_n=4, block_w=256, num_warps=1, num_stages=2)
    return GemvConfig(block_n=16, block_w=128, num_warps=2, num_stages=3)


def long_k(n: int, k: int) -> bool:
    """Few row blocks and a long K (Llama's down projection): split four ways up to batch 64 and
    with 64-wide batch tiles past 32 rows (``long_k_split``, ``mid_config``)."""
    return n <= 4096 and k >= 8192


def long_k_split(n: int, k: int, m: int) -> int:
    """K splits for the tensor-core kernels on layers of few row blocks (at most 4096 rows, K at
    least 4096), summed in the kernel (``_store_tile``). 4096x11008 (Llama's down projection) has
    64 row blocks of 64 for 132 SMs; on the H100 with 0.5% outliers (stop 20,
    results/…-2026-11-23-explore-split-f9c221c.json) it took 38.3 / 54.0 / 62.7 / 66.6 us unsplit
    at batch 16 / 32 / 64 / 128 and 25.4 / 31.1 / 36.4 us with 4 splits, 53.4 with 2 at 128
    (fp32 atomics, as before: 28.4 with 6 splits, 37.3 / 46.0 with 4, 64.6 with 2); 4096x4096
    19.4 / 23.8 / 26.6 / 31.5 unsplit, 15.7 with 4 splits at 16 (fp16: 22.5), 20.7 / 23.0 / 29.1
    with 2 past it. Layers of more rows: 1 (as fast or slower split, but for isolated cases)."""
    if n > 4096 or k < 4096:
        return 1
    if long_k(n, k):
        return 4 if m <= 64 else 2
    return 4 if m <= SMALL_BATCH else 2


def small_config(n: int, k: int, m: int, bits: int) -> DotConfig:
    """Batches up to SMALL_BATCH on shapes the measured table lacks. 4 bits: the joined
    word-plane kernel (block_k 256, 4 stages unsplit): on the H100 with 0.5% outliers it took
    0-1.4 us more than the fastest of eight packed and joined configs on each of the seven
    measured shapes, and every packed config was slower (stop 18,
    results/…-2026-11-23-explore-joined-8079b3b.json)."""
    split = long_k_split(n, k, m)
    if bits == 4:
        stages = 4 if split == 1 else 3
        return DotConfig(64, 16, 256, split, num_stages=stages, xt=True, planes=True, packed=True,
                         joined=True)  # fmt: skip
    if n >= 8192:  # (2 bits: the word-plane kernel a plane at a time; 3 bits: it does not fit
        # and default_config falls back)
        return DotConfig(block_n=64, block_m=16, block_k=256, xt=True, planes=True, packed=True)
    return DotConfig(block_n=32, block_m=16, block_k=256, num_warps=2, num_stages=3, xt=True)


def mid_config(n: int, k: int, m: int) -> DotConfig:
    """Batches past SMALL_BATCH (4 bits): the joined word-plane kernel (on the H100 at batch
    32-128 with these tiles faster than the packed one in 11 of 12 cases, by up to 12%, and
    14336x4096 at 64 0.2 us slower; stop 18, results/…-explore-joined-mid-3b6e04c.json), batch
    tiles of 32 up to 64 rows and of 64 beyond (the H100's best at 32-128 on most shapes,
    …-explore-mid.json);
    layers of at most 4096 rows keep 16-wide tiles up to 32 rows (10-14% faster there: with few
    row blocks, more programs), unless K is long (at least 8192) and split over programs
    (``long_k_split``); layers of more than 12288 rows take 64-wide tiles past 32 rows (at
    batch 64 on the H100 14336x4096 56.6 -> 44.1 us, 53746x14336 452.6 -> 396.5; 11008-22016
    rows tie: stop 13's …-explore-mid.json and stop 15's …-explore-split.json agree)."""
    if m > 64 or (m > 32 and (long_k(n, k) or n > 12288)):
        block_m = 64
    elif m <= 32 and n <= 4096 and not long_k(n, k):
        block_m = 16
    else:
        block_m = 32
    split = long_k_split(n, k, m)
    return DotConfig(64, block_m, 256, split, xt=True, planes=True, packed=True, joined=True)


def large_config(n: int, k: int, m: int, bits: int) -> DotConfig:
    block_m = 64 if m <= 64 else 128
    return DotConfig(block_n=128, block_m=block_m, block_k=64, num_warps=8, num_stages=3)


def fits(weight: Weight, config: GemvConfig | DotConfig) -> bool:
    """Can ``config`` run ``weight`` (word view, group tiles)?"""
    if isinstance(config, GemvConfig):
        return gemv_block_w(weight, config.block_w) is not None
    if config.planes:
        if weight.bits not in GEMV_WORD_CODES:
            return False
        block = gemv_block_w(weight, config.block_k // GEMV_WORD_CODES[weight.bits])
        return block is not None and block >= 16
    return dot_block_k(weight, config.block_k) is not None


# Measured configurations: {device name: {"gemv" | "small": {"NxK": config fields}, "rows":
# {"NxK": the largest batch the GEMV takes}}}, written by benchmarks/explore_matmul.py
# --write-table (the fastest candidate per shape on that device, with 0.5% outliers); other
# devices and shapes fall back to the heuristics above.
CONFIG_TABLE = Path(__file__).with_name("matmul_configs.json")
_TABLE: dict[str, dict] = {}


def _table_entry(kind: str, n: int, k: int, device: torch.device):
    """The config table's entry of ``kind`` for this shape on this device (None: not measured)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if name not in _TABLE:
        try:
            _TABLE[name] = json.loads(CONFIG_TABLE.read_text()).get(name, {})
        except (OSError, ValueError):
            _TABLE[name] = {}
    return _TABLE[name].get(kind, {}).get(f"{n}x{k}")


@functools.cache
def measured_rows(n: int, k: int, device: torch.device) -> int | None:
    """The table's largest GEMV batch for this shape on this device (None: not measured)."""
    found = _table_entry("rows", n, k, device)
    return None if found is None else int(found)


@functools.cache  # asked on every eager call: the lookup costs host time
def measured_config(
    kind: str, n: int, k: int, device: torch.device
) -> GemvConfig | DotConfig | None:
    found = _table_entry(kind, n, k, device)
    if found is None:
        return None
    cls = GemvConfig if kind == "gemv" else DotConfig
    names = {f.name for f in fields(cls)}
    return cls(**{key: value for key, value in found.items() if key in names})


def gemv_rows(n: int, k: int, device: torch.device) -> int:
    """The largest batch the GEMV takes (one pass over the codes per batch row, the later ones
    mostly from L2) before the tensor-core kernel is faster: measured per shape where the config
    table has it, else from the H100's (stop 13: 4096-row layers kept the codes in L2 longest;
    stop 20: where their K is split, the tensor-core kernel is faster from 4 rows on 4096x4096
    and from 2 on 4096x11008, results/…-2026-11-23-explore-rows-ae0f050.json; launched while x
    is copied, from 2 rows on 11008-22016x4096, …-explore-rows-4836490.json)."""
    found = measured_rows(n, k, device)
    if found is not None:
        return found
    if n <= 4096:
        return 6 if k < 4096 else 3 if k < 8192 else 1
    return 1


def default_config(weight: Weight, m: int) -> GemvConfig | DotConfig | None:
    """The kernel configuration ``matmul`` runs for batch ``m`` (None: dequantize + cuBLAS). Up to
    batch 16, and past it on layers of more than 4096 rows, the tensor-core kernel starts while
    x is copied (programmatic dependent launch, where the device has it): on the H100 6-9% faster
    per call on the mid shapes and 2% in compiled decode at batch 16 (stop 19,
    results/…-2026-11-23-explore-pdl-dd4c057.json, …-decode-pdl-dd4c057.json); at batch 32-128
    1-3 us faster on 11008-22016 rows in 11 of 12 cases and within 1% either way on 53746x14336,
    but 1-5 us slower on 4096x4096 in both runs that timed it (stop 20,
    …-explore-split-f9c221c.json). The GEMV does not, as it made batch-1 decode 3% slower.

    The word-plane kernel on x's copy sums each chunk of outlier slots in fp16 (as the GEMV sums
    each word's eight products), and with 16-wide batch tiles loads the slots without masks: on
    the H100 with 0.5% outliers up to batch 16, 4096x4096 16.8 -> 15.7 us, 11008x4096
    24.4-25.5 -> 23.9-24.4, 14336x4096 26.7-27.9 -> 26.0-27.2, 53746x14336 203 -> 200; past
    it, summed in fp16 only, even to 6% faster (unmasked as well, 53746x14336 at batch 32 was 4%
    slower) (stop 21, results/…-2026-11-23-explore-slots-1e93821.json). With 32-wide batch tiles
    and slots a multiple of 16, up to batch 32, on layers of at most 14336 rows, unmasked chunks
    of 16: at batch 32 11008x4096 28.6 / 29.2 / 28.0 against 30.6 / 29.7 / 29.1 us, 14336x4096
    31.3 / 30.3 / 30.1 against 34.1 / 35.4 / 34.0 in three runs, 12288x4096 29.2 against 31.7
    (…-1e93821.json, …-5e6d761.json, …-9360ecc.json). Not past those: 22016x4096 at batch 32
    48.7 against 38.3, 11008x4096 at batch 64 (32-wide tiles too) 44.0-44.6 against 35.0-36.3;
    chunks of 16 spill with 64-wide tiles and were slower with 16-wide ones.

    The packed word-plane kernel's products accumulate in place (no per-step partial sum) except
    with 16-wide batch tiles and split K: on the H100 with 0.5% outliers (best of five
    interleaved timings, us) batch 128 11008x4096 58.0 -> 55.3, 14336x4096 61.5 -> 59.0,
    4096x11008 51.5 -> 48.4, 53746x14336 616.9 -> 605.9 (with fp16's odd planes decoded
    unshifted, which is on everywhere: 11 % fewer instructions per step); batch 16 11008x4096
    23.9 -> 23.3, 14336x4096 26.1 -> 25.8; but 4096x11008 at batch 2-16 (K split 4 ways)
    24.8-25.0 -> 26.1-26.2, where the unshifted decode alone gives 24.6-24.9. Slower:
    53746x14336 at batch 32, 251.4 -> 259.8 (either change alone alike; not explained), and at
    2-16 by 0.6% (stop 22, results/…-2026-11-23-explore-loop-c6edb69.json).

    Past batch 32 the joined kernel reads x copied in column order (every 4th row of x^T for each
    pair of planes) instead of pair order, so the outlier gather computes no pair positions
    (202 -> 152 instructions per chunk of 8 slots): on the H100, 0.5% outliers, best of five
    interleaved timings, 1-4% faster on all seven measured shapes at batch 64 and 128 (11008x4096
    at 64 35.0 -> 33.7 us, 53746x14336 at 128 595.5 -> 579.3, 22016x4096 86.5 -> 83.2); even or
    slower at 32 (53746x14336 259.5 -> 269.6) and 11-16% slower up to 16, where a row of x^T is
    32 bytes (11008x4096 at 16 23.4 -> 26.2; stop 22, …-explore-order-4b10a0a.json). A second
    run agreed at 40-96 but for 53746x14336 at 40-48, 3% slower (…-explore-order-f61c8a9.json)."""
    config = _default_config(weight, m)
    if not isinstance(config, DotConfig):
        return config
    if config.planes and config.xt:
        wide = (config.block_m == 32 and m <= 32 and weight.out_features <= 14336
                and weight.outliers.slots % 16 == 0)  # fmt: skip
        config = replace(config, slot_half=True, slot_unmasked=config.block_m <= 16 or wide,
                         slot_chunk=16 if wide else config.slot_chunk)  # fmt: skip
    if config.planes:
        config = replace(config, acc_in_place=config.packed
                         and (config.block_m > 16 or config.split_k == 1),
                         pair_order=m <= 32)  # fmt: skip
    if m <= SMALL_BATCH or weight.out_features > 4096:
        config = replace(config, pdl=True)
    return config


def _default_config(weight: Weight, m: int) -> GemvConfig | DotConfig | None:
    n, k, bits = weight.out_features, weight.in_features, weight.bits
    device = weight.qweight.device
    if m == 1 or (bits == 4 and m <= gemv_rows(n, k, device)):  # (other widths: not measured)
        config: GemvConfig | DotConfig | None = None
        if bits == 4:
            config = measured_config("gemv", n, k, device)
        config = config or gemv_config(n, k, bits)
        if fits(weight, config):
            return config
    if m <= SMALL_BATCH:
        config = measured_config("small", n, k, device) if bits == 4 else None
        config = config or small_config(n, k, m, bits)
        return config if fits(weight, config) else DotConfig(32, 16, 128)
    if bits == 4 and m <= MID_BATCH:
        config = mid_config(n, k, m)
        if fits(weight, config):
            return config
    if DEQUANT_LARGE:
        return None
    config = large_config(n, k, m, bits)
    return config if fits(weight, config) else replace(config, planes=False)


# ---- optional autotuning: the fastest of a few candidates, per layer shape and batch -------------
AUTOTUNE = os.environ.get("EASYQUANT_AUTOTUNE", "0") not in ("", "0")
_TUNED: dict[tuple, GemvConfig | DotConfig | None] = {}


def candidates(weight: Weight, m: int) -> list[GemvConfig | DotConfig | None]:
    """What the autotuner times for batch ``m`` (None: dequantize + cuBLAS): the configurations
    that won somewhere in the H100 sweeps (benchmarks/explore_matmul.py)."""
    if m == 1:
        found: list[GemvConfig | DotConfig | None] = [
            GemvConfig(bn, bw, warps, stages, packed=packed)
            for bn, bw, warps, stages, packed in (
                (4, 256, 1, 2, False),
                (8, 256, 4, 2, False),
                (16, 128, 2, 3, False),
                (32, 128, 4, 3, False),
                (8, 128, 2, 3, True),
                (4, 128, 1, 3, True),
                (8, 256, 4, 2, True),
                (16, 128, 2, 3, True),
            )
        ]
    elif m <= SMALL_BATCH:
        gemvs = [GemvConfig(8, 128, 2, 3, packed=True), GemvConfig(4, 256, 1, 2, packed=True)]
        found = (gemvs if m <= 8 else []) + [
            DotConfig(32, 16, 256, num_warps=2, num_stages=3, xt=True),
            DotConfig(16, 16, 256, num_warps=1, num_stages=3, xt=True),
            DotConfig(64, 16, 256, xt=True, planes=True, packed=True),
            DotConfig(64, 16, 128),
        ]
    else:
        found = [None, large_config(weight.out_features, weight.in_features, m, weight.bits)]
        if m <= 2 * MID_BATCH:
            wide = mid_config(weight.out_features, weight.in_features, m)
            found += [wide, replace(wide, block_m=16 if wide.block_m > 16 else 32)]
    return [c for c in found if c is None or fits(weight, c)]


def plan_for(
    weight: Weight, x: torch.Tensor, has_bias: bool, config: GemvConfig | DotConfig | None
) -> Plan:
    """The plan of ``config`` (None: dequantize + cuBLAS) for x's shape, strides and dtype (x
    ``[M, K]`` with unit stride along K)."""
    if config is None:
        return dequant_matmul_plan(weight, x.dtype)
    if isinstance(config, GemvConfig):
        return gemv_plan(weight, x.shape[0], x.stride(0), x.dtype, has_bias, config)
    return dot_plan(weight, x.shape[0], x.stride(0), x.stride(1), x.dtype, has_bias, config)


def _run(weight: Weight, x: torch.Tensor, bias, config: GemvConfig | DotConfig | None):
    return plan_for(weight, x, bias is not None, config)(weight, x, bias)


def tuned_config(weight: Weight, x: torch.Tensor, bias) -> GemvConfig | DotConfig | None:
    """The cached fastest candidate for this shape, batch, dtype and layout (timed on first use;
    never while a CUDA graph is being captured, where the default is taken instead)."""
    m = x.shape[0]
    table = weight.outliers
    key = (
        weight.out_features,
        weight.in_features,
        weight.bits,
        weight.group_size,
        m,
        x.dtype,
        table.slots,
        table.overflow > 0,
        bias is not None,
    )
    if key in _TUNED:
        return _TUNED[key]
    if torch.cuda.is_current_stream_capturing():
        return default_config(weight, m)
    best, best_s = default_config(weight, m), float("inf")
    for config in candidates(weight, m):
        try:
            _run(weight, x, bias, config)  # compile
            torch.cuda.synchronize()
            # GPU time of 10 back-to-back calls, queued while the GPU spins (~2 ms), so that the
            # host's launch time does not count
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(4_000_000)
            start.record()
            for _ in range(10):
                _run(weight, x, bias, config)
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end)
        except Exception:  # a candidate that fails to build is skipped
            continue
        if seconds < best_s:
            best, best_s = config, seconds
    _TUNED[key] = best
    return best


def matmul_plan(weight: Weight, x: torch.Tensor, bias: torch.Tensor | None) -> Plan:
    """The plan ``matmul`` runs for x's shape, strides and dtype (x ``[M, K]``, unit stride
    along K)."""
    use_tuner = AUTOTUNE and x.is_cuda and not interpreting()
    config = tuned_config(weight, x, bias) if use_tuner else default_config(weight, x.shape[0])
    return plan_for(weight, x, bias is not None, config)


def matmul(weight: Weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K] @ W.T + bias``, picking the kernel by batch size."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return matmul_plan(weight, x, bias)(weight, x, bias)


# ---- the op QuantLinear calls --------------------------------------------------------------------
def _forward(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    slot_cols: torch.Tensor,
    slot_vals: torch.Tensor,
    slot_count: torch.Tensor,
    overflow_indptr: torch.Tensor,
    overflow_cols: torch.Tensor,
    overflow_vals: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    locks: torch.Tensor | None = None,
) -> torch.Tensor:
    table = OutlierTable(
        slot_cols, slot_vals, slot_count, overflow_indptr, overflow_cols, overflow_vals
    )
    group = kernel_group(group_size, in_features)
    weight = Weight(qweight, scales, table, bits, group, in_features, locks)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    bias_x = None if bias is None else bias.to(x.dtype)
    out = layout_plan(weight, x2, bias_x)(weight, x2, bias_x)
    return out.reshape(*lead, weight.out_features)


# Plans by layout, shared by every layer of one layout (``layout_plan``); past this many layouts
# (as in prefill at many lengths) the cache starts over.
MAX_PLANS = 256
_PLANS: dict[tuple, Plan] = {}


def _layout(t: torch.Tensor) -> tuple:
    # what Triton specialises a tensor argument on (dtype, 16-byte alignment), and what a plan
    # bakes in (shape, strides)
    return (t.shape, t.stride(), t.dtype, t.data_ptr() % 16 == 0)


def layout_plan(weight: Weight, x: torch.Tensor, bias: torch.Tensor | None) -> Plan:
    """``matmul_plan``, cached by the layout of x, the bias and the layer's tensors: a plan's
    kernels are launched directly from their second call on (``easyquant.kernels.launch``),
    which is valid for any tensors of the layout it was built for."""
    tensors = (x, weight.qweight, weight.scales, *weight.outliers.tensors())
    key = (
        weight.bits,
        weight.group_size,
        weight.in_features,
        None if bias is None else _layout(bias),
        None if weight.locks is None else weight.locks.numel(),
        *map(_layout, tensors),
    )
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = matmul_plan(weight, x, bias)
    return plan


@torch.library.custom_op("easyquant::quant_linear", mutates_args=())
def quant_linear_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    slot_cols: torch.Tensor,
    slot_vals: torch.Tensor,
    slot_count: torch.Tensor,
    overflow_indptr: torch.Tensor,
    overflow_cols: torch.Tensor,
    overflow_vals: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    split_locks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused forward as one opaque op, so that torch.compile treats it as a unit. (The
    kernels write ``split_locks`` but leave it as they found it: all zeros.)"""
    return _forward(
        x, qweight, scales, slot_cols, slot_vals, slot_count, overflow_indptr, overflow_cols,
        overflow_vals, bias, bits, group_size, in_features, split_locks,
    )  # fmt: skip


@quant_linear_op.register_fake
def _(x, qweight, scales, slot_cols, slot_vals, slot_count, overflow_indptr, overflow_cols,
      overflow_vals, bias, bits, group_size, in_features, split_locks=None):  # fmt: skip
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def kernel_group(group_size: int | None, in_features: int) -> int:
    """The kernels' GROUP: 0 for one scale per row (also a group spanning the whole row)."""
    return 0 if group_size is None or group_size == in_features else group_size


def layer_weight(layer: torch.nn.Module) -> Weight:
    """The kernels' view of a ``QuantLinear`` (its codes, scales and outlier table)."""
    return Weight(
        layer.qweight,
        layer.scales,
        OutlierTable(*layer.outlier_table()),
        layer.bits,
        kernel_group(layer.group_size, layer.in_features),
        layer.in_features,
        getattr(layer, "split_locks", None),
    )


def quant_linear_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``QuantLinear.forward`` on the fused kernels: through the custom op while torch.compile
    traces, else through the layer's cached plans (the op's dispatch, the config lookup and
    Triton's argument binding cost host time per call, which eager decoding and prefill pay 224
    times per token for a 7B model)."""
    if x.dtype not in ACT_CODES:
        raise ValueError(f"QuantLinear takes float16, bfloat16 or float32 input, got {x.dtype}")
    if torch.compiler.is_compiling():
        return quant_linear_op(
            x,
            layer.qweight,
            layer.scales,
            *layer.outlier_table(),
            layer.bias,
            layer.bits,
            layer.group_size or 0,
            layer.in_features,
            getattr(layer, "split_locks", None),
        )
    plans = layer.kernel_plans
    if plans is None:
        plans = layer.kernel_plans = LayerPlans()
    return plans(layer, x)


# Plans a layer keeps (past this many x signatures, as in prefill at many lengths, it starts over).
MAX_LAYER_PLANS = 64


class LayerPlans:
    """A ``QuantLinear``'s kernel view and plans by x's signature (shape, strides, dtype, 16-byte
    alignment), each built once, so that an eager call skips the config lookup and, after its
    kernels' first launch, Triton's argument binding (``easyquant.kernels.launch``). Rebuilt when
    the layer's tensors are not the ones the view holds (``.to()``, a rebuilt outlier table, an
    assigned buffer). No plan holds a tensor, and the view holds only the layer's buffers."""

    def __init__(self) -> None:
        self.tensors: tuple[torch.Tensor | None, ...] = ()
        self.weight: Weight | None = None
        self.plans: dict[tuple, Plan] = {}

    def __call__(self, layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        tensors = layer.kernel_tensors()
        weight = self.weight
        if (
            weight is None
            or len(tensors) != len(self.tensors)
            or not all(map(operator.is_, tensors, self.tensors))
        ):
            self.tensors, self.plans = tensors, {}
            weight = self.weight = layer_weight(layer)
        key = (x.shape, x.stride(), x.dtype, x.data_ptr() % 16 == 0)
        plan = self.plans.get(key)
        if plan is None:
            if len(self.plans) >= MAX_LAYER_PLANS:
                self.plans.clear()
            plan = self.plans[key] = layer_plan(weight, layer.bias, x)
        # (the bias read per call: it may be changed in place, and no plan keeps a tensor)
        return plan(weight, x, layer.bias)


def layer_plan(weight: Weight, bias: torch.Tensor | None, x: torch.Tensor) -> Plan:
    """``QuantLinear.forward`` for every x of this shape, strides and dtype."""
    k, n = weight.in_features, weight.out_features
    shape = (*x.shape[:-1], n)
    x2 = x.reshape(-1, k)
    unit_stride = x2.stride(-1) == 1
    if not unit_stride:
        x2 = x2.contiguous()
    plan = matmul_plan(weight, x2, None if bias is None else bias.to(x.dtype))

    def run(weight: Weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x.reshape(-1, k)
        if not unit_stride:
            x2 = x2.contiguous()
        return plan(weight, x2, None if bias is None else bias.to(x.dtype)).reshape(shape)

    return run
