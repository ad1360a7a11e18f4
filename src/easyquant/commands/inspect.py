"""``easyquant inspect SRC``: how many weights the n-sigma rule makes outliers, per module type and
per layer (as the paper's Tables 7 and 8), as tables, JSON (--json) or a figure (--plot out.png).

SRC is a model directory, a GGUF file, or ``default`` (SmolLM2-135M-Instruct). Nothing is
quantized; safetensors are read one tensor at a time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from easyquant.config import OUTLIER_SCOPES, QuantConfig


def column_names(kinds: list[str]) -> dict[str, str]:
    """Short column headers: the last name part ('q_proj') when that is unambiguous."""
    short = {k: k.rsplit(".", 1)[-1] for k in kinds}
    return short if len(set(short.values())) == len(kinds) else {k: k for k in kinds}


def print_tables(rows: list[Any], source: str, sigma: float, scope: str) -> None:
    from easyquant.models.outlier_stats import fraction_by

    print(f"model: {source}")
    print(f"outliers: |w - mean| >= {sigma:g} std (scope: {scope}); values are % of weights\n")
    by_type = fraction_by(rows, lambda r: r.kind)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.kind] = counts.get(r.kind, 0) + 1
    width = max(len("module type"), *(len(k) for k in by_type))
    print(f"{'module type':<{width}}  {'tensors':>7}  {'outliers %':>10}")
    print(f"{'-' * width}  {'-' * 7}  {'-' * 10}")
    for kind, fraction in by_type.items():
        print(f"{kind:<{width}}  {counts[kind]:>7}  {100 * fraction:>10.3f}")
    overall = fraction_by(rows, lambda r: 0)[0]
    print(f"{'all':<{width}}  {len(rows):>7}  {100 * overall:>10.3f}\n")

    kinds = list(by_type)
    names = column_names(kinds)
    cells = fraction_by(rows, lambda r: (r.layer, r.kind))
    by_layer = fraction_by(rows, lambda r: r.layer)
    widths = [max(len(names[k]), 6) for k in kinds]
    header = "  ".join(f"{names[k]:>{w}}" for k, w in zip(kinds, widths, strict=True))
    print(f"{'layer':>5}  {header}  {'all':>6}")
    print(f"{'-' * 5}  {'  '.join('-' * w for w in widths)}  {'-' * 6}")
    for layer, fraction in sorted(by_layer.items(), key=lambda item: (item[0] is None, item[0])):
        values = "  ".join(
            f"{100 * cells[(layer, k)]:>{w}.3f}" if (layer, k) in cells else " " * w
            for k, w in zip(kinds, widths, strict=True)
        )
        print(f"{'-' if layer is None else layer:>5}  {values}  {100 * fraction:>6.3f}")


def plot(rows: list[Any], path: Path, source: str, sigma: float, scope: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from easyquant.models.outlier_stats import fraction_by

    by_type = fraction_by(rows, lambda r: r.kind)
    names = column_names(list(by_type))
    cells = fraction_by(rows, lambda r: (r.layer, r.kind))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), width_ratios=(1, 2))
    left.bar([names[k] for k in by_type], [100 * v for v in by_type.values()], color="tab:blue")
    left.set_ylabel("outliers (% of weights)")
    left.set_title("per module type")
    left.tick_params(axis="x", rotation=45)
    for kind in by_type:
        points = sorted(
            (layer, 100 * v) for (layer, k), v in cells.items() if k == kind and layer is not None
        )
        if points:
            right.plot(*zip(*points, strict=True), marker="o", markersize=3, label=names[kind])
    right.xaxis.get_major_locator().set_params(integer=True)
    right.set_xlabel("layer")
    right.set_ylabel("outliers (% of weights)")
    right.set_title("per layer")
    right.legend(fontsize=8, ncol=2)
    fig.suptitle(f"{Path(source).name}: {sigma:g}-sigma outliers ({scope})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from easyquant.commands.quantize import resolve_source
    from easyquant.models.outlier_stats import count_outliers, summary
    from easyquant.models.select import Selection
    from easyquant.models.sources import open_source

    if args.sigma is not None and not args.sigma > 0:
        raise ValueError(f"--sigma must be > 0, got {args.sigma}")
    plot_path = Path(args.plot) if args.plot else None
    if plot_path is not None:
        if plot_path.exists() and not args.overwrite:
            raise ValueError(f"{plot_path} exists; choose another path or pass --overwrite")
        if not plot_path.parent.is_dir():
            raise FileNotFoundError(f"no such directory: {plot_path.parent}")
    src = resolve_source(args.src)
    source = open_source(src)
    progress = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        def progress(items: Any) -> Any:
            return tqdm(items, unit="tensor", file=sys.stderr)

    rows = count_outliers(
        source,
        args.sigma,
        args.scope,
        Selection.build(args.include, args.exclude),
        group_size=args.group_size,
        progress=progress,
    )
    if not rows:
        raise ValueError(f"no Linear weight of {src} matches the selection")
    if args.json:
        print(
            json.dumps(
                {"source": src, "sigma": args.sigma, "scope": args.scope, **summary(rows)}, indent=2
            )
        )
    else:
        print_tables(rows, src, args.sigma, args.scope)
    if plot_path is not None:
        plot(rows, plot_path, src, args.sigma, args.scope)
        if not args.quiet:
            print(f"easyquant: wrote {plot_path}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="outlier fractions per module type and per layer (paper Tables 7-8)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="model directory, .gguf file, or 'default' (SmolLM2-135M GGUF)")
    p.add_argument(
        "--sigma",
        type=float,
        default=QuantConfig().outlier_sigma or 3.0,
        help="n of the n-sigma rule (default 3)",
    )
    p.add_argument("--scope", choices=OUTLIER_SCOPES, default=QuantConfig().outlier_scope)
    p.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="group length, for a per-group scope where available",
    )
    p.add_argument("--include", action="append", default=[], metavar="GLOB")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    p.add_argument("--plot", metavar="PNG", help="also draw the figure to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --plot file")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
