import json

import pytest
import torch
from torch import nn

from easyquant import FORMAT_VERSION, QuantConfig, QuantLinear, quantize_tensor
from easyquant.models import Selection, is_quantized, load_quantized, quantize_model
from easyquant.models.errors import ModelInputError
from easyquant.models.safetensors_io import read_header, read_tensor
from tests.conftest import rewrite_as_format_1, tiny_llama

CONFIG = QuantConfig(steps=20)


def dequantized_reference(model: nn.Module, config: QuantConfig, selection: Selection) -> nn.Module:
    """``model`` with every selected Linear weight replaced by its quantize -> dequantize image,
    computed independently of the pipeline (quantization is deterministic)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and selection.wants(name, tuple(module.weight.shape)):
            cfg = selection.config_for(name, config)
            module.weight.data = quantize_tensor(module.weight.data, cfg).dequantize()
    return model


def logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    tokens = torch.randint(
        0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        return model(tokens).logits


@pytest.mark.parametrize(
    ("model_changes", "config", "selection"),
    [
        ({}, CONFIG, Selection()),
        (
            {"attention_bias": True, "tie_word_embeddings": False},
            CONFIG.replace(group_size=32, bits=3),
            Selection.build(exclude=["*.k_proj"], overrides={"*.down_proj": {"bits": 8}}),
        ),
    ],
)
def test_loaded_logits_equal_the_dequantized_reference(tmp_path, model_changes, config, selection):
    model = tiny_llama(seed=3, **model_changes)
    quantize_model(model, config, tmp_path / "q", selection=selection, log=None)
    loaded = load_quantized(tmp_path / "q")
    assert not loaded.training
    quantized = {n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    expected = {
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and selection.wants(n, tuple(m.weight.shape))
    }
    assert quantized == expected and quantized
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    reference = dequantized_reference(model, config, selection)
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-5, atol=1e-5)
    # and the quantization changed something: the reference is not the original model
    assert not torch.allclose(logits(tiny_llama(seed=3, **model_changes)), logits(reference))


def test_dtype_casts_everything_but_the_stored_quantized_tensors(tmp_path):
    model = tiny_llama(seed=4, attention_bias=True)
    quantize_model(model, CONFIG, tmp_path / "q", log=None)
    fp32 = load_quantized(tmp_path / "q")
    bf16 = load_quantized(tmp_path / "q", dtype=torch.bfloat16)
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16
    q_proj = bf16.model.layers[0].self_attn.q_proj
    assert q_proj.bias.dtype == torch.bfloat16
    assert q_proj.scales.dtype == torch.float16  # stored scales are never re-rounded
    assert torch.equal(q_proj.scales, fp32.model.layers[0].self_attn.q_proj.scales)
    out = logits(bf16)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), logits(fp32), rtol=0.1, atol=0.1)


@pytest.fixture
def quantized_dir(tmp_path):
    quantize_model(tiny_llama(seed=5), CONFIG, tmp_path / "q", log=None)
    return tmp_path / "q"


def edit_config(directory, edit):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_is_quantized(quantized_dir, tiny_llama_dir, tmp_path):
    assert is_quantized(quantized_dir)
    assert not is_quantized(tiny_llama_dir)
    assert not is_quantized(tmp_path / "nothing")


def test_refuses_another_format_version(quantized_dir):
    edit_config(quantized_dir, lambda c: c["quantization_config"].update(format_version=99))
    with pytest.raises(
        ModelInputError,
        match=f"version 99; this easyquant reads versions 1, 2, 3, {FORMAT_VERSION}",
    ):
        load_quantized(quantized_dir)


def test_reads_a_format_1_checkpoint(tmp_path):
    """Checkpoints written before format 2 (CSR positions) load with the same logits."""
    model = tiny_llama(seed=4)
    config = CONFIG.replace(outlier_sigma=2.5)
    quantize_model(model, config, tmp_path / "q", log=None)
    current = load_quantized(tmp_path / "q")
    rewrite_as_format_1(tmp_path / "q")
    entries = read_header(next((tmp_path / "q").glob("*.safetensors")))[0]
    names = [e.name for e in entries if "outlier" in e.name]
    assert any(k.endswith(".outlier_indptr") for k in names)
    assert not any(k.endswith(".outlier_counts") for k in names)
    old = load_quantized(tmp_path / "q")
    assert sum(m.outlier_values.numel() for m in old.modules() if isinstance(m, QuantLinear)) > 0
    assert torch.equal(logits(old), logits(current))


def test_refuses_a_directory_that_is_not_easyquant(tiny_llama_dir, tmp_path):
    with pytest.raises(ModelInputError, match="not an easyquant model"):
        load_quantized(tiny_llama_dir)
    with pytest.raises(FileNotFoundError):
        load_quantized(tmp_path / "missing")


def test_refuses_shapes_that_do_not_match_the_config(quantized_dir):
    edit_config(quantized_dir, lambda c: c.update(intermediate_size=96))
    with pytest.raises(ModelInputError, match=r"mlp\.\w+_proj is stored as \[(128|64), (64|128)\]"):
        load_quantized(quantized_dir)


def test_refuses_a_missing_tensor(quantized_dir):
    from easyquant.models.safetensors_io import ShardWriter

    path = quantized_dir / "model.safetensors"
    entries, _ = read_header(path)
    tensors = {e.name: read_tensor(e) for e in entries}
    writer = ShardWriter(path)
    for name, tensor in tensors.items():
        if name != "model.layers.1.mlp.up_proj.scales":
            writer.add(name, tensor)
    writer.close()
    with pytest.raises(
        ModelInputError, match=r"lacks tensor 'model\.layers\.1\.mlp\.up_proj\.scales'"
    ):
        load_quantized(quantized_dir)


def test_refuses_a_wrong_dtype(quantized_dir):
    from easyquant.models.safetensors_io import ShardWriter

    path = quantized_dir / "model.safetensors"
    entries, _ = read_header(path)
    tensors = {e.name: read_tensor(e) for e in entries}
    writer = ShardWriter(path)
    for name, tensor in tensors.items():
        if name == "model.layers.0.self_attn.v_proj.qweight":
            tensor = tensor.to(torch.int32)
        writer.add(name, tensor)
    writer.close()
    with pytest.raises(
        ModelInputError, match=r"v_proj: quantized weight tensor 'qweight' is torch.int32"
    ):
        load_quantized(quantized_dir)


def test_refuses_a_truncated_shard(quantized_dir):
    path = quantized_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelInputError, match="truncated"):
        load_quantized(quantized_dir)
