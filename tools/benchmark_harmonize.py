#!/usr/bin/env python
"""Speed of amplitude normalization, and what HarmoFL adds to each round's messages.

    python tools/benchmark_harmonize.py [--batch 16] [--size 384] [--ratio 0.05] [--repeats 5]

1. CPU: ``fedharmony.methods.harmofl.harmonize.amplitude_normalize`` (one batched rfft2 / irfft2) against a
   per-image NumPy implementation of the same math (fft2, fftshift, centred window, ifft2,
   real part: the released code's approach, written here as the reference), on a
   B x 3 x S x S float32 batch; median of ``--repeats`` runs, and the largest relative
   difference between the two outputs.
2. GPU (only where CUDA and cupy are present): cupy and torch backends, throughput as a
   fraction of the device's memory bandwidth (bytes = one read + one write of the batch),
   and the share of one training step of the HarmoFL network that normalization takes.
3. Bytes per round: the state dict a site sends (and receives) for FedAvg and for HarmoFL
   (the same network plus the (3, S, S) float32 amplitude target).
Prints the machine, versions and command first.
"""

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def numpy_per_image(images: np.ndarray, target: np.ndarray, ratio: float) -> np.ndarray:
    """The released code's approach, one image at a time (float64 FFTs, as NumPy does)."""
    out = np.empty_like(images)
    h, w = images.shape[-2:]
    b, ch, cw = int(np.floor(min(h, w) * ratio)), h // 2, w // 2
    t_s = np.fft.fftshift(target, axes=(-2, -1))
    for i in range(images.shape[0]):
        f = np.fft.fft2(images[i], axes=(-2, -1))
        amp, pha = np.abs(f), np.angle(f)
        a_s = np.fft.fftshift(amp, axes=(-2, -1))
        a_s[:, ch - b:ch + b + 1, cw - b:cw + b + 1] = t_s[:, ch - b:ch + b + 1, cw - b:cw + b + 1]
        amp = np.fft.ifftshift(a_s, axes=(-2, -1))
        out[i] = np.real(np.fft.ifft2(amp * np.exp(1j * pha), axes=(-2, -1)))
    return out


def timed(fn, repeats, sync=lambda: None):
    fn()  # warm-up (plans, allocations)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def state_bytes(sd) -> int:
    return sum(v.numel() * v.element_size() for v in sd.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=384)
    p.add_argument("--ratio", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    from fedharmony.bundle.networks import build_network
    from fedharmony.methods.harmofl.harmonize import amplitude_normalize, batch_amplitude

    print(f"machine: {platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, "
          f"torch {torch.__version__}, numpy {np.__version__}")
    print(f"command: python tools/benchmark_harmonize.py {' '.join(argv if argv is not None else sys.argv[1:])}\n")
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, 3, args.size, args.size, generator=g) * 255
    target = batch_amplitude(torch.rand(4, 3, args.size, args.size, generator=g) * 200)
    x_np, t_np = images.numpy(), target.numpy()

    t_torch = timed(lambda: amplitude_normalize(images, target, args.ratio), args.repeats)
    t_numpy = timed(lambda: numpy_per_image(x_np, t_np, args.ratio), args.repeats)
    ours = amplitude_normalize(images, target, args.ratio).numpy()
    ref = numpy_per_image(x_np, t_np, args.ratio)
    rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
    shape = f"{args.batch} x 3 x {args.size} x {args.size}"
    print(f"CPU, batch {shape}, L = {args.ratio}:\n")
    print("| implementation | median s | images / s | speed-up | max relative difference |")
    print("|---|---|---|---|---|")
    print(f"| NumPy, per image (reference) | {t_numpy:.3f} | {args.batch / t_numpy:.0f} | 1.0x | - |")
    print(f"| fedharmony torch, batched rfft2 | {t_torch:.3f} | {args.batch / t_torch:.0f} | "
          f"{t_numpy / t_torch:.1f}x | {rel:.1e} |")

    if torch.cuda.is_available():
        gpu_section(args, images, target)
    else:
        print("\nGPU: not measured (no CUDA device here); run this script on a GPU machine with requirements-gpu.txt.")

    fedavg = build_network(str(REPO / "bundles" / "prostate_mri_seg"), overrides={"image_size": args.size}).state_dict()
    harmo = build_network(str(REPO / "bundles" / "prostate_mri_seg"),
                          ["configs/train.json", "configs/harmofl.json"], overrides={"image_size": args.size}).state_dict()
    extra = state_bytes(harmo) - state_bytes(fedavg)
    print(f"\nBytes a site sends per round (the server sends the same back), image size {args.size}:\n")
    print("| method | state dict bytes | of which amplitude target | vs FedAvg |")
    print("|---|---|---|---|")
    print(f"| FedAvg | {state_bytes(fedavg):,} | - | - |")
    print(f"| HarmoFL | {state_bytes(harmo):,} | {extra:,} | +{100 * extra / state_bytes(fedavg):.1f}% |")
    return 0


def gpu_section(args, images, target):
    from fedharmony.methods.harmofl.harmonize import _cupy, amplitude_normalize

    dev = torch.device("cuda")
    x, t = images.to(dev), target.to(dev)
    sync = torch.cuda.synchronize
    name = torch.cuda.get_device_name(0)
    nbytes = 2 * x.numel() * x.element_size()
    rows = []
    for backend in ("torch", "cupy"):
        if backend == "cupy" and _cupy() is None:
            rows.append((backend, None))
            continue
        rows.append((backend, timed(lambda: amplitude_normalize(x, t, args.ratio, backend=backend), args.repeats * 4,
                                    sync)))
    cp = _cupy()
    bandwidth = None
    if cp is not None:
        attrs = cp.cuda.runtime.getDeviceProperties(0)
        bandwidth = 2 * attrs["memoryClockRate"] * 1e3 * attrs["memoryBusWidth"] / 8
    print(f"\nGPU {name}, batch {args.batch} x 3 x {args.size} x {args.size}:\n")
    print("| backend | median ms | GB/s (read + write) | of peak bandwidth |")
    print("|---|---|---|---|")
    for backend, sec in rows:
        if sec is None:
            print(f"| {backend} | cupy not installed | - | - |")
            continue
        gbs = nbytes / sec / 1e9
        frac = f"{100 * nbytes / sec / bandwidth:.0f}%" if bandwidth else "-"
        print(f"| {backend} | {1e3 * sec:.2f} | {gbs:.0f} | {frac} |")

    from fedharmony.bundle.networks import build_network
    from fedharmony.methods.harmofl.perturbation import perturbed_step

    net = build_network(str(REPO / "bundles" / "prostate_mri_seg"), ["configs/train.json", "configs/harmofl.json"],
                        overrides={"image_size": args.size}).to(dev).train()
    net.harmonize.target.copy_(t)
    net.harmonize.frozen = True
    opt = torch.optim.Adam(net.parameters(), 1e-4)
    labels = torch.randint(0, 2, (args.batch, args.size, args.size), device=dev)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        perturbed_step(net.parameters(), lambda: loss_fn(net(x), labels), opt, 0.05)

    t_step = timed(step, args.repeats * 2, sync)
    t_norm = 2 * timed(lambda: amplitude_normalize(x, t, args.ratio), args.repeats * 4, sync)  # 2 forwards / step
    print(f"\nOne HarmoFL training step (2 forward + 2 backward, batch {args.batch}): {1e3 * t_step:.1f} ms, "
          f"of which amplitude normalization {1e3 * t_norm:.2f} ms ({100 * t_norm / t_step:.1f}%)")


if __name__ == "__main__":
    sys.exit(main())
