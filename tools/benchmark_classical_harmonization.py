#!/usr/bin/env python
"""What the classical harmonization baselines cost per volume: N4 bias-field correction (SimpleITK) and
histogram standardization, against the per-volume z-score, on phantom prostate volumes.

    python tools/benchmark_classical_harmonization.py [--sizes 96 384] [--slices 20] [--repeats 3]

Prints a Markdown table (machine, versions and command first): median seconds per volume over
``--repeats`` volumes, per in-plane size. In the bundle these run once per volume as it is loaded
(training caches its preprocessed volumes; inference pays it per input).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import header  # noqa: E402


def _volume(size: int, slices: int, seed: int) -> torch.Tensor:
    from fedharmony.phantom import load_profiles
    from fedharmony.phantom.prostate import apply_scanner, make_anatomy

    signal, _ = make_anatomy(np.random.default_rng(seed), size, slices)
    image = apply_scanner(signal, load_profiles()["BIDMC"], 1.0, np.random.default_rng(seed))  # a strong coil field
    return torch.as_tensor(image[None])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[96, 384])
    p.add_argument("--slices", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.slices < 1 or min(args.sizes) < 16:
        p.error("--repeats and --slices must be >= 1, sizes >= 16")

    from fedharmony.bundle.classical_harmonization import (HistogramStandardize, N4BiasCorrection, format_scale,
                                                           site_landmarks, standard_scale)
    from fedharmony.bundle.intensity import VolumeIntensity

    print("\n".join(header("benchmark_classical_harmonization.py", argv)))
    print()
    print(f"| step | " + " | ".join(f"{s} x {s} x {args.slices}, s / volume" for s in args.sizes) + " |")
    print("|---|" + "---|" * len(args.sizes))
    rows = {"z-score (default)": [], "N4 (shrink 4, 3 x 50 iterations)": [], "histogram standardization": []}
    for size in args.sizes:
        volumes = [_volume(size, args.slices, seed) for seed in range(args.repeats)]
        scale = format_scale(standard_scale([site_landmarks(volumes)]))
        steps = {"z-score (default)": VolumeIntensity("zscore"), "N4 (shrink 4, 3 x 50 iterations)": N4BiasCorrection(),
                 "histogram standardization": HistogramStandardize(scale)}
        for name, step in steps.items():
            times = []
            for v in volumes:
                t0 = time.perf_counter()
                step(v.clone())
                times.append(time.perf_counter() - t0)
            rows[name].append(statistics.median(times))
    for name, values in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
