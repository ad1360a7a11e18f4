"""Quality of every method on the real model, same windows, one protocol (results/quality.*).

SmolLM2-135M-Instruct (GGUF; the float32 weights transformers dequantizes from it are the full-
precision reference), WikiText-2 test (``../shared/data/wikitext2/wiki.test.raw``, CRLF -> LF),
non-overlapping 2048-token windows, the first N (default 8). Methods, each at 4 and 3 bits, per
channel and with groups of 128:

- RTN (symmetric, max-abs), outliers only (3 sigma, RTN), range search only (Adam, no outliers),
  EasyQuant as the paper (``QuantConfig.paper``), our best preset (``QuantConfig.best``) and
  the quality preset (best, with k_proj/v_proj at 6 bits at 4 bits per channel);
- HQQ (``hqq`` 0.2.x, ``optimize=True``; asymmetric codes + float16 scale and zero per group);
- GPTQ (``gptq_reference.py``: act-order, static groups, 1% damping), calibrated on the LAST
  ``--calib-windows`` windows of the same text, disjoint from the evaluated ones; its perplexity on
  its own calibration windows is checked against RTN's and recorded.

Bits per weight count every stored bit of the quantized decoder Linear weights (codes, scales,
zeros, outlier positions and values); embeddings and lm_head are not quantized.

Usage: ``python benchmarks/quality.py [--windows 8] [--methods ...] [--bits 4 3] [--groups 0 128]``
(also ``easyquant bench quality ...``). Rows are saved after each measurement; ``--keep`` keeps the
rows of an earlier run for the methods not re-measured (the full-precision row is re-measured and
must match, which checks that the windows are the same).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import RESULTS, environment
from easyquant import QuantConfig
from easyquant.config import PRESETS, preset_overrides
from easyquant.evaluation.loader import load_model
from easyquant.evaluation.perplexity import perplexity, read_text, tokenize
from easyquant.models.select import Selection, quantize_model_inplace

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"
METHODS = ("rtn", "outliers", "range", "paper", "best", "quality", "hqq", "gptq")
LABELS = {
    "fp": "full precision (GGUF weights)",
    "rtn": "RTN symmetric",
    "outliers": "outliers only (3σ, RTN)",
    "range": "range search only (Adam)",
    "paper": "EasyQuant (paper preset)",
    "best": "EasyQuant (best preset)",
    "quality": "EasyQuant (quality preset: best, k/v at 6 bits)",
    "hqq": "HQQ 0.2.8 (optimize=True)",
    "gptq": "GPTQ (act-order, WikiText-2 calib.)",
}


def easyquant_config(method: str, bits: int, group: int | None) -> QuantConfig:
    if method == "rtn":
        return QuantConfig(bits=bits, group_size=group, method="rtn", outlier_sigma=None)
    if method == "outliers":
        return QuantConfig(bits=bits, group_size=group, method="rtn", outlier_sigma=3.0)
    if method == "range":
        return QuantConfig.paper(bits=bits, group_size=group, outlier_sigma=None)
    if method == "paper":
        return QuantConfig.paper(bits=bits, group_size=group)
    if method in ("best", "quality"):
        return QuantConfig.preset(method, bits=bits, group_size=group)
    raise ValueError(method)


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    selection = Selection()
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and selection.wants(name, tuple(module.weight.shape))
    ]


def quantize_easyquant(
    model: nn.Module, config: QuantConfig, overrides: dict[str, dict[str, Any]] | None = None
) -> tuple[float, dict[str, Any]]:
    """Quantize in place with the library (``overrides``: per-module changes, as a preset's);
    returns (bits per weight, extra facts)."""
    reports = quantize_model_inplace(model, config, Selection.build(overrides=overrides))
    weights = sum(r.shape[0] * r.shape[1] for r in reports)
    bits = sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in reports)
    outliers = sum(r.outlier_fraction * r.shape[0] * r.shape[1] for r in reports)
    return bits / weights, {
        "tensors": len(reports),
        "outlier_fraction": outliers / weights,
        "config": config.to_dict(),
        "overrides": overrides or {},
    }


def quantize_hqq(model: nn.Module, bits: int, group: int | None) -> tuple[float, dict[str, Any]]:
    """HQQ with its half-quadratic optimisation; weights replaced by their dequantized form.

    Scales and zeros are rounded to float16 (how HQQ stores them), so the measured quality is
    that of the stored model. Bits: codes + a float16 scale and a float16 zero per group.
    """
    from hqq.core.quantize import Quantizer

    total_bits = 0.0
    total = 0
    for _, linear in decoder_linears(model):
        w = linear.weight.data
        out_f, in_f = w.shape
        g = group or in_f
        q, meta = Quantizer.quantize(
            w,
            nbits=bits,
            channel_wise=True,
            group_size=g,
            optimize=True,
            round_zero=False,
            axis=1,
            bitpack=False,
            compute_dtype=torch.float32,
            device=str(w.device),
        )
        meta["scale"] = meta["scale"].half().float()
        meta["zero"] = meta["zero"].half().float()
        linear.weight.data.copy_(Quantizer.dequantize(q, meta).reshape(out_f, in_f))
        # HQQ groups the flattened weight, so with g not dividing in_f a group spans two rows.
        total_bits += out_f * in_f * bits + (out_f * in_f) // g * 32
        total += out_f * in_f
    return total_bits / total, {"optimize": True, "axis": 1, "scale_zero_dtype": "float16"}


def quantize_gptq(
    model: nn.Module, bits: int, group: int | None, calib: list[torch.Tensor]
) -> tuple[float, dict[str, Any]]:
    from gptq_reference import GPTQConfig, gptq_bits_per_weight, gptq_model_inplace

    config = GPTQConfig(bits=bits, group_size=group)
    gptq_model_inplace(model, calib, config, log=log)
    linears = decoder_linears(model)
    total = sum(m.weight.numel() for _, m in linears)
    bpw = sum(
        gptq_bits_per_weight(*m.weight.shape, bits, group) * m.weight.numel() for _, m in linears
    )
    return bpw / total, {"calibration_windows": len(calib), **config.__dict__}


STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


def group_label(group: int | None) -> str:
    return "ch" if group is None else f"g{group}"


def write_outputs(payload: dict[str, Any], json_path: Path, md_path: Path) -> None:
    for path, text in (
        (json_path, json.dumps(payload, indent=2) + "\n"),
        (md_path, markdown(payload)),
    ):
        tmp = path.with_suffix(path.suffix + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)


def markdown(payload: dict[str, Any]) -> str:
    proto = payload["protocol"]
    rows = payload["rows"]
    settings = sorted(
        {(r["bits"], r["group_size"] or 0) for r in rows if r["method"] != "fp"},
        key=lambda s: (-s[0], s[1]),
    )
    head = [f"{b}-bit {group_label(g or None)}" for b, g in settings]
    lines = [
        "# Quality on SmolLM2-135M-Instruct (WikiText-2 perplexity)",
        "",
        f"Device: {payload['device']}; commit {payload['commit']}; {payload['date']}; versions "
        + ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
        + ".",
        f"Command: `{payload['command']}`.",
        "",
        f"Protocol: {proto['text']}, CRLF normalised, tokenized once ({proto['text_tokens']} "
        f"tokens); the first {proto['windows']} non-overlapping windows of {proto['seq_len']} "
        f"tokens (windows 0-{proto['windows'] - 1}, {proto['predicted_tokens']} predicted tokens), "
        "no BOS. Full precision = the float32 weights transformers dequantizes from the Q4_1 GGUF "
        "(block-quantized upstream): our reference. All 210 decoder Linear weights quantized; "
        "embeddings, lm_head and norms untouched. Bits/weight count every stored bit (codes, "
        "scales, zeros, outlier positions and values). GPTQ is calibrated on windows "
        f"{proto['calib_first']}-{proto['calib_first'] + proto['calib_windows'] - 1} of the same "
        "text (disjoint from the evaluated ones).",
        "",
        "Each cell: perplexity / bits per weight / quantization seconds (on the device above; "
        "each run's own command and commit are in the JSON).",
        "",
        "| method | " + " | ".join(head) + " |",
        "| --- | " + " | ".join("---" for _ in head) + " |",
    ]
    fp = next((r for r in rows if r["method"] == "fp"), None)
    if fp:
        lines.append(f"| {LABELS['fp']} | {fp['ppl']:.2f} |" + " |" * (len(head) - 1))
    for method in METHODS:
        cells = []
        for bits, g in settings:
            row = next(
                (
                    r
                    for r in rows
                    if r["method"] == method and r["bits"] == bits and (r["group_size"] or 0) == g
                ),
                None,
            )
            cells.append(
                ""
                if row is None
                else f"{row['ppl']:.2f} / {row['bits_per_weight']:.3f} / {row['seconds']:.0f} s"
            )
        if any(cells):
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    checks = payload.get("gptq_calibration_check", [])
    if checks:
        lines += [
            "",
            f"GPTQ sanity check: perplexity on the first {proto['check_windows']} of its own "
            "calibration windows (GPTQ must beat RTN there).",
            "",
            "| setting | RTN | GPTQ |",
            "| --- | --- | --- |",
        ]
        for c in checks:
            lines.append(
                f"| {c['bits']}-bit {group_label(c['group_size'])} | {c['rtn_ppl']:.2f} | "
                f"{c['gptq_ppl']:.2f} |"
            )
    scored = [r for r in rows if r.get("piqa")]
    if scored:
        count = scored[0]["piqa"]["questions"]
        lines += [
            "",
            f"PIQA (first {count} validation questions; lm-eval's acc and acc_norm, our scorer):",
            "",
            "| method | setting | acc | acc_norm |",
            "| --- | --- | --- | --- |",
        ]
        for r in scored:
            setting = (
                "-" if r["method"] == "fp" else f"{r['bits']}-bit {group_label(r['group_size'])}"
            )
            lines.append(
                f"| {LABELS[r['method']]} | {setting} | {r['piqa']['acc']:.4f} | "
                f"{r['piqa']['acc_norm']:.4f} |"
            )
    for preset in ("best", "quality"):  # the recipe depends on bits
        chosen = {r["bits"]: r for r in rows if r["method"] == preset}
        if chosen:
            lines.append("")
            lines += [
                f"{preset.capitalize()} preset at {bits} bits: `"
                + json.dumps(r["extra"]["config"])
                + "` (group per cell)"
                + (
                    f", per-module changes `{json.dumps(r['extra']['overrides'])}`"
                    if r["extra"].get("overrides")
                    else ""
                )
                + "."
                for bits, r in sorted(chosen.items(), reverse=True)
            ]
    return "\n".join(lines) + "\n"


def merge(paths: list[Path], json_path: Path, md_path: Path) -> int:
    """Combine runs of this script made with the same protocol (same full-precision ppl)."""
    runs = [json.loads(p.read_text()) for p in paths]
    base = runs[0]
    fp = next(r["ppl"] for r in base["rows"] if r["method"] == "fp")
    rows = list(base["rows"])
    checks = list(base.get("gptq_calibration_check", []))
    for run in runs[1:]:
        other = next(r["ppl"] for r in run["rows"] if r["method"] == "fp")
        if run["protocol"] != base["protocol"] or not math.isclose(other, fp, rel_tol=1e-6):
            raise SystemExit("--merge: the runs do not share the protocol and full-precision ppl")
        keys = {(r["method"], r["bits"], r["group_size"]) for r in run["rows"]}
        rows = [r for r in rows if (r["method"], r["bits"], r["group_size"]) not in keys]
        rows += run["rows"]
        checks += run.get("gptq_calibration_check", [])
    merged = {
        **base,
        "rows": rows,
        "gptq_calibration_check": checks,
        "merged_runs": [{k: r[k] for k in ("commit", "date", "command")} for r in runs],
    }
    write_outputs(merged, json_path, md_path)
    print(markdown(merged))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument(
        "--check-windows", type=int, default=4, help="calibration windows GPTQ is checked on"
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 3])
    parser.add_argument("--groups", nargs="+", type=int, default=[0, 128], help="0 = per channel")
    parser.add_argument("--text", type=Path, default=WIKITEXT)
    parser.add_argument("--device", default="cpu", help="where to quantize and evaluate")
    parser.add_argument("--out", type=Path, default=RESULTS / "quality", help="path stem")
    parser.add_argument(
        "--piqa", type=int, default=0, help="also PIQA acc/acc_norm on the first N questions"
    )
    parser.add_argument("--keep", action="store_true", help="keep earlier rows not re-measured")
    parser.add_argument(
        "--merge", nargs="+", type=Path, help="combine earlier runs' JSON files into --out"
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    json_path, md_path = args.out.with_suffix(".json"), args.out.with_suffix(".md")
    if args.merge:
        return merge(args.merge, json_path, md_path)

    from transformers.utils import logging as hf_logging

    from easyquant.models.gguf_source import default_model_path

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    path = default_model_path()
    log(f"loading {path.name}")
    loaded = load_model(path, device=args.device)
    model = loaded.model
    ids = tokenize(loaded.tokenizer, read_text(args.text))
    available = ids.numel() // args.seq_len
    calib_first = available - args.calib_windows
    if calib_first < args.windows:
        raise SystemExit("the text is too short for disjoint evaluation and calibration windows")
    calib = [ids[i * args.seq_len : (i + 1) * args.seq_len] for i in range(calib_first, available)]

    piqa_questions = []
    if args.piqa:
        from easyquant.evaluation.piqa import load_piqa

        piqa_questions = load_piqa(REPO.parent / "shared" / "data" / "piqa", limit=args.piqa)

    def piqa_of(m: nn.Module) -> dict[str, Any]:
        from easyquant.evaluation.piqa import piqa_accuracy

        return (
            piqa_accuracy(m, loaded.tokenizer, piqa_questions).to_dict() if piqa_questions else {}
        )

    def ppl_of(m: nn.Module, first: int = 0, count: int | None = None) -> float:
        return perplexity(m, ids, args.seq_len, count or args.windows, first_window=first).ppl

    payload: dict[str, Any] = {
        **environment(args.device),
        "protocol": {
            "model": path.name,
            "text": f"../shared/data/wikitext2/{args.text.name}",
            "text_tokens": int(ids.numel()),
            "seq_len": args.seq_len,
            "windows": args.windows,
            "first_window": 0,
            "predicted_tokens": args.windows * (args.seq_len - 1),
            "calib_first": calib_first,
            "calib_windows": args.calib_windows,
            "check_windows": args.check_windows,
        },
        "rows": [],
        "gptq_calibration_check": [],
    }
    log("full precision")
    fp = ppl_of(model)
    payload["rows"].append(
        {
            "piqa": piqa_of(model),
            "method": "fp",
            "bits": 32,
            "group_size": None,
            "ppl": fp,
            "bits_per_weight": 32.0,
            "seconds": 0.0,
            "extra": {},
        }
    )
    log(f"full precision ppl {fp:.3f}")
    if args.keep and json_path.exists():
        earlier = json.loads(json_path.read_text())
        old_fp = next(r["ppl"] for r in earlier["rows"] if r["method"] == "fp")
        if (
            not math.isclose(old_fp, fp, rel_tol=1e-6)
            or earlier["protocol"]["windows"] != args.windows
        ):
            raise SystemExit(f"--keep: earlier run measured full precision {old_fp}, now {fp}")
        redo = {(m, b, g or None) for m in args.methods for b in args.bits for g in args.groups}
        payload["rows"] += [
            r
            for r in earlier["rows"]
            if r["method"] != "fp" and (r["method"], r["bits"], r["group_size"]) not in redo
        ]
        payload["gptq_calibration_check"] = earlier.get("gptq_calibration_check", [])
        payload["earlier_rows_from"] = {k: earlier[k] for k in ("commit", "date", "command")}
    write_outputs(payload, json_path, md_path)

    rtn_calib_cache: dict[tuple[int, int | None], float] = {}
    for bits in args.bits:
        for g in args.groups:
            group = g or None
            for method in args.methods:
                quantized = copy.deepcopy(model)
                log(f"{method} {bits}-bit {group_label(group)}: quantizing")
                start = time.perf_counter()
                if method == "hqq":
                    bpw, extra = quantize_hqq(quantized, bits, group)
                elif method == "gptq":
                    bpw, extra = quantize_gptq(quantized, bits, group, calib)
                else:
                    config = easyquant_config(method, bits, group)
                    overrides = preset_overrides(method, config) if method in PRESETS else {}
                    bpw, extra = quantize_easyquant(quantized, config, overrides)
                seconds = time.perf_counter() - start
                ppl = ppl_of(quantized)
                log(
                    f"{method} {bits}-bit {group_label(group)}: ppl {ppl:.3f}, {bpw:.3f} bpw, "
                    f"{seconds:.1f} s"
                )
                if method == "gptq":
                    if (bits, group) not in rtn_calib_cache:
                        rtn = copy.deepcopy(model)
                        quantize_easyquant(rtn, easyquant_config("rtn", bits, group))
                        rtn_calib_cache[bits, group] = ppl_of(rtn, calib_first, args.check_windows)
                    check = {
                        "bits": bits,
                        "group_size": group,
                        "rtn_ppl": rtn_calib_cache[bits, group],
                        "gptq_ppl": ppl_of(quantized, calib_first, args.check_windows),
                    }
                    rtn_ppl, gptq_ppl = check["rtn_ppl"], check["gptq_ppl"]
                    log(f"  calibration windows: RTN {rtn_ppl:.3f}, GPTQ {gptq_ppl:.3f}")
                    payload["gptq_calibration_check"] = [
                        c
                        for c in payload["gptq_calibration_check"]
                        if (c["bits"], c["group_size"]) != (bits, group)
                    ] + [check]
                payload["rows"] = [
                    r
                    for r in payload["rows"]
                    if (r["method"], r["bits"], r["group_size"]) != (method, bits, group)
                ] + [
                    {
                        "method": method,
                        "bits": bits,
                        "group_size": group,
                        "ppl": ppl,
                        "bits_per_weight": bpw,
                        "seconds": seconds,
                        "extra": extra,
                        "piqa": piqa_of(quantized) if bits == 4 else {},
                    }
                ]
                write_outputs(payload, json_path, md_path)
                del quantized
    print(markdown(payload))
    log(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
