import math

import torch

from easyquant.algorithm.equalize import MAX_SPREAD, mlp_input_size, normalized_power, silu_rms


def test_silu_rms_matches_monte_carlo():
    torch.manual_seed(0)
    z = torch.randn(2_000_000, dtype=torch.float64)
    for sigma in (0.05, 0.5, 1.0, 3.0):
        expected = torch.nn.functional.silu(sigma * z).pow(2).mean().sqrt()
        got = silu_rms(torch.tensor([sigma], dtype=torch.float64))[0]
        assert math.isclose(float(got), float(expected), rel_tol=5e-3)


def test_normalized_power_has_unit_geometric_mean_and_bounded_spread():
    size = torch.tensor([1e-12, 0.01, 1.0, 4.0, 100.0])
    for alpha in (0.5, 1.0):
        scale = normalized_power(size, alpha)
        assert math.isclose(float(scale.double().log().mean()), 0.0, abs_tol=1e-6) or (
            float(scale.max() / scale.min()) >= MAX_SPREAD
        )
        assert float(scale.max()) <= MAX_SPREAD * 1.0001
        assert float(scale.min()) >= 1 / MAX_SPREAD / 1.0001
        assert torch.all(scale[1:] >= scale[:-1])  # order kept
    assert torch.allclose(normalized_power(size, 0.0), torch.ones(5))


def test_mlp_input_size_grows_with_both_rows():
    gamma = torch.ones(8)
    gate = torch.ones(2, 8) * torch.tensor([[1.0], [2.0]])
    up = torch.ones(2, 8)
    size = mlp_input_size(gate, up, gamma)
    assert size[1] > size[0]
    assert torch.allclose(mlp_input_size(gate, 3 * up, gamma), 3 * size)
