"""``easyquant eval MODEL --text FILE``: perplexity over non-overlapping windows, JSON on stdout.

MODEL is a quantized easyquant directory, a Hugging Face model directory, or a GGUF file.
``--dataset wikitext2`` fetches WikiText-2 (raw, test split) with the ``datasets`` library instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from easyquant.evaluation.perplexity import DEFAULT_SEQ_LEN

DATASETS = ("wikitext2",)


def dataset_text(name: str) -> str:
    """The text of a named dataset, downloaded with ``datasets``; one-line error when impossible."""
    from easyquant.cli import UserError

    if name != "wikitext2":
        raise UserError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    try:
        import datasets
    except ImportError:
        raise UserError(
            "--dataset wikitext2 needs the 'datasets' library (pip install datasets) and "
            "internet access; or pass --text FILE (e.g. wiki.test.raw)"
        ) from None
    try:
        split = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
    except Exception as exc:  # network, hub or cache errors come in many types
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        raise UserError(
            f"cannot download wikitext2 with 'datasets' (offline?): {first.strip()}; "
            "pass --text FILE instead"
        ) from None
    return "\n\n".join(split["text"])


def quiet_transformers() -> None:
    """No loading progress bars or info logs from transformers (``--quiet``)."""
    try:
        from transformers.utils import logging
    except ImportError:
        return
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def run(args: argparse.Namespace) -> int:
    from easyquant.evaluation.loader import load_model, parse_device, parse_dtype
    from easyquant.evaluation.perplexity import check_windows, perplexity, read_text, tokenize

    # Cheap checks first: a bad text path should not cost a model load.
    parse_device(args.device)
    parse_dtype(args.dtype)
    if args.text is not None:
        text, source = read_text(args.text), str(args.text)
    else:
        text, source = dataset_text(args.dataset), f"dataset:{args.dataset}"
    if args.quiet:
        quiet_transformers()
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    ids = tokenize(loaded.tokenizer, text)
    check_windows(ids.numel(), args.seq_len, args.windows)
    progress = None
    if not args.quiet:
        from tqdm import tqdm

        def progress(items):  # type: ignore[no-untyped-def]
            return tqdm(items, desc="perplexity", unit="window", file=sys.stderr)

    result = perplexity(loaded.model, ids, args.seq_len, args.windows, progress=progress)
    report = {
        "model": str(Path(args.model)),
        "model_kind": loaded.kind,
        "text": source,
        "ppl": result.ppl,
        "nll": result.nll,
        "windows": result.windows,
        "tokens": result.tokens,
        "seq_len": result.seq_len,
        "text_tokens": int(ids.numel()),
        "device": args.device,
        "dtype": args.dtype,
    }
    print(json.dumps(report, indent=2))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "eval",
        help="perplexity of a model on a text (non-overlapping windows), JSON on stdout",
        description="Perplexity of MODEL (quantized easyquant directory, Hugging Face directory "
        "or GGUF file) over non-overlapping windows of a text: mean NLL over all predicted "
        "tokens, ppl = exp(mean). Prints JSON on stdout.",
    )
    parser.add_argument("model", help="quantized directory, Hugging Face directory or .gguf file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=Path, help="UTF-8 text file (CRLF normalised)")
    source.add_argument(
        "--dataset", choices=DATASETS, help="download the text with the 'datasets' library"
    )
    parser.add_argument("--seq-len", type=positive_int, default=DEFAULT_SEQ_LEN)
    parser.add_argument(
        "--windows", type=positive_int, default=None, help="first N windows (default: all)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
