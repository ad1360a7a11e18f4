"""``quantize_model``: a model in (directory, GGUF file or in-memory), a quantized directory out.

The pass is one loop over the input's tensors in storage order: a selected Linear weight becomes
its packed tensors (``<module>.qweight``, ``.scales``, ``.outlier_*``, ``.meta``: QuantLinear's
state_dict names); every other tensor is copied under its own name. One tensor is in memory at a
time, so quantizing a safetensors directory needs about the largest tensor and its quantization
temporaries, whatever the model size.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easyquant.config import QuantConfig
from easyquant.format.qweight import FLOAT_DTYPES, FORMAT_VERSION
from easyquant.models.errors import ModelInputError
from easyquant.models.select import Selection, TensorReport, quantize_with_report
from easyquant.models.sources import Source, open_source
from easyquant.models.writer import OutputWriter, check_output

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
        cfg = selection.config_for(module, config)
        if cfg.group_size is not None and shape[1] % cfg.group_size:
            raise ModelInputError(
                f"group size {cfg.group_size} does not divide the {shape[1]} input features of "
                f"{module}; choose a divisor or per-channel ranges"
            )
        targets[module] = cfg
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


def quantize_model(
    model_or_path: nn.Module | str | Path,
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
) -> QuantizeResult:
    """Quantize a model and save it as a Hugging Face style directory at ``out_dir``.

    ``model_or_path``: a model directory (config.json + safetensors, single or sharded), a GGUF
    file, or an in-memory transformers model (read, not modified; pass ``tokenizer`` to save it
    too). ``selection`` picks the Linear weights (default: all of the decoder blocks) and
    per-module overrides. ``device`` is where quantization runs. The directory appears only when
    complete; ``overwrite`` replaces an existing one at the end; ``resume`` continues an
    interrupted run with the same settings. Load the result with :func:`load_quantized`.
    """
    if out_dir is None:
        raise ValueError("quantize_model needs out_dir, the directory to write")
    config = config or QuantConfig()
    selection = selection or Selection()
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} was asked for but CUDA is not available")
    started = time.perf_counter()
    check_output(out_dir, overwrite)  # before the (possibly long) read of the input
    source = open_source(model_or_path, tokenizer)
    targets = plan(source, config, selection)
    fingerprint = {
        "format_version": FORMAT_VERSION,
        "source": source.fingerprint(),
        "config": config.to_dict(),
        "selection": selection.to_dict(),
        "shard_size": shard_size,
    }
    writer = OutputWriter(out_dir, fingerprint, shard_size, overwrite, resume, log)
    try:
        todo = list(enumerate(source.tensors))[writer.done :]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=len(source.tensors), initial=writer.done, unit="tensor", file=sys.stderr
            )
        for index, info in todo:
            tensor = source.load(info.name)
            module = info.name.removesuffix(".weight")
            cfg = targets.get(module) if info.name.endswith(".weight") else None
            if cfg is None:
                writer.add(index, {info.name: tensor}, None)
            else:
                qweight, report = quantize_with_report(
                    info.name, tensor.to(device), cfg, backend=backend
                )
                outputs = {f"{module}.{k}": v.cpu() for k, v in qweight.state_dict().items()}
                writer.add(index, outputs, report.to_dict())
            del tensor
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        hf_config = {
            **source.config,
            "quantization_config": quantization_config(config, selection, list(targets)),
        }

        def report(rows: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "format_version": FORMAT_VERSION,
                "source": source.description,
                "config": config.to_dict(),
                "selection": selection.to_dict(),
                "note": REFERENCE_NOTE,
                "totals": {
                    **summarize(rows),
                    "source_bytes": source.nbytes,
                    "wall_seconds": time.perf_counter() - started,
                },
                "tensors": rows,
            }

        path = writer.finish(hf_config, report, source.write_extras)
    except BaseException:
        writer.abort()
        raise
    rows = writer.reports
    reports = [TensorReport(**{**r, "shape": tuple(r["shape"])}) for r in rows]
    return QuantizeResult(path, reports, summarize(rows))
