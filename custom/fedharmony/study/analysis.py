"""Verdicts under an analysis plan: seed-level tests, Holm's correction, non-inferiority (no NVFlare import).

The plan protocol (:mod:`fedharmony.study.plan`) decides a study's claims from the per-seed
paired differences (method minus baseline on the same seed's data; seeds are the replicates):

* **superiority** on an endpoint (``mean`` over sites or ``worst`` site): the two-sided paired
  t-test's p, Holm-adjusted across every verdict of the study; *better* / *worse* only where the
  adjusted p is below alpha **and** both 95% CIs (Student t and percentile bootstrap over seeds)
  exclude zero on the same side; otherwise *no difference shown*;
* **non-inferiority** on ``mean`` or ``worst``: the one-sided p of H0 "the method is worse by the
  margin or more" (t = (mean + margin) / SE), Holm-adjusted with the rest; *no worse* where the
  adjusted p is below alpha (then the one-sided lower confidence bound lies above -margin);
* **non-inferiority at every site** (``sites``): each site's own one-sided test; the claim needs
  every site, so its p is the largest of the sites' (an intersection-union test, which needs no
  correction over sites) and that p joins the Holm family.

:func:`posthoc_rule` applies the same rule (t-test p, Holm over every comparison and endpoint a
report shows) to a study that had no plan, so its verdicts can be read under today's protocol;
such a re-analysis is post hoc by construction, and the report says so.

:func:`plateau` asks whether a validation curve has stopped rising (:data:`PLATEAU_RULE`), the
test that fixes a preset's rounds: a comparison made while FedAvg is still learning measures
speed, not where the methods end.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np

from fedharmony.study.stats import bootstrap_ci, excludes_zero, holm, noninferiority, paired_t_test, t_interval

__all__ = ["paired_per_seed", "planned_verdicts", "posthoc_rule", "noninferiority_p", "superiority_verdict",
           "plateau", "plateau_rounds", "PLATEAU_RULE", "PLATEAU_TOLERANCE"]


def noninferiority_p(differences, margin: float) -> float:
    """One-sided p of H0 "mean difference <= -margin" (t-test over seeds; NaN for fewer than 2 values): the p of
    :func:`fedharmony.study.stats.noninferiority`'s test."""
    return noninferiority(differences, margin).p


def superiority_verdict(adjusted_p: float, t_ci, boot_ci, alpha: float) -> str:
    """*better* / *worse* where the adjusted p is below alpha and both CIs exclude zero on the same side."""
    if math.isnan(adjusted_p) or adjusted_p >= alpha:
        return "no difference shown"
    if all(excludes_zero(lo, hi) and lo > 0 for lo, hi in (t_ci, boot_ci)):
        return "better"
    if all(excludes_zero(lo, hi) and hi < 0 for lo, hi in (t_ci, boot_ci)):
        return "worse"
    return "no difference shown"


def paired_per_seed(scores, arm: str, baseline: str):
    """``arm`` minus ``baseline`` on the seeds both have: ``(seeds, sites, {"mean" | "worst": per-seed
    differences}, {site: per-seed differences})`` (empty when they share no seed). ``scores``: method -> seed ->
    site -> score. The one place the paired differences are computed (the report's table and the verdicts)."""
    a, b = scores.get(arm, {}), scores.get(baseline, {})
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return seeds, [], {}, {}
    sites = sorted(set(a[seeds[0]]) & set(b[seeds[0]]))
    by_endpoint = {
        "mean": [float(np.mean([a[k][s] for s in sites]) - np.mean([b[k][s] for s in sites])) for k in seeds],
        "worst": [min(a[k][s] for s in sites) - min(b[k][s] for s in sites) for k in seeds],
    }
    by_site = {s: [a[k][s] - b[k][s] for k in seeds] for s in sites}
    return seeds, sites, by_endpoint, by_site


def planned_verdicts(scores: Dict[str, Dict[int, Dict[str, float]]], plan: dict,
                     scores_at: Optional[Dict[str, Dict[str, Dict[int, Dict[str, float]]]]] = None) -> List[dict]:
    """One row per (planned comparison, endpoint), in the plan's order, with the Holm-adjusted verdict.

    ``scores``: method -> seed -> site -> score; ``plan``: the plan file's content. An endpoint ``mean@F`` or
    ``worst@F`` is the same endpoint on the test scans at F times their pixel size: its scores come from
    ``scores_at[F]`` (F as the plan writes it; :mod:`fedharmony.study.robustness`).
    """
    alpha = float(plan.get("alpha", 0.05))
    margin = plan.get("margin")
    rows = []
    for c in plan["comparisons"]:
        paired = {}
        for endpoint in c["endpoints"]:
            factor = endpoint.partition("@")[2]
            if factor not in paired:
                source = scores if not factor else (scores_at or {}).get(factor, {})
                paired[factor] = paired_per_seed(source, c["arm"], c["baseline"])
            seeds, sites, by_endpoint, by_site = paired[factor]
            row = {"arm": c["arm"], "baseline": c["baseline"], "test": c["test"], "endpoint": endpoint,
                   "primary": bool(c.get("primary")), "seeds": seeds, "n": len(seeds)}
            if len(seeds) < 2:
                row.update(p=math.nan, diff=math.nan)
            elif endpoint == "sites":
                per_site = {s: noninferiority(d, margin, 1 - alpha) for s, d in by_site.items()}
                ps = {s: noninferiority_p(d, margin) for s, d in by_site.items()}
                row.update(diff=float(np.mean([r.diff for r in per_site.values()])), p=max(ps.values()),
                           per_site={s: {"diff": r.diff, "lower": r.lower, "p": ps[s], "noninferior": r.noninferior}
                                     for s, r in per_site.items()},
                           lower=min(r.lower for r in per_site.values()), margin=margin,
                           weakest_site=min(per_site, key=lambda s: per_site[s].lower))
            else:
                d = by_endpoint[endpoint.partition("@")[0]]
                t = t_interval(d)
                boot = bootstrap_ci(d)
                row.update(diff=t[0], t_ci=t[1:], bootstrap_ci=boot[1:], per_seed=d)
                if c["test"] == "superiority":
                    row["p"] = paired_t_test(d)[1]
                else:
                    ni = noninferiority(d, margin, 1 - alpha)
                    row.update(p=noninferiority_p(d, margin), lower=ni.lower, margin=margin)
            rows.append(row)
    adjusted = holm([r["p"] for r in rows])
    for row, p_adj in zip(rows, adjusted):
        row["p_holm"] = p_adj
        if row["test"] == "superiority":
            row["verdict"] = ("no difference shown" if "t_ci" not in row
                              else superiority_verdict(p_adj, row["t_ci"], row["bootstrap_ci"], alpha))
        else:
            shown = not math.isnan(p_adj) and p_adj < alpha
            what = "every site no worse" if row["endpoint"] == "sites" else "no worse"
            row["verdict"] = f"{what} (margin {margin:g})" if shown else f"{what}: not shown"
    return rows


def posthoc_rule(comparisons: List[dict], alpha: float = 0.05) -> List[dict]:
    """Today's rule applied after the fact to a report's :func:`fedharmony.study.report.paired_difference`
    results: per comparison and endpoint (mean, worst) the paired t-test p over seeds, Holm's adjustment
    across all of them, the verdict under the rule, and the verdict the study's own (uncorrected) rule gave."""
    rows = []
    for d in comparisons:
        for endpoint in ("mean", "worst"):
            e = d[endpoint]
            rows.append({"arm": d["method"], "baseline": d["baseline"], "endpoint": endpoint, "diff": e["diff"],
                         "t_ci": tuple(e["t_ci"]), "bootstrap_ci": tuple(e["bootstrap_ci"]),
                         "p": paired_t_test(e["per_seed"])[1], "old_verdict": e["verdict"]})
    for row, p_adj in zip(rows, holm([r["p"] for r in rows])):
        row["p_holm"] = p_adj
        row["verdict"] = superiority_verdict(p_adj, row["t_ci"], row["bootstrap_ci"], alpha)
    return rows


def fmt_p(p: Optional[float]) -> str:
    """A p-value as the reports print it."""
    if p is None or math.isnan(p):
        return "-"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


PLATEAU_TOLERANCE = 0.01
"""The rise (in the task's score) over the last quarter of a run below which a curve counts as plateaued:
one point of Dice or macro-F1, the planned studies' margin for "no worse" (a difference too small to matter)."""

PLATEAU_RULE = ("a least-squares line through each seed's validation score (mean over sites) over the last quarter "
                "of the rounds (at least 4 rounds) rises, on average over seeds, by less than "
                f"{PLATEAU_TOLERANCE:g} across that quarter (rule of 2026-12-07; a falling curve counts as plateaued)")


def plateau(curves_by_seed: Dict[int, Dict[int, float]], rounds: Optional[int] = None,
            tolerance: float = PLATEAU_TOLERANCE) -> Optional[dict]:
    """Whether a curve has plateaued by :data:`PLATEAU_RULE`, on its first ``rounds`` rounds (default: all).

    ``curves_by_seed``: seed -> round -> score (mean over sites), rounds 0 .. R - 1 (round r's score is
    the model at the start of round r). The window is the last ``max(4, ceil(R / 4))`` rounds the seeds
    share; each seed's rise across it is the slope of its least-squares line times the window's span, so
    that every round in the window counts (the difference of two single rounds is as noisy as a
    validation set is small). Returns ``{"rounds", "window", "last", "change", "se", "plateaued"}``
    (``change``: mean over seeds of the fitted rise; ``se``: its standard error over seeds), or None with
    fewer than 2 seeds or 2 rounds in common.

    Example::

        >>> curves = {0: {0: 0.1, 1: 0.5, 2: 0.60, 3: 0.61, 4: 0.60, 5: 0.61},
        ...           1: {0: 0.1, 1: 0.4, 2: 0.58, 3: 0.58, 4: 0.59, 5: 0.57}}
        >>> r = plateau(curves)  # rounds 2-5: flat
        >>> r["window"], abs(round(r["change"], 3)), r["plateaued"]
        (4, 0.0, True)
        >>> r = plateau(curves, rounds=4)  # rounds 0-3: still rising
        >>> round(r["change"], 2), r["plateaued"]
        (0.49, False)
    """
    if len(curves_by_seed) < 2:
        return None
    common = sorted(set.intersection(*[set(c) for c in curves_by_seed.values()]))
    if rounds is not None:
        common = [r for r in common if r < rounds]
    if len(common) < 2:
        return None
    window = common[-min(len(common), max(4, math.ceil(len(common) / 4))):]
    x = np.asarray(window, dtype=float)
    rises = []
    for curve in curves_by_seed.values():
        slope = np.polyfit(x, np.asarray([curve[r] for r in window], dtype=float), 1)[0]
        rises.append(float(slope) * (x[-1] - x[0]))
    rises = np.asarray(rises)
    last = float(np.mean([c[common[-1]] for c in curves_by_seed.values()]))
    change = float(rises.mean())
    return {"rounds": len(common), "window": len(window), "last": last, "change": change,
            "se": float(rises.std(ddof=1)) / math.sqrt(len(rises)), "plateaued": bool(change < tolerance)}


def plateau_rounds(curves_by_seed: Dict[int, Dict[int, float]], smallest: int = 4) -> Optional[int]:
    """The fewest rounds R (>= ``smallest``) at which the curve has plateaued and stays so for every longer
    run up to the rounds it has (None: not within them)."""
    common = sorted(set.intersection(*[set(c) for c in curves_by_seed.values()])) if curves_by_seed else []
    found = None
    for rounds in range(len(common), smallest - 1, -1):
        check = plateau(curves_by_seed, rounds)
        if not check or not check["plateaued"]:
            break
        found = rounds
    return found
