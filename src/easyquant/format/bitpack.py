"""Bit packing of unsigned codes along the last dimension into uint8.

Layout (little-endian within each byte group, so a kernel may read 4 bytes as one int32):
- 8 bits: one code per byte;
- 4 bits: two codes per byte, element ``2j`` in the low nibble, ``2j + 1`` in the high nibble;
- 2 bits: four codes per byte, element ``4j + k`` at bits ``2k``;
- 3 bits: eight codes per three bytes, element ``8j + k`` at bits ``3k`` of the 24-bit word;
- 5 bits: eight codes per five bytes (40-bit word), 6 bits: four codes per three bytes (24-bit
  word), element ``g j + k`` at bits ``bits * k`` of its word, as for 3 bits.
Rows are padded with zero codes to a whole number of byte groups; unpack takes the true length.
"""

from __future__ import annotations

import torch

# bits -> (codes per group, bytes per group): the fewest codes that fill whole bytes
_GROUPS = {2: (4, 1), 3: (8, 3), 4: (2, 1), 5: (8, 5), 6: (4, 3), 8: (1, 1)}
PACKED_BITS = tuple(sorted(_GROUPS))


def packed_length(n: int, bits: int) -> int:
    """Bytes one row of ``n`` codes takes."""
    codes, nbytes = _GROUPS[bits]
    return -(-n // codes) * nbytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (any integer dtype, values in ``[0, 2^bits)``) into uint8."""
    if bits not in _GROUPS:
        raise ValueError(f"bits must be one of {sorted(_GROUPS)}, got {bits!r}")
    per_group, nbytes = _GROUPS[bits]
    *lead, n = codes.shape
    pad = -n % per_group
    c = codes.to(torch.int64)  # a group's word has up to 40 bits (5-bit codes)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, -1, per_group)
    shifts = torch.arange(per_group, dtype=torch.int64, device=c.device) * bits
    words = (c << shifts).sum(dim=-1, dtype=torch.int64)
    if nbytes == 1:
        return words.to(torch.uint8).reshape(*lead, -1)
    byte_shifts = torch.arange(nbytes, dtype=torch.int64, device=c.device) * 8
    out = (words.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(*lead, -1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``[..., packed]`` -> uint8 codes ``[..., n]``."""
    if bits not in _GROUPS:
        raise ValueError(f"bits must be one of {sorted(_GROUPS)}, got {bits!r}")
    per_group, nbytes = _GROUPS[bits]
    *lead, nb = packed.shape
    if nb != packed_length(n, bits):
        raise ValueError(
            f"packed row has {nb} bytes, expected {packed_length(n, bits)} for {n} codes"
        )
    p = packed.to(torch.int64).reshape(*lead, -1, nbytes)
    if nbytes == 1:
        words = p
    else:
        byte_shifts = torch.arange(nbytes, dtype=torch.int64, device=p.device) * 8
        words = (p << byte_shifts).sum(dim=-1, keepdim=True, dtype=torch.int64)
    shifts = torch.arange(per_group, dtype=torch.int64, device=p.device) * bits
    codes = (words >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*lead, -1)[..., :n].to(torch.uint8)
