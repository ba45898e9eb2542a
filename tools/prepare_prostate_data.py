#!/usr/bin/env python
"""Write per-site datalists for the real multi-site prostate MRI dataset (or any folder in its layout).

    python tools/prepare_prostate_data.py --root /data/ProstateMRI [--sites BIDMC HK ...] [--seed 0] [--check]

ROOT holds one folder per site with CaseNN.nii.gz and CaseNN_segmentation.nii.gz (or
_Segmentation). A case (or its mask) may also be a DICOM folder, CaseNN/ (CaseNN_segmentation/):
its files are grouped by series as inference groups them (localizers and series that
--series_filter does not take are left out and named; default: MR), and when one series is left
it is converted once to CaseNN.nii.gz beside the folder, with the series' geometry (an existing
NIfTI is kept unless --overwrite), and the datalist lists the NIfTI. Every conversion is printed;
a bad case (two MR series left, a missing slice, ...) is named and skipped, and the rest of the
site goes on. --series_filter '{"Modality": "MR", "SeriesDescription": "*T2*"}' picks the T2
series of a case folder holding a whole study.
Each site gets ROOT/<site>/datalist.json split by case; ROOT/sites.json
maps simulator client names to sites. Every file that is not used is reported with the reason.
With --check, every pair is opened and checked (readable, 3-D, finite, same shape); bad
pairs are skipped and reported. An existing datalist.json that differs from the new split
is kept (the site is skipped and reported) unless --overwrite is given.
"""

import argparse
import json
import sys
from pathlib import Path

from fedharmony.data.datalist import (DATALIST_NAME, SiteDataError, check_case, convert_dicom_cases, find_cases,
                                      make_datalist, write_datalist)
from fedharmony.core.files import write_site_map
from fedharmony.data.dicom import SeriesFilter


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="dataset root with one folder per site")
    p.add_argument("--sites", nargs="+", help="site folders to use (default: every sub-folder with cases)")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--check", action="store_true", help="open every volume and skip unreadable / mismatched pairs")
    p.add_argument("--overwrite", action="store_true", help="replace existing datalist.json files that differ, "
                   "and NIfTI files converted from DICOM series before")
    p.add_argument("--series_filter", default="MR", help="which DICOM series of a case folder to convert: a modality "
                   "(default MR), a JSON object of DICOM keywords and patterns (e.g. "
                   "'{\"SeriesDescription\": \"*T2*\"}'), or '' for every series")
    args = p.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        p.error(f"--root {root} is not a folder")
    try:
        SeriesFilter(args.series_filter)
    except ValueError as e:
        p.error(f"--series_filter: {e}")
    names = args.sites or sorted(d.name for d in root.iterdir() if d.is_dir())
    written, skipped_all = [], []
    for name in names:
        try:
            converted, not_converted = convert_dicom_cases(root / name, overwrite=args.overwrite,
                                                           series_filter=args.series_filter)
            cases, skipped = find_cases(root / name)
        except SiteDataError as e:
            skipped_all.append(str(e))
            continue
        for line in converted:
            print(f"converted: {line}")
        skipped = not_converted + skipped
        if args.check:
            for case, (img, mask) in list(cases.items()):
                try:
                    check_case(root / name / img, root / name / mask, name)
                except SiteDataError as e:
                    skipped.append(f"{name}/{img}: {e}")
                    del cases[case]
        skipped_all.extend(skipped)
        if len(cases) < 3:
            skipped_all.append(f"{name}: only {len(cases)} usable case(s); a site needs 3 to split, no datalist written")
            continue
        dl = make_datalist(cases, args.seed)
        existing = root / name / DATALIST_NAME
        if existing.is_file() and not args.overwrite:
            try:
                same = {k: v for k, v in json.loads(existing.read_text()).items() if k != "name"} == dl
            except json.JSONDecodeError:
                same = False
            if not same:
                skipped_all.append(f"{name}: {existing} exists with another split; kept (use --overwrite)")
                continue
        write_datalist(root / name, dl, name)
        written.append(name)
        print(f"{name}: {len(cases)} cases -> " + ", ".join(f"{k} {len(v)}" for k, v in dl.items()))
    if written:
        write_site_map(root, written)
    for reason in skipped_all:
        print(f"skipped: {reason}")
    print(f"{len(written)} site(s) prepared, {len(skipped_all)} item(s) skipped")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
