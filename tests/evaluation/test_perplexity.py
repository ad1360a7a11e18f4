"""Perplexity: window arithmetic, exact values on models with known likelihoods, the real model."""

import math

import pytest
import torch
from torch import nn

from easyquant.evaluation.perplexity import check_windows, perplexity, read_text
from tests.conftest import WIKITEXT


class ConstantLM(nn.Module):
    """Logits fixed per vocabulary entry, whatever the input: the NLL of each token is known."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits.float())
        self.calls = 0

    def forward(self, ids: torch.Tensor):
        self.calls += 1
        out = self.table.expand(*ids.shape, -1)
        return type("Out", (), {"logits": out})()


def test_uniform_logits_give_vocabulary_size():
    model = ConstantLM(torch.zeros(37))
    ids = torch.randint(0, 37, (1000,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seq_len=100)
    assert result.windows == 10 and model.calls == 10
    assert result.tokens == 10 * 99
    assert result.ppl == pytest.approx(37.0, rel=1e-6)
    assert result.nll == pytest.approx(math.log(37.0), rel=1e-6)


def test_mean_over_predicted_tokens_only_and_tail_dropped():
    logits = torch.tensor([2.0, 0.0, -1.0])
    logp = torch.log_softmax(logits, 0)
    model = ConstantLM(logits)
    # Windows of 4: [0 1 2 0] [1 1 2 2] and a tail [0 0] that does not fill a window.
    ids = torch.tensor([0, 1, 2, 0, 1, 1, 2, 2, 0, 0])
    result = perplexity(model, ids, seq_len=4)
    predicted = [1, 2, 0, 1, 2, 2]  # the first token of each window is never predicted
    expect = -float(sum(logp[t] for t in predicted)) / len(predicted)
    assert result.windows == 2 and result.tokens == 6
    assert result.nll == pytest.approx(expect, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(expect), rel=1e-6)
    # The second window alone.
    second = perplexity(model, ids, seq_len=4, windows=1, first_window=1)
    expect2 = -float(sum(logp[t] for t in [1, 2, 2])) / 3
    assert second.nll == pytest.approx(expect2, rel=1e-6) and second.first_window == 1


@pytest.mark.parametrize(
    ("tokens", "seq_len", "windows", "first", "message"),
    [
        (100, 200, None, 0, "too short"),
        (1000, 100, 11, 0, "only 10"),
        (1000, 1, None, 0, "seq_len"),
        (1000, 100, 0, 0, "positive"),
        (1000, 100, None, 10, "after skipping"),
    ],
)
def test_bad_window_requests_are_refused(tokens, seq_len, windows, first, message):
    with pytest.raises(ValueError, match=message):
        check_windows(tokens, seq_len, windows, first)


def test_read_text_normalises_crlf(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"a\r\nb\r\n")
    assert read_text(path) == "a\nb\n"
    with pytest.raises(FileNotFoundError):
        read_text(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_bytes(b" \r\n")
    with pytest.raises(ValueError, match="empty"):
        read_text(tmp_path / "empty.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="UTF-8"):
        read_text(tmp_path / "bin.txt")


def test_wikitext_is_read_without_carriage_returns():
    text = read_text(WIKITEXT)
    assert "\r" not in text and len(text) > 1_000_000
