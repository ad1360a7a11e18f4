import copy

import pytest
import torch

from easyquant.models.equalize import EqualizeConfig, equalize_model, value_to_output_index
from tests.conftest import tiny_llama


def test_value_to_output_index_follows_grouped_query_attention():
    index = value_to_output_index(num_heads=4, num_kv_heads=2, head_dim=3)
    # heads 0, 1 read value head 0 (rows 0-2); heads 2, 3 read value head 1 (rows 3-5)
    assert index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5]


@pytest.mark.parametrize("alpha", [0.5, 1.0, -0.5])
def test_equalization_leaves_the_full_precision_model_unchanged(alpha):
    model = tiny_llama(seed=3)
    with torch.no_grad():  # a non-trivial RMSNorm gamma, as in trained models
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.uniform_(0.2, 3.0)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    expected = model(ids).logits
    rewritten = copy.deepcopy(model)
    counts = equalize_model(rewritten, EqualizeConfig(alpha, alpha, alpha))
    layers = len(model.model.layers)
    assert counts == {"norm": layers, "value": layers, "mlp": layers, "skipped_layers": 0}
    q_before = model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(rewritten.model.layers[0].self_attn.q_proj.weight, q_before)
    torch.testing.assert_close(rewritten(ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_equalize_config_is_validated():
    with pytest.raises(ValueError, match="norm_alpha"):
        EqualizeConfig(norm_alpha=2.0)
    assert not EqualizeConfig().active
