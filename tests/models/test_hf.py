"""The Linear layout read from a checkpoint's names agrees with transformers' own skeleton."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from easyquant.models.hf import LAYOUT_BY_NAME, linears_from_names
from easyquant.models.sources import SafetensorsDirSource

TINY = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 11,  # two-digit layer numbers: the order must be numeric
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 128,
}


def save_tiny(directory, model_type: str, tied: bool):
    config = AutoConfig.for_model(model_type, **TINY, tie_word_embeddings=tied)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("model_type", sorted(LAYOUT_BY_NAME))
def test_layout_from_names_equals_the_skeleton(tmp_path, model_type, tied):
    save_tiny(tmp_path, model_type, tied)
    by_name = SafetensorsDirSource(tmp_path)
    by_skeleton = SafetensorsDirSource(tmp_path, layout_from_names=False)
    present = {t.name for t in by_skeleton.tensors}
    expected = [(m, s) for m, s in by_skeleton.linears.items() if f"{m}.weight" in present]
    assert list(by_name.linears.items()) == expected  # same modules, shapes and order
    assert ("lm_head" in by_name.linears) == (not tied)


def test_unknown_architectures_and_unknown_weights_go_to_the_skeleton():
    weights = [("model.layers.0.self_attn.q_proj.weight", (8, 8)), ("model.norm.weight", (8,))]
    assert linears_from_names("gpt2", weights) is None
    assert linears_from_names(None, weights) is None
    assert linears_from_names("llama", weights) == {"model.layers.0.self_attn.q_proj": (8, 8)}
    extra = [*weights, ("model.layers.0.mlp.router.weight", (4, 8))]
    assert linears_from_names("llama", extra) is None
