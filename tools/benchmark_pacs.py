#!/usr/bin/env python
"""Wall time of the PACS round trip (tools/pacs.py) through a local Orthanc: one phantom MR series (--slices x
--size x --size) uploaded, then pulled, segmented (prostate bundle, an untrained network of --base-features) and
its SEG + RTSTRUCT stored, over DICOMweb and over DIMSE (a fresh series each). Needs Orthanc and its DICOMweb plugin
(apt-get install orthanc orthanc-dicomweb).

    python tools/benchmark_pacs.py --slices 20 --size 96
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=20)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--base-features", type=int, default=4)
    args = p.parse_args()
    import torch
    from conftest import BUNDLE, phantom_series_image, write_series
    from test_pacs import CALLING_AE, ORTHANC_AE, PASSWORD, USER, _upload, orthanc_binary, orthanc_server

    from fedharmony.bundle.networks import build_network

    if orthanc_binary() is None:
        sys.exit("needs Orthanc and its DICOMweb plugin: apt-get install orthanc orthanc-dicomweb")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "orthanc").mkdir()
        model = tmp / "model.pt"
        torch.save(build_network(str(BUNDLE), overrides={"base_features": args.base_features}, seed=0).state_dict(),
                   model)
        rows = []
        with orthanc_server(tmp / "orthanc") as o:
            for protocol in ("dicomweb", "dimse"):
                import pydicom

                folder = write_series(tmp / protocol, phantom_series_image(size=args.size, slices=args.slices))
                series = str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)
                _upload(o, folder.iterdir())
                where = (["--dicomweb", o["dicomweb"]] if protocol == "dicomweb" else
                         ["--dimse", f"127.0.0.1:{o['dicom_port']}", "--called-ae", ORTHANC_AE, "--calling-ae",
                          CALLING_AE])
                cmd = [sys.executable, str(REPO / "tools" / "pacs.py"), *where, "--series", series, "--output-format",
                       "dicom_seg", "rtstruct", "--work", str(tmp / f"work_{protocol}"), "--", "--ckpt_path",
                       str(model), "--base_features", str(args.base_features)]
                env = {**os.environ, "FEDHARMONY_PACS_USER": USER, "FEDHARMONY_PACS_PASSWORD": PASSWORD}
                t0 = time.monotonic()
                res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
                wall = time.monotonic() - t0
                if res.returncode:
                    sys.exit(res.stdout + res.stderr)
                (rec,) = json.loads((tmp / f"work_{protocol}" / "pacs_summary.json").read_text())["series"]
                rows.append((protocol, wall, rec["seconds"]))
    print(f"one {args.slices}-slice {args.size} x {args.size} series, untrained UNet "
          f"base_features={args.base_features}, "
          f"SEG + RTSTRUCT, threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print("| protocol | wall s (tools/pacs.py, process start to exit) | pull s | bundle run s | store s |")
    print("|---|---|---|---|---|")
    for protocol, wall, sec in rows:
        print(f"| {protocol} | {wall:.1f} | {sec.get('pull', 0):.2f} | {sec.get('inference', 0):.1f} | "
              f"{sec.get('store', 0):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
