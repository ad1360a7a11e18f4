"""Sweep EasyQuant settings on the real model: perplexity on a dev and a test set of windows.

    python benchmarks/quality_sweep.py --device cuda --stage explore [--out DIR]

SmolLM2-135M-Instruct (GGUF weights = full-precision reference), WikiText-2 test, 2048-token
windows. Settings are *chosen* on the dev windows (100-107 by default) and *reported* on the test
windows (0-7, the quality.py protocol), so the choice does not fit the reported numbers. Each row
quantizes every decoder Linear weight with ``quantize_tensor`` (the fused Triton pipeline on CUDA)
after the optional data-free equalization (:mod:`easyquant.models.equalize`), writes the
dequantized weights back and measures perplexity. Rows are printed and appended to
``<out>/sweep.jsonl`` as they finish.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import environment
from easyquant import FORMAT_VERSION, QuantConfig, quantize_tensor
from easyquant.evaluation.loader import load_model
from easyquant.evaluation.perplexity import perplexity, read_text, tokenize
from easyquant.models.equalize import EqualizeConfig, equalize_model
from easyquant.models.select import Selection

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
EQ_KEYS = ("norm_alpha", "value_alpha", "mlp_alpha")
EXTRA_KEYS = (
    *EQ_KEYS,
    "only",
    "mag_power",
    "min_range",
    "type_sigma",
    "outlier_step",
    "module_config",
)
MODULE_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Table 6 of the paper: zero 1% of each weight's entries, taken from one band of |W - mean|.
ZERO_BANDS = ((0.99, 1.0), (0.98, 0.99), (0.95, 0.96), (0.90, 0.91), (0.50, 0.51), (0.0, 0.01))


def base_setting(**changes: Any) -> dict[str, Any]:
    setting: dict[str, Any] = dict(
        bits=4,
        group_size=None,
        outlier_sigma=3.0,
        outlier_scope="tensor",
        steps=500,
        lr=1e-2,
        outlier_dtype="float16",
        init_grid=0,
        method="easyquant",
        norm_alpha=0.0,
        value_alpha=0.0,
        mlp_alpha=0.0,
        only=None,
        mag_power=0.0,
        min_range=0.0,
        type_sigma=None,
        outlier_step=None,
        # {fnmatch pattern over module names: QuantConfig changes}, the first match wins, as
        # the library's Selection overrides (e.g. {"*.k_proj": {"bits": 8}}).
        module_config=None,
    )
    setting.update(changes)
    return setting


def stage_settings(stage: str) -> list[dict[str, Any]]:
    """Named lists of settings; each one a dict of QuantConfig fields + equalization strengths."""
    if stage == "smoke":
        return [base_setting(steps=5), base_setting(steps=5, norm_alpha=0.5, value_alpha=0.5)]
    if stage == "explore":
        rows = [base_setting(method="rtn", outlier_sigma=None), base_setting()]
        rows += [base_setting(steps=s) for s in (0, 50, 100, 200, 1000)]
        rows += [base_setting(lr=lr) for lr in (3e-3, 3e-2)]
        rows += [base_setting(outlier_sigma=s) for s in (2.25, 2.5, 2.75, 3.5)]
        rows += [base_setting(outlier_scope="channel", outlier_sigma=s) for s in (2.5, 3.0)]
        rows += [base_setting(init_grid=40)]
        for a in (0.25, 0.5, 0.75, 1.0):
            rows.append(base_setting(norm_alpha=a))
            rows.append(base_setting(value_alpha=a))
            rows.append(base_setting(mlp_alpha=a))
        for a, s in itertools.product((0.25, 0.5, 0.75), (2.75, 3.0)):
            rows.append(base_setting(norm_alpha=a, value_alpha=a, mlp_alpha=a, outlier_sigma=s))
        for a in (0.5, 1.0):
            rows.append(base_setting(method="rtn", outlier_sigma=None, norm_alpha=a))
        for bits, group in ((4, 128), (3, None), (3, 128)):
            rows.append(base_setting(bits=bits, group_size=group, method="rtn", outlier_sigma=None))
            rows.append(base_setting(bits=bits, group_size=group))
            rows.append(base_setting(bits=bits, group_size=group, init_grid=40))
            for a in (0.25, 0.5):
                rows.append(
                    base_setting(
                        bits=bits, group_size=group, norm_alpha=a, value_alpha=a, mlp_alpha=a
                    )
                )
        return rows
    if stage == "analysis":
        # Table 1: perplexity vs the sigma threshold; Fig. 2 / Table 5: error and perplexity over
        # the optimisation steps, with and without outlier isolation.
        rows = [base_setting(outlier_sigma=s) for s in (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, None)]
        for sigma, steps in itertools.product((3.0, None), (0, 5, 10, 25, 50, 100, 200, 500)):
            rows.append(base_setting(outlier_sigma=sigma, steps=steps))
        # Sensitivity: the paper preset applied to one module type / one layer at a time.
        rows += [base_setting(only=f".{t}") for t in MODULE_TYPES]
        rows += [base_setting(only=f"layers.{i}.") for i in range(30)]
        rows += [base_setting(method="rtn", outlier_sigma=None, only=f".{t}") for t in MODULE_TYPES]
        return rows
    if stage == "explore2":
        rows = []
        for bits in (4, 3):
            for lr, steps in itertools.product((3e-3, 1e-2), (50, 100, 500)):
                rows.append(base_setting(bits=bits, lr=lr, steps=steps))
            for sigma in (2.75, 2.9, 3.0, 3.25):
                rows.append(base_setting(bits=bits, outlier_sigma=sigma, lr=3e-3, steps=100))
                rows.append(
                    base_setting(
                        bits=bits, outlier_sigma=sigma, lr=3e-3, steps=100, outlier_scope="channel"
                    )
                )
            rows.append(base_setting(bits=bits, init_grid=40, lr=3e-3, steps=100))
            for a in (-0.25, -0.5):
                rows.append(base_setting(bits=bits, norm_alpha=a))
            rows.append(base_setting(bits=bits, method="rtn", outlier_sigma=None))
            for group in (64, 32):
                rows.append(
                    base_setting(bits=bits, group_size=group, method="rtn", outlier_sigma=None)
                )
                rows.append(base_setting(bits=bits, group_size=group))
                rows.append(base_setting(bits=bits, group_size=group, lr=3e-3, steps=100))
        return rows
    if stage == "explore3":
        rows = []
        for bits in (4, 3):
            for steps, lr in ((50, 3e-3), (100, 3e-3), (500, 1e-2)):
                for p in (0.0, 0.5, 1.0, 2.0, 4.0):
                    rows.append(base_setting(bits=bits, steps=steps, lr=lr, mag_power=p + 1e-9))
            for c in (0.7, 0.8, 0.9):
                rows.append(base_setting(bits=bits, min_range=c))
            for p in (1.0, 2.0):
                for sigma, scope in ((2.75, "channel"), (2.9, "channel"), (2.75, "tensor")):
                    rows.append(
                        base_setting(
                            bits=bits, mag_power=p, outlier_sigma=sigma, outlier_scope=scope
                        )
                    )
                rows.append(base_setting(bits=bits, mag_power=p, group_size=64))
        return rows
    if stage == "by-type":
        # More outliers where quantizing alone hurts most (the MLP), fewer in q/k: best preset.
        best = dict(steps=50, lr=3e-3)
        attn = ("q_proj", "k_proj", "v_proj", "o_proj")
        return [
            base_setting(**best),
            base_setting(
                **best,
                type_sigma={
                    **dict.fromkeys(attn, 3.25),
                    "gate_proj": 2.75,
                    "up_proj": 2.75,
                    "down_proj": 2.75,
                },
            ),
            base_setting(**best, type_sigma={"down_proj": 2.5}),
            base_setting(**best, type_sigma={"q_proj": 3.5, "k_proj": 3.5}),
            base_setting(**best, type_sigma={"q_proj": 3.5, "k_proj": 3.5, "down_proj": 2.75}),
        ]
    if stage == "3bit-g128-sigma":
        # 3-bit g128 (target ppl <= 45): how far do more outliers take it, and at what size
        g = dict(bits=3, group_size=128)
        rows = [base_setting(**g, outlier_sigma=s) for s in (3.0, 2.75, 2.5, 2.25)]
        rows.append(base_setting(**g, outlier_sigma=2.5, steps=100, lr=3e-3))
        rows.append(base_setting(**g, outlier_sigma=2.5, outlier_scope="group"))
        return rows
    if stage == "group-scope":
        # outlier statistics per group of 128 (the best 3-bit g128 row of 3bit-g128-sigma)
        rows = []
        for sigma in (2.25, 2.4):
            rows.append(base_setting(bits=3, group_size=128, outlier_sigma=sigma,
                                     outlier_scope="group"))  # fmt: skip
        rows.append(base_setting(bits=3, group_size=128, outlier_sigma=2.5, outlier_scope="group",
                                 steps=100, lr=3e-3))  # fmt: skip
        for sigma in (2.5, 2.75, 3.0):
            rows.append(base_setting(bits=4, group_size=128, outlier_sigma=sigma,
                                     outlier_scope="group", steps=50, lr=3e-3))  # fmt: skip
        return rows
    if stage == "group-scope-base":
        # the same run's reference for group-scope: the 4-bit best preset (tensor scope) at g128
        return [base_setting(bits=4, group_size=128, steps=50, lr=3e-3)]
    if stage == "int8-outliers-3":
        # the presets' neighbours with int8 outliers: 3 bits (per tensor, per group), 4-bit g128
        int8 = dict(outlier_step=1.0)
        return [
            base_setting(bits=3, outlier_sigma=2.5, steps=100, lr=3e-3, **int8),
            base_setting(bits=3, group_size=128, outlier_sigma=2.25, outlier_scope="group", **int8),
            base_setting(
                group_size=128, outlier_sigma=2.4, outlier_scope="group", steps=50, lr=3e-3, **int8
            ),
        ]
    if stage == "int8-outliers-4":
        return [base_setting(bits=3, outlier_sigma=2.25, steps=100, lr=3e-3, outlier_step=1.0)]
    if stage in ("int8-outliers", "int8-outliers-2"):
        # Outlier values as int8 multiples of their row's (group's) scale: 8 bits fewer each, so
        # more outliers fit the same bits (runs 10 and 11 used these two lists as settings files)
        best = dict(outlier_scope="channel", steps=50, lr=3e-3)
        if stage == "int8-outliers":
            rows = [base_setting(**best, outlier_sigma=2.75)]
            rows += [base_setting(**best, outlier_sigma=2.75, outlier_step=k) for k in (1.0, 0.5)]
            sigmas = (2.5, 2.4, 2.3)
            rows += [base_setting(**best, outlier_sigma=s, outlier_step=1.0) for s in sigmas]
            return rows
        int8 = dict(outlier_step=1.0)
        g128 = dict(group_size=128, outlier_scope="group", steps=50, lr=3e-3, **int8)
        return [
            base_setting(**best, **int8, outlier_sigma=2.5, mag_power=1.0),
            base_setting(**best, **int8, outlier_sigma=2.6),
            base_setting(**{**best, "steps": 100}, **int8, outlier_sigma=2.5),
            base_setting(**g128, outlier_sigma=2.5),
            base_setting(**g128, outlier_sigma=2.25),
            base_setting(bits=3, group_size=128, outlier_sigma=2.4, outlier_scope="group", **int8),
            base_setting(bits=3, outlier_sigma=2.75, steps=100, lr=3e-3, **int8),
        ]
    if stage.startswith("kv-"):
        return kv_stage(stage)
    raise SystemExit(f"unknown stage {stage!r}")


def kv_stage(stage: str) -> list[dict[str, Any]]:
    """Stop 25: the attention's k_proj and v_proj at more bits than the rest (module_config),
    around the 4-bit per-channel best preset (int8 outliers). Runs 14-20 used these lists as
    settings files; ``kv-dev16`` ran with ``--windows 16 --dev-first 108``."""
    best = dict(outlier_scope="channel", steps=50, lr=3e-3, outlier_dtype="int8")

    def row(sigma: float, kv_bits: int | None = None, kv_sigma: float | None = None,
            layers: range | None = None, **changes: Any) -> dict[str, Any]:  # fmt: skip
        fields = {**best, **changes}
        if kv_bits is None:
            return base_setting(**fields, outlier_sigma=sigma)
        kv = {"bits": kv_bits, "outlier_sigma": kv_sigma}
        if layers is None:
            patterns = ["*.k_proj", "*.v_proj"]
        else:
            patterns = [f"model.layers.{i}.self_attn.{m}_proj" for i in layers for m in "kv"]
        module_config = dict.fromkeys(patterns, kv)
        return base_setting(**fields, outlier_sigma=sigma, module_config=module_config)

    if stage == "kv-bits":  # run 14
        g32 = {"group_size": 32, "outlier_sigma": 2.0, "outlier_scope": "group"}
        return [
            row(2.5), row(2.5, 8), row(2.5, module_config={"*.v_proj": {"bits": 8,
            "outlier_sigma": None}}), row(2.5, module_config={"*.k_proj": {"bits": 8,
            "outlier_sigma": None}}), row(2.75, 8),
            row(2.5, module_config={"*.k_proj": g32, "*.v_proj": g32}),
            row(2.5, module_config={"*.k_proj": {"outlier_sigma": 2.0},
                                    "*.v_proj": {"outlier_sigma": 2.0}}),
        ]  # fmt: skip
    if stage == "kv-layers":  # run 15: 8-bit k/v five layers at a time, then v alone
        rows = [row(2.5, 8, layers=range(first, first + 5)) for first in range(0, 30, 5)]
        return [*rows, row(2.75, module_config={"*.v_proj": {"bits": 8, "outlier_sigma": None}})]
    if stage == "kv-5-6":  # run 16
        return [row(2.75, 6), row(2.6, 5), row(2.75, 5), row(2.6, 5, 2.5), row(2.6, 6),
                row(2.5, 5)]  # fmt: skip
    if stage == "kv-5-6-2":  # run 17
        return [row(2.65, 5, 2.5), row(2.7, 5, 2.5), row(2.75, 6, 3.0), row(2.8, 6, 2.75),
                row(2.75, 5, 2.25), row(2.6, 6, 2.5)]  # fmt: skip
    if stage == "kv-dev16":  # run 18
        return [row(2.5), row(2.8, 6, 2.75), row(2.8, 6), row(2.75, 6, 3.0), row(2.6, 6, 2.5),
                row(2.6)]  # fmt: skip
    if stage == "kv-2.8":  # runs 19 (8 windows) and 20 (--windows 16 --dev-first 108)
        return [row(2.8, 6, 3.0)]
    raise SystemExit(f"unknown stage {stage!r}")


@torch.no_grad()
def weighted_quantize(
    weight: torch.Tensor, config: QuantConfig, power: float, min_range: float
) -> Any:
    """Experimental: Adam on ``sum_i w_i (Q[x_i] - x_i)^2`` with ``w = (|x| / rms(row))^power``
    (large weights count more), ranges kept above ``min_range`` x max-abs; else as the library."""
    from easyquant.algorithm.outliers import outlier_mask
    from easyquant.algorithm.range_search import ADAM_BETAS, ADAM_EPS, initial_scales
    from easyquant.format.qweight import pack_quantized
    from easyquant.quantize import storage_round

    out_f, in_f = weight.shape
    group = config.group_size or in_f
    lo, hi = config.qmin, config.qmax
    outliers = outlier_mask(weight, config.outlier_sigma, config.outlier_scope, config.group_size)
    x = weight.float().masked_fill(outliers, 0.0).reshape(-1, group)
    rms = x.pow(2).mean(dim=1, keepdim=True).sqrt().clamp_min(1e-12)
    w = (x.abs() / rms).pow(power) if power else torch.ones_like(x)

    def loss_of(scale: torch.Tensor) -> torch.Tensor:
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        err = torch.clamp(torch.floor(x / safe + 0.5), lo, hi) * safe - x
        return (w * err * err).sum(dim=1)

    s0 = initial_scales(x, hi)
    active = s0 > 0
    s0 = torch.where(active, s0, torch.ones_like(s0))
    grad_norm = 2.0 / (s0 * (w.sum(dim=1, keepdim=True) + 1e-12))
    r = torch.ones_like(s0)
    m, v = torch.zeros_like(s0), torch.zeros_like(s0)
    best_r, best_loss = r.clone(), torch.full((x.shape[0],), float("inf"), device=x.device)
    b1, b2 = ADAM_BETAS
    for step in range(config.steps + 1):
        s = s0 * r
        codes = torch.clamp(torch.floor(x / s + 0.5), lo, hi)
        err = codes * s - x
        loss = (w * err * err).sum(dim=1)
        better = loss < best_loss
        best_loss = torch.where(better, loss, best_loss)
        best_r = torch.where(better.unsqueeze(1), r, best_r)
        if step == config.steps:
            break
        grad = (w * err * codes).sum(dim=1, keepdim=True) * grad_norm
        m.mul_(b1).add_(grad, alpha=1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        m_hat, v_hat = m / (1 - b1 ** (step + 1)), v / (1 - b2 ** (step + 1))
        r = (r - config.lr * m_hat / (v_hat.sqrt() + ADAM_EPS)).clamp_(min=max(min_range, 1e-3))
    scale = storage_round(
        torch.where(active, s0 * best_r, torch.zeros_like(s0)), config.scale_dtype
    )
    rtn = storage_round(initial_scales(weight.float().reshape(-1, group), hi), config.scale_dtype)
    scale = torch.where((loss_of(rtn) < loss_of(scale)).unsqueeze(1), rtn, scale)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.clamp(torch.floor(x / safe + 0.5), lo, hi).reshape(out_f, in_f)
    scales = scale.reshape(out_f, in_f // group).to(getattr(torch, config.scale_dtype))
    outlier_dtype = getattr(torch, config.outlier_dtype) if config.outlier_dtype else None
    return pack_quantized(
        weight, codes, scales, outliers, config.bits, config.group_size, outlier_dtype
    )


@torch.no_grad()
def zero_band_rows(base: torch.nn.Module, ppl: Any) -> list[dict[str, Any]]:
    """Table 6: perplexity after zeroing 1% of every decoder weight, by band of |W - mean|."""
    rows = []
    for low, high in ZERO_BANDS:
        model = copy.deepcopy(base)
        for _, linear in decoder_linears(model):
            w = linear.weight.data
            dev = (w - w.mean()).abs().flatten()
            order = dev.argsort()
            n = order.numel()
            chosen = order[int(low * n) : int(high * n)]
            w.view(-1)[chosen] = 0.0
        dev_ppl, test_ppl = ppl(model)
        rows.append({"zero_band": [low, high], "ppl_dev": dev_ppl, "ppl_test": test_ppl})
        print(f"zero band {low:.2f}-{high:.2f}: dev {dev_ppl:.3f} test {test_ppl:.3f}", flush=True)
    return rows


def snap_outliers(qweight: Any, step: float) -> int:
    """Experimental: outlier values as int8 multiples of ``step`` x the scale of their row and
    group, the step doubled per tensor until no code passes 127; returns the bits saved against
    their stored float values."""
    from easyquant.format.qweight import OUTLIER_CODE_MAX, nearest_codes, scale_at

    rows, cols = qweight.outlier_rows(), qweight.outlier_indices.long()
    unit = scale_at(qweight.scales, rows, cols, qweight.group_size) * step
    codes = nearest_codes(qweight.outlier_values, unit)
    while codes.numel() and codes.abs().max() > OUTLIER_CODE_MAX:
        unit = unit * 2
        codes = nearest_codes(qweight.outlier_values, unit)
    saved = (qweight.outlier_values.element_size() * 8 - 8) * codes.numel()
    qweight.outlier_values = (codes * unit).to(qweight.outlier_values.dtype)
    return saved


def decoder_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    selection = Selection()
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and selection.wants(name, tuple(module.weight.shape))
    ]


def run_setting(base: torch.nn.Module, setting: dict[str, Any], ppl: Any) -> dict[str, Any]:
    model = copy.deepcopy(base)
    equalize_model(model, EqualizeConfig(**{k: setting[k] for k in EQ_KEYS}))
    base_config = QuantConfig(**{k: v for k, v in setting.items() if k not in EXTRA_KEYS})
    per_module = Selection.build(overrides=setting["module_config"])  # the library's matching
    bits = weights = outliers = 0.0
    error_num = error_den = 0.0
    start = time.perf_counter()
    for name, linear in decoder_linears(model):
        if setting["only"] and setting["only"] not in name:
            continue
        module_type = name.rsplit(".", 1)[-1]
        config = base_config
        if setting["type_sigma"] and module_type in setting["type_sigma"]:
            config = config.replace(outlier_sigma=setting["type_sigma"][module_type])
        config = per_module.config_for(name, config)
        weight = linear.weight.data
        if setting["mag_power"] or setting["min_range"]:
            qweight = weighted_quantize(weight, config, setting["mag_power"], setting["min_range"])
        else:
            qweight = quantize_tensor(weight, config)
        stored_bits = qweight.bits_per_weight * weight.numel()
        if setting["outlier_step"]:
            stored_bits -= snap_outliers(qweight, setting["outlier_step"])
        approx = qweight.dequantize(torch.float32)
        error_num += float((approx - weight.float()).pow(2).sum())
        error_den += float(weight.float().pow(2).sum())
        n = weight.numel()
        bits += stored_bits
        outliers += qweight.num_outliers
        weights += n
        linear.weight.data = approx.to(weight.dtype)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    dev, test = ppl(model)
    return {
        "setting": setting,
        "ppl_dev": dev,
        "ppl_test": test,
        "bits_per_weight": bits / weights,
        "outlier_fraction": outliers / weights,
        "relative_error": error_num / error_den,
        "quantize_seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stage", nargs="+", default=["explore"])
    parser.add_argument("--settings", type=Path, help="JSON list of settings instead of --stage")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--zero-bands", action="store_true", help="also the Table 6 rows")
    parser.add_argument("--dev-first", type=int, default=100)
    parser.add_argument("--model", type=Path, help="GGUF or model dir (default: SmolLM2 GGUF)")
    parser.add_argument("--text", type=Path, default=WIKITEXT)
    parser.add_argument("--out", type=Path, default=Path("sweep-out"))
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from easyquant.models.gguf_source import default_model_path

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    settings = (
        [base_setting(**s) for s in json.loads(args.settings.read_text())]
        if args.settings
        else [row for stage in args.stage for row in stage_settings(stage)]
    )
    loaded = load_model(args.model or default_model_path(), device=args.device)
    ids = tokenize(loaded.tokenizer, read_text(args.text))

    def ppl(model: torch.nn.Module) -> tuple[float, float]:
        dev = perplexity(model, ids, 2048, args.windows, first_window=args.dev_first).ppl
        test = perplexity(model, ids, 2048, args.windows, first_window=0).ppl
        return dev, test

    args.out.mkdir(parents=True, exist_ok=True)
    sink = args.out / "sweep.jsonl"
    header = {
        **environment(args.device),
        "command": " ".join(sys.argv),
        "windows": args.windows,
        "dev_first": args.dev_first,
        "format_version": FORMAT_VERSION,  # the storage format its bits/weight count
    }
    with sink.open("a") as f:
        f.write(json.dumps({"header": header}) + "\n")
    fp_dev, fp_test = ppl(loaded.model)
    print(f"full precision: dev {fp_dev:.3f} test {fp_test:.3f}", flush=True)
    exact = copy.deepcopy(loaded.model)
    equalize_model(exact, EqualizeConfig(norm_alpha=1.0, value_alpha=1.0, mlp_alpha=1.0))
    eq_dev, eq_test = ppl(exact)  # the rewrite is exact: these must match full precision
    del exact
    print(f"equalized full precision: dev {eq_dev:.3f} test {eq_test:.3f}", flush=True)
    with sink.open("a") as f:
        fp_row = {"ppl_dev": fp_dev, "ppl_test": fp_test, "eq_dev": eq_dev, "eq_test": eq_test}
        f.write(json.dumps({"fp": fp_row}) + "\n")
    if args.zero_bands:
        with sink.open("a") as f:
            for row in zero_band_rows(loaded.model, ppl):
                f.write(json.dumps(row) + "\n")
    for setting in settings:
        row = run_setting(loaded.model, setting, ppl)
        changed = {k: v for k, v in setting.items() if base_setting().get(k) != v}
        print(
            f"dev {row['ppl_dev']:8.3f} test {row['ppl_test']:8.3f}"
            f" bpw {row['bits_per_weight']:.3f}"
            f" out {row['outlier_fraction']:.4f} err {row['relative_error']:.5f}"
            f" {row['quantize_seconds']:5.1f}s {changed}",
            flush=True,
        )
        with sink.open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
