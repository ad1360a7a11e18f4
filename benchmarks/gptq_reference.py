"""A faithful GPTQ (Frantar et al., 2022) for the quality benchmark: the data-dependent peer.

Not part of the library (easyquant is data-free); used only to compare against. The algorithm:
for each decoder layer in order, run the calibration windows through it (its inputs come from the
already quantized layers before it), accumulate ``H = 2/n * X^T X`` for each of its Linear weights,
then quantize each weight column by column, spreading every column's rounding error over the
columns not yet quantized with the inverse-Hessian Cholesky factor (lazy batch updates in blocks of
128 columns, dampening 1% of the mean diagonal, optional act-order with static groups).

Levels are the same symmetric signed grid and max-abs scales as easyquant's RTN (int4: [-8, 7],
one float16 scale per channel or group), so GPTQ differs from RTN only in how codes are chosen and
the storage costs the same bits.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GPTQConfig:
    bits: int = 4
    group_size: int | None = None
    damp: float = 0.01
    block: int = 128
    act_order: bool = True

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1


def maxabs_scales(weight: torch.Tensor, config: GPTQConfig) -> torch.Tensor:
    """Per-channel ``[out, 1]`` or per-group ``[out, groups]`` max-abs scales (float16-rounded)."""
    out_f, in_f = weight.shape
    group = config.group_size or in_f
    pad = -in_f % group  # a last, shorter group when group does not divide in_f (576 = 4.5 * 128)
    padded = torch.nn.functional.pad(weight, (0, pad))
    scale = padded.reshape(out_f, -1, group).abs().amax(dim=2) / config.qmax
    scale = scale.half().float()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, config: GPTQConfig) -> torch.Tensor:
    """GPTQ of one weight ``[out, in]`` given ``H [in, in]``; returns the dequantized weight."""
    w = weight.float().clone()
    in_f = w.shape[1]
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    # Static groups: scales come from the original weight, so act-order cannot split a group's
    # scale across reorderings (the same choice as GPTQ's static_groups option).
    scales = maxabs_scales(w, config)
    group = config.group_size or in_f
    column_scale = scales.repeat_interleave(group, dim=1)[:, :in_f]  # [out, in]
    if config.act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(in_f, device=w.device)
    w, h, column_scale = w[:, perm], h[perm][:, perm], column_scale[:, perm]
    h += torch.eye(in_f, device=h.device) * (config.damp * torch.mean(torch.diag(h)))
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    h_inv = torch.linalg.cholesky(h_inv, upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, in_f, config.block):
        i2 = min(i1 + config.block, in_f)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        h_inv1 = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            s = column_scale[:, i1 + i]
            qcol = torch.clamp(torch.floor(col / s + 0.5), config.qmin, config.qmax) * s
            q[:, i1 + i] = qcol
            err = (col - qcol) / h_inv1[i, i]
            w1[:, i:] -= err.unsqueeze(1) * h_inv1[i, i:].unsqueeze(0)
            err1[:, i] = err
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    return q[:, torch.argsort(perm)].to(weight.dtype)


class HessianHook:
    """Accumulates ``H = 2/n * sum x x^T`` over the inputs of one Linear."""

    def __init__(self, in_features: int) -> None:
        self.in_features = in_features
        self.h: torch.Tensor | None = None  # allocated on the inputs' device
        self.n = 0

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output) -> None:  # type: ignore[no-untyped-def]
        x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
        if self.h is None:
            self.h = torch.zeros(
                self.in_features, self.in_features, dtype=torch.float64, device=x.device
            )
        count = x.shape[0]
        self.h *= self.n / (self.n + count)
        self.n += count
        x = x * (2.0 / self.n) ** 0.5
        self.h += x.T @ x


class StopForward(Exception):
    pass


def first_layer_inputs(model: nn.Module, windows: list[torch.Tensor]):  # type: ignore[no-untyped-def]
    """Hidden states and keyword arguments (masks, rotary embeddings) entering decoder layer 0."""
    layers = model.model.layers
    captured: list[tuple[torch.Tensor, dict]] = []

    def grab(module, args, kwargs):  # type: ignore[no-untyped-def]
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append(
            (hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"})
        )
        raise StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(window.unsqueeze(0).to(model.device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def gptq_model_inplace(
    model: nn.Module, windows: list[torch.Tensor], config: GPTQConfig, log=print
) -> dict[str, float]:
    """Replace every decoder Linear weight of a Llama-style model by its GPTQ reconstruction.

    Returns seconds spent (calibration forward passes and the GPTQ solves together).
    """
    start = time.perf_counter()
    captured = first_layer_inputs(model, windows)
    for index, layer in enumerate(model.model.layers):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        hooks = {n: HessianHook(m.in_features) for n, m in linears.items()}
        handles = [m.register_forward_hook(hooks[n]) for n, m in linears.items()]
        try:
            for hidden, kwargs in captured:
                run_layer(layer, hidden, kwargs)
        finally:
            for handle in handles:
                handle.remove()
        for name, linear in linears.items():
            q = gptq_quantize(linear.weight.data, hooks[name].h.float(), config)
            linear.weight.data.copy_(q)
        # Inputs of the next layer come from this layer, quantized.
        captured = [(run_layer(layer, hidden, kwargs), kwargs) for hidden, kwargs in captured]
        if log and (index % 10 == 9):
            log(f"  GPTQ: {index + 1} layers done ({time.perf_counter() - start:.0f} s)")
    return {"seconds": time.perf_counter() - start}


def gptq_bits_per_weight(out_f: int, in_f: int, bits: int, group_size: int | None) -> float:
    """Codes plus one float16 scale per channel or group (no outliers): same as easyquant's RTN
    minus its (empty) outlier row offsets, which GPTQ would not store."""
    groups = -(-in_f // (group_size or in_f))  # a shorter last group counts as one
    return bits + 16 * groups / in_f
