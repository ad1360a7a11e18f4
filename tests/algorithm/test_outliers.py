import torch

from easyquant.algorithm.outliers import outlier_mask
from tests.conftest import student_t


def test_n_sigma_rule_uses_standard_deviation():
    w = student_t(64, 128)
    mask = outlier_mask(w, 3.0, "tensor")
    std, mean = torch.std_mean(w, correction=0)
    assert torch.equal(mask, (w - mean).abs() >= 3.0 * std)
    assert 0 < mask.float().mean() < 0.05


def test_channel_scope_uses_row_statistics():
    w = student_t(8, 512)
    w[0] *= 100  # one loud row: per tensor it owns the outliers, per channel it does not
    per_tensor = outlier_mask(w, 3.0, "tensor")
    per_channel = outlier_mask(w, 3.0, "channel")
    assert per_tensor[1:].sum() == 0
    assert per_channel[1:].sum() > 0


def test_no_sigma_means_no_outliers_and_constants_have_none():
    w = student_t(4, 16)
    assert not outlier_mask(w, None).any()
    assert not outlier_mask(torch.full((3, 5), 0.7), 3.0).any()
    const_rows = torch.ones(3, 5)
    assert not outlier_mask(const_rows, 1.0, "channel").any()


def test_group_scope_uses_group_statistics():
    w = student_t(6, 256, seed=2)
    w[:, :128] *= 50  # a loud first half of every row: per group the quiet half has outliers too
    per_channel = outlier_mask(w, 3.0, "channel")
    per_group = outlier_mask(w, 3.0, "group", group_size=128)
    assert per_channel[:, 128:].sum() == 0
    assert per_group[:, 128:].sum() > 0
    halves = w.reshape(-1, 128)
    std, mean = torch.std_mean(halves, dim=1, keepdim=True, correction=0)
    assert torch.equal(per_group, ((halves - mean).abs() >= 3.0 * std).reshape(w.shape))
    # Without groups, "group" is per channel.
    assert torch.equal(outlier_mask(w, 3.0, "group"), per_channel)
