import json
import math

import pytest
import torch
from safetensors import safe_open

from easyquant import FORMAT_VERSION, QuantConfig, QuantizedWeight
from easyquant.format.qweight import STATE_KEYS
from easyquant.models import Selection, quantize_model
from easyquant.models.errors import ModelInputError, OutputExistsError
from easyquant.models.writer import partial_path
from tests.conftest import save_tiny_llama, tiny_llama

CONFIG = QuantConfig(steps=10)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def read_all(directory):
    """Every tensor of a saved directory, by name."""
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def model_files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.name != "quant_report.json"}


def test_output_directory_layout_config_and_report(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    result = quantize_model(tiny_llama_dir, CONFIG, out, shard_size=40_000, log=None)
    assert result.out_dir == out.absolute()
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= set(names)
    assert {"model.safetensors.index.json", "quant_report.json"} <= set(names)
    assert not partial_path(out).exists()

    config = json.loads((out / "config.json").read_text())
    source_config = json.loads((tiny_llama_dir / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "quantization_config"} == source_config
    qc = config["quantization_config"]
    assert qc["quant_method"] == "easyquant" and qc["format_version"] == FORMAT_VERSION
    assert {k: qc[k] for k in CONFIG.to_dict()} == CONFIG.to_dict()
    expected_modules = [
        f"model.layers.{i}.{part}.{name}"
        for i in range(2)
        for part, name in [("self_attn", n) for n in LINEARS[:4]]
        + [("mlp", n) for n in LINEARS[4:]]
    ]
    assert sorted(qc["quantized_modules"]) == sorted(expected_modules)
    assert qc["include"] == [] and qc["exclude"] == [] and qc["overrides"] == {}

    tensors = read_all(out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == set(shards)
    source = read_all(tiny_llama_dir)
    for module in expected_modules:
        assert f"{module}.weight" not in tensors
        state = {k: tensors[f"{module}.{k}"] for k in STATE_KEYS}
        qweight = QuantizedWeight.from_state_dict(state)
        assert qweight.shape == tuple(source[f"{module}.weight"].shape)
    for name in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.1.input_layernorm.weight",
    ):
        assert torch.equal(tensors[name], source[name])  # untouched, bit for bit
    assert "lm_head.weight" not in tensors  # tied, as in the source

    report = json.loads((out / "quant_report.json").read_text())
    rows = {row["name"]: row for row in report["tensors"]}
    assert set(rows) == {f"{m}.weight" for m in expected_modules}
    for row in rows.values():
        assert 0 <= row["outlier_fraction"] < 0.05
        assert row["bits_per_weight"] > CONFIG.bits
        # EasyQuant keeps RTN's range as a candidate and stores outliers exactly: never worse
        assert row["error"] <= row["rtn_error"] * (1 + 1e-6)
        assert row["seconds"] >= 0
    totals = report["totals"]
    assert totals["quantized_tensors"] == len(expected_modules)
    assert totals["quantized_parameters"] == sum(math.prod(r["shape"]) for r in rows.values())
    assert totals["error"] < totals["rtn_error"]
    assert [r.name for r in result.reports] == [row["name"] for row in report["tensors"]]


def test_shards_respect_the_shard_size(tiny_llama_dir, tmp_path):
    shard_size = 30_000
    quantize_model(tiny_llama_dir, CONFIG, tmp_path / "q", shard_size=shard_size, log=None)
    shards = sorted((tmp_path / "q").glob("model-*.safetensors"))
    assert len(shards) > 2
    for path in shards:
        with safe_open(str(path), framework="pt") as f:
            sizes = {n: f.get_tensor(n).nbytes for n in f.keys()}
        # the outputs of one source tensor (a weight's 6 packed tensors) are never split; a shard
        # goes over the size only when they alone do (the embedding here)
        suffixes = tuple(f".{k}" for k in STATE_KEYS)
        sources = {n.rsplit(".", 1)[0] if n.endswith(suffixes) else n for n in sizes}
        assert sum(sizes.values()) <= shard_size or len(sources) == 1, sizes


def test_in_memory_model_and_its_saved_directory_give_the_same_tensors(tmp_path):
    model = save_tiny_llama(tmp_path / "src", seed=7)
    quantize_model(tmp_path / "src", CONFIG, tmp_path / "from_dir", log=None)
    quantize_model(model, CONFIG, tmp_path / "from_module", log=None)
    from_dir, from_module = read_all(tmp_path / "from_dir"), read_all(tmp_path / "from_module")
    assert from_dir.keys() == from_module.keys()  # the storage order may differ, not the tensors
    for name, tensor in from_dir.items():
        assert tensor.dtype == from_module[name].dtype and torch.equal(tensor, from_module[name])
    assert next(model.parameters()).device.type == "cpu" and isinstance(
        model.model.layers[0].self_attn.q_proj, torch.nn.Linear
    )  # the input model is not modified


def test_selection_include_exclude_and_overrides(tiny_llama_dir, tmp_path):
    selection = Selection.build(
        include=["model.layers.1.*"],
        exclude=["*.k_proj"],
        overrides={"*.down_proj": {"bits": 8}, "*.q_proj": {"group_size": 32, "bits": 2}},
    )
    quantize_model(tiny_llama_dir, CONFIG, tmp_path / "q", selection=selection, log=None)
    tensors = read_all(tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["include"] == ["model.layers.1.*"] and qc["exclude"] == ["*.k_proj"]
    assert qc["overrides"]["*.down_proj"] == {"bits": 8}
    assert all(m.startswith("model.layers.1.") for m in qc["quantized_modules"])
    assert "model.layers.1.self_attn.k_proj.weight" in tensors
    assert "model.layers.0.mlp.down_proj.weight" in tensors
    meta = {
        name: tensors[f"model.layers.1.{name}.meta"].tolist()
        for name in ("mlp.down_proj", "self_attn.q_proj", "mlp.up_proj")
    }
    assert meta["mlp.down_proj"][1:3] == [8, 0]
    assert meta["self_attn.q_proj"][1:3] == [2, 32]
    assert meta["mlp.up_proj"][1:3] == [4, 0]


def test_existing_output_is_refused_and_kept_unless_overwrite(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="exists"):
        quantize_model(tiny_llama_dir, CONFIG, out, log=None)
    assert (out / "precious.txt").read_text() == "keep me"
    assert not partial_path(out.absolute()).exists()
    quantize_model(tiny_llama_dir, CONFIG, out, overwrite=True, log=None)
    assert not (out / "precious.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # no partial or old copy left


def test_overlapped_and_one_at_a_time_passes_write_the_same_files(tiny_llama_dir, tmp_path):
    for overlap in (True, False):
        quantize_model(
            tiny_llama_dir, CONFIG, tmp_path / str(overlap), shard_size=30_000, overlap=overlap
        )
    assert model_files(tmp_path / "True") == model_files(tmp_path / "False")
    for overlap in (True, False):
        totals = json.loads((tmp_path / str(overlap) / "quant_report.json").read_text())["totals"]
        assert totals["overlap"] is overlap
        assert 0 < totals["read_seconds"] < totals["pass_seconds"] <= totals["wall_seconds"]
        assert 0 < totals["write_seconds"] < totals["pass_seconds"]
        assert (
            0
            <= totals["read_wait_seconds"] + totals["write_wait_seconds"]
            < (totals["pass_seconds"])
        )
        assert (
            totals["open_seconds"] + totals["pass_seconds"] + totals["close_seconds"]
            <= (totals["wall_seconds"])
        )


def test_overlapped_pass_with_largest_tensors_side_by_side_matches_one_at_a_time(tmp_path):
    # untied, large vocabulary: lm_head and the embedding are the largest tensors and neighbours
    # in storage order, so the read arena (one largest tensor) makes reads wait for writes
    save_tiny_llama(tmp_path / "src", seed=3, vocab_size=2048, tie_word_embeddings=False)
    for overlap in (True, False):
        quantize_model(tmp_path / "src", CONFIG, tmp_path / str(overlap), overlap=overlap, log=None)
    assert model_files(tmp_path / "True") == model_files(tmp_path / "False")
    assert "lm_head.weight" in read_all(tmp_path / "True")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_overlapped_pass_on_a_gpu_matches_one_at_a_time(tmp_path):
    # the GPU pass reads into a page-locked arena and copies from it
    save_tiny_llama(tmp_path / "src", seed=4, vocab_size=2048, tie_word_embeddings=False)
    for overlap in (True, False):
        out = tmp_path / str(overlap)
        quantize_model(tmp_path / "src", CONFIG, out, device="cuda", overlap=overlap, log=None)
    assert model_files(tmp_path / "True") == model_files(tmp_path / "False")


@pytest.mark.parametrize("overlap", [True, False])
def test_failure_mid_run_leaves_no_complete_looking_output(tmp_path, overlap):
    model = tiny_llama(seed=2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    out = tmp_path / "q"
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight has 1 NaN/Inf"):
        quantize_model(model, CONFIG, out, shard_size=20_000, log=None, overlap=overlap)
    assert not out.exists()
    partial = partial_path(out.absolute())
    names = {p.name for p in partial.iterdir()}
    assert "config.json" not in names and "progress.json" in names
    assert any(n.startswith("shard-") for n in names)  # finished shards are kept for --resume


def test_a_read_error_in_the_reading_thread_fails_the_run_and_resume_finishes_it(
    tiny_llama_dir, tmp_path, monkeypatch
):
    from easyquant.models.sources import SafetensorsDirSource

    load = SafetensorsDirSource.load

    def failing_load(self, name, out=None):
        if name == "model.layers.1.mlp.down_proj.weight":
            raise OSError("disk went away")
        return load(self, name, out)

    out = tmp_path / "q"
    monkeypatch.setattr(SafetensorsDirSource, "load", failing_load)
    with pytest.raises(OSError, match="disk went away"):
        quantize_model(tiny_llama_dir, CONFIG, out, shard_size=20_000, log=None)
    assert not out.exists()
    monkeypatch.setattr(SafetensorsDirSource, "load", load)
    quantize_model(tiny_llama_dir, CONFIG, out, shard_size=20_000, log=None, resume=True)
    quantize_model(tiny_llama_dir, CONFIG, tmp_path / "whole", shard_size=20_000, log=None)
    assert model_files(out) == model_files(tmp_path / "whole")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"selection": Selection.build(include=["nothing.*"])}, "nothing to quantize"),
        ({"selection": Selection.build(overrides={"*": {"bitz": 3}})}, "unknown config field"),
        ({"selection": Selection.build(overrides={"*": {"bits": 7}})}, "bits must be one of"),
    ],
)
def test_bad_settings_are_refused_before_any_output(tiny_llama_dir, tmp_path, kwargs, message):
    kwargs = {"config": CONFIG, **kwargs}
    with pytest.raises(ValueError, match=message):
        quantize_model(tiny_llama_dir, out_dir=tmp_path / "q", log=None, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_unsupported_weight_dtype_is_refused(tmp_path):
    save_tiny_llama(tmp_path / "src").to(torch.float64).save_pretrained(tmp_path / "src64")
    with pytest.raises(ModelInputError, match="unsupported dtype float64"):
        quantize_model(tmp_path / "src64", CONFIG, tmp_path / "q", log=None)


def test_bfloat16_checkpoint_keeps_its_dtypes(tmp_path):
    tiny_llama(seed=1).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    quantize_model(tmp_path / "src", CONFIG, tmp_path / "q", log=None)
    tensors = read_all(tmp_path / "q")
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.up_proj.outlier_values"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.up_proj.meta"][5] == 2  # bfloat16 code


def test_group_size_that_does_not_divide_the_rows_round_trips(tiny_llama_dir, tmp_path):
    # 64 input features in groups of 48: a last group of 16 per row (as 576 in groups of 128).
    from easyquant.models import load_quantized, quantize_model_inplace

    config = QuantConfig(group_size=48, steps=3)
    result = quantize_model(tiny_llama_dir, config, tmp_path / "q", log=None)
    loaded = load_quantized(result.out_dir)
    layer = loaded.model.layers[0].mlp.gate_proj
    assert layer.scales.shape == (layer.out_features, 2)
    reference = tiny_llama()
    quantize_model_inplace(reference, config)
    ids = torch.randint(0, reference.config.vocab_size, (1, 10))
    torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
