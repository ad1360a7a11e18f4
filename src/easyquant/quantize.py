"""``quantize_tensor``: EasyQuant (Algorithm 1) for one weight matrix.

1. outliers by the n-sigma rule, kept exactly; 2. each range (channel or group) searched with Adam
on the analytic gradient over the non-outliers; 3. codes on the symmetric signed grid, packed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from easyquant.algorithm import range_search
from easyquant.algorithm.chunking import row_slices, rows_per_chunk, weight_row_slices
from easyquant.algorithm.outliers import outlier_mask, zeroed_float
from easyquant.algorithm.range_init import grid_init_scales, least_squares_refine
from easyquant.algorithm.range_search import (
    StepTrace,
    adam_range_search,
    as_ranges,
    initial_scales,
    quantize_codes,
    reconstruction_loss,
)
from easyquant.config import INIT_GRID_LOW, QuantConfig
from easyquant.format.bitpack import pack_codes, packed_length, unpack_codes
from easyquant.format.qweight import FLOAT_DTYPES, QuantizedWeight, assemble, index_dtype

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")


def check_weight(weight: torch.Tensor, config: QuantConfig, name: str = "weight") -> None:
    """Refuse what cannot be quantized, with a message that says where and why."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {weight.dtype}; supported: float16, bfloat16, float32")
    if weight.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(weight.shape)})")
    # A chunk of rows at a time (no mask of the whole weight), one synchronisation in all.
    finite = [torch.isfinite(weight[rows]).all() for rows in weight_row_slices(weight)]
    if not bool(torch.stack(finite).all()):
        bad = ~torch.isfinite(weight)
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} has {int(bad.sum())} NaN/Inf value(s), the first at row {row}, column {col}"
        )


def storage_round(scale: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """Round scales to the dtype they are stored in (the codes are then computed with these)."""
    return scale.to(getattr(torch, dtype_name)).float()


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    return backend


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def search_scales(
    rows: torch.Tensor, config: QuantConfig, backend: str, trace: StepTrace | None
) -> torch.Tensor:
    """Best per-row scales ``[rows, 1]`` (float32, before storage rounding)."""
    if config.method == "rtn":
        return initial_scales(rows, config.qmax)
    init = None
    if config.init_grid:
        init = grid_init_scales(rows, config.qmin, config.qmax, config.init_grid, INIT_GRID_LOW)
    if backend == "triton":
        from easyquant.kernels.triton_range_search import triton_range_search

        if init is None:  # the paper's start: the kernel's own max-abs
            return triton_range_search(rows, config.qmin, config.qmax, config.steps, config.lr)
        return triton_range_search(
            rows, config.qmin, config.qmax, config.steps, config.lr, init_scale=init
        )
    scale, _ = adam_range_search(
        rows, config.qmin, config.qmax, config.steps, config.lr, init_scale=init, trace=trace
    )
    return scale


def stored_search_scales(
    normals: torch.Tensor, config: QuantConfig, backend: str, trace: StepTrace | None = None
) -> torch.Tensor:
    """Ranges ``[rows, 1]`` of ``normals`` (outliers zeroed) as stored: the search, rounded to
    the scale dtype, then the optional least-squares refinement (before the RTN candidate)."""
    scale = storage_round(search_scales(normals, config, backend, trace), config.scale_dtype)
    if config.method == "easyquant" and config.refine_steps:
        scale = least_squares_refine(
            normals,
            scale,
            config.qmin,
            config.qmax,
            config.refine_steps,
            store=lambda s: storage_round(s, config.scale_dtype),
        )
    return scale


def stored_ranges(
    ranges: torch.Tensor,
    normals: torch.Tensor,
    config: QuantConfig,
    backend: str,
    trace: StepTrace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ranges ``[rows, 1]`` quantize_tensor stores for ``ranges`` (rows of one range each,
    outliers included, any float dtype) and ``normals`` (the same rows as float32, outliers
    zeroed), and each range's ``||Q[x] - x||^2`` over its non-outliers.

    For EasyQuant the max-abs range of the whole row (outliers included, i.e. plain RTN's) is a
    candidate too: a searched range is then never worse than RTN on the values it quantizes."""
    lo, hi = config.qmin, config.qmax
    scale = stored_search_scales(normals, config, backend, trace)
    loss = reconstruction_loss(normals, scale, lo, hi)
    if config.method == "easyquant":
        # the max-abs is exact in any dtype: no float32 copy of the rows for it
        rtn = storage_round(initial_scales(ranges, hi), config.scale_dtype)
        rtn_loss = reconstruction_loss(normals, rtn, lo, hi)
        keep_rtn = rtn_loss < loss
        scale = torch.where(keep_rtn.unsqueeze(1), rtn, scale)
        loss = torch.where(keep_rtn, rtn_loss, loss)
    return scale, loss


def quantize_tensor(
    weight: torch.Tensor,
    config: QuantConfig | None = None,
    backend: Backend = "auto",
    trace: StepTrace | None = None,
) -> QuantizedWeight:
    """Quantize a 2-D weight ``[out, in]`` as ``config`` says; returns its stored form.

    ``backend`` picks the range search: "torch" (reference, any device), "triton" (fused kernel),
    "auto" (triton on CUDA when installed, else torch). ``trace(step, s, loss)`` observes the
    torch search (for analyses; ranges are per row of ``[out * groups]``).
    """
    config = config or QuantConfig()
    check_weight(weight, config)
    return quantize_checked(weight, config, backend, trace)


def quantize_checked(
    weight: torch.Tensor,
    config: QuantConfig,
    backend: Backend = "auto",
    trace: StepTrace | None = None,
) -> QuantizedWeight:
    """:func:`quantize_tensor` for a weight that already passed :func:`check_weight` (the
    check reads the whole weight once; callers that check with their own name skip a second)."""
    backend = resolve_backend(backend, weight.device)
    if config.group_size is not None and weight.shape[1] % config.group_size:
        return quantize_ragged(weight, config, backend, trace)
    if backend == "triton" and trace is None:
        # The fused pipeline (search, storage rounding, RTN candidate, codes, packing as Triton
        # kernels) stores exactly what quantize_tensor_stepwise does with the Triton search.
        from easyquant.kernels.triton_range_pipeline import quantize_tensor_triton

        return quantize_tensor_triton(weight, config)
    return quantize_tensor_stepwise(weight, config, backend, trace)


def quantize_ragged(
    weight: torch.Tensor, config: QuantConfig, backend: str, trace: StepTrace | None
) -> QuantizedWeight:
    """Groups that do not divide the row: the last group of each row is shorter.

    Outliers are found on the weight as it is; then each row is padded with zeros to whole
    groups and quantized as usual. A zero is not an outlier, quantizes to code 0 exactly and
    adds nothing to any range's error, gradient or max-abs, so every range is searched on its
    own values only; the padding's codes are then dropped.
    """
    out_f, in_f = weight.shape
    group = config.group_size
    outliers = outlier_mask(weight, config.outlier_sigma, config.outlier_scope, group)
    padded = as_ranges(weight, group).reshape(out_f, -1)
    padded_outliers = as_ranges(outliers, group).reshape(out_f, -1)
    del outliers
    if backend == "triton" and trace is None:
        from easyquant.kernels.triton_range_pipeline import quantize_tensor_triton

        whole = quantize_tensor_triton(padded, config, outliers=padded_outliers)
    else:
        whole = quantize_tensor_stepwise(padded, config, backend, trace, outliers=padded_outliers)
    del padded, padded_outliers
    codes = unpack_codes(whole.qweight, config.bits, whole.shape[1])[:, :in_f]
    return QuantizedWeight(
        qweight=pack_codes(codes.contiguous(), config.bits),
        scales=whole.scales,
        outlier_indptr=whole.outlier_indptr,
        outlier_indices=whole.outlier_indices.to(index_dtype(in_f)),
        outlier_values=whole.outlier_values,
        shape=(out_f, in_f),
        bits=config.bits,
        group_size=config.group_size,
        dtype=weight.dtype,
    )


def quantize_tensor_stepwise(
    weight: torch.Tensor,
    config: QuantConfig,
    backend: str,
    trace: StepTrace | None = None,
    outliers: torch.Tensor | None = None,
) -> QuantizedWeight:
    """The reference pipeline, step by step in torch; only the range search uses ``backend``
    ("torch" or "triton"). ``weight`` must have passed :func:`check_weight`.

    After the outliers, everything is per row: on the CPU with the torch search (and no
    ``trace``) the rows are quantized a chunk at a time (:func:`stepwise_chunk_rows`), so the
    temporaries are a chunk's, not the weight's; the stored result is the same bit for bit.
    ``outliers``: a mask found beforehand (else the config's n-sigma rule on ``weight``).
    """
    out_f, in_f = weight.shape
    group = config.group_size or in_f
    if outliers is None:
        outliers = outlier_mask(
            weight, config.outlier_sigma, config.outlier_scope, config.group_size
        )
    scales = torch.empty(
        out_f, in_f // group, dtype=getattr(torch, config.scale_dtype), device=weight.device
    )
    qweight = torch.empty(
        out_f, packed_length(in_f, config.bits), dtype=torch.uint8, device=weight.device
    )
    chunk = stepwise_chunk_rows(weight, config, backend, trace)
    for rows in row_slices(out_f, chunk):
        scales[rows], qweight[rows] = quantize_rows(
            weight[rows], outliers[rows], config, backend, trace
        )
    outlier_dtype = getattr(torch, config.outlier_dtype) if config.outlier_dtype else None
    return assemble(
        weight, qweight, scales, outliers, config.bits, config.group_size, outlier_dtype
    )


def stepwise_chunk_rows(
    weight: torch.Tensor, config: QuantConfig, backend: str, trace: StepTrace | None
) -> int:
    """Weight rows quantize_tensor_stepwise takes at a time: all of them on CUDA (torch sizes
    its reductions by the row count there), with the Triton search (its launch plan depends on
    the row count) or a ``trace`` (one search block); else about CHUNK_ELEMENTS values, whole
    blocks of adam_range_search's CPU chunking (so that its blocks are the ones of the whole)."""
    out_f, in_f = weight.shape
    if weight.device.type != "cpu" or backend != "torch" or trace is not None:
        return out_f
    group = config.group_size or in_f
    block = max(1, range_search.DEFAULT_CPU_CHUNK // group)  # ranges in a block of the search
    return rows_per_chunk(in_f, align=block // math.gcd(block, in_f // group))


def quantize_rows(
    weight: torch.Tensor,
    outliers: torch.Tensor,
    config: QuantConfig,
    backend: str,
    trace: StepTrace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored scales ``[rows, groups]`` and packed codes of some whole rows of a weight, with
    their outlier mask: what quantize_tensor stores for those rows."""
    num_rows, in_f = weight.shape
    group = config.group_size or in_f
    lo, hi = config.qmin, config.qmax
    normals = zeroed_float(weight, outliers).reshape(-1, group)
    scale, _ = stored_ranges(weight.reshape(-1, group), normals, config, backend, trace)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = quantize_codes(normals, safe, lo, hi).reshape(num_rows, in_f)
    del normals
    # Unsigned codes, outlier positions holding the code of zero (as pack_quantized stores them).
    unsigned = codes.masked_fill_(outliers, 0.0).sub_(lo).to(torch.uint8)
    del codes
    scales = scale.reshape(num_rows, in_f // group).to(getattr(torch, config.scale_dtype))
    return scales, pack_codes(unsigned, config.bits)
