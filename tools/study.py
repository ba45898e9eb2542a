#!/usr/bin/env python
"""Compare federated methods with seeds, confidence intervals and a generated report.

    python tools/study.py --task prostate --methods fedavg fedprox fedbn harmofl iopfl prrfl local pooled \\
                          --seeds 5 --preset standard --out docs/studies/prostate
    python tools/study.py --task dermoscopy --methods fedavg fedbn harmofl prrfl local pooled --seeds 5 --out DIR
    python tools/study.py --plan docs/studies/prostate_headroom/plan.json   # a planned study (commit the plan first)
    python tools/study.py --report-only DIR        # rebuild report.md, results.csv and figures from results.json
    python tools/study.py --scale --out DIR        # cost as sites and image size grow (tiny data)
    python tools/study.py --outside unseen --unseen-set 2 --seeds 3 --out docs/studies/iopfl_unseen_2
    python tools/study.py --outside loso --seeds 5 --out docs/studies/iopfl_loso   # IOP-FL's pool outside

Every (method, seed) of a federated method is one run of the task's job script
(``jobs/<task>.py``) in the NVFlare simulator; ``local`` trains each site alone and
``pooled`` trains one model on all sites' training data, for the same epochs. Each seed
draws new phantom data (training draw and a separate test draw of ``--test-cases`` per
site) and sets the bundle's seed; with ``--data-root`` the prepared datalists' own splits
are used. Runs are cached in ``DIR/runs/<method>/seed<k>/`` (rerun the command to resume;
a corrupt entry is named and run again); NVFlare's output goes to each run's ``log.txt``.

Writes ``DIR/results.json`` (every run's per-site scores, curves, timings), ``results.csv``,
``report.md`` (means and 95% CIs, paired differences to FedAvg with bootstrap CIs and
Wilcoxon p-values, curves, forest plot) and the figures. ``--retrogress`` adds what each
communication costs the model a site uses (PRR-FL's "retrogress", its deputy's too), with CIs
over seeds and a figure.

``--outside unseen|loso`` runs an outside study (:mod:`fedharmony.study.outside`): an IOP-FL federation's
model pool on scanners no site has (``--unseen-set N``: ``docs/studies/unseen_scanners/setN.json``) or on each
site held out in turn, every test-time method (global, personalized, BN statistics, TENT, routing, the routing
safeguard's criteria) per target and seed, cached in ``DIR/runs/<target>/seed<k>/``, with the same report
sections and verdict rules as the other studies. See docs/studies.md.
"""

import argparse
import shlex
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def parser() -> argparse.ArgumentParser:
    """The command line (every kind of study the tool runs)."""
    from fedharmony.study.tasks import METHODS, PRESETS, TASKS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", help="an analysis plan (JSON, committed before the first run): the study's task, arms, "
                                  "seeds, sizes and verdicts come from it (docs/studies.md, 'Analysis plans')")
    p.add_argument("--task", choices=sorted(TASKS), help="the task (bundle + phantom sites)")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help=f"any of {' '.join(METHODS)}")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0 .. N-1 (default 5)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="standard")
    p.add_argument("--test-cases", type=int, help="test draw per site (default: the preset's)")
    p.add_argument("--data-root", help="prepared real data (site folders + sites.json) instead of phantom sites")
    p.add_argument("--rounds", type=int, help="change the preset's rounds")
    p.add_argument("--local-epochs", type=int, help="change the preset's local epochs")
    p.add_argument("--out", help="study folder")
    p.add_argument("--keep-workspaces", action="store_true", help="keep each run's simulator workspace")
    p.add_argument("--retrogress", action="store_true",
                   help="sites also score their model after local training (and PRR-FL's deputy): the report adds "
                        "what each communication costs (a setting of the runs: they are not shared with a study "
                        "without it)")
    p.add_argument("--pixel-scales", type=float, nargs="+", metavar="F",
                   help="also score every run's models on the test scans resampled in-plane to F times their pixel "
                        "size over the same field of view (e.g. 0.6 0.8 1.25 1.5; 1 is always added); the report "
                        "adds a pixel-size table and figure (a setting of the runs, like --retrogress)")
    p.add_argument("--report-only", metavar="DIR", help="rebuild the report of a finished study from results.json")
    p.add_argument("--collect-only", action="store_true",
                   help="write results.json and the report from the cached runs; run nothing")
    p.add_argument("--scale", action="store_true", help="measure cost against sites and image size (tiny data)")
    p.add_argument("--scale-sites", type=int, nargs="+", default=[3, 6, 12, 24], metavar="N",
                   help="--scale: site counts (default 3 6 12 24)")
    p.add_argument("--scale-sizes", type=int, nargs="+", default=[64, 96, 192, 384], metavar="PX",
                   help="--scale: in-plane sizes, multiples of 16 (default 64 96 192 384)")
    p.add_argument("--scale-processes", type=int, default=0, metavar="N",
                   help="--scale: at most N site processes at a time (default 0: one per site, as the job scripts)")
    outside = p.add_argument_group("outside studies (IOP-FL's model pool on sites outside its federation)")
    outside.add_argument("--outside", choices=("unseen", "loso"),
                         help="unseen: scanners no site has; loso: each site held out in turn")
    outside.add_argument("--unseen-set", type=int, default=1, metavar="N",
                         help="--outside unseen: the scanners of docs/studies/unseen_scanners/setN.json (default 1)")
    outside.add_argument("--holdout", nargs="+", metavar="SITE", help="--outside loso: the sites held out (default all)")
    outside.add_argument("--cases", type=int, default=10, help="phantom cases per site (default 10)")
    outside.add_argument("--iop-alpha", type=float, default=0.1, help="IOP-FL's alpha (default 0.1)")
    outside.add_argument("--passes", type=int, default=2, help="adaptation passes over a target (default 2)")
    outside.add_argument("--sweep", action="store_true",
                         help="add routing with 10x the learning rate, 4x the passes and the released online schedule")
    outside.add_argument("--run-derived", action="store_true",
                         help="run for real the safeguard criteria that stored results only derive")
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    command = "python tools/study.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    from fedharmony.study.report import load_results, write_report

    if args.report_only:
        try:
            if _is_outside(args.report_only):
                from fedharmony.study.outside_report import write_outside_report

                report = write_outside_report(args.report_only)
            else:
                report = write_report(args.report_only, load_results(args.report_only))
        except (FileNotFoundError, ValueError) as e:
            p.error(str(e))
        print(f"report: {report}")
        return 0
    if args.outside:
        return _outside(p, args, argv, command)
    if args.scale:
        if not args.out:
            p.error("--out is required")
        if min(args.scale_sites) < 1 or any(s < 16 or s % 16 for s in args.scale_sizes):
            p.error("--scale-sites must be >= 1 and --scale-sizes positive multiples of 16")
        from fedharmony.study.scaling import run_scaling

        run_scaling(Path(args.out), command=command, sites=args.scale_sites, sizes=args.scale_sizes,
                    max_processes=args.scale_processes)
        return 0
    from fedharmony.study.plan import PlanError
    from fedharmony.study.runner import Study

    common = dict(test_cases=args.test_cases, data_root=args.data_root, keep_workspaces=args.keep_workspaces,
                  echo=lambda line: print(line, flush=True), command=command, retrogress=args.retrogress)
    if args.pixel_scales:
        common["pixel_scales"] = args.pixel_scales
    if args.plan:
        given = [flag for flag, value in (("--task", args.task), ("--methods", args.methods), ("--rounds", args.rounds),
                                          ("--local-epochs", args.local_epochs), ("--pixel-scales", args.pixel_scales))
                 if value]
        given += ["--seeds"] if "--seeds" in (argv if argv is not None else sys.argv[1:]) else []
        given += ["--preset"] if "--preset" in (argv if argv is not None else sys.argv[1:]) else []
        if given:
            p.error(f"{', '.join(given)}: a planned study takes these from its plan ({args.plan})")
        try:
            from fedharmony.study.plan import load_plan

            if load_plan(args.plan).outside is not None:  # an outside study's plan
                return _outside_planned(p, args, command)
            study = Study.from_plan(args.plan, args.out, **common)
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
    else:
        if not args.task or not args.methods or not args.out:
            p.error("--task, --methods and --out are required (or --plan PLAN, --report-only DIR, or --scale)")
        try:
            study = Study(args.task, args.methods, args.seeds, args.preset, args.out, rounds=args.rounds,
                          local_epochs=args.local_epochs, **common)
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
    try:
        results = study.collect() if args.collect_only else study.run()
    except PlanError as e:  # a plan refused at the start (changed after its first run, not committed)
        p.error(str(e))
    report = write_report(study.out, results)
    print(f"results: {study.out / 'results.json'}\nreport: {report}")
    return 1 if results["failed"] else 0


def _is_outside(folder) -> bool:
    """Whether the study folder holds an outside study's results."""
    import json

    path = Path(folder) / "results.json"
    try:
        return json.loads(path.read_text()).get("study") == "outside"
    except (OSError, ValueError, AttributeError):
        return False  # the study report's loader names the problem


def _outside(p, args, argv, command) -> int:
    from fedharmony.study.outside import OutsideStudy, unseen_set
    from fedharmony.study.outside_report import write_outside_report

    given = argv if argv is not None else sys.argv[1:]
    wrong = [flag for flag in ("--task", "--methods", "--plan", "--preset", "--test-cases", "--data-root",
                               "--retrogress", "--keep-workspaces", "--scale", "--pixel-scales") if flag in given]
    if wrong:
        p.error(f"{', '.join(wrong)}: not options of an outside study (--outside)")
    if args.outside == "loso" and "--unseen-set" in given or args.outside == "unseen" and args.holdout:
        p.error("--unseen-set is for --outside unseen, --holdout for --outside loso")
    if not args.out:
        p.error("--out is required")
    try:
        study = OutsideStudy(args.outside, args.seeds, args.out,
                             profiles=unseen_set(args.unseen_set) if args.outside == "unseen" else None,
                             holdout=args.holdout, cases=args.cases, rounds=args.rounds or 20,
                             local_epochs=args.local_epochs or 2, iop_alpha=args.iop_alpha, passes=args.passes,
                             sweep=args.sweep, run_derived=args.run_derived, command=command,
                             echo=lambda line: print(line, flush=True))
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    results = study.run(collect_only=args.collect_only)
    report = write_outside_report(study.out, results)
    print(f"results: {study.out / 'results.json'}\nreport: {report}")
    return 1 if results["failed"] else 0


def _outside_planned(p, args, command) -> int:
    from fedharmony.study.outside import OutsideStudy
    from fedharmony.study.outside_report import write_outside_report
    from fedharmony.study.plan import PlanError

    try:
        study = OutsideStudy.from_plan(args.plan, args.out, command=command, echo=lambda line: print(line, flush=True))
        results = study.run(collect_only=args.collect_only)
    except PlanError as e:  # refused at the start (changed after its first run, not committed)
        p.error(str(e))
    report = write_outside_report(study.out, results)
    print(f"results: {study.out / 'results.json'}\nreport: {report}")
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
