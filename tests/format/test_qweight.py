import pytest
import torch
from safetensors.torch import load_file, save_file

from easyquant import FORMAT_VERSION, QuantConfig, QuantizedWeight, quantize_tensor
from easyquant.format.qweight import STATE_KEYS
from tests.conftest import student_t


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (17, 33), (40, 96)])
def test_state_dict_round_trip_through_safetensors(tmp_path, bits, shape):
    w = student_t(*shape, seed=bits).to(torch.bfloat16)
    qw = quantize_tensor(w, QuantConfig(bits=bits, steps=10, outlier_sigma=2.0))
    state = qw.state_dict()
    assert all(isinstance(t, torch.Tensor) for t in state.values())
    save_file(state, tmp_path / "w.safetensors")
    back = QuantizedWeight.from_state_dict(load_file(tmp_path / "w.safetensors"))
    assert torch.equal(back.dequantize(), qw.dequantize())
    assert back.num_outliers == qw.num_outliers and back.bits_per_weight == qw.bits_per_weight


def test_int4_codes_are_offset_by_eight_and_outliers_csr():
    w = student_t(16, 64, seed=2)
    qw = quantize_tensor(w, QuantConfig(steps=5, outlier_sigma=2.0))
    low = (qw.qweight & 0x0F).to(torch.int16) - 8
    assert torch.equal(low, qw.codes()[:, 0::2])
    assert qw.outlier_indptr[0] == 0 and qw.outlier_indptr[-1] == qw.num_outliers
    assert qw.outlier_indices.dtype == torch.int16
    rows = qw.outlier_rows()
    assert torch.equal(qw.outlier_values, w[rows, qw.outlier_indices.long()])
    # Column indices sorted within each row.
    key = rows * 64 + qw.outlier_indices.long()
    assert (key[1:] > key[:-1]).all()


def test_wide_rows_use_int32_indices():
    w = student_t(2, 40000, seed=3)
    qw = quantize_tensor(w, QuantConfig(method="rtn"))
    assert qw.outlier_indices.dtype == torch.int32
    assert torch.equal(
        qw.dequantize()[qw.outlier_rows(), qw.outlier_indices.long()], qw.outlier_values
    )


def test_load_checks_version_and_shapes():
    qw = quantize_tensor(student_t(4, 16), QuantConfig(steps=2))
    state = qw.state_dict()
    bad = dict(state, meta=torch.tensor([FORMAT_VERSION + 1, 4, 0, 4, 16, 0]))
    with pytest.raises(ValueError, match="version"):
        QuantizedWeight.from_state_dict(bad)
    with pytest.raises(ValueError, match="scales"):
        QuantizedWeight.from_state_dict(dict(state, scales=state["scales"][:2]))
    with pytest.raises(ValueError, match="missing"):
        QuantizedWeight.from_state_dict({k: v for k, v in state.items() if k != "scales"})
    with pytest.raises(ValueError, match="qweight"):
        QuantizedWeight.from_state_dict(dict(state, qweight=state["qweight"].to(torch.int32)))


def version_1_state(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The tensors format version 1 stored: the in-memory CSR as it is."""
    meta = qw.meta().clone()
    meta[0] = 1
    return {
        "qweight": qw.qweight,
        "scales": qw.scales,
        "outlier_indptr": qw.outlier_indptr,
        "outlier_indices": qw.outlier_indices,
        "outlier_values": qw.outlier_values,
        "meta": meta,
    }


def test_versions_1_and_2_are_still_read_and_written_as_the_current_one():
    qw = quantize_tensor(student_t(24, 300, seed=6), QuantConfig(steps=2, outlier_sigma=2.5))
    assert qw.num_outliers > 0
    version_2 = dict(qw.state_dict(), meta=version_1_state(qw)["meta"].clone().fill_(2))
    version_2["meta"][1:] = qw.meta()[1:]
    for state in (version_1_state(qw), version_2):
        old = QuantizedWeight.from_state_dict(state)
        assert torch.equal(old.dequantize(), qw.dequantize())
        assert set(old.state_dict()) == set(STATE_KEYS)
        assert int(old.state_dict()["meta"][0]) == FORMAT_VERSION
    with pytest.raises(ValueError, match="outlier_indptr"):
        QuantizedWeight.from_state_dict(
            {k: v for k, v in version_1_state(qw).items() if k != "outlier_indptr"}
        )


def test_bits_per_weight_counts_the_stored_tensors():
    for sigma in (2.0, 3.0, None):
        qw = quantize_tensor(student_t(40, 600, seed=7), QuantConfig(steps=2, outlier_sigma=sigma))
        state = qw.state_dict()
        stored = sum(t.numel() * t.element_size() * 8 for k, t in state.items() if k != "meta")
        assert qw.storage_bits == stored


def test_to_device_keeps_everything():
    qw = quantize_tensor(student_t(4, 16), QuantConfig(steps=2))
    moved = qw.to("cpu")
    assert torch.equal(moved.dequantize(), qw.dequantize())
    assert moved.shape == qw.shape and moved.bits == qw.bits

    half = quantize_tensor(student_t(4, 16).to(torch.float16), QuantConfig(steps=2)).to("cpu")
    assert half.dtype == torch.float16 and half.dequantize().dtype == torch.float16


def test_narrow_outlier_dtype_halves_outlier_cost():
    w = student_t(32, 128, seed=9)
    exact = quantize_tensor(w, QuantConfig(steps=2))
    half = quantize_tensor(w, QuantConfig(steps=2, outlier_dtype="float16"))
    assert half.outlier_values.dtype == torch.float16
    assert half.dequantize().dtype == torch.float32  # the model's dtype is kept
    saved = exact.storage_bits - half.storage_bits
    assert saved == exact.num_outliers * 16
    torch.testing.assert_close(half.outlier_values.float(), exact.outlier_values, rtol=1e-3, atol=0)


@pytest.mark.parametrize("group", [None, 32, 48])  # 48: a shorter last group of 128 columns
def test_int8_outliers_are_codes_on_their_rows_scale(tmp_path, group):
    w = student_t(24, 128, seed=4)
    config = QuantConfig(steps=5, outlier_sigma=2.0, group_size=group)
    exact = quantize_tensor(w, config)
    coded = quantize_tensor(w, config.replace(outlier_dtype="int8"))
    assert coded.outlier_values.dtype == torch.int8 and coded.num_outliers == exact.num_outliers
    assert coded.storage_bits == exact.storage_bits - exact.num_outliers * 24
    assert torch.equal(coded.scales, exact.scales)  # the codes follow the ranges, not the reverse
    rows, cols = coded.outlier_rows(), coded.outlier_indices.long()
    step = coded.scales.float()[rows, cols // (group or 128)]
    values = coded.dequantize()[rows, cols]
    assert torch.equal(values, (coded.outlier_values.float() * step).half().float())
    # the nearest multiple, in the scales' dtype (float16)
    assert ((values - w[rows, cols]).abs() <= step / 2 + values.abs() * 2**-11).all()
    assert torch.equal(coded.dequantize().masked_fill_(mask_of(coded), 0),
                       exact.dequantize().masked_fill_(mask_of(exact), 0))  # fmt: skip
    save_file(coded.state_dict(), tmp_path / "w.safetensors")
    back = QuantizedWeight.from_state_dict(load_file(tmp_path / "w.safetensors"))
    assert back.outlier_values.dtype == torch.int8 and int(back.meta()[0]) == FORMAT_VERSION == 4
    assert torch.equal(back.dequantize(), coded.dequantize())
    for rows_slice in (slice(0, 24), slice(5, 17)):
        assert torch.equal(coded.dequantize_rows(rows_slice), coded.dequantize()[rows_slice])


def mask_of(qw: QuantizedWeight) -> torch.Tensor:
    mask = torch.zeros(qw.shape, dtype=torch.bool)
    mask[qw.outlier_rows(), qw.outlier_indices.long()] = True
    return mask


@pytest.mark.parametrize("dtype, fallback", [(torch.float32, torch.float16),
                                             (torch.bfloat16, torch.bfloat16)])  # fmt: skip
def test_int8_outliers_that_do_not_fit_keep_16_bit_floats(dtype, fallback):
    w = (student_t(8, 64, seed=6) * 0.01).to(dtype)
    config = QuantConfig(steps=5, outlier_dtype="int8")
    assert quantize_tensor(w, config).outlier_values.dtype == torch.int8
    far = w.clone()
    far[2, 7] = 1000 * float(w.float().abs().max())  # far past 127 steps of its row's range
    qw = quantize_tensor(far, config)
    assert qw.outlier_values.dtype == fallback
    assert float(qw.dequantize(torch.float32)[2, 7]) == float(far[2, 7].to(fallback))
    zero_row = w.clone()
    zero_row[3] = 0.0
    zero_row[3, 5] = 1.0  # the only nonzero of its row is an outlier: its row's scale is zero
    qw = quantize_tensor(zero_row, config.replace(outlier_scope="tensor"))
    assert qw.outlier_values.dtype == fallback and float(qw.dequantize()[3, 5]) == 1.0


def test_dequantize_rows_is_a_slice_of_dequantize():
    w = student_t(23, 40, seed=5).to(torch.bfloat16)
    for bits, group in ((4, None), (3, 8), (2, 20)):
        qw = quantize_tensor(w, QuantConfig(bits=bits, group_size=group, outlier_sigma=2.0))
        full = qw.dequantize(torch.float32)
        for rows in (slice(0, 23), slice(0, 1), slice(5, 17), slice(22, 23), slice(7, 7)):
            assert torch.equal(qw.dequantize_rows(rows, torch.float32), full[rows])
        assert qw.dequantize_rows(slice(3, 9)).dtype == torch.bfloat16
