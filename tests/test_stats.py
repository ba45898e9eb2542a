"""The study's statistics against hand-computed values and a reference implementation (scipy)."""

import math

import numpy as np
import pytest
from scipy import stats as sp

from fedharmony.study.stats import bootstrap_ci, excludes_zero, t_interval, wilcoxon_signed_rank


def test_t_interval_by_hand():
    # mean 0.71, sd 0.0158114 (sum of squares 0.001 / 4), t(0.975, 4) = 2.7764451
    mean, lo, hi = t_interval([0.70, 0.72, 0.71, 0.69, 0.73])
    half = 2.7764451051977987 * math.sqrt(0.001 / 4) / math.sqrt(5)
    assert mean == pytest.approx(0.71) and lo == pytest.approx(0.71 - half) and hi == pytest.approx(0.71 + half)
    m, lo, hi = t_interval([0.5])
    assert m == 0.5 and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError, match="finite"):
        t_interval([0.5, math.nan])


def test_bootstrap_ci_is_a_fixed_function_of_its_seed():
    values = [0.02, -0.01, 0.03, 0.00, 0.04]
    a, b = bootstrap_ci(values, resamples=2000, seed=7), bootstrap_ci(values, resamples=2000, seed=7)
    assert a == b
    # the same computation written out: one (resamples, n) index draw from default_rng(seed)
    idx = np.random.default_rng(7).integers(0, 5, size=(2000, 5))
    means = np.asarray(values)[idx].mean(axis=1)
    assert a == (pytest.approx(0.016), pytest.approx(np.quantile(means, 0.025)), pytest.approx(np.quantile(means, 0.975)))
    # hand-computed case: two values, one resample of each kind is impossible to predict, but the bounds are
    # the sample's extremes' means: with values {0, 1} every resample mean lies in {0, 0.5, 1}
    m, lo, hi = bootstrap_ci([0.0, 1.0], resamples=4000, seed=1)
    assert m == 0.5 and lo == 0.0 and hi == 1.0
    assert bootstrap_ci([0.3, 0.3, 0.3]) == (pytest.approx(0.3), pytest.approx(0.3), pytest.approx(0.3))


def test_excludes_zero():
    assert excludes_zero(0.01, 0.03) and excludes_zero(-0.03, -0.01)
    assert not excludes_zero(-0.01, 0.02) and not excludes_zero(0.0, 0.02)


def test_signed_rank_by_hand():
    # all five differences positive: W+ = 15, P(W+ >= 15) = 1/32, two-sided 2/32
    r = wilcoxon_signed_rank([0.1, 0.2, 0.3, 0.4, 0.5])
    assert (r.statistic, r.p_value, r.n, r.method) == (15.0, 0.0625, 5, "exact")
    # ranks of |d| = 1..4, negative one has rank 1: W+ = 9; P(W+ >= 9) = #{subsets of {1,2,3,4} with sum >= 9}/16
    # = {2,3,4}, {1,2,3,4} ... sums: 9, 10 -> 2 subsets; two-sided 2 * 2/16 = 0.25
    r = wilcoxon_signed_rank([-0.1, 0.2, 0.3, 0.4])
    assert r.statistic == 9.0 and r.p_value == 0.25
    # zeros are dropped
    assert wilcoxon_signed_rank([0.0, 0.1, 0.2, 0.3, 0.4, 0.5]).n == 5
    assert math.isnan(wilcoxon_signed_rank([0.0, 0.0]).p_value)


@pytest.mark.parametrize("seed", range(6))
def test_signed_rank_matches_scipy_exact(seed):
    d = np.random.default_rng(seed).normal(0.01, 0.03, size=int(5 + 5 * seed))
    ours = wilcoxon_signed_rank(d)
    ref = sp.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="exact")
    assert ours.method == "exact"
    assert ours.statistic == pytest.approx(float(np.sum(sp.rankdata(np.abs(d))[d > 0])))
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_signed_rank_matches_scipy_normal_approximation_with_ties(seed):
    rng = np.random.default_rng(seed)
    d = np.round(rng.normal(0.005, 0.02, size=30), 2)  # rounding makes ties (and some zeros)
    ours = wilcoxon_signed_rank(d)
    ref = sp.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="approx", correction=False)
    assert ours.method == "normal"
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)


def test_signed_rank_normal_approximation_above_fifty_pairs():
    d = np.random.default_rng(0).normal(0.0, 1.0, size=80)
    ours = wilcoxon_signed_rank(d)
    ref = sp.wilcoxon(d, zero_method="wilcox", method="approx", correction=False)
    assert ours.method == "normal" and ours.p_value == pytest.approx(ref.pvalue, rel=1e-9)
