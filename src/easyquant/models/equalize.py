"""Apply :mod:`easyquant.algorithm.equalize` to a Llama-style model, in place, before quantizing.

Each rewrite is exact in full precision (outputs change only by float rounding):

- ``norm``: q/k/v (and gate/up) columns times ``s``, the RMSNorm before them divided by ``s``,
  ``s = |gamma| ** alpha`` (normalised);
- ``value``: ``o_proj`` columns times ``a``, the value rows (and bias) feeding them divided by
  ``a`` (attention mixes value vectors linearly; with grouped-query attention one value row feeds
  one column per query head of its group, all with the same ``a``);
- ``mlp``: ``down_proj`` columns times ``b``, ``up_proj`` rows (and bias) divided by ``b``
  (``silu(gate) * up`` is linear in ``up``).

The model keeps its architecture and config; only weights change. Modules are found by the
names Llama, Mistral, Qwen2/3 and SmolLM use (``model.layers[i].self_attn.q_proj`` ...); a
layer missing any of them is left alone (and counted in the returned summary).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from easyquant.algorithm.equalize import mlp_input_size, normalized_power, scaled_row_norms


@dataclass(frozen=True)
class EqualizeConfig:
    """Strengths (exponents) of the three rewrites; 0 turns one off."""

    norm_alpha: float = 0.0
    value_alpha: float = 0.0
    mlp_alpha: float = 0.0

    def __post_init__(self) -> None:
        for name in ("norm_alpha", "value_alpha", "mlp_alpha"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not -1.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [-1, 1], got {value!r}")

    @property
    def active(self) -> bool:
        return bool(self.norm_alpha or self.value_alpha or self.mlp_alpha)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no decoder layers (model.layers) to equalize")
    return list(layers)


def scale_columns(linear: nn.Linear, scale: torch.Tensor) -> None:
    linear.weight.data.mul_(scale.to(linear.weight.dtype).unsqueeze(0))


def divide_rows(linear: nn.Linear, scale: torch.Tensor) -> None:
    linear.weight.data.div_(scale.to(linear.weight.dtype).unsqueeze(1))
    if linear.bias is not None:
        linear.bias.data.div_(scale.to(linear.bias.dtype))


def value_to_output_index(num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """For each ``o_proj`` input column, the value row feeding it (grouped-query attention)."""
    column = torch.arange(num_heads * head_dim)
    head, dim = column // head_dim, column % head_dim
    return (head // (num_heads // num_kv_heads)) * head_dim + dim


@torch.no_grad()
def equalize_model(model: nn.Module, config: EqualizeConfig) -> dict[str, int]:
    """Rewrite ``model``'s weights in place as ``config`` says; returns counts of what changed."""
    changed = {"norm": 0, "value": 0, "mlp": 0, "skipped_layers": 0}
    if not config.active:
        return changed
    model_config = getattr(model, "config", None)
    for layer in decoder_layers(model):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        norm1 = getattr(layer, "input_layernorm", None)
        norm2 = getattr(layer, "post_attention_layernorm", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or norm1 is None or norm2 is None:
            changed["skipped_layers"] += 1
            continue
        if not all(isinstance(getattr(attn, n, None), nn.Linear) for n in names) or not all(
            isinstance(getattr(mlp, n, None), nn.Linear)
            for n in ("gate_proj", "up_proj", "down_proj")
        ):
            changed["skipped_layers"] += 1
            continue
        gamma1, gamma2 = norm1.weight.data.float(), norm2.weight.data.float()
        if config.value_alpha:
            head_dim = getattr(attn, "head_dim", None) or model_config.head_dim
            num_heads = attn.o_proj.in_features // head_dim
            num_kv = attn.v_proj.out_features // head_dim
            a = normalized_power(scaled_row_norms(attn.v_proj.weight, gamma1), config.value_alpha)
            divide_rows(attn.v_proj, a)
            index = value_to_output_index(num_heads, num_kv, head_dim).to(a.device)
            scale_columns(attn.o_proj, a[index])
            changed["value"] += 1
        if config.mlp_alpha:
            b = normalized_power(
                mlp_input_size(mlp.gate_proj.weight, mlp.up_proj.weight, gamma2), config.mlp_alpha
            )
            divide_rows(mlp.up_proj, b)
            scale_columns(mlp.down_proj, b)
            changed["mlp"] += 1
        if config.norm_alpha:
            for norm, consumers in (
                (norm1, (attn.q_proj, attn.k_proj, attn.v_proj)),
                (norm2, (mlp.gate_proj, mlp.up_proj)),
            ):
                s = normalized_power(norm.weight.data.float(), config.norm_alpha)
                for linear in consumers:
                    scale_columns(linear, s)
                norm.weight.data.div_(s.to(norm.weight.dtype))
            changed["norm"] += 1
    return changed
