"""Which weights of a model get quantized, and with which config; in-place quantization of a model.

By default every 2-D ``nn.Linear`` weight inside the decoder blocks is quantized; embeddings,
``lm_head``, norms and biases stay as they are. Users narrow or widen that with glob patterns over
module names (``fnmatch``: ``*`` matches dots too) and give per-module config overrides, the first
matching pattern winning: ``{"*.down_proj": {"bits": 8}}``.
"""

from __future__ import annotations

import fnmatch
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from easyquant.algorithm.chunking import weight_row_slices
from easyquant.algorithm.range_search import as_ranges, initial_scales, quantize_codes
from easyquant.config import QuantConfig
from easyquant.format.qweight import QuantizedWeight
from easyquant.nn.quant_linear import QuantLinear
from easyquant.quantize import check_weight, quantize_checked, storage_round

# A decoder-block module name: "model.layers.3.mlp.down_proj", "transformer.h.3.attn.c_proj", ...
DECODER_BLOCK = re.compile(r"(^|\.)(layers|h|blocks|block|decoder\.layers)\.\d+\.")
NEVER = ("*embed*", "*lm_head*", "*wte*", "*wpe*", "*norm*")


@dataclass(frozen=True)
class Selection:
    """Include/exclude globs over module names and per-module config overrides."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, Mapping[str, Any]], ...] = field(default_factory=tuple)

    @classmethod
    def build(
        cls,
        include: Iterable[str] | None = None,
        exclude: Iterable[str] | None = None,
        overrides: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Selection:
        return cls(tuple(include or ()), tuple(exclude or ()), tuple((overrides or {}).items()))

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> Selection:
        """This selection with ``overrides`` after its own (so its own win where both match),
        e.g. a preset's: ``selection.with_overrides(preset_overrides("quality", config))``."""
        own = {pattern for pattern, _ in self.overrides}
        extra = tuple((p, changes) for p, changes in overrides.items() if p not in own)
        return Selection(self.include, self.exclude, (*self.overrides, *extra))

    def wants(self, module_name: str, shape: tuple[int, ...]) -> bool:
        """Is the weight of ``module_name`` (a Linear-like 2-D weight) quantized?"""
        if len(shape) != 2:
            return False
        if any(fnmatch.fnmatchcase(module_name, p) for p in self.exclude):
            return False
        if self.include:
            return any(fnmatch.fnmatchcase(module_name, p) for p in self.include)
        if any(fnmatch.fnmatchcase(module_name, p) for p in NEVER):
            return False
        return bool(DECODER_BLOCK.search(module_name))

    def config_for(self, module_name: str, base: QuantConfig) -> QuantConfig:
        for pattern, changes in self.overrides:
            if fnmatch.fnmatchcase(module_name, pattern):
                return base.replace(**dict(changes))
        return base

    def check(self, base: QuantConfig) -> None:
        """Refuse overrides that name unknown config fields or give invalid values."""
        known = set(base.to_dict())
        for pattern, changes in self.overrides:
            unknown = sorted(set(changes) - known)
            if unknown:
                raise ValueError(
                    f"override {pattern!r} names unknown config field(s) {unknown}; "
                    f"allowed: {sorted(known)}"
                )
            try:
                base.replace(**dict(changes))
            except ValueError as exc:
                raise ValueError(f"override {pattern!r}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return {
            "include": list(self.include),
            "exclude": list(self.exclude),
            "overrides": {p: dict(c) for p, c in self.overrides},
        }


@dataclass
class TensorReport:
    """What quantizing one weight did (one row of ``quant_report.json``)."""

    name: str
    shape: tuple[int, int]
    bits: int
    group_size: int | None
    outlier_fraction: float
    bits_per_weight: float
    error: float  # ||W_q - W||^2 / ||W||^2 (relative squared reconstruction error)
    rtn_error: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "shape": list(self.shape)}


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    exact = exact.float()
    denom = float(exact.pow(2).sum()) or 1.0
    return float((approx.float() - exact).pow(2).sum()) / denom


def report_errors(
    weight: torch.Tensor, qweight: QuantizedWeight | None, config: QuantConfig
) -> tuple[float, float]:
    """``(error, rtn_error)``: ``||W_q - W||^2 / ||W||^2`` of ``qweight`` (nan when None) and of
    plain RTN at ``config``'s bits, groups and scale dtype.

    A chunk of rows at a time (sums in float64), with no float32 copy of the whole weight: the
    stored form is dequantized a chunk at a time, and RTN's reconstruction (what
    ``quantize_tensor(weight, config.replace(method="rtn", outlier_sigma=None)).dequantize()``
    gives, value for value) is computed directly, without quantizing the weight again.
    """
    in_f = weight.shape[1]
    group = config.group_size or in_f
    zero = torch.zeros((), dtype=torch.float64, device=weight.device)
    norm, error, rtn = zero, zero, zero
    for rows in weight_row_slices(weight):
        x = weight[rows].float()
        norm = norm + x.pow(2).sum(dtype=torch.float64)
        if qweight is not None:
            approx = qweight.dequantize_rows(rows, torch.float32).to(x.device)
            error = error + approx.sub_(x).pow_(2).sum(dtype=torch.float64)
            del approx
        approx = rtn_reconstruction(as_ranges(x, group), config).reshape(len(x), -1)[:, :in_f]
        rtn = rtn + approx.sub_(x).pow_(2).sum(dtype=torch.float64)
        del x, approx
    denom = float(norm) or 1.0
    return (float(error) / denom if qweight is not None else math.nan), float(rtn) / denom


def rtn_reconstruction(ranges: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """RTN's dequantized values of float32 ``ranges`` ``[rows, group]``: max-abs scale rounded to
    the storage dtype, codes ``clamp(floor(x / s + 1/2))`` (with 1 for a zero scale), codes times
    the stored scale; as quantize_tensor and dequantize compute them."""
    scale = storage_round(initial_scales(ranges, config.qmax), config.scale_dtype)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return quantize_codes(ranges, safe, config.qmin, config.qmax).mul_(scale)


def quantize_with_report(
    name: str, weight: torch.Tensor, config: QuantConfig, backend: str = "auto"
) -> tuple[QuantizedWeight, TensorReport]:
    """Quantize one weight (refusing it with a message naming ``name``) and say how it went."""
    check_weight(weight, config, name=name)
    start = time.perf_counter()
    qweight = quantize_checked(weight, config, backend=backend)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    error, rtn = report_errors(weight, qweight, config)
    report = TensorReport(
        name=name,
        shape=qweight.shape,
        bits=config.bits,
        group_size=config.group_size,
        outlier_fraction=qweight.num_outliers / weight.numel(),
        bits_per_weight=qweight.bits_per_weight,
        error=error,
        rtn_error=rtn,
        seconds=seconds,
    )
    return qweight, report


def quantize_model_inplace(
    model: nn.Module,
    config: QuantConfig,
    selection: Selection | None = None,
    backend: str = "auto",
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
) -> list[TensorReport]:
    """Replace every selected ``nn.Linear`` of ``model`` by a :class:`QuantLinear`, in place."""
    selection = selection or Selection()
    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and selection.wants(name, tuple(module.weight.shape))
    ]
    reports = []
    for name, linear in progress(targets) if progress else targets:
        cfg = selection.config_for(name, config)
        weight = linear.weight.detach()
        qweight, report = quantize_with_report(f"{name}.weight", weight, cfg, backend)
        layer = QuantLinear(qweight, linear.bias.detach() if linear.bias is not None else None)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        reports.append(report)
    return reports
