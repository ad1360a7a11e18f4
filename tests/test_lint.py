"""The ruff configuration in pyproject.toml is part of the suite: the tree must pass it."""

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_ruff_check_passes():
    ruff = shutil.which("ruff") or str(REPO / ".venv" / "bin" / "ruff")
    if not shutil.which(ruff):
        pytest.fail("ruff is not installed: run the README's test command (make test)")
    dirs = [d for d in ("src", "tests", "benchmarks") if (REPO / d).is_dir()]
    result = subprocess.run([ruff, "check", *dirs], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_imports_without_optional_extras():
    code = "import easyquant, sys; assert 'transformers' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
