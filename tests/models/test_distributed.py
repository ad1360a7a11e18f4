"""Quantizing with several processes (torchrun, gloo on CPU): the same tensors as one process,
one failed rank fails the run with no output, and --resume picks up every rank's shards."""

import json
import math
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from easyquant import QuantConfig
from easyquant.models import load_quantized, quantize_model
from easyquant.models.distributed import (
    RankFailedError,
    Status,
    World,
    assign,
    check_visible,
    init_world,
    quantize_work,
    raise_failure,
    world_from_env,
)
from easyquant.models.errors import ModelInputError
from easyquant.models.pipeline import plan
from easyquant.models.safetensors_io import read_header
from easyquant.models.select import Selection
from easyquant.models.sources import SourceTensor, open_source
from easyquant.models.writer import OutputWriter, partial_path
from tests.conftest import REPO, save_tiny_llama

STEPS = 5
SHARD = 30_000  # several shards per rank
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
NAN = torch.tensor([math.nan], dtype=torch.float32).numpy().tobytes()
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def torchrun(src: Path, out: Path, *extra: str, shard: int = SHARD) -> subprocess.CompletedProcess:
    args = [str(src), "--out", str(out), "--steps", str(STEPS), "--shard-size", str(shard)]
    return subprocess.run(
        [*TORCHRUN, "-m", "easyquant", "quantize", *args, *extra],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


@contextmanager
def one_thread():
    """CPU reductions depend on the thread count; the ranks run with one thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference(src: Path, out: Path) -> dict[str, torch.Tensor]:
    with one_thread():
        quantize_model(src, QuantConfig(steps=STEPS), out, shard_size=SHARD, log=None)
    return read_all(out)


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


def rows_without_time(directory: Path) -> list[dict]:
    report = json.loads((directory / "quant_report.json").read_text())
    return [{k: v for k, v in row.items() if k != "seconds"} for row in report["tensors"]]


# ---- through torchrun ----------------------------------------------------------------------------
def test_two_processes_write_the_same_tensors_as_one(tiny_llama_dir, tmp_path):
    done = torchrun(tiny_llama_dir, tmp_path / "dist")
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote ") == 1  # rank 0 speaks for the run
    dist, single = tmp_path / "dist", tmp_path / "single"
    assert_same_tensors(read_all(dist), reference(tiny_llama_dir, single))

    names = sorted(p.name for p in dist.iterdir())
    assert not [n for n in names if n.startswith(("rank", ".")) or "progress" in n]
    assert not partial_path(dist).exists()
    index = json.loads((dist / "model.safetensors.index.json").read_text())
    shards = {n for n in names if n.startswith("model-")}
    assert set(index["weight_map"].values()) == shards and len(shards) > 2
    assert json.loads((dist / "config.json").read_text()) == json.loads(
        (single / "config.json").read_text()
    )
    assert rows_without_time(dist) == rows_without_time(single)  # in source order
    assert json.loads((dist / "quant_report.json").read_text())["totals"]["processes"] == 2
    assert (dist / "tokenizer_config.json").is_file()
    model = load_quantized(dist)
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "QuantLinear"


def test_two_processes_with_a_bits_budget_match_one(tiny_llama_dir, tmp_path):
    """--target-bpw: rank 0 plans (opening the input once) and broadcasts the plan."""
    done = torchrun(tiny_llama_dir, tmp_path / "dist", "--target-bpw", "5.0")
    assert done.returncode == 0, done.stderr
    with one_thread():
        quantize_model(
            tiny_llama_dir,
            QuantConfig(steps=STEPS),
            tmp_path / "single",
            shard_size=SHARD,
            log=None,
            target_bpw=5.0,
        )
    assert_same_tensors(read_all(tmp_path / "dist"), read_all(tmp_path / "single"))
    report = json.loads((tmp_path / "dist" / "quant_report.json").read_text())
    assert report["budget"] and report["totals"]["bits_per_weight"] <= 5.0 + 1e-9


def poison(src: Path, name: str, value: bytes) -> bytes:
    """Overwrite the first element of tensor ``name`` in place (the header stays the same, so
    the source fingerprint does too); return the bytes it had."""
    for file in sorted(src.glob("*.safetensors")):
        for entry in read_header(file)[0]:
            if entry.name == name:
                with open(file, "r+b") as f:
                    f.seek(entry.start)
                    old = f.read(len(value))
                    f.seek(entry.start)
                    f.write(value)
                return old
    raise KeyError(name)


def test_a_failed_rank_fails_the_run_and_resume_finishes_it(tmp_path):
    src = tmp_path / "src"
    save_tiny_llama(src, seed=3, max_shard_size="100KB")
    source = open_source(src)
    targets = plan(source, QuantConfig(steps=STEPS), Selection())
    ranks = assign(source.tensors, targets, 2)
    on_rank1 = [
        t.name
        for t, r in zip(source.tensors, ranks, strict=True)
        if r == 1 and t.name.removesuffix(".weight") in targets
    ]
    bad = on_rank1[-1]  # rank 1 finishes some shards first, rank 0 all of its own
    original = poison(src, bad, NAN)

    out = tmp_path / "q"
    failed = torchrun(src, out, shard=8_000)
    assert failed.returncode != 0
    assert f"{bad} has 1 NaN/Inf" in failed.stderr  # rank 1's own error
    assert not out.exists()  # nothing complete-looking
    left = {p.name for p in partial_path(out).iterdir()}
    assert "config.json" not in left and "model.safetensors.index.json" not in left
    assert any(n.startswith("rank00000-shard-") for n in left)
    assert any(n.startswith("rank00001-shard-") for n in left)

    poison(src, bad, original)
    resumed = torchrun(src, out, "--resume", shard=8_000)
    assert resumed.returncode == 0, resumed.stderr
    assert "rank 1/2: resuming" in resumed.stderr and "rank 0/2: resuming" in resumed.stderr
    assert_same_tensors(read_all(out), reference(src, tmp_path / "single"))
    assert not partial_path(out).exists()


# ---- the pieces --------------------------------------------------------------------------------
def test_world_from_env():
    assert world_from_env({}) is None
    assert world_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert world_from_env({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == World(3, 4, 1)


def test_process_group_backend_is_checked_before_joining(monkeypatch):
    assert init_world("cpu", "gloo") is None  # alone: nothing to join
    with pytest.raises(ValueError, match="use gloo or nccl"):
        init_world("cpu", "mpi")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="nccl needs a CUDA --device"):
        init_world("cpu", "nccl")


def test_assignment_is_deterministic_and_balanced():
    config = QuantConfig(steps=10)
    tensors, targets = [], {}
    for i in range(12):
        rows = 64 * (1 + i % 5)
        tensors.append(SourceTensor(f"l{i}.proj.weight", (rows, 128), torch.float16, rows * 256))
        targets[f"l{i}.proj"] = config if i % 4 else config.replace(steps=100)
        tensors.append(SourceTensor(f"l{i}.norm.weight", (128,), torch.float16, 256))
    tensors.append(SourceTensor("embed.weight", (1000, 128), torch.float16, 256_000))
    for size in (1, 2, 3, 5):
        ranks = assign(tensors, targets, size)
        assert ranks == assign(list(tensors), dict(targets), size)
        assert set(ranks) <= set(range(size)) and len(ranks) == len(tensors)
        work, copied = [0] * size, [0] * size
        costs = []
        for tensor, rank in zip(tensors, ranks, strict=True):
            cfg = targets.get(tensor.name.removesuffix(".weight"))
            if cfg is not None:
                cost = quantize_work(tensor.shape[0] * tensor.shape[1], cfg)
                work[rank] += cost
                costs.append(cost)
            else:
                copied[rank] += tensor.nbytes
        # greedy largest-first: no rank is more than the largest item above another
        assert max(work) - min(work) <= max(costs)
        assert max(copied) - min(copied) <= 256_000
    # 3 ranks: the embedding alone on one, the norms spread over the other two
    ranks = assign(tensors, targets, 3)
    assert len({r for t, r in zip(tensors, ranks, strict=True) if "norm" in t.name}) == 2


def test_a_failure_names_the_rank():
    statuses = [Status(), Status(error="model.x.weight has 1 NaN/Inf"), Status(error="other")]
    with pytest.raises(RankFailedError, match=r"^rank 1 of 3 failed: model\.x\.weight has 1 NaN"):
        raise_failure(statuses, 0, None)
    with pytest.raises(KeyError):  # the failed rank raises its own error
        raise_failure(statuses, 1, KeyError("own"))
    raise_failure([Status(), Status()], 0, None)


def test_rank_zero_says_when_it_cannot_see_a_shard(tmp_path):
    shard = {"file": "rank00001-shard-00001.safetensors", "file_bytes": 10}
    with pytest.raises(ModelInputError, match=r"written by rank 1.*shared by all ranks and nodes"):
        check_visible(tmp_path, [Status(), Status(shards=[shard])])
    (tmp_path / shard["file"]).write_bytes(b"0" * 10)
    check_visible(tmp_path, [Status(), Status(shards=[shard])])


def test_ranks_keep_to_their_own_files(tmp_path):
    out = tmp_path / "q"
    partial = partial_path(out.absolute())
    partial.mkdir()
    (partial / "shard-00001.safetensors").write_bytes(b"from a single-process run")
    (partial / "rank00007-shard-00001.safetensors").write_bytes(b"from a larger world")
    one = OutputWriter(out, {"a": 1}, 1000, rank=1, world_size=2, log=None)
    one.add(0, {"w": torch.ones(4)}, None)
    one.close()
    one.release()
    assert (partial / "shard-00001.safetensors").exists()  # not rank 1's to remove
    zero = OutputWriter(out, {"a": 1}, 1000, rank=0, world_size=2, log=None)
    names = {p.name for p in partial.iterdir()}
    assert "rank00001-shard-00001.safetensors" in names and "rank00001-progress.json" in names
    assert "shard-00001.safetensors" not in names  # rank 0 clears what belongs to no rank
    assert "rank00007-shard-00001.safetensors" not in names
    with pytest.raises(ModelInputError, match="another easyquant run"):
        OutputWriter(out, {"a": 1}, 1000, log=None)  # a single run is kept out meanwhile
    zero.release()
    resumed = OutputWriter(out, {"a": 1}, 1000, resume=True, rank=1, world_size=2, log=None)
    assert resumed.done == 1 and resumed.shards[0]["file"] == "rank00001-shard-00001.safetensors"
    resumed.release()
