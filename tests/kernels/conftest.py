"""Kernel tests run the Triton kernels on the GPU when there is one, else under the Triton
interpreter on the CPU (TRITON_INTERPRET=1 must be set before triton decorates any kernel, so it
is set here, before the kernel modules are imported by the tests of this folder)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: F401 - part of the test set-up (requirements-cpu.txt); never skipped

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device() -> str:
    return DEVICE
