import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from easyquant.models.errors import ModelInputError
from easyquant.models.safetensors_io import ShardWriter, header_reserve, read_header, read_tensor

TENSORS = {
    "a.weight": torch.randn(5, 7),
    "b.half": torch.randn(3, 4).half(),
    "c.bf16": torch.randn(2, 9).bfloat16(),
    "d.codes": torch.randint(0, 255, (4, 3), dtype=torch.uint8),
    "e.indices": torch.arange(11, dtype=torch.int16),
    "f.meta": torch.tensor([1, 4, 0, 5, 7, 2], dtype=torch.int64),
    "g.empty": torch.zeros(0, dtype=torch.float16),
    "h.indptr": torch.tensor([0, 2, 3], dtype=torch.int32),
}


@pytest.mark.parametrize("reserve", [4096, 16])  # the header fits its room / needs a rewrite
def test_shard_writer_output_reads_back_with_the_reference_library(tmp_path, reserve):
    writer = ShardWriter(tmp_path / "x.safetensors", reserve)
    for name, tensor in TENSORS.items():
        writer.add(name, tensor)
    assert writer.close() == list(TENSORS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # no part/tmp left
    raw = (tmp_path / "x.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert header_len % 8 == 0
    assert (8 + header_len == reserve) == (reserve == 4096)  # written in place only if it fits
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(TENSORS)
        for name, tensor in TENSORS.items():
            got = f.get_tensor(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    entries, _ = read_header(tmp_path / "x.safetensors")
    for entry in entries:
        assert torch.equal(read_tensor(entry), TENSORS[entry.name]), entry.name


def test_header_reserve_grows_with_the_shard_size_within_bounds():
    assert header_reserve(1000) == 4096
    assert header_reserve(2 * 1024**3) == 1 << 20
    assert header_reserve(10 * 1024**3) == 1 << 20
    assert header_reserve(100_000_003) % 8 == 0


def test_reader_reads_files_of_the_reference_library(tmp_path):
    path = tmp_path / "ref.safetensors"
    save_file(TENSORS, str(path))
    entries, _ = read_header(path)
    assert {e.name for e in entries} == set(TENSORS)
    for entry in entries:
        got = read_tensor(entry)
        assert got.dtype == TENSORS[entry.name].dtype
        assert torch.equal(got, TENSORS[entry.name]), entry.name


def test_writing_a_tensor_twice_is_refused(tmp_path):
    writer = ShardWriter(tmp_path / "x.safetensors")
    writer.add("a", torch.ones(2))
    with pytest.raises(ValueError, match="written twice"):
        writer.add("a", torch.ones(2))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda raw: raw[:-10], "truncated"),
        (lambda raw: raw[:5], "truncated"),
        (lambda raw: raw[:8] + b"#" + raw[9:], "not JSON"),
        (lambda raw: b"\xff" * 8 + raw[8:], "header length"),
    ],
)
def test_damaged_files_are_refused_with_a_message(tmp_path, damage, message):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.randn(4, 4), "b": torch.randn(3)}, str(path))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ModelInputError, match=message):
        read_header(path)
