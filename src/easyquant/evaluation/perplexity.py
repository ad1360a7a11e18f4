"""Perplexity over non-overlapping windows of a text, the way weight-quantization papers measure it.

The whole text is tokenized once, cut into consecutive windows of ``seq_len`` tokens (the tail that
does not fill a window is dropped), and every window is scored on its own: ``seq_len - 1`` predicted
tokens each. ``nll`` is the mean negative log-likelihood (nats) over all predicted tokens of all
windows and ``ppl = exp(nll)``. No BOS token is added and windows do not overlap, so numbers are
comparable between methods on the same windows, not with papers that use another protocol.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_SEQ_LEN = 2048


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    windows: int
    tokens: int  # predicted tokens: windows * (seq_len - 1)
    seq_len: int
    first_window: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_text(path: str | Path) -> str:
    """A UTF-8 text file with Windows line endings normalised (wiki.test.raw is CRLF)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"text file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start})") from None
    text = text.replace("\r\n", "\n")
    if not text.strip():
        raise ValueError(f"{path} is empty")
    return text


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """Token ids (int64, 1-D) of the whole text, without special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def count_windows(num_tokens: int, seq_len: int) -> int:
    return num_tokens // seq_len


def check_windows(num_tokens: int, seq_len: int, windows: int | None, first_window: int = 0) -> int:
    """How many windows to score; ``ValueError`` (one line) when the text cannot provide them."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if windows is not None and (isinstance(windows, bool) or windows < 1):
        raise ValueError(f"windows must be a positive int, got {windows!r}")
    if first_window < 0:
        raise ValueError(f"first_window must be >= 0, got {first_window!r}")
    available = count_windows(num_tokens, seq_len) - first_window
    if available < 1:
        raise ValueError(
            f"the text has {num_tokens} tokens: too short for one window of {seq_len} tokens"
            + (f" after skipping {first_window} window(s)" if first_window else "")
            + "; use a longer text or a smaller --seq-len"
        )
    if windows is None:
        return available
    if windows > available:
        raise ValueError(
            f"{windows} windows of {seq_len} tokens asked for, but the text has only {available} "
            f"({num_tokens} tokens)"
        )
    return windows


def window_nll_sum(model: nn.Module, window: torch.Tensor) -> float:
    """Sum of the NLL (float64 accumulation) of tokens 1.. of one window ``[seq_len]``."""
    logits = model(window.unsqueeze(0)).logits[0, :-1].float()
    per_token = nn.functional.cross_entropy(logits, window[1:], reduction="none")
    return float(per_token.double().sum())


def perplexity(
    model: nn.Module,
    token_ids: torch.Tensor,
    seq_len: int = DEFAULT_SEQ_LEN,
    windows: int | None = None,
    first_window: int = 0,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``windows`` windows of ``token_ids`` (all full ones by default),
    starting at window ``first_window``. ``model(ids).logits`` must be a causal LM's logits."""
    token_ids = token_ids.reshape(-1)
    count = check_windows(token_ids.numel(), seq_len, windows, first_window)
    device = next(model.parameters(), next(model.buffers(), torch.empty(0))).device
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        with torch.inference_mode():
            starts = range(first_window, first_window + count)
            for index in progress(starts) if progress else starts:
                window = token_ids[index * seq_len : (index + 1) * seq_len].to(device)
                total += window_nll_sum(model, window)
    finally:
        model.train(was_training)
    tokens = count * (seq_len - 1)
    nll = total / tokens
    return PerplexityResult(
        ppl=math.exp(nll),
        nll=nll,
        windows=count,
        tokens=tokens,
        seq_len=seq_len,
        first_window=first_window,
    )
