"""Write phantom sites to disk in the multi-site prostate dataset's layout."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

from fedharmony.data.datalist import make_datalist, write_datalist
from fedharmony.phantom._common import run_jobs
from fedharmony.phantom.profiles import SiteProfile
from fedharmony.phantom.prostate import make_case

logger = logging.getLogger(__name__)
from fedharmony.core.files import write_site_map


def _write_case(job) -> None:
    import nibabel as nib

    profile, seed, index, size, slices, site_dir = job
    image, mask, affine = make_case(profile, seed, index, size=size, slices=slices)
    case = f"Case{index:02d}"
    nib.save(nib.Nifti1Image(image, affine), str(site_dir / f"{case}.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(site_dir / f"{case}_segmentation.nii.gz"))


def write_site(out_dir: Path, profile: SiteProfile, seed: int, cases: Optional[int], size: int,
               slices: Optional[int], workers: int = 1) -> Path:
    """Write one site folder (``CaseNN.nii.gz`` + ``CaseNN_segmentation.nii.gz`` + datalist).

    ``workers`` > 1 draws the cases in that many processes (each case is seeded on its own, so
    the files are the same).
    """
    site_dir = out_dir / profile.name
    site_dir.mkdir(parents=True, exist_ok=True)
    n_cases = cases or profile.cases
    run_jobs(_write_case, [(profile, seed, i, size, slices, site_dir) for i in range(n_cases)], workers)
    pairs = {f"Case{i:02d}": (f"Case{i:02d}.nii.gz", f"Case{i:02d}_segmentation.nii.gz") for i in range(n_cases)}
    write_datalist(site_dir, make_datalist(pairs, seed), profile.name)
    matrix = profile.matrix(size)
    logger.info("%s: %d cases, %d x %d x %d voxels, spacing %.2f x %.2f x %.1f mm", profile.name, n_cases, matrix,
                matrix, slices or profile.slices, profile.fov_mm / matrix, profile.fov_mm / matrix, profile.slice_mm)
    return site_dir


def write_sites(out_dir: str | Path, profiles: Sequence[SiteProfile], seed: int = 0, cases: Optional[int] = None,
                size: int = 96, slices: Optional[int] = None, workers: int = 1) -> Path:
    """Write every site and ``sites.json``, which maps simulator client names
    (``site-1`` ... ``site-N``, in order) to site folders so ``nvflare simulator -n N`` finds them."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for profile in profiles:
        write_site(out_dir, profile, seed, cases, size, slices, workers)
    write_site_map(out_dir, [p.name for p in profiles])
    return out_dir


def write_simulated_sites(out_dir, profiles: Sequence, make_case, seed: int = 0, cases: Optional[int] = None,
                          workers: int = 1, label_sets: Sequence[str] = ()) -> Path:
    """Write sites drawn by an MR-simulator phantom: for each profile (with ``name`` and ``cases``),
    ``make_case(profile, seed, index) -> (image, mask, affine)`` gives ``CaseNN.nii.gz`` and
    ``CaseNN_segmentation.nii.gz``; then the site's ``datalist.json`` and ``sites.json`` (the v1 layout).
    With ``label_sets``, ``make_case`` returns a fourth item ``{name: labels}`` for each, written as
    ``CaseNN_<name>_segmentation.nii.gz`` (a mask by its name: inference on the folder leaves it out) and listed
    in ``datalist_<name>.json`` with the same splits.
    ``make_case`` must pickle (a module-level function, or a ``functools.partial`` of one): cases are drawn in
    ``workers`` processes."""
    out_dir = Path(out_dir)
    for profile in profiles:
        site_dir = out_dir / profile.name
        site_dir.mkdir(parents=True, exist_ok=True)
        n = cases or profile.cases
        run_jobs(_write_simulated_case, [(make_case, profile, seed, i, site_dir, tuple(label_sets))
                                         for i in range(n)], workers)
        pairs = {f"Case{i:02d}": (f"Case{i:02d}.nii.gz", f"Case{i:02d}_segmentation.nii.gz") for i in range(n)}
        write_datalist(site_dir, make_datalist(pairs, seed), profile.name)
        for name in label_sets:
            other = {case: (image, f"{case}_{name}_segmentation.nii.gz") for case, (image, _) in pairs.items()}
            write_datalist(site_dir, make_datalist(other, seed), profile.name, f"datalist_{name}.json")
        logger.info("%s: %d cases", profile.name, n)
    write_site_map(out_dir, [p.name for p in profiles])
    return out_dir


def _write_simulated_case(job) -> None:
    import nibabel as nib

    make_case, profile, seed, i, site_dir, label_sets = job
    image, mask, affine, *extra = make_case(profile, seed, i)
    nib.save(nib.Nifti1Image(image, affine), str(site_dir / f"Case{i:02d}.nii.gz"))
    nib.save(nib.Nifti1Image(mask, affine), str(site_dir / f"Case{i:02d}_segmentation.nii.gz"))
    others = extra[0] if extra else {}
    if set(others) != set(label_sets):
        raise ValueError(f"{profile.name} Case{i:02d}: the case has label sets {sorted(others)}, the site "
                         f"{sorted(label_sets)}")
    for name, labels in others.items():
        nib.save(nib.Nifti1Image(labels, affine), str(site_dir / f"Case{i:02d}_{name}_segmentation.nii.gz"))
