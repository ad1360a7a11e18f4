"""PIQA accuracy (zero-shot) the way lm-evaluation-harness defines ``acc`` and ``acc_norm``.

Each question gives a goal and two solutions. The context is ``"Question: {goal}\\nAnswer:"`` and
each solution is scored as the continuation ``" " + solution``: the sum of the log-probabilities
of its tokens given the context. ``acc`` picks the solution with the larger sum; ``acc_norm``
divides each sum by the solution's length in characters first (lm-eval's length normalisation).
As in lm-eval, the context is tokenized alone and the continuation's tokens are those of
``context + continuation`` after the context's.

Data: ``../shared/data/piqa/dev.jsonl`` (goal, sol1, sol2) and ``dev-labels.lst`` (0/1 per line).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class PiqaQuestion:
    goal: str
    solutions: tuple[str, str]
    label: int


@dataclass(frozen=True)
class PiqaResult:
    acc: float
    acc_norm: float
    questions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_piqa(directory: str | Path, limit: int | None = None) -> list[PiqaQuestion]:
    """The PIQA validation questions with their labels, in file order (first ``limit``)."""
    directory = Path(directory)
    questions_path, labels_path = directory / "dev.jsonl", directory / "dev-labels.lst"
    for path in (questions_path, labels_path):
        if not path.is_file():
            raise FileNotFoundError(f"PIQA file {path} does not exist")
    lines = [ln for ln in questions_path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    labels = [ln.strip() for ln in labels_path.read_text().splitlines() if ln.strip()]
    if len(lines) != len(labels):
        raise ValueError(f"{questions_path} has {len(lines)} questions but {len(labels)} labels")
    out = []
    for number, (line, label) in enumerate(zip(lines, labels, strict=True), start=1):
        try:
            doc = json.loads(line)
            out.append(PiqaQuestion(doc["goal"], (doc["sol1"], doc["sol2"]), int(label)))
        except (json.JSONDecodeError, KeyError, ValueError) as exc:
            raise ValueError(
                f"{questions_path} line {number} is not a PIQA question: {exc}"
            ) from None
        if limit is not None and len(out) >= limit:
            break
    return out


def context_of(question: PiqaQuestion) -> str:
    return f"Question: {question.goal}\nAnswer:"


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context tokens and continuation tokens, split as lm-eval splits them."""
    # lm-eval moves trailing spaces of the context onto the continuation.
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    return whole[: len(ctx)], whole[len(ctx) :]


def continuation_logprobs(
    model: nn.Module, pairs: list[tuple[list[int], list[int]]], pad_id: int = 0
) -> list[float]:
    """Sum of log p(continuation | context) for each pair, in one right-padded batch."""
    device = next(model.parameters()).device
    sequences = [ctx + cont for ctx, cont in pairs]
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    logits = model(ids.to(device), attention_mask=mask.to(device)).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    sums = []
    for row, (ctx, cont) in enumerate(pairs):
        # Token t is predicted at position t - 1.
        positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1, device=device)
        targets = torch.tensor(cont, device=device)
        sums.append(float(logprobs[row, positions, targets].double().sum()))
    return sums


def piqa_accuracy(
    model: nn.Module,
    tokenizer: Any,
    questions: list[PiqaQuestion],
    progress: Callable[[Iterable[PiqaQuestion]], Iterable[PiqaQuestion]] | None = None,
) -> PiqaResult:
    """``acc`` and ``acc_norm`` of ``model`` on ``questions``."""
    if not questions:
        raise ValueError("no PIQA questions to score")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    correct = correct_norm = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for question in progress(questions) if progress else questions:
                context = context_of(question)
                pairs = [encode_pair(tokenizer, context, " " + s) for s in question.solutions]
                if any(not ctx or not cont for ctx, cont in pairs):
                    raise ValueError(f"PIQA question {question.goal[:40]!r} tokenizes to nothing")
                scores = continuation_logprobs(model, pairs, pad_id)
                normed = [s / len(sol) for s, sol in zip(scores, question.solutions, strict=True)]
                correct += int(max(range(2), key=lambda i: scores[i]) == question.label)
                correct_norm += int(max(range(2), key=lambda i: normed[i]) == question.label)
    finally:
        model.train(was_training)
    n = len(questions)
    return PiqaResult(acc=correct / n, acc_norm=correct_norm / n, questions=n)
