#!/usr/bin/env python
"""Federated classification of the histology sites (5 hospitals; normal / tumour patches, 96 x 96 RGB) on NVFlare.

The image-classification bundle with task "histology"; the same flags as jobs/prostate.py:
    python jobs/histology.py --algorithm fedavg --data-root data/histology --sites 5 --rounds 10
    python jobs/histology.py --algorithm prrfl  --data-root data/histology --sites 5 --rounds 10 --local-epochs 2
    python jobs/histology.py --algorithm harmofl ...   # or any method: python -m fedharmony methods
    python jobs/histology.py --algorithm fedbn --export --export-dir build/jobs
Sites are found as for prostate: --data-root (a folder of site folders with sites.json),
$FEDHARMONY_DATA_ROOT or, on a production site, $FEDHARMONY_DATASET_DIR.
"""

import os
import sys

from fedharmony.fl.cli import main

if __name__ == "__main__":
    sys.exit(main(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles",
                               "image_classification"), __doc__, default_overrides={"task": "histology"}))
