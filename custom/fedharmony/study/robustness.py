"""Pixel-size robustness: the same test scans at other in-plane pixel sizes (no NVFlare import).

A scanner with another matrix or field of view images the same anatomy with other pixels. To see whether a
trained model holds, a study (``--pixel-scales``) scores the model each site would use on its test scans
resampled in-plane to ``factor`` times their pixel size over the same field of view (the matrix divided by
``factor``, rounded; the slices as they are), the label with them (nearest neighbour), and reports the score
per factor beside the score as stored (factor 1).

Resampling (:func:`resample_in_plane`): the image is resized with MONAI's ``Resize`` (trilinear, with
anti-aliasing when the pixels grow: a coarser acquisition does not alias), and rounded back to the stored data
type; the label by nearest neighbour. The two in-plane axes are the stored axes that are not the one closest
to the patient's superior-inferior direction (the slice axis). The affine keeps the field of view: the first
voxel's centre moves by half the change of pixel size.

Example::

    >>> root = resampled_test_root(data.test_root, data.sites, 1.25, out / "test_px1.25")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional, Sequence

import numpy as np

__all__ = ["DEFAULT_PIXEL_SCALES", "check_pixel_scales", "resample_in_plane", "resample_site",
           "resampled_test_root", "score_pixel_scales", "robustness_summary", "robustness_lines",
           "robustness_plot"]

DEFAULT_PIXEL_SCALES = (0.6, 0.8, 1.0, 1.25, 1.5)
READY = "resampled.json"


def check_pixel_scales(scales: Optional[Sequence[float]]) -> Optional[tuple]:
    """The factors sorted, each in [0.25, 4], 1.0 included (the scans as stored); None stays None."""
    if scales is None:
        return None
    out = []
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.25 <= s <= 4:
            raise ValueError(f"a pixel scale must be a number in [0.25, 4], got {s!r}")
        out.append(float(s))
    if len(set(out)) != len(out):
        raise ValueError(f"a pixel scale is listed twice: {list(scales)}")
    if 1.0 not in out:
        out.append(1.0)
    return tuple(sorted(out))


def _slice_axis(affine: np.ndarray) -> int:
    """The stored axis closest to the patient's superior-inferior direction."""
    directions = np.abs(affine[:3, :3]) / np.linalg.norm(affine[:3, :3], axis=0)
    return int(np.argmax(directions[2]))


def resample_in_plane(image: np.ndarray, affine: np.ndarray, factor: float, label: bool = False):
    """``image`` (3-D, stored axes) at ``factor`` times its in-plane pixel size over the same field of view.

    Returns:
        (array of the same dtype, its affine).
    """
    import torch
    from monai.transforms import Resize

    if image.ndim != 3:
        raise ValueError(f"expected a 3-D volume, got shape {image.shape}")
    axis = _slice_axis(affine)
    size = [max(1, int(round(n / factor))) if i != axis else n for i, n in enumerate(image.shape)]
    data = torch.as_tensor(np.asarray(image, dtype=np.float32))[None]
    if label:
        out = Resize(size, mode="nearest")(data)
    else:
        grows = any(size[i] < image.shape[i] for i in range(3))
        out = Resize(size, mode="trilinear", anti_aliasing=grows)(data)
    out = np.asarray(out[0])
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    out = out.astype(image.dtype)
    new_affine = np.array(affine, dtype=float)
    centre = np.zeros(4)
    centre[3] = 1.0
    for i in range(3):
        if i == axis:
            continue
        step = image.shape[i] / size[i]  # new voxels per old voxel, along axis i
        new_affine[:3, i] = affine[:3, i] * step
        centre[i] = (step - 1) / 2  # the first new voxel's centre, in old voxel coordinates
    new_affine[:3, 3] = (np.asarray(affine, dtype=float) @ centre)[:3]
    return out, new_affine


def resample_site(site_dir, out_dir, factor: float) -> Path:
    """Every case of a site folder's ``testing`` list resampled (:func:`resample_in_plane`) into ``out_dir``, with
    a ``datalist.json`` listing them. A case that cannot be read is named and left out; the others go on."""
    import nibabel as nib

    from fedharmony.data.datalist import write_datalist

    site_dir, out_dir = Path(site_dir), Path(out_dir)
    content = json.loads((site_dir / "datalist.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    items, skipped = [], []
    for item in content.get("testing", []):
        entry = dict(item)
        try:
            for key, is_label in (("image", False), ("label", True)):
                if not isinstance(item.get(key), str):
                    continue
                src = nib.load(str(site_dir / item[key]))
                array, affine = resample_in_plane(np.asanyarray(src.dataobj), src.affine, factor, label=is_label)
                name = Path(item[key]).name
                nib.save(nib.Nifti1Image(array, affine), str(out_dir / name))
                entry[key] = name
        except Exception as e:  # one unreadable case never stops the others
            skipped.append(f"{item.get('image')}: {type(e).__name__}: {e}")
            continue
        items.append(entry)
    if not items:
        raise ValueError(f"{site_dir}: no test case could be resampled ({'; '.join(skipped) or 'none listed'})")
    extra = {k: v for k, v in content.items() if k not in ("training", "validation", "testing")}
    write_datalist(out_dir, {**extra, "testing": items}, out_dir.name)
    if skipped:
        (out_dir / "skipped.txt").write_text("\n".join(skipped) + "\n")
    return out_dir


def resampled_test_root(test_root, sites: Mapping[str, str], factor: float, out_dir) -> Path:
    """The test draw ``test_root`` (site folders named by ``sites``' values) at ``factor`` times its pixel size,
    under ``out_dir``; written once and reused (``resampled.json`` records the source and the factor). Factor 1 is
    the test draw itself."""
    if factor == 1.0:
        return Path(test_root)
    out = Path(out_dir)
    marker = out / READY
    record = {"source": str(Path(test_root).resolve()), "factor": float(factor), "sites": dict(sites)}
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == record:
                return out
        except json.JSONDecodeError:
            pass
    for folder in sites.values():
        resample_site(Path(test_root) / folder, out / folder, factor)
    (out / "sites.json").write_text(json.dumps(dict(sites), indent=2) + "\n")
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, marker)
    return out


def score_pixel_scales(score: Callable[[Path, str], float], roots: Mapping[str, Path], folders: Sequence[str]
                       ) -> Dict[str, Dict[str, float]]:
    """``{factor: {site: score(root, site)}}`` for each resampled test root (``roots``: factor as text -> root)."""
    return {factor: {folder: float(score(Path(root), folder)) for folder in folders}
            for factor, root in roots.items()}


# ---------------------------------------------------------------------------------------------- the report
def robustness_summary(results: dict) -> Dict[str, Dict[str, dict]]:
    """Per arm with pixel-scale scores: ``{factor: {"mean": (mean, lo, hi), "worst": (...), "seeds": n}}``, each the
    mean over seeds (95% t CI) of the run's mean (and worst) over sites, factors in increasing order."""
    from fedharmony.study.stats import t_interval

    by_arm: Dict[str, Dict[float, list]] = {}
    for run in results.get("runs", []):
        scales = run.get("pixel_scale_scores")
        if not scales:
            continue
        for factor, sites in scales.items():
            values = [float(v) for v in sites.values()]
            if values:
                by_arm.setdefault(run["method"], {}).setdefault(float(factor), []).append(
                    (float(np.mean(values)), float(np.min(values))))
    out: Dict[str, Dict[str, dict]] = {}
    for arm, factors in by_arm.items():
        out[arm] = {}
        for factor in sorted(factors):
            pairs = factors[factor]
            out[arm][f"{factor:g}"] = {"mean": t_interval([p[0] for p in pairs]),
                                       "worst": t_interval([p[1] for p in pairs]), "seeds": len(pairs)}
    return out


def _cell(interval) -> str:
    mean, lo, hi = interval
    return f"{mean:.3f}" if math.isnan(lo) else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def robustness_lines(summary: Dict[str, Dict[str, dict]], metric: str) -> list:
    """The report's section: one row per arm, one column per factor (mean over sites, 95% t CI over seeds)."""
    if not summary:
        return []
    factors = sorted({float(f) for arm in summary.values() for f in arm})
    lines = ["", "## Pixel size: the same test scans at other in-plane pixel sizes", "",
             f"Test {metric} of the model each site uses, on its test scans resampled in-plane to each factor times "
             "their pixel size over the same field of view (the matrix divided by the factor; anti-aliased "
             "trilinear images, nearest-neighbour labels; fedharmony.study.robustness). Mean over sites per run, "
             "then the mean over seeds with its 95% t CI; 1 is the scans as stored.", "",
             "| arm | " + " | ".join(f"x{f:g}" for f in factors) + " |",
             "|---|" + "---|" * len(factors)]
    for arm, by_factor in summary.items():
        cells = [_cell(by_factor[f"{f:g}"]["mean"]) if f"{f:g}" in by_factor else "-" for f in factors]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Worst site, the same way:", "", "| arm | " + " | ".join(f"x{f:g}" for f in factors) + " |",
              "|---|" + "---|" * len(factors)]
    for arm, by_factor in summary.items():
        cells = [_cell(by_factor[f"{f:g}"]["worst"]) if f"{f:g}" in by_factor else "-" for f in factors]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def robustness_plot(summary: Dict[str, Dict[str, dict]], metric: str, path) -> Optional[Path]:
    """Score against pixel-size factor per arm (mean over sites, 95% t CI over seeds as a band)."""
    if not summary:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm, by_factor in summary.items():
        factors = sorted(by_factor, key=float)
        x = [float(f) for f in factors]
        mean = [by_factor[f]["mean"][0] for f in factors]
        lo = [by_factor[f]["mean"][1] for f in factors]
        hi = [by_factor[f]["mean"][2] for f in factors]
        ax.plot(x, mean, marker="o", label=arm)
        if not any(math.isnan(v) for v in lo):
            ax.fill_between(x, lo, hi, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xticks(sorted({float(f) for a in summary.values() for f in a}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel("in-plane pixel size, times the stored")
    ax.set_ylabel(f"test {metric}, mean over sites")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
