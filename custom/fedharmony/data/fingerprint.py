"""A site's data fingerprint from image headers, and the preprocessing a federation derives from its sites'
fingerprints (no NVFlare import).

nnU-Net plans its preprocessing from a dataset fingerprint: the target spacing is the median spacing of the
training images, the patch covers the median image's extent. A federation cannot pool the images, but it can
pool numbers that say nothing about a patient: the voxel spacing, matrix and field of view of each training
scan, which the image headers hold. So each site computes :func:`site_fingerprint` over its training split
(headers only: SimpleITK reads a NIfTI, NRRD or MetaImage header without the voxels; a DICOM series folder is
read whole by MONAI, as the bundle reads it), sends the counts of each value, and the coordinator's
:func:`combine_fingerprints` chooses

* ``pixdim``: the median in-plane spacing over every site's training scans (each scan counts once, so a big
  site weighs as much as its scans), in mm, to three significant digits;
* ``image_size``: the median in-plane field of view over the same scans, divided by ``pixdim`` and rounded up
  to a multiple of 16 (the 2.5D UNet's stride): the crop holds the median scan's field of view;

and names each site whose own median spacing or field of view is more than 1.5 times away from the pooled one
(a scanner unlike the rest is worth knowing before training). The bundle's ``pixdim`` / ``image_size`` then
resample every scan to that spacing and crop or pad it to that size (``VolumeGeometryd``), at every site and at
inference. Everything here is numbers a site can read before it sends them (``tools/fingerprint.py site``).

Example::

    >>> fps = [site_fingerprint("data/prostate/BIDMC"), site_fingerprint("data/prostate/HK")]  # doctest: +SKIP
    >>> combine_fingerprints(fps)["settings"]                                                  # doctest: +SKIP
    {'pixdim': 0.6, 'image_size': 240}
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ["FINGERPRINT_FORMAT", "OUTLIER_RATIO", "scan_geometry", "site_fingerprint", "combine_fingerprints",
           "check_fingerprint"]

FINGERPRINT_FORMAT = "fedharmony-fingerprint/1"
OUTLIER_RATIO = 1.5  # a site whose median spacing or field of view is this many times off the pooled one is named
_FIELDS = ("inplane_spacing_mm", "slice_spacing_mm", "inplane_matrix", "inplane_fov_mm")


def scan_geometry(path) -> Dict[str, float]:
    """One scan's ``{"inplane_spacing_mm", "slice_spacing_mm", "inplane_matrix", "inplane_fov_mm"}`` from its
    header. The slice axis is the stored axis closest to the patient's superior-inferior direction; the in-plane
    values are the means over the other two axes."""
    path = Path(path)
    if path.is_dir():  # a DICOM series: read as the bundle reads it
        from monai.transforms import LoadImage

        image = LoadImage(image_only=True, ensure_channel_first=True)(str(path))
        spacing = [float(v) for v in image.pixdim[:3]]
        size = [int(v) for v in image.shape[1:4]]
        direction = np.asarray(image.affine)[:3, :3] / np.asarray(spacing)
    else:
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()  # the header only
        if reader.GetDimension() != 3:
            raise ValueError(f"{path.name}: a {reader.GetDimension()}-D image, not a volume")
        spacing = list(reader.GetSpacing())
        size = list(reader.GetSize())
        direction = np.asarray(reader.GetDirection(), dtype=float).reshape(3, 3)
    slice_axis = int(np.argmax(np.abs(direction[2])))
    inplane = [i for i in range(3) if i != slice_axis]
    return {"inplane_spacing_mm": float(np.mean([spacing[i] for i in inplane])),
            "slice_spacing_mm": float(spacing[slice_axis]),
            "inplane_matrix": float(np.mean([size[i] for i in inplane])),
            "inplane_fov_mm": float(np.mean([size[i] * spacing[i] for i in inplane]))}


def _rounded(field: str, value: float) -> str:
    digits = {"inplane_spacing_mm": 3, "slice_spacing_mm": 2, "inplane_matrix": 0, "inplane_fov_mm": 0}[field]
    return f"{round(value, digits):.{digits}f}"


def site_fingerprint(dataset_dir, split: str = "training") -> dict:
    """The fingerprint of a site's ``split`` (its ``datalist.json``): per field, how many scans have each value
    (spacings to 0.001 / 0.01 mm, matrix and field of view to whole pixels and mm). A scan whose header cannot
    be read is counted under ``unread`` and named in ``unread_names`` (its file name only); the others go on.

    Returns:
        ``{"format", "site", "split", "count", "unread", "unread_names", "inplane_spacing_mm": {value: count},
        "slice_spacing_mm": ..., "inplane_matrix": ..., "inplane_fov_mm": ...}``
    """
    from fedharmony.data.datalist import load_datalist

    dataset_dir = Path(dataset_dir)
    # check=False: the datalist's own check opens every volume; the fingerprint reads headers only
    items = load_datalist(dataset_dir / "datalist.json", split, base_dir=dataset_dir, site=dataset_dir.name,
                          check=False, require_labels=False)
    counts = {field: Counter() for field in _FIELDS}
    unread: List[str] = []
    for item in items:
        try:
            geometry = scan_geometry(item["image"])
        except Exception as e:  # one unreadable header never stops the others
            unread.append(f"{Path(str(item.get('image'))).name}: {type(e).__name__}")
            continue
        for field in _FIELDS:
            counts[field][_rounded(field, geometry[field])] += 1
    read = len(items) - len(unread)
    if read == 0:
        raise ValueError(f"{dataset_dir}: no {split} scan's header could be read ({'; '.join(unread) or 'none listed'})")
    return {"format": FINGERPRINT_FORMAT, "site": dataset_dir.name, "split": split, "count": read,
            "unread": len(unread), "unread_names": unread,
            **{field: dict(sorted(counts[field].items(), key=lambda kv: float(kv[0]))) for field in _FIELDS}}


def check_fingerprint(fingerprint, where: str = "fingerprint") -> dict:
    """``fingerprint`` if it is one (the format, a positive count, and value -> count maps of positive numbers);
    ValueError naming ``where`` and the field otherwise. What a coordinator runs on every file a site sent."""
    if not isinstance(fingerprint, Mapping) or fingerprint.get("format") != FINGERPRINT_FORMAT:
        raise ValueError(f"{where}: not a site fingerprint (needs \"format\": {FINGERPRINT_FORMAT!r})")
    count = fingerprint.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{where}: 'count' must be a positive integer, got {count!r}")
    for field in _FIELDS:
        values = fingerprint.get(field)
        if not isinstance(values, Mapping) or not values:
            raise ValueError(f"{where}: {field!r} must map values to counts")
        for value, n in values.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{where}: {field!r} has a value that is not a number: {value!r}") from None
            if not math.isfinite(number) or number <= 0 or isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"{where}: {field!r}: {value!r} -> {n!r} is not a positive value with a count")
        if sum(values.values()) != count:
            raise ValueError(f"{where}: {field!r} counts {sum(values.values())} scans, 'count' says {count}")
    return dict(fingerprint)


def _three_digits(x: float) -> float:
    return float(f"{x:.3g}")


def _median(counts: Mapping[str, int]) -> float:
    values = np.repeat([float(v) for v in counts], [int(n) for n in counts.values()])
    return float(np.median(values))


def combine_fingerprints(fingerprints: Sequence[Mapping], names: Sequence[str] = (),
                         max_image_size: Optional[int] = None) -> dict:
    """The federation's preprocessing from its sites' fingerprints (see the module docstring). With
    ``max_image_size`` (a multiple of 16), a crop that would be larger keeps the median field of view at that
    size with coarser pixels (a budget for small machines; the reasons say so).

    Returns:
        ``{"settings": {"pixdim", "image_size"}, "why": [lines], "pooled": {field: median}, "sites": {site:
        {field: median}}, "outliers": [lines], "scans": n}``
    """
    if not fingerprints:
        raise ValueError("no site fingerprint given")
    names = list(names) or [str(fp.get("site", f"site {i + 1}")) for i, fp in enumerate(fingerprints)]
    checked = [check_fingerprint(fp, name) for fp, name in zip(fingerprints, names)]
    pooled_counts = {field: Counter() for field in _FIELDS}
    for fp in checked:
        for field in _FIELDS:
            pooled_counts[field].update({k: int(v) for k, v in fp[field].items()})
    pooled = {field: _median(pooled_counts[field]) for field in _FIELDS}
    per_site = {name: {field: _median(fp[field]) for field in _FIELDS} for name, fp in zip(names, checked)}
    if max_image_size is not None and (max_image_size < 16 or max_image_size % 16):
        raise ValueError(f"max_image_size must be a positive multiple of 16, got {max_image_size}")
    scans = sum(fp["count"] for fp in checked)
    fov = pooled["inplane_fov_mm"]
    pixdim = _three_digits(pooled["inplane_spacing_mm"])
    image_size = int(16 * math.ceil(fov / pixdim / 16))
    why = [f"pixdim {pixdim:g} mm: the median in-plane spacing of the {scans} training scans of {len(checked)} "
           f"site(s)",
           f"image_size {image_size}: their median in-plane field of view, {fov:.0f} mm, at {pixdim:g} mm, rounded "
           f"up to a multiple of 16 ({image_size * pixdim:.0f} mm)"]
    if max_image_size is not None and image_size > max_image_size:
        coarse = _three_digits(fov / max_image_size)
        coarse = coarse if coarse * max_image_size >= fov else coarse + 10 ** (math.floor(math.log10(coarse)) - 2)
        why.append(f"capped at image_size {max_image_size}: pixdim {coarse:g} mm instead of {pixdim:g}, so the "
                   f"median field of view still fits ({max_image_size * coarse:.0f} mm)")
        pixdim, image_size = _three_digits(coarse), max_image_size
    outliers = []
    for name, medians in per_site.items():
        for field, label in (("inplane_spacing_mm", "in-plane spacing"), ("inplane_fov_mm", "field of view")):
            ratio = medians[field] / pooled[field]
            if ratio > OUTLIER_RATIO or ratio < 1 / OUTLIER_RATIO:
                outliers.append(f"{name}: median {label} {medians[field]:g} mm is {ratio:.2f} times the pooled "
                                f"{pooled[field]:g} mm")
    return {"settings": {"pixdim": pixdim, "image_size": image_size}, "why": why, "pooled": pooled,
            "sites": per_site, "outliers": outliers, "scans": scans}
