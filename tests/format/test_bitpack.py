import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from easyquant.format.bitpack import pack_codes, packed_length, unpack_codes


@given(
    bits=st.sampled_from([2, 3, 4, 8]),
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


def test_bits_per_code():
    assert [packed_length(64, b) for b in (2, 3, 4, 8)] == [16, 24, 32, 64]


def test_bad_arguments():
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.zeros(1, 4, dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="expected"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.uint8), 4, 4)
