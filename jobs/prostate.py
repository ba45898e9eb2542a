#!/usr/bin/env python
"""Federated training of the prostate MRI bundle (FedAvg / FedProx / FedBN / HarmoFL / IOP-FL) on NVFlare.

Run in the simulator (NVFlare 2.9's SimEnv):
    python jobs/prostate.py --algorithm fedavg --data-root data/prostate --sites 6 --rounds 10
HarmoFL and its ablations (one flag each):
    python jobs/prostate.py --algorithm harmofl [--amp-mode paper|released|off] [--amp-ratio 0.05] [--wp-alpha 0.05]
IOP-FL (personalized models inside; the model pool for routing outside is written at the end):
    python jobs/prostate.py --algorithm iopfl [--iop-alpha 0.1]
Export a self-contained job folder for `nvflare simulator` / `nvflare job submit`:
    python jobs/prostate.py --algorithm fedbn --export --export-dir build/jobs
"""

import argparse
import json
import os
import sys

from nvflare.recipe import SimEnv  # consumes NVFlare's own --export / --export-dir flags

from fedharmony.fl.job import ALGORITHMS, FedHarmonyRecipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithm", choices=ALGORITHMS, default="fedavg")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--mu", type=float, default=0.01, help="FedProx proximal strength")
    p.add_argument("--amp-mode", choices=["paper", "released", "off"], help="HarmoFL amplitude normalization")
    p.add_argument("--amp-ratio", type=float, help="HarmoFL window ratio L in [0, 0.5]")
    p.add_argument("--wp-alpha", type=float, help="HarmoFL weight perturbation strength (0 = off)")
    p.add_argument("--image-size", type=int, help="HarmoFL common in-plane size (multiple of 16)")
    p.add_argument("--iop-alpha", type=float, help="IOP-FL personalization weight a in [0, 1) (default 0.1)")
    p.add_argument("--sites", type=int, default=6, help="number of simulated sites (site-1 ... site-N)")
    p.add_argument("--threads", type=int, default=0, help="simulator threads (default: one per site)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch CPU threads per site process")
    p.add_argument("--data-root", default="", help="folder of site folders (default: $FEDHARMONY_DATA_ROOT)")
    p.add_argument("--bundle", default=os.path.join(REPO, "bundles", "prostate_mri_seg"))
    p.add_argument("--workspace", default="/tmp/nvflare/fedharmony", help="simulator workspace root")
    p.add_argument("--override", default="{}", help='bundle overrides as JSON, e.g. \'{"learning_rate": 0.001}\'')
    p.add_argument("--name", help="job name (default prostate_mri_seg_<algorithm>)")
    p.add_argument("--no-cross-site-eval", action="store_true")
    args = p.parse_args()
    try:
        overrides = json.loads(args.override)
    except json.JSONDecodeError as e:
        p.error(f"--override is not JSON: {e}")
    if not isinstance(overrides, dict):
        p.error(f"--override must be a JSON object of bundle config ids, got {args.override!r}")
    try:
        recipe = FedHarmonyRecipe(
            algorithm=args.algorithm, bundle_dir=args.bundle, num_rounds=args.rounds, min_clients=args.sites,
            local_epochs=args.local_epochs, mu=args.mu,
            data_root=os.path.abspath(args.data_root) if args.data_root else "",
            overrides=overrides, num_threads=args.torch_threads, cross_site_eval=not args.no_cross_site_eval,
            name=args.name, amp_mode=args.amp_mode, amp_ratio=args.amp_ratio, wp_alpha=args.wp_alpha,
            image_size=args.image_size, iop_alpha=args.iop_alpha)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
        p.error(str(e))
    run = recipe.execute(SimEnv(num_clients=args.sites, num_threads=args.threads or args.sites,
                                workspace_root=args.workspace))
    if run is not None:
        print(f"workspace: {run.get_result()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
