"""Command line entry point: ``easyquant <command>``; one-line errors, meaningful exit codes.

Exit codes: 0 success, 1 unexpected internal error, 2 bad input (one line on stderr, no
traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from easyquant import __version__


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit code 2."""


# Each subcommand lives in easyquant/commands/<name>.py and exposes ``register(subparsers)``;
# the module registers its handler with ``parser.set_defaults(func=...)``.
COMMANDS = ("quantize", "eval", "inspect", "demo", "bench", "lm_eval")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="easyquant", description="Data-free weight-only LLM quantization (EasyQuant)."
    )
    parser.add_argument("--version", action="version", version=f"easyquant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"easyquant.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"easyquant.commands.{name}":
                raise
            continue  # subcommand not built yet
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"easyquant: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("easyquant: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
