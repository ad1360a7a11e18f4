"""Shared test helpers. Tests read real data from ../shared (beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# Without a GPU the Triton kernels run under the interpreter. The variable must be set before
# anything imports triton (torch._dynamo and transformers may, from any test module), so here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext2" / "wiki.test.raw"


def student_t(rows: int, cols: int, df: float = 5.0, scale: float = 0.02, seed: int = 0):
    """Heavy-tailed weights like an LLM's (Student-t), reproducible."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.distributions.StudentT(df).sample((rows, cols)) * scale


@pytest.fixture
def heavy_weight() -> torch.Tensor:
    return student_t(96, 256, seed=1)


# ---- tiny transformers models (tests/models, tests/commands) ------------------------------------
TINY_LLAMA = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def tiny_llama(seed: int = 0, **changes):
    """A small random LlamaForCausalLM (fp32, eval mode) built from a config, reproducible."""
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **changes}))
    return model.eval()


def save_tiny_llama(directory: Path, seed: int = 0, max_shard_size: str | None = None, **changes):
    """A tiny Llama saved as a Hugging Face directory (safetensors), with a tokenizer stand-in."""

    model = tiny_llama(seed, **changes)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama saved in two safetensors shards (session-wide: do not modify)."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    save_tiny_llama(directory, max_shard_size="100KB")
    return directory


def rewrite_as_format_1(directory: Path) -> None:
    """Rewrite an easyquant checkpoint as format version 1 wrote it: the outliers' positions as
    CSR (``outlier_indptr`` int32, ``outlier_indices``), version 1 in ``meta`` and config.json."""
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from easyquant.format.outlier_store import decode

    renamed: dict[str, str] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for key in [k for k in tensors if k.endswith(".outlier_counts")]:
            prefix = key.removesuffix("outlier_counts")
            meta = tensors[prefix + "meta"].clone()
            indptr, indices = decode(
                tensors.pop(key), tensors.pop(prefix + "outlier_columns"), int(meta[4])
            )
            meta[0] = 1
            tensors.update({prefix + "outlier_indptr": indptr, prefix + "outlier_indices": indices})
            tensors[prefix + "meta"] = meta
            renamed[prefix + "outlier_counts"] = prefix + "outlier_indptr"
            renamed[prefix + "outlier_columns"] = prefix + "outlier_indices"
        save_file(tensors, shard, metadata=metadata)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {renamed.get(k, k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"]["format_version"] = 1
    (directory / "config.json").write_text(json.dumps(config))
