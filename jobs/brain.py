#!/usr/bin/env python
"""Federated training of the brain MRI bundle (brain mask on T1-weighted MRI, Fed-IXI's task) on NVFlare,
with any registered method (`--algorithm`; `python -m fedharmony methods` lists them, their flags and
defaults; `--help` shows every flag). The flags are the prostate job's (jobs/prostate.py): the brain bundle
is the prostate bundle's network and transforms on another task.

Phantom sites on the MNI152 template, scanned as the three IXI hospitals' scanners:
    python tools/make_phantom_sites.py --phantom brain --out data/brain --voxel-scale 2
    python jobs/brain.py --algorithm fedavg --data-root data/brain --sites 3 --rounds 10 --image-size 96
Fed-IXI (FLamby's IXI Tiny), prepared once:
    python tools/prepare_fed_ixi.py --source /data/IXI_sample --out data/fed_ixi --split metadata_tiny.csv
    python jobs/brain.py --algorithm fedbn --data-root data/fed_ixi --sites 3
Export a self-contained job folder for `nvflare simulator` / `nvflare job submit`:
    python jobs/brain.py --algorithm harmofl --export --export-dir build/jobs
"""

import os
import sys

from fedharmony.fl.cli import main

if __name__ == "__main__":
    sys.exit(main(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles",
                               "brain_mri_seg"), __doc__))
