"""Shared test helpers. Tests read real data from ../shared (beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext2" / "wiki.test.raw"


def student_t(rows: int, cols: int, df: float = 5.0, scale: float = 0.02, seed: int = 0):
    """Heavy-tailed weights like an LLM's (Student-t), reproducible."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return torch.distributions.StudentT(df).sample((rows, cols)) * scale


@pytest.fixture
def heavy_weight() -> torch.Tensor:
    return student_t(96, 256, seed=1)
