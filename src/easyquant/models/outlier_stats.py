"""Outlier fractions of a model's Linear weights, per module type and per layer (the paper's
Tables 7 and 8), read tensor by tensor like the quantization pass."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from easyquant.algorithm.outliers import outlier_mask
from easyquant.models.select import Selection
from easyquant.models.sources import Source

LAYER_INDEX = re.compile(r"\.(\d+)\.")


@dataclass(frozen=True)
class WeightOutliers:
    module: str  # "model.layers.3.mlp.down_proj"
    layer: int | None  # 3
    kind: str  # "mlp.down_proj": the module's name inside its block
    outliers: int
    numel: int

    @property
    def fraction(self) -> float:
        return self.outliers / self.numel


def split_name(module: str) -> tuple[int | None, str]:
    match = LAYER_INDEX.search(module)
    if match is None:
        return None, module
    return int(match.group(1)), module[match.end() :]


def count_outliers(
    source: Source,
    sigma: float,
    scope: str = "tensor",
    selection: Selection | None = None,
    group_size: int | None = None,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> list[WeightOutliers]:
    """The n-sigma outliers (``sigma``, ``scope`` as in :class:`QuantConfig`) of every selected
    Linear weight of ``source``."""
    selection = selection or Selection()
    present = {t.name: t for t in source.tensors}
    modules = [
        m
        for m in source.linears
        if f"{m}.weight" in present and selection.wants(m, present[f"{m}.weight"].shape)
    ]
    extra = {"group_size": group_size} if group_size is not None else {}
    rows = []
    for module in progress(modules) if progress else modules:
        weight = source.load(f"{module}.weight")
        mask = outlier_mask(weight, sigma, scope, **extra)
        layer, kind = split_name(module)
        rows.append(WeightOutliers(module, layer, kind, int(mask.sum()), weight.numel()))
    return rows


def fraction_by(
    rows: list[WeightOutliers], key: Callable[[WeightOutliers], Any]
) -> dict[Any, float]:
    """Outlier fraction of each group of rows (outliers / weights, over the group)."""
    outliers: dict[Any, int] = defaultdict(int)
    numel: dict[Any, int] = defaultdict(int)
    for row in rows:
        outliers[key(row)] += row.outliers
        numel[key(row)] += row.numel
    return {k: outliers[k] / numel[k] for k in outliers}


def summary(rows: list[WeightOutliers]) -> dict[str, Any]:
    """Per module type, per layer, per (layer, type), and overall, as JSON-ready data."""
    return {
        "by_type": fraction_by(rows, lambda r: r.kind),
        "by_layer": {str(k): v for k, v in fraction_by(rows, lambda r: r.layer).items()},
        "overall": fraction_by(rows, lambda r: 0).get(0, 0.0),
        "modules": [
            {
                "module": r.module,
                "layer": r.layer,
                "type": r.kind,
                "outliers": r.outliers,
                "numel": r.numel,
                "fraction": r.fraction,
            }
            for r in rows
        ],
    }
