"""Fused Triton kernel of the Adam range search: every step of every row in one launch.

Computes exactly what :func:`easyquant.algorithm.range_search.adam_range_search_block` computes
(relative parameterisation ``s = s0 * r``, gradient normalised by ``2 / (s0 * n)``, Adam with
the same constants, ``r >= MIN_RELATIVE_RANGE``, best range over steps ``0..steps``), but each
program keeps its block of rows in registers for all steps: the rows are read from memory twice
(the exact first step streams them; see the kernel) instead of several times per step.

Per element and step the work is one rounding, one clamp and three multiply-adds (error, loss,
gradient). Rounding uses the float "magic number" trick: adding ``1.5 * 2^23`` leaves no
fraction bits, so the add itself rounds to the nearest integer (ties to even, where the
reference's ``floor(y + 1/2)`` rounds ties up: only near-exact ties can differ). On the GPU the
clamp is folded into the multiply-add that scales the value (``fma.rn.sat``, mode ``SATURATE``):
one instruction instead of three. The first evaluation (``r = 1``, where coarse data such as
bfloat16 weights has exact ties) uses the reference's own arithmetic.

Triton tensors have power-of-two shapes, so a row is held as up to ``MAX_CHUNKS`` power-of-two
chunks (the binary digits of its length, the last one rounded up: 11008 = 8192 + 2048 + 1024
with 768 used), each a tensor of its own: non-power-of-two rows waste little work on padding.
Chunk sizes are compile-time constants.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from easyquant.algorithm.range_search import ADAM_BETAS, ADAM_EPS, MIN_RELATIVE_RANGE

# 1.5 * 2^23: floats in [2^23, 2^24) have no fraction bits, so x + MAGIC is x rounded to an integer
# (for |x| < 2^22) and (x + MAGIC) - MAGIC recovers it exactly.
ROUND_MAGIC = tl.constexpr(12582912.0)
MAX_CHUNKS = 4
# How an evaluation rounds and clamps (compile-time); the first one is always EXACT.
EXACT = 0  # the reference's own arithmetic: floor(x / s + 1/2) with an IEEE division
MINMAX = 1  # round by the magic add, clamp with min/max: 7 instructions per value and step
SATURATE = 2  # the clamp folded into a saturating multiply-add (see _chunk_sums): 6
DEFAULT_MODE = SATURATE  # up to 5 bits; MINMAX for 8 bits
# Chunks per row in the default plan: 11008 = 8192 + 2048 + 1024 (768 used) ran faster than four
# exact chunks on the H100 (one reduction less per step); the kernel takes up to MAX_CHUNKS.
PLAN_CHUNKS = 3
# Values a thread keeps, at least (all chunks together): a row is split over as many warps as
# that allows (H100, 100 steps: 4096 values on 2 warps and 11008 on 4 ran fastest).
VALUES_PER_THREAD = 64
# Short rows (groups) are searched several to a program, about this many values in all (one warp).
SHORT_TILE = 512


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (no inline PTX there)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class LaunchPlan:
    """Compile-time shape of one launch: rows per program, chunk lengths, warps."""

    block_rows: int
    chunks: tuple[int, ...]
    num_warps: int

    @property
    def padded(self) -> int:
        return sum(self.chunks)


def chunk_lengths(n: int, max_chunks: int = MAX_CHUNKS) -> tuple[int, ...]:
    """Power-of-two chunks covering ``n``: its binary digits, largest first; the last chunk is
    rounded up to a power of two (masked) when ``n`` has more than ``max_chunks`` digits."""
    chunks: list[int] = []
    rest = n
    while rest > 0:
        if len(chunks) == max_chunks - 1:
            chunks.append(triton.next_power_of_2(rest))
            break
        top = 1 << (rest.bit_length() - 1)
        chunks.append(top)
        rest -= top
    return tuple(chunks)


def launch_plan(rows: int, n: int, max_chunks: int = PLAN_CHUNKS) -> LaunchPlan:
    """Rows per program and warps for ``rows`` ranges of ``n`` values each.

    Long rows (per channel): one row per program, warps so that each thread holds at least
    ``VALUES_PER_THREAD`` values. Short rows (groups): several rows per program, about
    ``SHORT_TILE`` values on one warp (the fastest of the plans tried on the H100).
    """
    chunks = chunk_lengths(n, max_chunks)
    padded = sum(chunks)
    block_rows = 1
    if padded < SHORT_TILE:
        block_rows = min(
            triton.next_power_of_2(max(rows, 1)), floor_power_of_2(SHORT_TILE // padded)
        )
    tile = block_rows * padded
    num_warps = min(8, floor_power_of_2(max(1, tile // (32 * VALUES_PER_THREAD))))
    return LaunchPlan(block_rows=block_rows, chunks=chunks, num_warps=num_warps)


def floor_power_of_2(k: int) -> int:
    return 1 << (k.bit_length() - 1)


@triton.jit
def _saturating_fma(x, a, b):
    """clamp(x * a + b, 0, 1) in one instruction (PTX ``fma.rn.sat``)."""
    return tl.inline_asm_elementwise(
        "fma.rn.sat.f32 $0, $1, $2, $3;",
        "=f,f,f,f",
        [x, a, b],
        dtype=tl.float32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _chunk_sums(
    x, s, inv_s, QMIN: tl.constexpr, QMAX: tl.constexpr, MODE: tl.constexpr, COMPILED: tl.constexpr
):
    """Per-row ``(sum err^2, sum err * q)`` of one chunk ``x [BLOCK_R, C]`` at scales ``s``."""
    if MODE == 0:  # EXACT
        q = tl.floor(tl.div_rn(x, s) + 0.5)
        neg_q = -tl.minimum(tl.maximum(q, QMIN), QMAX)
    else:
        if MODE == 2:  # SATURATE
            # u = clamp((x / s - QMIN) / span, 0, 1), then round(QMIN + u * span): the clamp
            # rides on the multiply-add. Rounding u moves y = x / s by up to about span * 2^-24,
            # so within that of a tie the code can differ from the reference's.
            span: tl.constexpr = QMAX - QMIN
            a = inv_s * (1.0 / span)
            b = tl.full(a.shape, -QMIN / span, tl.float32)
            if COMPILED:  # inline PTX
                u = _saturating_fma(x, a, b)
            else:  # the same arithmetic where PTX is not available (the interpreter)
                u = tl.minimum(tl.maximum(tl.fma(x, a, b), 0.0), 1.0)
            t = tl.fma(u, span, ROUND_MAGIC + QMIN)
        else:  # MINMAX
            t = tl.fma(x, inv_s, ROUND_MAGIC)
            t = tl.minimum(tl.maximum(t, ROUND_MAGIC + QMIN), ROUND_MAGIC + QMAX)
        neg_q = ROUND_MAGIC - t
    # With -q rather than q no negation of x appears: a loop-invariant -x would be hoisted out
    # of the step loop and double the registers the rows take.
    neg_err = tl.fma(neg_q, s, x)  # x - q * s
    if COMPILED:
        # Both sums in one reduction: one pass through shared memory when a row spans warps.
        return tl.reduce((neg_err * neg_err, neg_err * neg_q), 1, _add_pairs)
    else:  # the interpreter sums tuples element by element in Python: slow
        return tl.sum(neg_err * neg_err, axis=1), tl.sum(neg_err * neg_q, axis=1)


@triton.jit
def _add_pairs(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _row_sums(
    x0,
    x1,
    x2,
    x3,
    s,
    inv_s,
    C1: tl.constexpr,
    C2: tl.constexpr,
    C3: tl.constexpr,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    MODE: tl.constexpr,
    COMPILED: tl.constexpr,
):
    """``(loss, sum err * q)`` per row over all chunks (chunks of length 0 are skipped)."""
    loss, dot = _chunk_sums(x0, s, inv_s, QMIN, QMAX, MODE, COMPILED)
    if C1 > 0:
        loss1, dot1 = _chunk_sums(x1, s, inv_s, QMIN, QMAX, MODE, COMPILED)
        loss += loss1
        dot += dot1
    if C2 > 0:
        loss2, dot2 = _chunk_sums(x2, s, inv_s, QMIN, QMAX, MODE, COMPILED)
        loss += loss2
        dot += dot2
    if C3 > 0:
        loss3, dot3 = _chunk_sums(x3, s, inv_s, QMIN, QMAX, MODE, COMPILED)
        loss += loss3
        dot += dot3
    return loss, dot


@triton.jit
def _load_chunk(x_ptr, rows, row_ok, stride, n, offset, C: tl.constexpr):
    cols = offset + tl.arange(0, C)
    mask = row_ok[:, None] & (cols < n)[None, :]
    return tl.load(x_ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _range_search_kernel(
    x_ptr,
    init_ptr,
    adam_ptr,
    scale_ptr,
    loss_ptr,
    num_rows,
    n,
    stride,
    steps,
    QMIN: tl.constexpr,
    QMAX: tl.constexpr,
    HAS_INIT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    C0: tl.constexpr,
    C1: tl.constexpr,
    C2: tl.constexpr,
    C3: tl.constexpr,
    PRE: tl.constexpr,
    MODE: tl.constexpr,
    COMPILED: tl.constexpr,
    BETA1: tl.constexpr,
    BETA2: tl.constexpr,
    EPS: tl.constexpr,
    MIN_R: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    rows = rows.to(tl.int64)

    # Step 0 streams the rows through in PRE-wide slices (while loops, not range(n): Triton 3.6's
    # interpreter cannot take a run-time loop bound under numpy 2.4). It uses the reference's own
    # arithmetic: at the start (r = 1, s = max|x| / qmax) coarse data such as bfloat16 weights
    # has exact ties (x = max|x| / 2), which must round as the reference rounds them or the
    # search takes another path; later ranges are arbitrary floats and ties are negligible.
    # Kept out of the step loop, its IEEE divisions cost the loop no registers.
    if HAS_INIT:
        s0 = tl.load(init_ptr + rows, mask=row_ok, other=0.0)
    else:
        amax = tl.zeros([BLOCK_R], tl.float32)
        col = 0
        while col < n:
            x = _load_chunk(x_ptr, rows, row_ok, stride, n, col, PRE)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
            col += PRE
        s0 = tl.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
    active = s0 > 0
    s0 = tl.where(active, s0, 1.0)
    loss = tl.zeros([BLOCK_R], tl.float32)
    dot = tl.zeros([BLOCK_R], tl.float32)
    col = 0
    while col < n:
        x = _load_chunk(x_ptr, rows, row_ok, stride, n, col, PRE)
        part_loss, part_dot = _chunk_sums(x, s0[:, None], s0[:, None], QMIN, QMAX, 0, COMPILED)
        loss += part_loss
        dot += part_dot
        col += PRE

    # The block's rows, held in registers for all later steps; chunks 1-3 exist when their
    # length is not 0 (else they are stand-ins that are never used).
    x0 = _load_chunk(x_ptr, rows, row_ok, stride, n, 0, C0)
    x1 = x0
    x2 = x0
    x3 = x0
    if C1 > 0:
        x1 = _load_chunk(x_ptr, rows, row_ok, stride, n, C0, C1)
    if C2 > 0:
        x2 = _load_chunk(x_ptr, rows, row_ok, stride, n, C0 + C1, C2)
    if C3 > 0:
        x3 = _load_chunk(x_ptr, rows, row_ok, stride, n, C0 + C1 + C2, C3)

    # Same normalisation as the reference: grad = 2 * sum(err * q) / (s0 * n).
    grad_norm = tl.div_rn(tl.full(s0.shape, 2.0, tl.float32), s0 * n.to(tl.float32))
    r = tl.full(s0.shape, 1.0, tl.float32)
    m = tl.zeros(s0.shape, tl.float32)
    v = tl.zeros(s0.shape, tl.float32)
    best_r = r
    best_loss = loss
    step = 0
    while step < steps:
        # Step-dependent Adam factors (computed in float64 on the host): loaded first, so that
        # the loads complete under the step's arithmetic.
        lr_corrected = tl.load(adam_ptr + 2 * step)
        v_correction = tl.load(adam_ptr + 2 * step + 1)
        # Adam on the last evaluation's gradient:
        # lr * m_hat / (sqrt(v_hat) + eps), m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t).
        grad = dot * grad_norm
        m = m * BETA1 + grad * (1.0 - BETA1)
        v = v * BETA2 + (grad * grad) * (1.0 - BETA2)
        # IEEE division and square root, as the reference: per row and step they are cheap,
        # and the GPU's approximate ones (2 ulp) perturb the search more than the reference's
        # own rounding does.
        denom = tl.sqrt_rn(v * v_correction) + EPS
        r = tl.maximum(r - tl.div_rn(lr_corrected * m, denom), MIN_R)
        s = s0 * r
        # x * (1 / s) for the reference's x / s: the two differ by an ulp, which matters only
        # within an ulp of a rounding tie.
        inv_s = tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
        loss, dot = _row_sums(
            x0, x1, x2, x3, s[:, None], inv_s[:, None], C1, C2, C3, QMIN, QMAX, MODE, COMPILED
        )
        better = loss < best_loss
        best_loss = tl.where(better, loss, best_loss)
        best_r = tl.where(better, r, best_r)
        step += 1

    tl.store(scale_ptr + rows, tl.where(active, s0 * best_r, 0.0), mask=row_ok)
    tl.store(loss_ptr + rows, tl.where(active, best_loss, 0.0), mask=row_ok)


@functools.lru_cache(maxsize=64)
def adam_factors(steps: int, lr: float, device: torch.device) -> torch.Tensor:
    """Per step t = 1..steps: ``lr / (1 - beta1^t)`` and ``1 / (1 - beta2^t)`` (float32 of
    float64 values, as the reference divides by float32 of its Python floats), interleaved."""
    beta1, beta2 = ADAM_BETAS
    t = torch.arange(1, max(steps, 1) + 1, dtype=torch.float64)
    factors = torch.stack((lr / (1 - beta1**t), 1 / (1 - beta2**t)), dim=1)
    return factors.to(torch.float32).reshape(-1).to(device)


def triton_range_search_with_loss(
    rows: torch.Tensor,
    qmin: int,
    qmax: int,
    steps: int,
    lr: float,
    init_scale: torch.Tensor | None = None,
    plan: LaunchPlan | None = None,
    mode: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(best_scale [R, 1], best_loss [R])`` like ``adam_range_search``, in one kernel launch.

    ``rows`` is float32 ``[R, n]`` with outliers zeroed (any row stride, unit column stride).
    ``plan`` and ``mode`` (``EXACT``, ``MINMAX`` or ``SATURATE``: how steps after the first round
    and clamp) override the defaults, for benchmarks and tests.
    """
    if rows.dim() != 2 or rows.dtype != torch.float32:
        raise ValueError(f"rows must be a 2-D float32 tensor, got {rows.dtype} {tuple(rows.shape)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if qmin >= 0 or qmax <= 0:
        raise ValueError(f"the grid must straddle 0, got [{qmin}, {qmax}]")
    if rows.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the Triton range search runs on CUDA tensors (or on the CPU under "
            f"TRITON_INTERPRET=1), got a tensor on {rows.device}"
        )
    num_rows, n = rows.shape
    scale = torch.empty(num_rows, 1, dtype=torch.float32, device=rows.device)
    loss = torch.empty(num_rows, dtype=torch.float32, device=rows.device)
    if num_rows == 0 or n == 0:
        scale.zero_()
        loss.zero_()
        return scale, loss
    if rows.stride(1) != 1:
        rows = rows.contiguous()
    init = None
    if init_scale is not None:
        init = init_scale.reshape(-1).to(device=rows.device, dtype=torch.float32).contiguous()
        if init.numel() != num_rows:
            raise ValueError(f"init_scale has {init.numel()} values for {num_rows} rows")
    plan = plan or launch_plan(num_rows, n)
    chunks = (*plan.chunks, 0, 0, 0)[:MAX_CHUNKS]
    if mode is None:
        # The saturating clamp rounds y = x / s to within about (qmax - qmin) * 2^-24 of it: for
        # 8 bits that moves more codes at near-ties than the gain of one instruction is worth.
        mode = DEFAULT_MODE if qmax - qmin < 64 else MINMAX
    grid = (triton.cdiv(num_rows, plan.block_rows),)
    _range_search_kernel[grid](
        rows,
        init if init is not None else scale,
        adam_factors(steps, lr, rows.device),
        scale,
        loss,
        num_rows,
        n,
        rows.stride(0),
        steps,
        QMIN=qmin,
        QMAX=qmax,
        HAS_INIT=init is not None,
        BLOCK_R=plan.block_rows,
        C0=chunks[0],
        C1=chunks[1],
        C2=chunks[2],
        C3=chunks[3],
        PRE=min(1024, triton.next_power_of_2(n)),
        MODE=mode,
        COMPILED=not interpreting(),
        BETA1=ADAM_BETAS[0],
        BETA2=ADAM_BETAS[1],
        EPS=ADAM_EPS,
        MIN_R=MIN_RELATIVE_RANGE,
        num_warps=plan.num_warps,
    )
    return scale, loss


def triton_range_search(
    rows: torch.Tensor,
    qmin: int,
    qmax: int,
    steps: int,
    lr: float,
    init_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Best per-row scales ``[R, 1]`` (float32, before storage rounding); see the module doc."""
    scale, _ = triton_range_search_with_loss(rows, qmin, qmax, steps, lr, init_scale)
    return scale
