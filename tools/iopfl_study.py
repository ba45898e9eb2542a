#!/usr/bin/env python
"""IOP-FL on the phantom prostate sites: inside (personalized vs global), outside on scanners no
site has, and leave-one-site-out, over several seeds.

    python tools/iopfl_study.py [--seeds 3] [--rounds 20] [--local-epochs 2] [--cases 10] [--passes 2]
                                [--unseen] [--holdout BIDMC HK ...] [--no-inside] [--sweep]
                                [--out workspace/iopfl]

Seed k draws the phantom data with seed k and trains with the bundle's ``seed`` = k; seeds are the
replicates, so every CI below is over seeds (per seed: the mean over the sites it scores).

1. Inside: one IOP-FL federation on all 6 sites (NVFlare simulator) per seed; each site's test
   split scored with the global model and with the site's own personalized model (cross-site matrix).
2. Outside, unseen scanners (``--unseen``): the inside federation's model pool segments every volume
   of each scanner in ``--unseen-profiles`` (default: ``fedharmony/phantom/prostate_unseen_scanners.json``,
   profiles none of the six sites has), drawn with the seed.
3. Outside, leave-one-site-out (``--holdout``): for each held-out site H, an IOP-FL federation on the
   other 5 sites gives the model pool, which segments every volume of H.

Each outside site is segmented with the bundle's ``configs/routed_inference.json`` once per method:
the global model, each personalized model alone, the expert mean (parameter average), BN statistics,
TENT, routing with the released gate, routing with our gate made a sigmoid, routing with the global
model's running statistics, routing (IOP-FL), and routing guarded by the global model (routing_safe)
with each of its criteria: the held-out unsupervised loss (the default), agreement with the pool's
consensus (``routing_safe (consensus)``; filled into stored results that lack it by running it on the
stored pool), and the departure rule on the same agreements (``routing_safe (departure)``; for stored
results that lack it, its call and masks follow exactly from the consensus run's record, and are marked
as derived), and with a few labelled volumes of the site (``routing_safe (labelled)``: the labels of the volumes the
others hold out; for stored results that lack it, its call follows from the stored per-volume Dice, marked as
derived; ``--run-derived`` runs derived criteria for real on the stored federations). For routing_safe the
adapted candidate is also scored on its own, so the tables show whether each criterion picked the
network with the better Dice. ``--sweep`` adds routing
with 10x the learning rate and with 4x the passes (does the routing move away from the experts' mean
with more or larger steps, and does it help?) and with the released online schedule (one step per
batch of 5 slices, each batch segmented right after its step). No method but the labelled safeguard sees a label
(it sees three); the written NIfTI masks are scored against the site's labels afterwards (foreground Dice per
volume, native grid), and the labelled safeguard's also on the volumes it did not see labelled.

4. Cost on the first outside site: the bundle CLI (``python -m monai.bundle run``) run as a
   separate process for the global model and for routing: wall time and peak RSS.

Writes OUT/iopfl_study.json (resumable: a finished (site, seed) is not rerun), OUT/outside.csv,
OUT/outside_dice.png and OUT/report.md, the Markdown tables it prints (machine, versions and command first).
``--report-only`` rewrites the last three from OUT/iopfl_study.json and runs nothing (give the flags of the run,
e.g. ``--sweep``, so the same tables are made).
"""

import argparse
import csv
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "prostate_mri_seg"
sys.path.insert(0, str(REPO / "tools"))

from bench_common import ensure_phantom_sites, header  # noqa: E402

SITES = ["BIDMC", "HK", "I2CVB", "RUNMC", "BMC", "UCL"]
UNSEEN_PROFILES = REPO / "custom" / "fedharmony" / "phantom" / "prostate_unseen_scanners.json"
ADAPTIVE = ("bn_stats", "tent", "routing_released", "routing_sigmoid", "routing_source_stats", "routing", "routing_safe")
# --sweep: routing with larger or more steps; name -> (bundle method, adaptation overrides, passes factor)
SWEEP = {"routing lr x10": ("routing", {"adaptation#lr": 1e-2}, 1),
         "routing passes x4": ("routing", {}, 4),
         "routing, online schedule": ("routing", {"adaptation#schedule": "online"}, 0)}  # the released schedule
# the safeguard with the other criterion: name -> (bundle method, overrides, passes factor); it adapts exactly as
# routing_safe does (same seed, same held-out volumes), so its masks are those of routing_safe's candidate or of
# the global model, whichever its criterion kept
SAFEGUARDS = {"routing_safe (consensus)": ("routing_safe", {"adaptation#safeguard": "consensus"}, 1),
              "routing_safe (departure)": ("routing_safe", {"adaptation#safeguard": "departure"}, 1),
              "routing_safe (labelled)": ("routing_safe", {"adaptation#safeguard": "labelled"}, 1)}
LABELLED = "routing_safe (labelled)"
# routing_safe's holdout_every (the bundle's default): the criteria judge on the first volume and every 4th after it;
# the labelled criterion is given the labels of exactly those volumes, so it adapts on the same ones as the others
HOLDOUT_EVERY = 4
# a criterion that decides from what another one stored: name -> the criterion whose stored held-out agreements it
# reads. The departure criterion judges the same agreements (same adapted network, same held-out volumes) with
# another rule, so for a stored result made before it existed its call and masks follow exactly from the consensus
# run's record; such entries are marked "derived_from" and the report counts them
# The labelled criterion compares the mean Dice of the adapted network and of the global model on the labelled
# volumes; for a stored result made before it existed, its call follows from the study's own per-volume Dice of
# routing_safe's adapted network (the same network: same seed, same volumes adapted on). The study scores each volume
# on its own grid, and so does the bundle with the study's geometry (pixdim 0, image_size -1: nothing resampled), so
# the derived call is the real one (tests check it on the fourth scanner set, where it ran); with a geometry that
# resamples, the bundle would judge on the network's grid and a near tie could go the other way
DERIVED = {"routing_safe (departure)": ("routing_safe (consensus)", "departure"),  # name -> (source, its rule)
           LABELLED: ("routing_safe (adapted, always)", "labelled")}
SAFE_CANDIDATE = "routing_safe (adapted, always)"
TIE = 0.005  # a Dice gap the safeguard may get either way
MIN_SEEDS_FOR_VERDICT = 3  # a CI from 2 values (t with 1 degree of freedom, a bootstrap of 2) says little
TABLE = ["global", "personalized (mean)", "personalized (best, oracle)", "expert_mean", "bn_stats", "tent",
         "routing_released", "routing_sigmoid", "routing_source_stats", "routing", "routing_safe", *SAFEGUARDS,
         SAFE_CANDIDATE]


def run_iopfl(data_root: Path, n_sites: int, name: str, out: Path, args, seed: int) -> Path:
    """One IOP-FL federation in the simulator (bundle seed = ``seed``); returns the server's run folder."""
    ws_root = out / "sim"
    run = ws_root / name / "server" / "simulate_job"
    if (run / "model_pool" / "manifest.json").is_file():
        print(f"  {name}: reused {run}", file=sys.stderr, flush=True)
        _stamp_if_old(run / "model_pool")
        return run
    cmd = [sys.executable, str(REPO / "jobs" / "prostate.py"), "--algorithm", "iopfl", "--rounds", str(args.rounds),
           "--local-epochs", str(args.local_epochs), "--sites", str(n_sites), "--data-root", str(data_root),
           "--workspace", str(ws_root), "--name", name, "--iop-alpha", str(args.iop_alpha),
           "--override", json.dumps({"seed": seed}), "--verbose"]
    from fedharmony.study.runner import STALL_S, RunStalled, once_more_if_stalled, run_watched

    t0 = time.time()
    ws_root.mkdir(parents=True, exist_ok=True)
    log_path = ws_root / f"{name}.log"

    def attempt():
        with open(log_path, "w") as log:
            try:
                run_watched(cmd, log, dict(os.environ), STALL_S)
            except RunStalled:  # a RuntimeError too, but retried by the caller, not a failure
                raise
            except RuntimeError as e:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"federation {name} failed ({e}):\n{tail}") from None

    try:  # the study tool's rule: a run silent for STALL_S is stopped and run once more
        once_more_if_stalled(attempt, lambda why: print(f"  {name}: {why}", file=sys.stderr, flush=True))
    except RunStalled as e:
        raise RuntimeError(f"federation {name}: {e}, twice") from None
    if not (run / "model_pool" / "manifest.json").is_file():
        raise RuntimeError(f"federation {name} wrote no model pool under {run}")
    print(f"  {name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return run


def _stamp_if_old(pool: Path) -> None:
    """A pool this study's own federation wrote before pools recorded digests: record them (the study made
    these files, so it can vouch for them; a pool from elsewhere is never stamped here)."""
    from fedharmony.methods.iopfl.model_pool import OLD_FORMATS, stamp_pool

    if json.loads((pool / "manifest.json").read_text()).get("format") in OLD_FORMATS:
        stamp_pool(pool, BUNDLE)
        print(f"  {pool}: written before pools recorded digests; stamped", file=sys.stderr, flush=True)


def segment(method: str, pool: Path, site_dir: Path, out_dir: Path, passes: int, seed: int,
            extra: dict | None = None, candidate_dir: Path | None = None) -> dict:
    """Run the bundle's routed inference config in this process for one method; returns timings.

    For ``routing_safe`` with ``candidate_dir``, the adapted candidate is also written there, whatever the
    safeguard decided, so its Dice can be set against the decision.
    """
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "routed_inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "pool_dir": str(pool), "dataset_dir": str(site_dir),
                   "output_dir": str(out_dir), "method": method, "adaptation#passes": passes,
                   "adaptation#seed": seed, **(extra or {})})
    parser.get_parsed_content("initialize")
    adapter, evaluator = parser.get_parsed_content("adapter"), parser.get_parsed_content("evaluator")
    t0 = time.time()
    adapter.run()
    t1 = time.time()
    if candidate_dir is not None:
        network = parser.get_parsed_content("network")
        decided = network.use_fallback
        network.use_fallback = False
        evaluator.run()
        if candidate_dir.exists():
            import shutil

            shutil.rmtree(candidate_dir)
        Path(out_dir).rename(candidate_dir)
        network.use_fallback = decided
        t1 = time.time()
    evaluator.run()
    return {"adapt_s": t1 - t0, "infer_s": time.time() - t1, "history": adapter.history}


def score(site_dir: Path, pred_dir: Path) -> dict:
    """{case: Dice} for every labelled volume of the site."""
    from fedharmony.core.results import mask_dice

    out = {}
    for label in sorted(site_dir.glob("*_segmentation.nii.gz")):
        case = label.name.replace("_segmentation.nii.gz", "")
        out[case] = mask_dice(pred_dir / f"{case}_seg.nii.gz", label)
    if not out:
        raise RuntimeError(f"no labelled volume in {site_dir}")
    return out


# the bundle CLI, reporting its own peak RSS (VmHWM) at exit: ru_maxrss of a child would
# include this (large) parent process's memory at fork time
_CLI_WITH_PEAK = ("import atexit, runpy, sys\n"
                  "atexit.register(lambda: print('PEAK_KIB', [l.split()[1] for l in open('/proc/self/status') "
                  "if l.startswith('VmHWM')][0], file=sys.stderr))\n"
                  "sys.argv[0] = 'monai.bundle'\n"
                  "runpy.run_module('monai.bundle', run_name='__main__')")


def cli_cost(method: str, pool: Path, site_dir: Path, out_dir: Path, passes: int) -> dict:
    """The bundle CLI as a user runs it, in its own process: wall seconds and peak RSS (MiB)."""
    cmd = [sys.executable, "-c", _CLI_WITH_PEAK, "run", "--config_file",
           str(BUNDLE / "configs" / "routed_inference.json"), "--bundle_root", str(BUNDLE), "--pool_dir", str(pool),
           "--dataset_dir", str(site_dir), "--output_dir", str(out_dir), "--method", method,
           "--adaptation#passes", str(passes)]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    peak = [line.split()[1] for line in res.stderr.splitlines() if line.startswith("PEAK_KIB")]
    if res.returncode != 0 or not peak:
        raise RuntimeError(f"bundle CLI ({method}) failed:\n{res.stderr[-2000:]}")
    return {"wall_s": wall, "peak_rss_mib": int(peak[-1]) / 1024}


def site_means(runs: dict, methods: list) -> dict:
    """{site: {method: mean over seeds}} of one kind of outside result ({site: {seed: result}})."""
    return {site: {m: sum(r["mean"][m] for r in by_seed.values()) / len(by_seed) for m in methods}
            for site, by_seed in runs.items()}


def plot(panels: dict, methods: list, path: Path):
    """One bar panel per kind of outside result: each site's Dice (mean over seeds) and the mean over sites."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 4.2 * len(panels)), squeeze=False)
    for ax, (title, runs) in zip(axes[:, 0], panels.items()):
        means = site_means(runs, methods)
        sites = list(means)
        x = np.arange(len(sites) + 1)
        width = 0.85 / len(methods)
        for i, m in enumerate(methods):
            vals = [means[s][m] for s in sites]
            ax.bar(x + (i - len(methods) / 2 + 0.5) * width, vals + [sum(vals) / len(vals)], width, label=m,
                   color=plt.cm.tab20(i % 20))  # more methods than the default cycle's 10 colours
        ax.set_xticks(x, [*sites, "mean"])
        ax.set_ylabel("foreground Dice (mean over seeds)")
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(title, fontsize=10)
    axes[0, 0].legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def difference_rows(runs: dict, methods: list, baseline: str = "global") -> list:
    """Markdown rows: each method minus the baseline on the mean over sites (per seed, then a CI over seeds),
    and on the worst site (the site whose mean-over-seeds difference is lowest)."""
    seeds = sorted({seed for by_seed in runs.values() for seed in by_seed}, key=int)
    complete = [s for s in seeds if all(s in by_seed for by_seed in runs.values())]
    rows = []
    for m in methods:
        if m == baseline:
            continue
        diffs = [sum(runs[site][s]["mean"][m] - runs[site][s]["mean"][baseline] for site in runs) / len(runs)
                 for s in complete]
        per_site = {site: sum(r["mean"][m] - r["mean"][baseline] for r in by_seed.values()) / len(by_seed)
                    for site, by_seed in runs.items()}
        rows.append(_difference_row(m, diffs, per_site))
    return [f"difference from {baseline} ({len(complete)} seeds; per seed the mean over {len(runs)} sites; "
            f"t and bootstrap 95% CI over seeds)\n", *DIFFERENCE_HEADER, *rows]


DIFFERENCE_HEADER = ["| method | difference | t CI | bootstrap CI | verdict | worst site | sites > 1 point worse |",
                     "|---|---|---|---|---|---|---|"]


def _difference_row(method: str, diffs: list, per_site: dict) -> str:
    """A Markdown row: the mean of the per-seed differences ``diffs`` with its t and bootstrap CIs and verdict,
    and from ``per_site`` (site -> mean difference over seeds) the worst site and the sites > 1 point worse."""
    from fedharmony.study.stats import bootstrap_ci, excludes_zero, t_interval

    mean, lo, hi = t_interval(diffs)
    _, blo, bhi = bootstrap_ci(diffs) if len(diffs) > 1 else (0.0, float("nan"), float("nan"))
    worst = min(per_site, key=per_site.get)
    if len(diffs) < MIN_SEEDS_FOR_VERDICT:
        verdict = f"none (fewer than {MIN_SEEDS_FOR_VERDICT} seeds)"
    elif excludes_zero(lo, hi) and excludes_zero(blo, bhi):  # the product's rule: both CIs exclude zero
        verdict = "better" if lo > 0 else "worse"
    else:
        verdict = "no difference shown"
    return (f"| {method} | {mean:+.3f} | [{lo:+.3f}, {hi:+.3f}] | [{blo:+.3f}, {bhi:+.3f}] | {verdict} | "
            f"{worst} {per_site[worst]:+.3f} | {sum(v < -0.01 for v in per_site.values())} of {len(per_site)} |")


def _right_call(kept: str, gain: float):
    """Did keeping ``kept`` pick the network with the higher Dice (``gain``: adapted - global)? None for a tie."""
    return None if abs(gain) < TIE else (kept == "adapted") == (gain > 0)


def _call_text(call) -> str:
    return "either (tie)" if call is None else ("yes" if call else "no")


def _decisions(runs: dict, name: str, evidence: str):
    """(site, seed, result, decision) for each (site, seed) whose ``name`` run recorded a safeguard decision with
    ``evidence`` (e.g. ``candidate_loss``), sites in order and seeds in number order."""
    for site, by_seed in runs.items():
        for seed, r in sorted(by_seed.items(), key=lambda kv: int(kv[0])):
            d = r["timings"].get(name, {}).get("history", [{}])[-1].get("safeguard")
            if d and d.get(evidence) is not None:
                yield site, seed, r, d


def safeguard_rows(runs: dict) -> list:
    """Does the safeguard's unsupervised criterion pick the better network? One row per (site, seed): the decision
    as made (5 % margin) and what the bare comparison of the two held-out losses (no margin) would have picked."""
    rows = ["| site | seed | held-out loss: adapted / global | kept (5 % margin) | lower loss | "
            "Dice adapted - global | decision right | lower loss right |", "|---|---|---|---|---|---|---|---|"]
    right = {"decision": [0, 0], "loss": [0, 0]}
    for site, seed, r, d in _decisions(runs, "routing_safe", "candidate_loss"):
        gain = r["mean"][SAFE_CANDIDATE] - r["mean"]["global"]
        lower = "adapted" if d["candidate_loss"] < d["global_loss"] else "global"
        verdicts = []
        for key, pick in (("decision", d["kept"]), ("loss", lower)):
            call = _right_call(pick, gain)
            if call is not None:
                right[key][0] += call
                right[key][1] += 1
            verdicts.append(_call_text(call))
        rows.append(f"| {site} | {seed} | {d['candidate_loss']:.3f} / {d['global_loss']:.3f} | {d['kept']} | "
                    f"{lower} | {gain:+.3f} | {verdicts[0]} | {verdicts[1]} |")
    rows.append(f"\nthe safeguard's decision picked the network with the higher Dice in {right['decision'][0]} of "
                f"{right['decision'][1]} cases, the lower held-out loss alone in {right['loss'][0]} of "
                f"{right['loss'][1]} (Dice gaps under {TIE} counted as ties, left out)\n")
    return rows


def _criterion(name: str) -> str:
    """The criterion in a safeguard row's name: ``routing_safe (consensus)`` -> ``consensus``."""
    return name.split("(")[-1].rstrip(")")


def consensus_rows(runs: dict, name: str = "routing_safe (consensus)") -> list:
    """An agreement criterion's calls (``consensus`` or ``departure``), one row per (site, seed): both networks'
    held-out agreement with the pool's consensus, the network kept, and whether it had the higher Dice. Its masks
    must be those of the network it kept (routing_safe's candidate or the global model): a row that is not says
    so. Calls derived from a stored record (``DERIVED``) are counted."""
    rows = ["| site | seed | held-out agreement: adapted / global | kept | Dice adapted - global | decision right |",
            "|---|---|---|---|---|---|"]
    right, unpaired, derived = [0, 0], [], 0
    for site, seed, r, d in _decisions(runs, name, "candidate_agreement"):
        derived += "derived_from" in r["timings"][name]
        gain = r["mean"][SAFE_CANDIDATE] - r["mean"]["global"]
        call = _right_call(d["kept"], gain)
        if call is not None:
            right[0] += call
            right[1] += 1
        expected = r["mean"][SAFE_CANDIDATE if d["kept"] == "adapted" else "global"]
        if abs(r["mean"][name] - expected) > 1e-6:
            unpaired.append(f"{site} seed {seed}")
        rows.append(f"| {site} | {seed} | {d['candidate_agreement']:.3f} / {d['global_agreement']:.3f} | "
                    f"{d['kept']} | {gain:+.3f} | {_call_text(call)} |")
    rows.append(f"\nthe {_criterion(name)} safeguard picked the network with the higher Dice in "
                f"{right[0]} of {right[1]} cases (Dice gaps under {TIE} counted as ties, left out); its masks were "
                f"those of the network it kept in every case" + (f" except {', '.join(unpaired)}" if unpaired else "")
                + (f"; {derived} of these calls were derived from the {_criterion(DERIVED[name][0])} "
                   "criterion's stored agreements (made before this criterion existed), not run"
                   if derived else "") + "\n")
    return rows


def labelled_rows(runs: dict, name: str = LABELLED) -> list:
    """The labelled criterion: one row per (site, seed) with both networks' mean Dice on the labelled volumes, the
    network kept and whether it had the higher Dice on the site's other volumes; then each method's difference
    from the global model on the volumes without a label (the fair test: the labelled ones chose the network)."""
    rows = ["| site | seed | labelled volumes | their Dice: adapted / global | kept | "
            "Dice adapted - global, the other volumes | decision right |", "|---|---|---|---|---|---|---|"]
    right, unpaired, derived = [0, 0], [], 0
    unlabelled: dict = {}  # site -> seed -> {method: mean Dice on the volumes without a label}
    for site, seed, r, d in _decisions(runs, name, "candidate_dice"):
        derived += "derived_from" in r["timings"][name]
        rest = [c for c in r["per_volume"]["global"] if c not in set(d["labelled_volumes"])]
        means = {m: sum(r["per_volume"][m][c] for c in rest) / len(rest)
                 for m in ("global", SAFE_CANDIDATE, "routing", name)}
        unlabelled.setdefault(site, {})[seed] = means
        gain = means[SAFE_CANDIDATE] - means["global"]
        call = _right_call(d["kept"], gain)
        if call is not None:
            right[0] += call
            right[1] += 1
        expected = r["per_volume"][SAFE_CANDIDATE if d["kept"] == "adapted" else "global"]
        if any(abs(r["per_volume"][name][c] - expected[c]) > 1e-6 for c in expected):
            unpaired.append(f"{site} seed {seed}")
        rows.append(f"| {site} | {seed} | {', '.join(d['labelled_volumes'])} | {d['candidate_dice']:.3f} / "
                    f"{d['global_dice']:.3f} | {d['kept']} | {gain:+.3f} | {_call_text(call)} |")
    if not unlabelled:
        return []
    rows.append(f"\nthe labelled safeguard picked the network with the higher Dice on the other volumes in {right[0]} "
                f"of {right[1]} cases (Dice gaps under {TIE} counted as ties, left out); its masks were those of the "
                f"network it kept in every case" + (f" except {', '.join(unpaired)}" if unpaired else "")
                + (f"; {derived} of these calls were derived from the study's per-volume Dice of routing_safe's "
                   "adapted network and the global model, not run (the same voxels the bundle judges, with this "
                   "study's geometry)" if derived else "") + "\n")
    seeds = sorted({s for by_seed in unlabelled.values() for s in by_seed}, key=int)
    complete = [s for s in seeds if all(s in by_seed for by_seed in unlabelled.values())]
    rows += [f"on the volumes without a label: difference from global ({len(complete)} seeds; per seed the mean over "
             f"{len(unlabelled)} sites; t and bootstrap 95% CI over seeds)\n", *DIFFERENCE_HEADER]
    single = []  # the bar is on each site's mean over seeds; a site sees one seed: how often is one case worse?
    for m in ("routing", SAFE_CANDIDATE, name):
        diffs = [sum(by_seed[s][m] - by_seed[s]["global"] for by_seed in unlabelled.values()) / len(unlabelled)
                 for s in complete]
        per_site = {site: sum(v[m] - v["global"] for v in by_seed.values()) / len(by_seed)
                    for site, by_seed in unlabelled.items()}
        rows.append(_difference_row(m, diffs, per_site))
        cases = sorted((v[m] - v["global"], site, seed) for site, by_seed in unlabelled.items()
                       for seed, v in by_seed.items())
        single.append(f"{m} {sum(c[0] < -0.01 for c in cases)} of {len(cases)} (worst {cases[0][1]} seed "
                      f"{cases[0][2]} {cases[0][0]:+.3f})")
    return rows + ["", "single (site, seed) cases more than 1 point below global on these volumes: "
                   + "; ".join(single), ""]


def routing_rows(runs: dict) -> list:
    """How far routing moved: the unsupervised loss per pass and the largest routing weight, per (site, seed)."""
    rows = ["| site | seed | method | loss per pass | routing weights, last pass (min .. max) |", "|---|---|---|---|---|"]
    for site, by_seed in runs.items():
        for seed, r in sorted(by_seed.items(), key=lambda kv: int(kv[0])):
            for m, t in r["timings"].items():
                if m in SAFEGUARDS:  # adapted exactly as routing_safe: the same rows again
                    continue
                hist = [h for h in t.get("history", []) if "routing_weights" in h]
                if not hist:
                    continue
                w = list(hist[-1]["routing_weights"].values())
                losses = " -> ".join(f"{h['loss']:.3f}" for h in hist)
                rows.append(f"| {site} | {seed} | {m} | {losses} | {min(w):.3f} .. {max(w):.3f} |")
    return rows


def outside_site(pool: Path, site_dir: Path, pred_root: Path, label: dict, args, seed: int,
                 done: dict | None = None) -> dict:
    """Segment every volume of one outside site with every method; Dice per volume and per method. With ``done``
    (this site's stored result), only the methods it lacks run (a sweep variant added later)."""
    experts = [e["name"] for e in json.loads((pool / "manifest.json").read_text())["experts"]
               if e["kind"] == "personalized"]
    runs = [(m, m, {}, args.passes if m in ADAPTIVE else 0) for m in ["global", *experts, "expert_mean", *ADAPTIVE]]
    runs += [(name, m, extra, args.passes * k) for name, (m, extra, k) in SAFEGUARDS.items()]
    if args.sweep:
        runs += [(name, m, extra, args.passes * k) for name, (m, extra, k) in SWEEP.items()]
    per_method = dict((done or {}).get("per_volume", {}))
    timings = dict((done or {}).get("timings", {}))
    for name, method, extra, passes in runs:
        key = f"personalized {label[name]}" if name in experts else name
        if key in per_method:
            continue
        pred = pred_root / name.replace(",", "").replace(" ", "_")
        cand = pred_root / "routing_safe_candidate" if name == "routing_safe" else None
        if name == LABELLED:  # the site's labelled volumes: those the other criteria hold out
            extra = {**extra, "labelled_dir": str(labelled_folder(site_dir, pred_root / "labelled"))}
        t = segment(method, pool, site_dir, pred, passes, seed, extra, cand)
        per_method[key] = score(site_dir, pred)
        if cand is not None:
            per_method[SAFE_CANDIDATE] = score(site_dir, cand)
        timings[key] = {k: v for k, v in t.items() if k != "history"}
        if t["history"]:
            timings[key]["history"] = t["history"]
    mean = {m: sum(v.values()) / len(v) for m, v in per_method.items()}
    alone = [mean[f"personalized {label[e]}"] for e in experts]
    mean["personalized (mean)"] = sum(alone) / len(alone)
    mean["personalized (best, oracle)"] = max(alone)
    return {"per_volume": per_method, "mean": mean, "timings": timings, "volumes": len(per_method["global"])}


def labelled_cases(cases) -> list:
    """The cases the labelled criterion is given labels for: the first and every ``HOLDOUT_EVERY``-th after it,
    in the order the bundle reads them (sorted), as the other criteria hold them out."""
    return sorted(cases)[::HOLDOUT_EVERY]


def labelled_folder(site_dir: Path, folder: Path) -> Path:
    """``folder`` holding copies of the labels of the site's :func:`labelled_cases` (the ``labelled_dir``)."""
    import shutil

    labels = {p.name.replace("_segmentation.nii.gz", ""): p for p in site_dir.glob("*_segmentation.nii.gz")}
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for case in labelled_cases(labels):
        shutil.copyfile(labels[case], folder / labels[case].name)
    return folder


def _derived_decision(r: dict, source: str, criterion: str) -> dict | None:
    """The decision a ``DERIVED`` criterion makes from a stored (site, seed) result, or None where it lacks the
    evidence (``departure``: the consensus run's agreements; ``labelled``: the adapted network's per-volume Dice)."""
    if criterion == "labelled":
        dice = r["per_volume"].get(source)
        if not dice:
            return None
        cases = labelled_cases(dice)
        candidate = sum(dice[c] for c in cases) / len(cases)
        glob = sum(r["per_volume"]["global"][c] for c in cases) / len(cases)
        return {"criterion": criterion, "candidate_dice": candidate, "global_dice": glob,
                "kept": "adapted" if candidate > glob else "global", "labelled_volumes": cases}
    from fedharmony.methods.iopfl.adaptation import SAFEGUARD_MARGIN, departure_keeps

    d = r["timings"].get(source, {}).get("history", [{}])[-1].get("safeguard")
    if not d or d.get("candidate_agreement") is None:
        return None
    margin = SAFEGUARD_MARGIN  # the bundle's default, which the study runs
    keep = departure_keeps(d["candidate_agreement"], d["global_agreement"], margin)
    return {**{k: v for k, v in d.items() if k != "reason"}, "criterion": criterion,
            "kept": "adapted" if keep else "global", "margin": margin}


def derive_safeguards(results: dict) -> int:
    """Fill each ``DERIVED`` criterion into the stored outside results that lack it, from its source's stored
    record; returns how many (site, seed) entries were filled."""
    filled = 0
    for kind in ("unseen", "loso"):
        for by_seed in results.get(kind, {}).values():
            for r in by_seed.values():
                for name, (source, criterion) in DERIVED.items():
                    decision = None if name in r["mean"] else _derived_decision(r, source, criterion)
                    if decision is None:
                        continue
                    kept = SAFE_CANDIDATE if decision["kept"] == "adapted" else "global"
                    r["per_volume"][name] = dict(r["per_volume"][kept])
                    r["mean"][name] = r["mean"][kept]
                    r["timings"][name] = {"derived_from": source, "history": [{"safeguard": decision}]}
                    filled += 1
    return filled


def drop_derived(results: dict) -> int:
    """Remove the derived entries (``--run-derived``: those criteria then run for real); returns how many."""
    dropped = 0
    for kind in ("unseen", "loso"):
        for by_seed in results.get(kind, {}).values():
            for r in by_seed.values():
                for name in DERIVED:
                    if "derived_from" in r["timings"].get(name, {}):
                        for key in ("mean", "per_volume", "timings"):
                            r[key].pop(name, None)
                        dropped += 1
    return dropped


def missing_methods(done: dict, args) -> list:
    """The safeguard and sweep variants a stored (site, seed) result lacks (added to the tool after it ran)."""
    return [name for name in [*SAFEGUARDS, *(SWEEP if args.sweep else [])] if name not in done["mean"]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1 (data and training)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--cases", type=int, default=10, help="cases per phantom site")
    p.add_argument("--iop-alpha", type=float, default=0.1)
    p.add_argument("--passes", type=int, default=2, help="adaptation passes over an outside site")
    p.add_argument("--unseen", action="store_true", help="score the 6-site pool on scanners none of the sites has")
    p.add_argument("--unseen-profiles", default=str(UNSEEN_PROFILES), help="profile file of those scanners")
    p.add_argument("--holdout", nargs="*", choices=SITES, default=SITES,
                   help="leave-one-site-out sites (give the flag alone for none)")
    p.add_argument("--no-inside", action="store_true", help="skip the 6-site federation (and so --unseen)")
    p.add_argument("--sweep", action="store_true", help="add routing with 10x lr, with 4x passes and with the released online schedule")
    p.add_argument("--out", default=str(REPO / "workspace" / "iopfl"))
    p.add_argument("--run-derived", action="store_true",
                   help="run the criteria that stored results only have derived (DERIVED) for real, on the stored "
                        "federations; the way to check a derivation")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite OUT/report.md, outside.csv and outside_dice.png from OUT/iopfl_study.json; run nothing")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.unseen and args.no_inside:
        p.error("--unseen scores the 6-site federation's pool; it cannot go with --no-inside")
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out).resolve()
    store = out / "iopfl_study.json"
    if args.report_only:
        if not store.is_file():
            p.error(f"--report-only: no stored results at {store}")
        stored = json.loads(store.read_text())
        derive_safeguards(stored)  # in the report only: the stored file stays as it was measured
        return write_report(stored, args, out)  # the header of the run that made them
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    setting = (f"phantom sites x {args.cases} cases, {args.rounds} rounds x {args.local_epochs} local epochs, "
               f"a = {args.iop_alpha}, {args.passes} adaptation passes")
    lines = header("iopfl_study.py", argv) + [f"setting: {setting}, seeds 0..{args.seeds - 1}"]
    print("\n".join(lines) + "\n", flush=True)
    results = json.loads(store.read_text()) if store.is_file() else {}
    if results.get("setting") != setting:
        results = {}  # another setting: start over (federations are still reused from OUT/sim)
    if results.get("header") and results["header"] != lines:  # the stored runs' own header is kept, not overwritten
        results.setdefault("earlier_headers", []).append(results["header"])
    results.update({"header": lines, "setting": setting})  # more seeds later: the finished ones are kept
    for key in ("inside", "unseen", "loso", "cost"):
        results.setdefault(key, {})
    if args.run_derived:
        print(f"--run-derived: {drop_derived(results)} derived entries dropped; they run now", file=sys.stderr)
    else:
        derive_safeguards(results)  # stored results from before a derived criterion existed: not rerun for it

    def save():
        store.write_text(json.dumps(results, indent=2) + "\n")

    for seed in range(args.seeds):
        data = out / f"seed{seed}" / "data"
        ensure_phantom_sites(data, args.cases, seed)
        if not args.no_inside:
            print(f"seed {seed}: IOP-FL on 6 sites ...", file=sys.stderr, flush=True)
            run = run_iopfl(data, 6, f"iopfl_inside_seed{seed}", out, args, seed)
            from fedharmony.core.results import load_cross_site

            matrix = load_cross_site(run / "cross_site_val" / "cross_val_results.json")
            names = json.loads((data / "sites.json").read_text())
            results["inside"][str(seed)] = {names[s]: {"global": row["SRV_FL_global_model.pt"], "personalized": row[s]}
                                            for s, row in sorted(matrix.items())}
            save()
        if args.unseen:
            unseen_data = out / f"seed{seed}" / "unseen"
            if not (unseen_data / "sites.json").is_file():
                subprocess.run([sys.executable, str(REPO / "tools" / "make_phantom_sites.py"), "--out",
                                str(unseen_data), "--profiles", args.unseen_profiles, "--cases", str(args.cases),
                                "--seed", str(seed)], check=True, capture_output=True)
            pool = run / "model_pool"
            label = {f"site-{i + 1}": s for i, s in enumerate(SITES)}
            for site in json.loads((unseen_data / "sites.json").read_text()).values():
                site = unseen_data / site  # relative to sites.json (an absolute path stays as it is)
                name = site.name
                done = results["unseen"].get(name, {}).get(str(seed))
                if done and not missing_methods(done, args):
                    continue
                print(f"seed {seed}: unseen scanner {name} ...", file=sys.stderr, flush=True)
                results["unseen"].setdefault(name, {})[str(seed)] = outside_site(
                    pool, site, out / "predictions" / f"seed{seed}" / "unseen" / name, label, args, seed, done)
                save()
        for held in args.holdout:
            done = results["loso"].get(held, {}).get(str(seed))
            if done and not missing_methods(done, args):
                continue
            print(f"seed {seed}: held-out {held} ...", file=sys.stderr, flush=True)
            root = out / f"seed{seed}" / "loso" / held
            root.mkdir(parents=True, exist_ok=True)
            sources = [s for s in SITES if s != held]
            (root / "sites.json").write_text(json.dumps({f"site-{i + 1}": str(data / s)
                                                         for i, s in enumerate(sources)}, indent=2))
            pool = run_iopfl(root, len(sources), f"iopfl_without_{held}_seed{seed}", out, args, seed) / "model_pool"
            label = {f"site-{i + 1}": s for i, s in enumerate(sources)}
            results["loso"].setdefault(held, {})[str(seed)] = outside_site(
                pool, data / held, out / "predictions" / f"seed{seed}" / "loso" / held, label, args, seed, done)
            save()
        first = next(((k, site, by_seed[str(seed)]) for k in ("unseen", "loso")
                      for site, by_seed in results[k].items() if str(seed) in by_seed), None)
        if first and not results["cost"]:
            kind, site, r = first
            site_dir = (out / f"seed{seed}" / "unseen" / site) if kind == "unseen" else data / site
            run_name = f"iopfl_inside_seed{seed}" if kind == "unseen" else f"iopfl_without_{site}_seed{seed}"
            pool = out / "sim" / run_name / "server" / "simulate_job" / "model_pool"
            for method in ("global", "routing"):
                c = cli_cost(method, pool, site_dir, out / "cost" / method, args.passes if method in ADAPTIVE else 0)
                t = r["timings"][method]
                results["cost"][method] = {**c, "site": site, "volumes": r["volumes"],
                                           "s_per_volume": c["wall_s"] / r["volumes"],
                                           "in_process_s_per_volume": (t["adapt_s"] + t["infer_s"]) / r["volumes"]}
            save()
    return write_report(results, args, out, header_printed=True)


def write_report(results: dict, args, out: Path, header_printed: bool = False) -> int:
    """OUT/report.md (the stored header, then :func:`report`'s tables), printed too (less the header when it
    was printed at the start of the run); the CSV and the plot."""
    import contextlib
    import io

    text = io.StringIO()
    head = results["header"] + [  # invocations before the last one made some of the stored runs: name them
        "earlier run: " + "; ".join(line for line in earlier if line.startswith(("code:", "command:")))
        for earlier in results.get("earlier_headers", [])]
    with contextlib.redirect_stdout(text):
        print("\n".join("- " + line for line in head) + "\n")
        report(results, args, out)
    print(text.getvalue().split("\n", len(results["header"]))[-1] if header_printed else text.getvalue(), end="")
    (out / "report.md").write_text("# IOP-FL study (tools/iopfl_study.py)\n\nGenerated from `iopfl_study.json`; "
                                   "do not edit by hand.\n\n" + text.getvalue())
    # after the report, not in it: the path names this checkout, which the committed report should not
    print(f"\nwritten: {out / 'iopfl_study.json'}, {out / 'outside.csv'}, {out / 'outside_dice.png'}, "
          f"{out / 'report.md'}")
    return 0


def report(results: dict, args, out: Path):
    """Markdown tables, the CSV and the plot from the stored results."""
    from fedharmony.study.stats import t_interval

    if results["inside"]:
        seeds = sorted(results["inside"], key=int)
        sites = list(results["inside"][seeds[0]])
        print(f"inside: personalized - global on each site's test split ({len(seeds)} seeds; t 95% CI over seeds)\n")
        print("| site | global | personalized | difference | t CI |\n|---|---|---|---|---|")
        for site in [*sites, "mean"]:
            def val(seed, key):
                rows = results["inside"][seed]
                return (sum(r[key] for r in rows.values()) / len(rows)) if site == "mean" else rows[site][key]
            g = [val(s, "global") for s in seeds]
            d = [val(s, "personalized") - val(s, "global") for s in seeds]
            m, lo, hi = t_interval(d)
            print(f"| {'**mean**' if site == 'mean' else site} | {sum(g) / len(g):.3f} | {sum(g) / len(g) + m:.3f} | "
                  f"{m:+.3f} | [{lo:+.3f}, {hi:+.3f}] |")
        print()
    methods = list(TABLE) + (list(SWEEP) if args.sweep else [])
    panels = {}
    with open(out / "outside.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["kind", "site", "seed", *methods, "volumes"])
        for kind, title in (("unseen", "new scanners (pool of the 6-site federation)"),
                            ("loso", "leave-one-site-out (pool of the other 5 sites)")):
            runs = {site: by_seed for site, by_seed in results[kind].items() if by_seed}
            if not runs:
                continue
            methods_here = [m for m in methods if all(m in r["mean"] for bs in runs.values() for r in bs.values())]
            panels[f"IOP-FL outside: {title}"] = runs
            for site, by_seed in runs.items():
                for seed, r in sorted(by_seed.items(), key=lambda kv: int(kv[0])):
                    w.writerow([kind, site, seed, *(f"{r['mean'].get(m, float('nan')):.4f}" for m in methods),
                                r["volumes"]])
            means = site_means(runs, methods_here)
            print(f"outside, {title}: foreground Dice per site, mean over seeds\n")
            print("| site | " + " | ".join(methods_here) + " |\n|" + "---|" * (len(methods_here) + 1))
            for site, row in means.items():
                print(f"| {site} | " + " | ".join(f"{row[m]:.3f}" for m in methods_here) + " |")
            print("| **mean** | " + " | ".join(f"{sum(r[m] for r in means.values()) / len(means):.3f}"
                                             for m in methods_here) + " |\n")
            print("\n".join(difference_rows(runs, methods_here)) + "\n")
            print("safeguard: did the unsupervised criterion on held-out volumes pick the better network?\n")
            print("\n".join(safeguard_rows(runs)))
            for name in SAFEGUARDS:
                if name == LABELLED:
                    rows = labelled_rows(runs)
                    if rows:
                        print("labelled safeguard: did a few labelled volumes of the site pick the better network?\n")
                        print("\n".join(rows))
                elif any(name in r["mean"] for bs in runs.values() for r in bs.values()):
                    criterion = _criterion(name)
                    print(f"{criterion} safeguard: did agreement with the pool's consensus on held-out volumes, "
                          f"judged by the {criterion} rule, pick the better network?\n")
                    print("\n".join(consensus_rows(runs, name)))
            print("routing: the unsupervised loss per adaptation pass and the spread of the routing weights\n")
            print("\n".join(routing_rows(runs)) + "\n")
    if results["cost"]:
        print("| method (bundle CLI, own process) | site | volumes | wall s | s / volume | in-process s / volume | "
              "peak RSS MiB |\n|---|---|---|---|---|---|---|")
        for m, c in results["cost"].items():
            print(f"| {m} | {c['site']} | {c['volumes']} | {c['wall_s']:.1f} | {c['s_per_volume']:.2f} | "
                  f"{c['in_process_s_per_volume']:.2f} | {c['peak_rss_mib']:.0f} |")
    if panels:
        plot(panels, [m for m in methods if m != SAFE_CANDIDATE], out / "outside_dice.png")



if __name__ == "__main__":
    sys.exit(main())
