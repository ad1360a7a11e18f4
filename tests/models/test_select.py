"""quantize_with_report's errors: computed a chunk of rows at a time, RTN without quantizing."""

import pytest
import torch

from easyquant import QuantConfig, quantize_tensor
from easyquant.algorithm import chunking
from easyquant.models.select import (
    quantize_with_report,
    relative_error,
    report_errors,
    rtn_reconstruction,
)
from tests.conftest import student_t

CONFIGS = [
    QuantConfig(bits=4, steps=5),
    QuantConfig(bits=3, group_size=16, steps=5, scale_dtype="bfloat16"),
    QuantConfig(bits=2, steps=5, scale_dtype="float32", outlier_dtype="float16"),
    QuantConfig(bits=8, group_size=32, method="rtn"),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rtn_reconstruction_is_rtn_dequantized_bit_for_bit(config, dtype):
    w = student_t(37, 64, seed=config.bits).to(dtype)
    w[2] = 0  # zero row: scale 0
    w[4] = 1e-9  # a scale that rounds to 0 in float16
    rtn = quantize_tensor(w, config.replace(method="rtn", outlier_sigma=None))
    group = config.group_size or w.shape[1]
    got = rtn_reconstruction(w.float().reshape(-1, group), config).reshape(w.shape)
    assert torch.equal(got, rtn.dequantize(torch.float32))


@pytest.mark.parametrize("config", CONFIGS)
def test_report_errors_match_the_whole_tensor_computation(monkeypatch, config):
    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 256)  # several chunks
    w = student_t(50, 64, seed=3).to(torch.bfloat16)
    qw, report = quantize_with_report("w", w, config, backend="torch")
    rtn = quantize_tensor(w, config.replace(method="rtn", outlier_sigma=None))
    assert report.error == pytest.approx(relative_error(qw.dequantize(torch.float32), w), rel=1e-5)
    assert report.rtn_error == pytest.approx(
        relative_error(rtn.dequantize(torch.float32), w), rel=1e-5
    )
    assert report_errors(w, None, config)[1] == report.rtn_error
    if config.method == "easyquant":
        assert report.error <= report.rtn_error


def test_zero_weight_has_zero_errors():
    _, report = quantize_with_report("w", torch.zeros(4, 8), QuantConfig(steps=2))
    assert report.error == 0.0 and report.rtn_error == 0.0
