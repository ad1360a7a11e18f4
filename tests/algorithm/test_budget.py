"""The bits-per-weight allocation against brute force on small random instances."""

import itertools
import math
import random

import pytest

from easyquant.algorithm.budget import Candidate, TensorChoices, allocate, lower_hull


def brute_force(tensors, target):
    """The least numel-weighted mean error within the budget, over every combination."""
    total = sum(t.numel for t in tensors)
    best = None
    for choices in itertools.product(*(range(len(t.candidates)) for t in tensors)):
        picked = [t.candidates[c] for t, c in zip(tensors, choices, strict=True)]
        bits = math.fsum(t.numel * c.bits_per_weight for t, c in zip(tensors, picked, strict=True))
        if bits / total > target:
            continue
        error = math.fsum(t.numel * c.error for t, c in zip(tensors, picked, strict=True)) / total
        best = error if best is None else min(best, error)
    return best


def random_instance(rng, tensors, candidates, quantization_like):
    """Random tensors; ``quantization_like``: errors fall roughly exponentially with the bits
    (noisy, so some candidates are dominated and hulls are not trivial), else anything goes."""
    out = []
    for _ in range(tensors):
        k = rng.randint(1, candidates)
        numel = rng.choice([64, 256, 1000, 4096, 12288])
        if quantization_like:
            bits = sorted(rng.uniform(4.0, 5.0) for _ in range(k))
            cands = [
                Candidate(b, rng.uniform(0.6, 1.4) * math.exp(-1.4 * b), j)
                for j, b in enumerate(bits)
            ]
        else:
            cands = [Candidate(rng.uniform(2, 6), rng.uniform(0, 1), j) for j in range(k)]
        out.append(TensorChoices(numel, cands))
    return out


def bpw_range(tensors):
    total = sum(t.numel for t in tensors)
    low = sum(t.numel * min(c.bits_per_weight for c in t.candidates) for t in tensors) / total
    high = sum(t.numel * max(c.bits_per_weight for c in t.candidates) for t in tensors) / total
    return low, high


def chosen_totals(tensors, allocation):
    total = sum(t.numel for t in tensors)
    picked = [t.candidates[c] for t, c in zip(tensors, allocation.choices, strict=True)]
    bits = math.fsum(t.numel * c.bits_per_weight for t, c in zip(tensors, picked, strict=True))
    error = math.fsum(t.numel * c.error for t, c in zip(tensors, picked, strict=True))
    return bits / total, error / total


@pytest.mark.parametrize("quantization_like", [False, True])
def test_budget_respected_bound_certified_and_mostly_optimal(quantization_like):
    rng = random.Random(1234 + quantization_like)
    optimal = 0
    runs = 300
    for _ in range(runs):
        tensors = random_instance(rng, rng.randint(1, 5), 6, quantization_like)
        low, high = bpw_range(tensors)
        target = rng.uniform(low, high)
        allocation = allocate(tensors, target)
        best = brute_force(tensors, target)
        bpw, error = chosen_totals(tensors, allocation)
        # The reported totals are the chosen candidates', and within the budget.
        assert bpw == pytest.approx(allocation.bits_per_weight, rel=1e-12)
        assert error == pytest.approx(allocation.error, rel=1e-12, abs=1e-15)
        assert allocation.bits_per_weight <= target
        # Never better than the optimum (it is feasible); the dual bound is a true lower bound.
        assert allocation.error >= best - 1e-12
        assert allocation.lower_bound <= best + 1e-12
        optimal += allocation.error <= best + 1e-12
    # Lagrangian + greedy fill + exchanges is a heuristic for an NP-hard problem: optimal on
    # nearly every small instance (measured: 299/300 and 294/300 with these seeds).
    assert optimal >= 0.95 * runs


def test_exactly_optimal_when_the_budget_is_a_lagrangian_solution():
    """At a budget that a Lagrangian solution meets exactly, that solution is optimal."""
    rng = random.Random(7)
    for _ in range(100):
        tensors = random_instance(rng, rng.randint(2, 5), 6, True)
        total = sum(t.numel for t in tensors)
        lam = rng.uniform(0.0, 0.05)
        choices = [
            min(
                range(len(t.candidates)),
                key=lambda i, t=t: (
                    t.candidates[i].error + lam * t.candidates[i].bits_per_weight,
                    t.candidates[i].bits_per_weight,
                ),
            )
            for t in tensors
        ]
        bits = math.fsum(
            t.numel * t.candidates[c].bits_per_weight for t, c in zip(tensors, choices, strict=True)
        )
        target = bits / total * (1 + 1e-9)
        allocation = allocate(tensors, target)
        assert allocation.error == pytest.approx(brute_force(tensors, target), rel=1e-12, abs=1e-15)


def test_larger_instances_are_near_optimal():
    """Seven tensors of up to four candidates (up to 16,384 combinations), two of them large:
    a few percent from the optimum at worst (measured: 19 of 20 optimal, the other 2.05% off,
    where the optimum reshuffles five tensors at once)."""
    rng = random.Random(3)
    gaps = []
    for _ in range(20):
        tensors = random_instance(rng, 7, 4, True)
        low, high = bpw_range(tensors)
        target = rng.uniform(low, high)
        allocation = allocate(tensors, target)
        best = brute_force(tensors, target)
        assert allocation.bits_per_weight <= target
        assert allocation.lower_bound <= best <= allocation.error
        gaps.append(allocation.error / best - 1)
    assert max(gaps) < 0.05 and sum(gaps) / len(gaps) < 0.005


def test_unconstrained_budget_takes_every_least_error_candidate():
    tensors = [
        TensorChoices(10, [Candidate(4.0, 0.3), Candidate(5.0, 0.1), Candidate(6.0, 0.1)]),
        TensorChoices(20, [Candidate(4.5, 0.2), Candidate(4.1, 0.5)]),
    ]
    allocation = allocate(tensors, 10.0)
    assert allocation.choices == (1, 0)  # the cheaper of two equal errors
    assert allocation.lam == 0.0
    assert allocation.error == allocation.lower_bound


def test_large_tensor_step_paid_for_by_small_ones():
    """The Lagrangian solution upgrades the small tensor (the steeper slope: 0.03 error per bit
    against 0.02), after which the large tensor's 500-bit step no longer fits the slack; an
    exchange (large up, small down) removes 10 units of error instead of 3."""
    tensors = [
        TensorChoices(100, [Candidate(4.0, 0.05), Candidate(5.0, 0.02)]),
        TensorChoices(1000, [Candidate(4.0, 0.05), Candidate(4.5, 0.04)]),
    ]
    target = (4.0 * 1100 + 550) / 1100  # 550 bits above the cheapest: one upgrade, not both
    allocation = allocate(tensors, target)
    assert allocation.choices == (0, 1)
    assert allocation.error == pytest.approx(brute_force(tensors, target))
    assert allocation.lam == pytest.approx(0.02)  # just above B's slope: A alone at first


def test_lower_hull_keeps_the_convex_frontier():
    cands = [
        Candidate(4.0, 1.0),
        Candidate(4.5, 0.9),  # above the segment (4, 1) - (5, 0.5): not on the hull
        Candidate(5.0, 0.5),
        Candidate(5.5, 0.6),  # dominated
        Candidate(6.0, 0.4),
        Candidate(3.9, 1.0),  # cheaper with the same error: replaces (4.0, 1.0)
    ]
    assert lower_hull(cands) == [5, 2, 4]


def test_infeasible_budget_says_the_minimum():
    tensors = [
        TensorChoices(100, [Candidate(4.07, 0.1), Candidate(4.5, 0.05)]),
        TensorChoices(300, [Candidate(4.13, 0.1)]),
    ]
    with pytest.raises(ValueError, match=r"cannot be met: the lowest achievable is 4\.1150"):
        allocate(tensors, 4.0)
    assert allocate(tensors, 4.115).choices == (0, 0)  # exactly the minimum is feasible


@pytest.mark.parametrize(
    "target, tensors, message",
    [
        (float("nan"), [TensorChoices(1, [Candidate(4, 0)])], "finite number"),
        (0, [TensorChoices(1, [Candidate(4, 0)])], "finite number > 0"),
        (4.0, [], "no tensors"),
        (4.0, [TensorChoices(0, [Candidate(4, 0)])], "numel"),
        (4.0, [TensorChoices(1, [])], "no candidates"),
        (4.0, [TensorChoices(1, [Candidate(4, float("inf"))])], "finite bits_per_weight"),
    ],
)
def test_bad_inputs_are_refused(target, tensors, message):
    with pytest.raises(ValueError, match=message):
        allocate(tensors, target)
