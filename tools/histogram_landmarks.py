#!/usr/bin/env python
"""Agree on a histogram standardization scale across sites; only landmark percentiles leave a site.

At each site (on its own machine):

    python tools/histogram_landmarks.py site --dataset-dir /data/prostate/RUNMC --out RUNMC_landmarks.json

writes 11 numbers and a volume count (the mean of the site's training volumes' foreground percentiles,
each volume mapped to 0..100): no image, no per-volume value. The coordinator then combines the files
the sites sent:

    python tools/histogram_landmarks.py combine RUNMC_landmarks.json BMC_landmarks.json ...

and prints the bundle setting ``histogram_scale``, to pass to every job (``--override
'{"histogram_scale": "..."}'``) and to inference. ``--bias-correction`` computes the landmarks after N4,
for federations that also set ``bias_correction``. The math: fedharmony/bundle/classical_harmonization.py.
"""

import argparse
import sys
from pathlib import Path

from fedharmony.bundle.classical_harmonization import dataset_landmarks, format_scale, standard_scale
from fedharmony.core.files import read_json_files, write_new_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    site = sub.add_parser("site", help="this site's landmark summary (run at the site)")
    site.add_argument("--dataset-dir", required=True, help="the site's data folder (with datalist.json)")
    site.add_argument("--split", default="training", help="datalist split to learn from (default: training)")
    site.add_argument("--bias-correction", action="store_true", help="N4-correct each volume first")
    site.add_argument("--out", required=True, help="JSON file to write (refused if it exists, unless --overwrite)")
    site.add_argument("--overwrite", action="store_true")
    combine = sub.add_parser("combine", help="the federation's scale from the sites' summaries")
    combine.add_argument("summaries", nargs="+", help="the JSON files the sites wrote")
    args = p.parse_args(argv)

    try:
        if args.command == "site":
            if Path(args.out).exists() and not args.overwrite:  # refused before the volumes are read
                raise FileExistsError(f"{args.out} exists: pass --overwrite to replace it")
            summary = dataset_landmarks(args.dataset_dir, args.split, args.bias_correction)
            summary["bias_correction"] = bool(args.bias_correction)
            out = write_new_json(args.out, summary, args.overwrite)
            print(f"{Path(args.dataset_dir).name}: landmarks of {summary['count']} {args.split} volumes -> {out}")
            return 0
        summaries = read_json_files(args.summaries, "a landmark summary")
        for path, summary in zip(args.summaries, summaries):
            if not isinstance(summary, dict) or not {"percentiles", "landmarks", "count"} <= set(summary):
                raise ValueError(f"{path}: not a landmark summary (needs percentiles, landmarks and count)")
        if len({bool(s.get("bias_correction", False)) for s in summaries}) > 1:
            raise ValueError("some sites computed their landmarks after N4 and some without: use one setting")
        print(format_scale(standard_scale(summaries)))
        return 0
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
