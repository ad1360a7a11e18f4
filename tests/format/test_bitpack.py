import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from easyquant.format.bitpack import PACKED_BITS, pack_codes, packed_length, unpack_codes


@given(
    bits=st.sampled_from(PACKED_BITS),
    rows=st.integers(1, 5),
    cols=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (rows, cols), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, packed_length(cols, bits))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


def test_int4_layout_low_nibble_first():
    codes = torch.tensor([[1, 2, 15]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x0F]]


def test_int3_layout_24_bit_words():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(c << (3 * i) for i, c in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    assert pack_codes(codes, 3).tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16]]


@pytest.mark.parametrize("bits", [5, 6])
def test_5_and_6_bit_layouts_are_one_little_endian_bit_stream(bits):
    """Code i at bits ``bits * i`` of the row's bytes read as one little-endian integer, as for
    3 bits: 8 codes in 5 bytes, 4 codes in 3 bytes."""
    values = [(7 * i + 3) % (1 << bits) for i in range(16)]
    packed = pack_codes(torch.tensor([values], dtype=torch.uint8), bits)
    stream = sum(c << (bits * i) for i, c in enumerate(values))
    assert packed.tolist() == [[(stream >> (8 * b)) & 0xFF for b in range(2 * bits)]]


def test_bits_per_code():
    assert PACKED_BITS == (2, 3, 4, 5, 6, 8)
    assert [packed_length(64, b) for b in PACKED_BITS] == [16, 24, 32, 40, 48, 64]
    assert [packed_length(9, b) for b in (5, 6)] == [10, 9]  # whole byte groups


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), 7)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.uint8), 4, 4)
