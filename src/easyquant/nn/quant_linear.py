"""``QuantLinear``: a drop-in replacement for ``nn.Linear`` holding a :class:`QuantizedWeight`.

The stored tensors are buffers, so ``.to(device)``, ``state_dict()`` and ``load_state_dict()`` work
as for any module; their names (``qweight``, ``scales``, ``outlier_*``, ``meta``) are the checkpoint
names. The outliers' positions are also kept as CSR (``outlier_indptr``, ``outlier_indices``:
non-persistent buffers decoded from the stored counts and columns), which ``dequantize`` and the
kernels read. The reference forward is ``x @ dequantize(x.dtype).T + bias`` and runs on any
device; fused kernels are chosen by :meth:`set_backend` ("auto" picks them on CUDA when
available).

For the fused kernels each layer also keeps a copy of its outliers in the kernels' layout (fixed
slots per row plus a CSR overflow: ``easyquant.kernels.triton_matmul.build_outlier_table``), built
at construction and again after ``load_state_dict``, and split K's tile counters
(``split_locks``, zeros between calls). These buffers are not persistent: the checkpoint holds
only the CSR form.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from easyquant.config import QuantConfig
from easyquant.format import outlier_store
from easyquant.format.qweight import QuantizedWeight, dequantize_parts, outlier_floats

LINEAR_BACKENDS = ("auto", "torch", "triton")
# Non-persistent: the outliers' positions as CSR, decoded from outlier_counts/outlier_columns.
CSR_KEYS = ("outlier_indptr", "outlier_indices")
# Non-persistent buffers: the kernels' copy of the outliers (see build_outlier_table).
TABLE_KEYS = (
    "slot_cols",
    "slot_vals",
    "slot_count",
    "overflow_indptr",
    "overflow_cols",
    "overflow_vals",
)
# Non-persistent too: split K's tile counters for the fused kernels (see split_locks).
LOCKS_KEY = "split_locks"


class QuantLinear(nn.Module):
    backends: ClassVar[tuple[str, ...]] = LINEAR_BACKENDS

    qweight: torch.Tensor
    scales: torch.Tensor
    outlier_counts: torch.Tensor
    outlier_columns: torch.Tensor
    outlier_values: torch.Tensor
    meta: torch.Tensor
    outlier_indptr: torch.Tensor
    outlier_indices: torch.Tensor

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.bits = qweight.bits
        self.group_size = qweight.group_size
        self.weight_dtype = qweight.dtype
        for key, tensor in qweight.state_dict().items():
            self.register_buffer(key, tensor)
        self._keep_csr(qweight.outlier_indptr, qweight.outlier_indices)
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
        # The fused kernels' plans by input signature (easyquant.kernels.triton_matmul.LayerPlans,
        # made on the first eager call; they check kernel_tensors() before each use).
        self.kernel_plans: object | None = None
        self.build_outlier_table()
        self.register_load_state_dict_post_hook(_rebuild_outlier_table)

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
        return QuantizedWeight(
            qweight=self.qweight,
            scales=self.scales,
            outlier_indptr=self.outlier_indptr,
            outlier_indices=self.outlier_indices,
            outlier_values=self.outlier_values,
            shape=(self.out_features, self.in_features),
            bits=self.bits,
            group_size=self.group_size,
            dtype=self.weight_dtype,
        )

    def decode_outliers(self) -> None:
        """(Re)build the CSR buffers from the stored counts and columns (after a load)."""
        self._keep_csr(
            *outlier_store.decode(self.outlier_counts, self.outlier_columns, self.in_features)
        )

    def _keep_csr(self, indptr: torch.Tensor, indices: torch.Tensor) -> None:
        for key, tensor in zip(CSR_KEYS, (indptr, indices), strict=True):
            self.register_buffer(key, tensor, persistent=False)

    def build_outlier_table(self, slots: int | None = None) -> None:
        """(Re)build the kernels' copy of the outliers from the CSR buffers (``slots``: fixed
        slots per row; None picks them from the rows' outlier counts), and zeroed split-K
        counters. Layers the fused kernels do not run, and layers still on the meta device, keep
        neither."""
        if not self.fused_supported or self.outlier_indptr.is_meta:
            for key in (*TABLE_KEYS, LOCKS_KEY):
                self._buffers.pop(key, None)
            return
        from easyquant.kernels.triton_matmul import build_outlier_table, split_locks

        table = build_outlier_table(
            self.outlier_indptr, self.outlier_indices, self.kernel_outlier_values(), slots
        )
        for key, tensor in zip(TABLE_KEYS, table.tensors(), strict=True):
            self.register_buffer(key, tensor, persistent=False)
        locks = split_locks(self.out_features, self.outlier_indptr.device)
        self.register_buffer(LOCKS_KEY, locks, persistent=False)

    def kernel_outlier_values(self) -> torch.Tensor:
        """The outlier values the kernels read: as stored, or int8 codes decoded in the scales'
        dtype (see ``outlier_floats``)."""
        if self.outlier_values.dtype != torch.int8:
            return self.outlier_values
        rows = outlier_store.csr_rows(self.outlier_indptr)
        cols = self.outlier_indices.long()
        values = outlier_floats(self.outlier_values, self.scales, rows, cols, self.group_size)
        return values.to(self.scales.dtype)

    def outlier_table(self) -> tuple[torch.Tensor, ...]:
        """The kernel-side outlier tensors, in ``TABLE_KEYS`` order."""
        return tuple(getattr(self, key) for key in TABLE_KEYS)

    def __getstate__(self) -> dict:
        # the plans hold compiled kernels and closures (not picklable): a copy makes its own
        state = self.__dict__.copy()
        state["kernel_plans"] = None
        return state

    def kernel_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """The tensors the kernels read (buffers, then the bias), compared by identity with
        those a cached plan was built on."""
        return (*self._buffers.values(), self._parameters.get("bias"))

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
            self.group_size,
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


def _rebuild_outlier_table(module: nn.Module, incompatible_keys: object) -> None:
    # A load that failed part-way (torch raises its size-mismatch error after the hooks) can
    # leave the stored tensors inconsistent: then there is nothing to rebuild from.
    if isinstance(module, QuantLinear) and not module.outlier_counts.is_meta:
        try:
            module.decode_outliers()
        except ValueError:
            return
        if module.outlier_indices.numel() == module.outlier_values.numel():
            module.build_outlier_table()


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


# ---- layers that share an input, run as one ------------------------------------------------------
def concat_layers(layers: Sequence[QuantLinear]) -> QuantLinear:
    """One :class:`QuantLinear` whose output is the outputs of ``layers`` side by side (rows
    concatenated: codes, scales, CSR outliers with shifted offsets, biases). The layers must share
    in_features, bits, group size and tensor dtypes; a missing bias counts as zeros."""
    first = layers[0]
    for layer in layers[1:]:
        same = (layer.in_features, layer.bits, layer.group_size, layer.weight_dtype)
        if same != (first.in_features, first.bits, first.group_size, first.weight_dtype):
            raise ValueError("layers to concatenate differ in in_features, bits, group or dtype")
    indptrs, offset = [first.outlier_indptr[:1]], 0
    for layer in layers:
        indptrs.append(layer.outlier_indptr[1:] + offset)
        offset += layer.outlier_values.numel()
    # int8 codes concatenate as they are (each keeps its row's scale); mixed with float values,
    # every layer's values as float32 (a float joined to int8 codes would pass for a code)
    values = [layer.outlier_values for layer in layers]
    if len({v.dtype for v in values}) > 1:
        values = [layer.kernel_outlier_values().float() for layer in layers]
    qweight = QuantizedWeight(
        qweight=torch.cat([layer.qweight for layer in layers]),
        scales=torch.cat([layer.scales for layer in layers]),
        outlier_indptr=torch.cat(indptrs),
        outlier_indices=torch.cat([layer.outlier_indices for layer in layers]),
        outlier_values=torch.cat(values),
        shape=(sum(layer.out_features for layer in layers), first.in_features),
        bits=first.bits,
        group_size=first.group_size,
        dtype=first.weight_dtype,
    )
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat(
            [
                layer.bias.detach()
                if layer.bias is not None
                else layer.scales.new_zeros(layer.out_features, dtype=torch.float32)
                for layer in layers
            ]
        )
    return QuantLinear(qweight, bias).set_backend(first.backend)


class _FusedGroup(nn.Module):
    """The concatenated layer, and the last input it ran on (identity and version)."""

    def __init__(self, layers: Sequence[QuantLinear]) -> None:
        super().__init__()
        self.fused = concat_layers(layers)
        self.sizes = [layer.out_features for layer in layers]
        self._last: tuple[torch.Tensor, int, tuple[torch.Tensor, ...]] | None = None

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        last = self._last
        if last is None or last[0] is not x or last[1] != x._version:
            parts = self.fused(x).split(self.sizes, dim=-1)
            last = self._last = (x, x._version, parts)
        return last[2]


class FusedSlice(nn.Module):
    """Stands in for one layer of a fused group: the first of the group called on an input runs
    the concatenated layer once; the others called on the same (unchanged) tensor take their slice
    of that output (eager mode and CUDA graphs; under torch.compile see
    :mod:`easyquant.nn.compile_fusion`)."""

    def __init__(self, group: _FusedGroup, index: int) -> None:
        super().__init__()
        self.group = [group]  # a list: the group is owned by the parent, not by each slice
        self.index = index
        self.in_features = group.fused.in_features
        self.out_features = group.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group[0]
        if torch.compiler.is_compiling():
            # the output cache is not traceable: each slice calls the concatenated layer, and
            # the identical calls are merged by easyquant.nn.compile_fusion's Inductor pass
            return group.fused(x).split(group.sizes, dim=-1)[self.index]
        return group.outputs(x)[self.index]

    def extra_repr(self) -> str:
        return f"slice {self.index} of {self.group[0].fused.extra_repr()}"


def fuse_siblings(parent: nn.Module, names: Sequence[str]) -> bool:
    """Replace ``parent.<name>`` for each name (QuantLinear layers that the parent calls on the
    same input, such as q/k/v or gate/up projections) by slices of one concatenated layer.
    Returns False, changing nothing, where they are not all compatible QuantLinear layers."""
    layers = [getattr(parent, name, None) for name in names]
    if not all(isinstance(layer, QuantLinear) for layer in layers):
        return False
    try:
        group = _FusedGroup(layers)  # type: ignore[arg-type]
    except ValueError:
        return False
    # registered once on the parent, so .to() and state_dict see one copy (the state dict of a
    # fused model is not a checkpoint's: save before fusing)
    parent.add_module("fused_" + "_".join(names), group)
    for index, name in enumerate(names):
        setattr(parent, name, FusedSlice(group, index))
    if group.fused.fused_supported:
        from easyquant.nn.compile_fusion import install_merge_pass

        install_merge_pass()
    return True
