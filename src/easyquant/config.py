"""Quantization configuration: one dataclass, validated on construction, JSON round-trippable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

BITS = (2, 3, 4, 8)
METHODS = ("easyquant", "rtn")
OUTLIER_SCOPES = ("tensor", "channel", "group")
STORAGE_DTYPES = ("float16", "bfloat16", "float32")

Method = Literal["easyquant", "rtn"]
OutlierScope = Literal["tensor", "channel", "group"]


@dataclass(frozen=True)
class QuantConfig:
    """How one weight matrix is quantized.

    Defaults follow the paper (EasyQuant, arXiv 2403.02775, Section 5): 4-bit, one range per output
    channel, outliers at n = 3 standard deviations of the whole tensor, Adam for 500 steps.

    ``scale_dtype`` is how scales are stored (codes are computed with the stored scales);
    ``outlier_dtype`` how outlier values are stored: None keeps the weight's own dtype, so outliers
    come back bit for bit; "float16"/"bfloat16" halve their cost for float32 checkpoints.

    ``lr`` is relative to each channel's starting range: the search optimises ``s = s0 * r`` with
    ``r`` starting at 1, so one Adam step moves a range by about ``lr * s0`` whatever the weight
    scale (the paper's absolute 1e-4 on LLaMA weights with ranges near 1e-2 is about 1e-2 relative).

    Beyond the paper (all off by default, so the defaults and ``paper()`` are the paper's recipe):
    ``outlier_scope="group"`` takes the n-sigma statistics per quantization group (per channel when
    ``group_size`` is None); ``init_grid`` > 0 starts Adam from the best of that many clip ratios
    of the max-abs range, evenly spaced in [``INIT_GRID_LOW``, 1] (a coarse grid search, data-free,
    that keeps Adam out of the poor local minima near max-abs); ``refine_steps`` > 0 ends with that
    many least-squares updates of each range with its codes fixed (``s = <x, q> / <q, q>``, then
    re-rounding), each kept only where it lowers the error. See :meth:`best`.
    """

    bits: int = 4
    group_size: int | None = None
    outlier_sigma: float | None = 3.0
    outlier_scope: OutlierScope = "tensor"
    steps: int = 500
    lr: float = 1e-2
    method: Method = "easyquant"
    scale_dtype: str = "float16"
    outlier_dtype: str | None = None
    init_grid: int = 0
    refine_steps: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {self.bits!r}")
        if self.group_size is not None and (
            isinstance(self.group_size, bool)
            or not isinstance(self.group_size, int)
            or self.group_size < 1
        ):
            raise ValueError(
                f"group_size must be None (one range per output channel) or a positive int, "
                f"got {self.group_size!r}"
            )
        if self.outlier_sigma is not None and (
            isinstance(self.outlier_sigma, bool)
            or not isinstance(self.outlier_sigma, (int, float))
            or not self.outlier_sigma > 0
            or self.outlier_sigma == float("inf")
        ):
            raise ValueError(
                f"outlier_sigma must be None (no outlier isolation) or a finite number > 0, "
                f"got {self.outlier_sigma!r}"
            )
        if self.outlier_scope not in OUTLIER_SCOPES:
            raise ValueError(
                f"outlier_scope must be one of {OUTLIER_SCOPES}, got {self.outlier_scope!r}"
            )
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {self.steps!r}")
        if (
            isinstance(self.lr, bool)
            or not isinstance(self.lr, (int, float))
            or not 0 < self.lr < float("inf")
        ):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.scale_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"scale_dtype must be one of {STORAGE_DTYPES}, got {self.scale_dtype!r}"
            )
        if self.outlier_dtype is not None and self.outlier_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"outlier_dtype must be None (the weight's dtype) or one of {STORAGE_DTYPES}, "
                f"got {self.outlier_dtype!r}"
            )

        for name in ("init_grid", "refine_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")

    @property
    def qmin(self) -> int:
        """Lowest signed code: -2^(bits-1)."""
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Highest signed code: 2^(bits-1) - 1."""
        return (1 << (self.bits - 1)) - 1

    def replace(self, **changes: Any) -> QuantConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantConfig:
        if not isinstance(data, dict):
            raise ValueError(f"QuantConfig.from_dict needs a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown QuantConfig field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**data)

    @classmethod
    def paper(cls, **changes: Any) -> QuantConfig:
        """The paper's recipe: 3 sigma per tensor, per-channel ranges, Adam 500 steps."""
        return cls(**{**dict(outlier_sigma=3.0, outlier_scope="tensor", steps=500), **changes})

    @classmethod
    def best(cls, **changes: Any) -> QuantConfig:
        """Our best data-free recipe on SmolLM2 (benchmarks/results/quality.md): see BEST.

        The recipe depends on the bit width (``bits`` in ``changes``, default 4) and on whether
        ranges are per group (``group_size`` given) or per channel."""
        low_bits = changes.get("bits", 4) < 4
        if changes.get("group_size") is not None:
            recipe = BEST_GROUPED_LOW_BITS if low_bits else BEST_GROUPED
        else:
            recipe = BEST_LOW_BITS if low_bits else BEST
        return cls(**{**recipe, **changes})

    @classmethod
    def preset(cls, name: str, **changes: Any) -> QuantConfig:
        """A named recipe: "paper" or "best" (with field changes on top)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return getattr(cls, name)(**changes)


# The lowest clip ratio of the ``init_grid`` search (ratios of each row's max-abs range).
INIT_GRID_LOW = 0.3
PRESETS = ("paper", "best")
# Chosen on WikiText-2 windows 100-107 (dev), reported on windows 0-7 (test), see
# benchmarks/results/quality-sweep.md. Minimising the squared error all the way clips the largest
# weights, which perplexity punishes: at 4 bits a short, gentle search (50 Adam steps at a 3e-3
# relative rate from max-abs) beats 500 steps, and is 10x faster. At 3 bits the range must move
# further (best clip 0.6-0.8 of max-abs), so more steps, and a lower sigma pays for its outliers.
# Outlier values are stored as float16 (each costs 24 bits with its position in format 2, not 40
# with float32 values). At 4 bits per channel the nσ statistics are taken per output channel
# (each row's own spread, as its range sees it) at 2.75σ: 0.78% outliers, 4.250 bits/weight in
# format 2, dev 28.19 against 28.58 for 3σ per tensor (4.205); 2.65σ per channel reaches dev
# 28.24 at 4.304 (sweep runs 8-9).
BEST: dict[str, Any] = dict(
    outlier_sigma=2.75,
    outlier_scope="channel",
    outlier_dtype="float16",
    steps=50,
    lr=3e-3,
)
BEST_LOW_BITS: dict[str, Any] = dict(
    outlier_sigma=2.75,
    outlier_scope="tensor",
    outlier_dtype="float16",
    steps=100,
    lr=3e-3,
)
# With ranges per group, the n-sigma statistics per group too (each group's own spread, as the
# range sees it): at 4 bits g128 better on dev than per tensor and fewer bits at 3σ; at 3 bits
# the best dev perplexity at 2.4σ, where the search needs the paper's 500 steps at 1e-2
# (stages group-scope and 3bit-g128-sigma of benchmarks/quality_sweep.py, on the CPU).
BEST_GROUPED: dict[str, Any] = {**BEST, "outlier_sigma": 2.75, "outlier_scope": "group"}
BEST_GROUPED_LOW_BITS: dict[str, Any] = {
    **BEST_LOW_BITS,
    "outlier_sigma": 2.4,
    "outlier_scope": "group",
    "steps": 500,
    "lr": 1e-2,
}
