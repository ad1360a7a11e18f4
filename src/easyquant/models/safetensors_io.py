"""Reading and writing safetensors files one tensor at a time, with bounded memory.

The safetensors layout: an 8-byte little-endian header length ``N``, ``N`` bytes of JSON (name ->
dtype, shape, ``data_offsets`` relative to the end of the header; an optional ``__metadata__``),
then the tensor bytes. We read tensors with plain ``seek``/``readinto`` instead of a memory map:
pages of a map stay resident (and count in the process RSS) for as long as the file is open, so a
streaming pass over a large checkpoint would end up holding all of it. Headers are checked against
the file size, so a truncated or corrupt file is refused before any work starts.

:class:`ShardWriter` writes tensor bytes into the file as they come, behind room kept for the
header, and writes the header in front when the shard is closed: memory stays bounded by one
tensor, whatever the shard size, and the data is written once.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from easyquant.models.errors import ModelInputError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100_000_000  # the reference implementation's limit too
METADATA = {"format": "pt"}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, shape and byte range (absolute, in the file)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[list[TensorEntry], bytes]:
    """The tensors of a safetensors file in storage order, and the raw header (for fingerprints).

    Raises :class:`ModelInputError` naming the file when it is truncated or not safetensors.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelInputError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER or 8 + header_len > size:
            raise ModelInputError(f"{path} is truncated or corrupt: bad safetensors header length")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelInputError(f"{path} is corrupt: its safetensors header is not JSON") from exc
    if not isinstance(header, dict):
        raise ModelInputError(f"{path} is corrupt: its safetensors header is not a JSON object")
    base = 8 + header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            shape = tuple(int(d) for d in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelInputError(f"{path} is corrupt: bad header entry for {name!r}") from exc
        if dtype_name not in DTYPES:
            raise ModelInputError(f"{path}: tensor {name!r} has unsupported dtype {dtype_name}")
        dtype = DTYPES[dtype_name]
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize or begin < 0 or min(shape, default=0) < 0:
            raise ModelInputError(f"{path} is corrupt: tensor {name!r} has inconsistent offsets")
        entries.append(TensorEntry(name, path, dtype, shape, base + begin, base + end))
    entries.sort(key=lambda e: e.start)
    position = base
    for entry in entries:
        if entry.start != position:
            raise ModelInputError(f"{path} is corrupt: tensor data of {entry.name!r} overlaps")
        position = entry.end
    if position > size:
        raise ModelInputError(
            f"{path} is truncated: its header needs {position} bytes, the file has {size}"
        )
    return entries, raw


def read_tensor(entry: TensorEntry, out: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor (one copy, no memory map); ``out``: a uint8 buffer of exactly the
    tensor's bytes to read into (reused buffers read faster than fresh ones)."""
    if not entry.nbytes:
        return torch.empty(entry.shape, dtype=entry.dtype)
    if out is None:
        out = torch.empty(entry.nbytes, dtype=torch.uint8)
    elif out.dtype != torch.uint8 or out.numel() != entry.nbytes:
        raise ValueError(f"buffer for {entry.name!r} must be {entry.nbytes} uint8 bytes")
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        got = f.readinto(memoryview(out.numpy()))
    if got != entry.nbytes:
        raise ModelInputError(f"{entry.file} is truncated: tensor {entry.name!r} is incomplete")
    return out.view(entry.dtype).reshape(entry.shape)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def header_reserve(shard_size: int) -> int:
    """Bytes a shard keeps for its header: about 1/1024 of the shard (a 2 GB shard: 1 MiB, room
    for some 8,000 tensor entries), at least 4 KiB; 8-byte aligned."""
    return min(1 << 20, max(4096, shard_size // 1024)) // 8 * 8


class ShardWriter:
    """Writes one safetensors file tensor by tensor; ``close()`` puts it in place atomically.

    Tensor bytes go straight into the file, after ``reserve`` bytes kept for the header, so the
    data is written once (the header is only known at the end; the format lets it end in spaces).
    A header that outgrows the reserve costs one rewrite of the file with an exact header.
    """

    def __init__(self, path: Path, reserve: int = 4096) -> None:
        if reserve < 16 or reserve % 8:
            raise ValueError(f"header reserve must be a multiple of 8, at least 16; got {reserve}")
        self.path = path
        self.part_path = path.with_name(path.name + ".part")
        self.reserve = reserve
        self.file = open(self.part_path, "wb")
        self.file.seek(reserve)
        self.header: dict[str, dict[str, object]] = {}
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.header:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored")
        data = tensor_bytes(tensor)
        self.file.write(data)
        self.header[name] = {
            "dtype": DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.nbytes, self.nbytes + len(data)],
        }
        self.nbytes += len(data)

    def close(self) -> list[str]:
        """Write the header, fsync and move the file to ``path``; return the tensor names."""
        header = json.dumps({"__metadata__": METADATA, **self.header}, separators=(",", ":"))
        raw = header.encode()
        in_place = 8 + len(raw) <= self.reserve
        if in_place:  # the header fills its room, padded with spaces
            out = self.file
            out.seek(0)
            raw = raw.ljust(self.reserve - 8, b" ")
        else:  # one rewrite behind an exact header, 8-byte aligned as the reference writer does
            self.file.close()
            out = open(self.path.with_name(self.path.name + ".tmp"), "wb")
            raw += b" " * (-len(raw) % 8)
        with out:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            if not in_place:
                with open(self.part_path, "rb") as part:
                    part.seek(self.reserve)
                    shutil.copyfileobj(part, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(out.name, self.path)
        self.part_path.unlink(missing_ok=True)  # the rewrite's source
        return list(self.header)

    def abort(self) -> None:
        self.file.close()
        self.part_path.unlink(missing_ok=True)
