"""Properties of quantize_tensor: reconstruction bounds, exact outliers, ablations, bad input."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from easyquant import QuantConfig, quantize_tensor
from easyquant.algorithm.outliers import outlier_mask
from easyquant.format.qweight import QuantizedWeight
from tests.conftest import student_t

CONFIGS = st.builds(
    QuantConfig,
    bits=st.sampled_from([2, 3, 4, 8]),
    group_size=st.sampled_from([None, 8, 16]),
    outlier_sigma=st.sampled_from([None, 2.5, 3.0]),
    outlier_scope=st.sampled_from(["tensor", "channel"]),
    steps=st.sampled_from([0, 5, 30]),
    method=st.sampled_from(["easyquant", "rtn"]),
)


@given(
    config=CONFIGS,
    rows=st.integers(1, 12),
    groups=st.integers(1, 4),
    dist=st.sampled_from(["t", "normal", "uniform"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 1000),
)
def test_reconstruction_bounds(config, rows, groups, dist, dtype, seed):
    cols = 16 * groups
    g = torch.Generator().manual_seed(seed)
    w = {
        "t": student_t(rows, cols, seed=seed),
        "normal": torch.randn(rows, cols, generator=g) * 0.05,
        "uniform": torch.rand(rows, cols, generator=g) - 0.5,
    }[dist].to(dtype)
    qw = quantize_tensor(w, config)
    deq = qw.dequantize()
    assert deq.shape == w.shape and deq.dtype == dtype
    mask = outlier_mask(w, config.outlier_sigma, config.outlier_scope)
    # Outliers come back bit for bit.
    assert torch.equal(deq[mask], w[mask])
    assert qw.num_outliers == int(mask.sum())
    # Every non-outlier inside the clipping range is within half a step (plus storage rounding).
    group = config.group_size or cols
    scale = qw.scales.float().repeat_interleave(group, dim=1)
    codes = qw.codes()
    inside = ~mask & (codes > config.qmin) & (codes < config.qmax)
    err = (deq.float() - w.float()).abs()
    tol = scale / 2 + 1e-6 + (deq.float().abs() * 2**-7 if dtype != torch.float32 else 0)
    assert (err[inside] <= tol[inside]).all()
    assert codes.min() >= config.qmin and codes.max() <= config.qmax
    assert (codes[mask] == 0).all()


def test_easyquant_never_worse_than_rtn_per_channel_on_heavy_tails():
    for seed in range(3):
        w = student_t(128, 512, seed=seed)
        for bits in (2, 3, 4, 8):
            for group in (None, 64):
                rtn = quantize_tensor(
                    w, QuantConfig(bits=bits, group_size=group, method="rtn", outlier_sigma=None)
                )
                eq = quantize_tensor(w, QuantConfig(bits=bits, group_size=group, steps=100))
                e_rtn = ((rtn.dequantize() - w) ** 2).sum(1)
                e_eq = ((eq.dequantize() - w) ** 2).sum(1)
                assert (e_eq <= e_rtn).all(), (seed, bits, group)
                assert e_eq.sum() < 0.8 * e_rtn.sum()


def test_ablations_rank_as_in_the_paper():
    w = student_t(256, 512, seed=7)

    def err(**kw):
        return ((quantize_tensor(w, QuantConfig(**kw)).dequantize() - w) ** 2).sum().item()

    rtn = err(method="rtn", outlier_sigma=None)
    outliers_only = err(method="rtn")
    search_only = err(outlier_sigma=None, steps=100)
    easyquant = err(steps=100)
    assert easyquant < outliers_only < rtn
    assert easyquant < search_only < rtn


def test_bits_per_weight_counts_everything():
    w = student_t(64, 256)
    qw = quantize_tensor(w, QuantConfig(bits=4, group_size=128, steps=5))
    expected = (
        64 * 128 * 8  # codes
        + 64 * 2 * 16  # fp16 scales
        + 64 * 8  # uint8 outlier count per row and block of 256 columns (one block here)
        + qw.num_outliers * (8 + 32)  # uint8 column in its block + fp32 value
    ) / (64 * 256)
    assert qw.bits_per_weight == pytest.approx(expected)


def test_edge_rows():
    w = student_t(200, 64)
    w[0] = 0  # zero row
    w[1] = 0.05  # constant row
    w[2, :] = torch.linspace(0.5, 1, 64) * torch.tensor([-1.0, 1.0]).repeat(32)  # all outliers
    qw = quantize_tensor(w, QuantConfig(steps=20))
    deq = qw.dequantize()
    assert torch.equal(deq[0], w[0])
    torch.testing.assert_close(deq[1], w[1], rtol=2e-3, atol=0)
    mask = outlier_mask(w, 3.0)
    assert mask[2].all()
    assert torch.equal(deq[2][mask[2]], w[2][mask[2]])


def test_tiny_tensor():
    w = torch.tensor([[0.5]])
    for method in ("easyquant", "rtn"):
        qw = quantize_tensor(w, QuantConfig(method=method))
        torch.testing.assert_close(qw.dequantize(), w, rtol=1e-3, atol=0)


@pytest.mark.parametrize(
    ("weight", "config", "match"),
    [
        (torch.randn(8), None, "2-D"),
        (torch.randn(2, 3, 4), None, "2-D"),
        (torch.randn(4, 8, dtype=torch.float64), None, "dtype"),
        (torch.randint(0, 3, (4, 8)), None, "dtype"),
        (torch.zeros(0, 8), None, "empty"),
        ("not a tensor", None, "torch.Tensor"),
    ],
)
def test_bad_input(weight, config, match):
    with pytest.raises(ValueError, match=match):
        quantize_tensor(weight, config)


def test_nan_and_inf_name_the_position():
    w = torch.randn(4, 8)
    w[2, 5] = float("nan")
    w[3, 1] = float("inf")
    with pytest.raises(ValueError, match="row 2, column 5"):
        quantize_tensor(w)


def test_bad_backend():
    with pytest.raises(ValueError, match="backend"):
        quantize_tensor(torch.randn(4, 8), backend="cuda")


def test_grid_and_refine_never_worse_than_the_paper_and_better_at_3_bits():
    w = student_t(128, 512, seed=11)
    paper = QuantConfig.paper(bits=3, steps=100)
    improved = paper.replace(init_grid=40, refine_steps=3)

    def err(cfg):
        return float((quantize_tensor(w, cfg).dequantize() - w).pow(2).sum())

    assert err(improved) < err(paper)
    grouped = paper.replace(group_size=128)
    assert err(grouped.replace(init_grid=40, refine_steps=3)) <= err(grouped) * (1 + 1e-6)


def test_float16_outliers_halve_their_cost_and_stay_close():
    w = student_t(64, 256, seed=13)
    exact = quantize_tensor(w, QuantConfig.paper(steps=10))
    half = quantize_tensor(w, QuantConfig.paper(steps=10, outlier_dtype="float16"))
    assert exact.num_outliers == half.num_outliers > 0
    saved = exact.storage_bits - half.storage_bits
    assert saved == 16 * exact.num_outliers
    mask = outlier_mask(w, 3.0)
    assert torch.allclose(half.dequantize()[mask], w[mask], rtol=1e-3)


@pytest.mark.parametrize(
    "config",
    [
        QuantConfig(steps=5),
        QuantConfig(bits=3, group_size=8, steps=5, outlier_scope="group"),
        QuantConfig(bits=2, steps=5, outlier_scope="channel", init_grid=5, refine_steps=2),
        QuantConfig(bits=4, group_size=16, steps=3, init_grid=4, refine_steps=3),
        QuantConfig(bits=8, method="rtn", scale_dtype="bfloat16", outlier_dtype="float16"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_in_chunks_store_the_same_bits(monkeypatch, config, dtype):
    """On the CPU the rows are quantized a chunk at a time (and the outlier mask built so):
    the stored tensors are those of one chunk, bit for bit, even with a last chunk of 2 rows."""
    from easyquant.algorithm import chunking, range_search
    from easyquant.quantize import quantize_tensor_stepwise, stepwise_chunk_rows

    monkeypatch.setattr(range_search, "DEFAULT_CPU_CHUNK", 1 << 10)  # search blocks: 16 rows
    w = student_t(97, 64, seed=config.bits).to(dtype)
    w[3] = 0
    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 1 << 30)
    whole = quantize_tensor_stepwise(w, config, "torch")
    monkeypatch.setattr(chunking, "CHUNK_ELEMENTS", 1 << 11)
    assert stepwise_chunk_rows(w, config, "torch", None) < 97
    chunked = quantize_tensor_stepwise(w, config, "torch")
    for name, tensor in whole.state_dict().items():
        assert torch.equal(chunked.state_dict()[name], tensor), name


# ---- groups that do not divide the row (576 input features in groups of 128) ------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_ragged_groups_equal_independent_pieces_for_rtn(bits):
    # The last group of each row is shorter; with RTN (no search) each group's range is its own
    # max-abs, so the result equals quantizing the two column blocks separately.
    w = student_t(16, 192, seed=21)
    config = QuantConfig(bits=bits, group_size=128, method="rtn", outlier_sigma=None)
    q = quantize_tensor(w, config, backend="torch")
    assert q.scales.shape == (16, 2) and q.shape == (16, 192)
    first = quantize_tensor(w[:, :128].contiguous(), config.replace(group_size=None))
    last = quantize_tensor(w[:, 128:].contiguous(), config.replace(group_size=None))
    expected = torch.cat([first.dequantize(), last.dequantize()], dim=1)
    assert torch.equal(q.dequantize(), expected)


@pytest.mark.parametrize("scope", ["tensor", "channel", "group"])
def test_ragged_groups_with_outliers_and_search(scope):
    w = student_t(24, 576, seed=22)
    config = QuantConfig(group_size=128, steps=20, outlier_scope=scope)
    q = quantize_tensor(w, config, backend="torch")
    assert q.scales.shape == (24, 5)
    mask = outlier_mask(w, 3.0, scope, 128)
    assert q.num_outliers == int(mask.sum()) > 0
    deq = q.dequantize()
    assert torch.equal(deq[mask], w[mask])  # outliers exact, also in the short last group
    # Searched ranges never lose to RTN at the same grouping, and the state round trips.
    rtn = quantize_tensor(w, config.replace(method="rtn", outlier_sigma=None))
    err = lambda x: float((x.dequantize() - w).pow(2).sum())  # noqa: E731
    assert err(q) < err(rtn)
    again = QuantizedWeight.from_state_dict(q.state_dict())
    assert torch.equal(again.dequantize(), deq)


def test_ragged_group_outlier_statistics_use_only_the_short_group():
    w = torch.zeros(1, 12)
    w[0, :8] = torch.arange(8.0)  # first group of 8
    w[0, 8:] = torch.tensor([1.0, 1.0, 1.0, 9.0])  # short last group of 4: 9 is its outlier
    mask = outlier_mask(w, 1.5, "group", 8)
    assert mask[0, 11] and not mask[0, 8:11].any()
