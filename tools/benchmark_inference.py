#!/usr/bin/env python
"""Inference cost per volume through the prostate bundle's own inference configs: plain, HarmoFL, routed.

    python tools/benchmark_inference.py [--sizes 96 384] [--volumes 4] [--slices 20] [--threads 2]

For each in-plane size, phantom volumes of that matrix are written as NIfTI, and each config runs
as a user runs it (``python -m monai.bundle run``, one process each) with untrained weights of the
right architecture (speed does not depend on the weights):

* plain: ``configs/inference.json``;
* HarmoFL: ``configs/inference.json`` + ``configs/harmofl.json`` (amplitude normalization first);
* routed: ``configs/routed_inference.json`` over a pool of 3 experts (2 sites + global), with
  ``--method routing`` (IOP-FL test-time adaptation, 2 passes); its adaptation time per volume is its own column.

Per volume: the median of the seconds the run's ``inference_summary.json`` records for each input
(loading, preprocessing with orientation and spacing, inference, inverse transforms, saving).
Peak memory: the process's maximum resident set size. Prints machine, versions and command first.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import nibabel as nib

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import REPO, header  # noqa: E402

BUNDLE = REPO / "bundles" / "prostate_mri_seg"
# runs monai.bundle in this process and reports the process's peak RSS on exit
CHILD = ("import atexit, resource, runpy, sys\n"
         "atexit.register(lambda: print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
         "file=sys.stderr, flush=True))\n"
         "sys.argv = ['monai.bundle'] + sys.argv[1:]\n"
         "runpy.run_module('monai.bundle', run_name='__main__', alter_sys=True)\n")


def write_volumes(folder: Path, size: int, volumes: int, slices: int) -> None:
    from fedharmony.phantom import load_profiles, make_case

    folder.mkdir(parents=True, exist_ok=True)
    profile = load_profiles()["RUNMC"]  # matrix scale 1: the volumes are size x size in-plane
    for i in range(volumes):
        image, _, affine = make_case(profile, seed=0, case_index=i, size=size, slices=slices)
        nib.save(nib.Nifti1Image(image, affine), folder / f"Case{i:02d}.nii.gz")


def write_models(work: Path, size: int) -> dict:
    """Untrained checkpoints of each architecture, and a pool for routing: {config: extra CLI args}."""
    import torch

    from fedharmony.bundle.networks import build_network
    from fedharmony.methods.iopfl.model_pool import write_pool

    plain = build_network(str(BUNDLE), "configs/train.json", overrides={"image_size": size})
    harmofl = build_network(str(BUNDLE), ["configs/train.json", "configs/harmofl.json"],
                            overrides={"image_size": size})
    harmofl.harmonize.target.fill_(1.0)  # a trained HarmoFL model carries its federation's amplitude target
    torch.save(plain.state_dict(), work / "plain.pt")
    torch.save(harmofl.state_dict(), work / "harmofl.pt")
    experts = {f"site-{k}": build_network(str(BUNDLE), "configs/train.json", overrides={"image_size": size},
                                          seed=k).state_dict() for k in (1, 2)}
    write_pool(work / "pool", plain.state_dict(), experts, overrides={"image_size": size})
    size_arg = ["--image_size", str(size)]
    return {"plain": ["--config_file", str(BUNDLE / "configs/inference.json"), "--ckpt_path", str(work / "plain.pt"),
                      *size_arg],
            "HarmoFL": ["--config_file", json.dumps([str(BUNDLE / "configs/inference.json"),
                                                     str(BUNDLE / "configs/harmofl.json")]),
                        "--ckpt_path", str(work / "harmofl.pt"), *size_arg],
            "routed": ["--config_file", str(BUNDLE / "configs/routed_inference.json"),
                       "--pool_dir", str(work / "pool"), "--method", "routing"]}


def run_config(args, data: Path, out: Path, threads: int, timeout: Optional[float] = None) -> dict:
    """One ``monai.bundle run`` of a config (``timeout``: seconds, then it is ended and TimeoutExpired raised)."""
    cmd = [sys.executable, "-c", CHILD, "run", "--bundle_root", str(BUNDLE), "--dataset_dir", str(data),
           "--output_dir", str(out), *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[3:])} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    peak_kb = max(int(line.split()[1]) for line in res.stderr.splitlines() if line.startswith("PEAK_RSS_KB"))
    summary = json.loads((out / "inference_summary.json").read_text())
    seconds = [rec["seconds"] for rec in summary["inputs"]]
    adaptation = out / "adaptation.json"
    adapt_s = (sum(p["seconds"] for p in json.loads(adaptation.read_text())) / len(seconds)
               if adaptation.is_file() else None)
    return {"per_volume": statistics.median(seconds), "adapt": adapt_s, "wall": wall, "peak_mib": peak_kb / 1024,
            "volumes": len(seconds)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 384], help="in-plane matrix sizes")
    p.add_argument("--volumes", type=int, default=4, help="volumes per size")
    p.add_argument("--slices", type=int, default=20, help="slices per volume")
    p.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads")
    p.add_argument("--configs", nargs="+", default=["plain", "HarmoFL", "routed"], choices=["plain", "HarmoFL", "routed"])
    args = p.parse_args(argv)
    if args.volumes < 1 or args.slices < 3 or any(s < 32 or s % 16 for s in args.sizes):
        p.error("--volumes >= 1, --slices >= 3, sizes >= 32 and multiples of 16")
    print("\n".join(header("benchmark_inference.py", argv)))
    print(f"{args.volumes} phantom volumes x {args.slices} slices per size; torch threads {args.threads}\n")
    print("| config | in-plane | s / volume (median) | adaptation s / volume | run wall s | peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        for size in args.sizes:
            work = Path(tmp) / str(size)
            write_volumes(work / "in", size, args.volumes, args.slices)
            configs = write_models(work, size)
            for name in args.configs:
                r = run_config(configs[name], work / "in", work / f"out_{name}", args.threads)
                adapt = f"{r['adapt']:.2f}" if r["adapt"] is not None else "-"
                print(f"| {name} | {size} | {r['per_volume']:.2f} | {adapt} | {r['wall']:.1f} | {r['peak_mib']:.0f} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
