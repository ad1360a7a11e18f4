"""``easyquant lm-eval``: lm-eval's own CLI on an easyquant model, with the local PIQA task.

A tiny random Llama with a byte-level tokenizer (257 tokens), quantized; 8 PIQA questions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from easyquant import QuantConfig, cli
from easyquant.lm_eval_tasks.utils import DATA_DIR_ENV, find_data_dir, load_local
from easyquant.models import load_quantized, quantize_model
from tests.conftest import SHARED, save_tiny_llama

PIQA = SHARED / "data" / "piqa"
LIMIT = 8


def byte_tokenizer():
    """Every byte one token (GPT-2's byte-to-character map), plus an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)} | {"<|endoftext|>": len(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lm-eval")
    save_tiny_llama(root / "fp", seed=7, vocab_size=257, max_position_embeddings=1024)
    byte_tokenizer().save_pretrained(root / "fp")
    quantize_model(root / "fp", QuantConfig(bits=4, steps=5), root / "q", log=None)
    return root / "q"


def loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context), the way lm-eval's hf model scores a choice."""
    context_ids = tokenizer(context)["input_ids"]
    whole = tokenizer(context + continuation)["input_ids"]
    assert whole[: len(context_ids)] == context_ids  # bytes: the split is exact
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, len(context_ids) :]
    return float(logprobs[len(context_ids) - 1 :].gather(1, targets[:, None]).sum())


def test_lm_eval_runs_piqa_local_on_a_quantized_model(quantized, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="the lmeval extra (lm-eval) is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    argv = ["--model", "hf", "--model_args", f"pretrained={quantized},dtype=float32"]
    argv += ["--tasks", "piqa_local", "--device", "cpu", "--batch_size", "8"]
    argv += ["--limit", str(LIMIT), "--output_path", str(tmp_path), "--log_samples"]
    assert cli.main(["lm-eval", *argv]) == 0

    (results_file,) = tmp_path.rglob("results_*.json")
    (samples_file,) = tmp_path.rglob("samples_piqa_local_*.jsonl")
    metrics = json.loads(results_file.read_text())["results"]["piqa_local"]
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == LIMIT

    # The local data: questions in file order, labels joined from the separate labels file.
    questions = [json.loads(line) for line in PIQA.joinpath("dev.jsonl").read_text().splitlines()]
    labels = [int(line) for line in PIQA.joinpath("dev-labels.lst").read_text().split()]
    samples.sort(key=lambda s: s["doc_id"])
    for i, sample in enumerate(samples):
        assert sample["doc"]["goal"] == questions[i]["goal"]
        assert sample["doc"]["label"] == labels[i] == int(sample["target"])

    # The scores are the quantized model's: recompute each choice's log-likelihood directly.
    model = load_quantized(quantized).eval()
    tokenizer = byte_tokenizer()
    correct = 0
    for sample in samples:
        doc = sample["doc"]
        context = f"Question: {doc['goal']}\nAnswer:"
        ours = [loglikelihood(model, tokenizer, context, " " + doc[s]) for s in ("sol1", "sol2")]
        theirs = [float(resp[0][0]) for resp in sample["resps"]]
        assert ours == pytest.approx(theirs, abs=1e-3)
        correct += int(max(range(2), key=ours.__getitem__) == doc["label"])
    assert metrics["acc,none"] == pytest.approx(correct / LIMIT)
    assert 0.0 <= metrics["acc_norm,none"] <= 1.0


def test_arguments_go_to_lm_eval_untouched():
    args = cli.build_parser().parse_args(["lm-eval", "--model", "hf", "-h", "--limit", "3"])
    assert args.lm_eval_args == ["--model", "hf", "-h", "--limit", "3"]
    assert args.func.__module__ == "easyquant.commands.lm_eval"


def test_missing_lm_eval_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval._cli.harness", None)
    assert cli.main(["lm-eval", "--tasks", "piqa_local"]) == 2
    assert "pip install 'lm-eval" in capsys.readouterr().err


def test_load_local_joins_labels():
    pytest.importorskip("datasets", reason="the lmeval extra (lm-eval, datasets) is not installed")
    dataset = load_local(
        {"validation": "piqa/dev.jsonl"},
        {"validation": "piqa/dev-labels.lst"},
        data_dir=str(SHARED / "data"),
        pretrained="ignored: lm-eval passes model arguments too",
    )
    split = dataset["validation"]
    assert len(split) == 1838
    labels = [int(line) for line in PIQA.joinpath("dev-labels.lst").read_text().split()]
    assert split["label"] == labels
    assert split[0]["goal"] == json.loads(PIQA.joinpath("dev.jsonl").open().readline())["goal"]


def test_load_local_refuses_labels_that_do_not_match(tmp_path):
    pytest.importorskip("datasets", reason="the lmeval extra (lm-eval, datasets) is not installed")
    (tmp_path / "q.jsonl").write_text('{"goal": "a"}\n{"goal": "b"}\n{"goal": "c"}\n')
    (tmp_path / "labels.lst").write_text("0\n1\n")
    with pytest.raises(ValueError, match=r"has 2 labels but .* has 3 examples"):
        load_local({"validation": "q.jsonl"}, {"validation": "labels.lst"}, data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data_dir"):
        load_local({"validation": "missing.jsonl"}, data_dir=str(tmp_path))


def test_data_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert find_data_dir("/explicit") == Path("/explicit")
    assert find_data_dir() == tmp_path
    monkeypatch.delenv(DATA_DIR_ENV)
    assert find_data_dir() == SHARED / "data"  # ../shared/data beside this checkout
