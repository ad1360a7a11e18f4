"""``load_quantized``: a directory written by :func:`quantize_model` back as a transformers model.

The model is built from config.json with its parameters on the meta device, the quantized Linear
modules are replaced by :class:`QuantLinear` holding the stored tensors, every other tensor is
checked (shape, dtype) and assigned, tied weights are tied again, and anything still missing is
an error. Nothing is initialised randomly and nothing is loaded twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easyquant.format.qweight import READABLE_VERSIONS, QuantizedWeight, state_keys
from easyquant.models.errors import ModelInputError
from easyquant.models.hf import build_skeleton, hf_config_from_dict
from easyquant.models.pipeline import QUANT_METHOD
from easyquant.models.safetensors_io import TensorEntry, read_header, read_tensor
from easyquant.models.sources import INDEX_FILE, SINGLE_FILE, read_config
from easyquant.nn.quant_linear import QuantLinear


def quantization_config_of(path: str | Path) -> dict[str, Any] | None:
    """The easyquant ``quantization_config`` of a directory, or None if it is not one of ours."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        return None
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD:
        return qc
    return None


def is_quantized(path: str | Path) -> bool:
    """Is ``path`` a directory written by :func:`quantize_model`?"""
    return Path(path).is_dir() and quantization_config_of(path) is not None


def checkpoint_entries(directory: Path) -> dict[str, TensorEntry]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelInputError(f"{index} is corrupt") from exc
    else:
        files = [SINGLE_FILE]
    entries: dict[str, TensorEntry] = {}
    for name in files:
        path = directory / name
        if not path.is_file():
            raise ModelInputError(f"{directory} is incomplete: {name} is missing")
        entries.update((e.name, e) for e in read_header(path)[0])
    return entries


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def load_quantized(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> nn.Module:
    """Load a quantized directory as a transformers model in eval mode.

    Quantized Linear layers are :class:`QuantLinear` (their forward computes in the input's
    dtype). ``dtype`` casts every other floating tensor (embeddings, norms, biases, lm_head);
    None keeps the dtypes stored. Shapes, dtypes and the format version are checked.
    """
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"no such directory: {directory}")
    if not directory.is_dir():
        raise ModelInputError(f"{directory} is not a directory")
    config = read_config(directory)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        raise ModelInputError(
            f"{directory} is not an easyquant model (config.json has no quantization_config "
            f"with quant_method {QUANT_METHOD!r})"
        )
    version = qc.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ModelInputError(
            f"{directory} uses easyquant format version {version}; this easyquant reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    modules = qc.get("quantized_modules")
    if not isinstance(modules, list):
        raise ModelInputError(f"{directory}/config.json lacks the list of quantized modules")
    entries = checkpoint_entries(directory)
    model = build_skeleton(hf_config_from_dict(config))
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        entry = entries.get(name)
        if entry is None:
            raise ModelInputError(f"{directory} lacks tensor {name!r}")
        used.add(name)
        return read_tensor(entry)

    for module_name in modules:
        try:
            linear = model.get_submodule(module_name)
        except AttributeError as exc:
            raise ModelInputError(f"the model has no module {module_name!r}") from exc
        if not isinstance(linear, nn.Linear):
            raise ModelInputError(f"{module_name!r} is a {type(linear).__name__}, not a Linear")
        state = {key: take(f"{module_name}.{key}") for key in state_keys(version)}
        try:
            qweight = QuantizedWeight.from_state_dict(state)
        except ValueError as exc:
            raise ModelInputError(f"{module_name}: {exc}") from exc
        expected = (linear.out_features, linear.in_features)
        if qweight.shape != expected:
            raise ModelInputError(
                f"{module_name} is stored as {list(qweight.shape)} but the model expects "
                f"{list(expected)}"
            )
        bias = None
        if linear.bias is not None:
            bias = checked(f"{module_name}.bias", take(f"{module_name}.bias"), linear.bias, dtype)
        replace_module(model, module_name, QuantLinear(qweight, bias))

    expected_tensors = dict(model.state_dict(keep_vars=True))
    rest: dict[str, torch.Tensor] = {}
    for name in entries:
        if name in used:
            continue
        if name not in expected_tensors:
            raise ModelInputError(
                f"{directory} holds tensor {name!r}, which the model does not have"
            )
        rest[name] = checked(name, take(name), expected_tensors[name], dtype)
    model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if missing:
        raise ModelInputError(f"{directory} lacks tensor(s) {missing[:5]}")
    if dtype is not None and hasattr(model, "config"):
        model.config.dtype = dtype
    return model.to(device).eval()


def checked(
    name: str, tensor: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None
) -> torch.Tensor:
    """``tensor`` if it fits where ``like`` sits (shape, kind of dtype), cast to ``dtype``."""
    if tuple(tensor.shape) != tuple(like.shape):
        raise ModelInputError(
            f"tensor {name!r} has shape {list(tensor.shape)}, the model expects {list(like.shape)}"
        )
    if tensor.is_floating_point() != like.is_floating_point():
        raise ModelInputError(f"tensor {name!r} has dtype {tensor.dtype}, expected {like.dtype}")
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor
