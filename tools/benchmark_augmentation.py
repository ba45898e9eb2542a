#!/usr/bin/env python
"""What the bundle's spatial augmentation costs a training epoch: ``spatial_augmentation`` ``none`` (the recipe
before bundle 0.14.0) against ``zoom_rotate`` (the default since), on one phantom prostate site.

    python tools/benchmark_augmentation.py [--site BIDMC] [--cases 10] [--epochs 5] [--image-size 96]

Prints a Markdown table (machine, versions and command first): seconds per training epoch of the bundle's own
trainer (``BundleSite.train``: the same steps a federated round runs), median and range over ``--epochs``
epochs per recipe, the recipes alternating epoch by epoch so that a load that comes and goes on the machine
falls on both; then the ratio of the medians. The first epoch of each recipe (which fills the dataset cache)
is not timed.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, ensure_phantom_sites, header  # noqa: E402

RECIPES = ("none", "zoom_rotate")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--site", default="BIDMC", help="phantom site to train on (default BIDMC)")
    p.add_argument("--cases", type=int, default=10, help="phantom cases per site (default 10, the standard study's)")
    p.add_argument("--epochs", type=int, default=5, help="timed epochs per recipe (default 5)")
    p.add_argument("--image-size", type=int, default=96, help="in-plane size, a multiple of 16 (default 96)")
    p.add_argument("--data", help="phantom data folder (default: a temporary one)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.cases < 3 or args.image_size < 16 or args.image_size % 16:
        p.error("--epochs >= 1, --cases >= 3, --image-size a multiple of 16")

    import torch

    from fedharmony.bundle.site import BundleSite

    torch.set_num_threads(1)  # as a simulator site runs
    print("\n".join(header("benchmark_augmentation.py", argv)))
    with tempfile.TemporaryDirectory() as tmp:
        data = ensure_phantom_sites(Path(args.data or Path(tmp) / "data"), args.cases)
        if not (data / args.site).is_dir():
            p.error(f"no site {args.site!r} in {data}")
        sites = {}
        for recipe in RECIPES:
            sites[recipe] = BundleSite(str(REPO / "bundles" / "prostate_mri_seg"), str(data / args.site),
                                       str(Path(tmp) / "state" / recipe), args.site,
                                       overrides={"image_size": args.image_size, "samples_per_volume": 4,
                                                  "spatial_augmentation": recipe, "seed": 0})
            sites[recipe].train(None, 1)  # fills the cache; not timed
        times = {recipe: [] for recipe in RECIPES}
        for _ in range(args.epochs):
            for recipe in RECIPES:
                t0 = time.perf_counter()
                sites[recipe].train(None, 1)
                times[recipe].append(time.perf_counter() - t0)
    steps = len(sites[RECIPES[0]].trainer.data_loader)
    print(f"\nsite {args.site}, {args.cases} phantom cases ({steps} steps an epoch), {args.image_size} px, "
          f"samples_per_volume 4, 1 torch thread; {args.epochs} timed epochs per recipe, alternating\n")
    print("| spatial_augmentation | s / epoch, median | min - max |")
    print("|---|---|---|")
    for recipe in RECIPES:
        t = times[recipe]
        print(f"| {recipe} | {statistics.median(t):.2f} | {min(t):.2f} - {max(t):.2f} |")
    ratio = statistics.median(times["zoom_rotate"]) / statistics.median(times["none"])
    print(f"\nzoom_rotate / none: {ratio:.3f} (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
