"""What separates the sites before any training: is there anything left for harmonization to do? (no NVFlare)

A method that fights scanner shift can only gain where the shift survives the bundle's own preprocessing. This
measures it on a segmentation task's sites, twice: on the images as stored (loaded and made channel-first, no
intensity change) and after the bundle's ``volume_preprocessing`` (its geometry and intensity normalization,
with the study's settings). Three views:

* **intensities**: each site's intensity distribution (every voxel of every case, normalized histograms over
  common bins); summary: the mean over site pairs of the 1-Wasserstein distance between the distributions, in
  units of the pooled distribution's standard deviation (so stored and preprocessed values compare);
* **low-frequency amplitude**: the radial average of each slice's 2-D Fourier amplitude over the lowest
  frequencies (what HarmoFL and PRR-FL exchange), log scale; summary: the share of the variance of those log
  amplitudes that lies between sites (between-site variance over total, 0 to 1; about 0 when sites do not differ);
* **a site classifier**: multinomial logistic regression on 32 x 32 central slices (torch, weight decay), trained
  and tested with folds by case (no case in both), a case's prediction the mean of its slices'; accuracy over cases
  with a Wilson 95% interval, against chance (1 / sites). Near chance: the preprocessing removed what a linear
  model can see of the scanner.

:func:`measure_shift` returns the numbers and per-site curves; :func:`write_shift_report` the table and figure.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

__all__ = ["site_cases", "measure_shift", "write_shift_report", "wilson_interval", "LOW_FREQUENCIES"]

LOW_FREQUENCIES = 8  # radial frequency rings (0 = DC) in the amplitude summary
SLICE_SIZE = 32


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple:
    """Wilson score 95% interval of a proportion."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def site_cases(bundle_dir, site_dir, preprocessed: bool, overrides: Optional[dict] = None,
               limit: Optional[int] = None) -> List[np.ndarray]:
    """The site's volumes (every split of its ``datalist.json``), each ``(H, W, D)``: as stored, or after the
    bundle's ``volume_preprocessing`` with ``overrides``."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    from fedharmony.data.datalist import load_datalist

    parser = ConfigParser()
    parser.read_config(str(Path(bundle_dir) / "configs" / "train.json"))
    parser.update({"bundle_root": str(bundle_dir), "dataset_dir": str(site_dir), **(overrides or {})})
    items = []
    for split in ("training", "validation", "testing"):
        try:
            items += load_datalist(str(Path(site_dir) / "datalist.json"), split, base_dir=str(site_dir))
        except (KeyError, ValueError):
            continue  # a datalist without this split
    if not items:
        raise ValueError(f"no case in {Path(site_dir) / 'datalist.json'}")
    items = items[:limit] if limit else items
    if preprocessed:
        transform = parser.get_parsed_content("validate#preprocessing")
    else:
        transform = Compose([LoadImaged(keys=["image", "label"], image_only=True),
                             EnsureChannelFirstd(keys=["image", "label"])])
    return [np.asarray(transform(dict(item))["image"], dtype=np.float32)[0] for item in items]


def _low_frequency_profile(volume: np.ndarray, rings: int = LOW_FREQUENCIES) -> np.ndarray:
    """Per slice (axis 2): the mean log amplitude in each of the lowest ``rings`` radial frequency rings.
    Shape ``(slices, rings)``."""
    h, w = volume.shape[:2]
    fy, fx = np.meshgrid(np.fft.fftfreq(h) * h, np.fft.fftfreq(w) * w, indexing="ij")
    ring = np.rint(np.sqrt(fy ** 2 + fx ** 2)).astype(int)
    amp = np.abs(np.fft.fft2(np.moveaxis(volume, 2, 0))) / (h * w)
    out = np.empty((volume.shape[2], rings))
    for r in range(rings):
        out[:, r] = np.log(amp[:, ring == r].mean(axis=1) + 1e-8)
    return out


def _central_slices(volume: np.ndarray, size: int = SLICE_SIZE, keep: int = 5) -> np.ndarray:
    """The ``keep`` central slices (axis 2), resized to ``size`` x ``size`` (area average), each standardized."""
    import torch
    import torch.nn.functional as F

    d = volume.shape[2]
    lo = max(0, d // 2 - keep // 2)
    chosen = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volume[:, :, lo:lo + keep], 2, 0)))[:, None]
    small = F.adaptive_avg_pool2d(chosen.float(), size)[:, 0].numpy()
    return small.reshape(len(small), -1)


def _classifier_accuracy(features: List[np.ndarray], labels: List[int], folds: int, seed: int) -> tuple:
    """Case-level accuracy of a logistic-regression site classifier on slice features, folds by case."""
    import torch

    n_sites = max(labels) + 1
    order = np.random.default_rng(seed).permutation(len(features))
    correct = 0
    for f in range(folds):
        test = set(order[f::folds].tolist())
        train_x = np.concatenate([features[i] for i in range(len(features)) if i not in test])
        train_y = np.concatenate([[labels[i]] * len(features[i]) for i in range(len(features)) if i not in test])
        mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
        torch.manual_seed(seed + f)
        model = torch.nn.Linear(train_x.shape[1], n_sites)
        opt = torch.optim.LBFGS(model.parameters(), max_iter=200)
        x = torch.from_numpy((train_x - mean) / std).float()
        y = torch.from_numpy(train_y).long()

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y) + 1e-3 * model.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            for i in test:
                probs = torch.softmax(model(torch.from_numpy((features[i] - mean) / std).float()), dim=1).mean(0)
                correct += int(int(probs.argmax()) == labels[i])
    return correct, len(features)


def measure_shift(bundle_dir, sites: Dict[str, Path], overrides: Optional[dict] = None,
                  limit: Optional[int] = None, folds: int = 3, seed: int = 0) -> dict:
    """The three views, on the stored and on the preprocessed images of ``sites`` (name -> site folder)."""
    out = {"sites": list(sites), "chance": 1 / len(sites)}
    for stage in ("stored", "preprocessed"):
        volumes = {name: site_cases(bundle_dir, folder, stage == "preprocessed", overrides, limit)
                   for name, folder in sites.items()}
        pooled = np.concatenate([v.ravel() for vs in volumes.values() for v in vs])
        lo, hi = np.percentile(pooled, [0.5, 99.5])
        bins = np.linspace(lo, hi, 65)
        scale = float(pooled.std()) or 1.0
        histograms, samples = {}, {}
        for name, vs in volumes.items():
            values = np.concatenate([v.ravel() for v in vs])
            histograms[name] = (np.histogram(np.clip(values, lo, hi), bins=bins)[0] / values.size).tolist()
            samples[name] = np.quantile(values, np.linspace(0.005, 0.995, 200))  # quantile functions
        names = list(volumes)
        w1 = [float(np.mean(np.abs(samples[a] - samples[b]))) / scale
              for i, a in enumerate(names) for b in names[i + 1:]]
        profiles = {name: np.concatenate([_low_frequency_profile(v) for v in vs]) for name, vs in volumes.items()}
        allp = np.concatenate(list(profiles.values()))
        total = float(((allp - allp.mean(axis=0)) ** 2).sum())
        between = float(sum(len(p) * ((p.mean(axis=0) - allp.mean(axis=0)) ** 2).sum() for p in profiles.values()))
        features, labels = [], []
        for k, name in enumerate(names):
            for v in volumes[name]:
                features.append(_central_slices(v))
                labels.append(k)
        correct, n = _classifier_accuracy(features, labels, folds, seed)
        out[stage] = {"cases": {name: len(vs) for name, vs in volumes.items()},
                      "intensity_w1_sd": float(np.mean(w1)), "bins": bins.tolist(), "histograms": histograms,
                      "amplitude_between_share": between / total if total else 0.0,
                      "amplitude_profiles": {name: p.mean(axis=0).tolist() for name, p in profiles.items()},
                      "classifier_correct": correct, "classifier_cases": n,
                      "classifier_accuracy": correct / n, "classifier_ci": list(wilson_interval(correct, n))}
    return out


def write_shift_report(result: dict, out_dir, title: str, command: str = "") -> Path:
    """``shift.json``, ``shift.md`` (the table) and ``shift.png`` (histograms and amplitude profiles, stored and
    preprocessed) in ``out_dir``; returns the Markdown file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "shift.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# What separates the sites: {title}", "",
             "Generated from `shift.json`" + (f" by `{command}`" if command else "") + "; do not edit by hand.", "",
             f"{len(result['sites'])} sites ({', '.join(result['sites'])}); chance for the site classifier "
             f"{result['chance']:.2f}." + (f" Measured in {result['seconds']:.0f} s." if "seconds" in result else ""),
             "",
             "| images | cases | intensity distance (W1 / SD, mean over site pairs) | low-frequency amplitude: "
             "share of variance between sites | site classifier accuracy (cases) [Wilson 95% CI] |",
             "|---|---|---|---|---|"]
    for stage in ("stored", "preprocessed"):
        r = result[stage]
        lo, hi = r["classifier_ci"]
        lines.append(f"| {stage} | {sum(r['cases'].values())} | {r['intensity_w1_sd']:.3f} | "
                     f"{r['amplitude_between_share']:.3f} | {r['classifier_accuracy']:.2f} [{lo:.2f}, {hi:.2f}] |")
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for row, stage in enumerate(("stored", "preprocessed")):
        r = result[stage]
        centres = 0.5 * (np.asarray(r["bins"][1:]) + np.asarray(r["bins"][:-1]))
        for name in result["sites"]:
            axes[row, 0].plot(centres, r["histograms"][name], label=name)
            axes[row, 1].plot(range(len(r["amplitude_profiles"][name])), r["amplitude_profiles"][name], label=name)
        axes[row, 0].set_title(f"{stage}: intensity distribution per site", fontsize=9)
        axes[row, 1].set_title(f"{stage}: mean log amplitude, lowest frequency rings", fontsize=9)
        axes[row, 1].set_xlabel("radial frequency ring (0 = DC)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "shift.png", dpi=100)
    plt.close(fig)
    lines += ["", "![intensity histograms and low-frequency amplitude per site](shift.png)", ""]
    path = out_dir / "shift.md"
    path.write_text("\n".join(lines) + "\n")
    return path
