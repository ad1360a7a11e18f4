"""The fused Triton range search against the torch reference (adam_range_search).

On a machine without a GPU the kernel runs under TRITON_INTERPRET=1 (see conftest.py), so shapes
stay small. Each test draws fresh random rows; zero rows and zeroed outliers are mixed in.
"""

import pytest
import torch

from easyquant import QuantConfig, quantize_tensor
from easyquant.algorithm.outliers import outlier_mask
from easyquant.algorithm.range_search import (
    adam_range_search,
    initial_scales,
    reconstruction_loss,
)
from easyquant.kernels.triton_range_search import (
    EXACT,
    MAX_CHUNKS,
    MINMAX,
    SATURATE,
    LaunchPlan,
    chunk_lengths,
    launch_plan,
    triton_range_search,
    triton_range_search_with_loss,
)
from tests.conftest import student_t

# The best range is picked among steps whose losses can agree to a few ulps, so two correct
# searches may keep ranges a little apart; their losses agree to fp32 rounding. At 8 bits the
# search is chaotic: rounding differences alone (the reference with its columns in another
# order) move its best loss by up to a few percent on 4096-long rows, so the tolerances are wider.
SCALE_RTOL = {2: 2e-3, 3: 2e-3, 4: 2e-3, 5: 2e-3, 6: 2e-3, 8: 2e-2}
LOSS_RTOL = {2: 1e-5, 3: 1e-5, 4: 1e-5, 5: 1e-5, 6: 1e-5, 8: 1e-3}


def grid(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def rows_with_edges(num_rows: int, n: int, seed: int, zero_outliers: bool) -> torch.Tensor:
    """Heavy-tailed rows with one all-zero row and, optionally, 3-sigma outliers zeroed."""
    x = student_t(num_rows, n, seed=seed)
    x[num_rows // 2] = 0
    if zero_outliers:
        x = x.masked_fill(outlier_mask(x, 3.0), 0.0)
    return x


def assert_matches_reference(x, bits, steps, init_scale=None, **kernel_args):
    qmin, qmax = grid(bits)
    scale, loss = triton_range_search_with_loss(
        x, qmin, qmax, steps, 1e-2, init_scale, **kernel_args
    )
    ref_init = None if init_scale is None else init_scale.cpu()
    ref_scale, ref_loss = adam_range_search(x.cpu(), qmin, qmax, steps, 1e-2, ref_init)
    scale, loss = scale.cpu(), loss.cpu()
    assert scale.shape == ref_scale.shape and scale.dtype == torch.float32
    assert torch.isfinite(scale).all() and torch.isfinite(loss).all()
    torch.testing.assert_close(loss, ref_loss, rtol=LOSS_RTOL[bits], atol=1e-12)
    torch.testing.assert_close(scale, ref_scale, rtol=SCALE_RTOL[bits], atol=0)
    # The reported loss is the loss of the returned range.
    on = scale.squeeze(1) > 0  # (a row whose start is 0 reports loss 0)
    torch.testing.assert_close(
        reconstruction_loss(x.cpu(), scale, qmin, qmax)[on], loss[on], rtol=1e-5, atol=1e-12
    )
    return scale, ref_scale


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize(
    ("num_rows", "n", "zero_outliers"),
    [(3, 200, True), (17, 100, False), (40, 16, True), (5, 255, True)],
)
def test_matches_reference(device, bits, num_rows, n, zero_outliers):
    x = rows_with_edges(num_rows, n, seed=bits * 1000 + n, zero_outliers=zero_outliers)
    scale, _ = assert_matches_reference(x.to(device), bits, steps=25)
    assert scale[num_rows // 2].item() == 0  # the zero row
    assert (scale[torch.arange(num_rows) != num_rows // 2] > 0).all()


@pytest.mark.parametrize("bits", [2, 4])
def test_grouped_rows_match_reference(device, bits):
    # Groups are rows of length group_size: a [12, 96] weight in groups of 32 is [36, 32].
    w = rows_with_edges(12, 96, seed=7 + bits, zero_outliers=True)
    assert_matches_reference(w.reshape(-1, 32).to(device), bits, steps=40)


@pytest.mark.parametrize("mode", [EXACT, MINMAX, SATURATE])
def test_rounding_modes_agree(device, mode):
    x = rows_with_edges(9, 120, seed=11, zero_outliers=True).to(device)
    assert_matches_reference(x, 3, steps=30, mode=mode)


def test_launch_plans_agree(device):
    # Several rows per program, one row per program, and more warps: one answer.
    x = rows_with_edges(6, 200, seed=12, zero_outliers=False).to(device)
    for plan in (
        LaunchPlan(block_rows=4, chunks=(128, 64, 8), num_warps=1),
        LaunchPlan(block_rows=1, chunks=(256,), num_warps=2),
        LaunchPlan(block_rows=2, chunks=(128, 128), num_warps=4),
    ):
        assert_matches_reference(x, 4, steps=20, plan=plan)


def test_init_scale_is_the_start(device):
    x = rows_with_edges(7, 64, seed=13, zero_outliers=True)
    init = initial_scales(x, 7) * torch.linspace(0.6, 1.2, 7).unsqueeze(1)
    init[2] = 0  # a row told to stay off
    scale, _ = assert_matches_reference(x.to(device), 4, steps=15, init_scale=init.to(device))
    assert scale[2].item() == 0
    # Zero steps: the start itself.
    start = triton_range_search(x.to(device), -8, 7, 0, 1e-2, init_scale=init.to(device))
    assert torch.equal(start.cpu(), init)


def test_zero_steps_give_rtn_scales(device):
    x = rows_with_edges(5, 48, seed=14, zero_outliers=True)
    for bits in (2, 8):
        qmin, qmax = grid(bits)
        scale = triton_range_search(x.to(device), qmin, qmax, 0, 1e-2)
        assert torch.equal(scale.cpu(), initial_scales(x, qmax))


def test_strided_rows(device):
    # A column slice of a wider matrix: row stride 80, unit column stride.
    wide = student_t(6, 80, seed=15).to(device)
    x = wide[:, 8:72]
    assert not x.is_contiguous()
    assert_matches_reference(x, 4, steps=10)


def test_chunk_lengths():
    assert chunk_lengths(4096) == (4096,)
    assert chunk_lengths(11008) == (8192, 2048, 512, 256)
    assert chunk_lengths(13824) == (8192, 4096, 1024, 512)
    assert chunk_lengths(200) == (128, 64, 8)
    assert chunk_lengths(255) == (128, 64, 32, 32)  # last chunk rounded up, masked
    for n in range(1, 3000, 7):
        chunks = chunk_lengths(n)
        assert len(chunks) <= MAX_CHUNKS and sum(chunks) >= n
        assert sum(chunks[:-1]) < n  # every chunk holds at least one real value
        assert all(c & (c - 1) == 0 for c in chunks)


def test_launch_plan_shapes():
    per_channel = launch_plan(4096, 4096)
    assert per_channel.block_rows == 1 and per_channel.padded == 4096
    grouped = launch_plan(4096 * 64, 64)
    assert grouped.block_rows * grouped.padded >= 256
    assert launch_plan(3, 64).block_rows == 4  # never more rows per program than rows


def test_bad_input(device):
    with pytest.raises(ValueError, match="float32"):
        triton_range_search(torch.ones(2, 4, dtype=torch.float16, device=device), -8, 7, 1, 1e-2)
    with pytest.raises(ValueError, match="init_scale"):
        triton_range_search(torch.ones(2, 4, device=device), -8, 7, 1, 1e-2, torch.ones(3))


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(bits=4, steps=30),
        QuantConfig(bits=3, group_size=32, steps=20, outlier_scope="channel"),
        QuantConfig(bits=2, steps=20, outlier_sigma=None),
        QuantConfig(bits=8, group_size=16, steps=10, scale_dtype="float32"),
    ],
)
def test_quantize_tensor_triton_equals_torch(device, config):
    w = student_t(24, 96, seed=config.bits).to(torch.bfloat16)
    w[3] = 0
    w = w.to(device)
    ref = quantize_tensor(w.cpu(), config, backend="torch")
    got = quantize_tensor(w, config, backend="triton")
    # Same outliers, bit for bit.
    assert torch.equal(got.outlier_indptr.cpu(), ref.outlier_indptr)
    assert torch.equal(got.outlier_indices.cpu(), ref.outlier_indices)
    assert torch.equal(got.outlier_values.cpu(), ref.outlier_values)
    # Same stored scales up to one rounding step of their storage dtype.
    rtol = SCALE_RTOL[config.bits]
    torch.testing.assert_close(got.scales.cpu().float(), ref.scales.float(), rtol=rtol, atol=0)
    # Same codes wherever the scales agree; the same reconstruction error per row.
    same_scale = (got.scales.cpu() == ref.scales).repeat_interleave(
        config.group_size or w.shape[1], dim=1
    )
    codes, ref_codes = got.codes().cpu(), ref.codes()
    assert torch.equal(codes[same_scale], ref_codes[same_scale])
    if config.bits < 8:
        assert (codes - ref_codes).abs().max() <= 1
    err = (got.dequantize().cpu().float() - w.cpu().float()).square().sum(1)
    ref_err = (ref.dequantize().float() - w.cpu().float()).square().sum(1)
    torch.testing.assert_close(err, ref_err, rtol=LOSS_RTOL[config.bits] * 100, atol=1e-12)
