"""Accuracy statistics for benchmark runs: intervals, paired comparisons, seed aggregation.

Orientation of every paired function: ``a`` is the baseline, ``b`` the method, and differences
are **method minus baseline** (positive = the method solves more problems).
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0 (nothing known)."""
    _check_confidence(confidence)
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    ci = scipy_stats.binomtest(int(successes), int(n)).proportion_ci(
        confidence_level=confidence, method="wilson"
    )
    return float(ci.low), float(ci.high)


def accuracy_summary(correct: Sequence[bool], confidence: float = 0.95) -> dict[str, float]:
    """Mean accuracy with its Wilson interval: {"mean", "lo", "hi", "n"}."""
    n = len(correct)
    if n == 0:
        raise ValueError("accuracy_summary needs at least one graded problem")
    successes = int(sum(bool(c) for c in correct))
    lo, hi = wilson_interval(successes, n, confidence)
    return {"mean": successes / n, "lo": lo, "hi": hi, "n": n}


def _paired_counts(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int, int, int]:
    """(both right, b only, a only, both wrong) for baseline a and method b."""
    if len(a) != len(b):
        raise ValueError(f"paired results differ in length: {len(a)} vs {len(b)}")
    a_arr = np.asarray(a, dtype=bool)
    b_arr = np.asarray(b, dtype=bool)
    both = int(np.sum(a_arr & b_arr))
    b_only = int(np.sum(b_arr & ~a_arr))
    a_only = int(np.sum(a_arr & ~b_arr))
    neither = int(np.sum(~a_arr & ~b_arr))
    return both, b_only, a_only, neither


def _phi(both: int, b_only: int, a_only: int, neither: int) -> float:
    """Correlation of the paired outcomes (Newcombe's phi-hat); 0 when a margin is empty."""
    denominator = (both + b_only) * (a_only + neither) * (both + a_only) * (b_only + neither)
    if denominator == 0:
        return 0.0
    return (both * neither - b_only * a_only) / math.sqrt(denominator)


def paired_difference(
    a: Sequence[bool], b: Sequence[bool], confidence: float = 0.95
) -> dict[str, float]:
    """Accuracy of method ``b`` minus baseline ``a`` on the same problems, with a CI.

    The interval is Newcombe's hybrid score interval for paired proportions without
    continuity correction (method 10 of Newcombe, Stat. Med. 1998;17:2635-50): Wilson intervals
    (l1, u1) for p_b and (l2, u2) for p_a are combined, allowing for their correlation phi:

        lo = d - sqrt((p_b - l1)^2 - 2 phi (p_b - l1)(u2 - p_a) + (u2 - p_a)^2)
        hi = d + sqrt((u1 - p_b)^2 - 2 phi (u1 - p_b)(p_a - l2) + (p_a - l2)^2)

    With no discordant pairs (phi = 1) the interval is very narrow, [0, 0] at p = 0.5: a known
    property of this method; read it together with b_only / a_only.

    Returns {"diff", "lo", "hi", "b_only", "a_only", "n"}; b_only counts problems only the
    method solved, a_only those only the baseline solved.
    """
    _check_confidence(confidence)
    both, b_only, a_only, neither = _paired_counts(a, b)
    n = both + b_only + a_only + neither
    if n == 0:
        raise ValueError("paired_difference needs at least one paired problem")
    p_b, p_a = (both + b_only) / n, (both + a_only) / n
    l1, u1 = wilson_interval(both + b_only, n, confidence)
    l2, u2 = wilson_interval(both + a_only, n, confidence)
    phi = _phi(both, b_only, a_only, neither)
    diff = p_b - p_a
    # max(0, .) guards against tiny negative radicands from rounding.
    delta = math.sqrt(max(0.0, (p_b - l1) ** 2 - 2 * phi * (p_b - l1) * (u2 - p_a) + (u2 - p_a) ** 2))
    epsilon = math.sqrt(max(0.0, (u1 - p_b) ** 2 - 2 * phi * (u1 - p_b) * (p_a - l2) + (p_a - l2) ** 2))
    return {
        "diff": diff,
        "lo": max(-1.0, diff - delta),
        "hi": min(1.0, diff + epsilon),
        "b_only": b_only,
        "a_only": a_only,
        "n": n,
    }


def mcnemar_exact(n01: int, n10: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (binomial test, p = 1/2).

    n01 and n10 are the problems solved by only one of the two systems (either orientation;
    the test is symmetric). 1.0 when there are no discordant pairs.
    """
    if n01 < 0 or n10 < 0:
        raise ValueError(f"counts must be >= 0, got {n01}, {n10}")
    discordant = n01 + n10
    if discordant == 0:
        return 1.0
    return float(scipy_stats.binomtest(int(n01), int(discordant), 0.5).pvalue)


SeedResults = Mapping[tuple[Hashable, Hashable], bool] | Iterable[tuple[Hashable, Hashable, bool]]


def _results_by_seed(results: SeedResults) -> dict[Hashable, dict[Hashable, bool]]:
    triples = (
        ((problem, seed, ok) for (problem, seed), ok in results.items())
        if isinstance(results, Mapping)
        else results
    )
    by_seed: dict[Hashable, dict[Hashable, bool]] = defaultdict(dict)
    for problem, seed, ok in triples:
        if problem in by_seed[seed]:
            raise ValueError(f"problem {problem!r} graded twice for seed {seed!r}")
        by_seed[seed][problem] = bool(ok)
    return by_seed


def mean_over_seeds(results: SeedResults) -> dict[str, object]:
    """Per-seed accuracies and their mean and spread.

    ``results`` holds one graded result per (problem, seed): either a mapping
    ``{(problem_id, seed): correct}`` or an iterable of ``(problem_id, seed, correct)``.
    Every seed must cover the same problems, or the accuracies are not comparable.

    Returns {"per_seed": {seed: accuracy}, "mean", "std", "n_seeds", "n_problems"}; ``std`` is
    the sample standard deviation across seeds (ddof=1), 0.0 with a single seed.
    """
    by_seed = _results_by_seed(results)
    if not by_seed:
        raise ValueError("mean_over_seeds needs at least one result")
    problem_sets = {seed: frozenset(graded) for seed, graded in by_seed.items()}
    first_seed, reference = next(iter(problem_sets.items()))
    for seed, problems in problem_sets.items():
        if problems != reference:
            raise ValueError(
                f"seeds {first_seed!r} and {seed!r} cover different problems "
                f"({len(reference)} vs {len(problems)}); grade the same set for every seed"
            )
    per_seed = {seed: sum(graded.values()) / len(graded) for seed, graded in by_seed.items()}
    accuracies = np.array(list(per_seed.values()), dtype=float)
    std = float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else 0.0
    return {
        "per_seed": per_seed,
        "mean": float(np.mean(accuracies)),
        "std": std,
        "n_seeds": len(per_seed),
        "n_problems": len(reference),
    }
