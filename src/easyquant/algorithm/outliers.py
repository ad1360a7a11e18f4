"""Outlier detection with the paper's n-sigma rule (Eq. 3).

The paper writes ``|W - mean(W)| >= n * var(W)``; the text around it (and every reimplementation)
means the standard deviation, so we use ``n * std(W)``. Statistics are taken over the whole tensor
(``scope="tensor"``, as in the paper), per output row (``scope="channel"``), or per quantization
group (``scope="group"``: rows of ``group_size`` values; the whole row when ``group_size`` is None).
"""

from __future__ import annotations

import torch


def outlier_mask(
    weight: torch.Tensor, sigma: float | None, scope: str = "tensor", group_size: int | None = None
) -> torch.Tensor:
    """Boolean mask of the entries kept exactly (True = outlier). ``weight`` is 2-D.

    Rows (or tensors) with zero standard deviation have no outliers: a constant is never an outlier.
    """
    if sigma is None:
        return torch.zeros_like(weight, dtype=torch.bool)
    w = weight.float()
    if scope == "tensor":
        std, mean = torch.std_mean(w, correction=0)
    elif scope == "channel":
        std, mean = torch.std_mean(w, dim=1, keepdim=True, correction=0)
    elif scope == "group":
        groups = w.reshape(-1, group_size or w.shape[1])
        std, mean = torch.std_mean(groups, dim=1, keepdim=True, correction=0)
        return (((groups - mean).abs() >= sigma * std) & (std > 0)).reshape(w.shape)
    else:
        raise ValueError(f"outlier_scope must be 'tensor', 'channel' or 'group', got {scope!r}")
    return ((w - mean).abs() >= sigma * std) & (std > 0)
