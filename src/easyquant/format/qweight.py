"""The stored form of one quantized weight: packed codes, scales, and row-compressed outliers.

Tensors (all plain, safetensors-ready; see ``QuantizedWeight.state_dict``):
- ``qweight``  uint8 ``[out, packed_len(in)]``: unsigned codes ``q - qmin`` (int4: ``q + 8``, so
  signed codes in [-8, 7] as symmetric int4 kernels expect), packed by :mod:`.bitpack`.
  Outlier positions hold the code of zero, so a kernel adds outliers without subtracting anything.
- ``scales``   ``[out, groups]`` in the config's scale dtype (float16 by default).
- ``outlier_counts``, ``outlier_columns``: where the outliers are, row by row (columns sorted
  within each row), in one of :mod:`.outlier_store`'s two layouts; ``outlier_values`` ``[nnz]``
  in the weight's own dtype (or the config's ``outlier_dtype``), or, since format 3, int8: each
  value a multiple of the stored scale of its own row and group (``outlier_floats``).
- ``meta``     int64 ``[6]``: format version, bits, group size (0 = per channel), out, in, and the
  original weight's dtype (0 float32, 1 float16, 2 bfloat16): the default of ``dequantize``.

In memory the positions are CSR (``outlier_indptr`` int32 ``[out + 1]``, ``outlier_indices``
int16, int32 when in > 32767), which the kernels read. Format version 1 stored that CSR as it is
(``outlier_indptr``, ``outlier_indices``); :meth:`QuantizedWeight.from_state_dict` still reads it.
Format 3 stores the same tensors as format 2 and adds int8 outlier values; format 4 the same
tensors again and adds 5- and 6-bit codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from easyquant.format import outlier_store
from easyquant.format.bitpack import PACKED_BITS, pack_codes, packed_length, unpack_codes
from easyquant.format.outlier_store import csr_rows, index_dtype

FORMAT_VERSION = 4
STATE_KEYS = ("qweight", "scales", "outlier_counts", "outlier_columns", "outlier_values", "meta")
# What each readable format version stores (version 1: the in-memory CSR as it is).
VERSION_STATE_KEYS = {
    1: ("qweight", "scales", "outlier_indptr", "outlier_indices", "outlier_values", "meta"),
    2: STATE_KEYS,
    3: STATE_KEYS,  # format 2's tensors; outlier values may be int8 codes
    FORMAT_VERSION: STATE_KEYS,  # format 3's; codes may be 5 or 6 bits wide
}
READABLE_VERSIONS = tuple(VERSION_STATE_KEYS)
# The in-memory tensors of a QuantizedWeight (its fields; outliers as CSR).
PAYLOAD_KEYS = ("qweight", "scales", "outlier_indptr", "outlier_indices", "outlier_values")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# int8 outlier values: codes in [-OUTLIER_CODE_MAX, OUTLIER_CODE_MAX] times their scale.
OUTLIER_CODE_MAX = 127

__all__ = ["csr_rows", "index_dtype"]  # re-exported: the in-memory CSR's helpers


def state_keys(version: int) -> tuple[str, ...]:
    """The tensors a checkpoint of format ``version`` stores per quantized weight."""
    if version not in VERSION_STATE_KEYS:
        raise ValueError(
            f"easyquant format version {version} is not supported (this easyquant reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    return VERSION_STATE_KEYS[version]


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor
    scales: torch.Tensor
    outlier_indptr: torch.Tensor
    outlier_indices: torch.Tensor
    outlier_values: torch.Tensor
    shape: tuple[int, int]
    bits: int
    group_size: int | None
    dtype: torch.dtype = torch.float32  # the original weight's dtype

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.validate()

    # ---- derived facts -------------------------------------------------------------------------
    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def group_length(self) -> int:
        return self.in_features if self.group_size is None else self.group_size

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    @property
    def num_outliers(self) -> int:
        return int(self.outlier_values.numel())

    @property
    def storage_bits(self) -> int:
        """Every stored bit: codes (row padding too), scales, outlier counts, columns, values."""
        dense = (self.qweight, self.scales, self.outlier_values)
        positions = outlier_store.stored_bits(
            self.outlier_indptr, self.outlier_indices, self.in_features
        )
        return sum(t.numel() * t.element_size() * 8 for t in dense) + positions

    @property
    def bits_per_weight(self) -> float:
        return self.storage_bits / (self.out_features * self.in_features)

    def _payload(self) -> tuple[torch.Tensor, ...]:
        return (
            self.qweight,
            self.scales,
            self.outlier_indptr,
            self.outlier_indices,
            self.outlier_values,
        )

    # ---- reconstruction ------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Signed integer codes ``[out, in]`` (int16); outlier positions hold 0."""
        unsigned = unpack_codes(self.qweight, self.bits, self.in_features)
        return unsigned.to(torch.int16) + self.qmin

    def outlier_rows(self) -> torch.Tensor:
        """Row index (int64) of every outlier, in storage order."""
        return csr_rows(self.outlier_indptr)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The reconstructed weight ``[out, in]`` (default dtype: the original weight's)."""
        return dequantize_parts(
            self.qweight,
            self.scales,
            self.outlier_indptr,
            self.outlier_indices,
            self.outlier_values,
            self.bits,
            self.in_features,
            dtype or self.dtype,
            self.group_size,
        )

    def dequantize_rows(self, rows: slice, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``rows`` (a slice, step 1) of :meth:`dequantize`, reconstructed on their own."""
        start, stop, _ = rows.indices(self.out_features)
        if stop <= start:
            return torch.empty(0, self.in_features, dtype=dtype or self.dtype, device=self.device)
        begin, end = (int(i) for i in self.outlier_indptr[[start, stop]].tolist())
        return dequantize_parts(
            self.qweight[start:stop],
            self.scales[start:stop],
            self.outlier_indptr[start : stop + 1],
            self.outlier_indices[begin:end],
            self.outlier_values[begin:end],
            self.bits,
            self.in_features,
            dtype or self.dtype,
            self.group_size,
        )

    # ---- storage -------------------------------------------------------------------------------
    def meta(self) -> torch.Tensor:
        """Format version, bits, group size (0: per channel), shape and dtype code, as int64 on
        the payload's device (so a module built from it holds every buffer on one device)."""
        return torch.tensor(
            [FORMAT_VERSION, self.bits, self.group_size or 0, *self.shape, DTYPE_CODES[self.dtype]],
            dtype=torch.int64,
            device=self.device,
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored tensors (``STATE_KEYS``, the current format version)."""
        counts, columns = outlier_store.encode(
            self.outlier_indptr, self.outlier_indices, self.in_features
        )
        parts = (self.qweight, self.scales, counts, columns, self.outlier_values, self.meta())
        return dict(zip(STATE_KEYS, parts, strict=True))

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> QuantizedWeight:
        """Read the tensors of any readable format version (its ``meta`` says which)."""
        meta = state.get("meta")
        if meta is None:
            raise ValueError("quantized weight is missing tensor(s) ['meta']")
        if meta.dtype != torch.int64 or meta.dim() != 1 or meta.numel() < 1:
            raise ValueError(f"quantized weight 'meta' must be int64 [6], got {meta.dtype}")
        version = int(meta[0])
        missing = [k for k in state_keys(version) if k not in state]
        if missing:
            raise ValueError(f"quantized weight is missing tensor(s) {missing}")
        if meta.shape != (6,):
            raise ValueError(f"quantized weight 'meta' must be int64 [6], got {tuple(meta.shape)}")
        _, bits, group, out_f, in_f, dtype_code = (int(v) for v in meta.tolist())
        dtypes = {code: dtype for dtype, code in DTYPE_CODES.items()}
        if dtype_code not in dtypes:
            raise ValueError(f"quantized weight 'meta' names unknown dtype code {dtype_code}")
        if version == 1:
            indptr, indices = state["outlier_indptr"], state["outlier_indices"]
        else:
            counts = state["outlier_counts"]
            if counts.dim() != 2 or counts.shape[0] != out_f:
                raise ValueError(
                    f"quantized weight tensor 'outlier_counts' is {tuple(counts.shape)}, "
                    f"expected {out_f} rows"
                )
            indptr, indices = outlier_store.decode(counts, state["outlier_columns"], in_f)
        return cls(
            qweight=state["qweight"],
            scales=state["scales"],
            outlier_indptr=indptr,
            outlier_indices=indices,
            outlier_values=state["outlier_values"],
            shape=(out_f, in_f),
            bits=bits,
            group_size=group or None,
            dtype=dtypes[dtype_code],
        )

    def validate(self) -> None:
        """Check shapes and dtypes; raise ``ValueError`` naming what is wrong."""
        out_f, in_f = self.shape
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if self.bits not in PACKED_BITS:
            raise ValueError(f"bits must be one of {PACKED_BITS}, got {self.bits}")
        if out_f < 1 or in_f < 1:
            raise ValueError(f"shape must be positive, got {self.shape}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        groups = num_groups(in_f, self.group_size)
        expect = {
            "qweight": ((out_f, packed_length(in_f, self.bits)), (torch.uint8,)),
            "scales": ((out_f, groups), FLOAT_DTYPES),
            "outlier_indptr": ((out_f + 1,), (torch.int32,)),
            "outlier_indices": ((self.outlier_values.numel(),), (torch.int16, torch.int32)),
            "outlier_values": ((int(self.outlier_values.numel()),), (*FLOAT_DTYPES, torch.int8)),
        }
        for name, (shape, dtypes) in expect.items():
            t = getattr(self, name)
            if tuple(t.shape) != shape or t.dtype not in dtypes:
                raise ValueError(
                    f"quantized weight tensor '{name}' is {t.dtype} {tuple(t.shape)}, "
                    f"expected {shape} of {[str(d) for d in dtypes]}"
                )
        if self.outlier_indptr.numel() and int(self.outlier_indptr[-1]) != self.num_outliers:
            raise ValueError(
                f"outlier_indptr ends at {int(self.outlier_indptr[-1])} but there are "
                f"{self.num_outliers} outlier values"
            )

    def to(self, device: torch.device | str) -> QuantizedWeight:
        moved = {k: t.to(device) for k, t in zip(PAYLOAD_KEYS, self._payload(), strict=True)}
        return QuantizedWeight(
            **moved, shape=self.shape, bits=self.bits, group_size=self.group_size, dtype=self.dtype
        )


def num_groups(in_features: int, group_size: int | None) -> int:
    """Quantization groups per row; a group size that does not divide the row leaves a shorter
    last group (576 input features in groups of 128: four of 128 and one of 64)."""
    return 1 if group_size is None else -(-in_features // group_size)


def dequantize_parts(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    outlier_indptr: torch.Tensor,
    outlier_indices: torch.Tensor,
    outlier_values: torch.Tensor,
    bits: int,
    in_features: int,
    dtype: torch.dtype,
    group_size: int | None = None,
) -> torch.Tensor:
    """Reference dequantization (plain torch, any device): codes * scales, outliers put back.

    ``group_size`` is needed only when it does not divide ``in_features`` (a shorter last group).
    """
    codes = unpack_codes(qweight, bits, in_features).float() - (1 << (bits - 1))
    groups = scales.shape[1]
    if group_size is None or in_features % group_size == 0:
        weight = (codes.reshape(codes.shape[0], groups, -1) * scales.float().unsqueeze(2)).reshape(
            codes.shape
        )
    else:
        weight = codes * scales.float().repeat_interleave(group_size, dim=1)[:, :in_features]
    if outlier_values.numel():
        rows, cols = csr_rows(outlier_indptr), outlier_indices.long()
        if group_size is None and groups > 1:  # whole groups: their size follows from the shape
            group_size = in_features // groups
        weight[rows, cols] = outlier_floats(outlier_values, scales, rows, cols, group_size)
    return weight.to(dtype)


def outlier_floats(
    values: torch.Tensor,
    scales: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    group_size: int | None,
) -> torch.Tensor:
    """The outliers' values as float32: stored floats as they are; int8 codes times the scale of
    their row (``rows``) and group (of ``cols``), rounded to the scales' dtype (the value the
    kernels' table holds, in that dtype, exactly)."""
    if values.dtype != torch.int8:
        return values.float()
    return code_values(values, scale_at(scales, rows, cols, group_size), scales.dtype)


def outlier_codes(
    values: torch.Tensor,
    scales: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    group_size: int | None,
) -> torch.Tensor | None:
    """``values`` as int8 multiples of their stored scale (nearest), or None where one of them
    does not fit: past OUTLIER_CODE_MAX steps, or in a row (group) whose scale is zero."""
    if not values.numel():
        return values.to(torch.int8)
    unit = scale_at(scales, rows, cols, group_size)
    codes = nearest_codes(values, unit)
    if not bool((unit > 0).all()) or float(codes.abs().max()) > OUTLIER_CODE_MAX:
        return None
    return codes.to(torch.int8)


def scale_at(
    scales: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, group_size: int | None
) -> torch.Tensor:
    """The stored scale (float32) of each entry ``(rows[i], cols[i])``: its row's, per group."""
    groups = torch.zeros_like(cols) if group_size is None else cols // group_size
    return scales.float()[rows, groups]


def nearest_codes(values: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """The nearest multiple of ``unit`` to each value, as a float count (0 where unit is 0)."""
    return torch.round(values.float() / torch.where(unit > 0, unit, torch.ones_like(unit)))


def code_values(codes: torch.Tensor, unit: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes * unit`` rounded to ``dtype`` (the scales'), as float32: what int8 outliers store."""
    return (codes.float() * unit).to(dtype).float()


def pack_quantized(
    weight: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    outliers: torch.Tensor,
    bits: int,
    group_size: int | None,
    outlier_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """Build the stored form from signed ``codes [out, in]``, ``scales [out, groups]`` and the
    boolean ``outliers`` mask; outlier values are copied from ``weight`` (exactly, unless
    ``outlier_dtype`` asks for a narrower dtype)."""
    qmin = -(1 << (bits - 1))
    unsigned = (codes.to(torch.int32).masked_fill(outliers, 0) - qmin).to(torch.uint8)
    return assemble(
        weight, pack_codes(unsigned, bits), scales, outliers, bits, group_size, outlier_dtype
    )


def assemble(
    weight: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    outliers: torch.Tensor,
    bits: int,
    group_size: int | None,
    outlier_dtype: torch.dtype | None = None,
) -> QuantizedWeight:
    """The stored form from packed codes ``qweight``, ``scales`` and the boolean ``outliers``
    mask, whose CSR lists are built here (values copied from ``weight``, see pack_quantized;
    ``outlier_dtype`` int8: codes on the stored scales, see ``outlier_codes``)."""
    out_f, in_f = weight.shape
    if outlier_dtype == torch.int8:
        indptr, indices, values = outlier_csr(weight, outliers)
        codes = outlier_codes(values, scales, csr_rows(indptr), indices.long(), group_size)
        # an outlier the codes cannot hold: this weight keeps 16-bit float values instead
        fallback = weight.dtype if weight.dtype != torch.float32 else torch.float16
        values = codes if codes is not None else values.to(fallback)
    else:
        indptr, indices, values = outlier_csr(weight, outliers, outlier_dtype)
    return QuantizedWeight(
        qweight=qweight,
        scales=scales,
        outlier_indptr=indptr,
        outlier_indices=indices,
        outlier_values=values,
        shape=(out_f, in_f),
        bits=bits,
        group_size=group_size,
        dtype=weight.dtype,
    )


def outlier_csr(
    weight: torch.Tensor, outliers: torch.Tensor, outlier_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(indptr, indices, values)``: the entries of ``weight`` where ``outliers`` is True, row
    by row (columns sorted), values in ``outlier_dtype`` (default: the weight's own)."""
    out_f, in_f = weight.shape
    rows, cols = outliers.nonzero(as_tuple=True)  # row-major: sorted by row, then column
    # Counted from the row indices (a sum over the mask would convert all of it to int32 first).
    indptr = torch.zeros(out_f + 1, dtype=torch.int32, device=weight.device)
    indptr[1:] = torch.cumsum(torch.bincount(rows, minlength=out_f), dim=0, dtype=torch.int32)
    values = weight[rows, cols].to(outlier_dtype or weight.dtype).contiguous()
    del rows
    return indptr, cols.to(index_dtype(in_f)), values
