"""A bits-per-weight budget on a tiny Llama: candidate costs exact, budget met, error no worse
than the uniform config at the nearest bits/weight below the target, output loads back."""

import json
import os
import subprocess
import sys

import pytest
import torch

from easyquant import QuantConfig, QuantLinear, quantize_tensor
from easyquant.format.outlier_store import csr_block_counts
from easyquant.models import Selection, load_quantized, quantize_model
from easyquant.models.budget import (
    BudgetSelection,
    check_target,
    evaluate_candidates,
    module_pattern,
    plan_budget,
    storage_bits,
)
from easyquant.models.select import relative_error
from tests.conftest import REPO, student_t, tiny_llama

# Steps <= the candidate search's 25: the plan's predicted errors are then the real ones.
BASE = QuantConfig.best(steps=10)
CLI = [sys.executable, "-m", "easyquant", "quantize"]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


def totals(out):
    return json.loads((out / "quant_report.json").read_text())["totals"]


@pytest.mark.parametrize(
    "config, dtype",
    [
        (QuantConfig.best(steps=10), torch.float32),
        (QuantConfig(steps=5, outlier_scope="group", init_grid=5, refine_steps=2), torch.bfloat16),
        (QuantConfig(bits=3, method="rtn", outlier_scope="channel"), torch.float16),
        (QuantConfig(steps=5, outlier_scope="channel", outlier_dtype="int8"), torch.bfloat16),
    ],
)
def test_candidates_cost_and_error_are_what_quantize_tensor_stores(config, dtype):
    weight = student_t(48, 256, seed=2).to(dtype)
    candidates = evaluate_candidates(weight, config)
    assert len(candidates) == 8 * 4  # sigmas x (per channel, 128, 64, 32)
    for candidate in candidates:
        qweight = quantize_tensor(weight, candidate.key, backend="torch")
        assert candidate.key.steps == config.steps  # the real quantization keeps every step
        assert candidate.bits_per_weight == qweight.bits_per_weight
        counts = csr_block_counts(qweight.outlier_indptr, qweight.outlier_indices, 256)
        assert storage_bits(qweight.shape, candidate.key, counts, dtype) == qweight.storage_bits
        error = relative_error(qweight.dequantize(torch.float32), weight)
        assert candidate.error == pytest.approx(error, rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("scope", ["tensor", "group"])
def test_ragged_groups_and_the_capped_search(scope):
    """96 features: groups of 64 leave a shorter last group (as quantize_tensor does), 128 is
    longer than the row (dropped); the candidate search stops at ``search_steps``."""
    weight = student_t(16, 96, seed=3)
    config = QuantConfig(steps=500, outlier_scope=scope, outlier_dtype="float16")
    candidates = evaluate_candidates(weight, config, search_steps=3)
    assert {c.key.group_size for c in candidates} == {None, 64, 32}
    for candidate in candidates:
        assert candidate.key.steps == 500
        qweight = quantize_tensor(weight, candidate.key.replace(steps=3), backend="torch")
        assert candidate.bits_per_weight == qweight.bits_per_weight
        error = relative_error(qweight.dequantize(torch.float32), weight)
        assert candidate.error == pytest.approx(error, rel=1e-4)


def test_budget_meets_target_beats_uniform_and_loads_back(tiny_llama_dir, tmp_path):
    target = 5.0
    out = tmp_path / "budget"
    result = quantize_model(tiny_llama_dir, BASE, out, target_bpw=target, log=None)
    got = totals(out)
    assert got["bits_per_weight"] <= target
    assert result.totals["bits_per_weight"] == got["bits_per_weight"]

    # Every uniform (sigma, group) the budget could have used everywhere: the one with the most
    # bits/weight not above the target has at least the budget's error.
    uniform = []
    for sigma in (None, 4.0, 3.5, 3.0, 2.75, 2.5, 2.25, 2.0):
        for group in (None, 64, 32):  # 128 is longer than most rows (64 features)
            path = tmp_path / f"u-{sigma}-{group}"
            config = BASE.replace(outlier_sigma=sigma, group_size=group)
            quantize_model(tiny_llama_dir, config, path, log=None)
            uniform.append((totals(path)["bits_per_weight"], totals(path)["error"], config))
    below = [u for u in uniform if u[0] <= target]
    nearest = max(below, key=lambda u: u[0])
    assert got["error"] <= nearest[1]
    assert got["error"] <= min(u[1] for u in below)  # here, even the best of them

    report = json.loads((out / "quant_report.json").read_text())
    budget = report["budget"]
    assert budget["target_bpw"] == target
    assert budget["predicted_bits_per_weight"] == pytest.approx(got["bits_per_weight"])
    assert budget["predicted_error"] == pytest.approx(got["error"], rel=1e-4)
    assert budget["error_lower_bound"] <= budget["predicted_error"]
    # The per-module choices are recorded as overrides (config.json) and per tensor (report).
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["overrides"] == report["selection"]["overrides"]
    assert sorted(qc["overrides"]) == sorted(qc["quantized_modules"])
    rows = {r["name"].removesuffix(".weight"): r for r in report["tensors"]}
    for module, changes in qc["overrides"].items():
        assert set(changes) == {"outlier_sigma", "group_size"}
        assert rows[module]["group_size"] == changes["group_size"]
    assert len({(c["outlier_sigma"], c["group_size"]) for c in qc["overrides"].values()}) > 1

    model = load_quantized(out, device="cpu")
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    for module, changes in qc["overrides"].items():
        layer = model.get_submodule(module)
        assert isinstance(layer, QuantLinear) and layer.group_size == changes["group_size"]


def test_cli_target_bpw_and_one_line_errors(tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    args = [str(tiny_llama_dir), "--out", str(out), "--steps", "10"]
    done = subprocess.run(
        [*CLI, *args, "--target-bpw", "5.1", "--quiet"], capture_output=True, text=True, env=ENV
    )
    assert done.returncode == 0, done.stderr
    assert totals(out)["bits_per_weight"] <= 5.1
    for extra, message in [
        (["--target-bpw", "four"], "--target-bpw expects a number of bits per weight"),
        (["--target-bpw", "1.5"], "below 2 bits per weight"),
        (["--target-bpw", "4.2"], "cannot be met: the lowest achievable is 4.2222"),
        (["--target-bpw", "5", "--group-size", "32"], "leave them out"),
        (["--target-bpw", "5", "--sigma", "3"], "leave them out"),  # even the default, named
        (["--target-bpw", "5", "--override", "*.q_proj:outlier_sigma=2"], "drop those fields"),
    ]:
        failed = subprocess.run(
            [*CLI, *args[:2], str(tmp_path / "x"), *args[3:], *extra],
            capture_output=True,
            text=True,
            env=ENV,
        )
        assert failed.returncode == 2, failed.stderr
        lines = failed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("easyquant: error: "), failed.stderr
        assert message in lines[0]
    assert not (tmp_path / "x").exists()


def test_cli_target_bpw_with_the_quality_preset_keeps_its_kv_bits(tiny_llama_dir, tmp_path):
    """The preset's k/v overrides set outlier_sigma too; under --target-bpw the budget chooses
    that, so only their bits are kept (a user's override naming it is refused, above)."""
    out = tmp_path / "q"
    flags = ["--steps", "10", "--preset", "quality", "--target-bpw", "5.5", "--quiet"]
    done = subprocess.run([*CLI, str(tiny_llama_dir), "--out", str(out), *flags],
                          capture_output=True, text=True, env=ENV)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert totals(out)["bits_per_weight"] <= 5.5
    report = json.loads((out / "quant_report.json").read_text())["tensors"]
    bits = {row["name"].split(".")[-2]: row["bits"] for row in report}
    assert bits["k_proj"] == bits["v_proj"] == 6 and bits["q_proj"] == bits["down_proj"] == 4


def test_plan_keeps_user_overrides_of_other_fields():
    model = tiny_llama()
    selection = Selection.build(exclude=["*.k_proj"], overrides={"*.down_proj": {"bits": 8}})
    plan = plan_budget(model, BASE, 6.0, selection=selection)
    assert isinstance(plan, BudgetSelection)
    configs = plan.configs(BASE)
    assert not any(m.endswith("k_proj") for m in configs)
    for module, config in configs.items():
        assert config.bits == (8 if module.endswith("down_proj") else 4)
        assert plan.config_for(module, BASE) == config
    assert plan.overrides[-1] == ("*.down_proj", {"bits": 8})  # the user's, after the plan's
    assert plan == plan_budget(model, BASE, 6.0, selection=selection)  # deterministic


def test_module_patterns_match_only_their_module():
    import fnmatch

    name = "model.layers.[1].mlp*?"
    assert fnmatch.fnmatchcase(name, module_pattern(name))
    assert not fnmatch.fnmatchcase("model.layers.1.mlpXY", module_pattern(name))


@pytest.mark.parametrize(
    "value, message",
    [("abc", "expects a number"), ("nan", "finite"), (1.99, "below 2"), (True, "finite")],
)
def test_check_target(value, message):
    with pytest.raises(ValueError, match=message):
        check_target(value)
    assert check_target("4.25") == 4.25


def test_torchrun_ranks_share_rank_zeros_plan(tiny_llama_dir, tmp_path):
    """Under torchrun rank 0 plans and broadcasts: the output equals the one-process run's."""
    from tests.models.test_distributed import STEPS, assert_same_tensors, one_thread, read_all
    from tests.models.test_distributed import torchrun as run_torchrun

    dist, single = tmp_path / "dist", tmp_path / "single"
    done = run_torchrun(tiny_llama_dir, dist, "--target-bpw", "5.1")
    assert done.returncode == 0, done.stderr
    with one_thread():
        quantize_model(
            tiny_llama_dir,
            QuantConfig(steps=STEPS),
            single,
            target_bpw=5.1,
            log=None,
            shard_size=30_000,
        )
    assert_same_tensors(read_all(dist), read_all(single))
    config = json.loads((dist / "config.json").read_text())["quantization_config"]
    assert config == json.loads((single / "config.json").read_text())["quantization_config"]
    assert len(config["overrides"]) == 14

    failed = run_torchrun(tiny_llama_dir, tmp_path / "x", "--target-bpw", "4.2")
    assert failed.returncode != 0
    assert "cannot be met: the lowest achievable is" in failed.stderr
    assert "rank 0 of 2 failed to plan the budget" in failed.stderr  # said by rank 1
    assert not (tmp_path / "x").exists()
