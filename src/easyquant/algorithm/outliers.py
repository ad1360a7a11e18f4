"""Outlier detection with the paper's n-sigma rule (Eq. 3).

The paper writes ``|W - mean(W)| >= n * var(W)``; the text around it (and every reimplementation)
means the standard deviation, so we use ``n * std(W)``. Statistics are taken over the whole tensor
(``scope="tensor"``, as in the paper), per output row (``scope="channel"``), or per quantization
group (``scope="group"``: rows of ``group_size`` values; the whole row when ``group_size`` is None).
"""

from __future__ import annotations

import torch

from easyquant.algorithm.chunking import weight_row_slices
from easyquant.algorithm.range_search import as_ranges
from easyquant.config import OUTLIER_SCOPES


def outlier_mask(
    weight: torch.Tensor, sigma: float | None, scope: str = "tensor", group_size: int | None = None
) -> torch.Tensor:
    """Boolean mask of the entries kept exactly (True = outlier). ``weight`` is 2-D.

    Rows (or tensors) with zero standard deviation have no outliers: a constant is never an outlier.
    The statistics are taken on a float32 copy of the whole weight (freed before the rest); the
    comparison runs a chunk of rows at a time, so nothing else of the weight's size is allocated
    but the mask.
    """
    if sigma is None:
        return torch.zeros_like(weight, dtype=torch.bool)
    if scope not in OUTLIER_SCOPES:
        raise ValueError(f"outlier_scope must be 'tensor', 'channel' or 'group', got {scope!r}")
    out_f, in_f = weight.shape
    group = (group_size or in_f) if scope == "group" else in_f
    if in_f % group:
        return ragged_group_mask(weight, sigma, group)
    w = weight.float()  # the weight itself when it is float32
    if scope == "tensor":
        std, mean = torch.std_mean(w, correction=0)
    else:  # per row of `group` values (channel: the whole row)
        std, mean = torch.std_mean(w.reshape(-1, group), dim=1, keepdim=True, correction=0)
    del w
    threshold = sigma * std
    varies = std > 0
    mask = torch.empty(out_f, in_f, dtype=torch.bool, device=weight.device)
    per_row = in_f // group  # statistics rows per weight row (scopes other than "tensor")
    for rows in weight_row_slices(weight):
        x = weight[rows].float().reshape(-1, group)
        if scope == "tensor":
            m, t, v = mean, threshold, varies
        else:
            stats = slice(rows.start * per_row, rows.stop * per_row)
            m, t, v = mean[stats], threshold[stats], varies[stats]
        d = (x - m).abs_()
        del x
        mask[rows] = ((d >= t) & v).reshape(-1, in_f)
    return mask


def ragged_group_mask(weight: torch.Tensor, sigma: float, group: int) -> torch.Tensor:
    """``scope="group"`` when ``group`` does not divide the row: the last, shorter group of each
    row takes its statistics over its own values only (NaN padding, ignored by the means)."""
    out_f, in_f = weight.shape
    x = as_ranges(weight.float(), group, fill=float("nan"))
    mean = x.nanmean(dim=1, keepdim=True)
    std = (x - mean).pow_(2).nanmean(dim=1, keepdim=True).sqrt_()
    # NaN compares False: the padding is never an outlier.
    mask = ((x - mean).abs_() >= sigma * std) & (std > 0)
    return mask.reshape(out_f, -1)[:, :in_f].contiguous()


def zeroed_float(weight: torch.Tensor, outliers: torch.Tensor) -> torch.Tensor:
    """A float32 copy of ``weight`` with its outliers zeroed: the values the ranges are searched
    on. Zeroed in place where ``.float()`` made a copy; a float32 weight is not changed."""
    w = weight.float()
    return (w.masked_fill_ if w is not weight else w.masked_fill)(outliers, 0.0)
