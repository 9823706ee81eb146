"""Statistics checked against values computed by hand (working in the comments)."""
from __future__ import annotations

import math

import pytest

from selar_local.bench.stats import (
    accuracy_summary,
    mcnemar_exact,
    mean_over_seeds,
    paired_difference,
    wilson_interval,
)

# z for 95%: 1.959964, z^2 = 3.841459


def test_wilson_eight_of_ten_matches_hand_computation():
    # p = 0.8, n = 10. centre = (p + z^2/2n) / (1 + z^2/n) = 0.992073 / 1.384146 = 0.716741
    # half = z * sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n) = 1.959964 * 0.160011 / 1.384146 = 0.226578
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.716741 - 0.226578, abs=2e-6)  # 0.490162
    assert hi == pytest.approx(0.716741 + 0.226578, abs=2e-6)  # 0.943318


def test_wilson_extremes_stay_inside_unit_interval():
    # 0/10: lower bound exactly 0, upper = z^2/(n+z^2) = 3.841459/13.841459 = 0.277533
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(0.277533, abs=2e-6)
    lo, hi = wilson_interval(10, 10)
    assert (lo, hi) == (pytest.approx(1 - 0.277533, abs=2e-6), pytest.approx(1.0, abs=1e-12))


def test_wilson_narrows_with_confidence():
    lo90, hi90 = wilson_interval(8, 10, confidence=0.90)
    lo95, hi95 = wilson_interval(8, 10)
    assert lo95 < lo90 < 0.8 < hi90 < hi95


def test_wilson_with_no_trials_is_uninformative():
    assert wilson_interval(0, 0) == (0.0, 1.0)


@pytest.mark.parametrize("successes, n, confidence", [(11, 10, 0.95), (-1, 10, 0.95), (1, 10, 1.0)])
def test_wilson_rejects_invalid_input(successes, n, confidence):
    with pytest.raises(ValueError):
        wilson_interval(successes, n, confidence)


def test_accuracy_summary():
    summary = accuracy_summary([True] * 8 + [False] * 2)
    assert summary["mean"] == pytest.approx(0.8)
    assert summary["n"] == 10
    assert (summary["lo"], summary["hi"]) == pytest.approx(wilson_interval(8, 10))


def test_accuracy_summary_rejects_empty():
    with pytest.raises(ValueError):
        accuracy_summary([])


def _paired(both: int, method_only: int, baseline_only: int, neither: int):
    """Baseline and method results with the given 2x2 counts."""
    baseline = [True] * both + [False] * method_only + [True] * baseline_only + [False] * neither
    method = [True] * both + [True] * method_only + [False] * baseline_only + [False] * neither
    return baseline, method


def test_paired_difference_newcombe_example():
    # Newcombe (1998), Table II example (a): 36 both, 12 method only, 2 baseline only, 0 neither.
    # p_b = 48/50 = 0.96, Wilson (l1, u1) = (0.865400, 0.988962)
    # p_a = 38/50 = 0.76, Wilson (l2, u2) = (0.625872, 0.857026)
    # phi = (36*0 - 12*2) / sqrt(48*2*38*12) = -24 / 209.227 = -0.114708
    # delta   = sqrt(0.094600^2 + 2*0.114708*0.094600*0.097026 + 0.097026^2) = 0.143070
    # epsilon = sqrt(0.028962^2 + 2*0.114708*0.028962*0.134128 + 0.134128^2) = 0.140429
    # => 0.2 - 0.143070 = 0.0569, 0.2 + 0.140429 = 0.3404 (the published method-10 interval)
    baseline, method = _paired(36, 12, 2, 0)
    result = paired_difference(baseline, method)
    assert result["diff"] == pytest.approx(0.2)
    assert result["lo"] == pytest.approx(0.0569, abs=1e-4)
    assert result["hi"] == pytest.approx(0.3404, abs=1e-4)
    assert (result["b_only"], result["a_only"], result["n"]) == (12, 2, 50)


def test_paired_difference_is_method_minus_baseline():
    baseline, method = _paired(36, 12, 2, 0)
    forward = paired_difference(baseline, method)
    backward = paired_difference(method, baseline)
    assert backward["diff"] == pytest.approx(-forward["diff"])
    assert backward["lo"] == pytest.approx(-forward["hi"])
    assert backward["hi"] == pytest.approx(-forward["lo"])
    assert (backward["b_only"], backward["a_only"]) == (2, 12)


def test_paired_difference_of_identical_runs_collapses_to_zero():
    # No discordant pairs: phi = 1, so delta = |(p - l) - (u - p)|, which is 0 when the Wilson
    # interval is symmetric about p = 0.5. Method 10 then gives [0, 0], a known property.
    results = [True, False] * 20
    result = paired_difference(results, results)
    assert result["diff"] == 0.0
    assert result["lo"] == pytest.approx(0.0, abs=1e-12)
    assert result["hi"] == pytest.approx(0.0, abs=1e-12)
    assert result["b_only"] == result["a_only"] == 0


def test_paired_difference_with_discordant_pairs_straddles_zero():
    baseline, method = _paired(10, 3, 3, 4)
    result = paired_difference(baseline, method)
    assert result["diff"] == 0.0
    assert result["lo"] < -0.1 and result["hi"] > 0.1


def test_paired_difference_bounds_stay_in_range():
    baseline, method = _paired(0, 10, 0, 0)  # method solves everything, baseline nothing
    result = paired_difference(baseline, method)
    assert result["diff"] == 1.0
    assert 0.0 < result["lo"] < 1.0
    assert result["hi"] == pytest.approx(1.0)


def test_paired_difference_rejects_unpaired_input():
    with pytest.raises(ValueError):
        paired_difference([True, False], [True])
    with pytest.raises(ValueError):
        paired_difference([], [])


def test_mcnemar_exact_hand_values():
    # 0 vs 5 discordant: P = 2 * 0.5^5 = 0.0625
    assert mcnemar_exact(0, 5) == pytest.approx(0.0625)
    assert mcnemar_exact(5, 0) == pytest.approx(0.0625)
    # 2 vs 12: 2 * (C(14,0) + C(14,1) + C(14,2)) / 2^14 = 2 * 106 / 16384 = 0.012939453125
    assert mcnemar_exact(2, 12) == pytest.approx(0.012939453125)
    # 1 vs 1: both tails cover everything, p = 1
    assert mcnemar_exact(1, 1) == pytest.approx(1.0)


def test_mcnemar_exact_without_discordant_pairs():
    assert mcnemar_exact(0, 0) == 1.0


def test_mcnemar_exact_rejects_negative_counts():
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def test_mean_over_seeds_hand_example():
    # seed 0 solves p1, p2 (2/3); seed 1 solves p1 (1/3). mean 0.5,
    # sample std = sqrt(((2/3-1/2)^2 + (1/3-1/2)^2) / 1) = sqrt(2/36) = 0.235702
    triples = [
        ("p1", 0, True), ("p2", 0, True), ("p3", 0, False),
        ("p1", 1, True), ("p2", 1, False), ("p3", 1, False),
    ]
    result = mean_over_seeds(triples)
    assert result["per_seed"] == {0: pytest.approx(2 / 3), 1: pytest.approx(1 / 3)}
    assert result["mean"] == pytest.approx(0.5)
    assert result["std"] == pytest.approx(math.sqrt(2 / 36))
    assert (result["n_seeds"], result["n_problems"]) == (2, 3)
    # The mapping form gives the same answer.
    as_mapping = {(problem, seed): ok for problem, seed, ok in triples}
    assert mean_over_seeds(as_mapping) == result


def test_mean_over_seeds_single_seed_has_zero_spread():
    result = mean_over_seeds([("p1", 7, True), ("p2", 7, False)])
    assert result["mean"] == pytest.approx(0.5)
    assert result["std"] == 0.0


def test_mean_over_seeds_rejects_mismatched_problem_sets():
    with pytest.raises(ValueError, match="different problems"):
        mean_over_seeds([("p1", 0, True), ("p2", 0, True), ("p1", 1, True)])


def test_mean_over_seeds_rejects_duplicates_and_empty_input():
    with pytest.raises(ValueError, match="twice"):
        mean_over_seeds([("p1", 0, True), ("p1", 0, False)])
    with pytest.raises(ValueError):
        mean_over_seeds([])
