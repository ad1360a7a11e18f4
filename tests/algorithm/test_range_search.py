import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from easyquant.algorithm.range_search import (
    adam_range_search,
    initial_scales,
    quantize_codes,
    reconstruction_loss,
)
from tests.conftest import student_t


def analytic_grad(x, s, qmin, qmax):
    q = quantize_codes(x, s, qmin, qmax)
    return 2 * ((q * s - x) * q).sum(dim=1)


@given(bits=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 10_000))
def test_gradient_matches_finite_difference(bits, seed):
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x = student_t(4, 64, seed=seed).double()
    s = initial_scales(x, qmax) * 0.8
    h = s * 1e-7
    # Only where no entry crosses a rounding boundary between s - h and s + h is the loss smooth.
    same = (quantize_codes(x, s - h, qmin, qmax) == quantize_codes(x, s + h, qmin, qmax)).all(1)
    fd = (reconstruction_loss(x, s + h, qmin, qmax) - reconstruction_loss(x, s - h, qmin, qmax)) / (
        2 * h.squeeze(1)
    )
    g = analytic_grad(x, s, qmin, qmax)
    assert same.any()
    torch.testing.assert_close(fd[same], g[same], rtol=1e-5, atol=1e-9)


def test_search_never_worse_than_its_start_and_deterministic():
    x = student_t(32, 256, seed=3)
    s0 = initial_scales(x, 7)
    s1, loss1 = adam_range_search(x, -8, 7, steps=50, lr=1e-2)
    s2, loss2 = adam_range_search(x, -8, 7, steps=50, lr=1e-2)
    assert torch.equal(s1, s2) and torch.equal(loss1, loss2)
    assert (loss1 <= reconstruction_loss(x, s0, -8, 7)).all()
    assert (loss1 < reconstruction_loss(x, s0, -8, 7)).float().mean() > 0.9
    torch.testing.assert_close(loss1, reconstruction_loss(x, s1, -8, 7))


def test_search_is_scale_invariant():
    x = student_t(16, 128, seed=4)
    s_small, _ = adam_range_search(x, -8, 7, steps=40, lr=1e-2)
    s_big, _ = adam_range_search(x * 1024, -8, 7, steps=40, lr=1e-2)
    torch.testing.assert_close(s_big / 1024, s_small, rtol=1e-6, atol=0)


def test_zero_rows_keep_zero_scale():
    x = student_t(4, 32)
    x[1] = 0
    s, loss = adam_range_search(x, -8, 7, steps=5, lr=1e-2)
    assert s[1].item() == 0 and loss[1].item() == 0
    assert (s[[0, 2, 3]] > 0).all()


def test_trace_sees_every_step():
    seen = []
    adam_range_search(
        student_t(2, 16), -8, 7, steps=3, lr=1e-2, trace=lambda t, s, loss: seen.append(t)
    )
    assert seen == [0, 1, 2, 3]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_loss_decreases_on_heavy_tails(bits):
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x = student_t(8, 512, seed=bits)
    _, loss = adam_range_search(x, qmin, qmax, steps=100, lr=1e-2)
    assert loss.sum() < reconstruction_loss(x, initial_scales(x, qmax), qmin, qmax).sum()
