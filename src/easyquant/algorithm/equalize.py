"""Data-free equalization: scale each Linear's input columns by an estimate of that input's size.

Per-channel quantization weighs every input column of a weight the same, but the output error of
``y = W x`` weighs column ``j``'s error by ``E[x_j^2]``. Without data, the model's own weights
still say a lot about ``E[x_j^2]``:

- after an RMSNorm, ``x = gamma * x_hat`` with ``x_hat`` of unit scale, so ``rms(x_j) ~ |gamma_j|``
  (the inputs of q/k/v and gate/up);
- the input of ``o_proj`` is a mix of value vectors: ``rms ~ ||W_v[j, :] * gamma||`` for the value
  row ``j`` feeding it (unit-scale, independent ``x_hat`` components);
- the input of ``down_proj`` is ``silu(g_j) * u_j``: ``rms ~ ||W_up[j, :] * gamma|| *
  rms(silu(sigma_g z))`` with ``sigma_g = ||W_gate[j, :] * gamma||`` and ``z ~ N(0, 1)``.

Each estimate ``a`` becomes an exact rewrite of the full-precision model (AWQ's, with weights in
place of calibration activations): the consumer's columns are multiplied by ``a ** alpha`` and the
producer (the norm's gamma, the value rows, the up rows) divided by the same, which leaves every
output unchanged before quantization. The consumer is then quantized with columns that carry
their input's weight, so both the range search and the outlier rule see the error that matters.

Functions here work on tensors; :mod:`easyquant.models.equalize` applies them to a model.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# Scales are kept within this factor of their geometric mean: a dead channel (gamma ~ 0) must
# not blow up its consumer's column (and the fp16 range).
MAX_SPREAD = 1e3
HERMITE_POINTS = 64


def normalized_power(size: torch.Tensor, alpha: float) -> torch.Tensor:
    """``size ** alpha`` divided by its geometric mean, clamped to ``MAX_SPREAD`` either way.

    Dividing by the geometric mean keeps the rewritten weights at their usual magnitude; the
    quantization itself does not depend on the overall factor.
    """
    size = size.double().abs()
    positive = size[size > 0]
    floor = float(positive.max()) / MAX_SPREAD**2 if positive.numel() else 1.0
    log_size = size.clamp_min(floor).log() * alpha
    log_size = log_size - log_size.mean()
    bound = math.log(MAX_SPREAD)
    return log_size.clamp(-bound, bound).exp().float()


def silu_rms(sigma: torch.Tensor) -> torch.Tensor:
    """``sqrt(E[silu(sigma z)^2])`` for ``z ~ N(0, 1)``, elementwise (Gauss-Hermite quadrature)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(HERMITE_POINTS)
    z = torch.as_tensor(nodes, dtype=torch.float64, device=sigma.device)
    w = torch.as_tensor(weights / math.sqrt(2 * math.pi), dtype=torch.float64, device=sigma.device)
    x = sigma.double().unsqueeze(-1) * z
    return ((torch.nn.functional.silu(x) ** 2) * w).sum(-1).sqrt().to(sigma.dtype)


def scaled_row_norms(weight: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``||W[j, :] * gamma||`` per row: the output scale of ``W (gamma * x_hat)``."""
    return (weight.float() * gamma.float()).norm(dim=1)


def mlp_input_size(w_gate: torch.Tensor, w_up: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Estimated rms of ``silu(gate_j) * up_j``, the input of ``down_proj``, per ``j``."""
    return silu_rms(scaled_row_norms(w_gate, gamma)) * scaled_row_norms(w_up, gamma)
