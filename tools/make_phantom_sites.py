#!/usr/bin/env python
"""Generate phantom prostate-MRI sites in the real multi-site dataset's layout.

    python tools/make_phantom_sites.py --out data/prostate                 # the 6 default sites
    python tools/make_phantom_sites.py --out DIR --sites BIDMC HK --cases 4 --size 64 --slices 12
    python tools/make_phantom_sites.py --out DIR --profiles my_scanners.json   # an unseen scanner
    python tools/make_phantom_sites.py --list-profiles                      # the profile table
    python tools/make_phantom_sites.py --phantom v2 --out data/prostate_v2  # anatomy in mm, MR physics
    python tools/make_phantom_sites.py --phantom brain --out data/brain --voxel-scale 2   # MNI152 brains, IXI-like

Writes DIR/<site>/CaseNN.nii.gz, CaseNN_segmentation.nii.gz, datalist.json (split by case)
and DIR/sites.json (simulator client name -> site folder).
"""

import argparse
import logging
import sys
import time

from fedharmony.phantom import load_profiles, profiles_markdown, select_profiles
from fedharmony.phantom._common import default_workers
from fedharmony.phantom.sites import write_sites


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (created)")
    p.add_argument("--sites", nargs="+", help="site names from the profile file (default: all, in file order)")
    p.add_argument("--cases", type=int, help="cases per site (default: each profile's count)")
    p.add_argument("--size", type=int, default=96, help="base in-plane matrix (default 96; real data: 384)")
    p.add_argument("--slices", type=int, help="slices per volume (default: each profile's count)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profiles", help="profile JSON file (default: the phantom's built-in sites)")
    p.add_argument("--list-profiles", action="store_true", help="print the profile table (Markdown) and exit")
    p.add_argument("--phantom", choices=("v1", "v2", "brain"), default="v1",
                   help="v1: the committed studies' phantom (default); v2: anatomy in mm scanned by the MR physics "
                        "simulator (fedharmony.phantom.prostate_mr; --size and --slices do not apply: each profile "
                        "gives its matrix and slices); brain: the MNI152 template deformed per case, scanned by three "
                        "IXI-like sites (fedharmony.phantom.brain_mr; needs nilearn)")
    p.add_argument("--voxel-scale", type=float, default=1.0,
                   help="--phantom v2 or brain: voxels this many times larger than the profiles' (field of view "
                        "kept; default 1; the standard brain study uses 2, the standard v2 study 2.5)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes drawing cases (default: the CPUs, at most 8; the files do not depend on it)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.phantom != "v1":
        return _simulated(p, args)
    if args.voxel_scale != 1.0:
        p.error("--voxel-scale is for --phantom v2 or brain")
    try:
        profiles = select_profiles(load_profiles(args.profiles), args.sites)
    except (KeyError, ValueError, FileNotFoundError) as e:
        p.error(str(e))
    if args.list_profiles:
        print(profiles_markdown(profiles, args.size))
        return 0
    if not args.out:
        p.error("--out is required")
    for name, value, low in (("--cases", args.cases, 3), ("--size", args.size, 16), ("--slices", args.slices, 3)):
        if value is not None and value < low:
            p.error(f"{name} must be at least {low}, got {value}")
    t0 = time.time()
    write_sites(args.out, profiles, seed=args.seed, cases=args.cases, size=args.size, slices=args.slices,
                workers=max(1, args.workers))
    print(f"wrote {len(profiles)} site(s) to {args.out} in {time.time() - t0:.1f} s")
    return 0


def _simulated(p, args) -> int:
    """--phantom v2 or brain: sites scanned by the MR simulator, each profile giving its matrix and slices."""
    from fedharmony.phantom.brain_mr import load_brain_profiles, write_brain_sites
    from fedharmony.phantom.mr import ProfileError
    from fedharmony.phantom.prostate_mr import load_v2_profiles, write_sites_v2

    if args.list_profiles or args.slices is not None:
        p.error(f"--list-profiles and --slices are for --phantom v1 (a {args.phantom} profile gives its own matrix "
                "and slices)")
    if not 1 <= args.voxel_scale <= 16:
        p.error(f"--voxel-scale must be in [1, 16], got {args.voxel_scale}")
    try:
        profiles = (load_v2_profiles if args.phantom == "v2" else load_brain_profiles)(args.profiles)
        unknown = [s for s in args.sites or [] if s not in profiles]
        if unknown:
            raise ProfileError(f"unknown site(s) {unknown}; the profiles have {list(profiles)}")
    except ProfileError as e:
        p.error(str(e))
    if not args.out:
        p.error("--out is required")
    if args.cases is not None and args.cases < 3:
        p.error(f"--cases must be at least 3, got {args.cases}")
    chosen = [profiles[s] for s in (args.sites or profiles)]
    t0 = time.time()
    workers = max(1, args.workers)
    if args.phantom == "v2":
        write_sites_v2(args.out, chosen, seed=args.seed, cases=args.cases, workers=workers,
                       voxel_scale=args.voxel_scale)
    else:
        write_brain_sites(args.out, chosen, seed=args.seed, cases=args.cases, workers=workers,
                          voxel_scale=args.voxel_scale)
    print(f"wrote {len(chosen)} {args.phantom} site(s) to {args.out} in {time.time() - t0:.1f} s ({workers} workers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
