"""A bits-per-weight budget: one candidate per tensor, the least total error within the budget.

Each tensor ``i`` (``n_i`` weights) offers candidates ``c`` with a cost in bits per weight
``b_i(c)`` and an error ``e_i(c)``. We choose one candidate per tensor to

    minimise  sum_i n_i e_i(c_i)   subject to   sum_i n_i b_i(c_i) <= target * sum_i n_i,

a multiple-choice knapsack (NP-hard in general). :func:`allocate` solves its Lagrangian
relaxation, then spends the leftover bits greedily:

1. Per tensor, only the lower convex hull of its (bits, error) points can minimise
   ``e + lam * b`` (``n_i`` multiplies both terms, so every tensor sees the same ``lam``, an
   error-per-bit exchange rate). ``lam`` is bisected to the smallest value whose choices fit the
   budget: that allocation is optimal for the bits it uses.
2. Greedy fill: while some change of one tensor's candidate (any candidate, hull or not) lowers
   the error and still fits, take the one with the most error removed per bit added.
3. Exchanges: while an upgrade of one tensor paid for by a downgrade of another lowers the
   error within the budget, take the best such pair, then fill again (what the greedy fill
   cannot do when a large tensor's next step costs more than the slack).

The result's ``lower_bound`` is the Lagrangian dual value, a certificate: no allocation within
the budget has a lower error, and ``error - lower_bound`` bounds the distance to the optimum
(at most ``lam`` times the bits step 1 left unused, per weight).
Pure Python over floats; no model or tensor knowledge.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

BISECTION_STEPS = 200
BUDGET_MARGIN = 1e-12


@dataclass(frozen=True)
class Candidate:
    """One way to store a tensor: its cost in bits per weight and its error (any unit, >= 0)."""

    bits_per_weight: float
    error: float
    key: Hashable = None  # the caller's name for it (a config, an index, ...)


@dataclass(frozen=True)
class TensorChoices:
    """A tensor of ``numel`` weights and its candidates (at least one)."""

    numel: int
    candidates: Sequence[Candidate]


@dataclass(frozen=True)
class Allocation:
    """The chosen candidate of every tensor (indices into its ``candidates``) and the totals.

    ``bits_per_weight`` and ``error`` are averages weighted by ``numel``; ``lower_bound`` is a
    lower bound on the error of any allocation within the budget (see the module docstring);
    ``lam`` the Lagrange multiplier (error per bit) of step 1.
    """

    choices: tuple[int, ...]
    bits_per_weight: float
    error: float
    lower_bound: float
    lam: float
    target_bpw: float


def lower_hull(candidates: Sequence[Candidate]) -> list[int]:
    """Indices of the candidates on the lower convex hull of (bits, error), by increasing bits
    (so with strictly decreasing error): the only ones that minimise ``error + lam * bits`` for
    some ``lam >= 0`` (ties: the cheaper)."""
    order = sorted(
        range(len(candidates)),
        key=lambda i: (candidates[i].bits_per_weight, candidates[i].error, i),
    )
    hull: list[int] = []
    for i in order:
        b, e = candidates[i].bits_per_weight, candidates[i].error
        if hull and e >= candidates[hull[-1]].error:
            continue  # dominated: no fewer bits and no lower error than a kept one
        while len(hull) >= 2:
            b1, e1 = candidates[hull[-2]].bits_per_weight, candidates[hull[-2]].error
            b2, e2 = candidates[hull[-1]].bits_per_weight, candidates[hull[-1]].error
            # hull[-1] is kept only if strictly below the segment from hull[-2] to i.
            if (e2 - e1) * (b - b1) < (e - e1) * (b2 - b1):
                break
            hull.pop()
        hull.append(i)
    return hull


def check(tensors: Sequence[TensorChoices], target_bpw: float) -> None:
    if (
        isinstance(target_bpw, bool)
        or not isinstance(target_bpw, (int, float))
        or not math.isfinite(target_bpw)
        or target_bpw <= 0
    ):
        raise ValueError(
            f"the bits-per-weight target must be a finite number > 0, got {target_bpw!r}"
        )
    if not tensors:
        raise ValueError("no tensors to allocate bits to")
    for t, tensor in enumerate(tensors):
        if isinstance(tensor.numel, bool) or not isinstance(tensor.numel, int) or tensor.numel < 1:
            raise ValueError(f"tensor {t}: numel must be an int >= 1, got {tensor.numel!r}")
        if not tensor.candidates:
            raise ValueError(f"tensor {t} has no candidates")
        for c in tensor.candidates:
            if not (
                math.isfinite(c.bits_per_weight)
                and c.bits_per_weight >= 0
                and math.isfinite(c.error)
                and c.error >= 0
            ):
                raise ValueError(
                    f"tensor {t}: candidate {c.key!r} needs finite bits_per_weight and error "
                    f">= 0, got {c.bits_per_weight!r} and {c.error!r}"
                )


def allocate(tensors: Sequence[TensorChoices], target_bpw: float) -> Allocation:
    """One candidate per tensor, least ``sum numel * error`` with ``sum numel * bits_per_weight
    <= target_bpw * sum numel``; see the module docstring. Deterministic.

    Raises ValueError when even the cheapest candidate of every tensor exceeds the budget (the
    message gives the lowest achievable average bits per weight).
    """
    check(tensors, target_bpw)
    numel = [t.numel for t in tensors]
    total = sum(numel)

    def bits_of(choices: Sequence[int]) -> float:
        return math.fsum(
            n * t.candidates[c].bits_per_weight
            for n, t, c in zip(numel, tensors, choices, strict=True)
        )

    def error_of(choices: Sequence[int]) -> float:
        return math.fsum(
            n * t.candidates[c].error for n, t, c in zip(numel, tensors, choices, strict=True)
        )

    hulls = [lower_hull(t.candidates) for t in tensors]
    cheapest = [h[0] for h in hulls]  # fewest bits, then lowest error
    least = bits_of(cheapest)
    if least / total > target_bpw:
        raise ValueError(
            f"a budget of {target_bpw:g} bits/weight cannot be met: the lowest achievable is "
            f"{least / total:.4f} (every tensor at its cheapest candidate)"
        )
    # A hair under the target (1e-12 relative), so that averages summed in any order stay within
    # it; but never under the cheapest allocation, when that meets the target.
    budget = max(target_bpw * total * (1 - BUDGET_MARGIN), least)

    def solve(lam: float) -> list[int]:
        """Each tensor's hull point minimising error + lam * bits (ties: the cheaper)."""
        choices = []
        for t, hull in zip(tensors, hulls, strict=True):
            best = hull[0]
            for i in hull[1:]:
                c, b = t.candidates[i], t.candidates[best]
                if c.error + lam * c.bits_per_weight < b.error + lam * b.bits_per_weight:
                    best = i
            choices.append(best)
        return choices

    def dual(lam: float) -> float:
        """The Lagrangian dual value: a lower bound on any feasible total error."""
        choices = solve(lam)
        return error_of(choices) + lam * (bits_of(choices) - budget)

    lam = 0.0
    choices = solve(0.0)
    lower = error_of(choices)
    if bits_of(choices) > budget:
        # Above the steepest hull slope every tensor takes its cheapest point, which fits.
        slopes = [
            (t.candidates[a].error - t.candidates[b].error)
            / (t.candidates[b].bits_per_weight - t.candidates[a].bits_per_weight)
            for t, h in zip(tensors, hulls, strict=True)
            for a, b in itertools.pairwise(h)
        ]
        lo, hi = 0.0, 2.0 * max(slopes) + 1.0
        for _ in range(BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            if bits_of(solve(mid)) <= budget:
                hi = mid
            else:
                lo = mid
        lam = hi
        choices = solve(hi)
        lower = max(dual(lo), dual(hi))
    choices = greedy_fill(tensors, choices, budget, bits_of)
    while (exchanged := best_exchange(tensors, choices, budget, bits_of)) is not None:
        choices = greedy_fill(tensors, exchanged, budget, bits_of)
    return Allocation(
        choices=tuple(choices),
        bits_per_weight=bits_of(choices) / total,
        error=error_of(choices) / total,
        lower_bound=min(lower, error_of(choices)) / total,
        lam=lam,
        target_bpw=float(target_bpw),
    )


def greedy_fill(
    tensors: Sequence[TensorChoices],
    choices: Sequence[int],
    budget: float,
    bits_of: Callable[[Sequence[int]], float],
) -> list[int]:
    """Spend the bits left under ``budget``: repeatedly take the single-tensor change that lowers
    the error most per bit added among those that fit (changes that lower both come first),
    until none does. ``bits_of(choices)`` is the exact total, which every change must keep
    within the budget (the running slack is only a filter)."""
    choices = list(choices)
    slack = budget - bits_of(choices)
    refused: set[tuple[int, int]] = set()  # fits by the running slack, not by the exact total
    while True:
        best: tuple[float, float, int, int] | None = None  # (per bit, removed, tensor, candidate)
        for t, tensor in enumerate(tensors):
            now = tensor.candidates[choices[t]]
            for i, c in enumerate(tensor.candidates):
                removed = tensor.numel * (now.error - c.error)
                added = tensor.numel * (c.bits_per_weight - now.bits_per_weight)
                if removed <= 0 or added > slack or (t, i) in refused:
                    continue
                per_bit = removed / added if added > 0 else math.inf
                if best is None or (per_bit, removed) > best[:2]:
                    best = (per_bit, removed, t, i)
        if best is None:
            return choices
        _, _, t, i = best
        trial = [*choices[:t], i, *choices[t + 1 :]]
        if bits_of(trial) > budget:
            refused.add((t, i))
            continue
        choices = trial
        slack = budget - bits_of(choices)


def best_exchange(
    tensors: Sequence[TensorChoices],
    choices: Sequence[int],
    budget: float,
    bits_of: Callable[[Sequence[int]], float],
) -> list[int] | None:
    """The best pair of changes, an upgrade of one tensor paid for by a downgrade of another,
    that lowers the total error within the budget (None if there is none): what the greedy fill
    cannot do, as when a large tensor's next step costs more than the slack."""
    slack = budget - bits_of(choices)
    ups: list[tuple[float, float, int, int]] = []  # (bits needed beyond the slack, gain, t, i)
    downs: list[tuple[float, float, int, int]] = []  # (bits freed, error added, t, i)
    for t, tensor in enumerate(tensors):
        now = tensor.candidates[choices[t]]
        for i, c in enumerate(tensor.candidates):
            added = tensor.numel * (c.bits_per_weight - now.bits_per_weight)
            removed = tensor.numel * (now.error - c.error)
            if added > 0 and removed > 0:
                ups.append((added - slack, removed, t, i))
            elif added < 0 and removed <= 0:
                downs.append((-added, -removed, t, i))
    if not ups or not downs:
        return None
    downs.sort()
    # From each position on (more bits freed): the two cheapest downgrades of distinct tensors.
    cheapest: list[list[tuple[float, int, int]]] = [[] for _ in range(len(downs) + 1)]
    for k in range(len(downs) - 1, -1, -1):
        _, cost, t, i = downs[k]
        merged = sorted([*cheapest[k + 1], (cost, t, i)])
        cheapest[k] = [merged[0], *(m for m in merged[1:] if m[1] != merged[0][1])][:2]
    freed = [d[0] for d in downs]
    best: tuple[float, int, int, int, int] | None = None
    for need, gain, t, i in ups:
        for cost, u, j in cheapest[bisect.bisect_left(freed, need)]:
            if u != t:
                if cost < gain and (best is None or gain - cost > best[0]):
                    best = (gain - cost, t, i, u, j)
                break
    if best is None:
        return None
    _, t, i, u, j = best
    trial = list(choices)
    trial[t], trial[u] = i, j
    return trial if bits_of(trial) <= budget else None
