"""``quantize_model``: a model in (directory, GGUF file or in-memory), a quantized directory out.

The pass is one loop over the input's tensors in storage order: a selected Linear weight becomes
its packed tensors (``<module>.qweight``, ``.scales``, ``.outlier_*``, ``.meta``: QuantLinear's
state_dict names); every other tensor is copied under its own name. Reading, quantizing and
writing overlap in three threads (:func:`quantize_tensors`), with the tensors read ahead held in
one :class:`~easyquant.models.read_arena.ReadArena` the size of the largest tensor, so quantizing
a safetensors directory needs about the largest tensor and its quantization temporaries,
whatever the model size.
"""

from __future__ import annotations

import functools
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from easyquant.config import QuantConfig
from easyquant.format.qweight import FLOAT_DTYPES, FORMAT_VERSION
from easyquant.models.errors import ModelInputError
from easyquant.models.read_arena import ReadArena, Span
from easyquant.models.select import Selection, TensorReport, quantize_with_report
from easyquant.models.sources import Source, SourceTensor, open_source
from easyquant.models.writer import OutputWriter, check_output

if TYPE_CHECKING:
    from easyquant.models.distributed import World

QUANT_METHOD = "easyquant"
DEFAULT_SHARD_SIZE = 2 * 1024**3
REFERENCE_NOTE = (
    "error: ||W_q - W||^2 / ||W||^2 against the input weights as read (for a GGUF input: the "
    "dequantized GGUF weights); rtn_error: the same for round-to-nearest at the same bits/group"
)


@dataclass
class QuantizeResult:
    out_dir: Path
    reports: list[TensorReport]
    totals: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, out_dir: Path, rows: list[dict[str, Any]]) -> QuantizeResult:
        reports = [TensorReport(**{**r, "shape": tuple(r["shape"])}) for r in rows]
        return cls(out_dir, reports, summarize(rows))


def plan(source: Source, config: QuantConfig, selection: Selection) -> dict[str, QuantConfig]:
    """Module name -> config for every Linear weight to quantize, checked before any work."""
    selection.check(config)
    present = {t.name: t for t in source.tensors}
    targets: dict[str, QuantConfig] = {}
    for module, shape in source.linears.items():
        tensor = present.get(f"{module}.weight")
        if tensor is None or not selection.wants(module, tensor.shape):
            continue  # e.g. lm_head tied to the embeddings: stored once, as the embedding
        if tensor.shape != shape:
            raise ModelInputError(
                f"{module}.weight has shape {list(tensor.shape)} but the architecture expects "
                f"{list(shape)}"
            )
        if tensor.dtype not in FLOAT_DTYPES:
            raise ModelInputError(
                f"{module}.weight has unsupported dtype {str(tensor.dtype).removeprefix('torch.')}"
                "; easyquant quantizes float32, float16 and bfloat16 weights"
            )
        targets[module] = selection.config_for(module, config)
    if not targets:
        raise ModelInputError(
            f"nothing to quantize in {source.description}: no Linear weight matches the selection"
        )
    return targets


def quantization_config(
    config: QuantConfig, selection: Selection, modules: list[str]
) -> dict[str, Any]:
    """The ``quantization_config`` entry of config.json."""
    from easyquant import __version__

    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "easyquant_version": __version__,
        **config.to_dict(),
        **selection.to_dict(),
        "quantized_modules": modules,
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals over report rows; averages weighted by parameter count."""
    numel = [r["shape"][0] * r["shape"][1] for r in rows]
    total = sum(numel) or 1

    def weighted(key: str) -> float:
        return sum(r[key] * n for r, n in zip(rows, numel, strict=True)) / total

    return {
        "quantized_tensors": len(rows),
        "quantized_parameters": sum(numel),
        "bits_per_weight": weighted("bits_per_weight"),
        "outlier_fraction": weighted("outlier_fraction"),
        "error": weighted("error"),
        "rtn_error": weighted("rtn_error"),
        "quantize_seconds": sum(r["seconds"] for r in rows),
    }


def default_log(message: str) -> None:
    print(f"easyquant: {message}", file=sys.stderr)


@dataclass
class Job:
    """One run's input, plan and identity: what every process of a run computes alike."""

    source: Source
    config: QuantConfig
    selection: Selection
    targets: dict[str, QuantConfig]  # module -> config, from :func:`plan`
    fingerprint: dict[str, Any]  # what --resume must find unchanged
    started: float
    open_seconds: float  # opening and planning, part of the report's stage times

    def hf_config(self) -> dict[str, Any]:
        """config.json of the output."""
        qc = quantization_config(self.config, self.selection, list(self.targets))
        return {**self.source.config, "quantization_config": qc}

    def report(self, rows: list[dict[str, Any]], **totals: Any) -> dict[str, Any]:
        """quant_report.json, from the rows in source order."""
        budget = getattr(self.selection, "budget", None)  # a BudgetSelection's plan
        return {
            "format_version": FORMAT_VERSION,
            "source": self.source.description,
            "config": self.config.to_dict(),
            "selection": self.selection.to_dict(),
            **({"budget": dict(budget)} if budget else {}),
            "note": REFERENCE_NOTE,
            "totals": {
                **summarize(rows),
                "source_bytes": self.source.nbytes,
                "wall_seconds": time.perf_counter() - self.started,
                **totals,
            },
            "tensors": rows,
        }


def start_cuda(device: torch.device) -> None:
    """Create ``device``'s CUDA context in a thread, while the input is opened (which imports
    transformers: seconds that the context creation can hide in). Errors are left to the
    pass, which meets them again on its first CUDA call."""

    def touch() -> None:
        try:
            torch.empty(1, device=device)
        except Exception:
            pass

    if device.type == "cuda":
        threading.Thread(target=touch, name="easyquant-cuda-init", daemon=True).start()


def prepare(
    model_or_path: nn.Module | str | Path | Source,
    config: QuantConfig,
    out_dir: str | Path,
    selection: Selection,
    tokenizer: Any,
    shard_size: int,
    overwrite: bool,
) -> Job:
    """Check the output, open the input and plan the run (all before any work)."""
    started = time.perf_counter()
    check_output(out_dir, overwrite)  # before the (possibly long) read of the input
    source = (  # already open: quantize_model with a budget reads it once for both passes
        model_or_path
        if isinstance(model_or_path, Source)
        else open_source(model_or_path, tokenizer)
    )
    targets = plan(source, config, selection)
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "source": source.fingerprint(),
        "config": config.to_dict(),
        "selection": selection.to_dict(),
        "shard_size": shard_size,
    }
    return Job(
        source, config, selection, targets, fingerprint, started, time.perf_counter() - started
    )


# The overlapped pass: reads in flight ahead of the quantizing thread (each waits for room in the
# read arena, which holds one largest tensor) and tensors whose outputs may wait to be written.
READ_AHEAD = 2
WRITE_BEHIND = 2


@dataclass
class StageSeconds:
    """Where a run spent its time: ``open`` opening and planning (:func:`prepare`); ``read`` and
    ``write`` the time spent reading inputs and writing outputs (in their own threads when
    overlapped), ``read_wait`` and ``write_wait`` the time the quantizing thread stood idle for
    them; ``wall`` the whole pass; ``close`` writing and syncing the last shard after it."""

    open: float = 0.0
    read: float = 0.0
    write: float = 0.0
    read_wait: float = 0.0
    write_wait: float = 0.0
    wall: float = 0.0
    close: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {
            "open_seconds": self.open,
            "read_seconds": self.read,
            "write_seconds": self.write,
            "read_wait_seconds": self.read_wait,
            "write_wait_seconds": self.write_wait,
            "pass_seconds": self.wall,
            "close_seconds": self.close,
        }


class _Inline:
    """An executor that runs each task at once, in the calling thread (``overlap=False``)."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True) -> None:
        pass


def quantize_tensors(
    job: Job,
    tensors: list[SourceTensor],
    writer: OutputWriter,
    device: torch.device,
    backend: str,
    progress: bool,
    overlap: bool = True,
) -> StageSeconds:
    """Quantize or copy ``tensors`` (in this order) into ``writer``, from ``writer.done`` on,
    and close its last shard.

    ``overlap``: read the next tensor and write the previous one's outputs in two threads while
    this one quantizes (file I/O releases the GIL), so a run on a fast GPU is not the sum of
    read, quantize and write. Tensors read from files go into one :class:`ReadArena` as large as
    the largest of them, so host memory still holds about one largest tensor.
    """
    times = StageSeconds(open=job.open_seconds)
    started = time.perf_counter()

    def timed(stage: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            setattr(times, stage, getattr(times, stage) + time.perf_counter() - start)

    todo = list(enumerate(tensors))[writer.done :]
    arena = None
    if overlap and job.source.reads_files and todo:
        arena = ReadArena(max(info.nbytes for _, info in todo), pin=device.type == "cuda")

    def load(info: SourceTensor) -> tuple[torch.Tensor, Span | None]:
        if arena is None:
            return job.source.load(info.name), None
        span = arena.take(info.nbytes)  # waits for room: older tensors done with
        try:
            return job.source.load(info.name, span.buffer), span
        except BaseException:
            arena.give_back(span)
            raise

    def give_back(span: Span | None) -> None:
        if arena is not None and span is not None:
            arena.give_back(span)

    def write(index: int, outputs: dict[str, torch.Tensor], row: Any, span: Span | None) -> None:
        try:
            writer.add(index, outputs, row)
        finally:
            give_back(span)  # a copied tensor lives in the arena until it is written

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tensors), initial=writer.done, unit="tensor", file=sys.stderr)
    reader = ThreadPoolExecutor(1, "easyquant-read") if overlap else _Inline()
    writing = ThreadPoolExecutor(1, "easyquant-write") if overlap else _Inline()
    read_ahead, write_behind = (READ_AHEAD, WRITE_BEHIND) if overlap else (1, 1)
    reads: deque[Future[Any]] = deque()  # in flight, in order
    writes: deque[Future[Any]] = deque()
    submitted = 0  # reads submitted so far
    try:
        for index, info in todo:
            # Up to READ_AHEAD tensors ahead (the arena bounds their memory): a slow read then
            # does not stall the quantizing thread at once.
            while submitted < len(todo) and len(reads) < read_ahead:
                reads.append(reader.submit(timed, "read", load, todo[submitted][1]))
                submitted += 1
            tensor, span = timed("read_wait", reads.popleft().result)
            module = info.name.removesuffix(".weight")
            cfg = job.targets.get(module) if info.name.endswith(".weight") else None
            if cfg is None:
                outputs, row, held = {info.name: tensor}, None, span
            else:
                try:
                    on_device = tensor.to(device)  # a GPU copy is done when this returns
                    if on_device is not tensor:
                        give_back(span)
                        span = None
                    qweight, report = quantize_with_report(
                        info.name, on_device, cfg, backend=backend
                    )
                    del on_device
                finally:
                    give_back(span)
                outputs = {f"{module}.{k}": v.cpu() for k, v in qweight.state_dict().items()}
                row, held = report.to_dict(), None
                del qweight  # its device copy must not live on while the next tensor is quantized
            del tensor
            while len(writes) >= write_behind:  # bounded: outputs waiting to be written
                timed("write_wait", writes.popleft().result)
            writes.append(writing.submit(timed, "write", write, index, outputs, row, held))
            del outputs
            if bar is not None:
                bar.update(1)
        while writes:
            timed("write_wait", writes.popleft().result)
    finally:
        if arena is not None:
            arena.close()  # a read waiting for room gives up if the pass failed
        # On an error: let the read and write in flight finish (the caller aborts the writer).
        reader.shutdown(wait=True)
        writing.shutdown(wait=True)
        if arena is not None:
            arena.release()
        if bar is not None:
            bar.close()
    times.wall = time.perf_counter() - started
    timed("close", writer.close)  # the last shard, written and synced
    return times


def quantize_model(
    model_or_path: nn.Module | str | Path | Source,
    config: QuantConfig | None = None,
    out_dir: str | Path | None = None,
    *,
    selection: Selection | None = None,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = False,
    log: Callable[[str], None] | None = default_log,
    world: World | None = None,
    target_bpw: float | None = None,
    overlap: bool = True,
) -> QuantizeResult:
    """Quantize a model and save it as a Hugging Face style directory at ``out_dir``.

    ``model_or_path``: a model directory (config.json + safetensors, single or sharded), a GGUF
    file, or an in-memory transformers model (read, not modified; pass ``tokenizer`` to save it
    too). ``selection`` picks the Linear weights (default: all of the decoder blocks) and
    per-module overrides. ``device`` is where quantization runs. The directory appears only when
    complete; ``overwrite`` replaces an existing one at the end; ``resume`` continues an
    interrupted run with the same settings. ``world`` (from
    :func:`easyquant.models.distributed.init_world`): this process is one rank of a distributed
    run; every rank calls this with the same arguments and quantizes its share of the tensors.
    ``target_bpw``: choose each weight's outlier sigma and group size for the least total
    error within that average of bits per weight (:func:`easyquant.models.budget.plan_budget`,
    a first pass over the weights; under ``world`` rank 0 plans and broadcasts the plan).
    ``overlap``: read, quantize and write in three threads (:func:`quantize_tensors`); False
    keeps one tensor in host memory at a time. Load the result with :func:`load_quantized`.
    """
    if out_dir is None:
        raise ValueError("quantize_model needs out_dir, the directory to write")
    config = config or QuantConfig()
    selection = selection or Selection()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available")
    if target_bpw is not None:
        from easyquant.models.budget import check_target, plan_budget, plan_budget_shared

        check_target(target_bpw)
        planned = selection
        opened: list[Source] = []

        def budget_plan() -> Selection:
            # The process that plans (under torchrun: rank 0) opens the input once for both
            # passes (a GGUF file is loaded whole); the other ranks open it for their share.
            check_output(out_dir, overwrite)  # before the (long) first pass
            opened.append(open_source(model_or_path, tokenizer))
            return plan_budget(
                opened[0],
                config,
                target_bpw,
                selection=planned,
                tokenizer=tokenizer,
                device=device,
                backend=backend,
                progress=progress and (world is None or world.is_main),
                log=log,
            )

        selection = plan_budget_shared(world, budget_plan)
        if opened:
            model_or_path = opened[0]
    if world is not None:
        from easyquant.models.distributed import quantize_distributed

        return quantize_distributed(
            world,
            model_or_path,
            config,
            out_dir,
            selection=selection,
            tokenizer=tokenizer,
            device=device,
            backend=backend,
            shard_size=shard_size,
            overwrite=overwrite,
            resume=resume,
            progress=progress,
            log=log,
            overlap=overlap,
        )
    start_cuda(device)
    job = prepare(model_or_path, config, out_dir, selection, tokenizer, shard_size, overwrite)
    writer = OutputWriter(out_dir, job.fingerprint, shard_size, overwrite, resume, log)
    try:
        times = quantize_tensors(
            job, job.source.tensors, writer, device, backend, progress, overlap
        )
        report = functools.partial(job.report, **times.to_dict(), overlap=overlap)
        path = writer.finish(job.hf_config(), report, job.source.write_extras)
    except BaseException:
        writer.abort()
        raise
    return QuantizeResult.from_rows(path, writer.reports)
