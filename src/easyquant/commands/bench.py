"""``easyquant bench quality [ARGS...]``: run a benchmark script of a source checkout.

The benchmarks live in ``benchmarks/`` beside ``src/`` (they are not part of the installed
package); the remaining arguments go to the script's ``main(argv)`` unchanged.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

BENCHMARKS = {"quality": "quality.py"}


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[3] / "benchmarks"


def run(args: argparse.Namespace) -> int:
    from easyquant.cli import UserError

    script = benchmarks_dir() / BENCHMARKS[args.benchmark]
    if not script.is_file():
        raise UserError(
            f"{script} not found: benchmarks ship with the source checkout, not the package"
        )
    sys.path.insert(0, str(script.parent))
    spec = importlib.util.spec_from_file_location(f"easyquant_bench_{args.benchmark}", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(list(args.args)) or 0)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="run a benchmark of the source checkout (quality: ppl of every method)",
        description="Run benchmarks/<name>.py of the source checkout; other arguments go to it.",
    )
    parser.add_argument("benchmark", choices=sorted(BENCHMARKS))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    parser.set_defaults(func=run)
