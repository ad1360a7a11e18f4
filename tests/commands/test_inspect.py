"""``easyquant inspect`` through a subprocess: numbers, tables, figure, errors."""

import json
import os
import subprocess
import sys

import pytest
from safetensors import safe_open

from easyquant.algorithm.outliers import outlier_mask
from tests.conftest import REPO

CLI = [sys.executable, "-m", "easyquant", "inspect"]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def inspect(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, timeout=300)


def source_weights(directory):
    weights = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if ".layers." in name and name.endswith("_proj.weight"):
                    weights[name.removesuffix(".weight")] = f.get_tensor(name)
    return weights


def test_json_numbers_match_the_sigma_rule_and_plot_is_written(tiny_llama_dir, tmp_path):
    png = tmp_path / "outliers.png"
    result = inspect(str(tiny_llama_dir), "--sigma", "2.5", "--json", "--plot", str(png))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    weights = source_weights(tiny_llama_dir)
    assert {m["module"] for m in data["modules"]} == set(weights)
    for row in data["modules"]:
        expected = int(outlier_mask(weights[row["module"]], 2.5, "tensor").sum())
        assert row["outliers"] == expected and row["numel"] == weights[row["module"]].numel()
    total = sum(m["outliers"] for m in data["modules"]) / sum(m["numel"] for m in data["modules"])
    assert data["overall"] == pytest.approx(total)
    down = [m for m in data["modules"] if m["type"] == "mlp.down_proj"]
    assert data["by_type"]["mlp.down_proj"] == pytest.approx(
        sum(m["outliers"] for m in down) / sum(m["numel"] for m in down)
    )
    assert set(data["by_layer"]) == {"0", "1"}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tables_per_module_type_and_per_layer(tiny_llama_dir):
    result = inspect(str(tiny_llama_dir), "--exclude", "*.mlp.*")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    types = [line.split()[0] for line in lines if line.startswith("self_attn.")]
    assert types == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    assert not any("mlp" in line for line in lines)
    header = next(line for line in lines if line.lstrip().startswith("layer"))
    assert header.split() == ["layer", "q_proj", "k_proj", "v_proj", "o_proj", "all"]
    layer_rows = [line.split() for line in lines if line.split() and line.split()[0] in ("0", "1")]
    assert len(layer_rows) == 2 and all(len(row) == 6 for row in layer_rows)
    assert all(0 <= float(v) < 5 for row in layer_rows for v in row[1:])


def test_errors_are_one_line(tiny_llama_dir, tmp_path):
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"mine")
    for args, fragment in [
        ((str(tiny_llama_dir), "--plot", str(existing)), "exists"),
        ((str(tmp_path / "missing"),), "no such file or directory"),
    ]:
        result = inspect(*args)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and fragment in result.stderr, result.stderr
    assert existing.read_bytes() == b"mine"
