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
           "BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED"]

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
