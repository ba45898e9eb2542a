#!/usr/bin/env python
"""Federated training of the prostate MRI bundle on NVFlare, with any registered method (`--algorithm`;
`python -m fedharmony methods` lists them, their flags and defaults; `--help` shows every flag).

Run in the simulator (NVFlare 2.9's SimEnv):
    python jobs/prostate.py --algorithm fedavg --data-root data/prostate --sites 6 --rounds 10
HarmoFL and its ablations (one flag each):
    python jobs/prostate.py --algorithm harmofl [--amp-mode paper|released|off] [--amp-ratio 0.05] [--wp-alpha 0.05]
IOP-FL (personalized models inside; the model pool for routing outside is written at the end):
    python jobs/prostate.py --algorithm iopfl [--iop-alpha 0.1]
PRR-FL (personalized model + deputy per site, progressive Fourier aggregation of the deputies):
    python jobs/prostate.py --algorithm prrfl [--prrfl-r0 0.7 --prrfl-r1 0.95 --prrfl-alpha1 0.7 --prrfl-alpha2 0.9]
Export a self-contained job folder for `nvflare simulator` / `nvflare job submit`:
    python jobs/prostate.py --algorithm fedbn --export --export-dir build/jobs
Production options: --min-clients (go on without sites that die), --no-custom-code (sites with
the package installed), --privacy-percentile (NVFlare's PercentilePrivacy on what sites send),
--initial-model / --start-round (resume from a saved global model).
"""

import os
import sys

from fedharmony.fl.cli import main

if __name__ == "__main__":
    sys.exit(main(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundles",
                               "prostate_mri_seg"), __doc__))
