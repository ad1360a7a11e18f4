"""The fused matmul kernels against the torch reference (x @ dequantize().T + bias), on fresh random
inputs: ragged shapes, rows with no outliers and with many, 2/3/4/8 bits, batch 1 and more, the
outlier table with and without overflow. On a machine without a GPU they run under Triton's
interpreter (set up in conftest.py)."""

from dataclasses import replace

import pytest
import torch

from easyquant.format.qweight import pack_quantized
from easyquant.kernels import triton_matmul as tm

TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def random_parts(n, k, bits, group, seed, fraction=0.04):
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
    return pack_quantized(weight, codes, scales, outliers, bits, group)


def random_weight(
    n: int,
    k: int,
    bits: int,
    group: int | None,
    seed: int,
    device: str,
    fraction: float = 0.04,
    slots: int | None = None,
) -> tm.Weight:
    """``slots``: fixed outlier slots per row (None: the default quantile; small: overflow)."""
    qw = random_parts(n, k, bits, group, seed, fraction).to(device)
    return tm.Weight.from_csr(
        qw.qweight,
        qw.scales,
        qw.outlier_indptr,
        qw.outlier_indices,
        qw.outlier_values,
        bits,
        tm.kernel_group(group, k),
        k,
        slots=slots,
    )


def dense_reference(weight: tm.Weight) -> torch.Tensor:
    """The float64 dense weight rebuilt from the outlier table (checked against the CSR below)."""
    from easyquant.format.bitpack import unpack_codes

    codes = unpack_codes(weight.qweight.cpu(), weight.bits, weight.in_features).double()
    codes -= 1 << (weight.bits - 1)
    scales = weight.scales.cpu().double()
    n = codes.shape[0]
    dense = (codes.reshape(n, scales.shape[1], -1) * scales[:, :, None]).reshape(n, -1)
    table = weight.outliers
    for r in range(n):
        c = int(table.count[r])
        dense[r, table.cols[r, :c].cpu().long()] = table.vals[r, :c].cpu().double()
        a, b = int(table.ov_indptr[r]), int(table.ov_indptr[r + 1])
        dense[r, table.ov_cols[a:b].cpu().long()] = table.ov_vals[a:b].cpu().double()
    return dense


def reference(weight: tm.Weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.double().cpu() @ dense_reference(weight).T
    out = out if bias is None else out + bias.double().cpu()
    return out.to(x.device)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    assert bool(torch.isfinite(out).all())
    err = float((out.double() - ref).norm() / ref.norm())
    assert err <= TOL[dtype], f"relative error {err:.2e}"


def fresh_x(m: int, k: int, dtype: torch.dtype, device: str, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)


def test_outlier_table_holds_the_csr_entries():
    from easyquant.format.qweight import dequantize_parts

    qw = random_parts(30, 64, 4, None, seed=1, fraction=0.1)
    parts = (qw.qweight, qw.scales, qw.outlier_indptr, qw.outlier_indices, qw.outlier_values)
    expected = dequantize_parts(*parts, 4, 64, torch.float64)
    counts = (qw.outlier_indptr[1:] - qw.outlier_indptr[:-1]).long()
    for slots in (None, 8, 3, 0):
        weight = tm.Weight.from_csr(*parts, 4, 0, 64, slots=slots)
        table = weight.outliers
        want = tm.choose_slots(counts) if slots is None else slots
        assert table.slots == want and want % (tm.SLOT_ALIGN if slots is None else 1) == 0
        assert table.overflow == int((counts - want).clamp(min=0).sum())
        assert torch.equal(table.count.long(), counts.clamp(max=table.slots))
        torch.testing.assert_close(dense_reference(weight), expected, rtol=0, atol=0)
    # a quantile below 1 leaves the fullest rows to the overflow
    assert tm.choose_slots(torch.tensor([1, 2, 3, 40]), 0.5) == tm.SLOT_ALIGN
    assert tm.choose_slots(torch.tensor([1, 2, 3, 40]), 1.0) == 40
    assert tm.choose_slots(torch.zeros(5, dtype=torch.long)) == 0


# (bits, group, out, in): out ragged against every row block; in not a multiple of the K tile
CASES = [
    (4, None, 45, 200),
    (4, 32, 37, 96),
    (3, None, 33, 72),
    (3, 32, 20, 64),
    (2, None, 19, 136),
    (8, 16, 21, 48),
    (6, None, 27, 88),
    (5, 32, 23, 96),
]


@pytest.mark.parametrize(("bits", "group", "n", "k"), CASES)
@pytest.mark.parametrize("m", [1, 5])
def test_dot_kernel_matches_reference(bits, group, n, k, m, device):
    configs = [
        (None, tm.DotConfig(16, 16, 32)),
        (2, tm.DotConfig(16, 16, 32, split_k=2, xt=True, slot_chunk=4, out_chunk=4)),
    ]
    for slots, config in configs:
        weight = random_weight(n, k, bits, group, seed=bits * 100 + n, device=device, slots=slots)
        for dtype in (torch.float32, torch.float16):
            x = fresh_x(m, k, dtype, device, seed=m + n)
            bias = fresh_x(1, n, dtype, device, seed=7)[0]
            out = tm.dot_matmul(weight, x, bias, config)
            assert_close(out, reference(weight, x, bias), dtype)


@pytest.mark.parametrize(("bits", "n", "k"), [(4, 45, 256), (3, 33, 512), (2, 19, 384), (8, 9, 80)])
def test_word_plane_kernel_matches_reference(bits, n, k, device):
    per = tm.GEMV_WORD_CODES[bits]
    for slots, config in ((None, tm.DotConfig(16, 16, 16 * per)),
                          (1, tm.DotConfig(32, 16, 16 * per, split_k=2, xt=True))):  # fmt: skip
        weight = random_weight(n, k, bits, None, seed=n, device=device, slots=slots)
        assert tm.fits(weight, replace(config, planes=True))
        for dtype, m in ((torch.float32, 3), (torch.float16, 16)):
            x = fresh_x(m, k, dtype, device, seed=m)
            out = tm.dot_matmul(weight, x, None, replace(config, planes=True))
            assert_close(out, reference(weight, x, None), dtype)


def test_small_batches_of_4_bit_layers_take_the_joined_kernel(device):
    """Off the measured table, batches up to SMALL_BATCH of 4-bit layers take the joined
    word-plane kernel, with outliers or none (4 stages unsplit, 3 with split K), and so do
    mid_config's batches; other widths keep their kernel and GEMV batches the GEMV. Its numerics
    with an empty outlier table."""
    for weight in (outlier_free_weight(8192, 64), random_weight(8192, 64, 4, None, 2, "cpu")):
        config = tm.default_config(weight, 16)
        assert isinstance(config, tm.DotConfig) and config.packed and config.joined
        assert (config.split_k, config.num_stages) == (1, 4)
        assert isinstance(tm.default_config(weight, 1), tm.GemvConfig)
    long_k = tm.small_config(4096, 11008, 16, 4)
    assert long_k.joined and (long_k.split_k, long_k.num_stages) == (4, 3)
    assert not tm.small_config(8192, 64, 16, 3).joined
    assert all(
        tm.mid_config(n, k, m).joined for n, k in ((4096, 11008), (11008, 4096)) for m in (32, 128)
    )
    empty = outlier_free_weight(64, 1032, device)  # (K not a whole number of steps)
    x = fresh_x(16, 1032, torch.float16, device, seed=4)
    out = tm.dot_matmul(empty, x, None, replace(long_k, split_k=2))
    assert_close(out, reference(empty, x, None), torch.float16)


def outlier_free_weight(n: int, k: int, device: str = "cpu") -> tm.Weight:
    codes = torch.randint(-8, 8, (n, k), generator=torch.Generator().manual_seed(n + k))
    scales = torch.full((n, 1), 0.01).half()
    qw = pack_quantized(codes * 0.01, codes, scales, torch.zeros(n, k, dtype=torch.bool), 4, None)
    parts = (qw.qweight, qw.scales, qw.outlier_indptr, qw.outlier_indices, qw.outlier_values)
    return tm.Weight.from_csr(*(t.to(device) for t in parts), 4, 0, k)


def test_pair_ordered_copy_of_x(device):
    """The joined kernel's copy of x: column ``8 W s + 8 w + j + 4 h`` at row
    ``8 W s + 2 W j + 2 w + h``, the batch padded, rows past K zero; in column order, rows past
    K zero too, also where torch copies x (strided along K)."""
    rows, k, m, pair_w, out_rows = 5, 296, 16, 16, 384
    x = fresh_x(rows, k, torch.float16, device, seed=3)
    copy = tm.transpose_plan(rows, k, m, k, 1, x.dtype, None, pair_w, out_rows)(x).t()
    assert copy.shape == (out_rows, m)
    col = torch.arange(k)
    step, r = col // (8 * pair_w), col % (8 * pair_w)
    w, t = r // 8, r % 8
    row = 8 * pair_w * step + 2 * pair_w * (t % 4) + 2 * w + t // 4
    assert len(set(row.tolist())) == k
    expected = torch.zeros(out_rows, m, dtype=x.dtype)
    expected[row, :rows] = x.cpu().t()
    assert torch.equal(copy.cpu(), expected)
    with pytest.raises(ValueError, match="pair-ordered"):
        tm.transpose_plan(rows, k, m, 1, rows, x.dtype, None, pair_w, out_rows)
    # in column order, by the kernel or (x strided along K) by torch: rows past K zero as well
    strided = x.t().contiguous().t()
    for source, kernel in ((x, True), (strided, False)):
        plan = tm.transpose_plan(rows, k, m, source.stride(0), source.stride(1), x.dtype, kernel,
                                 0, out_rows)  # fmt: skip
        expected = torch.zeros(out_rows, m, dtype=x.dtype)
        expected[:k, :rows] = x.cpu().t()
        assert torch.equal(plan(source).t().cpu(), expected)
    joined = tm.DotConfig(16, 16, 128, xt=True, planes=True, packed=True, joined=True,
                          pair_order=False)  # fmt: skip
    weight = random_weight(24, k, 4, None, seed=5, device=device, slots=2)
    assert_close(tm.dot_matmul(weight, strided, None, joined), reference(weight, x, None),
                 torch.float16)  # fmt: skip


@pytest.mark.parametrize(("group", "n", "k"), [(None, 45, 296), (128, 37, 384), (256, 20, 512)])
def test_packed_word_plane_kernel_matches_reference(group, n, k, device):
    """Planes decoded in pairs (4 bits, fp16 / bf16 x): on the CPU the one-plane decode, on a GPU
    the PTX; with and without overflow and split K; each pair of planes one product against x
    copied in pair order (``joined``), K not a whole number of steps; stop 21's main loop
    (every pair shifted into place, a partial sum per step) too; x copied in column order."""
    joined = tm.DotConfig(16, 16, 128, xt=True, planes=True, packed=True, joined=True)
    for slots, config in ((None, tm.DotConfig(16, 16, 128, planes=True, packed=True)),
                          (1, tm.DotConfig(32, 16, 128, split_k=2, xt=True, planes=True,
                                           packed=True)),
                          (None, joined), (2, replace(joined, block_n=32, split_k=3)),
                          (1, replace(joined, block_k=256)),
                          (2, replace(joined, block_m=32, split_k=2)),
                          (1, replace(joined, pair_in_place=False,
                                      acc_in_place=False)),
                          (2, replace(joined, pair_order=False, split_k=2)),
                          (1, replace(joined, pair_order=False, block_k=256))):  # fmt: skip
        weight = random_weight(n, k, 4, group, seed=n, device=device, slots=slots)
        assert tm.fits(weight, config)
        for dtype, m in ((torch.float16, 16), (torch.bfloat16, 5), (torch.float32, 3)):
            x = fresh_x(m, k, dtype, device, seed=m)
            bias = fresh_x(1, n, dtype, device, seed=6)[0]
            out = tm.dot_matmul(weight, x, bias, config)
            assert_close(out, reference(weight, x, bias), dtype)


def test_outlier_slots_unmasked_and_summed_in_half(device):
    """``slot_unmasked`` (x the padded copy, slots a multiple of the chunk): the slots' loads
    take no masks, so rows past N read row N - 1 and empty slots add 0 * x[m, 0]; ``slot_half``
    (fp16 x): each chunk of products summed in fp16. Close to the reference and to the masked
    fp32 sums with empty slots, a partial last row tile, split K, overflow, a padded batch and x
    copied in column order; a config they do not apply to (slots not a multiple, bf16 / fp32 x,
    x not copied) runs the masked fp32 sums."""
    joined = tm.DotConfig(16, 16, 128, xt=True, planes=True, packed=True, joined=True,
                          slot_chunk=4, slot_unmasked=True, slot_half=True)  # fmt: skip
    cases = (
        (24, joined, 16, torch.float16),  # 6 chunks, empty slots in most rows
        (8, replace(joined, split_k=3, block_n=32), 5, torch.float16),  # 2 chunks, split, overflow
        (8, replace(joined, split_k=3, block_n=32, pair_order=False), 5, torch.float16),
        (8, replace(joined, joined=False, slot_half=False), 20, torch.float16),  # unmasked only
        (8, replace(joined, slot_unmasked=False), 16, torch.float16),  # half only
        (6, joined, 16, torch.float16),  # 6 slots, chunks of 4: masked
        (8, joined, 16, torch.bfloat16),  # bf16: fp32 sums
        (8, replace(joined, xt=False, joined=False), 3, torch.float32),  # x as given: masked
    )
    for slots, config, m, dtype in cases:
        weight = random_weight(45, 296, 4, None, seed=slots, device=device, fraction=0.06,
                               slots=slots)  # fmt: skip
        assert weight.outliers.slots == slots and bool((weight.outliers.count < slots).any())
        x = fresh_x(m, 296, dtype, device, seed=m)
        bias = fresh_x(1, 45, dtype, device, seed=8)[0]
        out = tm.dot_matmul(weight, x, bias, config)
        assert_close(out, reference(weight, x, bias), dtype)
        masked = replace(config, slot_unmasked=False, slot_half=False)
        assert_close(out, tm.dot_matmul(weight, x, bias, masked).to(torch.float64), dtype)


def test_launch_while_x_is_copied(device):
    """Programmatic dependent launch (sm_90: each kernel starts before the one ahead of it ends
    and waits for its writes before its first load) gives the plain launch's output bit for bit:
    the GEMV (split K by fp32 atomics: with two splits either order gives the same sum), and
    the word-plane kernel after x's copy, with split K and a padded batch; without it (the
    interpreter, GPUs before sm_90) the same config is a plain launch. The defaults take it for
    the word-plane kernel up to batch 16, not for the GEMV."""
    weight = random_weight(45, 296, 4, None, seed=3, device=device, slots=2)
    joined = tm.DotConfig(16, 16, 128, xt=True, planes=True, packed=True, joined=True)
    for config, m in ((joined, 16), (replace(joined, block_m=32, split_k=2, joined=False), 40)):
        x = fresh_x(m, 296, torch.float16, device, seed=m)
        plain = tm.dot_matmul(weight, x, None, config)
        assert_close(plain, reference(weight, x, None), torch.float16)
        assert torch.equal(tm.dot_matmul(weight, x, None, replace(config, pdl=True)), plain)
    gemv = tm.GemvConfig(8, 16, 2, 1, split_k=2, packed=True)
    x = fresh_x(1, 296, torch.float16, device, seed=1)
    plain = tm.gemv(weight, x[0], None, gemv)
    assert_close(plain[None], reference(weight, x, None), torch.float16)
    assert torch.equal(tm.gemv(weight, x[0], None, replace(gemv, pdl=True)), plain)
    hopper = device == "cuda" and torch.cuda.get_device_capability() >= (9, 0)
    assert tm.dependent_launch(weight) == hopper
    assert tm.default_config(weight, 16).pdl and not tm.default_config(weight, 1).pdl


def test_split_k_is_summed_in_the_kernel(device):
    """Split K with the layer's tile counters: each tile's last program adds the partial sums in
    split order, so every call gives the same output bit for bit (fp32 atomics past two splits
    need not), close to the reference, and the counters are back at zero after it. Without
    counters, or with too few for the grid, the atomics path runs and agrees."""
    weight = random_weight(45, 296, 4, None, seed=5, device=device, slots=2)
    assert weight.locks is not None and weight.locks.dtype == torch.int32
    assert not weight.locks.any()
    joined = tm.DotConfig(16, 16, 128, 3, xt=True, planes=True, packed=True, joined=True)
    cases = (
        (joined, 16, torch.float16),
        (replace(joined, block_m=32, joined=False), 40, torch.float16),
        (tm.DotConfig(16, 16, 32, 3, xt=True), 5, torch.float32),
        (tm.DotConfig(32, 16, 64, 4), 20, torch.bfloat16),
    )
    few = replace(weight, locks=torch.zeros(1, dtype=torch.int32, device=device))
    for config, m, dtype in cases:
        x = fresh_x(m, 296, dtype, device, seed=m)
        bias = fresh_x(1, 45, torch.float32, device, seed=7)[0]
        ref = reference(weight, x, bias)
        plan = tm.dot_plan(weight, m, x.stride(0), x.stride(1), dtype, True, config)
        assert plan.split_sum == "kernel"
        out = plan(weight, x, bias)
        assert_close(out, ref, dtype)
        assert torch.equal(plan(weight, x, bias), out)
        assert not weight.locks.any()
        for other, config_other in (
            (weight, replace(config, reduce=False)),
            (replace(weight, locks=None), config),
            (few, config),
        ):
            plan = tm.dot_plan(other, m, x.stride(0), x.stride(1), dtype, True, config_other)
            assert plan.split_sum == "atomics"
            assert_close(plan(other, x, bias), ref, dtype)


@pytest.mark.parametrize(("bits", "group", "n", "k"), [(4, None, 45, 256), (3, 32, 20, 64)])
def test_gemv_takes_a_few_batch_rows(bits, group, n, k, device):
    """x [M, K] -> out [M, N], one program per row block and batch row; the fp32 decode and the
    f16x2 dots, with split K and overflow; each row as the one-row call gives it."""
    configs = [
        (None, tm.GemvConfig(block_n=16, block_w=2, packed=True)),
        (2, tm.GemvConfig(block_n=8, block_w=2, split_k=2, packed=True, xvec=bits == 4)),
        (2, tm.GemvConfig(block_n=8, block_w=2, order=2)),
    ]
    for slots, config in configs:
        weight = random_weight(n, k, bits, group, seed=n + 5, device=device, slots=slots)
        for dtype, m in ((torch.float16, 3), (torch.bfloat16, 2), (torch.float32, 4)):
            x = fresh_x(m, k, dtype, device, seed=m + 11)
            bias = fresh_x(1, n, dtype, device, seed=9)[0]
            out = tm.gemv(weight, x, bias, config)
            assert_close(out, reference(weight, x, bias), dtype)
            assert torch.equal(out[1], tm.gemv(weight, x[1], bias, config))


GEMV_CASES = [c for c in CASES if c[3] % 32 == 0 and c[0] in tm.GEMV_WORD_CODES]
GEMV_CASES += [(4, None, 45, 256), (3, None, 33, 96), (2, None, 19, 128), (8, None, 9, 96)]


@pytest.mark.parametrize(("bits", "group", "n", "k"), GEMV_CASES)
def test_gemv_matches_reference(bits, group, n, k, device):
    configs = [
        (None, tm.GemvConfig(block_n=16, block_w=4, order=1)),
        (None, tm.GemvConfig(block_n=8, block_w=2, order=2)),
        (2, tm.GemvConfig(block_n=16, block_w=4, order=0, split_k=3)),
        (2, tm.GemvConfig(block_n=8, block_w=2, order=2, split_k=2)),
    ]
    for slots, config in configs:
        weight = random_weight(n, k, bits, group, seed=bits + n, device=device, slots=slots)
        assert tm.gemv_block_w(weight, 4) is not None
        for dtype in (torch.float32, torch.float16):
            x = fresh_x(1, k, dtype, device, seed=n)
            bias = fresh_x(1, n, dtype, device, seed=3)[0]
            out = tm.gemv(weight, x[0], bias, config)
            assert_close(out[None], reference(weight, x, bias), dtype)


@pytest.mark.parametrize(("bits", "group", "n", "k"), [
    (4, None, 45, 256), (4, 32, 37, 96), (4, 64, 20, 512), (3, None, 33, 256), (3, 64, 21, 192),
    (2, None, 29, 256), (2, 32, 19, 160),
])  # fmt: skip
def test_packed_gemv_matches_reference(bits, group, n, k, device):
    """The f16x2 word (4 and 2 bits) and triple (3 bits) dots with fp16 / bf16 x, with and
    without overflow and split K; on the CPU their interpreter stand-ins, on a GPU the PTX."""
    configs = [
        (None, tm.GemvConfig(block_n=16, block_w=4, packed=True)),
        (2, tm.GemvConfig(block_n=8, block_w=2, order=2, split_k=2, packed=True)),
        (2, tm.GemvConfig(block_n=16, block_w=2, split_k=2, packed=True, xvec=True)),
        (None, tm.GemvConfig(block_n=4, block_w=4, order=0, packed=True, xvec=True)),
    ]
    for slots, config in configs:
        weight = random_weight(n, k, bits, group, seed=n, device=device, slots=slots)
        for dtype in (torch.float16, torch.bfloat16):
            assert tm.packed_gemv(weight, dtype, config)
            x = fresh_x(1, k, dtype, device, seed=n + 1)
            bias = fresh_x(1, n, dtype, device, seed=4)[0]
            out = tm.gemv(weight, x[0], bias, config)
            assert_close(out[None], reference(weight, x, bias), dtype)
    # fp16 activations up to 30000 (a half's partial sums stay below 2 max|x|)
    weight = random_weight(n, k, bits, group, seed=n + 2, device=device)
    x = (fresh_x(1, k, torch.float32, device, seed=n + 3) * 10000).clamp(-30000, 30000).half()
    out = tm.gemv(weight, x[0], None, configs[0][1])
    assert_close(out[None], reference(weight, x, None), torch.float16)
    other = random_weight(n, k, 8, group, seed=n, device=device)
    assert not tm.packed_gemv(other, torch.float16, configs[0][1])
    assert not tm.packed_gemv(weight, torch.float32, configs[0][1])


def test_plane_pairs_decode_every_4bit_code_exactly():
    """The word-plane kernel's pair decode, simulated bit for bit: nibbles j and j + 4 (fp16 odd
    j: where they are, at bits 4-7 and 20-23) dropped by the lop3 mask into two 1024.0s (bf16:
    128.0s), then one f16x2 (bf16x2) FMA, give u - 8 in both halves for every 4-bit code."""
    import numpy as np

    def value(bits: int, act: int) -> float:
        if act == 1:
            return float(np.array(bits, dtype=np.uint16).view(np.float16))
        return float(np.array(bits << 16, dtype=np.uint32).view(np.float32))  # bf16: fp32's top

    for act, odd in ((1, False), (1, True), (2, False)):
        mask, magic, mul, add = tm.plane_pair_constants(act, odd)
        for u in range(16):
            h = ((u << (4 if odd else 0)) & mask) | magic
            result = value(h, act) * value(mul, act) + value(add, act)  # exact in fp64
            assert result == u - 8
    with pytest.raises(AssertionError):
        tm.plane_pair_constants(2, odd=True)


def test_triple_pairs_decode_every_3bit_code_exactly():
    """The 3-bit f16x2 plan, simulated bit for bit: each pair's 32-bit window of the word triple,
    lop3 mask into two fp16 1024.0s, and fp16x2 FMA give (u - 4) / 16 for both codes; every code
    is in one pair."""
    import numpy as np

    def half(bits: int) -> float:
        return float(np.array(bits & 0xFFFF, dtype=np.uint16).view(np.float16))

    gen = torch.Generator().manual_seed(0)
    plan = tm.triple_pair_constants()
    assert sorted(c for _, lo, hi, *_ in plan for c in (lo, hi)) == list(range(32))
    for _ in range(50):
        codes = torch.randint(0, 8, (32,), generator=gen).tolist()
        triple = sum(u << (3 * k) for k, u in enumerate(codes))
        for b, lo, hi, mask, mul, add in plan:
            window = (triple << -b if b < 0 else triple >> b) & 0xFFFFFFFF
            h = (window & mask) | 0x64006400
            for part, code in ((0, lo), (16, hi)):
                value = half(h >> part) * half(mul >> part) + half(add >> part)  # exact in fp64
                assert value == (codes[code] - 4) / 16
                assert np.float16(value) == value


def test_bfloat16_activations(device):
    weight = random_weight(40, 64, 4, None, seed=3, device=device, slots=4)
    for m in (1, 3):
        x = fresh_x(m, 64, torch.bfloat16, device, seed=m)
        ref = reference(weight, x, None)
        assert_close(tm.dot_matmul(weight, x, None, tm.DotConfig(16, 16, 32)), ref, torch.bfloat16)
        assert_close(tm.matmul(weight, x, None), ref, torch.bfloat16)


@pytest.mark.parametrize("slots", [None, 3])
def test_large_batch_paths_and_dequantize(slots, device):
    """Dense weight (rows padded for cuBLAS), the fused kernel with wide batch tiles, split K."""
    weight = random_weight(50, 160, 4, None, seed=11, device=device, fraction=0.1, slots=slots)
    x = fresh_x(20, 160, torch.float32, device, seed=12)
    bias = fresh_x(1, 50, torch.float32, device, seed=13)[0]
    ref = reference(weight, x, bias)
    wide = tm.dot_matmul(weight, x, bias, tm.DotConfig(16, 64, 32, num_warps=4))
    split = tm.dot_matmul(weight, x, bias, tm.DotConfig(16, 16, 32, split_k=3))
    assert_close(wide, ref, torch.float32)
    assert_close(split, ref, torch.float32)
    for pad in (1, 8, 64):
        assert_close(tm.dequant_matmul(weight, x, bias, pad=pad), ref, torch.float32)
        assert_close(
            tm.dequant_matmul(weight, x, None, pad=pad), ref - bias.double(), torch.float32
        )
    for config in ((), tm.DENSE_PER_ROW, tm.DENSE_GROUPED):  # (dequantize's default, both named)
        dense = tm.dequantize(weight, torch.float32, 56, *config)
        assert dense.shape == (56, 160)
        expected = dense_reference(weight)
        torch.testing.assert_close(dense[:50].double().cpu(), expected, rtol=0, atol=0)
    grouped = random_weight(24, 96, 3, 32, seed=4, device=device, slots=2)
    per_row = random_weight(24, 96, 3, None, seed=4, device=device, slots=2)
    for w, config in ((grouped, ()), (grouped, tm.DENSE_GROUPED), (per_row, tm.DENSE_PER_ROW)):
        expected = dense_reference(w)
        for dtype in (torch.float32, torch.float16):
            got = tm.dequantize(w, dtype, None, *config).double().cpu()
            torch.testing.assert_close(got, expected.to(dtype).double(), rtol=0, atol=0)


def test_rows_with_many_more_outliers_than_slots(device):
    weight = random_weight(18, 64, 4, None, seed=5, device=device, fraction=0.5, slots=1)
    assert weight.outliers.overflow > 18 * 20
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
    weight = tm.Weight.from_csr(qw.qweight, qw.scales, qw.outlier_indptr, qw.outlier_indices,
                                qw.outlier_values, 4, 0, 64)  # fmt: skip
    assert not weight.has_outliers and weight.outliers.slots == 0
    for m in (1, 4, 20):
        x = fresh_x(m, 64, torch.float32, device, seed=m)
        assert_close(tm.matmul(weight, x, None), reference(weight, x, None), torch.float32)


def test_supports():
    assert tm.supports(4, None, 100)
    assert tm.supports(3, 128, 4096)
    assert tm.supports(4, 100, 100)  # one group per row is one scale per row
    assert not tm.supports(4, 8, 64)  # no power-of-two K tile >= 16 inside a group of 8
    assert tm.supports(5, None, 64) and tm.supports(6, 32, 64)
    assert not tm.supports(7, None, 64)


def test_5_bit_layers_take_the_tensor_core_kernel_then_dequantize(device):
    """No word view (no GEMV, no word-plane kernel) for 5 bits: batch 1-16 runs the tensor-core
    kernel on the bytes, larger batches dequantize (whose result is exact) + cuBLAS."""
    weight = random_weight(40, 200, 5, None, seed=5, device=device, fraction=0.05, slots=2)
    assert tm.gemv_block_w(weight, 4) is None
    assert not tm.fits(weight, tm.DotConfig(32, 16, 256, planes=True))
    for m in (1, 2, 16, 17):
        config = tm.default_config(weight, m)
        assert (config is None) == (m > tm.SMALL_BATCH)
        assert config is None or (tm.fits(weight, config) and not config.planes)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            x = fresh_x(m, 200, dtype, device, seed=m)
            assert_close(tm.matmul(weight, x, None), reference(weight, x, None), dtype)
    dense = tm.dequantize(weight, torch.float32, None).double().cpu()
    torch.testing.assert_close(dense, dense_reference(weight), rtol=0, atol=0)


@pytest.mark.parametrize("group", [None, 32])
def test_6_bit_layers_take_the_word_view(group, device):
    """6-bit codes as triples of int32 words (16 codes, two straddling word boundaries): the
    GEMV (batch 1) and the word-plane kernel (per channel), with split K and overflow; the
    defaults pick the GEMV at batch 1 and, on layers of at least 8192 rows, the word-plane
    kernel up to 16."""
    n, k = 37, 160
    for slots in (None, 2):
        weight = random_weight(n, k, 6, group, seed=6, device=device, fraction=0.05, slots=slots)
        assert tm.gemv_block_w(weight, 4) is not None
        bias = fresh_x(1, n, torch.float32, device, seed=3)[0]
        for config in (tm.GemvConfig(block_n=16, block_w=4), tm.GemvConfig(8, 2, split_k=2)):
            for dtype in (torch.float32, torch.float16):
                x = fresh_x(2, k, dtype, device, seed=7)
                out = tm.gemv(weight, x, bias.to(dtype), config)
                assert_close(out, reference(weight, x, bias.to(dtype)), dtype)
        for config in (tm.DotConfig(16, 16, 256, planes=True),
                       tm.DotConfig(32, 16, 256, split_k=2, xt=True, planes=True)):  # fmt: skip
            if group is not None:  # (2 word triples per group: below the dot's 16)
                assert not tm.fits(weight, config)
                continue
            assert tm.fits(weight, config)
            for dtype, m in ((torch.float32, 3), (torch.float16, 16), (torch.bfloat16, 5)):
                x = fresh_x(m, k, dtype, device, seed=m)
                assert_close(tm.dot_matmul(weight, x, None, config), reference(weight, x, None),
                             dtype)  # fmt: skip
    assert isinstance(tm.default_config(weight, 1), tm.GemvConfig)
    assert tm.small_config(8192, 4096, 16, 6).planes


def test_default_configs_fit_and_run(device):
    """Whatever ``matmul`` picks fits; the measured table answers only for CUDA devices."""
    assert tm.measured_config("gemv", 4096, 4096, torch.device("cpu")) is None
    assert tm.measured_rows(4096, 4096, torch.device("cpu")) is None
    weight = random_weight(40, 256, 4, None, seed=8, device=device)
    for m in (1, 2, 16, 17):
        config = tm.default_config(weight, m)
        assert config is None or tm.fits(weight, config)
        x = fresh_x(m, 256, torch.float16, device, seed=m)
        assert_close(tm.matmul(weight, x, None), reference(weight, x, None), torch.float16)
    # a few batch rows take the GEMV, up to the shape's limit; then the tensor-core kernel
    limit = tm.gemv_rows(40, 256, weight.qweight.device)
    assert isinstance(tm.default_config(weight, limit), tm.GemvConfig)
    assert isinstance(tm.default_config(weight, limit + 1), tm.DotConfig)
    assert isinstance(tm.default_config(random_weight(40, 256, 2, None, seed=1, device=device), 2),
                      tm.DotConfig)  # fmt: skip
    # past 16 rows (4 bits) the word-plane kernel with wider batch tiles, then dequantize + cuBLAS
    for m in (40, tm.MID_BATCH):
        config = tm.default_config(weight, m)
        assert isinstance(config, tm.DotConfig) and config.block_m > 16 and config.planes
    assert tm.mid_config(4096, 4096, 32).block_m == 16
    assert tm.mid_config(11008, 4096, 32).block_m == 32
    # few row blocks: K split over programs (here, and below on a real call), 4 ways up to batch
    # 16 (64 for a long K), then 2
    assert tm.mid_config(4096, 11008, 64).split_k == 4
    assert tm.mid_config(4096, 11008, 128).split_k == 2
    assert tm.small_config(4096, 4096, 16, 4).split_k == 4
    assert [tm.mid_config(4096, 4096, m).split_k for m in (32, 64, 128)] == [2, 2, 2]
    assert [tm.mid_config(4096, 4096, m).block_m for m in (32, 64, 128)] == [16, 32, 64]
    assert tm.mid_config(11008, 4096, 64).split_k == 1
    assert tm.long_k_split(4096, 2048, 16) == 1  # (a short K: nothing to split)
    assert tm.mid_config(11008, 4096, 64).block_m == 32
    assert tm.mid_config(14336, 4096, 64).block_m == 64
    assert tm.mid_config(14336, 4096, 32).block_m == 32
    long_k = random_weight(24, 8192, 4, None, seed=3, device=device)
    for m in (16, 40):
        config = tm.default_config(long_k, m)
        assert isinstance(config, tm.DotConfig) and config.split_k == 4
        x = fresh_x(m, 8192, torch.float16, device, seed=m)
        assert_close(tm.matmul(long_k, x, None), reference(long_k, x, None), torch.float16)
    assert tm.default_config(weight, tm.MID_BATCH + 1) is None
    # launched while x is copied up to batch 16, and past it on layers of more than 4096 rows
    # (where the device has programmatic dependent launch: dot_plan checks)
    assert tm.default_config(weight, 16).pdl and not tm.default_config(weight, 40).pdl
    many = random_weight(4104, 64, 4, None, seed=2, device="cpu")
    assert tm.default_config(many, 40).pdl
    # the word-plane kernel's outlier slots: summed in fp16; unmasked with 16-wide tiles, and
    # in chunks of 16 with 32-wide tiles up to batch 32 where the slots are a multiple of 16 (on
    # layers of at most 14336 rows)
    small, mid = tm.default_config(weight, 16), tm.default_config(weight, 100)
    assert small.slot_half and small.slot_unmasked and small.block_m == 16
    assert mid.slot_half and not mid.slot_unmasked and mid.block_m == 64
    for slots, m, unmasked, chunk in ((16, 32, True, 16), (8, 32, False, 8), (16, 40, False, 8)):
        layer = random_weight(4104, 256, 4, None, seed=4, device=device, slots=slots)
        config = tm.default_config(layer, m)
        assert config.block_m == 32 and (config.slot_unmasked, config.slot_chunk) == (unmasked,
                                                                                       chunk)
        x = fresh_x(m, 256, torch.float16, device, seed=m)
        assert_close(tm.matmul(layer, x, None), reference(layer, x, None), torch.float16)
    wider = random_weight(14344, 64, 4, None, seed=4, device="cpu", slots=16)
    assert tm.default_config(wider, 32).slot_chunk == 8
    # the packed kernel's products accumulate in place, but with 16-wide tiles and split K;
    # past batch 32 the joined kernel reads x copied in column order
    assert small.packed and small.acc_in_place and mid.acc_in_place
    assert small.pair_order and tm.default_config(weight, 32).pair_order and not mid.pair_order
    split = tm.default_config(long_k, 16)
    assert split.block_m == 16 and split.split_k > 1 and not split.acc_in_place
    x = fresh_x(40, 256, torch.float16, device, seed=40)
    assert_close(tm.matmul(weight, x, None), reference(weight, x, None), torch.float16)


def test_transposed_x_pads_the_batch_with_zeros(device):
    for rows, m in ((3, 16), (16, 16), (17, 48), (5, 320)):
        x = fresh_x(rows, 40, torch.float16, device, seed=rows)
        xt = tm.transposed_x(x, m)
        assert xt.shape == (m, 40) and xt.stride() == (1, m)
        assert torch.equal(xt[:rows], x) and not xt[rows:].any()
        for kernel in (True, False):  # either copy, forced
            plan = tm.transpose_plan(rows, 40, m, 40, 1, x.dtype, kernel=kernel and m <= 256)
            assert torch.equal(plan(x), xt)


def test_dot_kernel_pads_a_ragged_batch(device):
    """Batches that are not a multiple of block_m run padded (uniform masks) and come back with
    their own rows only, as the same rows do inside a full batch."""
    weight = random_weight(40, 256, 4, None, seed=3, device=device, slots=2)
    x = fresh_x(16, 256, torch.float16, device, seed=4)
    config = tm.DotConfig(32, 16, 256, xt=True, planes=True, packed=True)
    full = tm.dot_matmul(weight, x, None, config)
    assert_close(full, reference(weight, x, None), torch.float16)
    for m in (1, 3, 9):
        out = tm.dot_matmul(weight, x[:m], None, config)
        assert out.shape == (m, 40) and out.is_contiguous()
        torch.testing.assert_close(out, full[:m], rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the autotuner times on a GPU")
def test_autotuned_choice_matches_reference(device, monkeypatch):
    monkeypatch.setattr(tm, "AUTOTUNE", True)
    weight = random_weight(300, 512, 4, None, seed=9, device=device)
    for m in (1, 16, 40):
        x = fresh_x(m, 512, torch.float16, device, seed=m)
        assert_close(tm.matmul(weight, x, None), reference(weight, x, None), torch.float16)


@pytest.mark.parametrize("outlier_dtype, group, bits", [
    (None, None, 4), ("int8", None, 4), ("int8", 32, 4), (None, None, 6), (None, 32, 5),
])  # fmt: skip
def test_quant_linear_on_the_kernels_matches_the_torch_path(device, outlier_dtype, group, bits):
    from easyquant import QuantConfig, QuantLinear, quantize_tensor
    from tests.conftest import student_t

    weight = student_t(40, 96, seed=9)
    config = QuantConfig(bits=bits, steps=5, outlier_dtype=outlier_dtype, group_size=group)
    layer = QuantLinear(quantize_tensor(weight, config), torch.randn(40)).to(device)
    assert layer.fused_supported
    if outlier_dtype == "int8":  # the kernels' table holds the decoded values
        assert layer.outlier_values.dtype == torch.int8 and layer.slot_vals.dtype == torch.float16
        table = tm.Weight.from_csr(layer.qweight, layer.scales, layer.outlier_indptr,
                                   layer.outlier_indices, layer.kernel_outlier_values(), bits,
                                   tm.kernel_group(group, 96), 96)  # fmt: skip
        dense = layer.dequantize(torch.float64).cpu()
        torch.testing.assert_close(dense_reference(table).cpu(), dense, rtol=0, atol=0)
    assert layer.slot_cols.device.type == torch.device(device).type
    for shape in ((1, 96), (2, 3, 96)):
        x = torch.randn(*shape).to(device)
        expected = layer.set_backend("torch")(x)
        got = layer.set_backend("triton")(x)
        assert got.shape == (*shape[:-1], 40)
        assert_close(got, expected.double(), torch.float32)


def test_quant_linear_plans_follow_the_input_and_the_layer(device, monkeypatch):
    """Eager calls run a plan cached per input signature, whose kernels are launched directly
    (past Triton's binder) from their second call on CUDA: every call must still match the
    torch path, for inputs that differ in shape, strides, alignment and dtype, and after the
    layer's tensors change (rebuilt outlier table, assigned buffer, bias changed in place)."""
    from easyquant import QuantConfig, QuantLinear, quantize_tensor
    from easyquant.kernels.launch import KernelLaunch
    from tests.conftest import student_t

    direct = []
    original = KernelLaunch._direct
    monkeypatch.setattr(
        KernelLaunch, "_direct", lambda self, *args: direct.append(1) or original(self, *args)
    )
    k = 96
    layer = QuantLinear(quantize_tensor(student_t(40, k, seed=3), QuantConfig(steps=5)),
                        torch.randn(40)).to(device)  # fmt: skip
    gen = torch.Generator().manual_seed(0)

    def inputs(dtype):
        flat = torch.randn(3 * 5 * k + 1, generator=gen).to(device, dtype)
        yield flat[: 5 * k].view(1, 5, k)  # aligned
        yield flat[1 : 1 + 3 * k].view(3, k)  # not 16-byte aligned
        yield flat[: k * 4].view(k, 4).t()  # stride along K is not 1
        yield flat[:k]  # one row, 1-D
        yield flat[: 2 * 5 * k].view(2, 5, k)[:, -1]  # last position of each sequence

    def check(x):
        expected = layer.set_backend("torch")(x).double()
        layer.set_backend("triton")
        for _ in range(2):
            assert_close(layer(x), expected, x.dtype)

    for dtype in (torch.float32, torch.float16):
        for x in inputs(dtype):
            check(x)
    assert bool(direct) == (device == "cuda")
    x = next(inputs(torch.float16))
    layer.build_outlier_table(slots=0)  # every outlier in the overflow list
    check(x)
    layer.scales = layer.scales * 2
    check(x)
    with torch.no_grad():
        layer.bias.add_(1.0)
    check(x)
    monkeypatch.setattr(tm, "MAX_LAYER_PLANS", 2)
    for x in inputs(torch.float32):
        layer(x)
    assert len(layer.kernel_plans.plans) <= 2
    import copy
    import pickle

    for twin in (pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)):  # plans left behind
        assert twin.kernel_plans is None
        assert torch.equal(twin(x), layer(x))


def test_plans_are_shared_by_layout_and_hold_no_tensor(device, monkeypatch):
    """The op path's plans (torch.compile) are cached by layout: two layers of one layout share
    a plan (an outlier table of other sizes is another layout), each call runs on the tensors it
    is given, and an input of another alignment or batch gets its own plan."""
    monkeypatch.setattr(tm, "_PLANS", {})
    first = random_weight(40, 256, 4, None, seed=1, device=device)
    second = replace(first, qweight=first.qweight.clone(), scales=first.scales * 2)
    for m in (1, 5):
        flat = fresh_x(1, m * 256 + 1, torch.float16, device, seed=m)[0]
        aligned, shifted = flat[: m * 256].view(m, 256), flat[1:].view(m, 256)
        plan = tm.layout_plan(first, aligned, None)
        assert tm.layout_plan(second, aligned, None) is plan
        assert tm.layout_plan(first, shifted, None) is not plan
        for weight in (first, second, first):
            for x in (aligned, shifted):
                out = tm.layout_plan(weight, x, None)(weight, x, None)
                assert_close(out, reference(weight, x, None), torch.float16)
    assert len(tm._PLANS) == 4
