"""How far from zero the outliers of the best presets lie, in steps of their row's scale.

    python benchmarks/outlier_steps.py [--sigmas 2.75 2.6 2.5] [--out DIR]

int8 outlier values (``outlier_dtype="int8"``) hold at most 127 steps; a weight with an outlier
further out keeps float16 values. SmolLM2-135M-Instruct (GGUF weights), every decoder Linear
weight quantized with ``QuantConfig.best(outlier_sigma=s, outlier_dtype="float16")`` (so every
value is kept and none falls back); prints quantiles of |value| / scale and how many pass 127,
and writes ``<out>/<device>-<date>-outlier-steps.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import environment
from easyquant import QuantConfig, quantize_tensor
from easyquant.evaluation.loader import load_model
from easyquant.format.qweight import OUTLIER_CODE_MAX, scale_at
from easyquant.models.gguf_source import default_model_path
from quality_sweep import decoder_linears

QUANTILES = (0.01, 0.5, 0.9, 0.99, 0.999)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigmas", type=float, nargs="+", default=[2.75, 2.6, 2.5])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    model = load_model(default_model_path(), device="cpu").model
    rows = []
    for sigma in args.sigmas:
        config = QuantConfig.best(outlier_sigma=sigma, outlier_dtype="float16")
        steps = []
        for _, linear in decoder_linears(model):
            qw = quantize_tensor(linear.weight.data, config)
            unit = scale_at(qw.scales, qw.outlier_rows(), qw.outlier_indices.long(), qw.group_size)
            steps.append(qw.outlier_values.float().abs() / unit)
        r = torch.cat(steps)
        row = {
            "sigma": sigma,
            "config": config.to_dict(),
            "outliers": r.numel(),
            "quantiles": {str(q): round(float(r.quantile(q)), 2) for q in QUANTILES},
            "max": round(float(r.max()), 2),
            "past_int8": int((r > OUTLIER_CODE_MAX + 0.5).sum()),
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    env = environment("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"{env['device'].split()[0].lower().replace('_', '-')}-cpu-{env['date'][:10]}"
    path = args.out / f"{name}-outlier-steps.json"
    path.write_text(json.dumps({**env, "command": " ".join(sys.argv), "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
