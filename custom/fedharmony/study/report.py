"""Build a study's report from its ``results.json``: tables, paired differences, figures (no NVFlare import).

Everything here is a function of ``results.json``, so ``python tools/study.py --report-only DIR``
rebuilds the same report, and a number in the docs can always be traced back to a file.

What the report says, and how:

* per site and method: the mean over seeds and its 95% Student-t CI;
* the mean over sites and the worst site (per seed, the lowest site score), each with its CI;
* each method's paired difference to FedAvg (and PRR-FL's to FedBN, for every PRR-FL arm; and an
  arm with settings to its plain method, e.g. ``prrfl+protocol=released`` - ``prrfl``): for every seed, the
  method's mean over sites minus FedAvg's on the same data; the mean of those, a percentile
  bootstrap CI over seeds (seeds are the independent replicates; fixed resampling seed), the
  t CI over seeds, and a Wilcoxon signed-rank p-value over all (site, seed) pairs. The same for
  the worst site. A difference is called *better* or *worse* only when both CIs exclude zero
  on the same side; otherwise the report says *no difference shown*;
* with an analysis plan (``results["plan"]``, :mod:`fedharmony.study.plan`): the plan's verdicts
  (:func:`fedharmony.study.analysis.planned_verdicts`: paired t-test over seeds, Holm across every
  verdict, non-inferiority against the plan's margin), the plan's digest and commit, the power of
  its seeds; every other difference is shown as *post hoc*, with no verdict. Without a plan the
  verdicts are the rule above (uncorrected), and a last section re-reads them under the plan
  protocol's rule (Holm), marked post hoc;
* per-round validation curves (mean over sites; line: mean over seeds; band: min to max over
  seeds), and a forest plot of the differences;
* with ``--retrogress`` runs, what a communication costs the model a site uses (the "retrogress"
  of PRR-FL's paper): per run, the mean over rounds t >= 1 of (validation score after local
  training in round t-1) - (score at the start of round t, right after the server's answer),
  each the mean over sites; per arm the mean over seeds with its t CI, the largest single drop,
  the same for the network that takes the answer where the site uses another one (PRR-FL's
  deputy), and a figure of both scores by round;
* with ``--pixel-scales`` runs, each arm's score on the test scans at other in-plane pixel sizes
  (:mod:`fedharmony.study.robustness`), mean and worst site with CIs over seeds, and a figure.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from fedharmony.core.results import RETROGRESS_CURVES
from fedharmony.study.tasks import parse_arm
from fedharmony.study.provenance import bundle_line, differing, run_line
from fedharmony.study.robustness import robustness_lines, robustness_plot, robustness_summary
from fedharmony.study.analysis import (PLATEAU_RULE, fmt_p, paired_per_seed, plateau, plateau_rounds, planned_verdicts,
                                       posthoc_rule)
from fedharmony.study.stats import bootstrap_ci, excludes_zero, t_interval, wilcoxon_signed_rank

__all__ = ["load_results", "summarize", "paired_difference", "write_report", "verdict", "BASELINE",
           "COMPARISONS", "CLASSICAL_HARMONIZATION", "communication_drops", "harmonizes_classically",
           "retrogress_summary", "sites_beyond_zero"]

BASELINE = "fedavg"
# bundle settings that make an arm a classical harmonization baseline (FedAvg + N4, + histogram standardization)
CLASSICAL_HARMONIZATION = ("bias_correction", "histogram_scale")


def harmonizes_classically(arm: str) -> bool:
    """Whether ``arm`` turns on one of ``CLASSICAL_HARMONIZATION`` (e.g. ``fedavg+bias_correction=true``)."""
    settings = parse_arm(arm)[1]
    return any(settings.get(key) not in (None, False, "") for key in CLASSICAL_HARMONIZATION)


# Extra comparisons the methods' papers and their reviewers argue about, besides "against FedAvg":
# (method, which arms of the study each of its arms is compared with: an arm's name or a test on it).
# A method is never compared here with its own arms (an arm with settings meets its plain method anyway).
COMPARISONS = (
    ("prrfl", "fedbn"),                     # PRR-FL's paper claims to beat FedBN
    ("harmofl", harmonizes_classically),    # does HarmoFL beat N4 / histogram standardization?
)


def read_results_file(path) -> tuple:
    """``(path, content)`` of a study's ``results.json`` (``path``: the study folder or the file); raises
    FileNotFoundError or ValueError naming the file."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no results.json at {path}")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def load_results(path) -> dict:
    """``results.json`` (a study folder or the file), checked for the fields the report needs."""
    path, results = read_results_file(path)
    for key in ("task", "metric", "runs"):
        if key not in results:
            raise ValueError(f"{path} has no {key!r}")
    for i, run in enumerate(results["runs"]):
        if not {"method", "seed", "site_scores"} <= set(run):
            raise ValueError(f"{path}: runs[{i}] needs method, seed and site_scores")
        where = f"{path}: runs[{i}] ({run['method']}, seed {run['seed']})"
        _check_scores(run["site_scores"], f"{where} site_scores")
        curves = run.get("retrogress_curves")
        if curves is not None:
            if not isinstance(curves, dict):
                raise ValueError(f"{where} retrogress_curves must map a curve to its sites, got {type(curves).__name__}")
            for tag, by_site in curves.items():
                if not isinstance(by_site, dict):
                    raise ValueError(f"{where} retrogress_curves[{tag!r}] must map a site to its rounds")
                for site, by_round in by_site.items():
                    _check_scores(by_round, f"{where} retrogress_curves[{tag!r}][{site!r}]")
    return results


def _check_scores(values, where: str):
    """``values`` must map names (sites, rounds) to numbers (NaN included); a clear error naming ``where`` if not."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must map names to scores, got {type(values).__name__}")
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}[{key!r}] is not a number: {value!r}")


def _scores(results: dict) -> Dict[str, Dict[int, Dict[str, float]]]:
    """method -> seed -> site -> score."""
    out: Dict[str, Dict[int, Dict[str, float]]] = defaultdict(dict)
    for run in results["runs"]:
        out[run["method"]][int(run["seed"])] = {s: float(v) for s, v in run["site_scores"].items()}
    return out


def _scores_at(results: dict) -> Dict[str, Dict[str, Dict[int, Dict[str, float]]]]:
    """pixel scale (as text) -> method -> seed -> site -> score, from the runs' ``pixel_scale_scores``."""
    out: Dict[str, Dict[str, Dict[int, Dict[str, float]]]] = defaultdict(lambda: defaultdict(dict))
    for run in results["runs"]:
        for factor, sites in (run.get("pixel_scale_scores") or {}).items():
            out[factor][run["method"]][int(run["seed"])] = {s: float(v) for s, v in sites.items()}
    return out


def _fmt(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    if math.isnan(lo):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _signed(x: float) -> str:
    return f"{round(x, 3) + 0.0:+.3f}"  # + 0.0: a rounding noise of -1e-17 prints as +0.000, not -0.000


def _fmt_signed(mean: float, lo: float = math.nan, hi: float = math.nan) -> str:
    return _signed(mean) if math.isnan(lo) else f"{_signed(mean)} [{_signed(lo)}, {_signed(hi)}]"


def verdict(intervals) -> str:
    """``better`` / ``worse`` when every CI excludes zero on the same side, else ``no difference shown``."""
    if all(excludes_zero(lo, hi) and lo > 0 for lo, hi in intervals):
        return "better"
    if all(excludes_zero(lo, hi) and hi < 0 for lo, hi in intervals):
        return "worse"
    return "no difference shown"


def summarize(results: dict) -> dict:
    """Per method: per-site, mean-over-sites and worst-site mean and t CI over seeds."""
    scores = _scores(results)
    summary = {}
    for method in results.get("methods") or sorted(scores):
        by_seed = scores.get(method)
        if not by_seed:
            continue
        sites = sorted(next(iter(by_seed.values())))
        per_site = {s: t_interval([by_seed[k][s] for k in sorted(by_seed)]) for s in sites}
        means = [float(np.mean([by_seed[k][s] for s in sites])) for k in sorted(by_seed)]
        worst = [min(by_seed[k][s] for s in sites) for k in sorted(by_seed)]
        summary[method] = {"seeds": sorted(by_seed), "per_site": per_site, "mean": t_interval(means),
                           "worst": t_interval(worst), "worst_site": min(sites, key=lambda s: per_site[s][0])}
    return summary


def paired_difference(results: dict, method: str, baseline: str = BASELINE) -> Optional[dict]:
    """``method`` minus ``baseline`` on the same seeds (None when they share no seed)."""
    seeds, sites, by_endpoint, by_site = paired_per_seed(_scores(results), method, baseline)
    if not seeds:
        return None
    pairs = [d for s in sites for d in by_site[s]]
    out = {"method": method, "baseline": baseline, "seeds": seeds, "n_pairs": len(pairs)}
    for key, values in by_endpoint.items():
        boot, t = bootstrap_ci(values), t_interval(values)
        out[key] = {"per_seed": values, "diff": boot[0], "bootstrap_ci": boot[1:], "t_ci": t[1:],
                    "verdict": verdict([boot[1:], t[1:]])}  # one seed: no t CI, so no verdict
    w = wilcoxon_signed_rank(pairs)
    out["wilcoxon_p"], out["wilcoxon_n"] = w.p_value, w.n
    out["per_site"] = {s: float(np.mean(by_site[s])) for s in sites}
    out["per_site_t_ci"] = {s: t_interval(by_site[s])[1:] for s in sites}
    return out


def sites_beyond_zero(difference: dict) -> tuple:
    """(sites whose t CI of the difference lies below zero, sites whose lies above) for one
    :func:`paired_difference`; a site's CI is over seeds, with no correction for the number of sites."""
    cis = difference["per_site_t_ci"].items()
    return ([s for s, (lo, hi) in cis if excludes_zero(lo, hi) and hi < 0],
            [s for s, (lo, hi) in cis if excludes_zero(lo, hi) and lo > 0])


def _comparisons(results: dict) -> List[dict]:
    methods = results.get("methods") or sorted(_scores(results))
    out = []
    # the baseline is FedAvg; a study without it (arms of one setting) compares with its first listed method
    baseline = BASELINE if BASELINE in methods else (methods[0] if methods else None)
    pairs = [(m, baseline) for m in methods if baseline is not None and m != baseline]
    for m in methods:
        plain = parse_arm(m)[0]
        for method, against in COMPARISONS:
            if plain == method:
                pairs += [(m, base) for base in methods if parse_arm(base)[0] != method
                          and (against(base) if callable(against) else base == against)]
        if plain != m:  # an arm with settings against the same method without them
            pairs.append((m, plain))
    out, seen = [], set()
    for m, base in pairs:
        if base in methods and (m, base) not in seen and (d := paired_difference(results, m, base)):
            seen.add((m, base))
            out.append(d)
    return out


def _write_csv(results: dict, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "method", "seed", "site", results["metric"], "test_se", "test_n"])
        for run in sorted(results["runs"], key=lambda r: (r["method"], r["seed"])):
            details = run.get("site_results", {})
            for site, value in sorted(run["site_scores"].items()):
                d = details.get(site, {})
                w.writerow([results["task"], run["method"], run["seed"], site, f"{value:.6f}",
                            "" if d.get("se") is None or math.isnan(d.get("se", math.nan)) else f"{d['se']:.6f}",
                            d.get("n", "")])


def _curve_plot(results: dict, path: Path) -> Optional[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(dict)  # method -> seed -> {round: mean over sites}
    for run in results["runs"]:
        by_round = _mean_over_sites(run.get("curve"))
        if by_round:
            series[run["method"]][run["seed"]] = by_round
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ("-", "--", "-.", ":")
    for i, (method, by_seed) in enumerate(series.items()):
        rounds = sorted(set.intersection(*[set(c) for c in by_seed.values()]))
        values = np.array([[by_seed[k][r] for r in rounds] for k in sorted(by_seed)])
        line, = ax.plot(rounds, values.mean(axis=0), styles[i % len(styles)], label=method)  # styles: lines that
        # coincide (FedBN's round-start score can equal FedAvg's for rounds) stay visible
        ax.fill_between(rounds, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("round")
    ax.set_title(f"{results['task']}: validation by round (band: min to max over seeds)")
    return _finish_by_round_plot(fig, ax, results, path, legend_size=8)


def _mean_over_sites(curve: Optional[dict]) -> Dict[int, float]:
    """``{site: {round: score}}`` -> ``{round: mean over the sites that have the round}`` (JSON keys are strings)."""
    by_round = defaultdict(list)
    for site_curve in (curve or {}).values():
        for r, v in site_curve.items():
            by_round[int(r)].append(float(v))
    return {r: float(np.mean(v)) for r, v in sorted(by_round.items())}


def _start_and_after(curves: dict, which: str):
    """A run's ``retrogress_curves`` -> (round-start, after-training) scores by round, mean over sites, of the
    model the site uses (``which="uses"``) or of the exchanged network (``"exchanged"``)."""
    start, after = RETROGRESS_CURVES[which]
    return _mean_over_sites(curves.get(start)), _mean_over_sites(curves.get(after))


def _finish_by_round_plot(fig, ax, results: dict, path: Path, legend_size: int) -> Path:
    """The y label, grid and legend the by-round figures share; writes ``path``."""
    ax.set_ylabel(f"validation {results.get('metric_label', results['metric'])}, mean over sites")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def communication_drops(start: Dict[int, float], after: Dict[int, float]) -> List[float]:
    """What each communication cost: ``after[t - 1] - start[t]`` for every round t >= 1 that has both.

    ``start[t]``: the validation score of the model the site uses right after the server's answer of round t;
    ``after[t]``: the same model's score after round t's local training. A positive drop is a retrogress.

    Example::

        >>> communication_drops({0: 0.5, 1: 0.5, 2: 0.75}, {0: 0.75, 1: 0.5})
        [0.25, -0.25]
    """
    return [after[t - 1] - start[t] for t in sorted(start) if t >= 1 and t - 1 in after]


def retrogress_summary(results: dict) -> Dict[str, dict]:
    """Per arm with retrogress curves: ``{"seeds", "mean_drop": (mean, lo, hi), "largest_drop",
    "exchanged_mean_drop": (mean, lo, hi) or None}``; CIs are Student-t over seeds (per seed: the mean drop
    over rounds, each round's scores averaged over sites)."""
    per_arm = defaultdict(lambda: {"seeds": [], "mean": [], "largest": [], "exchanged": []})
    for run in results["runs"]:
        curves = run.get("retrogress_curves")
        if not curves:
            continue
        drops = communication_drops(*_start_and_after(curves, "uses"))
        if not drops:
            continue
        arm = per_arm[run["method"]]
        arm["seeds"].append(run["seed"])
        arm["mean"].append(float(np.mean(drops)))
        arm["largest"].append(float(np.max(drops)))
        exchanged = communication_drops(*_start_and_after(curves, "exchanged"))
        if exchanged:
            arm["exchanged"].append(float(np.mean(exchanged)))
    return {m: {"seeds": sorted(a["seeds"]), "mean_drop": t_interval(a["mean"]),
                "largest_drop": float(np.mean(a["largest"])),
                "exchanged_mean_drop": t_interval(a["exchanged"]) if a["exchanged"] else None}
            for m, a in per_arm.items()}


def _retrogress_plot(results: dict, path: Path) -> Optional[Path]:
    """The model each site uses, by round: at round start (integer x) and after local training (x + 0.9);
    mean over sites, line: mean over seeds, band: min to max over seeds; dotted: the exchanged network."""
    series = defaultdict(lambda: defaultdict(dict))  # (arm, which) -> seed -> {x: score}
    for run in results["runs"]:
        curves = run.get("retrogress_curves") or {}
        for which in RETROGRESS_CURVES:
            start, after = _start_and_after(curves, which)
            points = {float(t): v for t, v in start.items()}
            points.update({t + 0.9: v for t, v in after.items()})
            if points:
                series[(run["method"], which)][run["seed"]] = points
    if not any(which == "uses" for _, which in series):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {}
    for (arm, which), by_seed in series.items():
        xs = sorted(set.intersection(*[set(c) for c in by_seed.values()]))
        values = np.array([[by_seed[k][x] for x in xs] for k in sorted(by_seed)])
        color = colors.setdefault(arm, f"C{len(colors) % 10}")
        label = arm if which == "uses" else f"{arm}: exchanged network (deputy)"
        ax.plot(xs, values.mean(axis=0), "-" if which == "uses" else ":", color=color, lw=1.2, label=label)
        ax.fill_between(xs, values.min(axis=0), values.max(axis=0), color=color, alpha=0.12)
    ax.set_xlabel("round (integer: right after the server's answer; +0.9: after local training)")
    ax.set_title(f"{results['task']}: what a communication does to the model a site uses "
                 f"(line: mean over seeds; band: min to max)", fontsize=9)
    return _finish_by_round_plot(fig, ax, results, path, legend_size=7)


def _forest_plot(results: dict, comparisons: List[dict], path: Path) -> Optional[Path]:
    if not comparisons:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 0.5 * len(comparisons) + 1.6), sharey=True)
    labels = [f"{d['method']} - {d['baseline']}" for d in comparisons]
    y = np.arange(len(comparisons))[::-1]
    for ax, key, title in ((axes[0], "mean", "mean over sites"), (axes[1], "worst", "worst site")):
        diffs = np.array([d[key]["diff"] for d in comparisons])
        for name, color, width, offset in (("t_ci", "grey", 1, -0.12), ("bootstrap_ci", "C0", 2, 0.12)):
            lo = np.array([d[key][name][0] for d in comparisons])
            hi = np.array([d[key][name][1] for d in comparisons])
            ok = ~np.isnan(lo)  # one seed: no t CI
            ax.errorbar(diffs[ok], y[ok] + offset, xerr=[diffs[ok] - lo[ok], hi[ok] - diffs[ok]], fmt="o",
                        color=color, elinewidth=width, capsize=3, ms=4,
                        label="t CI" if name == "t_ci" else "bootstrap CI")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(f"difference in {results.get('metric_label', results['metric'])} (95% CIs over seeds)")
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels)
    axes[1].legend(fontsize=8, loc="best")
    seeds = sorted({k for d in comparisons for k in d["seeds"]})
    fig.suptitle(f"{results['task']}: paired differences over {len(seeds)} seed(s); a difference is shown only "
                 f"where both CIs exclude 0", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _made_on_lines(results: dict) -> List[str]:
    """The section saying what each arm's runs were made on (code, commit, CPU), with a warning where the
    runs differ: the cache keys settings, not code, and a CPU with other kernels rounds differently."""
    runs = results["runs"]
    everywhere = differing(runs)
    if len(everywhere) <= 1:
        return ["## What the runs were made on", "", f"Every run: {everywhere[0] if everywhere else '-'}.", ""]
    lines = ["## What the runs were made on", "",
             f"**The runs were made on {len(everywhere)} different code versions or CPUs (or do not record it).** "
             "The study's cache keys the settings and the bundle's configs, not the package's code, and the last "
             "bits of a training run depend on the CPU's kernels: a difference between arms made on different "
             "code may be partly the code's. Runs per arm:", ""]
    for method in results.get("methods") or sorted({r["method"] for r in runs}):
        mine = [r for r in runs if r["method"] == method]
        counts = Counter(run_line(r) for r in mine)  # first-seen order
        lines.append(f"- {method}: " + "; ".join(f"{line} ({n} of {len(mine)})" for line, n in counts.items()))
    return lines + [""]


def write_report(study_dir, results: Optional[dict] = None) -> Path:
    """Write ``report.md``, ``results.csv`` and the figures into ``study_dir``; returns the report's path."""
    study_dir = Path(study_dir)
    results = results or load_results(study_dir)
    metric = results.get("metric_label", results["metric"])
    summary = summarize(results)
    comparisons = _comparisons(results)
    _write_csv(results, study_dir / "results.csv")
    curves = _curve_plot(results, study_dir / "curves.png")
    forest = _forest_plot(results, comparisons, study_dir / "forest.png")
    retrogress = retrogress_summary(results)
    retrogress_png = _retrogress_plot(results, study_dir / "retrogress.png") if retrogress else None
    pixel_sizes = robustness_summary(results)
    pixel_png = robustness_plot(pixel_sizes, metric, study_dir / "pixel_size.png") if pixel_sizes else None
    settings = results.get("settings", {})
    lines = [f"# Study: {results['task']} ({metric})", ""]
    lines += ["Generated by `python tools/study.py --report-only` from `results.json`; do not edit by hand.", ""]
    lines += [f"- command: `{results.get('command', '?')}`",
              f"- machine: {results.get('machine', '?')}; versions: "
              + ", ".join(f"{k} {v}" for k, v in (results.get("versions") or {}).items()),
              f"- wall time: {results.get('wall_s', 0) / 60:.1f} min (runs done in this invocation and "
              f"cached ones: {results.get('run_wall_s', 0) / 60:.1f} min of run time)",
              f"- settings: preset {settings.get('preset')}, {settings.get('rounds')} rounds x "
              f"{settings.get('local_epochs')} local epochs, test cases per site "
              f"{settings.get('test_cases') or 'the datalists own'}, seeds {results.get('seeds')}",
              f"- data: {'prepared real data at ' + settings['data_root'] if settings.get('data_root') else 'phantom sites; seed k draws the training data with seed k and a separate test draw'}",
              *([bundle_line(results["bundle"])] if results.get("bundle") else []),
              ""]
    if results.get("pending"):
        done = len(results["runs"])
        lines += [f"**Incomplete study: {done} of {done + len(results['pending'])} runs done.** Pending: "
                  + ", ".join(f"{p['method']} seed {p['seed']}" for p in results["pending"])
                  + ". Rerun the study's command to finish it; until then the tables cover only the finished "
                    "runs, and a comparison uses only the seeds both methods have.", ""]
    if results.get("failed"):
        lines += ["**Failed runs (not in the tables):** "
                  + "; ".join(f"{f['method']} seed {f['seed']}: {f['error']}" for f in results["failed"]), ""]
    plan = results.get("plan")
    planned = planned_verdicts(_scores(results), plan["content"], _scores_at(results)) if plan else []
    lines += _protocol_lines(results, plan, planned, metric)
    lines += _made_on_lines(results)
    lines += ["## What is scored", ""]
    for m in summary:
        lines.append(f"- {m}: {results.get('scored_models', {}).get(m, '?')}")
    lines += ["", f"## Test {metric} per site (mean over seeds, 95% t CI)", ""]
    lines += site_table_lines(summary)
    se = _test_se(results)
    if summary and se:
        lines += ["", "Standard error of a site's test score (mean over runs), from the test set's size: "
                  + ", ".join(f"{s} {v:.4f}" for s, v in sorted(se.items())) + "."]
    lines += difference_lines(comparisons, plan, planned)
    if retrogress:
        lines += ["", "## Retrogress: what a communication costs the model a site uses", "",
                  f"Per run: the mean over rounds t >= 1 of (validation {metric} after local training in round t-1) "
                  f"- (validation {metric} at the start of round t, right after the server's answer), each the mean "
                  "over sites; positive = the answer made the site's model worse. Mean over seeds with its 95% t CI; "
                  "largest drop: the largest single round's drop, mean over seeds. Exchanged network: the same for "
                  "the network that takes the server's answer where the site uses another one (PRR-FL's deputy).",
                  "", "| method | seeds | mean drop [t CI] | largest drop | exchanged network: mean drop [t CI] |",
                  "|---|---|---|---|---|"]
        for m, r in retrogress.items():
            ex = r["exchanged_mean_drop"]
            lines.append(f"| {m} | {len(r['seeds'])} | {_fmt_signed(*r['mean_drop'])} | {_signed(r['largest_drop'])} | "
                         f"{_fmt_signed(*ex) if ex else '-'} |")
    lines += robustness_lines(pixel_sizes, metric)
    lines += _plateau_lines(results, summary)
    if comparisons and not plan:
        lines += _posthoc_lines(comparisons)
    figures = [(curves, "Validation by round"), (forest, "Paired differences (forest plot)"),
               (retrogress_png, "Retrogress by round"), (pixel_png, "Score against pixel size")]
    for path, title in figures:
        if path is not None:
            lines += ["", f"## {title}", "", f"![{title}]({path.name})"]
    out = study_dir / "report.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def site_table_lines(summary: dict) -> List[str]:
    """The table of :func:`summarize`: per method, each site's, the mean over sites' and the worst site's
    score (mean over seeds, 95% t CI)."""
    if not summary:
        return []
    sites = sorted(next(iter(summary.values()))["per_site"])
    lines = ["| method | " + " | ".join(sites) + " | mean over sites | worst site |", "|---" * (len(sites) + 3) + "|"]
    for m, s in summary.items():
        cells = [_fmt(*s["per_site"][site]) for site in sites]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {_fmt(*s['mean'])} | {_fmt(*s['worst'])} |")
    return lines


def difference_lines(comparisons: List[dict], plan: Optional[dict], planned: List[dict]) -> List[str]:
    """The paired-difference sections for :func:`paired_difference` results: endpoints (mean over sites, worst
    site) with both CIs and the verdict (the plan's, *post hoc* where it names none; without a plan the
    uncorrected rule's), then every site's difference with its t CI."""
    if not comparisons:
        return []
    if plan:
        rule = ("Verdicts are the plan's (above); a difference the plan does not name is *post hoc*: shown, "
                "not judged.")
        title = "## Paired differences (every pair; post hoc where the plan does not name them)"
    else:
        rule = ("*better* / *worse* only where both CIs exclude zero (this study has no analysis plan: the rule "
                "is uncorrected; see the post hoc re-analysis under the plan protocol's rule at the end).")
        title = "## Paired differences"
    lines = ["", title, "",
             "Per seed, the method's score minus the baseline's on the same data. CIs: percentile bootstrap "
             "over seeds (10,000 resamples, fixed seed) and Student-t over seeds. Wilcoxon: signed-rank test "
             "over all (site, seed) pairs, descriptive only (the pairs of one seed are not independent). "
             + rule, "",
             "| method - baseline | mean over sites: diff | bootstrap CI | t CI | verdict | worst site: diff "
             "| bootstrap CI | t CI | verdict | Wilcoxon p (pairs, descriptive) |", "|---" * 10 + "|"]
    judged = {(r["arm"], r["baseline"], r["endpoint"]): r["verdict"] for r in planned}
    for d in comparisons:
        row = [f"{d['method']} - {d['baseline']}"]
        for key in ("mean", "worst"):
            e = d[key]
            said = judged.get((d["method"], d["baseline"], key), "post hoc") if plan else e["verdict"]
            row += [f"{e['diff']:+.3f}", "[{:+.3f}, {:+.3f}]".format(*e["bootstrap_ci"]),
                    "[{:+.3f}, {:+.3f}]".format(*e["t_ci"]) if not math.isnan(e["t_ci"][0]) else "-",
                    said]
        p = d["wilcoxon_p"]
        row.append(f"{p:.3g} ({d['wilcoxon_n']})" if not math.isnan(p) else "-")
        lines.append("| " + " | ".join(row) + " |")
    sites = sorted(comparisons[0]["per_site"])
    lines += ["", "## Paired differences per site", "",
              "The same differences site by site: mean over seeds and Student-t 95% CI over seeds. A site is "
              "counted below or above the baseline only where its CI excludes zero (no correction for the "
              "number of sites).", "",
              "| method - baseline | " + " | ".join(sites) + " | below / above (of sites) |",
              "|---" * (len(sites) + 2) + "|"]
    for d in comparisons:
        below, above = sites_beyond_zero(d)
        cells = [_fmt_signed(d["per_site"][site], *d["per_site_t_ci"][site]) for site in sites]
        counted = len(d["seeds"]) >= 2  # one seed has no CI: no site can be counted either way
        lines.append(f"| {d['method']} - {d['baseline']} | " + " | ".join(cells)
                     + (f" | {len(below)} / {len(above)} of {len(sites)} |" if counted else " | - |"))
    return lines


def _ci(interval) -> str:
    lo, hi = interval
    return "-" if math.isnan(lo) else f"[{lo:+.3f}, {hi:+.3f}]"


def _protocol_lines(results: dict, plan: Optional[dict], planned: List[dict], metric: str) -> List[str]:
    """The protocol section: the plan (digest, commit, power) and its verdicts; or that there was none."""
    if not plan:
        return ["## Protocol", "", "No analysis plan: this study was run before plans were written (or without "
                "one). Its verdicts use the rule without a plan (both CIs exclude zero, no correction for the number "
                "of comparisons); the last section re-reads them under the plan protocol's rule, post hoc.", ""]
    content = plan["content"]
    commit = plan.get("commit") or f"none ({plan.get('commit_state', 'not recorded')})"
    power = plan.get("power") or {}
    lines = ["## Protocol: analysis plan", "",
             f"- plan: `{plan.get('file', '?')}`, {plan['digest']}; committed in {commit}; first run "
             f"{plan.get('first_run', '?')}",
             f"- question: {content['question']}",
             f"- alpha {content.get('alpha', 0.05)} (Holm across the {len(planned)} verdicts below); "
             f"non-inferiority margin {content.get('margin', '-')} {metric}"]
    if power:
        lines.append(f"- seeds: {power['seeds']} (the power calculation asks for {power['seeds_needed']} to detect "
                     f"{power['effect']:g} with power {power['target_power']:g} at level {power['alpha']:.4g}, "
                     f"per-seed SD {power['sd']:g}"
                     + (f" from {power['sd_from']}" if power.get("sd_from") else "")
                     + f"); with {power['seeds']} seeds the power is {power['power_at_seeds']:.2f} and the "
                     f"smallest effect detected with power {power['target_power']:g} is {power['detectable_effect']:.3f}")
    lines += ["", "## Planned comparisons (the study's verdicts)", "",
              "Per seed, the arm's score minus the baseline's on the same data. p: two-sided paired t-test over seeds "
              "(superiority) or one-sided test of \"worse by the margin or more\" (non-inferiority; *sites*: every "
              "site's own test, the claim's p is the largest). Holm: adjusted across every verdict of this table.",
              "", "| comparison | endpoint | test | seeds | diff | t CI | bootstrap CI | lower bound | p | Holm p | "
              "verdict |", "|---" * 11 + "|"]
    for r in planned:
        star = " (primary)" if r["primary"] else ""
        where = f" (weakest: {r['weakest_site']})" if r.get("weakest_site") else ""
        lines.append(f"| {r['arm']} - {r['baseline']}{star} | {r['endpoint']} | {r['test']} | {r['n']} | "
                     f"{_signed(r['diff']) if not math.isnan(r['diff']) else '-'} | "
                     f"{_ci(r['t_ci']) if 't_ci' in r else '-'} | {_ci(r['bootstrap_ci']) if 'bootstrap_ci' in r else '-'}"
                     f" | {_signed(r['lower']) + where if 'lower' in r and not math.isnan(r['lower']) else '-'} | "
                     f"{fmt_p(r['p'])} | {fmt_p(r['p_holm'])} | {r['verdict']} |")
    sites_rows = [r for r in planned if r["endpoint"] == "sites" and "per_site" in r]
    for r in sites_rows:
        lines += ["", f"Non-inferiority per site, {r['arm']} - {r['baseline']} (margin {r['margin']:g}): "
                  + "; ".join(f"{s} {_signed(v['diff'])} (lower {_signed(v['lower'])}, "
                              f"{'no worse' if v['noninferior'] else 'not shown'})"
                              for s, v in sorted(r["per_site"].items())) + "."]
    return lines + [""]


def _plateau_lines(results: dict, summary: dict) -> List[str]:
    """Whether the baseline's validation curve had stopped rising when the study stopped (the rounds question)."""
    baseline = BASELINE if BASELINE in summary else next(iter(summary), None)
    curves = {}
    for run in results["runs"]:
        if run["method"] == baseline and run.get("curve"):
            curves[int(run["seed"])] = _mean_over_sites(run["curve"])
    check = plateau(curves)
    if check is None:
        return []
    lines = ["", f"## Had {baseline}'s validation curve plateaued?", "",
             f"Rule: {PLATEAU_RULE}. Over its {check['rounds']} rounds the fitted rise over the last "
             f"{check['window']} rounds was {_signed(check['change'])} (SE over seeds {check['se']:.3f}): "
             + ("plateaued." if check["plateaued"] else "**still rising**: the comparisons above are made while "
                f"{baseline} was still learning.")]
    enough = plateau_rounds(curves)
    if check["rounds"] >= 16:  # a long curve (a pilot that fixes a preset's rounds): every shorter run, too
        lines += ["", "| rounds | mean at the last round | fitted rise over the last quarter | SE | plateaued |",
                  "|---|---|---|---|---|"]
        shown = list(range(4, check["rounds"] + 1, 2 if check["rounds"] <= 40 else 5))
        for rounds in shown + ([check["rounds"]] if shown[-1] != check["rounds"] else []):  # always the whole run
            r = plateau(curves, rounds)
            lines.append(f"| {rounds} | {r['last']:.3f} | {_signed(r['change'])} | {r['se']:.3f} | "
                         f"{'yes' if r['plateaued'] else 'no'} |")
        lines += ["", f"Fewest rounds from which every longer run has plateaued: "
                  f"{enough if enough is not None else 'none within these rounds'}."]
    return lines


def _posthoc_lines(comparisons: List[dict]) -> List[str]:
    """The verdicts of a study without a plan, re-read under the plan protocol's rule (post hoc)."""
    rows = posthoc_rule(comparisons)
    changed = sum(r["verdict"] != r["old_verdict"] for r in rows)
    lines = ["", "## Post hoc: the verdicts under the plan protocol's rule", "",
             "Computed after the fact (this study had no plan). Each comparison and endpoint above, with the "
             "two-sided paired t-test over seeds and Holm's adjustment across all "
             f"{len(rows)} of them; *better* / *worse* need the adjusted p below 0.05 and both CIs excluding zero. "
             f"{changed} of {len(rows)} verdicts differ from the uncorrected rule's.", "",
             "| method - baseline | endpoint | diff | p | Holm p | verdict (uncorrected rule) | verdict under the rule |",
             "|---" * 7 + "|"]
    for r in rows:
        lines.append(f"| {r['arm']} - {r['baseline']} | {r['endpoint']} | {_signed(r['diff'])} | {fmt_p(r['p'])} | "
                     f"{fmt_p(r['p_holm'])} | {r['old_verdict']} | {r['verdict']} |")
    return lines


def _test_se(results: dict) -> Dict[str, float]:
    se = defaultdict(list)
    for run in results["runs"]:
        for site, d in (run.get("site_results") or {}).items():
            if isinstance(d.get("se"), (int, float)) and not math.isnan(d["se"]):
                se[site].append(d["se"])
    return {s: float(np.mean(v)) for s, v in se.items()}
