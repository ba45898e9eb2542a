"""Confidence intervals and paired tests for a multi-seed study (no NVFlare import).

A study scores every method on every site for several seeds; each seed draws new phantom
data and new training randomness, so **seeds are the independent replicates** and the sites
of one seed are not independent of each other (one federation trains them all).

* :func:`t_interval`: mean and Student-t CI over seeds (a site's score, the mean over sites).
* :func:`bootstrap_ci`: percentile bootstrap CI of a mean, with a fixed generator seed, so
  a report is the same every time it is rebuilt. For a paired difference to a baseline the
  study resamples seeds (the replicates): the values are the per-seed differences.
* :func:`wilcoxon_signed_rank`: two-sided signed-rank test of paired differences, zeros
  dropped (Wilcoxon's rule), average ranks for ties; exact null distribution when there are
  no ties and at most 50 pairs, else the normal approximation with the tie correction (no
  continuity correction), as ``scipy.stats.wilcoxon`` does with ``zero_method="wilcox"``.
  Pairs of (site, seed) are not independent (one federation trains every site of a seed), so
  under an analysis plan it is descriptive only.

For studies with an analysis plan (:mod:`fedharmony.study.plan`):

* :func:`paired_t_test`: two-sided one-sample t-test of the per-seed differences (the seed-level
  test behind the t CI), as ``scipy.stats.ttest_1samp(d, 0)``.
* :func:`holm`: Holm's step-down adjustment of a family of p-values (every verdict of a study),
  as ``statsmodels.stats.multitest.multipletests(p, method="holm")``.
* :func:`noninferiority`: "no worse than the baseline by more than ``margin``": the one-sided
  lower confidence bound of the mean difference must lie above ``-margin``.
* :func:`paired_t_power` / :func:`seeds_for_power`: the power of the paired t-test for a given
  number of seeds, and the seeds needed, from the smallest effect of interest and the per-seed
  standard deviation of the difference (noncentral t, as ``statsmodels``' ``TTestPower``).

Example::

    >>> m, lo, hi = t_interval([0.70, 0.72, 0.71, 0.69, 0.73])
    >>> round(m, 3), round(lo, 3), round(hi, 3)
    (0.71, 0.69, 0.73)
    >>> wilcoxon_signed_rank([0.1, 0.2, 0.3, 0.4, 0.5]).p_value   # all five positive: 2 / 2**5
    0.0625
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

__all__ = ["t_interval", "bootstrap_ci", "wilcoxon_signed_rank", "WilcoxonResult", "excludes_zero",
           "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "paired_t_test", "holm", "noninferiority", "NonInferiority",
           "paired_t_power", "seeds_for_power", "detectable_effect"]

BOOTSTRAP_RESAMPLES = 10000
BOOTSTRAP_SEED = 20261130
_EXACT_MAX_N = 50


def _clean(values) -> np.ndarray:
    x = np.asarray(values, dtype=float).ravel()
    if x.size and not np.all(np.isfinite(x)):
        raise ValueError(f"values must be finite, got {x.tolist()}")
    return x


def t_interval(values: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
    """``(mean, low, high)``: the Student-t confidence interval of the mean (NaN bounds for fewer than 2 values)."""
    from scipy.stats import t

    x = _clean(values)
    if x.size == 0:
        raise ValueError("no values")
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(t.ppf(0.5 + level / 2, df=x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def bootstrap_ci(values: Sequence[float], level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> Tuple[float, float, float]:
    """``(mean, low, high)``: percentile bootstrap CI of the mean, resampling ``values`` with replacement.

    The generator is ``numpy.random.default_rng(seed)`` and the resample indices are drawn as one
    ``(resamples, n)`` integer array, so the result is a pure function of its arguments.
    """
    x = _clean(values)
    if x.size == 0:
        raise ValueError("no values")
    if not 0 < level < 1 or resamples < 1:
        raise ValueError(f"level must be in (0, 1) and resamples >= 1, got {level}, {resamples}")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    means = x[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(x.mean()), float(lo), float(hi)


def excludes_zero(low: float, high: float) -> bool:
    """True when a CI lies entirely above or entirely below zero."""
    return (low > 0 and high > 0) or (low < 0 and high < 0)


@dataclass(frozen=True)
class WilcoxonResult:
    statistic: float  # W+, the sum of the ranks of the positive differences
    p_value: float  # two-sided
    n: int  # pairs left after dropping zero differences
    method: str  # "exact" or "normal"


def _average_ranks(a: np.ndarray) -> np.ndarray:
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(a.size, dtype=float)
    sorted_a = a[order]
    i = 0
    while i < a.size:
        j = i
        while j + 1 < a.size and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _exact_counts(n: int) -> np.ndarray:
    """counts[w] = number of sign assignments of ranks 1..n whose positive ranks sum to w."""
    counts = np.zeros(n * (n + 1) // 2 + 1, dtype=float)
    counts[0] = 1
    for r in range(1, n + 1):
        counts[r:] = counts[r:] + counts[:-r].copy()
    return counts


def wilcoxon_signed_rank(differences: Sequence[float]) -> WilcoxonResult:
    """Two-sided Wilcoxon signed-rank test of paired ``differences`` (method minus baseline).

    Returns NaN ``p_value`` when every difference is zero.
    """
    d = _clean(differences)
    d = d[d != 0]
    n = int(d.size)
    if n == 0:
        return WilcoxonResult(0.0, math.nan, 0, "none")
    ranks = _average_ranks(np.abs(d))
    w_plus = float(ranks[d > 0].sum())
    ties = np.unique(np.abs(d), return_counts=True)[1]
    if n <= _EXACT_MAX_N and np.all(ties == 1):
        counts = _exact_counts(n)
        total = 2.0 ** n
        w = int(round(w_plus))
        low = counts[:w + 1].sum() / total  # P(W+ <= w)
        high = counts[w:].sum() / total  # P(W+ >= w)
        return WilcoxonResult(w_plus, float(min(1.0, 2 * min(low, high))), n, "exact")
    from scipy.stats import norm

    mean = n * (n + 1) / 4
    var = n * (n + 1) * (2 * n + 1) / 24 - float(((ties ** 3) - ties).sum()) / 48
    z = (w_plus - mean) / math.sqrt(var) if var > 0 else 0.0
    return WilcoxonResult(w_plus, float(min(1.0, 2 * norm.sf(abs(z)))), n, "normal")


def paired_t_test(differences: Sequence[float]) -> Tuple[float, float]:
    """``(t, p)``: two-sided t-test that the mean of ``differences`` is zero (n - 1 degrees of freedom).

    NaN for fewer than 2 values; ``p = 1`` when every difference is exactly zero (nothing to test),
    ``p = 0`` when they are all equal and not zero.

    Example::

        >>> t, p = paired_t_test([0.02, 0.03, 0.01, 0.04, 0.02])
        >>> round(t, 3), round(p, 4)
        (4.707, 0.0093)
    """
    from scipy.stats import t as student_t

    d = _clean(differences)
    if d.size < 2:
        return math.nan, math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return (0.0, 1.0) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
    t = mean / (sd / math.sqrt(d.size))
    return t, float(2 * student_t.sf(abs(t), df=d.size - 1))


def holm(p_values: Sequence[float]) -> list:
    """Holm's step-down adjusted p-values, in the order given (NaN stays NaN and is not counted).

    The smallest of m p-values is multiplied by m, the next by m - 1, and so on, each kept at least
    as large as the one before and at most 1; a verdict whose adjusted p is below alpha holds with
    the family-wise error rate at alpha.

    Example::

        >>> holm([0.01, 0.04, 0.03])
        [0.03, 0.06, 0.06]
    """
    p = [float(v) for v in p_values]
    finite = [i for i, v in enumerate(p) if not math.isnan(v)]
    order = sorted(finite, key=lambda i: p[i])
    m = len(order)
    adjusted = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class NonInferiority:
    diff: float  # mean difference (method - baseline)
    lower: float  # one-sided lower confidence bound of the mean difference
    margin: float  # the largest loss still called "no worse"
    level: float  # one-sided confidence level
    noninferior: bool  # lower > -margin
    p: float = math.nan  # one-sided p of H0 "mean difference <= -margin" (NaN for fewer than 2 values)


def noninferiority(differences: Sequence[float], margin: float, level: float = 0.95) -> NonInferiority:
    """Non-inferiority of a method to its baseline from paired per-seed ``differences`` (method - baseline).

    The method is *no worse* when the one-sided ``level`` lower confidence bound of the mean
    difference (Student t, n - 1 degrees of freedom) lies above ``-margin``. That is a one-sided
    test at alpha = 1 - level, the same as the lower end of a two-sided (2 level - 1) CI.

    Example::

        >>> r = noninferiority([-0.004, 0.002, -0.001, 0.003, -0.002], margin=0.01)
        >>> round(r.lower, 4), r.noninferior
        (-0.0031, True)
    """
    from scipy.stats import t as student_t

    if not margin > 0:
        raise ValueError(f"the non-inferiority margin must be > 0, got {margin}")
    d = _clean(differences)
    if d.size < 2:
        mean = float(d.mean()) if d.size else math.nan
        return NonInferiority(mean, math.nan, float(margin), level, False)
    mean = float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    lower = mean - float(student_t.ppf(level, df=d.size - 1)) * se
    shifted = mean + margin
    p = float(student_t.sf(shifted / se, df=d.size - 1)) if se > 0 else (0.0 if shifted > 0 else 1.0)
    return NonInferiority(mean, lower, float(margin), level, bool(lower > -margin), p)


def paired_t_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with ``n`` seeds to detect a mean difference ``effect``
    when the per-seed differences have standard deviation ``sd`` (noncentral t with n - 1 degrees of
    freedom and noncentrality effect / (sd / sqrt(n)))."""
    from scipy.stats import nct, t as student_t

    if n < 2 or not sd > 0:
        raise ValueError(f"need n >= 2 and sd > 0, got n={n}, sd={sd}")
    df = n - 1
    nc = abs(effect) / (sd / math.sqrt(n))
    crit = float(student_t.ppf(1 - alpha / 2, df))
    return float(nct.sf(crit, df, nc) + nct.cdf(-crit, df, nc))


def seeds_for_power(effect: float, sd: float, power: float = 0.8, alpha: float = 0.05, max_seeds: int = 1000) -> int:
    """The fewest seeds (>= 2) whose paired t-test reaches ``power`` for ``effect`` given ``sd``.

    Example::

        >>> seeds_for_power(effect=1.0, sd=1.0)   # statsmodels: TTestPower().solve_power(1.0, None, 0.05, 0.8) = 9.94
        10
    """
    if not 0 < power < 1 or not 0 < alpha < 1 or effect == 0:
        raise ValueError(f"need 0 < power < 1, 0 < alpha < 1 and a non-zero effect, got {power}, {alpha}, {effect}")
    for n in range(2, max_seeds + 1):
        if paired_t_power(effect, sd, n, alpha) >= power:
            return n
    raise ValueError(f"more than {max_seeds} seeds would be needed for effect {effect} with sd {sd}")


def detectable_effect(sd: float, n: int, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest mean difference that ``n`` seeds detect with ``power`` (the inverse of
    :func:`paired_t_power` in the effect, by bisection to 1e-9 of ``sd``)."""
    low, high = 0.0, sd
    while paired_t_power(high, sd, n, alpha) < power:
        high *= 2
    while high - low > 1e-9 * sd:
        mid = (low + high) / 2
        low, high = (mid, high) if paired_t_power(mid, sd, n, alpha) < power else (low, mid)
    return high
