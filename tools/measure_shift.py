#!/usr/bin/env python
"""What separates a task's sites before training, as stored and after the bundle's preprocessing.

    python tools/measure_shift.py --data data/prostate --out docs/studies/shift_prostate_v1 \\
        [--sites BIDMC HK ...] [--override '{"image_size": 96}'] [--cases N] [--title TEXT]

Per site: the intensity distribution, the low-frequency Fourier amplitude, and a site classifier's accuracy
(fedharmony.study.shift). Writes OUT/shift.json, shift.md (the table) and shift.png. Segmentation bundle
(prostate) for now.
"""

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    from fedharmony.core.files import read_site_map
    from fedharmony.study.shift import measure_shift, write_shift_report

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="site folders and sites.json (phantom or prepared real data)")
    p.add_argument("--out", required=True)
    p.add_argument("--sites", nargs="+", help="site folders to compare (default: every site in sites.json)")
    p.add_argument("--override", default="{}", help="bundle settings as JSON, e.g. the study's image_size")
    p.add_argument("--cases", type=int, help="at most N cases per site")
    p.add_argument("--bundle", default=str(REPO / "bundles" / "prostate_mri_seg"))
    p.add_argument("--title", default="")
    args = p.parse_args(argv)
    data = Path(args.data)
    try:
        overrides = json.loads(args.override)
        names = args.sites or [Path(v).name for v in read_site_map(data).values()]
    except (ValueError, OSError) as e:
        p.error(str(e))
    missing = [n for n in names if not (data / n / "datalist.json").is_file()]
    if missing:
        p.error(f"no datalist.json for site(s) {missing} under {data}")
    t0 = time.time()
    result = measure_shift(args.bundle, {n: data / n for n in names}, overrides, args.cases)
    result["seconds"] = time.time() - t0
    command = "python tools/measure_shift.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(write_shift_report(result, args.out, args.title or str(data), command).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
