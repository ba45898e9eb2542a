#!/usr/bin/env python
"""Benchmark federations on the phantom classification sites (NVFlare simulator, same seeds and rounds).

    python tools/benchmark_classification.py                       # dermoscopy: FedAvg, FedBN, HarmoFL, PRR-FL
    python tools/benchmark_classification.py --task histology --algorithms fedavg harmofl
    python tools/benchmark_classification.py --rounds 20 --local-epochs 2 --out workspace/bench_cls

For each algorithm one simulator run (one process per site, 1 torch thread each), then:
  * per-site and mean test accuracy, macro-F1 and one-vs-rest AUC of the model each site
    keeps: the one that scored best on its own validation split over the rounds (the
    cross-site matrix's diagonal). That is the global model of the site's best round for
    FedAvg / HarmoFL, the global model with the site's own norm layers for FedBN, and the
    personalized model for PRR-FL;
  * the "retrogress" curve: mean validation macro-F1 over sites of the model each site
    uses, right after each communication (round start) and after local training, so the
    drop a communication causes is visible; written as a PNG, and summarised as the mean drop
    (after training in round t-1 minus round start t, over t >= 1);
  * wall time.
Prints Markdown tables (machine, versions and command first).
"""

import argparse
import csv
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_common import header  # noqa: E402

SITES = {"dermoscopy": 4, "histology": 5}
KEY = "val_macro_f1"
METRICS = (("accuracy", "val_accuracy"), ("macro-F1", "val_macro_f1"), ("AUC", "val_auc"))


def ensure_sites(task: str, data: Path, seed: int, images: int) -> Path:
    if not (data / "sites.json").is_file():
        flags = ["--images-per-site", str(images)] if task == "dermoscopy" and images else []
        subprocess.run([sys.executable, str(REPO / "tools" / "make_phantom_classification.py"), "--task", task,
                        "--out", str(data), "--seed", str(seed), *flags], check=True, capture_output=True)
    return data


def run_federation(task, algo, args, data, out):
    ws_root = out / "sim"
    name = f"{task}_{algo}"
    cmd = [sys.executable, str(REPO / "jobs" / f"{task}.py"), "--algorithm", algo, "--rounds", str(args.rounds),
           "--local-epochs", str(args.local_epochs), "--sites", str(SITES[task]), "--data-root", str(data),
           "--workspace", str(ws_root), "--name", name, "--score-after-training", "--verbose",
           "--override", json.dumps({"seed": args.seed, **json.loads(args.override)})]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{algo} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    run = ws_root / name / "server" / "simulate_job"
    matrix = json.loads((run / "cross_site_val" / "cross_val_results.json").read_text())
    own = {site: row[site] for site, row in matrix.items()}
    curves = defaultdict(dict)  # tag -> site -> round -> value
    with open(run / "results" / "metrics_by_round.csv") as f:
        for r in csv.DictReader(f):
            if r["tag"] in (KEY, KEY + "_after_training"):
                curves[r["tag"]].setdefault(r["site"], {})[int(r["round"])] = float(r["value"])
    return {"own": own, "curves": curves, "wall": wall}


def mean_curve(curves, tag):
    per_site = curves.get(tag, {})
    rounds = sorted(set.intersection(*(set(v) for v in per_site.values()))) if per_site else []
    return {r: sum(v[r] for v in per_site.values()) / len(per_site) for r in rounds}


def retrogress(curves):
    """Mean over rounds t >= 1 of (after training in t-1) - (round start t): what a communication costs."""
    start, after = mean_curve(curves, KEY), mean_curve(curves, KEY + "_after_training")
    drops = [after[t - 1] - start[t] for t in start if t >= 1 and t - 1 in after]
    return sum(drops) / len(drops) if drops else float("nan"), (max(drops) if drops else float("nan"))


def plot(results, path, task):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for algo, r in results.items():
        start, after = mean_curve(r["curves"], KEY), mean_curve(r["curves"], KEY + "_after_training")
        points = sorted([(t, v) for t, v in start.items()] + [(t + 0.9, v) for t, v in after.items()])
        ax.plot([p[0] for p in points], [p[1] for p in points], label=algo, linewidth=1.2)
    ax.set_xlabel("round (integer: right after communication; +0.9: after local training)")
    ax.set_ylabel("mean validation macro-F1 over sites")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{task} phantom sites: the model each site uses (PRR-FL: personalized)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(SITES), default="dermoscopy")
    p.add_argument("--algorithms", nargs="+", default=None,
                   help="default: fedavg fedbn harmofl prrfl (dermoscopy), fedavg harmofl (histology)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="phantom data and bundle seed")
    p.add_argument("--images-per-site", type=int, default=0, help="dermoscopy phantom size (0 = generator default)")
    p.add_argument("--override", default="{}", help="bundle overrides (JSON) for every run")
    p.add_argument("--out", default=str(REPO / "workspace" / "bench_cls"))
    args = p.parse_args(argv)
    algorithms = args.algorithms or (["fedavg", "fedbn", "harmofl", "prrfl"] if args.task == "dermoscopy"
                                     else ["fedavg", "harmofl"])
    out = Path(args.out).resolve() / args.task
    data = ensure_sites(args.task, out / "data", args.seed, args.images_per_site)
    site_map = json.loads((data / "sites.json").read_text())
    print("\n".join(header("benchmark_classification.py", argv)))
    print(f"setting: {args.task}, {len(site_map)} phantom sites, {args.rounds} rounds x {args.local_epochs} "
          f"local epochs, seed {args.seed}\n")
    results = {}
    for algo in algorithms:
        print(f"running {algo} ...", file=sys.stderr, flush=True)
        results[algo] = run_federation(args.task, algo, args, data, out)

    sites = sorted(site_map)
    for label, key in METRICS:
        print(f"\n{label} on each site's test split (the model the site keeps)\n")
        print("| method | " + " | ".join(f"{s} ({site_map[s]})" for s in sites) + " | mean |")
        print("|" + "---|" * (len(sites) + 2))
        for algo, r in results.items():
            v = [r["own"][s][key] for s in sites]
            print(f"| {algo} | " + " | ".join(f"{x:.3f}" for x in v) + f" | {sum(v) / len(v):.3f} |")
    print("\n| method | mean drop of validation macro-F1 at a communication | largest drop | wall s |")
    print("|---|---|---|---|")
    for algo, r in results.items():
        mean_drop, worst = retrogress(r["curves"])
        print(f"| {algo} | {mean_drop:+.3f} | {worst:+.3f} | {r['wall']:.0f} |")
    png = out / f"retrogress_{args.task}.png"
    plot(results, png, args.task)
    print(f"\ncurve: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
