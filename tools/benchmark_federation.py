#!/usr/bin/env python
"""Benchmark federations on the 6 phantom prostate sites.

    python tools/benchmark_federation.py [--rounds 20] [--local-epochs 2] [--cases 10] [--algorithms fedavg fedprox fedbn]
    python tools/benchmark_federation.py --suite harmofl     # FedAvg, FedBN, HarmoFL (paper, released), ablations
    python tools/benchmark_federation.py --suite harmofl-ratio   # HarmoFL window ratio L = 0.01, 0.05, 0.1

The default suite is FedAvg / FedProx / FedBN plus a local-only reference at each site's
own in-plane size. The ``harmofl`` suite resizes every site to 96 x 96 (HarmoFL's amplitude
target needs one size) for every method, so all rows share one grid and one Dice.

For each algorithm, one NVFlare simulator run (6 sites, one process each, 1 torch thread):
  * per-site and mean foreground Dice of the final global model on each site's test split
    (cross-site evaluation; for FedBN with each site's own norm layers);
  * wall time per round (between consecutive aggregations in the server log) and the
    slowest site's own task time per round (validation + training + checkpointing, from
    the site logs), giving the simulator overhead = (round time - slowest site task) / round time;
  * peak RSS of the server process and of the largest client process (sampled with ps).
A local-only reference trains each site alone for the same number of local steps
(rounds x local epochs) and scores it on its own test split.
Prints Markdown tables (machine, versions and command first).
"""

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_common import ensure_phantom_sites, header  # noqa: E402
from fedharmony.study.simulator_timing import peak_rss, round_times, site_task_times  # noqa: E402


# label -> (algorithm, extra jobs/prostate.py flags); all at image_size 96
HARMOFL_SUITE = {
    "fedavg": ("fedavg", ["--override", '{"image_size": 96}']),
    "fedbn": ("fedbn", ["--override", '{"image_size": 96}']),
    "harmofl (paper, L=0.05)": ("harmofl", ["--amp-mode", "paper", "--amp-ratio", "0.05"]),
    "harmofl (released)": ("harmofl", ["--amp-mode", "released"]),
    "normalization only (L=0.05)": ("harmofl", ["--amp-mode", "paper", "--amp-ratio", "0.05", "--wp-alpha", "0"]),
    "perturbation only": ("harmofl", ["--amp-mode", "off"]),
}

# the window ratio L of HarmoFL (paper mode, alpha 0.05); at 96 px
# L = 0.01 gives b = 0 (DC only)
RATIO_SUITE = {f"harmofl L={r}": ("harmofl", ["--amp-mode", "paper", "--amp-ratio", str(r)]) for r in (0.01, 0.05, 0.1)}
SUITES = {"harmofl": HARMOFL_SUITE, "harmofl-ratio": RATIO_SUITE}


def run_federation(label, args, data, out, algo=None, extra=()):
    algo = algo or label
    ws_root = out / "sim"
    name = re.sub(r"[^a-z0-9]+", "_", label).strip("_")
    cmd = [sys.executable, str(REPO / "jobs" / "prostate.py"), "--algorithm", algo, "--rounds", str(args.rounds),
           "--local-epochs", str(args.local_epochs), "--sites", "6", "--data-root", str(data),
           "--workspace", str(ws_root), "--name", name, "--verbose", *extra]  # one process: measured as before
    t0 = time.time()
    with peak_rss() as peaks:
        res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    ws = ws_root / name
    from fedharmony.core.results import find_workspace_file, load_cross_site

    matrix = load_cross_site(find_workspace_file(ws, "cross_val_results.json"))
    dice = {s: row["SRV_FL_global_model.pt"] for s, row in matrix.items()}
    if algo == "fedbn":  # the global model has no norm layers of its own: score each site's own model
        dice = {s: row[s] for s, row in matrix.items()}
    rounds = round_times(ws / "server" / "log.txt")
    sites = site_task_times(ws)
    overhead = [(rt - sites[r]) / rt for r, rt in rounds.items() if r in sites and rt > 0]
    return {"dice": dice, "wall": wall, "round_s": sum(rounds.values()) / max(len(rounds), 1),
            "site_s": sum(sites[r] for r in rounds if r in sites) / max(len(rounds), 1),
            "overhead": sum(overhead) / max(len(overhead), 1), "peaks": peaks}


def run_local(args, data, out):
    """Each site alone, same local steps as the federation, scored on its own test split."""
    import torch

    from fedharmony.bundle.site import BundleSite

    torch.set_num_threads(1)
    site_map = json.loads((data / "sites.json").read_text())
    dice = {}
    for client, folder in site_map.items():
        site = BundleSite(str(REPO / "bundles" / "prostate_mri_seg"), str(data / folder), str(out / "local" / folder),
                          folder)
        site.train(None, local_epochs=args.rounds * args.local_epochs)
        dice[client] = site.evaluate(split="testing")["val_mean_dice"]
    return dice


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithms", nargs="+", default=["fedavg", "fedprox", "fedbn"])
    p.add_argument("--suite", choices=["baselines", "harmofl", "harmofl-ratio"], default="baselines",
                   help="harmofl: FedAvg, FedBN, HarmoFL paper/released and the two ablations at 96 x 96; "
                        "harmofl-ratio: HarmoFL with L = 0.01, 0.05, 0.1")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--cases", type=int, default=10)
    p.add_argument("--no-local", action="store_true", help="skip the local-only reference")
    p.add_argument("--out", default=str(REPO / "workspace" / "bench"))
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    data = out / "data"
    ensure_phantom_sites(data, args.cases)
    print("\n".join(header("benchmark_federation.py", argv)))
    print(f"setting: 6 phantom sites x {args.cases} cases, {args.rounds} rounds x {args.local_epochs} local epochs\n")
    site_map = json.loads((data / "sites.json").read_text())
    results = {}
    runs = SUITES.get(args.suite) or {a: (a, []) for a in args.algorithms}
    for label, (algo, extra) in runs.items():
        print(f"running {label} ...", file=sys.stderr, flush=True)
        results[label] = run_federation(label, args, data, out, algo, extra)
    if not args.no_local and args.suite == "baselines":
        print("running local-only ...", file=sys.stderr, flush=True)
        results["local only"] = {"dice": run_local(args, data, out)}

    sites = sorted(site_map)
    print("| method | " + " | ".join(f"{s} ({site_map[s]})" for s in sites) + " | mean | worst | spread |")
    print("|" + "---|" * (len(sites) + 4))
    for name, r in results.items():
        d = [r["dice"][s] for s in sites]
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in d)
              + f" | {sum(d) / len(d):.3f} | {min(d):.3f} | {max(d) - min(d):.3f} |")
    print("\n| method | wall s | s / round | slowest site task s / round | simulator overhead | "
          "peak RSS server MiB | peak RSS client MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "wall" in r:
            print(f"| {name} | {r['wall']:.0f} | {r['round_s']:.1f} | {r['site_s']:.1f} | {100 * r['overhead']:.0f}% | "
                  f"{r['peaks'].get('server', 0):.0f} | {r['peaks'].get('client', 0):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
