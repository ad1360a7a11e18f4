"""``easyquant demo``: quantize SmolLM2-135M on the CPU (RTN, EasyQuant) and print WikiText-2 ppl.

The default model ships as a Q4_1 GGUF; transformers dequantizes it on load and those float32
weights are our full-precision reference. Every decoder Linear weight is quantized (210 matrices;
embeddings, lm_head and norms stay as they are); perplexity is measured on the first few
non-overlapping 2048-token windows of the WikiText-2 test split, the same windows for every row.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from easyquant.config import PRESETS, QuantConfig, preset_overrides
from easyquant.evaluation.perplexity import perplexity, read_text, tokenize
from easyquant.models.select import Selection, TensorReport, quantize_model_inplace

WIKITEXT = Path("shared") / "data" / "wikitext2" / "wiki.test.raw"


def default_text() -> Path:
    """``../shared/data/...`` beside this checkout, else beside the working directory."""
    repo = Path(__file__).resolve().parents[3]
    for base in (repo.parent, Path.cwd().parent):
        if (base / WIKITEXT).is_file():
            return base / WIKITEXT
    return Path.cwd().parent / WIKITEXT


@dataclass
class DemoRow:
    method: str
    ppl: float
    bits_per_weight: float | None  # over the quantized weights; None for full precision
    seconds: float | None  # quantization time, all selected weights
    quantized: int  # number of quantized weight matrices


Overrides = dict[str, dict[str, Any]]


def demo_methods(bits: int) -> list[tuple[str, QuantConfig, Overrides]]:
    """The rows of the demo, after full precision: plain RTN, then EasyQuant presets (each with
    its per-module changes)."""
    rtn = QuantConfig(bits=bits, method="rtn", outlier_sigma=None)
    methods: list[tuple[str, QuantConfig, Overrides]] = [("RTN (per channel)", rtn, {})]
    for name in PRESETS:
        config = QuantConfig.preset(name, bits=bits)
        overrides = preset_overrides(name, config)
        if any((config, overrides) == (c, o) for _, c, o in methods):
            continue  # the same recipe as a row before (quality = best at other widths)
        methods.append((f"EasyQuant ({name})", config, overrides))
    return methods


def average_bits(reports: Sequence[TensorReport]) -> float:
    """Bits per weight over all quantized weights, every stored bit counted."""
    weights = sum(r.shape[0] * r.shape[1] for r in reports)
    return sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in reports) / weights


def compare(
    model: nn.Module,
    token_ids: torch.Tensor,
    methods: Sequence[tuple[str, QuantConfig, Overrides]],
    seq_len: int,
    windows: int,
    selection: Selection | None = None,
    log=None,  # type: ignore[no-untyped-def]
) -> list[DemoRow]:
    """Full precision, then each method on a fresh copy of ``model``: ppl on the same windows;
    each method's overrides come after ``selection``'s own."""
    log = log or (lambda message: None)
    selection = selection or Selection()
    log("full precision: perplexity ...")
    rows = [
        DemoRow("full precision", perplexity(model, token_ids, seq_len, windows).ppl, None, None, 0)
    ]
    for label, config, overrides in methods:
        log(f"{label}: quantizing ...")
        quantized = copy.deepcopy(model)
        start = time.perf_counter()
        reports = quantize_model_inplace(quantized, config, selection.with_overrides(overrides))
        seconds = time.perf_counter() - start
        if not reports:
            raise ValueError("the selection matched no Linear weight of the model")
        log(f"{label}: perplexity ...")
        ppl = perplexity(quantized, token_ids, seq_len, windows).ppl
        rows.append(DemoRow(label, ppl, average_bits(reports), seconds, len(reports)))
        del quantized
    return rows


def format_table(rows: Sequence[DemoRow]) -> str:
    header = f"{'method':<22} {'ppl':>9} {'bits/weight':>11} {'quant. s':>9}"
    lines = [header, "-" * len(header)]
    for row in rows:
        bpw = "16/32" if row.bits_per_weight is None else f"{row.bits_per_weight:.3f}"
        sec = "-" if row.seconds is None else f"{row.seconds:.1f}"
        lines.append(f"{row.method:<22} {row.ppl:>9.2f} {bpw:>11} {sec:>9}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from easyquant.evaluation.loader import load_model
    from easyquant.models.gguf_source import default_model_path

    started = time.perf_counter()
    torch.manual_seed(0)
    args.text = args.text or default_text()
    text = read_text(args.text)  # before the model: a missing text fails fast

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    path = Path(args.model) if args.model else default_model_path()
    log(f"loading {path.name} ...")
    quiet_loading()
    loaded = load_model(path)
    ids = tokenize(loaded.tokenizer, text)
    selection = None
    if args.layers is not None:
        selection = Selection.build(include=[f"*layers.{i}.*" for i in range(args.layers)])
    rows = compare(
        loaded.model, ids, demo_methods(args.bits), args.seq_len, args.windows, selection, log
    )
    count = rows[-1].quantized
    print(f"model: {path.name} ({count} decoder Linear weights quantized to {args.bits} bits, CPU)")
    print(
        "full precision = the weights as loaded from this GGUF (block-quantized Q4_1 upstream, "
        "dequantized to float32): our reference"
    )
    print(
        f"perplexity: {Path(args.text).name}, first {args.windows} non-overlapping windows of "
        f"{args.seq_len} tokens ({args.windows * (args.seq_len - 1)} predicted tokens)"
    )
    print("bits/weight: every stored bit of the quantized weights (codes, scales, outliers)\n")
    print(format_table(rows))
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")
    return 0


def quiet_loading() -> None:
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def register(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo",
        help="quantize SmolLM2-135M on the CPU: RTN vs EasyQuant WikiText-2 perplexity",
    )
    demo.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8))
    demo.add_argument("--windows", type=int, default=2, help="first N windows (default 2)")
    demo.add_argument("--seq-len", type=int, default=2048)
    demo.add_argument("--text", type=Path, default=None, help="default: WikiText-2 test")
    demo.add_argument("--model", type=Path, default=None, help="GGUF file (default: SmolLM2-135M)")
    demo.add_argument(
        "--layers", type=int, default=None, help="quantize only the first N decoder layers"
    )
    demo.set_defaults(func=run)
