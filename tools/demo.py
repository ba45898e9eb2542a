#!/usr/bin/env python
"""The README's demo: phantom sites -> 6-site FedAvg in the NVFlare simulator -> per-site Dice table.

    python tools/demo.py [--algorithm fedavg] [--rounds 20] [--local-epochs 2] [--cases 10] [--out workspace]

1. writes 6 phantom prostate sites to OUT/data (skipped if already there with the same settings);
2. runs the federation with NVFlare's SimEnv (each site its own process, 1 torch thread each);
3. prints the cross-site Dice table (global model and every site's model on each site's test split)
   and where the per-round summary, plot and TensorBoard records are.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from fedharmony.methods import METHODS

REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algorithm", default="fedavg", choices=METHODS)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--local-epochs", type=int, default=2)
    p.add_argument("--cases", type=int, default=10, help="cases per phantom site")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "workspace"), help="where data and the simulator workspace go")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    data = out / "data" / "prostate"
    t0 = time.time()

    stamp = data / ".settings.json"
    settings = {"cases": args.cases, "seed": args.seed}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == settings):
        print(f"[demo] 1/3 generating 6 phantom sites in {data}", flush=True)
        subprocess.run([sys.executable, str(REPO / "tools" / "make_phantom_sites.py"), "--out", str(data),
                        "--cases", str(args.cases), "--seed", str(args.seed)], check=True)
        stamp.write_text(json.dumps(settings))
    else:
        print(f"[demo] 1/3 phantom sites already in {data}", flush=True)
    t_data = time.time() - t0

    print(f"[demo] 2/3 {args.algorithm}: 6 sites x {args.rounds} rounds x {args.local_epochs} local epochs "
          f"in the NVFlare simulator", flush=True)
    sim_root = out / "sim"
    cmd = [sys.executable, str(REPO / "jobs" / "prostate.py"), "--algorithm", args.algorithm,
           "--rounds", str(args.rounds), "--local-epochs", str(args.local_epochs), "--sites", "6",
           "--data-root", str(data), "--workspace", str(sim_root)]
    t1 = time.time()
    rc = subprocess.run(cmd).returncode  # the job script shows one line per round and names its log file
    t_sim = time.time() - t1
    log_path = sim_root / f"prostate_mri_seg_{args.algorithm}.log"
    if rc != 0:
        print(f"[demo] the simulator failed (exit {rc}); full log: {log_path}")
        return rc

    print("[demo] 3/3 results", flush=True)
    workspace = sim_root / f"prostate_mri_seg_{args.algorithm}"
    report = subprocess.run([sys.executable, str(REPO / "tools" / "fl_results.py"), str(workspace),
                             "--data-root", str(data)], capture_output=True, text=True, check=True).stdout
    print(report)
    print(f"\n[demo] done in {time.time() - t0:.0f} s (data {t_data:.0f} s, federation {t_sim:.0f} s); "
          f"full simulator log: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
