"""Statistics that turn counts of judged generations into conclusions.

Every finding in this project is a rate k/n (refusals, flips, compliances) compared across conditions
(alpha, layer, direction vs control). This module owns the few tests those comparisons need, each a
thin, validated wrapper over scipy/statsmodels so that the numbers match what a reviewer would compute
by hand, and each failing loudly (``StatsError``) on counts that cannot describe an experiment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import numpy as np
from scipy import stats as sps
from statsmodels.stats.proportion import proportion_confint, proportion_effectsize, proportions_ztest

from crystallized_safety.errors import StatsError
from crystallized_safety.validation import is_real

__all__ = [
    "ThresholdResult",
    "bootstrap_diff_ci",
    "exceeds_pvalues",
    "fisher_exact",
    "fisher_greater_pvalues",
    "holm",
    "holm_reject",
    "min_n",
    "power_ok",
    "rate_summary",
    "threshold",
    "two_proportion_ztest",
    "wilson_interval",
]

_ALTERNATIVES = ("two-sided", "greater", "less")
SATURATION_FRACTION = 0.95
MIN_N = 35  # per cell: ~80% power for the effect sizes the seed reported (see `min_n`)


# --------------------------------------------------------------------------- validation


def _whole(value: object, name: str) -> int:
    """Return ``value`` as an int, accepting integral floats (counts often arrive as float64 sums)."""
    if not is_real(value):
        raise StatsError(f"{name} must be a whole number, got {value!r}; pass an integer count")
    if isinstance(value, Integral):
        return int(value)
    as_float = float(value)
    if not as_float.is_integer():
        raise StatsError(f"{name} must be a whole number, got {value!r}; pass an integer count")
    return int(as_float)


def _counts(k: object, n: object, k_name: str = "k", n_name: str = "n") -> tuple[int, int]:
    """Validate a (successes, trials) pair: a rate needs at least one trial and 0 <= k <= n."""
    k_int, n_int = _whole(k, k_name), _whole(n, n_name)
    if n_int < 1:
        raise StatsError(f"{n_name} must be >= 1 to estimate a rate, got {n_int}; drop empty cells")
    if not 0 <= k_int <= n_int:
        raise StatsError(f"{k_name} must be between 0 and {n_name}={n_int}, got {k_int}; check the counts")
    return k_int, n_int


def _open_unit(value: object, name: str) -> float:
    """Validate a probability-like setting (confidence, power, alpha) strictly inside (0, 1)."""
    if not is_real(value) or not 0.0 < float(value) < 1.0:
        raise StatsError(f"{name} must be strictly between 0 and 1, got {value!r}; e.g. pass 0.95")
    return float(value)


def _probability(value: object, name: str) -> float:
    """Validate a rate or p-value in the closed interval [0, 1]."""
    if not is_real(value) or not 0.0 <= float(value) <= 1.0:
        raise StatsError(f"{name} must be a number in [0, 1], got {value!r}; pass a probability")
    return float(value)


# --------------------------------------------------------------------------- one rate


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial rate k/n.

    Wilson rather than Wald because our rates sit near 0 and 1 (a model that always refuses), where
    Wald collapses to a zero-width interval; Wilson stays inside [0, 1] and keeps its coverage.
    k = 0 gives exactly (0, upper) and k = n exactly (lower, 1).
    """
    k, n = _counts(k, n)
    confidence = _open_unit(confidence, "confidence")
    lo, hi = proportion_confint(k, n, alpha=1.0 - confidence, method="wilson")
    # Pin the closed ends so floating-point noise never reports a tiny non-zero rate for 0/n.
    lo = 0.0 if k == 0 else max(0.0, float(lo))
    hi = 1.0 if k == n else min(1.0, float(hi))
    return lo, hi


def rate_summary(k: int, n: int) -> dict[str, float | int]:
    """``{k, n, rate, ci_lo, ci_hi}`` (Wilson 95%): the one shape every report row uses for a rate."""
    k, n = _counts(k, n)
    lo, hi = wilson_interval(k, n)
    return {"k": k, "n": n, "rate": k / n, "ci_lo": lo, "ci_hi": hi}


def power_ok(n: int, minimum: int = MIN_N) -> bool:
    """Whether a cell has enough samples to be reported as a finding rather than an anecdote.

    The default 35 is the seed study's per-cell size; raise it with :func:`min_n` for small effects.
    """
    n_int, minimum_int = _whole(n, "n"), _whole(minimum, "minimum")
    if n_int < 0:
        raise StatsError(f"n must be >= 0, got {n_int}; pass a sample count")
    if minimum_int < 1:
        raise StatsError(f"minimum must be >= 1, got {minimum_int}; pass a positive sample count")
    return n_int >= minimum_int


# --------------------------------------------------------------------------- two rates


def fisher_exact(k1: int, n1: int, k2: int, n2: int, alternative: str = "two-sided") -> float:
    """Fisher exact p-value for rate1 vs rate2 on the 2x2 table [[k1, n1-k1], [k2, n2-k2]].

    Exact, so valid at the small n and extreme rates of a steering cell where the z-test is not.
    ``greater`` tests rate1 > rate2, ``less`` tests rate1 < rate2.
    """
    k1, n1 = _counts(k1, n1, "k1", "n1")
    k2, n2 = _counts(k2, n2, "k2", "n2")
    if alternative not in _ALTERNATIVES:
        raise StatsError(f"alternative must be one of {', '.join(_ALTERNATIVES)}, got {alternative!r}")
    table = [[k1, n1 - k1], [k2, n2 - k2]]
    return float(sps.fisher_exact(table, alternative=alternative).pvalue)


def two_proportion_ztest(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided pooled two-proportion z-test p-value.

    Reported beside Fisher because it is what most readers expect; when both rates are 0 or both are
    1 the pooled variance is zero and there is no evidence of a difference, so p = 1.0.
    """
    k1, n1 = _counts(k1, n1, "k1", "n1")
    k2, n2 = _counts(k2, n2, "k2", "n2")
    if k1 + k2 in (0, n1 + n2):
        return 1.0
    _, p = proportions_ztest([k1, k2], [n1, n2], alternative="two-sided")
    return float(p)


def bootstrap_diff_ci(
    k1: int, n1: int, k2: int, n2: int, n_boot: int = 10000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap CI for rate1 - rate2 (parametric: binomial resampling of each group).

    Sizes the difference, which the p-values alone do not, without a normal approximation; vectorised
    binomial draws from a seeded Generator make it fast and identical for the same seed.
    """
    k1, n1 = _counts(k1, n1, "k1", "n1")
    k2, n2 = _counts(k2, n2, "k2", "n2")
    confidence = _open_unit(confidence, "confidence")
    n_boot = _whole(n_boot, "n_boot")
    if n_boot < 1:
        raise StatsError(f"n_boot must be >= 1, got {n_boot}; e.g. pass 10000")
    rng = np.random.default_rng(_whole(seed, "seed"))
    diffs = rng.binomial(n1, k1 / n1, n_boot) / n1 - rng.binomial(n2, k2 / n2, n_boot) / n2
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(diffs, [tail, 1.0 - tail])
    return float(lo), float(hi)


def min_n(p1: float, p2: float, power: float = 0.8, alpha: float = 0.05) -> int:
    """Per-group n for a two-sided two-proportion test to detect p1 vs p2, rounded up.

    Cohen's arcsine formula n = 2 ((z_{1-alpha/2} + z_{power}) / h)^2 with h = 2 asin(sqrt p1) -
    2 asin(sqrt p2) (each arm's transformed rate has variance 1/n, their difference 2/n): the
    standard planning figure, closed-form so it never fails to converge for the large effects
    steering produces (statsmodels' NormalIndPower root finder does, below n = 2).
    """
    p1, p2 = _probability(p1, "p1"), _probability(p2, "p2")
    power, alpha = _open_unit(power, "power"), _open_unit(alpha, "alpha")
    if p1 == p2:
        raise StatsError(f"p1 and p2 must differ to size a test, both are {p1}; pass the effect to detect")
    h = abs(float(proportion_effectsize(p1, p2)))
    n = 2.0 * ((sps.norm.ppf(1.0 - alpha / 2.0) + sps.norm.ppf(power)) / h) ** 2
    return max(1, math.ceil(n - 1e-9))  # tolerance: an exact integer must not round up by float noise


# --------------------------------------------------------------------------- many tests


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order, monotone in rank and capped at 1.

    Every sweep tests many cells; Holm controls the family-wise error without Bonferroni's waste.
    Written out (sort, scale by m - rank, running max) rather than via statsmodels' multipletests,
    which calls gc.collect() on every call (~20 ms each, painful across many report tables); the
    tests check it against multipletests.
    """
    ps = np.array([_probability(p, f"pvalues[{i}]") for i, p in enumerate(pvalues)], dtype=float)
    order = np.argsort(ps, kind="stable")
    scaled = (len(ps) - np.arange(len(ps))) * ps[order]
    adjusted = np.empty_like(ps)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted.tolist()


def holm_reject(pvalues: np.ndarray, level: float, family: int | None = None) -> np.ndarray:
    """Holm's step-down rejections at family-wise `level`, row by row of a [..., m] array of p-values.

    `family` (>= m) counts hypotheses that were planned but have no p-value (cells never generated): they
    enter as p = 1, so they only widen the family. Vectorised so that a bootstrap can apply the exact same
    decision rule to thousands of resampled tables; checked against statsmodels' multipletests in the tests.
    """
    ps = np.asarray(pvalues, dtype=float)
    m = ps.shape[-1] if family is None else max(int(family), ps.shape[-1])
    order = np.argsort(ps, axis=-1, kind="stable")
    ranked = np.take_along_axis(ps, order, axis=-1)
    limits = level / (m - np.arange(ps.shape[-1]))
    passing = np.cumprod(ranked <= limits, axis=-1).astype(bool)  # step down: stop at the first failure
    out = np.zeros_like(passing)
    np.put_along_axis(out, order, passing, axis=-1)
    return out


def exceeds_pvalues(k: np.ndarray, n: np.ndarray, p0: float) -> np.ndarray:
    """One-sided exact binomial p-values of H0: rate <= p0 against rate > p0, elementwise (P(X >= k | n, p0)).

    What `scipy.stats.binomtest(k, n, p0, alternative="greater")` returns, as an array (the tests check it);
    n = 0 gives p = 1 (no evidence).
    """
    k, n = np.asarray(k), np.asarray(n)
    p = sps.binom.sf(k - 1, np.maximum(n, 1), _probability(p0, "p0"))
    return np.where(n > 0, np.minimum(p, 1.0), 1.0)


def fisher_greater_pvalues(k1: np.ndarray, n1: np.ndarray, k2: np.ndarray, n2: np.ndarray) -> np.ndarray:
    """One-sided Fisher exact p-values of rate1 > rate2, elementwise (the hypergeometric upper tail of k1).

    Equal to `fisher_exact(k1, n1, k2, n2, alternative="greater")` (the tests check it); an empty group gives
    p = 1.
    """
    k1, n1, k2, n2 = (np.asarray(x) for x in (k1, n1, k2, n2))
    p = sps.hypergeom.sf(k1 - 1, n1 + n2, k1 + k2, n1)
    return np.where((n1 > 0) & (n2 > 0), np.minimum(p, 1.0), 1.0)


@dataclass(frozen=True)
class ThresholdResult:
    """Where a rate-vs-alpha curve changes most, how sure we are, and where it saturates.

    ``alphas``/``rates`` are sorted by alpha. The largest jump is between the adjacent pair
    (``alpha_lo``, ``alpha_hi``); ``jump = rate_hi - rate_lo`` is signed (negative for a drop).
    ``saturation_alpha`` is defined in :func:`threshold`.
    """

    alphas: list[float]
    rates: list[float]
    alpha_lo: float
    alpha_hi: float
    rate_lo: float
    rate_hi: float
    jump: float
    p_two_proportion: float
    p_fisher: float
    saturation_alpha: float | None


def _saturation_alpha(alphas: list[float], rates: list[float], rising: bool) -> float | None:
    """First alpha (ascending) whose effect reaches SATURATION_FRACTION of the largest effect.

    Rising: the effect is the rate itself. Falling: the effect is the drop from the first rate.
    """
    effects = rates if rising else [rates[0] - r for r in rates]
    peak = max(effects)
    if peak <= 0.0:
        return None
    return next(a for a, e in zip(alphas, effects) if e >= SATURATION_FRACTION * peak)


def threshold(alphas: Sequence[float], ks: Sequence[int], ns: Sequence[int]) -> ThresholdResult:
    """Locate the steering threshold: the adjacent pair of alphas with the largest change in rate.

    Points are sorted by alpha first. The largest absolute jump between adjacent rates (the first,
    i.e. lowest-alpha, pair on ties) is the threshold; its significance is given by the pooled
    two-proportion test and Fisher's exact test on those two cells.

    ``saturation_alpha`` follows the direction of that jump, scanning alphas in ascending order:
    - rising jump (or a flat curve): the first alpha whose rate >= 95% of the maximum rate;
      None if the maximum rate is 0.
    - falling jump: measured on the drop, i.e. the first alpha whose drop from the first (lowest)
      alpha's rate, rates[0] - rate, is >= 95% of the maximum such drop; None if there is no drop.
    """
    if not len(alphas) == len(ks) == len(ns):
        raise StatsError(f"alphas, ks and ns must have equal lengths, got {len(alphas)}, {len(ks)}, {len(ns)}")
    if len(alphas) < 2:
        raise StatsError(f"threshold needs >= 2 alphas, got {len(alphas)}; sweep more alpha values")
    for i, a in enumerate(alphas):
        if not is_real(a, finite=True):
            raise StatsError(f"alphas[{i}] must be a finite number, got {a!r}")
    counts = [_counts(k, n, f"ks[{i}]", f"ns[{i}]") for i, (k, n) in enumerate(zip(ks, ns))]
    points = sorted(zip((float(a) for a in alphas), counts))
    sorted_alphas = [a for a, _ in points]
    if len(set(sorted_alphas)) != len(sorted_alphas):
        raise StatsError("alphas must be distinct; merge the counts of repeated alpha values")
    rates = [k / n for _, (k, n) in points]

    steps = np.diff(rates)
    i = int(np.argmax(np.abs(steps)))
    (k_lo, n_lo), (k_hi, n_hi) = points[i][1], points[i + 1][1]
    return ThresholdResult(
        alphas=sorted_alphas,
        rates=rates,
        alpha_lo=sorted_alphas[i],
        alpha_hi=sorted_alphas[i + 1],
        rate_lo=rates[i],
        rate_hi=rates[i + 1],
        jump=float(steps[i]),
        p_two_proportion=two_proportion_ztest(k_lo, n_lo, k_hi, n_hi),
        p_fisher=fisher_exact(k_lo, n_lo, k_hi, n_hi),
        saturation_alpha=_saturation_alpha(sorted_alphas, rates, rising=steps[i] >= 0),
    )
