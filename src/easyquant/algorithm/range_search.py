"""Gradient search of the quantization ranges (the paper's Eq. 2 with Adam), vectorised over rows.

A "row" here is one quantization range: an output channel, or one group of it. Rows are the first
dimension of ``x``; the values sharing a range are the second. Outliers must already be zeroed in
``x``: a zero quantizes to code 0 exactly, adds nothing to the error and nothing to the gradient.

Grid: symmetric signed integers ``q in [qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]`` and
``Q[x] = s * clamp(floor(x / s + 1/2), qmin, qmax)``. Ties round up (floor(v + 1/2)), which any
kernel reproduces cheaply.

Gradient (Eq. 2): ``d||Q[x] - x||^2 / ds = 2 * sum_i (Q[x_i] - x_i) * q_i``. For clipped entries
``Q = s * qmax`` so ``dQ/ds = qmax = q_i``: the same formula is exact there as well.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# Ranges are kept above this fraction of their start, so that a bad step never makes s <= 0.
MIN_RELATIVE_RANGE = 1e-3

DEFAULT_CPU_CHUNK = 1 << 19

StepTrace = Callable[[int, torch.Tensor, torch.Tensor], None]


def as_ranges(x: torch.Tensor, length: int, fill: float = 0.0) -> torch.Tensor:
    """``x`` ``[out, in]`` as rows of one range each, ``[out * groups, length]``. Where
    ``length`` does not divide the row, each row is padded with ``fill`` to whole groups (a
    shorter last group): zeros quantize to code 0 and add nothing to any range's error, gradient
    or max-abs; NaN is ignored by nan-statistics. A view when nothing is padded."""
    pad = -x.shape[1] % length
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=fill)
    return x.reshape(-1, length)


def quantize_codes(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Signed integer codes (as float) of ``x`` on the grid ``scale * [qmin, qmax]``:
    ``clamp(floor(x / scale + 1/2))``, in place on one temporary of ``x``'s size."""
    return torch.div(x, scale).add_(0.5).floor_().clamp_(qmin, qmax)


def reconstruction_loss(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per-row ``||Q[x] - x||^2`` for per-row scales of shape ``[rows, 1]`` (0 = all-zero row)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    err = quantize_codes(x, safe, qmin, qmax).mul_(safe).sub_(x)
    return err.mul_(err).sum(dim=1)


def initial_scales(x: torch.Tensor, qmax: int) -> torch.Tensor:
    """Max-abs (RTN) scales, ``[rows, 1]``: the largest magnitude maps to ``qmax``. In float32
    (float64 for float64 ``x``); for a 16-bit ``x`` the max-abs is one of its values, so taking it
    before the conversion is exact and needs no float32 copy of ``x``."""
    amax = x.abs().amax(dim=1, keepdim=True)
    return amax.to(torch.promote_types(x.dtype, torch.float32)) / qmax


def adam_range_search(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    steps: int,
    lr: float,
    init_scale: torch.Tensor | None = None,
    trace: StepTrace | None = None,
    chunk_elements: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on each row's range; returns ``(best_scale [rows, 1], best_loss [rows])``.

    Rows are independent, so on the CPU they are searched in blocks of about ``chunk_elements``
    values (default 2^19 = 2 MiB of float32) that stay in cache over all steps: several times
    faster than streaming the whole tensor through memory at every step. See
    :func:`adam_range_search_block` for the algorithm. ``trace`` needs one block (no chunking).
    """
    if chunk_elements is None:
        chunk_elements = DEFAULT_CPU_CHUNK if x.device.type == "cpu" else x.numel()
    rows_per_chunk = max(1, chunk_elements // max(1, x.shape[1]))
    if trace is not None or rows_per_chunk >= x.shape[0]:
        return adam_range_search_block(x, qmin, qmax, steps, lr, init_scale, trace)
    s0 = initial_scales(x, qmax) if init_scale is None else init_scale.reshape(-1, 1).float()
    parts = [
        adam_range_search_block(
            x[i : i + rows_per_chunk], qmin, qmax, steps, lr, s0[i : i + rows_per_chunk]
        )
        for i in range(0, x.shape[0], rows_per_chunk)
    ]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def adam_range_search_block(
    x: torch.Tensor,
    qmin: int,
    qmax: int,
    steps: int,
    lr: float,
    init_scale: torch.Tensor | None = None,
    trace: StepTrace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam on each row's range; returns ``(best_scale [rows, 1], best_loss [rows])``.

    ``x`` is float32 ``[rows, n]`` with outliers zeroed. The range is parameterised relative to its
    start, ``s = s0 * r`` with ``r = 1`` initially, so ``lr`` is a relative step (see QuantConfig).
    The best range seen over steps 0..steps (step 0 = the start) is returned, per row. ``trace``,
    if given, is called as ``trace(step, s, loss)`` before each update and after the last one.
    """
    s0 = initial_scales(x, qmax) if init_scale is None else init_scale.reshape(-1, 1).float()
    active = s0 > 0
    s0 = torch.where(active, s0, torch.ones_like(s0))
    # Normalise the gradient to a dimensionless size so that Adam's eps means the same for any
    # weight scale and row length.
    grad_norm = 2.0 / (s0 * x.shape[1])
    r = torch.ones_like(s0)
    m = torch.zeros_like(s0)
    v = torch.zeros_like(s0)
    best_r = r.clone()
    best_loss = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    beta1, beta2 = ADAM_BETAS
    err = torch.empty_like(x)
    codes = torch.empty_like(x)
    for step in range(steps + 1):
        s = s0 * r
        torch.div(x, s, out=codes)
        codes.add_(0.5).floor_().clamp_(qmin, qmax)
        torch.mul(codes, s, out=err)
        err.sub_(x)
        loss = torch.linalg.vecdot(err, err)
        if trace is not None:
            trace(step, torch.where(active, s, torch.zeros_like(s)), loss)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_r = torch.where(better.unsqueeze(1), r, best_r)
        if step == steps:
            break
        grad = torch.linalg.vecdot(err, codes).unsqueeze(1) * grad_norm
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        m_hat = m / (1 - beta1 ** (step + 1))
        v_hat = v / (1 - beta2 ** (step + 1))
        r = (r - lr * m_hat / (v_hat.sqrt() + ADAM_EPS)).clamp_(min=MIN_RELATIVE_RANGE)
    best_scale = torch.where(active, s0 * best_r, torch.zeros_like(s0))
    return best_scale, torch.where(active.squeeze(1), best_loss, torch.zeros_like(best_loss))
