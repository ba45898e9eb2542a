#!/usr/bin/env python
"""Generate phantom classification sites in the real datasets' layouts.

    python tools/make_phantom_classification.py --task histology --out data/camelyon    # 5 hospitals
    python tools/make_phantom_classification.py --task dermoscopy --out data/skin       # 4 sources
    python tools/make_phantom_classification.py --task histology --out DIR --patients 6 --patches-per-patient 20
    python tools/make_phantom_classification.py --task dermoscopy --out DIR --sites clientA clientC \\
        --images-per-site 400 --size 128
    python tools/make_phantom_classification.py --task dermoscopy --out DIR --profiles my_sources.json
    python tools/make_phantom_classification.py --task histology --list-profiles   # the profile table

histology (Camelyon17-WILDS, tumour vs normal, 96 x 96): DIR/camelyon17_v1.0/{metadata.csv,patches/...},
  DIR/hospital_<center>/datalist.json (split by patient), DIR/sites.json.
dermoscopy (PRR-FL FedSkinLesion, nv / bkl / mel, 128 x 128): DIR/client<X>/img_resize128/ISIC_*.png,
  DIR/csv_folder/client<X>/{train,valid,test}_client<X>.csv (split by lesion),
  DIR/client<X>/datalist.json, DIR/sites.json.
The datalists are written by the same preparation code as for the real datasets
(tools/prepare_histology_data.py, tools/prepare_dermoscopy_data.py).
"""

import argparse
import logging
import sys
import time

from fedharmony.data.classification import class_counts_markdown
from fedharmony.phantom import (dermoscopy_markdown, histology_markdown, load_dermoscopy_profiles,
                                load_histology_profiles, select_profiles)
from fedharmony.phantom._common import default_workers
from fedharmony.phantom.dermoscopy import DEFAULT_IMAGES_PER_SITE, write_dermoscopy_sites
from fedharmony.phantom.histology import DEFAULT_PATCHES_PER_HOSPITAL, write_histology_sites

TASKS = {
    "histology": (load_histology_profiles, histology_markdown, 96),
    "dermoscopy": (load_dermoscopy_profiles, dermoscopy_markdown, 128),
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--out", help="output folder (created)")
    p.add_argument("--sites", nargs="+", help="profile names (default: all, in file order)")
    p.add_argument("--images-per-site", type=int,
                   help=f"images per site (default: histology {DEFAULT_PATCHES_PER_HOSPITAL} patches per hospital "
                        f"spread over its patients; dermoscopy {DEFAULT_IMAGES_PER_SITE})")
    p.add_argument("--patients", type=int, help="histology: patients per hospital (default: each profile's count)")
    p.add_argument("--patches-per-patient", type=int,
                   help="histology: patches per patient (instead of --images-per-site)")
    p.add_argument("--size", type=int, help="image side in pixels (default: histology 96, dermoscopy 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profiles", help="profile JSON file (default: the built-in sites of the task)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes rendering images (default: the usable CPUs, at most 8; output is the same)")
    p.add_argument("--list-profiles", action="store_true", help="print the profile table (Markdown) and exit")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    load, markdown, default_size = TASKS[args.task]
    try:
        profiles = select_profiles(load(args.profiles), args.sites)
    except (KeyError, ValueError, FileNotFoundError) as e:
        p.error(str(e).strip('"'))
    if args.list_profiles:
        print(markdown(profiles))
        return 0
    if not args.out:
        p.error("--out is required")
    if args.task == "dermoscopy" and (args.patients is not None or args.patches_per_patient is not None):
        p.error("--patients and --patches-per-patient are for --task histology; use --images-per-site")
    if args.images_per_site is not None and args.patches_per_patient is not None:
        p.error("give --images-per-site or --patches-per-patient, not both")
    size = args.size or default_size
    lows = (("--size", size, 32), ("--patients", args.patients, 3),
            ("--patches-per-patient", args.patches_per_patient, 1),
            ("--images-per-site", args.images_per_site, 18 if args.task == "dermoscopy" else 3),
            ("--workers", args.workers, 1))
    for name, value, low in lows:
        if value is not None and value < low:
            p.error(f"{name} must be at least {low}, got {value}")
    t0 = time.time()
    try:
        if args.task == "histology":
            sites = write_histology_sites(args.out, profiles, seed=args.seed, patients=args.patients,
                                          patches_per_patient=args.patches_per_patient,
                                          patches_per_hospital=args.images_per_site, size=size, workers=args.workers)
        else:
            sites = write_dermoscopy_sites(args.out, profiles, seed=args.seed,
                                           images_per_site=args.images_per_site or DEFAULT_IMAGES_PER_SITE, size=size,
                                           workers=args.workers)
    except ValueError as e:
        p.error(str(e))
    elapsed = time.time() - t0
    print(class_counts_markdown(sites))
    print(f"wrote {len(sites)} {args.task} site(s) ({size} x {size}) to {args.out} in {elapsed:.1f} s "
          f"with {args.workers} worker(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
