"""Bits per weight of SmolLM2's quantized weights in format version 1 and in the current format.

    python benchmarks/format_bpw.py [--out benchmarks/results/format-bpw]

Format 2 changed only how the outliers' positions are stored (counts per block of 256 columns
with uint8 columns, or per row; see ``easyquant.format.outlier_store``), not any value: codes,
scales, outliers and so perplexity are those of format 1. So the bits of each configuration follow
from its outlier mask alone, which needs no range search: this script counts them, exactly as
``QuantizedWeight.bits_per_weight`` does (``easyquant.models.budget.storage_bits``, tested equal),
for the configurations of ``benchmarks/results/quality.md`` and the 4-bit sweep candidates. The
format-1 column is recomputed (int32 row offsets, int16 columns) and should match the bits/weight
published from format-1 runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import RESULTS, environment
from easyquant import QuantConfig
from easyquant.algorithm.outliers import outlier_mask
from easyquant.evaluation.loader import load_model
from easyquant.format.bitpack import packed_length
from easyquant.format.outlier_store import index_dtype, mask_block_counts
from easyquant.format.qweight import num_groups
from easyquant.models.budget import storage_bits

# (label, config): the quality.md cells of our format (RTN and the range search alone store no
# outliers; outliers only and the paper preset share 3 sigma per tensor), then 4-bit per channel
# sweep candidates with the best preset's search.
CONFIGS: list[tuple[str, QuantConfig]] = [
    *(
        (f"{name} {bits}-bit {'g128' if group else 'ch'}", config)
        for bits in (4, 3)
        for group in (None, 128)
        for name, config in (
            (
                "no outliers (RTN, range search only)",
                QuantConfig(bits=bits, group_size=group, outlier_sigma=None),
            ),
            ("outliers only / paper", QuantConfig.paper(bits=bits, group_size=group)),
            ("best", QuantConfig.best(bits=bits, group_size=group)),
        )
    ),
    *(
        (
            f"4-bit ch {sigma}σ per {scope}",
            QuantConfig.best(outlier_sigma=sigma, outlier_scope=scope),
        )
        for sigma, scope in (
            (2.75, "tensor"),
            (2.8, "tensor"),
            (2.6, "channel"),
            (2.65, "channel"),
            (2.7, "channel"),
            (2.75, "channel"),
        )
    ),
]


def version_1_bits(
    shape: tuple[int, int], config: QuantConfig, outliers: int, dtype: torch.dtype
) -> int:
    """Format 1: codes, scales, int32 row offsets [out + 1], int16/int32 columns, values."""
    out_f, in_f = shape
    value_dtype = getattr(torch, config.outlier_dtype) if config.outlier_dtype else dtype
    return (
        out_f * packed_length(in_f, config.bits) * 8
        + out_f * num_groups(in_f, config.group_size) * 16
        + (out_f + 1) * 32
        + outliers * (torch.iinfo(index_dtype(in_f)).bits + torch.finfo(value_dtype).bits)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="GGUF or model dir (default: SmolLM2 GGUF)")
    parser.add_argument("--out", type=Path, default=RESULTS / "format-bpw")
    args = parser.parse_args(argv)
    from easyquant.models.gguf_source import default_model_path

    model = load_model(args.model or default_model_path(), device="cpu").model
    weights = [
        m.weight.detach()
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in name
    ]
    numel = sum(w.numel() for w in weights)
    rows = []
    print(f"{len(weights)} decoder Linear weights, {numel} parameters")
    print("| configuration | outliers | bits/weight, format 1 | format 2 | saved |")
    print("| --- | --- | --- | --- | --- |")
    for label, config in CONFIGS:
        old = new = outliers = 0
        for w in weights:
            mask = outlier_mask(w, config.outlier_sigma, config.outlier_scope, config.group_size)
            counts = mask_block_counts(mask)
            n = int(counts.sum())
            outliers += n
            old += version_1_bits(tuple(w.shape), config, n, w.dtype)
            new += storage_bits(tuple(w.shape), config, counts, w.dtype)
        row = {
            "configuration": label,
            "config": config.to_dict(),
            "outlier_fraction": outliers / numel,
            "bits_per_weight_v1": old / numel,
            "bits_per_weight_v2": new / numel,
        }
        rows.append(row)
        print(
            f"| {label} | {100 * outliers / numel:.2f}% | {old / numel:.3f} | {new / numel:.3f} "
            f"| {(old - new) / numel:.3f} |",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {**environment("cpu"), "rows": rows}
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
