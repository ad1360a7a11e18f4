"""``QuantLinear``: a drop-in replacement for ``nn.Linear`` holding a :class:`QuantizedWeight`.

The stored tensors are buffers, so ``.to(device)``, ``state_dict()`` and ``load_state_dict()`` work
as for any module; their names (``qweight``, ``scales``, ``outlier_*``, ``meta``) are the checkpoint
names. The reference forward is ``x @ dequantize(x.dtype).T + bias`` and runs on any device; fused
kernels are chosen by :meth:`set_backend` ("auto" picks them on CUDA when available).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from easyquant.config import QuantConfig
from easyquant.format.qweight import STATE_KEYS, QuantizedWeight, dequantize_parts

LINEAR_BACKENDS = ("auto", "torch", "triton")


class QuantLinear(nn.Module):
    backends: ClassVar[tuple[str, ...]] = LINEAR_BACKENDS

    qweight: torch.Tensor
    scales: torch.Tensor
    outlier_indptr: torch.Tensor
    outlier_indices: torch.Tensor
    outlier_values: torch.Tensor
    meta: torch.Tensor

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.bits = qweight.bits
        self.group_size = qweight.group_size
        self.weight_dtype = qweight.dtype
        for key, tensor in qweight.state_dict().items():
            self.register_buffer(key, tensor)
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(
                    f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)"
                )
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.backend = "auto"
        # Decided once here, not per call: forward stays free of imports for torch.compile.
        self.fused_supported = kernel_supports(self.bits, self.group_size, self.in_features)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, config: QuantConfig | None = None, **quantize_kwargs: object
    ) -> QuantLinear:
        from easyquant.quantize import quantize_tensor

        qweight = quantize_tensor(linear.weight.detach(), config, **quantize_kwargs)  # type: ignore[arg-type]
        return cls(qweight, linear.bias.detach() if linear.bias is not None else None)

    @property
    def quantized(self) -> QuantizedWeight:
        """The stored weight as a :class:`QuantizedWeight` (validated)."""
        return QuantizedWeight.from_state_dict({k: getattr(self, k) for k in STATE_KEYS})

    def set_backend(self, backend: str) -> QuantLinear:
        if backend not in self.backends:
            raise ValueError(f"backend must be one of {self.backends}, got {backend!r}")
        self.backend = backend
        return self

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_parts(
            self.qweight,
            self.scales,
            self.outlier_indptr,
            self.outlier_indices,
            self.outlier_values,
            self.bits,
            self.in_features,
            dtype or self.weight_dtype,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._use_triton(x):
            from easyquant.kernels.triton_matmul import quant_linear_forward

            return quant_linear_forward(self, x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantize(x.dtype), bias)

    def _use_triton(self, x: torch.Tensor) -> bool:
        """The fused kernels where they apply: "triton" forces them (on any device: on the CPU
        they need TRITON_INTERPRET=1), "auto" takes them on CUDA. Layers they do not cover (bit
        width, group size; see ``kernel_supports``) always run the torch reference path."""
        if self.backend == "torch" or not self.fused_supported:
            return False
        if self.backend == "triton":
            return True
        return x.is_cuda

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, outliers={self.outlier_values.numel()}, "
            f"bias={self.bias is not None}, backend={self.backend}"
        )


def kernel_supports(bits: int, group_size: int | None, in_features: int) -> bool:
    """Do the fused kernels cover this layout (and is Triton importable)?"""
    try:
        from easyquant.kernels.triton_matmul import supports
    except ImportError:
        return False
    return supports(bits, group_size, in_features)


def set_quant_backend(model: nn.Module, backend: str) -> int:
    """``set_backend(backend)`` on every :class:`QuantLinear` inside ``model``; returns how many."""
    if backend not in LINEAR_BACKENDS:
        raise ValueError(f"backend must be one of {LINEAR_BACKENDS}, got {backend!r}")
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    for layer in layers:
        layer.set_backend(backend)
    return len(layers)
