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
    with torch.no_grad():
        linear.weight.copy_(student_t(32, 64, seed=3))  # heavy tails: outliers at 3 sigma
    layer = QuantLinear.from_linear(linear, QuantConfig(steps=5))
    assert layer.outlier_values.numel() > 0
    assert set(layer.state_dict()) == {
        "qweight",
        "scales",
        "outlier_counts",
        "outlier_columns",
        "outlier_values",
        "meta",
        "bias",
    }
    # The rows reversed: as many outliers, at other places. Loading must decode the new places
    # (the CSR buffers and the kernels' table are not in the state dict).
    flipped = quantize_tensor(linear.weight.detach().flip(0), QuantConfig(steps=5))
    twin = QuantLinear(flipped, torch.zeros(32))
    assert not torch.equal(twin.outlier_indptr, layer.outlier_indptr)
    twin.load_state_dict(layer.state_dict())
    assert torch.equal(twin.outlier_indptr, layer.outlier_indptr)
    assert torch.equal(twin.outlier_indices, layer.outlier_indices)
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


def test_layouts_without_a_kernel_fall_back_to_the_torch_path():
    """A group of 8 has no K tile for the fused kernels: "triton" still answers, through torch."""
    w = student_t(16, 64, seed=2)
    layer = QuantLinear(quantize_tensor(w, QuantConfig(group_size=8, steps=2)))
    assert not layer.fused_supported
    x = torch.randn(3, 64)
    ref = x @ layer.dequantize(torch.float32).T
    torch.testing.assert_close(layer.set_backend("triton")(x), ref, rtol=1e-5, atol=1e-5)


def test_set_quant_backend_reaches_every_layer():
    from easyquant.nn.quant_linear import set_quant_backend

    model = nn.Sequential(
        QuantLinear(quantize_tensor(student_t(8, 16), QuantConfig(steps=1))),
        nn.ReLU(),
        QuantLinear(quantize_tensor(student_t(4, 8), QuantConfig(steps=1))),
    )
    assert set_quant_backend(model, "torch") == 2
    assert {m.backend for m in model if isinstance(m, QuantLinear)} == {"torch"}
    with pytest.raises(ValueError, match="backend"):
        set_quant_backend(model, "gpu")


def test_torch_compile_matches_eager():
    layer = QuantLinear(quantize_tensor(student_t(24, 32, seed=4), QuantConfig(steps=2)))
    layer.set_backend("torch")
    x = torch.randn(5, 32)
    compiled = torch.compile(layer)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)


def test_outlier_table_is_derived_and_rebuilt_on_load():
    from easyquant.nn.quant_linear import LOCKS_KEY, TABLE_KEYS

    layer = QuantLinear(quantize_tensor(student_t(16, 64, seed=1), QuantConfig(steps=2)))
    assert not {*TABLE_KEYS, LOCKS_KEY} & set(layer.state_dict())
    assert layer.split_locks.dtype == torch.int32 and not layer.split_locks.any()
    nnz = layer.outlier_values.numel()
    assert nnz and int(layer.slot_count.sum()) + layer.overflow_vals.numel() == nnz
    state = layer.state_dict()
    state["outlier_values"] = state["outlier_values"] * 2
    before = layer.slot_vals.clone()
    layer.load_state_dict(state)
    torch.testing.assert_close(layer.slot_vals, 2 * before)
    other = quantize_tensor(student_t(16, 64, seed=2), QuantConfig(steps=2, outlier_sigma=2.0))
    assert other.num_outliers != nnz
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(other.state_dict())


def test_fused_siblings_match_the_separate_layers():
    from easyquant.nn.quant_linear import FusedSlice, concat_layers, fuse_siblings

    def make(rows, seed, bias):
        w = student_t(rows, 32, seed=seed)
        return QuantLinear(
            quantize_tensor(w, QuantConfig(steps=2)), torch.randn(rows) if bias else None
        )

    parent = nn.Module()
    parent.q, parent.k, parent.v = make(8, 1, True), make(4, 2, False), make(4, 3, True)
    x = torch.randn(2, 3, 32)
    expected = [getattr(parent, n)(x) for n in "qkv"]
    fused = concat_layers([parent.q, parent.k, parent.v])
    assert fused.out_features == 16 and fused.bias is not None
    assert fuse_siblings(parent, ["q", "k", "v"])
    assert isinstance(parent.k, FusedSlice)
    for name, want in zip("qkv", expected, strict=True):
        torch.testing.assert_close(getattr(parent, name)(x), want, rtol=1e-5, atol=1e-5)
    x.mul_(2)  # an in-place change of the same tensor is not served from the last output
    torch.testing.assert_close(parent.v(x), 2 * expected[2] - parent.v.group[0].fused.bias[12:]
                               .float() * 1, rtol=1e-4, atol=1e-4)  # fmt: skip
    other = nn.Module()
    other.a = make(4, 4, False)
    other.b = nn.Linear(32, 4)
    assert not fuse_siblings(other, ["a", "b"])


def test_int8_outliers_load_and_concatenate():
    from easyquant.nn.quant_linear import concat_layers

    w = student_t(16, 64, seed=7)
    coded = QuantLinear(quantize_tensor(w, QuantConfig(steps=2, outlier_dtype="int8")))
    exact = QuantLinear(quantize_tensor(w.flip(0), QuantConfig(steps=2)))
    assert coded.outlier_values.dtype == torch.int8 and coded.outlier_values.numel()
    twin = QuantLinear(quantize_tensor(w / 2, QuantConfig(steps=2, outlier_dtype="int8")))
    assert not torch.equal(twin.slot_vals, coded.slot_vals)  # the same places, half the scale
    twin.load_state_dict(coded.state_dict())
    torch.testing.assert_close(twin.slot_vals, coded.slot_vals, rtol=0, atol=0)
    x = torch.randn(3, 64)
    for layers in ([coded, coded], [coded, exact], [exact, coded]):
        fused = concat_layers(layers)
        want = torch.cat([layer.dequantize() for layer in layers])
        torch.testing.assert_close(fused.dequantize(), want, rtol=0, atol=0)
        torch.testing.assert_close(fused(x), torch.cat([layer(x) for layer in layers], dim=-1))
    assert concat_layers([coded, coded]).outlier_values.dtype == torch.int8
