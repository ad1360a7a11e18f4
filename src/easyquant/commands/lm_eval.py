"""``easyquant lm-eval ARGS...``: lm-evaluation-harness on easyquant models, with offline tasks.

It registers easyquant with transformers (so ``--model hf --model_args pretrained=QUANTIZED_DIR``
builds QuantLinear layers, and ``quantization_config`` in a model's config.json is understood),
adds easyquant's task folder (``piqa_local``: PIQA from ``../shared/data/piqa/``) to lm-eval's
``--include_path`` (next to any folder given there), then runs lm-eval's own command line with
ARGS as they are: every lm-eval option works, and ``easyquant lm-eval --help`` is lm-eval's help.

    easyquant lm-eval --model hf --model_args pretrained=out/smollm2-4bit,dtype=float32 \\
        --tasks piqa_local --device cpu --batch_size 16
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from easyquant.lm_eval_tasks import TASKS_DIR

INSTALL_HINT = "pip install 'lm-eval>=0.4.13'"


def register(subparsers: argparse._SubParsersAction) -> None:
    # "+" as the only option prefix: every "-x"/"--x" argument is passed on to lm-eval untouched.
    parser = subparsers.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness (its own options) with easyquant models and local tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        prefix_chars="+",
        add_help=False,
    )
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm-eval's arguments")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    return run_lm_eval(args.lm_eval_args)


def run_lm_eval(argv: Sequence[str]) -> int:
    """Register easyquant, then run lm-eval's command line on ``argv`` (its exit code)."""
    from easyquant.cli import UserError

    try:
        from lm_eval._cli.harness import HarnessCLI
        from lm_eval.utils import setup_logging
    except ImportError:
        raise UserError(f"easyquant lm-eval needs lm-evaluation-harness: {INSTALL_HINT}") from None
    from easyquant.integrations import register

    try:
        register()
    except ImportError as exc:  # transformers missing or of an unsupported version
        raise UserError(str(exc)) from None
    setup_logging()
    cli = HarnessCLI()
    saved_argv = sys.argv
    sys.argv = ["lm-eval", *argv]  # HarnessCLI reads sys.argv, as lm-eval's own entry point does
    try:
        namespace = cli.parse_args()
    finally:
        sys.argv = saved_argv
    if hasattr(namespace, "include_path"):  # run, ls and validate take task folders
        given = namespace.include_path
        namespace.include_path = [str(TASKS_DIR), *([given] if given else [])]
    cli.execute(namespace)
    return 0


if __name__ == "__main__":
    from easyquant.cli import main

    sys.exit(main(["lm-eval", *sys.argv[1:]]))
