"""``easyquant eval``: JSON on stdout, one-line errors with exit code 2 for bad input."""

import json
import math
import subprocess
import sys

import pytest
import torch

from easyquant import cli
from easyquant.evaluation.loader import load_model
from easyquant.evaluation.perplexity import perplexity, tokenize
from tests.conftest import REPO

TEXT = "The quick brown fox jumps over the lazy dog. " * 40  # 1,800 bytes


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory):
    """A random 2-layer Llama with a byte-level tokenizer (256 tokens), saved like a hub model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_bytes(TEXT.replace("dog. ", "dog.\r\n").encode())
    return path


def run_cli(args, capsys):
    code = cli.main(["eval", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_prints_json_matching_the_library(tiny_hf_dir, text_file, capsys):
    code, out, err = run_cli(
        [tiny_hf_dir, "--text", text_file, "--seq-len", 128, "--windows", 3, "--quiet"], capsys
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["windows"] == 3 and report["tokens"] == 3 * 127 and report["seq_len"] == 128
    assert report["model_kind"] == "huggingface"
    assert report["ppl"] == pytest.approx(math.exp(report["nll"]))
    loaded = load_model(tiny_hf_dir)
    ids = tokenize(loaded.tokenizer, text_file.read_text().replace("\r\n", "\n"))
    assert report["text_tokens"] == ids.numel() == len(TEXT)  # one token per byte, CRLF -> LF
    expect = perplexity(loaded.model, ids, seq_len=128, windows=3)
    assert report["ppl"] == pytest.approx(expect.ppl, rel=1e-5)
    # A random 256-token model is near chance: ppl within a factor of 2 of the vocabulary size.
    assert 128 < report["ppl"] < 512


def test_eval_all_windows_by_default(tiny_hf_dir, text_file, capsys):
    code, out, _ = run_cli([tiny_hf_dir, "--text", text_file, "--seq-len", 256, "--quiet"], capsys)
    assert code == 0
    assert json.loads(out)["windows"] == len(TEXT) // 256


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda d, t, tmp: [d, "--text", tmp / "missing.txt"], "does not exist"),
        (lambda d, t, tmp: [tmp / "no-model", "--text", t], "does not exist"),
        (lambda d, t, tmp: [tmp, "--text", t], "not a model directory"),
        (lambda d, t, tmp: [t, "--text", t], "not a GGUF file"),
        (lambda d, t, tmp: [d, "--text", t, "--seq-len", 4096], "too short"),
        (lambda d, t, tmp: [d, "--text", t, "--seq-len", 512, "--windows", 9], "only 3"),
        (lambda d, t, tmp: [d, "--text", t, "--device", "cuda:0"], "CUDA is not available"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_hf_dir, text_file, tmp_path, make_args, message, capsys):
    if "cuda" in str(make_args(tiny_hf_dir, text_file, tmp_path)) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, out, err = run_cli([*make_args(tiny_hf_dir, text_file, tmp_path), "--quiet"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("easyquant: error: ") and message in err
    assert err.count("\n") == 1


def test_dataset_without_the_datasets_library_is_one_line(tiny_hf_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    code, out, err = run_cli([tiny_hf_dir, "--dataset", "wikitext2"], capsys)
    assert code == 2 and out == ""
    assert "'datasets' library" in err and err.count("\n") == 1


def test_eval_through_a_subprocess(tiny_hf_dir, text_file):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "easyquant",
            "eval",
            str(tiny_hf_dir),
            "--text",
            str(text_file),
            "--seq-len",
            "512",
            "--windows",
            "1",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["windows"] == 1 and report["tokens"] == 511
