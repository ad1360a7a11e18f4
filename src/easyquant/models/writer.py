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
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from easyquant.models.errors import ModelInputError, OutputExistsError
from easyquant.models.safetensors_io import ShardWriter, tensor_bytes

PROGRESS_FILE = "progress.json"
LOCK_FILE = ".lock"
INDEX_FILE = "model.safetensors.index.json"

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
    ) -> None:
        self.out_dir = check_output(out_dir, overwrite)
        if shard_size < 1:
            raise ValueError(f"shard size must be positive, got {shard_size}")
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from JSON
        self.shard_size = shard_size
        self.log = log or (lambda message: None)
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
        handle = open(self.partial / LOCK_FILE, "a")
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                handle.close()
                raise ModelInputError(
                    f"another easyquant run is writing {self.out_dir} (in {self.partial})"
                ) from exc
        return handle

    def _restore(self, resume: bool) -> None:
        progress = None
        progress_path = self.partial / PROGRESS_FILE
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
        keep = {LOCK_FILE, PROGRESS_FILE, *(s["file"] for s in self.shards)}
        for path in self.partial.iterdir():
            if path.name not in keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
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
            name = f"shard-{len(self.shards) + 1:05d}.safetensors"
            self.current = ShardWriter(self.partial / name)
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
            self.partial / PROGRESS_FILE,
            {"fingerprint": self.fingerprint, "shards": self.shards, "done": self.done},
        )

    # ---- end -----------------------------------------------------------------------------------
    def finish(
        self,
        config: dict[str, Any],
        report: Callable[[list[dict[str, Any]]], dict[str, Any]],
        extras: Callable[[Path], None],
    ) -> Path:
        """Close the last shard, name shards, write config/report/extras, move into place."""
        if self.current is not None:
            self._close_shard()
        if not self.shards:
            raise ModelInputError("the model has no tensors to write")
        count = len(self.shards)
        weight_map: dict[str, str] = {}
        for i, shard in enumerate(self.shards, start=1):
            final = (
                "model.safetensors" if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            )
            os.replace(self.partial / shard["file"], self.partial / final)
            weight_map.update(dict.fromkeys(shard["tensors"], final))
        if count > 1:
            total = sum(s["tensor_bytes"] for s in self.shards)
            index = {
                "metadata": {"total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            write_json(self.partial / INDEX_FILE, index)
        extras(self.partial)
        write_json(self.partial / "config.json", config)
        write_json(self.partial / "quant_report.json", report(self.reports))
        (self.partial / PROGRESS_FILE).unlink()
        (self.partial / LOCK_FILE).unlink()
        fsync_dir(self.partial)
        old = None
        if self.out_dir.exists():
            old = self.out_dir.parent / f".{self.out_dir.name}.old-{os.getpid()}"
            os.replace(self.out_dir, old)
        os.replace(self.partial, self.out_dir)
        fsync_dir(self.out_dir.parent)
        self._lock.close()
        if old is not None:
            shutil.rmtree(old)
        return self.out_dir

    def abort(self) -> None:
        """Stop writing (the partial directory stays, for --resume); release the lock."""
        if self.current is not None:
            self.current.abort()
            self.current = None
        self._lock.close()
