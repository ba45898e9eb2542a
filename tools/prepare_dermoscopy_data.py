#!/usr/bin/env python
"""Write per-client datalists for the PRR-FL FedSkinLesion dermoscopy data (or a phantom in its layout).

    python tools/prepare_dermoscopy_data.py --data-dir /data/FedSkinLesion --csv-folder /data/csv_folder \\
        [--out DIR] [--clients clientA clientB ...] [--no-check]

DATA-DIR holds client<X>/img_resize128/<image_id>.png; CSV-FOLDER holds
client<X>/{train,valid,test}_client<X>.csv (header
"image_id,label,label_binary,lesion_id,dx,dx_type,age,sex,localization,dataset", label 0/1/2 =
nv/bkl/mel). The released split is kept (one CSV per split) and checked to be disjoint by
lesion_id. Each client gets <OUT or DATA-DIR>/client<X>/datalist.json with classes
["nv", "bkl", "mel"] and image paths relative to that folder; sites.json maps simulator
client names to the clients.
"""

import argparse
import sys
import time
from pathlib import Path

from fedharmony.data.classification import class_counts_markdown, prepare_dermoscopy
from fedharmony.data.datalist import SiteDataError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="folder with client<X>/img_resize128/")
    p.add_argument("--csv-folder", required=True, help="folder with client<X>/{train,valid,test}_client<X>.csv")
    p.add_argument("--out", help="output folder for the site folders (default: --data-dir)")
    p.add_argument("--clients", nargs="+", help="client folder names (default: every client* in --csv-folder)")
    p.add_argument("--no-check", action="store_true", help="do not check that every listed image exists")
    args = p.parse_args(argv)
    for flag, value in (("--data-dir", args.data_dir), ("--csv-folder", args.csv_folder)):
        if not Path(value).is_dir():
            p.error(f"{flag} {value} is not a folder")
    t0 = time.time()
    try:
        sites = prepare_dermoscopy(args.data_dir, args.csv_folder, out_dir=args.out, clients=args.clients,
                                   check_files=not args.no_check)
    except SiteDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(class_counts_markdown(sites))
    print(f"prepared {len(sites)} client(s) into {args.out or args.data_dir} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
