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
Production options: --min-clients (go on without sites that die), --no-custom-code (sites with
the package installed), --privacy-percentile (NVFlare's PercentilePrivacy on what sites send),
--initial-model / --start-round (resume from a saved global model).
"""

import argparse
import json
import os
import sys

from nvflare.recipe import SimEnv  # consumes NVFlare's own --export / --export-dir flags

from fedharmony.fl.job import ALGORITHMS, FedHarmonyRecipe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def saved_round(checkpoint: str) -> int:
    """The round an NVFlare global-model checkpoint (``FL_global_model.pt``) was saved after."""
    import torch

    try:
        meta = torch.load(checkpoint, map_location="cpu", weights_only=True).get("meta_props") or {}
    except Exception as e:  # not there, not readable here, or not a checkpoint
        sys.exit(f"--initial-model {checkpoint}: cannot read its round ({type(e).__name__}: {e}); "
                 f"give --start-round")
    if "current_round" not in meta:
        sys.exit(f"--initial-model {checkpoint} does not say its round; give --start-round")
    return int(meta["current_round"])


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
    p.add_argument("--min-clients", type=int, help="sites needed to start and to go on (default: --sites)")
    p.add_argument("--cross-site-timeout", type=int,
                   help="seconds cross-site evaluation waits for a site (default NVFlare's 600 / 6000)")
    p.add_argument("--no-custom-code", action="store_true",
                   help="ship no code: sites and server run their installed fedharmony package")
    p.add_argument("--privacy-percentile", type=float,
                   help="share only update values above this percentile (NVFlare PercentilePrivacy)")
    p.add_argument("--privacy-gamma", type=float, default=0.01, help="clip shared update values to +-gamma per local step")
    p.add_argument("--initial-model", help="server-side checkpoint to start from, e.g. the FL_global_model.pt "
                                           "of a run whose server died")
    p.add_argument("--start-round", type=int, help="number of the first round (default: 0, or the round after "
                                                   "the one --initial-model was saved at)")
    p.add_argument("--memory-gc-rounds", type=int, default=0, help="server gc + malloc_trim every N rounds")
    args = p.parse_args()
    try:
        overrides = json.loads(args.override)
    except json.JSONDecodeError as e:
        p.error(f"--override is not JSON: {e}")
    if not isinstance(overrides, dict):
        p.error(f"--override must be a JSON object of bundle config ids, got {args.override!r}")
    start_round = args.start_round
    if start_round is None:
        start_round = saved_round(args.initial_model) + 1 if args.initial_model else 0
        if args.initial_model:
            print(f"resuming from {args.initial_model} (saved after round {start_round - 1}): "
                  f"rounds {start_round} .. {start_round + args.rounds - 1}")
    try:
        recipe = FedHarmonyRecipe(
            algorithm=args.algorithm, bundle_dir=args.bundle, num_rounds=args.rounds,
            min_clients=args.min_clients or args.sites,
            local_epochs=args.local_epochs, mu=args.mu,
            data_root=os.path.abspath(args.data_root) if args.data_root else "",
            overrides=overrides, num_threads=args.torch_threads, cross_site_eval=not args.no_cross_site_eval,
            name=args.name, amp_mode=args.amp_mode, amp_ratio=args.amp_ratio, wp_alpha=args.wp_alpha,
            image_size=args.image_size, iop_alpha=args.iop_alpha,
            initial_model=os.path.abspath(args.initial_model) if args.initial_model else None,
            start_round=start_round, privacy_percentile=args.privacy_percentile,
            privacy_gamma=args.privacy_gamma, ship_code=not args.no_custom_code,
            memory_gc_rounds=args.memory_gc_rounds, cross_site_timeout=args.cross_site_timeout)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
        p.error(str(e))
    run = recipe.execute(SimEnv(num_clients=args.sites, num_threads=args.threads or args.sites,
                                workspace_root=args.workspace))
    if run is not None:
        print(f"workspace: {run.get_result()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
