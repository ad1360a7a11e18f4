"""How a weight's outlier positions are stored (format version 2): counts per block + columns.

In memory the outliers are CSR (``indptr`` int32 ``[out + 1]``, column ``indices`` int16 or int32),
the form the kernels and ``dequantize`` read. On disk two cheaper layouts exist, and
:func:`choose_layout` takes whichever needs fewer bits for the weight at hand:

- **blocks of 256 columns**: ``outlier_counts [out, ceil(in / 256)]`` (outliers per row and block)
  and ``outlier_columns`` uint8 ``[nnz]``, each column's position inside its block. A column
  then costs 8 bits instead of 16, for one count per block;
- **whole rows**: ``outlier_counts [out, 1]`` and ``outlier_columns`` int16 (int32 past 32767
  columns), the row's columns themselves. Cheaper where outliers are too sparse to pay for a count
  per block (about one per block or fewer).

The columns' dtype says which layout it is (uint8: blocks of 256), so nothing else records it.
A weight without outliers stores ``outlier_counts [out, 0]`` and no columns: no bits at all.
Counts are uint8 when every block (row) holds at most 255, else int16, else int32. Against
version 1 (int32 ``indptr`` per row), this saves 24 bits per row on counts alone, plus 8 per
outlier in blocks: 0.06-0.08 bits per weight on SmolLM2's 576-column rows at 3σ.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCK_COLUMNS = 256  # columns per block: a position inside a block fits in uint8


def index_dtype(in_features: int) -> torch.dtype:
    """Column indices of a row of ``in_features`` columns, in memory and in whole-row layout."""
    return torch.int16 if in_features <= torch.iinfo(torch.int16).max else torch.int32


def count_dtype(largest: int) -> torch.dtype:
    """The narrowest stored dtype for counts up to ``largest``."""
    for dtype in (torch.uint8, torch.int16):
        if largest <= torch.iinfo(dtype).max:
            return dtype
    return torch.int32


def num_blocks(in_features: int) -> int:
    return -(-in_features // BLOCK_COLUMNS)


@dataclass(frozen=True)
class OutlierLayout:
    """One of the two stored layouts, with the dtypes this weight needs."""

    blocked: bool  # True: blocks of BLOCK_COLUMNS columns; False: whole rows
    counts: torch.dtype
    columns: torch.dtype
    empty: bool = False  # no outliers: no counts either

    def blocks(self, in_features: int) -> int:
        """Counts per row."""
        if self.empty:
            return 0
        return num_blocks(in_features) if self.blocked else 1

    def bits(self, rows: int, in_features: int, nnz: int) -> int:
        """Bits of ``outlier_counts`` and ``outlier_columns`` (values not included)."""
        return rows * self.blocks(in_features) * _bits(self.counts) + nnz * _bits(self.columns)


def _bits(dtype: torch.dtype) -> int:
    return torch.iinfo(dtype).bits


def choose_layout(block_counts: torch.Tensor, in_features: int) -> OutlierLayout:
    """The cheaper layout for outliers counted per row and block (``block_counts [out, blocks]``,
    see :func:`mask_block_counts`); blocks on a tie."""
    rows, nnz = block_counts.shape[0], int(block_counts.sum())
    if nnz == 0:
        return OutlierLayout(True, torch.uint8, torch.uint8, empty=True)
    largest_block = int(block_counts.max()) if block_counts.numel() else 0
    largest_row = int(block_counts.sum(dim=1).max()) if block_counts.numel() else 0
    blocked = OutlierLayout(True, count_dtype(largest_block), torch.uint8)
    whole = OutlierLayout(False, count_dtype(largest_row), index_dtype(in_features))
    if whole.bits(rows, in_features, nnz) < blocked.bits(rows, in_features, nnz):
        return whole
    return blocked


def mask_block_counts(mask: torch.Tensor) -> torch.Tensor:
    """Outliers per row and block of 256 columns (int64 ``[out, blocks]``) of a boolean mask."""
    out_f, in_f = mask.shape
    padded = torch.nn.functional.pad(mask, (0, num_blocks(in_f) * BLOCK_COLUMNS - in_f))
    return padded.reshape(out_f, -1, BLOCK_COLUMNS).sum(dim=2)


def csr_block_counts(indptr: torch.Tensor, indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """Outliers per row and block of 256 columns (int64 ``[out, blocks]``) of a CSR list."""
    rows = indptr.numel() - 1
    blocks = num_blocks(in_features)
    keys = csr_rows(indptr) * blocks + indices.long() // BLOCK_COLUMNS
    return torch.bincount(keys, minlength=rows * blocks).reshape(rows, blocks)


def stored_bits(indptr: torch.Tensor, indices: torch.Tensor, in_features: int) -> int:
    """Bits of the stored counts and columns of a CSR list (values not included)."""
    counts = csr_block_counts(indptr, indices, in_features)
    layout = choose_layout(counts, in_features)
    return layout.bits(counts.shape[0], in_features, indices.numel())


def encode(
    indptr: torch.Tensor, indices: torch.Tensor, in_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outlier_counts, outlier_columns)`` of a CSR list (columns sorted within each row)."""
    counts = csr_block_counts(indptr, indices, in_features)
    layout = choose_layout(counts, in_features)
    if layout.empty:
        return counts[:, :0].to(torch.uint8), indices.to(torch.uint8)
    if layout.blocked:
        columns = (indices.long() % BLOCK_COLUMNS).to(torch.uint8)
        return counts.to(layout.counts), columns
    return counts.sum(dim=1, keepdim=True).to(layout.counts), indices.to(layout.columns)


def decode(
    counts: torch.Tensor, columns: torch.Tensor, in_features: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The CSR list ``(indptr int32, indices)`` of stored counts and columns; ``ValueError`` if
    they do not describe ``counts.shape[0]`` rows of ``in_features`` columns."""
    blocked = columns.dtype == torch.uint8
    blocks = num_blocks(in_features) if blocked else 1
    empty = counts.dim() == 2 and counts.shape[1] == 0 and columns.numel() == 0
    if counts.dim() != 2 or (counts.shape[1] != blocks and not empty):
        raise ValueError(
            f"outlier_counts is {tuple(counts.shape)}, expected [rows, {blocks}] for "
            f"{'uint8' if blocked else str(columns.dtype)} columns of {in_features}"
        )
    if counts.dtype not in (torch.uint8, torch.int16, torch.int32):
        raise ValueError(f"outlier_counts must be uint8, int16 or int32, got {counts.dtype}")
    if not blocked and columns.dtype not in (torch.int16, torch.int32):
        raise ValueError(f"outlier_columns must be uint8, int16 or int32, got {columns.dtype}")
    flat = counts.reshape(-1).long()
    if flat.numel() and int(flat.min()) < 0:
        raise ValueError("outlier_counts holds a negative count")
    if int(flat.sum()) != columns.numel():
        raise ValueError(
            f"outlier_counts add up to {int(flat.sum())} but there are {columns.numel()} columns"
        )
    if blocked:
        block_of = torch.repeat_interleave(torch.arange(flat.numel(), device=flat.device), flat)
        full = (block_of % blocks) * BLOCK_COLUMNS + columns.long()
    else:
        full = columns.long()
    if full.numel() and int(full.max()) >= in_features:
        raise ValueError(f"an outlier column is past the row's {in_features} columns")
    indptr = torch.zeros(counts.shape[0] + 1, dtype=torch.int32, device=counts.device)
    indptr[1:] = torch.cumsum(counts.long().sum(dim=1), dim=0)
    return indptr, full.to(index_dtype(in_features))


def csr_rows(indptr: torch.Tensor) -> torch.Tensor:
    """Expand CSR row offsets ``[rows + 1]`` to one row index (int64) per stored entry."""
    counts = (indptr[1:] - indptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel(), device=indptr.device), counts)
