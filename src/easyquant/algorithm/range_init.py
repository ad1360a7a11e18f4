"""Data-free improvements around the range search: a coarse grid start and a least-squares finish.

Both work on rows of ``x`` (one quantization range each, outliers zeroed), like
:mod:`.range_search`, and are vectorised over rows.

- :func:`grid_init_scales`: the squared error of a row as a function of its range is piecewise
  smooth with many local minima; Adam from the max-abs range follows the gradient into the nearest
  one. Trying a coarse grid of clip ratios first and starting Adam from the best puts it in the
  right basin (at 3 bits the best clip is often 0.6-0.8 of max-abs, far from the start).
- :func:`least_squares_refine`: with the codes ``q`` fixed, the error ``||s q - x||^2`` is smallest
  at ``s = <x, q> / <q, q>``; re-rounding with that ``s`` can only lower it again (Lloyd's
  alternation), so each update is kept only where the error (after storage rounding) drops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from easyquant.algorithm.range_search import (
    initial_scales,
    quantize_codes,
    reconstruction_loss,
)


def grid_init_scales(
    x: torch.Tensor, qmin: int, qmax: int, points: int, low: float
) -> torch.Tensor:
    """Per-row scale ``[rows, 1]``: the best of ``points`` clip ratios in ``[low, 1]`` of max-abs.

    The max-abs range itself (ratio 1) is always one of the candidates; ties keep the larger ratio.
    """
    s0 = initial_scales(x, qmax)
    if points <= 1:
        return s0
    ratios = torch.linspace(1.0, low, points, dtype=torch.float32, device=x.device)
    best_loss = torch.full((x.shape[0],), float("inf"), dtype=torch.float32, device=x.device)
    best_ratio = torch.ones_like(s0)
    for ratio in ratios:
        loss = reconstruction_loss(x, s0 * ratio, qmin, qmax)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_ratio = torch.where(better.unsqueeze(1), ratio, best_ratio)
    return s0 * best_ratio


def least_squares_refine(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: int,
    qmax: int,
    steps: int,
    store: Callable[[torch.Tensor], torch.Tensor] = lambda s: s,
) -> torch.Tensor:
    """``steps`` rounds of ``s <- <x, q(s)> / <q(s), q(s)>`` per row, each kept where it helps.

    ``store`` rounds a candidate scale as it will be stored (e.g. to float16), so the error that
    decides is the error of the stored result. Rows with scale 0 (all-zero rows) stay at 0.
    """
    loss = reconstruction_loss(x, scale, qmin, qmax)
    for _ in range(steps):
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = quantize_codes(x, safe, qmin, qmax)
        qq = (q * q).sum(dim=1, keepdim=True)
        candidate = store((x * q).sum(dim=1, keepdim=True) / qq.clamp(min=1.0))
        ok = (qq > 0) & (candidate > 0) & (scale > 0)
        new_loss = reconstruction_loss(x, torch.where(ok, candidate, scale), qmin, qmax)
        better = ok.squeeze(1) & (new_loss < loss)
        if not bool(better.any()):
            break
        scale = torch.where(better.unsqueeze(1), candidate, scale)
        loss = torch.where(better, new_loss, loss)
    return scale
