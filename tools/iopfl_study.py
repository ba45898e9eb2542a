#!/usr/bin/env python
"""IOP-FL on the 6 phantom prostate sites: inside (personalized vs global) and leave-one-site-out outside.

    python tools/iopfl_study.py [--rounds 20] [--local-epochs 2] [--cases 10] [--passes 2]
                                [--holdout BIDMC HK ...] [--no-inside] [--out workspace/iopfl]

1. Inside: one IOP-FL federation on all 6 sites (NVFlare simulator); each site's test split
   scored with the global model and with the site's own personalized model (cross-site matrix).
2. Outside, for each held-out site H: an IOP-FL federation on the other 5 sites gives the
   model pool (global + 5 personalized models); then every volume of H (it never trained,
   all its cases are unseen) is segmented with the bundle's ``configs/routed_inference.json``
   once per method: the global model, each personalized model alone, the expert mean
   (parameter average), BN statistics (global model, batch statistics), TENT (global model,
   entropy on norm affine), routing with the released code's gate, routing with our gate's output
   made a sigmoid, routing with the global model's running statistics instead of the batch's,
   routing (IOP-FL: softmax gate, batch statistics), and routing guarded by the global model
   (routing_safe: kept only if it lowers the unsupervised loss on held-out volumes). No method
   sees a label; the written NIfTI
   masks are scored against H's labels afterwards (foreground Dice per volume, native grid).
3. Cost on the first held-out site: the bundle CLI (``python -m monai.bundle run``) run as
   a separate process for the global model and for routing: wall time and peak RSS.

Writes OUT/iopfl_study.json, OUT/outside.csv, OUT/outside_dice.png and prints Markdown tables
(machine, versions and command first).
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
ADAPTIVE = ("bn_stats", "tent", "routing_released", "routing_sigmoid", "routing_source_stats", "routing", "routing_safe")


def run_iopfl(data_root: Path, n_sites: int, name: str, out: Path, args) -> Path:
    """One IOP-FL federation in the simulator; returns the server's run folder."""
    ws_root = out / "sim"
    run = ws_root / name / "server" / "simulate_job"
    if args.reuse and (run / "model_pool" / "manifest.json").is_file():
        print(f"  {name}: reused {run}", file=sys.stderr, flush=True)
        return run
    cmd = [sys.executable, str(REPO / "jobs" / "prostate.py"), "--algorithm", "iopfl", "--rounds", str(args.rounds),
           "--local-epochs", str(args.local_epochs), "--sites", str(n_sites), "--data-root", str(data_root),
           "--workspace", str(ws_root), "--name", name, "--iop-alpha", str(args.iop_alpha), "--verbose"]
    t0 = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"federation {name} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    if not (run / "model_pool" / "manifest.json").is_file():
        raise RuntimeError(f"federation {name} wrote no model pool under {run}")
    print(f"  {name}: {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return run


def segment(method: str, pool: Path, site_dir: Path, out_dir: Path, passes: int) -> dict:
    """Run the bundle's routed inference config in this process for one method; returns timings."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "routed_inference.json"))
    parser.update({"bundle_root": str(BUNDLE), "pool_dir": str(pool), "dataset_dir": str(site_dir),
                   "output_dir": str(out_dir), "method": method, "adaptation#passes": passes})
    parser.get_parsed_content("initialize")
    adapter, evaluator = parser.get_parsed_content("adapter"), parser.get_parsed_content("evaluator")
    t0 = time.time()
    adapter.run()
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


def plot(outside: dict, methods: list, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sites = list(outside)
    x = np.arange(len(sites) + 1)
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(x)), 4.5))
    for i, m in enumerate(methods):
        vals = [outside[s]["mean"][m] for s in sites]
        ax.bar(x + (i - len(methods) / 2 + 0.5) * width, vals + [sum(vals) / len(vals)], width, label=m)
    ax.set_xticks(x, [*sites, "mean"])
    ax.set_ylabel("foreground Dice (held-out site, all volumes)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=3)
    ax.set_title("IOP-FL outside personalization: leave-one-site-out on the phantom sites", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--cases", type=int, default=10, help="cases per phantom site")
    p.add_argument("--iop-alpha", type=float, default=0.1)
    p.add_argument("--passes", type=int, default=2, help="adaptation passes over the held-out site")
    p.add_argument("--holdout", nargs="+", choices=SITES, default=SITES)
    p.add_argument("--no-inside", action="store_true", help="skip the 6-site inside run")
    p.add_argument("--reuse", action="store_true",
                   help="reuse federations already in OUT (their model pools and cross-site results)")
    p.add_argument("--out", default=str(REPO / "workspace" / "iopfl"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out).resolve()
    data = out / "data"
    ensure_phantom_sites(data, args.cases)
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    lines = header("iopfl_study.py", argv) + [
        f"setting: phantom sites x {args.cases} cases, {args.rounds} rounds x {args.local_epochs} local epochs, "
        f"a = {args.iop_alpha}, {args.passes} adaptation passes"]
    print("\n".join(lines) + "\n", flush=True)
    results = {"header": lines, "inside": {}, "outside": {}, "cost": {}}

    if not args.no_inside:
        print("inside: IOP-FL on 6 sites ...", file=sys.stderr, flush=True)
        run = run_iopfl(data, 6, "iopfl_inside", out, args)
        from fedharmony.core.results import load_cross_site

        matrix = load_cross_site(run / "cross_site_val" / "cross_val_results.json")
        names = json.loads((data / "sites.json").read_text())
        results["inside"] = {names[s]: {"global": row["SRV_FL_global_model.pt"], "personalized": row[s]}
                             for s, row in sorted(matrix.items())}
        print("| site (test split) | global | personalized | difference |\n|---|---|---|---|")
        for site, r in results["inside"].items():
            print(f"| {site} | {r['global']:.3f} | {r['personalized']:.3f} | {r['personalized'] - r['global']:+.3f} |")
        g = [r["global"] for r in results["inside"].values()]
        pz = [r["personalized"] for r in results["inside"].values()]
        print(f"| **mean** | {sum(g) / len(g):.3f} | {sum(pz) / len(pz):.3f} | {(sum(pz) - sum(g)) / len(g):+.3f} |\n",
              flush=True)

    for held in args.holdout:
        print(f"outside: held-out {held} ...", file=sys.stderr, flush=True)
        root = out / "loso" / held
        root.mkdir(parents=True, exist_ok=True)
        sources = [s for s in SITES if s != held]
        (root / "sites.json").write_text(json.dumps({f"site-{i + 1}": str(data / s) for i, s in enumerate(sources)},
                                                    indent=2))
        pool = run_iopfl(root, len(sources), f"iopfl_without_{held}", out, args) / "model_pool"
        experts = [e["name"] for e in json.loads((pool / "manifest.json").read_text())["experts"]
                   if e["kind"] == "personalized"]
        label = {f"site-{i + 1}": s for i, s in enumerate(sources)}
        per_method, timings = {}, {}
        for method in ["global", *experts, "expert_mean", *ADAPTIVE]:
            pred = out / "predictions" / held / method
            t = segment(method, pool, data / held, pred, args.passes if method in ADAPTIVE else 0)
            name = f"personalized {label[method]}" if method in experts else method
            per_method[name] = score(data / held, pred)
            timings[name] = {k: v for k, v in t.items() if k != "history"}
            if t["history"]:
                timings[name]["history"] = t["history"]
        n_vol = len(per_method["global"])
        mean = {m: sum(v.values()) / len(v) for m, v in per_method.items()}
        alone = [mean[f"personalized {s}"] for s in sources]
        mean["personalized (mean of 5)"] = sum(alone) / len(alone)
        mean["personalized (best, oracle)"] = max(alone)
        results["outside"][held] = {"per_volume": per_method, "mean": mean, "timings": timings, "volumes": n_vol}
        if not results["cost"]:
            for method in ("global", "routing"):
                c = cli_cost(method, pool, data / held, out / "cost" / method, args.passes if method in ADAPTIVE else 0)
                results["cost"][method] = {**c, "volumes": n_vol, "s_per_volume": c["wall_s"] / n_vol,
                                           "in_process_s_per_volume": (timings[method]["adapt_s"]
                                                                       + timings[method]["infer_s"]) / n_vol}
        (out / "iopfl_study.json").write_text(json.dumps(results, indent=2) + "\n")

    methods = ["global", "personalized (mean of 5)", "personalized (best, oracle)", "expert_mean", "bn_stats", "tent",
               "routing_released", "routing_sigmoid", "routing_source_stats", "routing", "routing_safe"]
    outside = results["outside"]
    with open(out / "outside.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["held_out_site", *methods, "volumes"])
        for s, r in outside.items():
            w.writerow([s, *(f"{r['mean'][m]:.4f}" for m in methods), r["volumes"]])
    print("| held-out site | " + " | ".join(methods) + " | routing - global |")
    print("|" + "---|" * (len(methods) + 2))
    for s, r in outside.items():
        print(f"| {s} | " + " | ".join(f"{r['mean'][m]:.3f}" for m in methods)
              + f" | {r['mean']['routing'] - r['mean']['global']:+.3f} |")
    means = {m: sum(r["mean"][m] for r in outside.values()) / len(outside) for m in methods}
    print("| **mean** | " + " | ".join(f"{means[m]:.3f}" for m in methods)
          + f" | {means['routing'] - means['global']:+.3f} |\n")
    if results["cost"]:
        print("| method (bundle CLI, own process) | volumes | wall s | s / volume | in-process s / volume | "
              "peak RSS MiB |\n|---|---|---|---|---|---|")
        for m, c in results["cost"].items():
            print(f"| {m} | {c['volumes']} | {c['wall_s']:.1f} | {c['s_per_volume']:.2f} | "
                  f"{c['in_process_s_per_volume']:.2f} | {c['peak_rss_mib']:.0f} |")
    plot(outside, methods, out / "outside_dice.png")
    print(f"\nwritten: {out / 'iopfl_study.json'}, {out / 'outside.csv'}, {out / 'outside_dice.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
