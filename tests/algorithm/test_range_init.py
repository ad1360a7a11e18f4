"""Grid start and least-squares finish of the range search: never worse, better where it counts."""

import torch

from easyquant.algorithm.range_init import grid_init_scales, least_squares_refine
from easyquant.algorithm.range_search import (
    adam_range_search,
    initial_scales,
    reconstruction_loss,
)
from tests.conftest import student_t


def test_grid_start_is_the_best_ratio_of_its_grid():
    x = student_t(64, 256, seed=3)
    points, low = 11, 0.5
    scale = grid_init_scales(x, -4, 3, points, low)
    s0 = initial_scales(x, 3)
    ratios = torch.linspace(1.0, low, points)
    losses = torch.stack([reconstruction_loss(x, s0 * r, -4, 3) for r in ratios])
    assert torch.allclose(reconstruction_loss(x, scale, -4, 3), losses.min(dim=0).values)
    # Heavy tails at 3 bits: clipping pays for most rows.
    assert (scale < s0 * 0.999).float().mean() > 0.5


def test_grid_start_keeps_zero_rows_and_one_point_means_max_abs():
    x = student_t(4, 32, seed=1)
    x[2] = 0
    scale = grid_init_scales(x, -8, 7, 9, 0.3)
    assert scale[2, 0] == 0
    assert torch.equal(grid_init_scales(x, -8, 7, 1, 0.3), initial_scales(x, 7))


def test_adam_from_the_grid_start_beats_adam_from_max_abs_at_3_bits():
    x = student_t(256, 512, seed=4)
    _, loss_paper = adam_range_search(x, -4, 3, 100, 1e-2)
    start = grid_init_scales(x, -4, 3, 40, 0.3)
    _, loss_grid = adam_range_search(x, -4, 3, 100, 1e-2, init_scale=start)
    assert float(loss_grid.sum()) < float(loss_paper.sum())
    # Per row never worse than its own start (the start is a candidate of the search).
    assert (loss_grid <= reconstruction_loss(x, start, -4, 3) * (1 + 1e-6)).all()


def test_least_squares_refine_never_increases_the_error_and_usually_lowers_it():
    x = student_t(128, 256, seed=5)
    x[7] = 0
    scale = initial_scales(x, 7) * 0.9
    before = reconstruction_loss(x, scale, -8, 7)
    after_scale = least_squares_refine(x, scale, -8, 7, steps=3, store=lambda s: s.half().float())
    after = reconstruction_loss(x, after_scale, -8, 7)
    assert (after <= before).all()
    assert float(after.sum()) < float(before.sum()) * 0.99
    assert after_scale[7, 0] == 0
    # Refined scales are representable in the storage dtype.
    changed = after_scale != scale
    assert torch.equal(after_scale[changed].half().float(), after_scale[changed])
