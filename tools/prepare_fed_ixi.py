#!/usr/bin/env python
"""Write per-center site folders and datalists for FLamby's Fed-IXI (IXI Tiny) brain MRI data.

    python tools/prepare_fed_ixi.py --source /data/IXI_sample --out /data/brain
    python tools/prepare_fed_ixi.py --source /data/IXI_sample --out /data/brain --split metadata_tiny.csv --check
    python tools/prepare_fed_ixi.py --source /data/IXI_sample --out /data/brain --symlink --centers Guys HH

SOURCE is FLamby's IXI_sample folder: one folder per subject, IXInnn-<Center>-nnnn/, holding
T1/<subject>_image.nii.gz and label/<subject>_label.nii.gz (a brain mask on the image's grid);
other modalities (T2/, ...) are ignored. The center (Guys, HH, IOP) is the second field of the
folder name, and each center becomes one site: OUT/<center>/<subject>/ gets the T1 image and
label (copied, or linked with --symlink), OUT/<center>/datalist.json lists them, split by
subject, and OUT/sites.json maps simulator client names to the centers (Guys, HH, IOP, then any
other center sorted).
With --split (FLamby's metadata_tiny.csv, header "Patient ID,Manufacturer,Split"), FLamby's test
subjects are the testing list and its train subjects are split 80/20 into training / validation
by --seed; subjects missing from the CSV are left out. Without --split: 60/20/20 by --seed.
Every subject folder not used (a name that does not parse, a missing T1 image or label, a
subject not in the CSV) is reported with the reason and the rest go on (files directly in SOURCE
are ignored); with --check every image / label pair is opened (readable, 3-D, finite, same
shape). A center with fewer than 3 usable subjects gets no datalist. An existing datalist.json
that differs from the new split is kept (the center is skipped and reported) unless --overwrite
is given. Source files are only ever read.
"""

import argparse
import csv
import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from fedharmony.core.files import write_site_map
from fedharmony.data.datalist import DATALIST_NAME, SiteDataError, check_case, make_datalist, write_datalist

CENTER_ORDER = ("Guys", "HH", "IOP")  # FLamby's center order (client 0, 1, 2)
_SUBJECT_RE = re.compile(r"^IXI(\d+)-([A-Za-z]+)-(\d+)$")


def subject_files(subject):
    """The T1 image and label of a subject, relative to the folder holding the subject folder."""
    return f"{subject}/T1/{subject}_image.nii.gz", f"{subject}/label/{subject}_label.nii.gz"


def read_flamby_split(path):
    """``{patient id: "train" | "test"}`` from FLamby's metadata_tiny.csv; ValueError naming the file."""
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [h.strip() for h in reader.fieldnames or []]
            missing = sorted({"Patient ID", "Split"} - set(reader.fieldnames))
            if missing:
                raise ValueError(f"--split {path}: no column {', '.join(missing)} "
                                 "(expected the header 'Patient ID,Manufacturer,Split')")
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"--split {path}: cannot read it ({type(e).__name__}: {e})") from None
    split = {}
    for line, row in rows:
        which = (row["Split"] or "").strip().lower()
        try:
            pid = int(row["Patient ID"])
        except (TypeError, ValueError):
            pid = None
        if pid is None or which not in ("train", "test"):
            raise ValueError(f"--split {path} line {line}: expected an integer Patient ID and Split 'train' or "
                             f"'test', got {row['Patient ID']!r}, {row['Split']!r}")
        if split.setdefault(pid, which) != which:
            raise ValueError(f"--split {path} line {line}: patient {pid} is listed as both train and test")
    return split


def find_subjects(source, centers, out):
    """``{center: {subject: (image, label)}}`` of the complete subjects, and the reasons for the rest."""
    found, skipped = {}, []
    for d in sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.resolve() == out.resolve():
            continue  # --out inside --source: our own output, not a subject
        m = _SUBJECT_RE.match(d.name)
        if not m:
            skipped.append(f"{d} (not an IXInnn-Center-nnnn subject folder)")
            continue
        if centers and m.group(2) not in centers:
            continue
        subjects = found.setdefault(m.group(2), {})  # listed even when every subject is bad, so it is reported
        files = subject_files(d.name)
        missing = [(f, what) for f, what in zip(files, ("T1 image", "label")) if not (source / f).is_file()]
        skipped.extend(f"{source / f} (no {what}; subject left out)" for f, what in missing)
        if not missing:
            subjects[d.name] = files
    return found, skipped


def flamby_datalist(subjects, flamby, seed, skipped):
    """FLamby's test subjects as testing, its train subjects 80/20 into training / validation by ``seed``."""
    parts = {"train": [], "test": []}
    for subject in sorted(subjects):
        pid = int(_SUBJECT_RE.match(subject).group(1))
        if pid in flamby:
            parts[flamby[pid]].append(subject)
        else:
            skipped.append(f"{subject} (patient {pid} is not in the --split CSV; left out)")
    train = parts["train"]
    if len(train) < 2 or not parts["test"]:
        return None, (f"{len(train)} train and {len(parts['test'])} test subject(s) in the --split CSV; "
                      "a center needs 2 train and 1 test, no datalist written")
    # the seeded shuffle of split_cases (which always keeps a testing case, so it cannot be used for 80/20)
    shuffled = [train[i] for i in np.random.default_rng(seed).permutation(len(train))]
    n_val = max(1, int(round(len(train) * 0.2)))
    split = {"training": sorted(shuffled[:-n_val]), "validation": sorted(shuffled[-n_val:]),
             "testing": parts["test"]}
    return {k: [{"image": subjects[c][0], "label": subjects[c][1], "case": c} for c in ids]
            for k, ids in split.items()}, None


def place_files(source, site_dir, files, symlink):
    """Copy (or link) each file to the same relative path under ``site_dir``; returns the failures."""
    failed = []
    for rel in files:
        src, dst = source / rel, site_dir / rel
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_symlink():
                dst.unlink()  # an earlier run's link: removing it leaves its target alone
            elif dst.exists():
                if os.path.samefile(src, dst):  # copying onto it would truncate the source
                    raise OSError("it is the source file itself (does --out overlap --source?)")
                if symlink:
                    dst.unlink()  # an earlier run's copy
            if symlink:
                dst.symlink_to(src.resolve())
            else:
                shutil.copy2(src, dst)
        except OSError as e:
            failed.append(f"{dst} (cannot {'link' if symlink else 'copy'} {src}: {e})")
    return failed


def same_datalist(path, datalist):
    try:
        return {k: v for k, v in json.loads(path.read_text()).items() if k != "name"} == datalist
    except (OSError, ValueError, AttributeError):  # unreadable or not a JSON object: it differs
        return False


def prepare_center(args, center, subjects, flamby, skipped):
    """Split, place the files and write one center's datalist; returns the datalist or None (reason in skipped)."""
    if args.check:
        for subject, (img, lab) in list(subjects.items()):
            try:
                check_case(args.source / img, args.source / lab, center)
            except SiteDataError as e:
                skipped.append(f"{args.source / subject} ({e})")
                del subjects[subject]
    if len(subjects) < 3:
        skipped.append(f"{center} (only {len(subjects)} usable subject(s); a center needs 3 to split, "
                       "no datalist written)")
        return None
    if flamby is None:
        datalist, why = make_datalist(subjects, args.seed), None
    else:
        datalist, why = flamby_datalist(subjects, flamby, args.seed, skipped)
    if why:
        skipped.append(f"{center} ({why})")
        return None
    site_dir = args.out / center
    existing = site_dir / DATALIST_NAME
    if existing.is_file() and not args.overwrite and not same_datalist(existing, datalist):
        skipped.append(f"{existing} (exists with another split; kept, center not prepared; use --overwrite)")
        return None
    files = [item[k] for items in datalist.values() for item in items for k in ("image", "label")]
    failed = place_files(args.source, site_dir, files, args.symlink)
    if failed:
        skipped.extend(failed + [f"{center} (files could not be placed; no datalist written)"])
        return None
    write_datalist(site_dir, datalist, center)
    return datalist


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", required=True, type=Path, help="FLamby's IXI_sample folder (one folder per subject)")
    p.add_argument("--out", required=True, type=Path, help="output folder: one site folder per center, sites.json")
    p.add_argument("--split", type=Path, help="FLamby's metadata_tiny.csv: keep its train / test split")
    p.add_argument("--seed", type=int, default=0, help="split seed (a fixed seed, a fixed split)")
    p.add_argument("--check", action="store_true", help="open every volume and skip unreadable / mismatched pairs")
    p.add_argument("--symlink", action="store_true", help="link the files instead of copying them; a site whose "
                   "policy resolves paths inside its data root needs copies (links resolve into --source)")
    p.add_argument("--overwrite", action="store_true", help="replace existing datalist.json files that differ")
    p.add_argument("--centers", nargs="+", help="centers to prepare (default: every center in --source)")
    args = p.parse_args(argv)
    if not args.source.is_dir():
        p.error(f"--source {args.source} is not a folder")
    try:
        flamby = read_flamby_split(args.split) if args.split else None
    except ValueError as e:
        p.error(str(e))
    found, skipped = find_subjects(args.source, args.centers, args.out)
    names = set(found) | set(args.centers or [])
    written = []
    for center in [c for c in CENTER_ORDER if c in names] + sorted(names - set(CENTER_ORDER)):
        datalist = prepare_center(args, center, found.get(center, {}), flamby, skipped)
        if datalist:
            written.append(center)
            print(f"{center}: {sum(map(len, datalist.values()))} subjects -> "
                  + ", ".join(f"{k} {len(v)}" for k, v in datalist.items()))
    if written:
        write_site_map(args.out, written)
    for reason in skipped:
        print(f"skipped: {reason}")
    print(f"{len(written)} center(s) prepared in {args.out}, {len(skipped)} item(s) skipped")
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
