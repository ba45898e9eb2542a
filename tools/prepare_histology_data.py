#!/usr/bin/env python
"""Write per-hospital datalists for Camelyon17-WILDS (or a phantom root in its layout).

    python tools/prepare_histology_data.py --wilds-root /data/camelyon17_v1.0 --out data/camelyon \\
        [--patches-per-hospital 2000] [--seed 0] [--no-check]

WILDS-ROOT holds metadata.csv (header ",patient,node,x_coord,y_coord,tumor,slide,center,split")
and patches/patient_PPP_node_N/patch_patient_PPP_node_N_x_X_y_Y.png. Each hospital (center)
becomes OUT/hospital_<center>/datalist.json with classes ["normal", "tumor"], split by
patient (60/20/20 of the patients; the WILDS split column is not used), image paths relative
to the site folder; OUT/sites.json maps simulator client names to the hospitals.
--patches-per-hospital keeps a seeded random subset (the real root has 35k to 147k per hospital).
"""

import argparse
import sys
import time
from pathlib import Path

from fedharmony.data.classification import class_counts_markdown, prepare_camelyon17
from fedharmony.data.datalist import SiteDataError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wilds-root", required=True, help="the camelyon17_v1.0 folder")
    p.add_argument("--out", required=True, help="output folder for the hospital_<center> site folders")
    p.add_argument("--patches-per-hospital", type=int, help="seeded random subset per hospital (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the patient split and of the subset")
    p.add_argument("--no-check", action="store_true", help="do not check that every listed patch exists")
    args = p.parse_args(argv)
    root = Path(args.wilds_root)
    if not root.is_dir():
        p.error(f"--wilds-root {root} is not a folder")
    if args.patches_per_hospital is not None and args.patches_per_hospital < 3:
        p.error(f"--patches-per-hospital must be at least 3, got {args.patches_per_hospital}")
    t0 = time.time()
    try:
        sites = prepare_camelyon17(root, args.out, seed=args.seed, patches_per_hospital=args.patches_per_hospital,
                                   check_files=not args.no_check)
    except SiteDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(class_counts_markdown(sites))
    print(f"prepared {len(sites)} hospital(s) into {args.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
