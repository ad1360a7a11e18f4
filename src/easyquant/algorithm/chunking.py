"""Row chunks: the quantizer works on a few rows at a time so that its temporaries stay small.

Every step of quantize_tensor after the outlier statistics is per row (per quantization range),
so rows can be processed in chunks without changing a bit, provided each per-row reduction takes
the same path as over the whole tensor. On the CPU it does, except that a reduction with a single
output (one row) may be split across threads: :func:`row_slices` never leaves a lone last row.
On CUDA, torch picks a reduction's launch shape from the number of rows, so torch reductions are
not chunked there (see the callers).
"""

from __future__ import annotations

import torch

# Values (of the weight) a chunk holds on the CPU, about: 8 MiB of float32 per temporary, small
# enough to stay in cache between the passes over it.
CHUNK_ELEMENTS = 1 << 21
# On a GPU (where each pass is a kernel launch, and a few are enough to fill it): 32 MiB.
DEVICE_CHUNK_ELEMENTS = 1 << 23


def chunk_elements(device: torch.device) -> int:
    """Values a chunk of rows holds, about, on ``device``."""
    return CHUNK_ELEMENTS if device.type == "cpu" else DEVICE_CHUNK_ELEMENTS


def weight_row_slices(weight: torch.Tensor) -> list[slice]:
    """Row slices of a 2-D ``weight`` of about :func:`chunk_elements` values each (for work
    that is elementwise, or per row)."""
    out_f, in_f = weight.shape
    return row_slices(out_f, rows_per_chunk(in_f, elements=chunk_elements(weight.device)))


def row_slices(num_rows: int, chunk_rows: int) -> list[slice]:
    """Consecutive slices of ``chunk_rows`` rows covering ``num_rows``; a last slice of a single
    row (when there are others) is merged into the one before it."""
    chunk_rows = max(1, chunk_rows)
    starts = list(range(0, num_rows, chunk_rows))
    if len(starts) > 1 and num_rows - starts[-1] == 1:
        starts.pop()
    return [slice(start, end) for start, end in zip(starts, [*starts[1:], num_rows], strict=True)]


def rows_per_chunk(in_features: int, align: int = 1, elements: int | None = None) -> int:
    """Rows of ``in_features`` values in a chunk of about ``elements`` values (default
    CHUNK_ELEMENTS), a multiple of ``align`` (at least ``align``)."""
    elements = elements or CHUNK_ELEMENTS
    return align * max(1, elements // max(1, align * in_features))
