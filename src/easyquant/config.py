"""Quantization configuration: one dataclass, validated on construction, JSON round-trippable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

BITS = (2, 3, 4, 5, 6, 8)
METHODS = ("easyquant", "rtn")
OUTLIER_SCOPES = ("tensor", "channel", "group")
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
# Outlier values: a float dtype, or "int8": multiples of their own row's (group's) scale.
OUTLIER_DTYPES = (*STORAGE_DTYPES, "int8")

Method = Literal["easyquant", "rtn"]
OutlierScope = Literal["tensor", "channel", "group"]


@dataclass(frozen=True)
class QuantConfig:
    """How one weight matrix is quantized.

    Defaults follow the paper (EasyQuant, arXiv 2403.02775, Section 5): 4-bit, one range per output
    channel, outliers at n = 3 standard deviations of the whole tensor, Adam for 500 steps.

    ``scale_dtype`` is how scales are stored (codes are computed with the stored scales);
    ``outlier_dtype`` how outlier values are stored: None keeps the weight's own dtype, so outliers
    come back bit for bit; "float16"/"bfloat16" halve their cost for float32 checkpoints; "int8"
    stores each as a signed 8-bit multiple of its own row's (group's) stored scale, the grid of
    the non-outliers widened to 255 levels (half a step off at most, then rounded to the scale
    dtype; 8 bits instead of 16). A weight with an outlier past 127 steps (at 8 bits, nearly
    any weight with outliers), or in a row of scale zero, keeps float16 values instead (its own
    dtype where that is 16-bit).

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
        if self.outlier_dtype is not None and self.outlier_dtype not in OUTLIER_DTYPES:
            raise ValueError(
                f"outlier_dtype must be None (the weight's dtype) or one of {OUTLIER_DTYPES}, "
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
    def quality(cls, **changes: Any) -> QuantConfig:
        """The "quality" preset's config for most weights: :meth:`best`'s, but at 4 bits per
        channel with outliers at QUALITY_SIGMA, where the preset also gives the attention's key
        and value projections 6-bit codes (:func:`preset_overrides`): more bits per weight for
        a lower perplexity."""
        config = cls.best(**changes)
        if config.bits == 4 and config.group_size is None and "outlier_sigma" not in changes:
            config = config.replace(outlier_sigma=QUALITY_SIGMA)
        return config

    @classmethod
    def preset(cls, name: str, **changes: Any) -> QuantConfig:
        """A named recipe: "paper", "best" or "quality" (with field changes on top). Some
        recipes also quantize some module types differently: see :func:`preset_overrides`."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
        return getattr(cls, name)(**changes)


def preset_overrides(name: str, config: QuantConfig) -> dict[str, dict[str, Any]]:
    """The per-module config changes that preset ``name`` makes on top of ``config`` (its config
    for the model's other weights): ``{fnmatch pattern over module names: QuantConfig changes}``,
    as :class:`easyquant.models.Selection` takes them (the first matching pattern wins, so put
    your own overrides first). The patterns use Llama-style names (``*.k_proj``); modules of
    other architectures match none of them and keep ``config``."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    if name == "quality" and config.bits == 4 and config.group_size is None:
        return {pattern: dict(changes) for pattern, changes in QUALITY_MODULE_OVERRIDES.items()}
    return {}


# The lowest clip ratio of the ``init_grid`` search (ratios of each row's max-abs range).
INIT_GRID_LOW = 0.3
PRESETS = ("paper", "best", "quality")
# Chosen on WikiText-2 windows 100-107 (dev), reported on windows 0-7 (test), see
# benchmarks/results/quality-sweep.md. Minimising the squared error all the way clips the largest
# weights, which perplexity punishes: at 4 bits a short, gentle search (50 Adam steps at a 3e-3
# relative rate from max-abs) beats 500 steps, and is 10x faster. At 3 bits the range must move
# further (best clip 0.6-0.8 of max-abs), so more steps, and a lower sigma pays for its outliers.
# At 4 bits per channel the nσ statistics are taken per output channel (each row's own spread,
# as its range sees it), and outlier values are stored as int8 multiples of their row's scale
# (format 3): each outlier costs 16 bits with its position, not 24 with a float16 value, for
# dev +0.1 at the same σ (2.75σ: 28.28 at 4.187 against 28.19 at 4.250), which buys more of
# them: 2.5σ, 1.47% outliers, dev 27.82 at 4.297 bits/weight (2.6σ: 27.85 at 4.245; 2.4σ: 27.89
# at 4.362; sweep runs 8-11).
BEST: dict[str, Any] = dict(
    outlier_sigma=2.5,
    outlier_scope="channel",
    outlier_dtype="int8",
    steps=50,
    lr=3e-3,
)
# The attention's key and value projections are the most sensitive weights per weight (each feeds
# every query head of its group under grouped-query attention; SmolLM2-135M: 3 query heads per
# key/value head): quantized alone at 4 bits they add 0.71 and 0.62 to perplexity, near
# gate_proj's 0.86 with eight times their weights. The "quality" preset gives them 6-bit codes
# (with outliers at 2.5σ per channel) and the other weights 2.6σ: dev 26.63 at 4.374
# bits/weight against BEST's 27.82 at 4.297; 8-bit codes gain as much for 0.13 more bits/weight,
# 5-bit ones erratically (dev 27.04 to 28.34), and within BEST's 4.30 bits/weight 6-bit k/v
# paid by fewer outliers elsewhere gain nothing beyond noise (dev 27.12 vs 27.82 on windows
# 100-107, 26.23 vs 26.33 on 108-123; 3σ on k/v, 2.8σ elsewhere: 27.15 and 26.27; sweep runs
# 14-20). (Kernels: 6-bit codes decode slower than 4- and 8-bit ones; see the README.)
QUALITY_SIGMA = 2.6
QUALITY_MODULE_OVERRIDES: dict[str, dict[str, Any]] = {
    "*.k_proj": dict(bits=6, outlier_sigma=2.5),
    "*.v_proj": dict(bits=6, outlier_sigma=2.5),
}
# At 3 bits per channel, int8 outlier values too: 2.5σ per tensor, dev 66.58 at 3.337
# bits/weight against 70.64 at 3.304 for 2.75σ with float16 values (2.75σ int8: 71.70 at 3.223;
# 2.25σ int8: 54.72 at 3.528, near the cost of g128; sweep runs 11-13). 2 bits take the same
# recipe, not tuned.
BEST_LOW_BITS: dict[str, Any] = dict(
    outlier_sigma=2.5,
    outlier_scope="tensor",
    outlier_dtype="int8",
    steps=100,
    lr=3e-3,
)
# With ranges per group, the n-sigma statistics per group too (each group's own spread, as the
# range sees it): at 4 bits g128 better on dev than per tensor and fewer bits at 3σ; with int8
# outliers 2.5σ (dev 27.99 at 4.398 bits/weight, against 28.37 at 4.347 for 2.75σ with float16
# values; 2.4σ: 28.63 at 4.463). At 3 bits the best dev perplexity at 2.4σ, where the search
# needs the paper's 500 steps at 1e-2, with float16 values (int8: 50.37 against 49.19, for 0.14
# fewer bits/weight) (stages group-scope, 3bit-g128-sigma and int8-outliers-2/3 of
# benchmarks/quality_sweep.py, on the CPU).
BEST_GROUPED: dict[str, Any] = {**BEST, "outlier_sigma": 2.5, "outlier_scope": "group"}
BEST_GROUPED_LOW_BITS: dict[str, Any] = {
    **BEST_LOW_BITS,
    "outlier_sigma": 2.4,
    "outlier_scope": "group",
    "outlier_dtype": "float16",
    "steps": 500,
    "lr": 1e-2,
}
