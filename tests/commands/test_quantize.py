"""``easyquant quantize`` through a subprocess: results, one-line errors, interruption, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from easyquant import QuantConfig
from easyquant.config import preset_overrides
from easyquant.models import quantize_model
from easyquant.models.errors import ModelInputError
from easyquant.models.writer import PROGRESS_FILE, partial_path
from tests.conftest import REPO, save_tiny_llama, tiny_llama

CLI = [sys.executable, "-m", "easyquant"]
# One thread per run: these models are tiny (threads only add overhead) and several runs go at once.
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*CLI, "quantize", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )


def finish(process: subprocess.Popen, timeout: float = 300) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def test_quantize_writes_a_directory_and_reports(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    code, stdout, stderr = finish(
        start(
            str(tiny_llama_dir),
            "--out",
            str(out),
            "--steps",
            "10",
            "--bits",
            "3",
            "--group-size",
            "32",
            "--sigma",
            "none",
            "--override",
            "*.down_proj:bits=8",
        )
    )
    assert code == 0, stderr
    assert stdout.startswith(f"wrote {out}: 14 tensors quantized")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["outlier_sigma"], qc["steps"]) == (3, 32, None, 10)
    assert qc["overrides"] == {"*.down_proj": {"bits": 8}}
    report = json.loads((out / "quant_report.json").read_text())
    rows = {r["name"]: r for r in report["tensors"]}
    assert rows["model.layers.0.mlp.down_proj.weight"]["bits"] == 8
    assert rows["model.layers.0.mlp.up_proj.weight"]["bits"] == 3
    assert all(r["outlier_fraction"] == 0 for r in rows.values())  # --sigma none


def test_quality_preset_adds_its_module_changes_after_the_users(tiny_llama_dir, tmp_path):
    from easyquant.models import load_quantized

    out = tmp_path / "q"
    flags = ["--preset", "quality", "--steps", "5", "--override", "*.v_proj:bits=8"]
    code, _, stderr = finish(start(str(tiny_llama_dir), "--out", str(out), *flags))
    assert code == 0, stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    k_proj = preset_overrides("quality", QuantConfig.quality())["*.k_proj"]
    assert qc["overrides"] == {"*.v_proj": {"bits": 8}, "*.k_proj": k_proj}
    rows = {r["name"]: r for r in json.loads((out / "quant_report.json").read_text())["tensors"]}
    bits = {name.split(".")[-2].removesuffix("_proj"): row["bits"] for name, row in rows.items()}
    four = dict.fromkeys(("q", "o", "gate", "up", "down"), 4)
    assert bits == {**four, "k": k_proj["bits"], "v": 8}
    model = load_quantized(out)
    with torch.no_grad():
        logits = model(torch.arange(12).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()


def test_no_overlap_writes_the_same_bytes(tiny_llama_dir, tmp_path):
    runs = {
        flag: start(str(tiny_llama_dir), "--out", str(tmp_path / flag), "--steps", "10", flag)
        for flag in ("--quiet", "--no-overlap")
    }
    for process in runs.values():
        code, _, stderr = finish(process)
        assert code == 0, stderr
    overlapped, alone = files_of(tmp_path / "--quiet"), files_of(tmp_path / "--no-overlap")
    reports = [json.loads(files.pop("quant_report.json")) for files in (overlapped, alone)]
    assert overlapped == alone
    assert [r["totals"]["overlap"] for r in reports] == [True, False]
    assert without_times(reports[0])["tensors"] == without_times(reports[1])["tensors"]


# ---- bad input: one line on stderr, exit code 2, nothing written ---------------------------------
def make_cases(root: Path, source: Path) -> dict[str, tuple[list[str], str]]:
    """case -> (arguments, expected fragment of the one-line error)."""
    import shutil

    from easyquant.models.gguf_source import default_model_path

    def copy(name: str) -> Path:
        target = root / name
        shutil.copytree(source, target)
        return target

    empty = root / "empty"
    empty.mkdir()
    text_file = root / "notes.txt"
    text_file.write_text("hello")
    no_weights = root / "no-weights"
    no_weights.mkdir()
    shutil.copy(source / "config.json", no_weights)
    corrupt = copy("corrupt")
    shard = sorted(corrupt.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:8] + b"garbage!" + shard.read_bytes()[16:])
    truncated = copy("truncated")
    shard = sorted(truncated.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-1000])
    fake_gguf = root / "fake.gguf"
    fake_gguf.write_bytes(b"\x00" * 4096)
    truncated_gguf = root / "cut.gguf"
    with open(default_model_path(), "rb") as f:
        truncated_gguf.write_bytes(f.read(3_000_000))
    unknown_arch = copy("unknown-arch")
    config = json.loads((unknown_arch / "config.json").read_text())
    (unknown_arch / "config.json").write_text(json.dumps({**config, "model_type": "frobnicator"}))
    float64 = root / "float64"
    tiny_llama().to(torch.float64).save_pretrained(float64)
    nan = root / "nan"
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[2, 7] = float("inf")
    model.save_pretrained(nan)
    existing = root / "existing"
    existing.mkdir()
    out = str(root / "out")
    return {
        "missing path": ([str(root / "nope"), "--out", out], "no such file or directory"),
        "empty directory": ([str(empty), "--out", out], "not a model directory: it has no config"),
        "not a model file": ([str(text_file), "--out", out], "is not a model"),
        "no weights": ([str(no_weights), "--out", out], "no safetensors weights"),
        "corrupt safetensors": ([str(corrupt), "--out", out], "is corrupt"),
        "truncated safetensors": ([str(truncated), "--out", out], "is truncated"),
        "corrupt gguf": ([str(fake_gguf), "--out", out], "is not a GGUF file"),
        "truncated gguf": ([str(truncated_gguf), "--out", out], "corrupt or truncated GGUF"),
        "unknown architecture": ([str(unknown_arch), "--out", out], "unsupported architecture"),
        "unsupported dtype": ([str(float64), "--out", out], "unsupported dtype float64"),
        "existing output": ([str(source), "--out", str(existing)], "exists; choose another"),
        "nan weights": (
            [str(nan), "--out", out, "--steps", "1"],
            "model.layers.1.self_attn.o_proj.weight has 1 NaN/Inf value(s)",
        ),
    }


@pytest.fixture(scope="module")
def bad_runs(tiny_llama_dir, tmp_path_factory):
    """All bad-input runs, started at once (they are independent) and collected."""
    root = tmp_path_factory.mktemp("bad-input")
    cases = make_cases(root, tiny_llama_dir)
    processes = {name: start(*args) for name, (args, _) in cases.items()}
    results = {name: finish(p) for name, p in processes.items()}
    leftovers = sorted(p.name for p in root.iterdir() if p.name in ("out", ".out.partial"))
    return cases, results, leftovers


@pytest.mark.parametrize(
    "case",
    [
        "missing path",
        "empty directory",
        "not a model file",
        "no weights",
        "corrupt safetensors",
        "truncated safetensors",
        "corrupt gguf",
        "truncated gguf",
        "unknown architecture",
        "unsupported dtype",
        "existing output",
        "nan weights",
    ],
)
def test_bad_input_is_one_line_exit_code_2(bad_runs, case):
    cases, results, _ = bad_runs
    code, stdout, stderr = results[case]
    expected = cases[case][1]
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("easyquant: error: "), stderr
    assert expected in lines[0]
    assert stdout == ""


def test_bad_input_leaves_no_output(bad_runs):
    *_, leftovers = bad_runs
    # the NaN run fails mid-way: only its hidden partial directory may remain, never "out"
    assert "out" not in leftovers


def test_existing_output_is_replaced_only_with_overwrite(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("old")
    code, _, stderr = finish(
        start(str(tiny_llama_dir), "--out", str(out), "--steps", "5", "--overwrite", "--quiet")
    )
    assert code == 0, stderr
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()


# ---- interruption ------------------------------------------------------------------------------
def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def without_times(report: dict) -> dict:
    rows = [{k: v for k, v in r.items() if k != "seconds"} for r in report["tensors"]]
    totals = {k: v for k, v in report["totals"].items() if "seconds" not in k}
    return {**report, "tensors": rows, "totals": totals}


def test_killed_run_leaves_nothing_complete_and_resume_gives_the_same_bytes(tmp_path):
    source = tmp_path / "src"
    save_tiny_llama(source, seed=11, num_hidden_layers=6)
    args = ["--steps", "300", "--shard-size", "12KB", "--quiet"]
    reference = start(str(source), "--out", str(tmp_path / "reference"), *args)
    out = tmp_path / "q"
    victim = start(str(source), "--out", str(out), *args)
    progress = partial_path(out) / PROGRESS_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["shards"]:
            break
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    assert finish(victim)[0] == -signal.SIGKILL, "the run ended before it could be interrupted"
    assert not out.exists()
    partial = partial_path(out)
    assert "config.json" not in {p.name for p in partial.iterdir()}
    done = json.loads(progress.read_text())
    assert 0 < done["done"] < 6 * 9 + 2  # some, not all, source tensors finished

    with pytest.raises(ModelInputError, match=r"differs in \['config'\]"):
        quantize_model(
            source, QuantConfig(steps=300, bits=3), out, resume=True, shard_size=12_000, log=None
        )

    code, _, stderr = finish(start(str(source), "--out", str(out), *args[:-1], "--resume"))
    assert code == 0, stderr
    assert f"{done['done']} source tensor(s) already done" in stderr
    assert not partial.exists()
    code, _, stderr = finish(reference)
    assert code == 0, stderr
    resumed, uninterrupted = files_of(out), files_of(tmp_path / "reference")
    assert len([n for n in resumed if n.startswith("model-")]) > 10  # many small shards
    report = json.loads(resumed.pop("quant_report.json"))
    reference_report = json.loads(uninterrupted.pop("quant_report.json"))
    assert resumed == uninterrupted  # shards, index, config, tokenizer: byte for byte
    assert without_times(report) == without_times(reference_report)


# ---- the real model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_first_layer_round_trip(tmp_path):
    """SmolLM2-135M (GGUF): quantize layer 0 through the CLI, load it back, compare with the
    reference model whose layer-0 weights are replaced by their dequantized EasyQuant images.
    (The weights loaded from the Q4_1 GGUF are the full-precision reference.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from easyquant import quantize_tensor
    from easyquant.models import load_quantized
    from easyquant.models.gguf_source import default_model_path
    from tests.conftest import WIKITEXT

    out = tmp_path / "smollm2-l0"
    run = start("default", "--out", str(out), "--include", "model.layers.0.*", "--steps", "20")
    path = default_model_path()  # meanwhile, the reference, loaded here
    reference = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = WIKITEXT.read_text(encoding="utf-8").replace("\r\n", "\n")[:4000]
    ids = gguf_tokenizer(text, return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        full_precision_nll = reference(ids, labels=ids).loss.item()
    code, stdout, stderr = finish(run)
    assert code == 0, stderr
    assert "7 tensors quantized" in stdout

    saved_tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert saved_tokenizer(text, return_tensors="pt").input_ids[:, :256].equal(ids)
    loaded = load_quantized(out)
    config = QuantConfig(steps=20)
    layer = reference.model.layers[0]
    for linear in layer.modules():
        if isinstance(linear, torch.nn.Linear):
            linear.weight.data = quantize_tensor(linear.weight.data, config).dequantize()
    with torch.no_grad():
        got, want = loaded(ids, labels=ids), reference(ids, labels=ids)
    assert torch.isfinite(got.logits).all()
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    # one layer of 30 at 4 bits: the loss moves, but only a little
    assert got.loss.item() != full_precision_nll
    assert abs(got.loss.item() - full_precision_nll) < 0.1
    report = json.loads((out / "quant_report.json").read_text())
    assert len(report["tensors"]) == 7 and Path(report["source"]) == path.resolve()


@pytest.mark.parametrize(
    "flags, expected",
    [
        ([], QuantConfig()),
        (["--bits", "3", "--sigma", "none"], QuantConfig(bits=3, outlier_sigma=None)),
        (["--preset", "paper", "--steps", "7"], QuantConfig.paper(steps=7)),
        (["--preset", "best"], QuantConfig.best()),
        (["--preset", "best", "--bits", "3"], QuantConfig.best(bits=3)),  # the low-bit recipe
        (["--preset", "quality"], QuantConfig.quality()),
        (
            ["--preset", "best", "--group-size", "128", "--outlier-dtype", "none"],
            QuantConfig.best(group_size=128, outlier_dtype=None),
        ),
    ],
)
def test_preset_flag_and_single_field_changes(flags, expected):
    from easyquant.cli import build_parser
    from easyquant.commands.quantize import config_of

    args = build_parser().parse_args(["quantize", "default", "--out", "x", *flags])
    config, given = config_of(args)
    assert config == expected
    assert ("outlier_dtype" in given) == ("--outlier-dtype" in flags)
