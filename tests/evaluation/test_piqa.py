"""PIQA scoring: the data, lm-eval's split of context and continuation, acc vs acc_norm."""

import pytest
import torch

from easyquant.evaluation.piqa import (
    PiqaQuestion,
    continuation_logprobs,
    encode_pair,
    load_piqa,
    piqa_accuracy,
)
from tests.conftest import SHARED

PIQA = SHARED / "data" / "piqa"


class ByteTokenizer:
    """One token per UTF-8 byte (ids 1..256; 0 pads)."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b + 1 for b in text.encode()]}


class FavouriteTokenLM(torch.nn.Module):
    """Every position predicts the same distribution: log p(token) fixed per token."""

    def __init__(self, logits):
        super().__init__()
        self.table = torch.nn.Parameter(logits.float(), requires_grad=False)

    def forward(self, ids, attention_mask=None):
        return type("Out", (), {"logits": self.table.expand(*ids.shape, -1)})()


def test_the_validation_set_is_complete():
    questions = load_piqa(PIQA)
    assert len(questions) == 1838
    assert {q.label for q in questions} == {0, 1}
    assert all(q.goal and all(q.solutions) for q in questions[:50])
    assert len(load_piqa(PIQA, limit=5)) == 5


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dev\.jsonl"):
        load_piqa(tmp_path)


def test_context_and_continuation_split_like_lm_eval():
    tok = ByteTokenizer()
    ctx, cont = encode_pair(tok, "Question: a\nAnswer:", " b c")
    assert bytes(t - 1 for t in ctx) == b"Question: a\nAnswer:"
    assert bytes(t - 1 for t in cont) == b" b c"


def test_sum_logprob_picks_acc_and_length_normalisation_picks_acc_norm():
    tok = ByteTokenizer()
    logits = torch.zeros(257)
    logits[ord("x") + 1] = 3.0  # "x" is likely, everything else equally unlikely
    model = FavouriteTokenLM(logits)
    # Solution 0 is short and unlikely per character; solution 1 long but mostly "x":
    # by sum the short one wins (fewer tokens), by mean per character the long one.
    question = PiqaQuestion("g", ("ab", "xxxxxxxxxxxxxa"), label=1)
    result = piqa_accuracy(model, tok, [question])
    assert result.acc == 0.0 and result.acc_norm == 1.0 and result.questions == 1
    flipped = PiqaQuestion("g", question.solutions, label=0)
    result = piqa_accuracy(model, tok, [flipped])
    assert result.acc == 1.0 and result.acc_norm == 0.0


def test_batched_padding_does_not_change_a_causal_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = LlamaForCausalLM(config).eval()
    tok = ByteTokenizer()
    pairs = [encode_pair(tok, "Question: q\nAnswer:", s) for s in (" a", " a much longer one")]
    with torch.inference_mode():
        batched = continuation_logprobs(model, pairs)
        alone = [continuation_logprobs(model, [p])[0] for p in pairs]
    assert batched == pytest.approx(alone, rel=1e-4)
    assert all(s < 0 for s in batched)
