"""transformers integration: from_pretrained of quantized directories, save_pretrained round trips,
quantize on load (data-free), generate, version guard, import hook. A tiny random Llama."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from easyquant import QuantConfig, QuantLinear
from easyquant.integrations import install_import_hook, is_registered, register
from easyquant.integrations import transformers as hf
from easyquant.models import Selection, load_quantized, quantize_model, quantize_model_inplace
from tests.conftest import REPO, rewrite_as_format_1, save_tiny_llama

register()

# Group ranges on most layers, 3-bit per-channel down_proj, k_proj without outliers (empty CSR),
# v_proj's outliers as int8 codes.
CONFIG = QuantConfig(bits=4, group_size=32, steps=10)
SELECTION = Selection.build(
    overrides={
        "*.down_proj": {"bits": 3, "group_size": None},
        "*.k_proj": {"outlier_sigma": None},
        "*.v_proj": {"outlier_dtype": "int8"},
    }
)
IDS = torch.tensor([[1, 5, 17, 42, 7, 88, 3, 64, 12, 9], [4, 4, 90, 31, 2, 60, 8, 15, 77, 6]])


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf-integration")
    save_tiny_llama(root / "fp", seed=3)
    quantize_model(root / "fp", CONFIG, root / "q", selection=SELECTION, log=None)
    return {"fp": root / "fp", "q": root / "q", "root": root}


def quantization_config(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())["quantization_config"]


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def test_registered_through_public_hooks():
    assert is_registered()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["easyquant"] is hf.EasyQuantConfig
    assert AUTO_QUANTIZER_MAPPING["easyquant"] is hf.EasyQuantHfQuantizer
    register()  # idempotent


def test_from_pretrained_builds_quantlinear_with_load_quantized_logits(dirs):
    model = AutoModelForCausalLM.from_pretrained(dirs["q"])
    modules = quantization_config(dirs["q"])["quantized_modules"]
    assert len(modules) == 14
    for name in modules:
        assert isinstance(model.get_submodule(name), QuantLinear), name
    reference = load_quantized(dirs["q"])
    for name in modules:  # the stored tensors, bit for bit, dtypes included
        ours, theirs = model.get_submodule(name), reference.get_submodule(name)
        keys = ("qweight", "scales", "outlier_counts", "outlier_columns", "outlier_values")
        for key in (*keys, "outlier_indptr", "outlier_indices"):
            a, b = getattr(ours, key), getattr(theirs, key)
            assert a.dtype == b.dtype and torch.equal(a, b), (name, key)
    assert model.get_submodule(modules[1]).outlier_values.numel() == 0  # k_proj: no outliers
    v_proj = model.get_submodule(modules[2]).outlier_values
    assert v_proj.dtype == torch.int8 and v_proj.numel()  # int8 codes, as stored
    assert model.get_submodule(modules[6]).bits == 3  # down_proj override
    assert torch.equal(logits(model), logits(reference))
    assert model.config.quantization_config.to_dict() == quantization_config(dirs["q"])


def assert_saved_as(saved: Path, original: Path) -> None:
    """``saved`` holds ``original``'s config and tensors, dtypes included, bit for bit."""
    assert quantization_config(saved) == quantization_config(original)
    before, after = tensors(original), tensors(saved)
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name


def test_save_pretrained_round_trips(dirs, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(dirs["q"])
    model.save_pretrained(tmp_path / "saved")
    assert_saved_as(tmp_path / "saved", dirs["q"])
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(logits(again), logits(model))
    assert torch.equal(logits(load_quantized(tmp_path / "saved")), logits(model))


def test_a_format_1_checkpoint_loads_and_saves_as_the_current_format(dirs, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(dirs["q"], old)
    rewrite_as_format_1(old)
    assert quantization_config(old)["format_version"] == 1
    model = AutoModelForCausalLM.from_pretrained(old)
    assert torch.equal(logits(model), logits(load_quantized(dirs["q"])))
    model.save_pretrained(tmp_path / "saved")
    assert_saved_as(tmp_path / "saved", dirs["q"])


def test_quantize_on_load_equals_quantize_model_inplace(dirs, monkeypatch):
    # Record, when each quantized weight arrives, whether the model's slot for that weight still
    # holds nothing (meta): the full-precision weight went to the quantizer, not into the model.
    arrivals: list[tuple[str, bool]] = []
    store = hf.PendingQuantLinear.store

    def spy(self, qweight):
        arrivals.append((str(qweight.shape), self.weight.is_meta))
        store(self, qweight)

    monkeypatch.setattr(hf.PendingQuantLinear, "store", spy)
    config = hf.EasyQuantConfig.from_quant_config(CONFIG, SELECTION)
    model = AutoModelForCausalLM.from_pretrained(dirs["fp"], quantization_config=config)
    assert config.quantized_modules is None  # the caller's config is left alone
    reference = AutoModelForCausalLM.from_pretrained(dirs["fp"])
    quantize_model_inplace(reference, CONFIG, SELECTION)
    names = [n for n, m in reference.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14 and len(arrivals) == 14
    assert all(slot_empty for _, slot_empty in arrivals)
    for name in names:
        ours, theirs = model.get_submodule(name), reference.get_submodule(name)
        assert isinstance(ours, QuantLinear), name
        for key, tensor in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], tensor), (name, key)
    assert torch.equal(logits(model), logits(reference))
    saved_config = model.config.quantization_config
    assert saved_config.quantized_modules == names
    assert len(model.hf_quantizer.reports) == 14


def test_quantize_on_load_saves_a_loadable_directory(dirs, tmp_path):
    config = hf.EasyQuantConfig.from_quant_config(CONFIG, SELECTION)
    model = AutoModelForCausalLM.from_pretrained(dirs["fp"], quantization_config=config)
    model.save_pretrained(tmp_path / "saved")
    written = quantization_config(tmp_path / "saved")
    pipeline = quantization_config(dirs["q"])
    assert written == pipeline  # same config, selection and module list as quantize_model's
    assert torch.equal(logits(load_quantized(tmp_path / "saved")), logits(model))
    assert torch.equal(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "saved")), logits(model)
    )


def test_generate_matches_load_quantized(dirs):
    model = AutoModelForCausalLM.from_pretrained(dirs["q"])
    reference = load_quantized(dirs["q"])
    prompt = IDS[:1, :4]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(prompt, **kwargs)
    assert out.shape == (1, 12)
    assert torch.equal(out[:, :4], prompt)
    assert torch.equal(out, reference.generate(prompt, **kwargs))


def test_config_dict_is_the_pipelines(dirs):
    stored = quantization_config(dirs["q"])
    config = hf.EasyQuantConfig.from_dict(stored)
    assert config.to_dict() == stored
    assert config.quant_config == CONFIG
    assert config.selection == SELECTION
    assert dict(config) == stored


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"bits": 7}, "bits must be one of"),
        ({"colour": "red"}, "unknown easyquant quantization_config field"),
        ({"format_version": 99}, "format version 99"),
        ({"overrides": {"*.q_proj": {"bitz": 8}}}, "unknown config field"),
        ({"quantized_modules": "model.layers.0"}, "list of module names"),
    ],
)
def test_bad_config_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        hf.EasyQuantConfig(**fields)


def test_group_size_that_does_not_divide_leaves_a_shorter_last_group(dirs):
    model = AutoModelForCausalLM.from_pretrained(
        dirs["fp"], quantization_config=hf.EasyQuantConfig(group_size=48, steps=1)
    )
    layer = model.model.layers[0].self_attn.q_proj  # 64 input features: groups of 48 and 16
    assert layer.scales.shape == (layer.out_features, 2)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    assert torch.isfinite(model(ids).logits).all()


def test_quantize_on_load_refuses_a_module_list(dirs):
    config = hf.EasyQuantConfig(steps=1, quantized_modules=["model.layers.0.mlp.up_proj"])
    with pytest.raises(ValueError, match="include/exclude"):
        AutoModelForCausalLM.from_pretrained(dirs["fp"], quantization_config=config)


def test_checkpoint_missing_a_tensor_is_refused(dirs, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in dirs["q"].iterdir():
        if path.suffix != ".safetensors":
            (broken / path.name).write_bytes(path.read_bytes())
    state = tensors(dirs["q"])
    del state["model.layers.1.mlp.up_proj.scales"]
    save_file(state, broken / "model.safetensors", metadata={"format": "pt"})
    (broken / "model.safetensors.index.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=r"lacks tensor.*model\.layers\.1\.mlp\.up_proj\.scales"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_version_guard():
    hf.check_transformers_version()  # the installed one is supported
    for version in ("4.46.0", "5.0.0", "6.0.0"):
        with pytest.raises(hf.UnsupportedTransformersError, match=r">= 5\.17, < 6.*found"):
            hf.check_transformers_version(version)


def test_hook_registers_at_once_when_transformers_is_loaded(monkeypatch):
    monkeypatch.delitem(AUTO_QUANTIZATION_CONFIG_MAPPING, "easyquant")
    monkeypatch.delitem(AUTO_QUANTIZER_MAPPING, "easyquant")
    assert not is_registered()
    install_import_hook()
    assert is_registered()


def test_hook_registers_when_transformers_is_imported_later(dirs):
    # A fresh interpreter: importing easyquant.integrations and installing the hook import no
    # transformers; once the user imports it, plain transformers calls load easyquant directories.
    code = f"""
import sys
import easyquant.integrations as integrations
integrations.install_import_hook()
assert "transformers" not in sys.modules
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(dirs["q"])!r})
print(type(model.model.layers[0].mlp.up_proj).__name__)
"""
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "QuantLinear"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_on_load_straight_to_the_gpu(dirs):
    config = hf.EasyQuantConfig.from_quant_config(CONFIG, SELECTION)
    model = AutoModelForCausalLM.from_pretrained(
        dirs["fp"], quantization_config=config, device_map="cuda"
    )
    reference = AutoModelForCausalLM.from_pretrained(dirs["fp"]).cuda()
    quantize_model_inplace(reference, CONFIG, SELECTION)  # on the GPU too: the same backend
    for name, module in reference.named_modules():
        if isinstance(module, QuantLinear):
            ours = model.get_submodule(name)
            assert isinstance(ours, QuantLinear) and ours.qweight.is_cuda, name
            for key, tensor in module.state_dict().items():  # (meta may sit on the CPU)
                assert torch.equal(ours.state_dict()[key].cpu(), tensor.cpu()), (name, key)
    ids = IDS.cuda()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    out = model.generate(ids[:1, :4], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12) and out.is_cuda
