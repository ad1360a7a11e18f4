"""Model inputs as one interface: a list of named tensors read one at a time, plus the model's
config, which of its modules are ``nn.Linear``, and the files that travel with it (tokenizer...).

- :class:`SafetensorsDirSource`: a Hugging Face directory, single-file or sharded safetensors.
  Tensors are read from disk one by one; the model is never built (its skeleton is, on the meta
  device, only to learn which tensors are Linear weights).
- :class:`ModuleSource`: an in-memory transformers model (and optionally its tokenizer).
- GGUF files: transformers dequantizes them and maps names (it also undoes llama.cpp's q/k
  permutation), so :func:`open_gguf` loads the model and wraps it in a :class:`ModuleSource`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easyquant.models.errors import ModelInputError, one_line
from easyquant.models.hf import (
    build_skeleton,
    hf_config_from_dict,
    linear_modules,
    linears_from_names,
)
from easyquant.models.safetensors_io import TensorEntry, read_header, read_tensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
# Files of a source directory that we write ourselves rather than copy.
NOT_COPIED = {"config.json", INDEX_FILE, "quant_report.json"}
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class SourceTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


class Source:
    """What the pipeline needs from an input model."""

    description: str
    config: dict[str, Any]  # config.json contents
    tensors: list[SourceTensor]  # in the order they are written
    linears: dict[str, tuple[int, int]]  # nn.Linear module name -> (out, in)

    reads_files: bool = False  # load() reads each tensor from disk (and can fill a buffer)

    def load(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor. ``out``: a uint8 buffer of exactly its bytes to read it into, used by a
        source that reads files (:attr:`reads_files`); the others return their own tensor."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What identifies this input, so that --resume refuses to mix two different ones."""
        raise NotImplementedError

    def write_extras(self, out_dir: Path) -> None:
        """Tokenizer, generation config and other files that go next to the weights."""
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def read_config(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    if not path.is_file():
        raise ModelInputError(f"{directory} is not a model directory: it has no config.json")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelInputError(f"{path} is not valid JSON ({one_line(exc)})") from exc
    if not isinstance(config, dict):
        raise ModelInputError(f"{path} is not a JSON object")
    return config


class SafetensorsDirSource(Source):
    """A Hugging Face style model directory. ``layout_from_names``: for the architectures of
    :data:`~easyquant.models.hf.LAYOUT_BY_NAME`, find the Linear weights by name instead of
    building the model with transformers (same result, seconds faster)."""

    def __init__(self, directory: Path, layout_from_names: bool = True) -> None:
        self.directory = directory
        self.description = str(directory)
        self.config = read_config(directory)
        quantized = self.config.get("quantization_config")
        if isinstance(quantized, dict) and quantized.get("quant_method"):
            raise ModelInputError(
                f"{directory} is already quantized (quant_method "
                f"{quantized['quant_method']!r}); quantize its full-precision checkpoint"
            )
        self.files = self._weight_files()
        self.entries: dict[str, TensorEntry] = {}
        self.headers: list[tuple[str, int, str]] = []
        for file in self.files:
            entries, raw = read_header(file)
            self.headers.append((file.name, file.stat().st_size, hashlib.sha256(raw).hexdigest()))
            for entry in entries:
                if entry.name in self.entries:
                    raise ModelInputError(f"tensor {entry.name!r} is stored twice in {directory}")
                self.entries[entry.name] = entry
        self._check_index()
        self.tensors = [
            SourceTensor(e.name, e.shape, e.dtype, e.nbytes) for e in self.entries.values()
        ]
        weights = [(t.name, t.shape) for t in self.tensors]
        model_type = self.config.get("model_type") if layout_from_names else None
        by_name = linears_from_names(model_type, weights)  # None: not a known layout
        self.linears = (
            by_name
            if by_name is not None
            else linear_modules(build_skeleton(hf_config_from_dict(self.config)))
        )

    def _weight_files(self) -> list[Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                names = list(dict.fromkeys(weight_map.values()))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ModelInputError(f"{index} is corrupt ({one_line(exc)})") from exc
            files = [self.directory / name for name in names]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise ModelInputError(f"{self.directory} is incomplete: missing shard(s) {missing}")
            return files
        single = self.directory / SINGLE_FILE
        if single.is_file():
            return [single]
        others = sorted(self.directory.glob("*.safetensors"))
        if len(others) == 1:
            return others
        if any(self.directory.glob("*.bin")):
            raise ModelInputError(
                f"{self.directory} holds PyTorch .bin weights only; easyquant reads safetensors "
                "(load the model with transformers and save it with safe_serialization)"
            )
        raise ModelInputError(f"{self.directory} is not a model directory: no safetensors weights")

    def _check_index(self) -> None:
        index = self.directory / INDEX_FILE
        if not index.is_file():
            return
        weight_map = json.loads(index.read_text())["weight_map"]
        for name, file in weight_map.items():
            entry = self.entries.get(name)
            if entry is None or entry.file.name != file:
                raise ModelInputError(
                    f"{index} is inconsistent: it puts {name!r} in {file}, which does not hold it"
                )

    reads_files = True

    def load(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return read_tensor(self.entries[name], out)

    def fingerprint(self) -> dict[str, Any]:
        return {"source": str(self.directory.resolve()), "files": self.headers}

    def write_extras(self, out_dir: Path) -> None:
        for path in sorted(self.directory.iterdir()):
            if (
                path.is_file()
                and not path.name.startswith(".")
                and path.name not in NOT_COPIED
                and not path.name.endswith(WEIGHT_SUFFIXES)
            ):
                shutil.copy2(path, out_dir / path.name)


class ModuleSource(Source):
    """An in-memory transformers model; it is read, never modified."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        description: str = "",
        identity: dict[str, Any] | None = None,
    ) -> None:
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            raise ModelInputError(
                f"quantize_model needs a transformers model (with .config), got "
                f"{type(model).__name__}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.identity = identity or {}  # e.g. size and mtime of the file the model came from
        self.description = description or f"in-memory {type(model).__name__}"
        self.config = config.to_dict()
        self.config.pop("quantization_config", None)
        self.state: dict[str, torch.Tensor] = {}
        seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
        for name, tensor in model.state_dict().items():
            # Tied weights (lm_head = embed_tokens) share storage: keep the first name only, as
            # save_pretrained does; loading ties them again.
            key = (tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
            if tensor.numel() and key in seen:
                continue
            seen.add(key)
            self.state[name] = tensor
        self.tensors = [
            SourceTensor(n, tuple(t.shape), t.dtype, t.numel() * t.element_size())
            for n, t in self.state.items()
        ]
        self.linears = linear_modules(model)

    def load(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.state[name].detach()  # already in memory

    def fingerprint(self) -> dict[str, Any]:
        layout = [(t.name, list(t.shape), str(t.dtype)) for t in self.tensors]
        digest = hashlib.sha256(json.dumps(layout).encode()).hexdigest()
        return {"source": self.description, "layout": digest, **self.identity}

    def write_extras(self, out_dir: Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out_dir))
        generation = getattr(self.model, "generation_config", None)
        if generation is not None and hasattr(generation, "save_pretrained"):
            generation.save_pretrained(str(out_dir))


def check_gguf(path: Path) -> None:
    """Refuse a file that is not GGUF, or a truncated/corrupt one, before transformers reads it."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelInputError(f"{path} is not a GGUF file")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as exc:  # the reader fails in many ways on a damaged file
        raise ModelInputError(
            f"{path} is a corrupt or truncated GGUF file ({one_line(exc)})"
        ) from exc
    if end > path.stat().st_size:
        raise ModelInputError(f"{path} is a truncated GGUF file")


def open_gguf(path: Path, dtype: torch.dtype = torch.float32) -> ModuleSource:
    """Load a GGUF file with transformers (dequantized to ``dtype``) with its tokenizer."""
    check_gguf(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        raise ModelInputError(f"transformers cannot load {path}: {one_line(exc)[:200]}") from exc
    stat = path.stat()
    identity = {"file_bytes": stat.st_size, "file_mtime_ns": stat.st_mtime_ns}
    return ModuleSource(model.eval(), tokenizer, description=str(path.resolve()), identity=identity)


def open_source(source: str | Path | nn.Module | Source, tokenizer: Any = None) -> Source:
    """A :class:`Source` for a model directory, a GGUF file, or an in-memory model (a Source
    already open is returned as it is)."""
    if isinstance(source, Source):
        return source
    if isinstance(source, nn.Module):
        return ModuleSource(source, tokenizer)
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no such file or directory: {path}")
    if path.is_dir():
        return SafetensorsDirSource(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix.lower() == ".gguf" or magic == GGUF_MAGIC:
        return open_gguf(path)
    raise ModelInputError(
        f"{path} is not a model: give a Hugging Face model directory (config.json + safetensors) "
        "or a .gguf file"
    )
