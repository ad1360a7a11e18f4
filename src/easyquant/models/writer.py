"""The output directory: written in a hidden sibling, renamed into place only when complete.

``out/`` is built as ``.out.partial/`` next to it. Shards are closed one after another (each
fsync'd and renamed from a temporary name); after each, ``progress.json`` records the finished
shards, how many source tensors they cover, their report rows, and a fingerprint of the run
(input, config, selection, shard size). An interrupted run leaves only the hidden partial
directory: ``resume=True`` keeps its finished shards when the fingerprint matches and goes on from
the next source tensor. Shard boundaries depend only on tensor sizes and the shard size, and
quantization is deterministic, so a resumed run writes the same bytes as an uninterrupted one.

At the end, shards get their final names (``model.safetensors``, or ``model-0000i-of-0000n`` with
an index), config.json, the tokenizer files and quant_report.json are written, and the directory
is renamed to ``out``; an existing ``out`` (``overwrite=True``) is replaced only then.

Distributed runs (``rank`` given): every rank writes into the same partial directory, with its
own files (``rank0000r-shard-0000i.safetensors``, ``rank0000r-progress.json``, lock
``rank0000r-lock``) and a shared lock on ``.lock``; it only ever removes files of its own (rank 0
also those of no rank, or of ranks beyond the world size). :func:`publish` (rank 0, once all
ranks are done) names every shard and moves the directory into place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from easyquant.models.errors import ModelInputError, OutputExistsError
from easyquant.models.safetensors_io import ShardWriter, header_reserve, tensor_bytes

PROGRESS_FILE = "progress.json"
LOCK_FILE = ".lock"
INDEX_FILE = "model.safetensors.index.json"
RANK_FILE = re.compile(r"rank(\d{5})-")  # files of one rank of a distributed run


def rank_prefix(rank: int) -> str:
    """What every file a rank writes into the partial directory starts with."""
    return f"rank{rank:05d}-"


def rank_bookkeeping(rank: int) -> list[str]:
    """A rank's own lock and progress files (removed before the output is published)."""
    return [rank_prefix(rank) + "lock", rank_prefix(rank) + PROGRESS_FILE]


try:  # POSIX advisory lock: two runs never write the same partial directory
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def partial_path(out_dir: Path) -> Path:
    return out_dir.parent / f".{out_dir.name}.partial"


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temporary name, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_output(out_dir: str | Path, overwrite: bool) -> Path:
    """The absolute output path; refuses an existing one unless ``overwrite``."""
    out = Path(out_dir).absolute()
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(
                f"output directory {out} exists; choose another or pass --overwrite "
                "(it is replaced only once the new one is complete)"
            )
        if not out.is_dir():
            raise OutputExistsError(f"output path {out} exists and is not a directory")
    return out


class OutputWriter:
    def __init__(
        self,
        out_dir: str | Path,
        fingerprint: dict[str, Any],
        shard_size: int,
        overwrite: bool = False,
        resume: bool = False,
        log: Callable[[str], None] | None = None,
        rank: int | None = None,
        world_size: int = 1,
    ) -> None:
        """``rank``: this process's rank in a distributed run of ``world_size`` (None: alone)."""
        self.out_dir = check_output(out_dir, overwrite)
        if shard_size < 1:
            raise ValueError(f"shard size must be positive, got {shard_size}")
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from JSON
        self.shard_size = shard_size
        self.log = log or (lambda message: None)
        self.rank, self.world_size = rank, world_size
        self.prefix = "" if rank is None else rank_prefix(rank)
        self.progress_file = self.prefix + PROGRESS_FILE
        self.partial = partial_path(self.out_dir)
        self.partial.parent.mkdir(parents=True, exist_ok=True)
        self.partial.mkdir(exist_ok=True)
        self._lock = self._take_lock()
        self.shards: list[dict[str, Any]] = []  # finished: file, tensors, bytes
        self.reports: list[dict[str, Any]] = []  # rows of finished shards
        self.done = 0  # source tensors whose outputs are all in finished shards
        try:
            self._restore(resume)
        except BaseException:
            self._lock.close()
            raise
        self.current: ShardWriter | None = None
        self.current_reports: list[dict[str, Any]] = []
        self.current_last = -1

    # ---- start ---------------------------------------------------------------------------------
    def _take_lock(self) -> Any:
        """Alone: ``.lock`` exclusively. A rank: ``.lock`` shared (keeps single runs out) and its
        own lock file exclusively (keeps another run's same rank out)."""
        if self.rank is None:
            return self._flock(LOCK_FILE, exclusive=True)
        shared = self._flock(LOCK_FILE, exclusive=False)
        try:
            own = self._flock(self.prefix + "lock", exclusive=True)
        except BaseException:
            shared.close()
            raise
        return _Locks(shared, own)

    def _flock(self, name: str, exclusive: bool) -> Any:
        handle = open(self.partial / name, "a")
        if fcntl is not None:
            try:
                fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
            except OSError as exc:
                handle.close()
                raise ModelInputError(
                    f"another easyquant run is writing {self.out_dir} (in {self.partial})"
                ) from exc
        return handle

    def _mine(self, name: str) -> bool:
        """Is this file of the partial directory one this writer may remove?"""
        if self.rank is None:
            return name != LOCK_FILE
        match = RANK_FILE.match(name)
        if match is not None:
            owner = int(match.group(1))
            return owner == self.rank or (self.rank == 0 and owner >= self.world_size)
        return self.rank == 0 and name != LOCK_FILE

    def _restore(self, resume: bool) -> None:
        progress = None
        progress_path = self.partial / self.progress_file
        if progress_path.is_file():
            try:
                progress = json.loads(progress_path.read_text())
            except (UnicodeDecodeError, json.JSONDecodeError):
                progress = None
        if resume and progress is not None:
            if progress.get("fingerprint") != self.fingerprint:
                differs = sorted(
                    key
                    for key in {*self.fingerprint, *progress.get("fingerprint", {})}
                    if self.fingerprint.get(key) != progress.get("fingerprint", {}).get(key)
                )
                raise ModelInputError(
                    f"cannot resume {self.out_dir}: the interrupted run differs in {differs}; "
                    "run without --resume to start over"
                )
            for shard in progress["shards"]:
                path = self.partial / shard["file"]
                if not path.is_file() or path.stat().st_size != shard["file_bytes"]:
                    break
                self.shards.append(shard)
                self.reports.extend(shard["reports"])
                self.done = shard["done"]
            if self.shards:
                self.log(
                    f"resuming {self.out_dir}: {len(self.shards)} shard(s), "
                    f"{self.done} source tensor(s) already done"
                )
        elif resume:
            self.log(f"nothing to resume for {self.out_dir}: starting from the beginning")
        elif progress is not None:
            self.log(f"discarding an interrupted run in {self.partial} (use --resume to continue)")
        keep = {self.prefix + "lock", self.progress_file, *(s["file"] for s in self.shards)}
        for path in self.partial.iterdir():
            if path.name not in keep and self._mine(path.name):
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        self._write_progress()

    # ---- shards --------------------------------------------------------------------------------
    def add(
        self, source_index: int, outputs: dict[str, torch.Tensor], report: dict[str, Any] | None
    ) -> None:
        """Add the outputs of one source tensor; they always land in the same shard."""
        size = sum(len(tensor_bytes(t)) for t in outputs.values())
        if self.current is not None and self.current.nbytes + size > self.shard_size:
            self._close_shard()
        if self.current is None:
            name = f"{self.prefix}shard-{len(self.shards) + 1:05d}.safetensors"
            self.current = ShardWriter(self.partial / name, header_reserve(self.shard_size))
        for name, tensor in outputs.items():
            self.current.add(name, tensor)
        if report is not None:
            self.current_reports.append(report)
        self.current_last = source_index

    def _close_shard(self) -> None:
        assert self.current is not None
        nbytes = self.current.nbytes
        names = self.current.close()
        self.shards.append(
            {
                "file": self.current.path.name,
                "tensors": names,
                "tensor_bytes": nbytes,
                "file_bytes": self.current.path.stat().st_size,
                "done": self.current_last + 1,
                "reports": self.current_reports,
            }
        )
        self.reports.extend(self.current_reports)
        self.done = self.current_last + 1
        self.current, self.current_reports = None, []
        self._write_progress()

    def _write_progress(self) -> None:
        write_json(
            self.partial / self.progress_file,
            {"fingerprint": self.fingerprint, "shards": self.shards, "done": self.done},
        )

    # ---- end -----------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the last shard (its progress recorded); the lock stays held."""
        if self.current is not None:
            self._close_shard()

    def finish(
        self,
        config: dict[str, Any],
        report: Callable[[list[dict[str, Any]]], dict[str, Any]],
        extras: Callable[[Path], None],
    ) -> Path:
        """Close the last shard, name shards, write config/report/extras, move into place."""
        self.close()
        path = publish(
            self.partial,
            self.out_dir,
            self.shards,
            config,
            lambda: report(self.reports),
            extras,
            [PROGRESS_FILE, LOCK_FILE],
        )
        self._lock.close()
        return path

    def abort(self) -> None:
        """Stop writing (the partial directory stays, for --resume); release the lock."""
        if self.current is not None:
            self.current.abort()
            self.current = None
        self.release()

    def release(self) -> None:
        """Release the lock(s) (a rank, once the run is over)."""
        self._lock.close()


class _Locks:
    """The two lock files a rank holds, released together."""

    def __init__(self, *handles: Any) -> None:
        self.handles = handles

    def close(self) -> None:
        for handle in self.handles:
            handle.close()


def publish(
    partial: Path,
    out_dir: Path,
    shards: list[dict[str, Any]],
    config: dict[str, Any],
    report: Callable[[], dict[str, Any]],
    extras: Callable[[Path], None],
    bookkeeping: Iterable[str],
) -> Path:
    """Give ``shards`` (finished, in ``partial``) their final names in this order, write the
    index, extras, config.json and quant_report.json, remove the ``bookkeeping`` files and
    rename ``partial`` to ``out_dir`` (replacing an existing one only then)."""
    if not shards:
        raise ModelInputError("the model has no tensors to write")
    count = len(shards)
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        final = "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
        os.replace(partial / shard["file"], partial / final)
        weight_map.update(dict.fromkeys(shard["tensors"], final))
    if count > 1:
        total = sum(s["tensor_bytes"] for s in shards)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(partial / INDEX_FILE, index)
    extras(partial)
    write_json(partial / "config.json", config)
    write_json(partial / "quant_report.json", report())
    for name in bookkeeping:
        (partial / name).unlink(missing_ok=True)
    fsync_dir(partial)
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        os.replace(out_dir, old)
    os.replace(partial, out_dir)
    fsync_dir(out_dir.parent)
    if old is not None:
        shutil.rmtree(old)
    return out_dir
