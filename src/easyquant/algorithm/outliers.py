"""Outlier detection with the paper's n-sigma rule (Eq. 3).

The paper writes ``|W - mean(W)| >= n * var(W)``; the text around it (and every reimplementation)
means the standard deviation, so we use ``n * std(W)``. Statistics are taken over the whole tensor
(``scope="tensor"``, as in the paper) or per output row (``scope="channel"``).
"""

from __future__ import annotations

import torch


def outlier_mask(weight: torch.Tensor, sigma: float | None, scope: str = "tensor") -> torch.Tensor:
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
    else:
        raise ValueError(f"outlier_scope must be 'tensor' or 'channel', got {scope!r}")
    return ((w - mean).abs() >= sigma * std) & (std > 0)
