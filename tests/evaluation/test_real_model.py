"""The real model (SmolLM2-135M GGUF): one short WikiText-2 window, full precision vs 4-bit."""

import math

import pytest
import torch

from easyquant import QuantConfig
from easyquant.evaluation.loader import load_model
from easyquant.evaluation.perplexity import perplexity, read_text, tokenize
from easyquant.models.select import Selection, quantize_model_inplace
from tests.conftest import WIKITEXT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from easyquant.models.gguf_source import default_model_path

    return load_model(default_model_path())


def test_wikitext_window_perplexity_full_precision_then_quantized(smollm2):
    ids = tokenize(smollm2.tokenizer, read_text(WIKITEXT))
    assert ids.numel() > 250_000  # the whole test split, tokenized once
    full = perplexity(smollm2.model, ids, seq_len=512, windows=1)
    # A 135M model on Wikipedia text: far better than chance (49152 tokens), far from perfect.
    assert 5.0 < full.ppl < 60.0 and full.tokens == 511
    # 2-bit RTN of the first two decoder layers must hurt, measurably.
    model = smollm2.model
    only = Selection.build(include=["model.layers.0.*", "model.layers.1.*"])
    reports = quantize_model_inplace(
        model, QuantConfig(bits=2, method="rtn", outlier_sigma=None), only
    )
    assert len(reports) == 14  # 7 Linear weights per Llama block
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if ".0." in n)
    rtn = perplexity(model, ids, seq_len=512, windows=1)
    assert math.isfinite(rtn.ppl) and rtn.ppl > full.ppl * 1.05
