"""The fused matmul kernels on groups that do not divide the row (a shorter last group)."""

import pytest
import torch

from easyquant import QuantConfig, quantize_tensor
from easyquant.nn.quant_linear import QuantLinear
from tests.conftest import student_t


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize(("out_f", "in_f", "group"), [(48, 576, 128), (32, 200, 64)])
@pytest.mark.parametrize("batch", [1, 5])
def test_fused_kernel_matches_reference_with_a_short_last_group(bits, out_f, in_f, group, batch):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = student_t(out_f, in_f, seed=bits + in_f).to(device)
    q = quantize_tensor(w, QuantConfig(bits=bits, group_size=group, steps=3))
    layer = QuantLinear(q).set_backend("triton")
    assert layer.fused_supported
    x = torch.randn(batch, in_f, device=device)
    expected = x @ q.dequantize(torch.float32).T
    got = layer(x)
    assert float((got - expected).norm() / expected.norm()) <= 1e-3
