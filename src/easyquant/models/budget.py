"""A bits-per-weight budget for a whole model: the outlier sigma and group size of every weight.

``plan_budget(model, config, target_bpw=4.25)`` returns a :class:`BudgetSelection`: a
:class:`~easyquant.models.select.Selection` whose per-module overrides give each selected Linear
weight its own ``outlier_sigma`` and ``group_size``, chosen to minimise the total reconstruction
error ``sum_i numel_i * ||W_i,q - W_i||^2 / ||W_i||^2`` with the average bits per weight
(weighted by parameter count, every stored bit counted as ``QuantizedWeight.bits_per_weight``
does) at most ``target_bpw``. Data-free. ``quantize_model(..., target_bpw=4.25)`` and
``easyquant quantize --target-bpw 4.25`` plan it first, then quantize with it. For several
targets from one pass: ``model_candidates(model, config).choose(target)``.

The plan is a first pass over the selected weights, one at a time (read, evaluate, drop: peak
memory is one tensor and its temporaries). For each weight and each candidate (``SIGMAS`` x
``GROUPS``: groups shorter than the row, with a shorter last group where they do not divide
it; the rest of the config as given), the exact storage cost is computed from the outlier count
and the error is measured by quantizing with the config's method and a short range search
(``search_steps``, default 25, or the config's own steps if fewer). Vectorised over sigma: the
outlier masks of successive sigmas differ in few ranges (channels or groups), and only those
ranges are searched again. Then
:func:`easyquant.algorithm.budget.allocate` picks one candidate per weight; the real
quantization uses the full config (all its steps) through the overrides.
"""

from __future__ import annotations

import collections
import math
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from easyquant.algorithm.budget import Candidate, TensorChoices, allocate
from easyquant.algorithm.outliers import outlier_mask, zeroed_float
from easyquant.algorithm.range_search import as_ranges
from easyquant.config import QuantConfig
from easyquant.format.bitpack import packed_length
from easyquant.format.outlier_store import choose_layout, mask_block_counts
from easyquant.format.qweight import code_values, nearest_codes, num_groups
from easyquant.models.select import Selection
from easyquant.models.sources import Source, open_source
from easyquant.quantize import check_weight, resolve_backend, stored_ranges

if TYPE_CHECKING:
    from easyquant.models.distributed import World

SIGMAS: tuple[float | None, ...] = (None, 4.0, 3.5, 3.0, 2.75, 2.5, 2.25, 2.0)
GROUPS: tuple[int | None, ...] = (None, 128, 64, 32)
SEARCH_STEPS = 25
MIN_TARGET_BPW = 2.0  # the fewest bits a weight can have (2-bit codes, nothing else)
# Ranges evaluated at a time (values): bounds the temporaries of a large weight.
CPU_CHUNK = 1 << 22
CUDA_CHUNK = 1 << 26
CHOSEN_FIELDS = ("outlier_sigma", "group_size")


@dataclass(frozen=True)
class BudgetSelection(Selection):
    """A Selection with one override per quantized module (its sigma and group size) and, in
    ``budget``, how they were chosen (written to quant_report.json; not part of config.json)."""

    budget: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def configs(self, base: QuantConfig) -> dict[str, QuantConfig]:
        """Module -> its chosen config."""
        return {m: self.config_for(m, base) for m in self.budget.get("modules", ())}


def check_target(target_bpw: Any) -> float:
    """The target as a float, or a one-line ValueError."""
    if isinstance(target_bpw, str):
        try:
            target_bpw = float(target_bpw)
        except ValueError:
            raise ValueError(
                f"--target-bpw expects a number of bits per weight such as 4.25, got {target_bpw!r}"
            ) from None
    if (
        isinstance(target_bpw, bool)
        or not isinstance(target_bpw, (int, float))
        or not math.isfinite(target_bpw)
    ):
        raise ValueError(
            f"target_bpw must be a finite number of bits per weight, got {target_bpw!r}"
        )
    if target_bpw < MIN_TARGET_BPW:
        raise ValueError(
            f"target_bpw {target_bpw:g} is below {MIN_TARGET_BPW:g} bits per weight, the fewest "
            "any quantized weight can have"
        )
    return float(target_bpw)


def storage_bits(
    shape: tuple[int, int], config: QuantConfig, block_counts: torch.Tensor, dtype: torch.dtype
) -> int:
    """Every bit :class:`QuantizedWeight` stores for a ``dtype`` weight of ``shape`` quantized
    with ``config``, its outliers counted per row and block of 256 columns (``block_counts``,
    see ``mask_block_counts``): codes (row padding too), scales, outlier counts, columns and
    values."""
    out_f, in_f = shape
    groups = num_groups(in_f, config.group_size)
    value_dtype = getattr(torch, config.outlier_dtype) if config.outlier_dtype else dtype
    outliers = int(block_counts.sum())
    return (
        out_f * packed_length(in_f, config.bits) * 8
        + out_f * groups * torch.finfo(getattr(torch, config.scale_dtype)).bits
        + choose_layout(block_counts, in_f).bits(out_f, in_f, outliers)
        + outliers * value_dtype.itemsize * 8
    )


def candidate_groups(in_features: int, groups: Sequence[int | None]) -> list[int | None]:
    """The group sizes of ``groups`` shorter than the row (None: per channel, always). A size
    that does not divide the row leaves a shorter last group, as quantize_tensor does."""
    return [g for g in dict.fromkeys(groups) if g is None or g < in_features]


def sigma_order(sigmas: Sequence[float | None]) -> list[float | None]:
    """None first, then decreasing: each mask contains the previous one, so few ranges change."""
    unique = list(dict.fromkeys(sigmas))
    return [s for s in unique if s is None] + sorted(
        (s for s in unique if s is not None), reverse=True
    )


@torch.no_grad()
def evaluate_candidates(
    weight: torch.Tensor,
    config: QuantConfig,
    sigmas: Sequence[float | None] = SIGMAS,
    groups: Sequence[int | None] = GROUPS,
    search_steps: int = SEARCH_STEPS,
    backend: str = "auto",
) -> list[Candidate]:
    """Every (sigma, group) candidate of one weight: ``Candidate(bits_per_weight, error, key)``
    with ``key`` the config to quantize with (``config`` with that sigma and group), the exact
    bits per weight it stores and its relative error ``||W_q - W||^2 / ||W||^2`` after a search of
    ``min(config.steps, search_steps)`` steps (the config's method, init and refinement)."""
    out_f, in_f = weight.shape
    backend = resolve_backend(backend, weight.device)
    chunk = CUDA_CHUNK if weight.device.type == "cuda" else CPU_CHUNK
    weight = weight.contiguous()
    norm = sum(
        float(weight[i : i + max(1, chunk // in_f)].float().pow(2).sum(dtype=torch.float64))
        for i in range(0, out_f, max(1, chunk // in_f))
    )
    norm = norm or 1.0
    group_list = candidate_groups(in_f, groups)

    # The outlier mask depends on the group only with outlier_scope="group": one mask (and its
    # count and storage error) per sigma otherwise, shared by every group size.
    def mask_key(group: int | None) -> int | None:
        return group if config.outlier_scope == "group" else None

    previous: dict[int | None, torch.Tensor] = {}  # mask key -> the previous sigma's mask
    losses: dict[int | None, torch.Tensor] = {}  # group -> loss per range (float64)
    found: dict[tuple[float | None, int | None], Candidate] = {}
    # The weight as ranges depends on the group only (a copy where the group is ragged).
    ranges_of = {group: as_ranges(weight, group or in_f) for group in group_list}
    for sigma in sigma_order(sigmas):
        masks: dict[int | None, tuple[torch.Tensor, int, float]] = {}
        for group in group_list:
            final = config.replace(group_size=group, outlier_sigma=sigma)
            search = final.replace(steps=min(final.steps, search_steps))
            key = mask_key(group)
            if key not in masks:
                mask = outlier_mask(weight, sigma, final.outlier_scope, group)
                masks[key] = (mask, mask_block_counts(mask), outlier_error(weight, mask, final))
            mask, block_counts, stored_error = masks[key]
            length = group or in_f
            ranges, flags = ranges_of[group], as_ranges(mask, length)
            if group not in losses:
                losses[group] = range_losses(ranges, flags, search, backend, chunk)
            else:
                changed = as_ranges(mask != previous[key], length).any(dim=1)
                changed = changed.nonzero().squeeze(1)
                if changed.numel():
                    losses[group][changed] = range_losses(
                        ranges[changed], flags[changed], search, backend, chunk
                    )
            error = float(losses[group].sum()) + stored_error
            bits = storage_bits((out_f, in_f), final, block_counts, weight.dtype)
            found[sigma, group] = Candidate(bits / (out_f * in_f), error / norm, final)
        previous = {key: mask for key, (mask, _, _) in masks.items()}
        del masks
    return [found[s, g] for g in group_list for s in sigma_order(sigmas)]


def range_losses(
    ranges: torch.Tensor, outliers: torch.Tensor, config: QuantConfig, backend: str, chunk: int
) -> torch.Tensor:
    """``||Q[x] - x||^2`` (float64) of each range (row of ``ranges``, outliers excluded) as
    quantize_tensor stores it with ``config``: searched range rounded to the scale dtype, least-
    squares refinement if asked, and plain RTN's max-abs range where that is better. With int8
    outlier values, their error on that range's grid too (see ``outlier_codes``)."""
    per = max(1, chunk // ranges.shape[1])
    parts = []
    for i in range(0, ranges.shape[0], per):
        rows, flags = ranges[i : i + per], outliers[i : i + per]
        normals = zeroed_float(rows, flags)
        scale, loss = stored_ranges(rows, normals, config, backend)
        loss = loss.double()
        if config.outlier_dtype == "int8":
            loss += int8_outlier_error(rows, flags, scale, getattr(torch, config.scale_dtype))
        parts.append(loss)
        del normals
    return torch.cat(parts)


def int8_outlier_error(
    ranges: torch.Tensor, outliers: torch.Tensor, scale: torch.Tensor, scale_dtype: torch.dtype
) -> torch.Tensor:
    """Each range's squared error (float64) of its outliers stored as int8 multiples of its
    stored ``scale`` ``[rows, 1]`` (as ``outlier_codes`` / ``outlier_floats`` store them).
    Predicted: a weight whose outliers do not all fit in int8 stores 16-bit floats instead
    (``assemble``), which this does not foresee."""
    x = torch.where(outliers, ranges.float(), torch.zeros((), device=ranges.device))
    unit = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
    stored = code_values(nearest_codes(x, unit), unit, scale_dtype)
    return (stored - x).pow(2).sum(dim=1, dtype=torch.float64)


def outlier_error(weight: torch.Tensor, mask: torch.Tensor, config: QuantConfig) -> float:
    """Squared error of the outliers stored as floats (zero unless ``outlier_dtype`` rounds
    them; int8 codes depend on the ranges: ``range_losses`` counts them)."""
    if config.outlier_dtype in (None, "int8"):
        return 0.0
    if getattr(torch, config.outlier_dtype) == weight.dtype:
        return 0.0
    values = weight[mask]
    stored = values.to(getattr(torch, config.outlier_dtype)).float()
    return float((stored - values.float()).pow(2).sum(dtype=torch.float64))


def module_pattern(module: str) -> str:
    """An override pattern that matches exactly ``module`` (glob characters escaped)."""
    return re.sub(r"([*?\[])", r"[\1]", module)


def override_for(chosen: QuantConfig, base: QuantConfig) -> dict[str, Any]:
    """The override turning ``base`` into ``chosen``: always sigma and group, then any other
    field that differs (e.g. the bits of a user override)."""
    changes = {k: getattr(chosen, k) for k in CHOSEN_FIELDS}
    base_fields = base.to_dict()
    changes.update({k: v for k, v in chosen.to_dict().items() if v != base_fields[k]})
    return changes


@dataclass
class ModelCandidates:
    """Every candidate of every selected weight (the first pass), ready for any target."""

    config: QuantConfig
    selection: Selection
    modules: list[str]  # in source order
    tensors: list[TensorChoices]  # Candidate.key: the module's config for that candidate
    search_steps: int
    sigmas: list[float | None]
    groups: list[int | None]
    seconds: float

    def choose(
        self, target_bpw: float, log: Callable[[str], None] | None = None
    ) -> BudgetSelection:
        """The allocation for ``target_bpw`` as a Selection (see :func:`plan_budget`)."""
        target = check_target(target_bpw)
        try:
            allocation = allocate(self.tensors, target)
        except ValueError as exc:
            bits = sorted({t.candidates[0].key.bits for t in self.tensors})
            raise ValueError(f"{exc}; at bits={'/'.join(map(str, bits))}") from None
        chosen = {
            module: t.candidates[i].key
            for module, t, i in zip(self.modules, self.tensors, allocation.choices, strict=True)
        }
        counts = collections.Counter(
            f"sigma={c.outlier_sigma} group={c.group_size}" for c in chosen.values()
        )
        budget = {
            "target_bpw": target,
            "predicted_bits_per_weight": allocation.bits_per_weight,
            "predicted_error": allocation.error,
            "error_lower_bound": allocation.lower_bound,
            "search_steps": self.search_steps,
            "sigmas": self.sigmas,
            "groups": self.groups,
            "candidates": sum(len(t.candidates) for t in self.tensors),
            "candidate_seconds": self.seconds,
            "choices": dict(counts.most_common()),
            "modules": self.modules,
        }
        if log is not None:
            log(
                f"budget {target:g} bits/weight: {budget['candidates']} candidates of "
                f"{len(self.modules)} weights evaluated in {self.seconds:.1f} s; predicted "
                f"{allocation.bits_per_weight:.4f} bits/weight, error {allocation.error:.4g} "
                f"(lower bound {allocation.lower_bound:.4g})"
            )
        overrides = tuple(
            (module_pattern(m), override_for(c, self.config)) for m, c in chosen.items()
        )
        return BudgetSelection(
            self.selection.include,
            self.selection.exclude,
            (*overrides, *self.selection.overrides),
            budget=budget,
        )


def model_candidates(
    model_or_path: nn.Module | str | Path | Source,
    config: QuantConfig,
    *,
    selection: Selection | None = None,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    sigmas: Sequence[float | None] = SIGMAS,
    groups: Sequence[int | None] = GROUPS,
    search_steps: int = SEARCH_STEPS,
    progress: bool = False,
) -> ModelCandidates:
    """The first pass of :func:`plan_budget`: every weight read once (one at a time, on
    ``device``), its candidates evaluated, the weight dropped."""
    from easyquant.models.pipeline import plan

    selection = selection or Selection()
    fixed = [p for p, changes in selection.overrides if set(CHOSEN_FIELDS) & set(changes)]
    if fixed:
        raise ValueError(
            f"override {fixed[0]!r} sets outlier_sigma or group_size, which --target-bpw chooses "
            "per module; drop those fields from it"
        )
    if isinstance(search_steps, bool) or not isinstance(search_steps, int) or search_steps < 0:
        raise ValueError(f"search_steps must be an int >= 0, got {search_steps!r}")
    if not sigmas or not groups:
        raise ValueError("the budget needs at least one sigma and one group size")
    for sigma in sigmas:
        for group in groups:
            config.replace(outlier_sigma=sigma, group_size=group)  # refuses invalid values
    device = torch.device(device)
    started = time.perf_counter()
    source = (
        model_or_path
        if isinstance(model_or_path, Source)
        else open_source(model_or_path, tokenizer)
    )
    # Each module's config with per-channel ranges (the candidates bring their own groups).
    per_channel = plan(source, config.replace(group_size=None), selection)
    modules = [
        t.name.removesuffix(".weight")
        for t in source.tensors
        if t.name.endswith(".weight") and t.name.removesuffix(".weight") in per_channel
    ]
    tensors: list[TensorChoices] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(modules), unit="tensor", desc="budget", file=sys.stderr)
    for module in modules:
        name = f"{module}.weight"
        weight = source.load(name).to(device)
        check_weight(weight, per_channel[module], name=name)
        candidates = evaluate_candidates(
            weight, per_channel[module], sigmas, groups, search_steps, backend
        )
        tensors.append(TensorChoices(weight.numel(), candidates))
        del weight
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ModelCandidates(
        config=config,
        selection=selection,
        modules=modules,
        tensors=tensors,
        search_steps=search_steps,
        sigmas=list(sigmas),
        groups=list(groups),
        seconds=time.perf_counter() - started,
    )


def plan_budget(
    model_or_path: nn.Module | str | Path | Source,
    config: QuantConfig,
    target_bpw: float,
    *,
    selection: Selection | None = None,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    backend: str = "auto",
    sigmas: Sequence[float | None] = SIGMAS,
    groups: Sequence[int | None] = GROUPS,
    search_steps: int = SEARCH_STEPS,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> BudgetSelection:
    """The sigma and group size of every weight ``selection`` picks (default: the decoder's
    Linear weights) for the least total error within ``target_bpw`` bits per weight.

    ``model_or_path``: what :func:`~easyquant.models.quantize_model` takes (or an open Source).
    ``config`` gives everything else (bits, method, steps, dtypes...); ``selection``'s overrides
    may change other fields per module (e.g. ``bits``) but not ``outlier_sigma`` or
    ``group_size``, which the budget chooses. The result's overrides come first (one exact
    pattern per module), then ``selection``'s own. Pass it to ``quantize_model(selection=...)``
    or :func:`~easyquant.models.select.quantize_model_inplace`. For several targets, call
    :func:`model_candidates` once and ``.choose(target)`` for each.
    """
    check_target(target_bpw)
    candidates = model_candidates(
        model_or_path,
        config,
        selection=selection,
        tokenizer=tokenizer,
        device=device,
        backend=backend,
        sigmas=sigmas,
        groups=groups,
        search_steps=search_steps,
        progress=progress,
    )
    return candidates.choose(target_bpw, log)


def plan_budget_shared(world: World | None, compute: Callable[[], Selection]) -> Selection:
    """``compute()`` in one process; under torchrun rank 0 computes the plan and broadcasts it,
    so every rank quantizes with the same one (a failure on rank 0 fails every rank)."""
    if world is None:
        return compute()
    import torch.distributed as dist

    from easyquant.models.distributed import RankFailedError, describe

    own: Exception | None = None
    payload: list[Any] = [None]
    if world.is_main:
        try:
            payload = [compute()]
        except Exception as exc:
            own, payload = exc, [describe(exc)]
    dist.broadcast_object_list(payload, src=0)
    if own is not None:
        raise own
    if isinstance(payload[0], str):
        raise RankFailedError(f"rank 0 of {world.size} failed to plan the budget: {payload[0]}")
    return payload[0]
