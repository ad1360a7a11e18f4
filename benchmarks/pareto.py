"""Perplexity against effective bits per weight on SmolLM2-135M-Instruct (WikiText-2).

    python benchmarks/pareto.py --device cuda            # results/pareto.{json,md,png}

The quality.py protocol (its helpers, imported): the GGUF's float32 weights as full precision,
WikiText-2 test, the first ``--windows`` (default 8) non-overlapping 2048-token windows, every
decoder Linear weight quantized, bits/weight counting every stored bit. Methods, all 4-bit:

- ``rtn``: RTN symmetric, per channel and with groups (``--rtn-groups``; a group size that does
  not divide a row leaves a shorter last group: 128 on SmolLM2's 576 hidden features);
- ``hqq``: HQQ 0.2.x with ``optimize=True`` (quality.quantize_hqq; asymmetric, float16 scale and
  zero per group) at ``--hqq-groups``; skipped with a note when ``hqq`` is not installed;
- ``uniform``: EasyQuant's best preset at every sigma of ``--sigmas`` x ``--uniform-groups``;
- ``budget``: EasyQuant's best preset with a bits-per-weight budget (``--targets``): sigma and
  group size chosen per weight (easyquant.models.budget; one candidate pass for all targets).

Each point is saved as it is measured; the plot has ppl (log scale) against bits/weight, one line
per method.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import RESULTS, environment
from easyquant import QuantConfig
from easyquant.evaluation.loader import load_model
from easyquant.evaluation.perplexity import perplexity, read_text, tokenize
from easyquant.models.budget import ModelCandidates, model_candidates
from easyquant.models.select import quantize_model_inplace
from quality import WIKITEXT, log, quantize_easyquant, quantize_hqq

METHODS = ("rtn", "hqq", "uniform", "budget")
LABELS = {
    "rtn": "RTN symmetric",
    "hqq": "HQQ (optimize=True)",
    "uniform": "EasyQuant uniform (best preset)",
    "budget": "EasyQuant --target-bpw (best preset)",
}


def group_label(group: int | None) -> str:
    return "ch" if group is None else f"g{group}"


def quantize_budget(
    model: nn.Module, candidates: ModelCandidates, target: float
) -> tuple[float, dict[str, Any]]:
    """Quantize in place with the plan for ``target``; (bits per weight, extra facts)."""
    plan = candidates.choose(target)
    reports = quantize_model_inplace(model, candidates.config, plan)
    weights = sum(r.shape[0] * r.shape[1] for r in reports)
    bits = sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in reports) / weights
    error = sum(r.error * r.shape[0] * r.shape[1] for r in reports) / weights
    keep = ("predicted_bits_per_weight", "predicted_error", "error_lower_bound", "choices")
    return bits, {
        "target_bpw": target,
        "error": error,
        **{k: plan.budget[k] for k in keep},
        "config": candidates.config.to_dict(),
    }


def points_to_run(args: argparse.Namespace, model: nn.Module) -> tuple[list[dict], list[str]]:
    """(points as dicts of method/setting, notes on the skipped ones)."""
    points: list[dict[str, Any]] = []
    notes: list[str] = []
    for method in args.methods:
        if method == "rtn":
            for g in args.rtn_groups:
                group = g or None
                points.append({"method": "rtn", "setting": group_label(group), "group": group})
        elif method == "hqq":
            try:
                import hqq  # noqa: F401
            except ImportError:
                notes.append("HQQ skipped: the hqq package is not installed")
                continue
            for g in args.hqq_groups:
                points.append({"method": "hqq", "setting": group_label(g), "group": g})
        elif method == "uniform":
            for g in args.uniform_groups:
                for sigma in args.sigmas:
                    setting = f"{sigma:g}σ {group_label(g or None)}"
                    points.append(
                        {
                            "method": "uniform",
                            "setting": setting,
                            "group": g or None,
                            "sigma": sigma,
                        }
                    )
        else:
            for target in args.targets:
                points.append(
                    {"method": "budget", "setting": f"target {target:g}", "target": target}
                )
    return points, notes


def write_outputs(payload: dict[str, Any], stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    for path, text in (
        (stem.with_suffix(".json"), json.dumps(payload, indent=2) + "\n"),
        (stem.with_suffix(".md"), markdown(payload)),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    plot(payload, stem.with_suffix(".png"))


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in METHODS:
        rows = sorted(
            (r for r in payload["points"] if r["method"] == method),
            key=lambda r: r["bits_per_weight"],
        )
        if rows:
            ax.plot(
                [r["bits_per_weight"] for r in rows],
                [r["ppl"] for r in rows],
                marker="o",
                label=LABELS[method],
            )
    ax.axhline(payload["fp_ppl"], color="gray", linestyle="--", label="full precision")
    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("bits per weight (every stored bit)")
    ax.set_ylabel(f"WikiText-2 perplexity ({payload['protocol']['windows']} windows)")
    ax.set_title("SmolLM2-135M-Instruct, 4-bit: perplexity vs bits/weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def markdown(payload: dict[str, Any]) -> str:
    proto = payload["protocol"]
    lines = [
        "# Perplexity vs bits/weight on SmolLM2-135M-Instruct (WikiText-2)",
        "",
        f"Device: {payload['device']}; commit {payload['commit']}; {payload['date']}; versions "
        + ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
        + ".",
        f"Command: `{payload['command']}`.",
        "",
        f"Protocol (benchmarks/quality.py's): {proto['text']}, windows 0-{proto['windows'] - 1} "
        f"of {proto['seq_len']} tokens; full precision (GGUF weights) ppl "
        f"{payload['fp_ppl']:.2f}. All decoder Linear weights quantized at 4 bits; bits/weight "
        "count every stored bit. Plot: the .png of the same name.",
        "",
        "| method | setting | bits/weight | ppl | quantization s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        rows = sorted(
            (r for r in payload["points"] if r["method"] == method),
            key=lambda r: r["bits_per_weight"],
        )
        for r in rows:
            lines.append(
                f"| {LABELS[method]} | {r['setting']} | {r['bits_per_weight']:.3f} | "
                f"{r['ppl']:.2f} | {r['seconds']:.1f} |"
            )
    budget = [r for r in payload["points"] if r["method"] == "budget"]
    if budget:
        lines += [
            "",
            f"Budget: one candidate pass ({payload['budget_candidates']['candidates']} "
            f"candidates, {payload['budget_candidates']['search_steps']} Adam steps each) in "
            f"{payload['budget_candidates']['seconds']:.1f} s, then one allocation per target; "
            "'quantization s' is the quantization with the chosen configs alone.",
            "",
            "| target | bits/weight | predicted error | reached error | choices: tensors |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in sorted(budget, key=lambda r: r["extra"]["target_bpw"]):
            e = r["extra"]
            choices = ", ".join(f"{k}: {v}" for k, v in e["choices"].items())
            lines.append(
                f"| {e['target_bpw']:g} | {r['bits_per_weight']:.3f} | "
                f"{e['predicted_error']:.5f} | {e['error']:.5f} | {choices} |"
            )
    if payload["notes"]:
        lines += ["", *(f"- {n}" for n in payload["notes"])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--text", type=Path, default=WIKITEXT)
    parser.add_argument("--out", type=Path, default=RESULTS / "pareto", help="path stem")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--rtn-groups", nargs="+", type=int, default=[0, 128, 64, 32])
    parser.add_argument("--hqq-groups", nargs="+", type=int, default=[128, 64, 32])
    parser.add_argument("--sigmas", nargs="+", type=float, default=[3.5, 3.0, 2.75, 2.5])
    parser.add_argument("--uniform-groups", nargs="+", type=int, default=[0, 64])
    parser.add_argument("--targets", nargs="+", type=float, default=[4.1, 4.2, 4.3, 4.4, 4.6])
    parser.add_argument(
        "--budget-groups",
        nargs="+",
        type=int,
        default=[0, 128, 64, 32],
        help="group sizes the budget may choose (0: per channel; '0' alone: sigma only)",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging

    from easyquant.models.gguf_source import default_model_path

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    path = default_model_path()
    log(f"loading {path.name} on {args.device}")
    loaded = load_model(path, device=args.device)
    base = loaded.model
    ids = tokenize(loaded.tokenizer, read_text(args.text))

    def ppl_of(m: nn.Module) -> float:
        return perplexity(m, ids, args.seq_len, args.windows).ppl

    points, notes = points_to_run(args, base)
    payload: dict[str, Any] = {
        **environment(args.device),
        "protocol": {
            "model": path.name,
            "text": f"../shared/data/wikitext2/{args.text.name}",
            "text_tokens": int(ids.numel()),
            "seq_len": args.seq_len,
            "windows": args.windows,
            "first_window": 0,
            "bits": 4,
        },
        "fp_ppl": ppl_of(base),
        "points": [],
        "notes": notes,
    }
    log(f"full precision ppl {payload['fp_ppl']:.3f}")
    for note in notes:
        log(note)
    best = QuantConfig.best(bits=4)
    candidates = None
    if any(p["method"] == "budget" for p in points):
        log("budget: evaluating every weight's candidates")
        groups = [g or None for g in args.budget_groups]
        candidates = model_candidates(base, best, groups=groups, device=args.device)
        payload["budget_candidates"] = {
            "seconds": candidates.seconds,
            "candidates": sum(len(t.candidates) for t in candidates.tensors),
            "tensors": len(candidates.tensors),
            "search_steps": candidates.search_steps,
            "sigmas": candidates.sigmas,
            "groups": candidates.groups,
        }
        log(f"budget: candidate pass {candidates.seconds:.1f} s")
    for point in points:
        model = copy.deepcopy(base)
        name = f"{point['method']} {point['setting']}"
        log(f"{name}: quantizing")
        start = time.perf_counter()
        if point["method"] == "rtn":
            config = QuantConfig(
                bits=4, group_size=point["group"], method="rtn", outlier_sigma=None
            )
            bpw, extra = quantize_easyquant(model, config)
        elif point["method"] == "hqq":
            bpw, extra = quantize_hqq(model, 4, point["group"])
        elif point["method"] == "uniform":
            config = best.replace(outlier_sigma=point["sigma"], group_size=point["group"])
            bpw, extra = quantize_easyquant(model, config)
        else:
            assert candidates is not None
            bpw, extra = quantize_budget(model, candidates, point["target"])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        ppl = ppl_of(model)
        log(f"{name}: ppl {ppl:.3f}, {bpw:.3f} bits/weight, {seconds:.1f} s")
        payload["points"].append(
            {**point, "bits_per_weight": bpw, "ppl": ppl, "seconds": seconds, "extra": extra}
        )
        write_outputs(payload, args.out)
        del model
    write_outputs(payload, args.out)
    print(markdown(payload))
    log(f"wrote {args.out.with_suffix('.json')}, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
