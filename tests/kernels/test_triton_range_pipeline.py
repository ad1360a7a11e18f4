"""The fused pipeline (search + finish kernels) against quantize_tensor.

With the same search kernel, quantize_tensor_stepwise(backend="triton") finishes in torch and
quantize_tensor_triton in one kernel: every stored tensor must come out bit for bit the same.
"""

import pytest
import torch

from easyquant import QuantConfig, quantize_tensor
from easyquant.kernels.triton_range_pipeline import quantize_tensor_triton
from easyquant.quantize import quantize_tensor_stepwise
from tests.conftest import student_t


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (QuantConfig(bits=4, steps=20), (24, 96)),
        (QuantConfig(bits=2, group_size=12, steps=10), (10, 48)),
        (QuantConfig(bits=3, group_size=32, steps=10, outlier_scope="channel"), (9, 64)),
        (QuantConfig(bits=8, steps=10, scale_dtype="bfloat16"), (7, 40)),
        (QuantConfig(bits=4, group_size=5, steps=5, method="rtn"), (6, 20)),  # odd: torch packs
        (QuantConfig(bits=4, steps=0, outlier_sigma=None, outlier_dtype="float16"), (5, 30)),
        (QuantConfig(bits=2, steps=8, scale_dtype="float32"), (4, 36)),
        (QuantConfig(bits=4, group_size=16, steps=8, init_grid=5, refine_steps=2), (6, 32)),
        (QuantConfig(bits=3, steps=6, outlier_scope="group", refine_steps=1), (5, 40)),
        (QuantConfig(bits=4, steps=10, outlier_scope="channel", outlier_dtype="int8"), (12, 64)),
        (QuantConfig(bits=6, steps=10, outlier_scope="channel", outlier_sigma=2.5), (8, 48)),
        (QuantConfig(bits=5, group_size=16, steps=6), (6, 48)),
    ],
)
def test_pipeline_equals_quantize_tensor(device, config, shape):
    w = student_t(*shape, seed=config.bits * 7 + shape[1]).to(torch.bfloat16)
    w[1] = 0  # a zero row
    w = w.to(device)
    got = quantize_tensor_triton(w, config)
    ref = quantize_tensor_stepwise(w, config, backend="triton")
    for name, tensor in ref.state_dict().items():
        assert torch.equal(got.state_dict()[name], tensor), name
    assert got.dtype == w.dtype and got.shape == tuple(w.shape)
    # And against the torch path: the same outliers, the codes of equal scales.
    torch_ref = quantize_tensor(w.cpu(), config, backend="torch")
    assert got.outlier_values.dtype == torch_ref.outlier_values.dtype
    if config.outlier_dtype != "int8":  # int8 codes follow the scales, equal only within rtol
        assert torch.equal(got.outlier_values.cpu(), torch_ref.outlier_values)
    assert torch.equal(got.outlier_indices.cpu(), torch_ref.outlier_indices)
    torch.testing.assert_close(got.dequantize().cpu(), torch_ref.dequantize(), rtol=0.05, atol=2e-3)


def test_pipeline_refuses_cpu_tensors_when_compiled(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        quantize_tensor_triton(torch.ones(4, 8), QuantConfig())


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (QuantConfig(bits=4, steps=4), (22, 1024)),
        (QuantConfig(bits=2, group_size=32, steps=3, init_grid=3, refine_steps=1), (40, 256)),
    ],
)
def test_pipeline_in_chunks_stores_the_same_bits(device, monkeypatch, config, shape):
    """Rows taken a chunk at a time (CPU chunk size made small; on a GPU the chunks are large)
    with the whole tensor's launch shapes: the same stored tensors as in one piece."""
    from easyquant.algorithm import chunking
    from easyquant.kernels import triton_range_pipeline as pipeline

    w = student_t(*shape, seed=shape[0]).to(torch.bfloat16).to(device)
    w[1] = 0
    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 1 << 30)
    monkeypatch.setattr(pipeline, "GPU_CHUNK_ELEMENTS", 1 << 30)
    whole = quantize_tensor_triton(w, config)
    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 1 << 13)
    monkeypatch.setattr(pipeline, "GPU_CHUNK_ELEMENTS", 1 << 13)
    chunked = quantize_tensor_triton(w, config)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(chunked.state_dict()[name], tensor), name


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(bits=4, group_size=32, steps=8),
        QuantConfig(bits=3, group_size=32, steps=8, outlier_scope="group"),
    ],
)
def test_ragged_groups_store_the_same_bits_with_either_search(device, config):
    # 72 input features in groups of 32: a last group of 8 per row.
    w = student_t(12, 72, seed=config.bits).to(device)
    fused = quantize_tensor(w, config, backend="triton")
    stepwise = quantize_tensor(w, config, backend="torch")
    assert fused.scales.shape == (12, 3)
    assert torch.equal(fused.outlier_indices, stepwise.outlier_indices)
    assert torch.equal(fused.outlier_values, stepwise.outlier_values)
    # Equal ranges give equal codes; the two searches may differ in float rounding only.
    close = torch.isclose(fused.scales.float(), stepwise.scales.float(), rtol=1e-3)
    assert close.float().mean() > 0.9
