"""Open a model to evaluate: a quantized easyquant directory, a Hugging Face directory or a GGUF.

Everything returned is a transformers causal LM in eval mode plus its tokenizer. GGUF files are
dequantized by transformers on read (its ``gguf`` integration); a quantized easyquant directory is
opened by ``easyquant.models.load_quantized``, imported only when needed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GGUF_MAGIC = b"GGUF"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    kind: str  # "easyquant", "huggingface" or "gguf"
    path: Path


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def parse_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r} (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available here")
    return device


def model_kind(path: Path) -> str:
    """What ``path`` holds: "gguf", "easyquant" or "huggingface"; ``ValueError`` when none."""
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if path.is_file():
        with path.open("rb") as handle:
            magic = handle.read(4)
        if magic != GGUF_MAGIC:
            raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        return "gguf"
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{path} is not a model directory (no config.json)")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{config_path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} does not hold a JSON object")
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "easyquant":
        return "easyquant"
    return "huggingface"


def load_model(model_path: str | Path, device: str = "cpu", dtype: str = "float32") -> LoadedModel:
    """Load ``model_path`` for evaluation on ``device`` with floating weights in ``dtype``."""
    path = Path(model_path)
    torch_device = parse_device(device)
    torch_dtype = parse_dtype(dtype)
    kind = model_kind(path)
    if kind == "easyquant":
        model, tokenizer = load_easyquant(path, torch_device, torch_dtype)
    else:
        model, tokenizer = load_transformers(path, kind, torch_device, torch_dtype)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, kind=kind, path=path)


def load_easyquant(path: Path, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    try:
        from easyquant.models import load_quantized  # type: ignore[attr-defined]
    except ImportError:
        raise ValueError(
            f"{path} is a quantized easyquant directory, but this easyquant cannot load one yet "
            "(easyquant.models.load_quantized is missing)"
        ) from None
    from transformers import AutoTokenizer

    model = load_quantized(path, device=device, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(str(path))


def load_transformers(
    path: Path, kind: str, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "gguf":
        where, extra = str(path.parent), {"gguf_file": path.name}
    else:
        where, extra = str(path), {}
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **extra)
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ValueError(f"cannot load {path} with transformers: {first.strip()}") from None
    return model.to(device), tokenizer
