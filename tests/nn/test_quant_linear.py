import pytest
import torch
from torch import nn

from easyquant import QuantConfig, QuantLinear, quantize_tensor
from tests.conftest import student_t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 32])
def test_forward_equals_reference_matmul(dtype, group_size):
    w = student_t(48, 96, seed=5)
    bias = torch.randn(48)
    layer = QuantLinear(quantize_tensor(w, QuantConfig(group_size=group_size, steps=10)), bias)
    x = torch.randn(3, 5, 96).to(dtype)
    ref = x.float() @ layer.quantized.dequantize(torch.float32).T + bias
    out = layer(x)
    assert out.dtype == dtype and out.shape == (3, 5, 48)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_from_linear_and_state_dict_round_trip():
    linear = nn.Linear(64, 32)
    layer = QuantLinear.from_linear(linear, QuantConfig(steps=5))
    assert set(layer.state_dict()) == {
        "qweight",
        "scales",
        "outlier_indptr",
        "outlier_indices",
        "outlier_values",
        "meta",
        "bias",
    }
    twin = QuantLinear(layer.quantized, torch.zeros(32))
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(4, 64)
    torch.testing.assert_close(twin(x), layer(x), rtol=0, atol=0)
    assert "bits=4" in repr(layer)


def test_backend_choice_is_checked():
    layer = QuantLinear(quantize_tensor(student_t(8, 16), QuantConfig(steps=1)))
    with pytest.raises(ValueError, match="backend"):
        layer.set_backend("cuda")
    assert layer.set_backend("torch").backend == "torch"


def test_bias_shape_is_checked():
    with pytest.raises(ValueError, match="bias"):
        QuantLinear(quantize_tensor(student_t(8, 16), QuantConfig(steps=1)), torch.zeros(7))
