"""Quantizing one model with several processes (GPUs, nodes) under ``torchrun``.

Every rank opens the input and plans the run alike, then :func:`assign` gives each tensor to a
rank with no communication (greedy, largest first: quantized weights balanced by estimated work,
the other tensors by bytes). A rank reads only its tensors and writes its own shards into the
shared partial output directory (:class:`~easyquant.models.writer.OutputWriter` with a rank).
At the end the ranks exchange a status (their shards and report rows, or their error) with
``all_gather_object``; if any rank failed every rank fails, naming it, and no output appears.
Otherwise rank 0 checks it can see every shard (the output must be on a filesystem all ranks
share), publishes the directory (index, config.json, tokenizer files, quant_report.json, the
rename into place) and tells the others how that went.

Quantization is deterministic per tensor, so every output tensor equals a single-process run's
bit for bit (same device kind; on CPU, the same number of threads per process).
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easyquant.config import QuantConfig
from easyquant.models.errors import ModelInputError, one_line
from easyquant.models.pipeline import QuantizeResult, prepare, quantize_tensors, start_cuda
from easyquant.models.select import Selection
from easyquant.models.sources import Source, SourceTensor
from easyquant.models.writer import LOCK_FILE, OutputWriter, publish, rank_bookkeeping

# Ranks that finish early wait at the final exchange for the slowest one: allow long runs.
TIMEOUT = datetime.timedelta(hours=12)


class RankFailedError(ValueError):
    """Another rank of the run failed (a ValueError: the CLI says it in one line, exit code 2)."""


@dataclass(frozen=True)
class World:
    """This process's place in a distributed run."""

    rank: int
    size: int
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Status:
    """What a rank reports at the end of its share: its finished shards and rows, or its error."""

    shards: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    times: dict[str, float] = field(default_factory=dict)  # StageSeconds.to_dict()


def world_from_env(environ: Mapping[str, str] = os.environ) -> World | None:
    """The run ``torchrun`` started this process in, or None when it runs alone."""
    size = int(environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return None
    return World(int(environ["RANK"]), size, int(environ.get("LOCAL_RANK", "0") or 0))


def init_world(
    device: str | torch.device,
    backend: str = "gloo",
    timeout: datetime.timedelta = TIMEOUT,
) -> tuple[World, torch.device] | None:
    """Join the process group torchrun set up (None when alone) and pick this rank's device
    (``cuda:LOCAL_RANK`` for a CUDA device). ``backend``: the process group's, ``gloo`` (the
    default, for GPUs too: the ranks exchange only a few small messages, and on 2 x H200 gloo
    finished 0.5-2 s sooner than NCCL, whose communicators start at the first exchange) or
    ``nccl`` (CUDA devices only)."""
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown process group backend {backend!r}: use gloo or nccl")
    world = world_from_env()
    if world is None:
        return None
    import torch.distributed as dist

    device = torch.device(device)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if world.local_rank >= count:
            raise ValueError(
                f"rank {world.rank} has local rank {world.local_rank} but this node has {count} "
                f"GPU(s): run at most {count} process(es) per node (--nproc-per-node)"
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif backend == "nccl":
        raise ValueError("--dist-backend nccl needs a CUDA --device")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    return world, device


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def quantize_work(numel: int, config: QuantConfig) -> int:
    """Relative cost of quantizing a weight: its size times the range-search steps."""
    return numel * (1 + (config.steps + config.init_grid if config.method == "easyquant" else 0))


def assign(
    tensors: Sequence[SourceTensor], targets: Mapping[str, QuantConfig], size: int
) -> list[int]:
    """The rank of each tensor. Weights to quantize (``targets``: module -> config) are spread
    by :func:`quantize_work`, the others by bytes; each group greedily, largest first, to the
    least loaded rank (ties: source order, lowest rank). Deterministic: every rank computes it."""
    ranks = [0] * len(tensors)

    def work(i: int) -> int:
        cfg = targets.get(tensors[i].name.removesuffix(".weight"))
        if cfg is None or not tensors[i].name.endswith(".weight"):
            return tensors[i].nbytes
        return quantize_work(tensors[i].shape[0] * tensors[i].shape[1], cfg)

    quantized = {
        i
        for i, t in enumerate(tensors)
        if t.name.endswith(".weight") and t.name.removesuffix(".weight") in targets
    }
    for group in (quantized, set(range(len(tensors))) - quantized):
        load = [0] * size
        for i in sorted(group, key=lambda i: (-work(i), i)):
            rank = min(range(size), key=lambda r: (load[r], r))
            ranks[i] = rank
            load[rank] += work(i)
    return ranks


def gather(obj: Any, size: int) -> list[Any]:
    """``obj`` of every rank, in rank order (a collective: every rank must call it)."""
    import torch.distributed as dist

    out: list[Any] = [None] * size
    dist.all_gather_object(out, obj)
    return out


def describe(exc: BaseException) -> str:
    """One line for another rank's message; the type too where it is not a user error."""
    text = one_line(exc)
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


def first_failure(statuses: Sequence[Status]) -> tuple[int, str] | None:
    for rank, status in enumerate(statuses):
        if status.error is not None:
            return rank, status.error
    return None


def raise_failure(statuses: Sequence[Status], rank: int, own: BaseException | None) -> None:
    """Fail if any rank failed: with this rank's own error, else naming the failed rank."""
    if own is not None:
        raise own
    failed = first_failure(statuses)
    if failed is not None:
        raise RankFailedError(f"rank {failed[0]} of {len(statuses)} failed: {failed[1]}")


def check_visible(partial: Path, statuses: Sequence[Status]) -> None:
    """Rank 0 must see every rank's shards: the output directory has to be shared."""
    for rank, status in enumerate(statuses):
        for shard in status.shards:
            path = partial / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["file_bytes"]:
                raise ModelInputError(
                    f"rank 0 cannot find {shard['file']}, written by rank {rank}, in {partial}: "
                    "the output directory must be on a filesystem shared by all ranks and nodes"
                )


def rank_times(statuses: Sequence[Status]) -> dict[str, Any]:
    """The report's stage times: summed over ranks, and each rank's own."""
    keys = statuses[0].times.keys()
    summed = {key: sum(s.times[key] for s in statuses) for key in keys}
    return {**summed, "rank_times": [s.times for s in statuses]}


def bookkeeping(size: int) -> list[str]:
    """The writer's lock and progress files of every rank: removed before publishing."""
    names = [LOCK_FILE]
    for rank in range(size):
        names += rank_bookkeeping(rank)
    return names


def quantize_distributed(
    world: World,
    model_or_path: nn.Module | str | Path | Source,
    config: QuantConfig,
    out_dir: str | Path,
    *,
    selection: Selection,
    tokenizer: Any,
    device: torch.device,
    backend: str,
    shard_size: int,
    overwrite: bool,
    resume: bool,
    progress: bool,
    log: Callable[[str], None] | None,
    overlap: bool = True,
) -> QuantizeResult:
    """This rank's part of :func:`~easyquant.models.pipeline.quantize_model` (``world`` given)."""

    def rank_log(message: str) -> None:
        if log is not None:
            log(f"rank {world.rank}/{world.size}: {message}")

    writer: OutputWriter | None = None
    own: Exception | None = None
    status = Status()
    try:
        start_cuda(device)
        job = prepare(model_or_path, config, out_dir, selection, tokenizer, shard_size, overwrite)
        ranks = assign(job.source.tensors, job.targets, world.size)
        mine = [t for t, r in zip(job.source.tensors, ranks, strict=True) if r == world.rank]
        fingerprint = {**job.fingerprint, "world_size": world.size}
        writer = OutputWriter(
            out_dir, fingerprint, shard_size, overwrite, resume, rank_log, world.rank, world.size
        )
        times = quantize_tensors(
            job, mine, writer, device, backend, progress and world.is_main, overlap
        )
        status = Status(writer.shards, writer.reports, times=times.to_dict())
    except Exception as exc:
        own, status = exc, Status(error=describe(exc))
    except BaseException:  # interrupted: torchrun stops the other ranks too
        if writer is not None:
            writer.abort()
        raise
    try:
        statuses = gather(status, world.size)
        raise_failure(statuses, world.rank, own)
        assert writer is not None
        order = {t.name: i for i, t in enumerate(job.source.tensors)}
        rows = sorted((r for s in statuses for r in s.rows), key=lambda r: order[r["name"]])
        published: str | None = None  # rank 0's error, if publishing fails
        if world.is_main:
            try:
                check_visible(writer.partial, statuses)
                publish(
                    writer.partial,
                    writer.out_dir,
                    [shard for s in statuses for shard in s.shards],
                    job.hf_config(),
                    lambda: job.report(
                        rows, processes=world.size, overlap=overlap, **rank_times(statuses)
                    ),
                    job.source.write_extras,
                    bookkeeping(world.size),
                )
            except Exception as exc:
                own, published = exc, describe(exc)
        published = gather(published, world.size)[0]
        if own is not None:
            raise own
        if published is not None:
            raise RankFailedError(f"rank 0 failed to publish the output: {published}")
    finally:
        if writer is not None:
            writer.abort()
    return QuantizeResult.from_rows(writer.out_dir, rows)
