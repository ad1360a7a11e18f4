"""Fused siblings under torch.compile: right values, and one kernel call per group."""

import torch
from torch import nn

from easyquant import QuantConfig, QuantLinear, quantize_tensor
from easyquant.kernels import triton_matmul as tm
from easyquant.nn.compile_fusion import MergeQuantLinearCalls
from easyquant.nn.quant_linear import fuse_siblings
from tests.conftest import student_t

# the kernels on the GPU when there is one, else under the interpreter (tests/conftest.py)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class Attention(nn.Module):
    """Calls q, k and v on the same input, as transformers' attention does."""

    def __init__(self) -> None:
        super().__init__()
        layers = [
            QuantLinear(quantize_tensor(student_t(rows, 64, seed=rows), QuantConfig(steps=2)))
            for rows in (16, 8, 8)
        ]
        self.q, self.k, self.v = (layer.set_backend("triton") for layer in layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.q(x)[..., :8] * self.k(x) + self.v(x)


def test_compiled_fused_siblings_run_the_kernel_once_per_group(monkeypatch):
    torch._dynamo.reset()
    model = Attention().to(DEVICE)
    x = torch.randn(1, 64, device=DEVICE)
    expected = model(x)
    assert fuse_siblings(model, ["q", "k", "v"])
    import torch._inductor.config as inductor_config

    assert isinstance(inductor_config.post_grad_custom_post_pass, MergeQuantLinearCalls)
    compiled = torch.compile(model)
    compiled(x)  # compile
    calls = []
    real = tm._forward  # the op's body
    monkeypatch.setattr(tm, "_forward", lambda *a: calls.append(1) or real(*a))
    out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert len(calls) == 1  # three slices, one fused call


def test_merge_pass_keeps_calls_on_different_inputs():
    graph = torch.fx.Graph()
    x, y = graph.placeholder("x"), graph.placeholder("y")
    op = torch.ops.easyquant.quant_linear.default
    a = graph.call_function(op, (x, 1))
    b = graph.call_function(op, (x, 1))
    c = graph.call_function(op, (y, 1))
    graph.output((a, b, c))
    MergeQuantLinearCalls()(graph)
    calls = [n for n in graph.nodes if n.op == "call_function"]
    assert calls == [a, c]
