#!/usr/bin/env python
"""Figure: the same slice from each site before and after amplitude normalization, with spectra.

    python tools/plot_harmonization.py --data-root data/prostate --out harmonization.png
        [--ratio 0.01] [--image-size 96] [--case 0] [--target global|BIDMC|...] [--ckpt model.pt]

Each site's case is loaded and preprocessed like the bundle does (z-score, resized to
--image-size), its gland-centre slice taken as a 2.5D input, and normalized to a target:
by default the mean amplitude over all sites' slices (what the server's averaged target
approximates); ``--target SITE`` uses one site's; ``--ckpt`` uses the amplitude target
stored in a trained HarmoFL checkpoint. Rows: image before, log-amplitude before, image
after, log-amplitude after (spectra centred).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch


def load_slab(site_dir: Path, case: int, size: int):
    """(1, 3, size, size) 2.5D slab through the gland centre of one case, bundle preprocessing."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd, Resized

    from fedharmony.data.datalist import find_cases
    from fedharmony.bundle.transforms import volume_to_slabs

    cases, _ = find_cases(site_dir)
    names = sorted(cases)
    if not names:
        raise FileNotFoundError(f"no CaseNN volumes in {site_dir}")
    img, seg = cases[names[min(case, len(names) - 1)]]
    t = Compose([LoadImaged(["image", "label"], image_only=True), EnsureChannelFirstd(["image", "label"]),
                 Resized(["image", "label"], spatial_size=(size, size, -1), mode=("area", "nearest")),
                 NormalizeIntensityd("image")])
    d = t({"image": str(site_dir / img), "label": str(site_dir / seg)})
    k = int(torch.argmax((d["label"][0] > 0).sum(dim=(0, 1))))
    return volume_to_slabs(torch.as_tensor(d["image"]).float())[k:k + 1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder of site folders")
    p.add_argument("--out", default="harmonization.png")
    p.add_argument("--ratio", type=float, default=0.01, help="window ratio L")
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--case", type=int, default=0)
    p.add_argument("--target", default="global", help="'global' (mean over sites) or a site name")
    p.add_argument("--ckpt", help="HarmoFL checkpoint whose harmonize.target to use")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedharmony.methods.harmofl.harmonize import amplitude_normalize, batch_amplitude

    root = Path(args.data_root)
    sites_file = root / "sites.json"
    sites = list(json.loads(sites_file.read_text()).values()) if sites_file.is_file() else sorted(
        d.name for d in root.iterdir() if d.is_dir())
    if not sites:
        p.error(f"no site folders in {root}")
    slabs = {s: load_slab(root / s, args.case, args.image_size) for s in sites}
    if args.ckpt:
        sd = torch.load(args.ckpt, map_location="cpu", weights_only=True)
        sd = sd.get("model", sd)
        if "harmonize.target" not in sd:
            p.error(f"{args.ckpt} holds no 'harmonize.target' (not a HarmoFL checkpoint)")
        target, label = torch.as_tensor(sd["harmonize.target"]).float(), "checkpoint target"
    elif args.target == "global":
        target, label = batch_amplitude(torch.cat(list(slabs.values()))), "mean over sites"
    elif args.target in slabs:
        target, label = batch_amplitude(slabs[args.target]), f"{args.target}'s amplitude"
    else:
        p.error(f"--target must be 'global' or one of {sites}")
    if tuple(target.shape) != (3, args.image_size, args.image_size):
        p.error(f"target shape {tuple(target.shape)} does not match --image-size {args.image_size}")

    def log_amp(x):
        return np.log1p(np.fft.fftshift(np.abs(np.fft.fft2(x[0, 1].numpy()))))

    fig, axes = plt.subplots(4, len(sites), figsize=(2.4 * len(sites), 9.6), squeeze=False)
    for j, s in enumerate(sites):
        before = slabs[s]
        after = amplitude_normalize(before, target, args.ratio)
        lo, hi = np.percentile(before[0, 1].numpy(), [1, 99])
        for i, (img, cmap) in enumerate([(before[0, 1].numpy(), "gray"), (log_amp(before), "magma"),
                                         (after[0, 1].numpy(), "gray"), (log_amp(after), "magma")]):
            ax = axes[i, j]
            ax.imshow(img.T, cmap=cmap, origin="lower", **({"vmin": lo, "vmax": hi} if cmap == "gray" else {}))
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(s)
    for i, name in enumerate(["before", "log |F| before", "after", "log |F| after"]):
        axes[i, 0].set_ylabel(name)
    fig.suptitle(f"Amplitude normalization, L = {args.ratio} (window {2 * int(args.image_size * args.ratio) + 1}^2), "
                 f"target: {label}; grey levels fixed per site from 'before'")
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
