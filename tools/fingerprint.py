#!/usr/bin/env python
"""Agree on the spacing and crop every site resamples to, from the sites' data fingerprints; only header numbers
leave a site.

At each site (on its own machine):

    python tools/fingerprint.py site --dataset-dir /data/prostate/RUNMC --out RUNMC_fingerprint.json

writes how many training scans have each in-plane spacing, slice spacing, matrix and field of view, read from
the image headers (no voxel, no name but the file's in the list of unreadable ones). The coordinator then
combines the files the sites sent:

    python tools/fingerprint.py combine RUNMC_fingerprint.json BMC_fingerprint.json ... [--out plan.json]

prints what it chose and why (the median in-plane spacing of every site's training scans, the crop that holds
their median field of view), names any site whose scans are unlike the rest, and prints the bundle settings to
pass to every job and to inference (``--override '{"pixdim": ..., "image_size": ...}'``). The math:
fedharmony/data/fingerprint.py.
"""

import argparse
import json
import sys
from pathlib import Path

from fedharmony.core.files import atomic_write_text, read_json_files, write_new_json
from fedharmony.data.fingerprint import combine_fingerprints, site_fingerprint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    site = sub.add_parser("site", help="this site's fingerprint (run at the site)")
    site.add_argument("--dataset-dir", required=True, help="the site's data folder (with datalist.json)")
    site.add_argument("--split", default="training", help="datalist split to describe (default: training)")
    site.add_argument("--out", required=True, help="JSON file to write (refused if it exists, unless --overwrite)")
    site.add_argument("--overwrite", action="store_true")
    combine = sub.add_parser("combine", help="the federation's preprocessing from the sites' fingerprints")
    combine.add_argument("fingerprints", nargs="+", help="the JSON files the sites wrote")
    combine.add_argument("--out", help="also write the choice, its reasons and the per-site medians as JSON")
    combine.add_argument("--max-image-size", type=int,
                         help="a crop larger than this (a multiple of 16) keeps the field of view with coarser pixels")
    args = p.parse_args(argv)

    try:
        if args.command == "site":
            if Path(args.out).exists() and not args.overwrite:  # refused before the headers are read
                raise FileExistsError(f"{args.out} exists: pass --overwrite to replace it")
            fingerprint = site_fingerprint(args.dataset_dir, args.split)
            out = write_new_json(args.out, fingerprint, args.overwrite)
            print(f"{fingerprint['site']}: fingerprint of {fingerprint['count']} {args.split} scans -> {out}")
            for name in fingerprint["unread_names"]:
                print(f"  not read: {name}")
            return 0
        fingerprints = read_json_files(args.fingerprints, "a site fingerprint")
        # each site by the name it wrote, or by its file's name where those are missing or repeated
        names = [str(fp.get("site") or "") if isinstance(fp, dict) else "" for fp in fingerprints]
        if "" in names or len(set(names)) != len(names):
            names = [Path(path).stem for path in args.fingerprints]
        choice = combine_fingerprints(fingerprints, names, args.max_image_size)
        for line in choice["why"]:
            print(line)
        for line in choice["outliers"]:
            print(f"unlike the rest: {line}")
        print(json.dumps(choice["settings"]))
        if args.out:
            atomic_write_text(Path(args.out), json.dumps(choice, indent=2) + "\n")
        return 0
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
