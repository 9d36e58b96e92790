"""Tests for stats.py: seed figures, edge cases, and cross-checks against independent computations.

Each check recomputes the number another way than the module does (closed forms, hypergeometric
sums, statsmodels' Holm and power solver) on hundreds of seeded random cases.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from statistics import NormalDist

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import NormalIndPower
from statsmodels.stats.proportion import proportion_effectsize

from crystallized_safety.errors import CrystallizedSafetyError, StatsError
from crystallized_safety.stats import (
    ThresholdResult,
    bootstrap_diff_ci,
    fisher_exact,
    holm,
    min_n,
    power_ok,
    rate_summary,
    threshold,
    two_proportion_ztest,
    wilson_interval,
)

N_RANDOM = 300


def _random_counts(rng: np.random.Generator, max_n: int = 120) -> tuple[int, int]:
    n = int(rng.integers(1, max_n + 1))
    return int(rng.integers(0, n + 1)), n


def _assert_one_line_error(exc: pytest.ExceptionInfo, *names: str) -> None:
    message = str(exc.value)
    assert message and "\n" not in message
    for name in names:
        assert name in message


# --------------------------------------------------------------------------- independent references


def _wilson_closed_form(k: int, n: int, confidence: float) -> tuple[float, float]:
    z = NormalDist().inv_cdf(1 - (1 - confidence) / 2)
    p = k / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return center - half, center + half


def _fisher_hypergeometric(k1: int, n1: int, k2: int, n2: int, alternative: str) -> float:
    """P-value from the hypergeometric law of the top-left cell given the table's margins."""
    total, successes = n1 + n2, k1 + k2
    support = range(max(0, successes - n2), min(successes, n1) + 1)
    pmf = {x: math.comb(n1, x) * math.comb(n2, successes - x) / math.comb(total, successes) for x in support}
    if alternative == "greater":
        return min(1.0, sum(p for x, p in pmf.items() if x >= k1))
    if alternative == "less":
        return min(1.0, sum(p for x, p in pmf.items() if x <= k1))
    return min(1.0, sum(p for p in pmf.values() if p <= pmf[k1] * (1 + 1e-7)))


def _ztest_closed_form(k1: int, n1: int, k2: int, n2: int) -> float:
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    return math.erfc(abs(k1 / n1 - k2 / n2) / se / math.sqrt(2))


# --------------------------------------------------------------------------- seed figures


def test_seed_wilson_31_of_35() -> None:
    lo, hi = wilson_interval(31, 35)
    assert (round(lo, 3), round(hi, 3)) == (0.740, 0.955)


def test_seed_two_proportion_16_vs_33_of_50() -> None:
    assert round(two_proportion_ztest(16, 50, 33, 50), 4) == 0.0007


def test_seed_fisher_16_vs_33_of_50() -> None:
    assert round(fisher_exact(16, 50, 33, 50), 4) == 0.0013


# --------------------------------------------------------------------------- Wilson


def test_wilson_matches_closed_form_on_random_counts() -> None:
    rng = np.random.default_rng(1)
    for _ in range(N_RANDOM):
        k, n = _random_counts(rng)
        confidence = float(rng.choice([0.8, 0.9, 0.95, 0.99]))
        expected = _wilson_closed_form(k, n, confidence)
        assert wilson_interval(k, n, confidence) == pytest.approx(expected, abs=1e-12)


def test_wilson_zero_successes_starts_at_exactly_zero() -> None:
    lo, hi = wilson_interval(0, 35)
    assert lo == 0.0 and 0.0 < hi < 0.15


def test_wilson_all_successes_ends_at_exactly_one() -> None:
    lo, hi = wilson_interval(35, 35)
    assert hi == 1.0 and 0.85 < lo < 1.0


def test_wilson_contains_rate_and_widens_with_confidence() -> None:
    rng = np.random.default_rng(2)
    for _ in range(N_RANDOM):
        k, n = _random_counts(rng)
        lo95, hi95 = wilson_interval(k, n, 0.95)
        lo99, hi99 = wilson_interval(k, n, 0.99)
        assert 0.0 <= lo99 <= lo95 <= k / n <= hi95 <= hi99 <= 1.0


def test_counts_accept_numpy_ints_and_integral_floats() -> None:
    assert wilson_interval(np.int64(31), np.int32(35)) == wilson_interval(31, 35)
    assert wilson_interval(31.0, np.float64(35.0)) == wilson_interval(31, 35)


@pytest.mark.parametrize(
    ("k", "n", "name"),
    [
        (0, 0, "n"),
        (1, 0, "n"),
        (0, -5, "n"),
        (-1, 10, "k"),
        (11, 10, "k"),
        (2.5, 10, "k"),
        (2, 10.5, "n"),
        (float("nan"), 10, "k"),
        (float("inf"), 10, "k"),
        ("3", 10, "k"),
        (None, 10, "k"),
        (True, 10, "k"),
        (3, True, "n"),
    ],
)
def test_wilson_rejects_impossible_counts(k: object, n: object, name: str) -> None:
    with pytest.raises(StatsError) as exc:
        wilson_interval(k, n)  # type: ignore[arg-type]
    _assert_one_line_error(exc, name)


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5, -0.1, 95, float("nan"), "0.95", True])
def test_wilson_rejects_confidence_outside_unit_interval(confidence: object) -> None:
    with pytest.raises(StatsError) as exc:
        wilson_interval(3, 10, confidence)  # type: ignore[arg-type]
    _assert_one_line_error(exc, "confidence")


def test_stats_error_is_in_the_project_error_family() -> None:
    assert issubclass(StatsError, CrystallizedSafetyError)


# --------------------------------------------------------------------------- rate_summary / power_ok


def test_rate_summary_shape_and_values() -> None:
    summary = rate_summary(31, 35)
    assert set(summary) == {"k", "n", "rate", "ci_lo", "ci_hi"}
    assert summary["k"] == 31 and summary["n"] == 35
    assert summary["rate"] == pytest.approx(31 / 35)
    assert (summary["ci_lo"], summary["ci_hi"]) == wilson_interval(31, 35)


def test_rate_summary_rejects_empty_cell() -> None:
    with pytest.raises(StatsError) as exc:
        rate_summary(0, 0)
    _assert_one_line_error(exc, "n")


@pytest.mark.parametrize(("n", "minimum", "ok"), [(35, 35, True), (34, 35, False), (0, 35, False), (10, 5, True)])
def test_power_ok(n: int, minimum: int, ok: bool) -> None:
    assert power_ok(n, minimum) is ok


def test_power_ok_default_minimum_is_35() -> None:
    assert power_ok(35) and not power_ok(34)


@pytest.mark.parametrize(("n", "minimum", "name"), [(-1, 35, "n"), (3.5, 35, "n"), (10, 0, "minimum")])
def test_power_ok_rejects_bad_input(n: object, minimum: object, name: str) -> None:
    with pytest.raises(StatsError) as exc:
        power_ok(n, minimum)  # type: ignore[arg-type]
    _assert_one_line_error(exc, name)


# --------------------------------------------------------------------------- Fisher


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_fisher_matches_hypergeometric_sum(alternative: str) -> None:
    rng = np.random.default_rng(3)
    for _ in range(N_RANDOM):
        k1, n1 = _random_counts(rng, 60)
        k2, n2 = _random_counts(rng, 60)
        expected = _fisher_hypergeometric(k1, n1, k2, n2, alternative)
        assert fisher_exact(k1, n1, k2, n2, alternative) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_fisher_one_sided_direction() -> None:
    # rate1 = 0.9 > rate2 = 0.1: strong evidence for "greater", none for "less".
    assert fisher_exact(18, 20, 2, 20, "greater") < 1e-6
    assert fisher_exact(18, 20, 2, 20, "less") > 0.999


def test_fisher_identical_rates_give_p_one() -> None:
    assert fisher_exact(0, 30, 0, 30) == pytest.approx(1.0)
    assert fisher_exact(30, 30, 30, 30) == pytest.approx(1.0)


def test_fisher_rejects_unknown_alternative() -> None:
    with pytest.raises(StatsError) as exc:
        fisher_exact(3, 10, 5, 10, "bigger")
    _assert_one_line_error(exc, "alternative", "two-sided")


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((3, 0, 5, 10), "n1"),
        ((3, 10, 5, 0), "n2"),
        ((11, 10, 5, 10), "k1"),
        ((3, 10, -1, 10), "k2"),
        ((3, 10, 5.5, 10), "k2"),
    ],
)
def test_two_sample_tests_reject_impossible_counts(args: tuple, name: str) -> None:
    for func in (fisher_exact, two_proportion_ztest):
        with pytest.raises(StatsError) as exc:
            func(*args)
        _assert_one_line_error(exc, name)
    with pytest.raises(StatsError) as exc:
        bootstrap_diff_ci(*args)
    _assert_one_line_error(exc, name)


# --------------------------------------------------------------------------- two-proportion z-test


def test_ztest_matches_closed_form_on_random_counts() -> None:
    rng = np.random.default_rng(4)
    checked = 0
    for _ in range(N_RANDOM):
        k1, n1 = _random_counts(rng)
        k2, n2 = _random_counts(rng)
        if k1 + k2 in (0, n1 + n2):
            continue
        assert two_proportion_ztest(k1, n1, k2, n2) == pytest.approx(
            _ztest_closed_form(k1, n1, k2, n2), rel=1e-9, abs=1e-15
        )
        checked += 1
    assert checked > N_RANDOM * 0.9


@pytest.mark.parametrize(("k1", "n1", "k2", "n2"), [(0, 50, 0, 30), (50, 50, 30, 30), (0, 1, 0, 1)])
def test_ztest_degenerate_equal_extreme_rates_give_p_one(k1: int, n1: int, k2: int, n2: int) -> None:
    assert two_proportion_ztest(k1, n1, k2, n2) == 1.0


def test_ztest_is_symmetric_and_one_for_equal_rates() -> None:
    assert two_proportion_ztest(16, 50, 33, 50) == pytest.approx(two_proportion_ztest(33, 50, 16, 50))
    assert two_proportion_ztest(10, 40, 5, 20) == pytest.approx(1.0)


# --------------------------------------------------------------------------- Holm


def test_holm_matches_statsmodels_multipletests_on_random_families(monkeypatch) -> None:
    import gc

    # multipletests runs gc.collect() on every call: slow in a process full of torch objects, and irrelevant
    monkeypatch.setattr(gc, "collect", lambda *args: 0)
    rng = np.random.default_rng(5)
    for _ in range(300):
        m = int(rng.integers(1, 25))
        ps = [float(p) for p in rng.uniform(0, 1, m) ** rng.uniform(0.5, 6)]
        if rng.uniform() < 0.3:  # ties, which the running max must handle
            ps = [round(p, 1) for p in ps]
        assert holm(ps) == pytest.approx(list(multipletests(ps, method="holm")[1]), abs=1e-12)


def test_holm_properties_order_monotone_capped() -> None:
    rng = np.random.default_rng(6)
    for _ in range(N_RANDOM):
        ps = [float(p) for p in rng.uniform(0, 1, int(rng.integers(1, 20))) ** 3]
        adjusted = holm(ps)
        assert len(adjusted) == len(ps)
        assert all(p <= a <= 1.0 for p, a in zip(ps, adjusted))
        ranked = [a for _, a in sorted(zip(ps, adjusted))]
        assert all(x <= y for x, y in itertools.pairwise(ranked))


def test_holm_known_values() -> None:
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm([]) == []
    assert holm(np.array([0.02])) == pytest.approx([0.02])


@pytest.mark.parametrize("bad", [[0.1, 1.5], [-0.01], [float("nan")], ["0.1"]])
def test_holm_rejects_non_probabilities(bad: list) -> None:
    with pytest.raises(StatsError) as exc:
        holm(bad)
    _assert_one_line_error(exc, "pvalues[")


# --------------------------------------------------------------------------- min_n


def test_min_n_matches_statsmodels_power_solver() -> None:
    rng = np.random.default_rng(7)
    solver = NormalIndPower()
    for _ in range(N_RANDOM):
        p1, p2 = (float(x) for x in rng.uniform(0.02, 0.98, 2))
        if abs(p1 - p2) < 0.03 or abs(p1 - p2) > 0.6:  # outside this the solver is slow or fails
            continue
        power = float(rng.choice([0.8, 0.9]))
        alpha = float(rng.choice([0.01, 0.05]))
        n_solver = solver.solve_power(
            effect_size=proportion_effectsize(p1, p2),
            alpha=alpha,
            power=power,
            ratio=1.0,
            alternative="two-sided",
        )
        # The solver also counts the far tail's power, so it can need a fraction fewer per group.
        assert min_n(p1, p2, power, alpha) - math.ceil(float(n_solver)) in (0, 1)


def test_min_n_known_values_and_symmetry() -> None:
    # Cohen's h for 0.3 vs 0.6 is 0.6129; 2 ((1.95996 + 0.84162) / h)^2 = 41.8 -> 42 per group.
    h = 2 * math.asin(math.sqrt(0.6)) - 2 * math.asin(math.sqrt(0.3))
    expected = math.ceil(2 * ((NormalDist().inv_cdf(0.975) + NormalDist().inv_cdf(0.8)) / h) ** 2)
    assert min_n(0.3, 0.6) == min_n(0.6, 0.3) == expected == 42
    assert min_n(0.3, 0.6, power=0.9) > min_n(0.3, 0.6)
    assert min_n(0.3, 0.6, alpha=0.01) > min_n(0.3, 0.6)


def test_min_n_large_effect_does_not_fail() -> None:
    assert min_n(0.0, 1.0) == 2  # 2 (2.8016 / pi)^2 = 1.59
    assert 2 <= min_n(0.05, 0.95) <= 5


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"p1": 0.3, "p2": 0.3}, "p1 and p2"),
        ({"p1": -0.1, "p2": 0.3}, "p1"),
        ({"p1": 0.3, "p2": 1.2}, "p2"),
        ({"p1": 0.3, "p2": 0.6, "power": 1.0}, "power"),
        ({"p1": 0.3, "p2": 0.6, "alpha": 0.0}, "alpha"),
    ],
)
def test_min_n_rejects_bad_input(kwargs: dict, name: str) -> None:
    with pytest.raises(StatsError) as exc:
        min_n(**kwargs)
    _assert_one_line_error(exc, name)


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    for seed in range(10):
        assert bootstrap_diff_ci(16, 50, 33, 50, seed=seed) == bootstrap_diff_ci(16, 50, 33, 50, seed=seed)
    # Percentiles of a lattice can coincide across seeds; with few draws some seeds must differ.
    assert len({bootstrap_diff_ci(17, 43, 29, 47, n_boot=101, seed=seed) for seed in range(10)}) > 1


def test_bootstrap_matches_wald_interval_for_large_n() -> None:
    # At n = 2000 per group the bootstrap distribution is normal: compare with the Wald interval.
    rng = np.random.default_rng(8)
    z = NormalDist().inv_cdf(0.975)
    for seed in range(20):
        k1, k2 = int(rng.integers(200, 1800)), int(rng.integers(200, 1800))
        p1, p2 = k1 / 2000, k2 / 2000
        half = z * math.sqrt(p1 * (1 - p1) / 2000 + p2 * (1 - p2) / 2000)
        lo, hi = bootstrap_diff_ci(k1, 2000, k2, 2000, n_boot=20000, seed=seed)
        assert lo == pytest.approx(p1 - p2 - half, abs=0.004)
        assert hi == pytest.approx(p1 - p2 + half, abs=0.004)


def test_bootstrap_contains_estimate_and_widens_with_confidence() -> None:
    rng = np.random.default_rng(9)
    for seed in range(100):
        k1, n1 = _random_counts(rng, 80)
        k2, n2 = _random_counts(rng, 80)
        lo95, hi95 = bootstrap_diff_ci(k1, n1, k2, n2, n_boot=2000, seed=seed)
        lo99, hi99 = bootstrap_diff_ci(k1, n1, k2, n2, n_boot=2000, confidence=0.99, seed=seed)
        assert -1.0 <= lo99 <= lo95 <= k1 / n1 - k2 / n2 <= hi95 <= hi99 <= 1.0


def test_bootstrap_degenerate_rates_give_point_interval() -> None:
    assert bootstrap_diff_ci(0, 40, 0, 40) == (0.0, 0.0)
    assert bootstrap_diff_ci(40, 40, 0, 30) == (1.0, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"n_boot": 0}, "n_boot"),
        ({"n_boot": 10.5}, "n_boot"),
        ({"confidence": 1.0}, "confidence"),
        ({"seed": 1.5}, "seed"),
    ],
)
def test_bootstrap_rejects_bad_settings(kwargs: dict, name: str) -> None:
    with pytest.raises(StatsError) as exc:
        bootstrap_diff_ci(3, 10, 5, 10, **kwargs)
    _assert_one_line_error(exc, name)


# --------------------------------------------------------------------------- threshold


def test_threshold_rising_curve_from_unsorted_input() -> None:
    alphas, ks = [0, 2, 4, 6, 8], [2, 3, 20, 33, 34]  # rates .05 .075 .5 .825 .85
    order = [3, 0, 4, 2, 1]
    result = threshold([alphas[i] for i in order], [ks[i] for i in order], [40] * 5)
    assert result.alphas == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert result.rates == pytest.approx([0.05, 0.075, 0.5, 0.825, 0.85])
    assert (result.alpha_lo, result.alpha_hi) == (2.0, 4.0)
    assert (result.rate_lo, result.rate_hi) == pytest.approx((0.075, 0.5))
    assert result.jump == pytest.approx(0.425)
    assert result.p_two_proportion == two_proportion_ztest(3, 40, 20, 40)
    assert result.p_fisher == fisher_exact(3, 40, 20, 40)
    assert result.saturation_alpha == 6.0  # 0.825 >= 0.95 * 0.85 = 0.8075; 0.5 is not


def test_threshold_falling_curve_measures_saturation_on_the_drop() -> None:
    # rates .9 .88 .5 .06 .05: drops from the first rate are 0 .02 .4 .84 .85; 0.95 * .85 = .8075.
    result = threshold([0, 1, 2, 3, 4], [90, 88, 50, 6, 5], [100] * 5)
    assert (result.alpha_lo, result.alpha_hi) == (2.0, 3.0)
    assert result.jump == pytest.approx(-0.44)
    assert result.saturation_alpha == 3.0
    # On the rising reading this curve would "saturate" at alpha 0, its maximum rate: 3.0 is the drop's reading.
    assert result.alphas[result.rates.index(max(result.rates))] == 0.0
    # the jump's significance is tested on the two cells of the drop (50/100 -> 6/100)
    assert (result.rate_lo, result.rate_hi) == pytest.approx((0.5, 0.06))
    assert result.p_two_proportion == two_proportion_ztest(50, 100, 6, 100)
    assert result.p_fisher == fisher_exact(50, 100, 6, 100)


def test_threshold_falling_curve_without_net_drop_has_no_saturation() -> None:
    result = threshold([0, 1, 2, 3, 4], [0, 3, 6, 9, 5], [10] * 5)
    assert result.jump == pytest.approx(-0.4)
    assert result.saturation_alpha is None


def test_threshold_all_zero_rates() -> None:
    result = threshold([0.0, 1.0, 2.0], [0, 0, 0], [35, 35, 35])
    assert result.jump == 0.0 and (result.alpha_lo, result.alpha_hi) == (0.0, 1.0)
    assert result.saturation_alpha is None
    assert result.p_two_proportion == 1.0 and result.p_fisher == pytest.approx(1.0)


def test_threshold_flat_nonzero_curve_saturates_at_first_alpha() -> None:
    assert threshold([1, 2, 3], [7, 7, 7], [10, 10, 10]).saturation_alpha == 1.0


def test_threshold_tie_picks_lowest_alpha_pair() -> None:
    result = threshold([0, 1, 2], [0, 5, 10], [10, 10, 10])
    assert (result.alpha_lo, result.alpha_hi) == (0.0, 1.0)


def test_threshold_negative_alphas_and_result_is_frozen() -> None:
    result = threshold([-4, -8, 0], [30, 35, 2], [35, 35, 35])
    assert isinstance(result, ThresholdResult)
    assert result.alphas == [-8.0, -4.0, 0.0]
    assert (result.alpha_lo, result.alpha_hi) == (-4.0, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.jump = 0.0  # type: ignore[misc]


def _threshold_by_hand(alphas: list[float], ks: list[int], ns: list[int]) -> tuple:
    pts = sorted(zip(alphas, ks, ns))
    rates = [k / n for _, k, n in pts]
    best = 0
    for i in range(1, len(rates) - 1):
        if abs(rates[i + 1] - rates[i]) > abs(rates[best + 1] - rates[best]):
            best = i
    rising = rates[best + 1] >= rates[best]
    effects = rates if rising else [rates[0] - r for r in rates]
    peak = max(effects)
    saturation = None
    if peak > 0:
        saturation = min(a for (a, _, _), e in zip(pts, effects) if e >= 0.95 * peak)
    return pts[best][0], pts[best + 1][0], saturation, pts[best], pts[best + 1]


def test_threshold_matches_brute_force_on_random_sweeps() -> None:
    rng = np.random.default_rng(10)
    for _ in range(N_RANDOM):
        m = int(rng.integers(2, 9))
        alphas = [float(a) for a in rng.choice(np.arange(-20, 21), size=m, replace=False)]
        ns = [int(n) for n in rng.integers(1, 60, m)]
        ks = [int(rng.integers(0, n + 1)) for n in ns]
        result = threshold(alphas, ks, ns)
        a_lo, a_hi, saturation, (_, k_lo, n_lo), (_, k_hi, n_hi) = _threshold_by_hand(alphas, ks, ns)
        assert (result.alpha_lo, result.alpha_hi) == (a_lo, a_hi)
        assert result.jump == pytest.approx(k_hi / n_hi - k_lo / n_lo)
        assert abs(result.jump) == pytest.approx(max(abs(np.diff(result.rates))))
        assert result.saturation_alpha == saturation
        assert result.p_two_proportion == two_proportion_ztest(k_lo, n_lo, k_hi, n_hi)
        assert result.p_fisher == fisher_exact(k_lo, n_lo, k_hi, n_hi)


@pytest.mark.parametrize(
    ("alphas", "ks", "ns", "name"),
    [
        ([1.0], [3], [10], ">= 2 alphas"),
        ([], [], [], ">= 2 alphas"),
        ([1.0, 2.0], [3], [10, 10], "equal lengths"),
        ([1.0, 2.0], [3, 4], [10], "equal lengths"),
        ([1.0, 1.0], [3, 4], [10, 10], "distinct"),
        ([1.0, float("nan")], [3, 4], [10, 10], "alphas[1]"),
        ([1.0, "2"], [3, 4], [10, 10], "alphas[1]"),
        ([1.0, 2.0], [3, 11], [10, 10], "ks[1]"),
        ([1.0, 2.0], [3, 4], [0, 10], "ns[0]"),
        ([1.0, 2.0], [3, 4.5], [10, 10], "ks[1]"),
    ],
)
def test_threshold_rejects_bad_sweeps(alphas: list, ks: list, ns: list, name: str) -> None:
    with pytest.raises(StatsError) as exc:
        threshold(alphas, ks, ns)
    _assert_one_line_error(exc, name)
