import pytest
import torch

from easyquant.format import outlier_store
from easyquant.format.outlier_store import (
    BLOCK_COLUMNS,
    choose_layout,
    csr_block_counts,
    decode,
    encode,
    mask_block_counts,
    stored_bits,
)


def random_csr(rows: int, cols: int, fraction: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, cols, generator=g) < fraction
    r, c = mask.nonzero(as_tuple=True)
    indptr = torch.zeros(rows + 1, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.bincount(r, minlength=rows), 0)
    return mask, indptr, c.to(outlier_store.index_dtype(cols))


def tensor_bits(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() * 8 for t in tensors)


@pytest.mark.parametrize(
    ("cols", "fraction", "blocked"),
    [
        (576, 0.01, True),  # SmolLM2's rows at about 3 sigma: counts per block pay for themselves
        (1000, 0.02, True),  # a ragged last block
        (4096, 0.0005, False),  # about 2 per row: one count per row is cheaper
        (40000, 0.0002, False),  # past 32767 columns: int32 columns
    ],
)
def test_round_trip_and_the_cheaper_layout(cols, fraction, blocked):
    mask, indptr, indices = random_csr(64, cols, fraction, seed=cols)
    counts, columns = encode(indptr, indices, cols)
    assert (columns.dtype == torch.uint8) == blocked
    assert counts.shape == (64, outlier_store.num_blocks(cols) if blocked else 1)
    got_indptr, got_indices = decode(counts, columns, cols)
    assert got_indptr.dtype == torch.int32 and torch.equal(got_indptr, indptr)
    assert got_indices.dtype == indices.dtype and torch.equal(got_indices, indices)
    # the bits counted are the bits stored, and the same from the mask as from the CSR list
    assert stored_bits(indptr, indices, cols) == tensor_bits(counts, columns)
    assert torch.equal(mask_block_counts(mask), csr_block_counts(indptr, indices, cols))
    # the layout taken is the cheaper of the two
    block_counts = mask_block_counts(mask)
    nnz, width = int(block_counts.sum()), outlier_store.num_blocks(cols)
    bits_of = lambda largest: torch.iinfo(outlier_store.count_dtype(largest)).bits  # noqa: E731
    by_block = 64 * width * bits_of(int(block_counts.max())) + nnz * 8
    by_row = 64 * bits_of(int(block_counts.sum(1).max())) + nnz * torch.iinfo(indices.dtype).bits
    assert tensor_bits(counts, columns) == min(by_block, by_row)


def test_against_version_1_the_positions_cost_less():
    """Version 1 stored int32 row offsets and int16 columns: 32 (rows + 1) + 16 nnz bits."""
    _, indptr, indices = random_csr(576, 576, 0.008, seed=1)
    old = 32 * (576 + 1) + 16 * indices.numel()
    new = stored_bits(indptr, indices, 576)
    assert new < old - 24 * 576  # at least the 24 bits per row the narrower counts save


def test_no_outliers_store_nothing():
    indptr = torch.zeros(9, dtype=torch.int32)
    indices = torch.zeros(0, dtype=torch.int16)
    counts, columns = encode(indptr, indices, 300)
    assert counts.shape == (8, 0) and columns.numel() == 0
    assert stored_bits(indptr, indices, 300) == 0
    got_indptr, got_indices = decode(counts, columns, 300)
    assert torch.equal(got_indptr, indptr) and got_indices.numel() == 0


def test_counts_widen_when_a_block_or_row_holds_more_than_255():
    full = torch.zeros(4, 512, dtype=torch.bool)
    full[1, :BLOCK_COLUMNS] = True  # a whole block of outliers: 256 does not fit uint8
    r, c = full.nonzero(as_tuple=True)
    indptr = torch.zeros(5, dtype=torch.int32)
    indptr[1:] = torch.cumsum(torch.bincount(r, minlength=4), 0)
    counts, columns = encode(indptr, c.to(torch.int16), 512)
    assert counts.dtype == torch.int16
    assert torch.equal(decode(counts, columns, 512)[1], c.to(torch.int16))
    assert choose_layout(mask_block_counts(full), 512).counts == torch.int16


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda counts, columns: (counts[:, :1], columns), "expected \\[rows, 3\\]"),
        (lambda counts, columns: (counts, columns[:-1]), "add up to"),
        (lambda counts, columns: (counts.to(torch.float32), columns), "must be uint8"),
    ],
)
def test_bad_stored_positions_are_refused(change, message):
    _, indptr, indices = random_csr(16, 576, 0.02, seed=4)
    counts, columns = encode(indptr, indices, 576)
    with pytest.raises(ValueError, match=message):
        decode(*change(counts, columns), 576)


def test_a_column_past_the_row_is_refused():
    _, indptr, indices = random_csr(16, 300, 0.03, seed=5)  # 2 blocks, the last of 44 columns
    counts, columns = encode(indptr, indices, 300)
    assert columns.dtype == torch.uint8
    last_block = counts[:, 1].nonzero()
    assert last_block.numel()
    row = int(last_block[0])
    before = int(counts[:row].sum()) + int(counts[row, 0])
    bad = columns.clone()
    bad[before] = 250  # block 1, column 256 + 250 > 299
    with pytest.raises(ValueError, match="past the row"):
        decode(counts, bad, 300)
