"""The fused matmul kernels against the torch reference (x @ dequantize().T + bias), on fresh random
inputs: ragged shapes, rows with no outliers and with many, 2/3/4/8 bits, batch 1 and more. On a
machine without a GPU they run under Triton's interpreter (set up in conftest.py)."""

import pytest
import torch

from easyquant.format.qweight import pack_quantized
from easyquant.kernels import triton_matmul as tm

TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def random_weight(
    n: int, k: int, bits: int, group: int | None, seed: int, device: str, fraction: float = 0.04
) -> tm.Weight:
    """Random codes/scales; ~fraction outliers, row 0 with ~40% outliers and row 1 with none."""
    gen = torch.Generator().manual_seed(seed)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    weight = torch.randn(n, k, generator=gen) * 0.02
    codes = torch.randint(qmin, qmax + 1, (n, k), generator=gen)
    groups = 1 if group is None else k // group
    scales = (torch.rand(n, groups, generator=gen) * 0.004 + 0.001).half()
    outliers = torch.rand(n, k, generator=gen) < fraction
    outliers[0] = torch.rand(k, generator=gen) < 0.4
    outliers[1] = False
    qw = pack_quantized(weight, codes, scales, outliers, bits, group).to(device)
    return tm.Weight(
        qw.qweight,
        qw.scales,
        qw.outlier_indptr,
        qw.outlier_indices,
        qw.outlier_values,
        bits,
        tm.kernel_group(group, k),
        k,
    )


def reference(weight: tm.Weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    from easyquant.format.qweight import dequantize_parts

    dense = dequantize_parts(
        weight.qweight,
        weight.scales,
        weight.indptr,
        weight.indices,
        weight.values,
        weight.bits,
        weight.in_features,
        torch.float64,
    )
    out = x.double() @ dense.T
    return out if bias is None else out + bias.double()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    assert bool(torch.isfinite(out).all())
    err = float((out.double() - ref).norm() / ref.norm())
    assert err <= TOL[dtype], f"relative error {err:.2e}"


def fresh_x(m: int, k: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)


# (bits, group, out, in): out ragged against every row block; in not a multiple of the K tile
CASES = [
    (4, None, 45, 200),
    (4, 32, 37, 96),
    (3, None, 33, 72),
    (3, 32, 20, 64),
    (2, None, 19, 136),
    (8, 16, 21, 48),
]


@pytest.mark.parametrize(("bits", "group", "n", "k"), CASES)
@pytest.mark.parametrize("m", [1, 5])
def test_dot_kernel_matches_reference(bits, group, n, k, m, device):
    weight = random_weight(n, k, bits, group, seed=bits * 100 + n, device=device)
    for dtype in (torch.float32, torch.float16):
        x = fresh_x(m, k, dtype, device, seed=m + n)
        bias = fresh_x(1, n, dtype, device, seed=7)[0]
        out = tm.dot_matmul(weight, x, bias, tm.DotConfig(16, 16, 32, out_chunk=4))
        assert_close(out, reference(weight, x, bias), dtype)


@pytest.mark.parametrize(("bits", "group", "n", "k"), [c for c in CASES if c[3] % 32 == 0])
def test_gemv_matches_reference(bits, group, n, k, device):
    weight = random_weight(n, k, bits, group, seed=bits + n, device=device)
    assert tm.gemv_block_w(weight, 4) is not None
    for dtype in (torch.float32, torch.float16):
        x = fresh_x(1, k, dtype, device, seed=n)
        out = tm.gemv(weight, x[0], None, tm.GemvConfig(block_n=16, block_w=4))
        assert_close(out[None], reference(weight, x, None), dtype)


def test_bfloat16_activations(device):
    weight = random_weight(40, 64, 4, None, seed=3, device=device)
    for m in (1, 3):
        x = fresh_x(m, 64, torch.bfloat16, device, seed=m)
        ref = reference(weight, x, None)
        assert_close(tm.dot_matmul(weight, x, None, tm.DotConfig(16, 16, 32)), ref, torch.bfloat16)
        assert_close(tm.matmul(weight, x, None), ref, torch.bfloat16)


def test_large_batch_paths_split_k_and_dequantize(device):
    """One-hot outliers (wide batch tiles), split K with atomics, and the dense weight."""
    weight = random_weight(50, 160, 4, None, seed=11, device=device, fraction=0.1)
    x = fresh_x(20, 160, torch.float32, device, seed=12)
    ref = reference(weight, x, None)
    onehot = tm.dot_matmul(weight, x, None, tm.DotConfig(16, 64, 32, num_warps=4))
    split = tm.dot_matmul(weight, x, None, tm.DotConfig(16, 16, 32, split_k=3))
    assert_close(onehot, ref, torch.float32)
    assert_close(split, ref, torch.float32)
    assert_close(tm.dequant_matmul(weight, x, None), ref, torch.float32)
    dense = tm.dequantize(weight, torch.float32)
    torch.testing.assert_close(dense.double(), reference(weight, torch.eye(160), None).T)


def test_rows_with_more_outliers_than_the_main_loop_takes(device):
    """A single K step with 4 slots per row leaves the dense rows to the trailing loop."""
    weight = random_weight(18, 64, 4, None, seed=5, device=device, fraction=0.5)
    x = fresh_x(1, 64, torch.float32, device, seed=6)
    ref = reference(weight, x, None)
    assert_close(tm.gemv(weight, x[0], None, tm.GemvConfig(16, 8))[None], ref, torch.float32)
    out = tm.dot_matmul(weight, x, None, tm.DotConfig(16, 16, 64, out_chunk=4))
    assert_close(out, ref, torch.float32)


def test_no_outliers_at_all(device):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (24, 64), generator=gen)
    scales = torch.rand(24, 1, generator=gen).half() + 0.1
    qw = pack_quantized(torch.zeros(24, 64), codes, scales, codes < -100, 4, None).to(device)
    weight = tm.Weight(qw.qweight, qw.scales, qw.outlier_indptr, qw.outlier_indices,
                       qw.outlier_values, 4, 0, 64)  # fmt: skip
    assert weight.nnz == 0
    for m in (1, 4):
        x = fresh_x(m, 64, torch.float32, device, seed=m)
        assert_close(tm.matmul(weight, x, None), reference(weight, x, None), torch.float32)


def test_supports():
    assert tm.supports(4, None, 100)
    assert tm.supports(3, 128, 4096)
    assert tm.supports(4, 100, 100)  # one group per row is one scale per row
    assert not tm.supports(4, 8, 64)  # no power-of-two K tile >= 16 inside a group of 8
    assert not tm.supports(5, None, 64)


def test_quant_linear_on_the_kernels_matches_the_torch_path(device):
    from easyquant import QuantConfig, QuantLinear, quantize_tensor
    from tests.conftest import student_t

    weight = student_t(40, 96, seed=9)
    layer = QuantLinear(quantize_tensor(weight, QuantConfig(steps=5)), torch.randn(40)).to(device)
    assert layer.fused_supported
    for shape in ((1, 96), (2, 3, 96)):
        x = torch.randn(*shape).to(device)
        expected = layer.set_backend("torch")(x)
        got = layer.set_backend("triton")(x)
        assert got.shape == (*shape[:-1], 40)
        assert_close(got, expected.double(), torch.float32)
