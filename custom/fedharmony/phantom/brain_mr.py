"""Brain phantom on real anatomy: the MNI ICBM152 template, deformed per case and scanned by the MR simulator.

The anatomy is the ICBM 2009a nonlinear symmetric template at 1 mm (Fonov et al., NeuroImage 54:313-327, 2011;
the copy nilearn ships, ``nilearn/datasets/data/mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz``):
its grey- and white-matter probability maps give those tissues' fractions per voxel, and the brain mask is the
one nilearn defines (the skull-stripped T1 template above 0.2 of its range, :func:`load_mni152_brain_mask`),
which holds cerebrum, cerebellum and brainstem. Inside the mask, what grey and white matter leave is CSF
(ventricles, sulci). The template has no head around the brain, so one is added in shells by the distance from
the mask (mm): CSF 0-3, skull 3-5.5 (cortical bone), diploe 5.5-7.5 (fatty marrow), skull 7.5-9.5, scalp fat
9.5-13, skin and muscle 13-15. These shells follow the brain's outline, also under the cerebellum, where a real
head has the skull base and neck: the skull-stripping task they make is simpler there than on real scans.

**One case** (:func:`case_anatomy`): every tissue map and the brain mask are resampled together through one
random affine (rotation up to 8 degrees about each axis, scale 0.92 to 1.08 per axis, a shift up to 6 mm) and
a smooth elastic deformation (MONAI's ``Rand3DElastic``: displacement up to about 4 mm, smooth over about
10 mm), so brains differ in size, shape and position; fractions stay fractions (linear interpolation).

**One site** (:class:`BrainMRSite`, ``brain_mr_sites.json``): an :class:`~fedharmony.phantom.mr.MRSite`
scanning axial slices, plus its annotation convention (``boundary_voxels``, as in the prostate phantom v2) and
its number of cases. The three profiles stand in for the three IXI hospitals of Fed-IXI: Guy's Hospital
(Philips 1.5 T), Hammersmith Hospital (Philips 3 T) and the Institute of Psychiatry (GE 1.5 T). The IXI project
lists TR 9.8 ms, TE 4.6 ms and an 8 degree flip for its Philips T1 scans, turbo field echoes whose T1 contrast
comes from an inversion prepulse; the simulator's single-readout equations cannot model that readout train, so
the Philips sites are inversion recoveries with TE 4.6 ms and an illustrative shot interval and inversion time,
and the GE site (parameters not published) a spoiled gradient echo, the other common 3D T1 at 1.5 T. The
resulting grey/white contrast differs between sites (about 1.4, 2.2 and 1.1 times), as it does between field
strengths and vendors. Resolution, noise and receiver scale are illustrative.

The label is the brain mask's fraction after the slice profile and an area average to the matrix, above one
half (then the site's convention): Fed-IXI's masks come from one automatic tool (ROBEX) at every site, so the
default convention is the same everywhere. A case is reproducible from (profile, seed, case index); images are
stored as int16, as scanners store them, with a RAS affine.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from fedharmony.phantom.mr import (MRSite, ProfileError, acquire, area_average, load_site_profiles,
                                   slice_profile)

__all__ = ["BrainMRSite", "template_anatomy", "case_anatomy", "make_brain_case", "load_brain_profiles",
           "write_brain_sites", "BRAIN_PROFILES", "MNI_FILES", "HEAD_SHELLS_MM"]

BRAIN_PROFILES = Path(__file__).with_name("brain_mr_sites.json")
MNI_FILES = {key: f"mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz" for key in ("t1", "gm", "wm")}
# (tissue, outer distance from the brain mask in mm), from the inside out
HEAD_SHELLS_MM = (("fluid", 3.0), ("bone", 5.5), ("fat", 7.5), ("bone", 9.5), ("fat", 13.0), ("muscle", 15.0))
MASK_THRESHOLD = 0.2  # of the template's range, as nilearn's load_mni152_brain_mask
TISSUE_ORDER = ("grey_matter", "white_matter", "fluid", "bone", "fat", "muscle")


@dataclass(frozen=True)
class BrainMRSite:
    """A brain site: its scanner (axial slices), how it annotates and how many cases it has."""

    scanner: MRSite
    boundary_voxels: int = 0  # -1, 0 or +1
    cases: int = 10

    @property
    def name(self) -> str:
        return self.scanner.name

    @classmethod
    def from_dict(cls, raw: dict) -> "BrainMRSite":
        """A site from its JSON object: the scanner's fields (:meth:`MRSite.from_dict`) plus ``annotation``
        (``{"boundary_voxels"}``) and ``cases``; values out of range are refused naming the field."""
        raw = dict(raw)
        annotation = raw.pop("annotation", {})
        cases = raw.pop("cases", 10)
        scanner = MRSite.from_dict(raw)
        where = f"site {scanner.name}: "
        if not isinstance(annotation, dict) or set(annotation) - {"boundary_voxels"}:
            raise ProfileError(f"{where}annotation takes boundary_voxels only, got {annotation!r}")
        boundary = annotation.get("boundary_voxels", 0)
        if boundary not in (-1, 0, 1):
            raise ProfileError(f"{where}annotation.boundary_voxels must be -1, 0 or 1, got {boundary!r}")
        if not isinstance(cases, int) or isinstance(cases, bool) or cases < 3:
            raise ProfileError(f"{where}cases must be an integer >= 3, got {cases!r}")
        return cls(scanner, boundary, cases)

    def coarser(self, factor: float) -> "BrainMRSite":
        """The same site with voxels ``factor`` times larger (:meth:`MRSite.coarser`)."""
        return self if factor == 1 else dataclasses.replace(self, scanner=self.scanner.coarser(factor))


def load_brain_profiles(path=None) -> Dict[str, BrainMRSite]:
    """The brain site profiles of a JSON file (``{"sites": [...]}``; default: the three of
    ``brain_mr_sites.json``)."""
    return load_site_profiles(path or BRAIN_PROFILES, BrainMRSite.from_dict)


def _mni_folder() -> Path:
    try:
        import nilearn
    except ImportError:
        raise ImportError("the brain phantom needs nilearn (pip install nilearn): it ships the MNI152 template") from None
    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    missing = [name for name in MNI_FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn at {folder} lacks {missing}; reinstall nilearn")
    return folder


@functools.lru_cache(maxsize=2)
def template_anatomy(grid_mm: float = 1.5) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """The template head on an isotropic grid of ``grid_mm``: tissue fractions ``{tissue: (z, y, x)}`` (z
    inferior to superior, y posterior to anterior, x left to right) and the brain mask's fraction. Built at
    the template's 1 mm, then area-averaged to the grid (cached per process)."""
    import nibabel as nib
    import torch
    import torch.nn.functional as F
    from scipy.ndimage import distance_transform_edt

    if not 1.0 <= grid_mm <= 8.0:
        raise ValueError(f"grid_mm must be in [1, 8] mm, got {grid_mm}")
    folder = _mni_folder()

    def load(key):  # (x, y, z) in RAS at 1 mm, 0-255 -> (z, y, x) in 0-1
        return np.asarray(nib.load(str(folder / MNI_FILES[key])).dataobj, dtype=np.float32).transpose(2, 1, 0) / 255

    brain = load("t1") > MASK_THRESHOLD
    grey, white = load("gm") * brain, load("wm") * brain
    total = np.maximum(grey + white, 1.0)  # the two maps may sum a little above 1 at their edges
    grey, white = grey / total, white / total
    maps = {"grey_matter": grey, "white_matter": white, "fluid": (1 - grey - white) * brain}
    distance = distance_transform_edt(~brain)  # mm from the brain, 0 inside
    inner = 0.0
    for tissue, outer in HEAD_SHELLS_MM:
        shell = ((distance > inner) & (distance <= outer)).astype(np.float32)
        maps[tissue] = maps.get(tissue, 0) + shell
        inner = outer
    shape = tuple(int(round(n / grid_mm)) for n in brain.shape)

    def resample(a):
        return F.adaptive_avg_pool3d(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None],
                                     shape)[0, 0].numpy()

    return {t: resample(maps[t]) for t in TISSUE_ORDER}, resample(brain)


def case_anatomy(seed_sequence, grid_mm: float = 1.5) -> Tuple[Dict[str, np.ndarray], np.ndarray]:
    """One case's head: the template's tissue maps and brain mask through one random affine and elastic
    deformation (MONAI ``Rand3DElastic``), drawn from ``seed_sequence`` (anything ``np.random.default_rng``
    takes)."""
    import torch
    from monai.transforms import Rand3DElastic

    maps, brain = template_anatomy(grid_mm)
    stacked = torch.from_numpy(np.stack([maps[t] for t in TISSUE_ORDER] + [brain]))
    rng = np.random.default_rng(seed_sequence)
    deform = Rand3DElastic(sigma_range=(10 / grid_mm, 10 / grid_mm), magnitude_range=(2 / grid_mm, 4 / grid_mm),
                           prob=1.0, rotate_range=(np.deg2rad(8),) * 3, scale_range=(0.08,) * 3,
                           translate_range=(6 / grid_mm,) * 3, mode="bilinear", padding_mode="zeros")
    deform.set_random_state(seed=int(rng.integers(2 ** 31)))
    out = np.asarray(deform(stacked), dtype=np.float32).clip(0, 1)
    return {t: out[i] for i, t in enumerate(TISSUE_ORDER)}, out[-1]


def make_brain_case(profile: BrainMRSite, seed: int, case_index: int, grid_mm: float = 1.5, tissue: bool = False):
    """One case: (image (x, y, z) int16, brain mask (x, y, z) uint8, RAS affine (4, 4)); reproducible from
    (profile, seed, case index). With ``tissue``, a fourth item ``{"tissue": (x, y, z) uint8}``: inside the brain
    mask, 1 where grey matter fills most of the acquired voxel, 2 where white matter does, 0 elsewhere (CSF and
    outside the mask); the fractions go through the same slice profile and area average as the mask, and no random
    number is drawn for it, so the image and mask are the same with or without it."""
    from fedharmony.phantom._common import site_key
    from fedharmony.phantom.prostate_mr import annotate

    rng = np.random.default_rng([seed, site_key(profile.name), case_index])
    fractions, brain = case_anatomy([seed, site_key(profile.name), case_index, 1], grid_mm)
    acq = profile.scanner.acquisition
    spacing = (grid_mm,) * 3
    image, (dz, dy, dx) = acquire(fractions, spacing, profile.scanner, seed=int(rng.integers(2 ** 31)))
    brain_slices = slice_profile(brain, grid_mm, acq.slice_mm, acq.gap_mm)
    brain_acq = np.stack([area_average(p, acq.matrix, spacing[1:], acq.fov_mm) for p in brain_slices])
    mask = annotate(brain_acq, profile.boundary_voxels)
    stored = np.clip(np.rint(image), 0, 32767).astype(np.int16)
    affine = np.diag([dx, dy, dz, 1.0])
    affine[:3, 3] = -0.5 * np.array([acq.matrix[1] * dx, acq.matrix[0] * dy, len(image) * dz])
    if not tissue:
        return stored.transpose(2, 1, 0), mask.transpose(2, 1, 0), affine
    grey, white = (np.stack([area_average(p, acq.matrix, spacing[1:], acq.fov_mm)
                             for p in slice_profile(fractions[t], grid_mm, acq.slice_mm, acq.gap_mm)])
                   for t in ("grey_matter", "white_matter"))
    labels = np.where((white >= grey) & (white >= 1 - grey - white), 2,
                      np.where((grey > white) & (grey >= 1 - grey - white), 1, 0)).astype(np.uint8)
    labels[mask == 0] = 0
    return stored.transpose(2, 1, 0), mask.transpose(2, 1, 0), affine, {"tissue": labels.transpose(2, 1, 0)}


def write_brain_sites(out_dir, profiles: Sequence[BrainMRSite], seed: int = 0, cases: Optional[int] = None,
                      workers: int = 1, voxel_scale: float = 1.0, grid_mm: float = 1.5) -> Path:
    """Write each site's cases (``CaseNN.nii.gz``, ``CaseNN_segmentation.nii.gz``: the brain mask;
    ``CaseNN_tissue_segmentation.nii.gz``: grey matter 1, white matter 2), ``datalist.json`` (brain masks), ``datalist_tissue.json``
    (the same cases and splits, tissue labels: the bundle's ``datalist_file``, with ``num_classes`` 3) and
    ``sites.json`` under ``out_dir``. ``voxel_scale`` > 1 scans with voxels that much larger
    (:meth:`BrainMRSite.coarser`); ``grid_mm``: the anatomy's grid (finer than the voxels)."""
    from fedharmony.phantom.sites import write_simulated_sites

    profiles = [p.coarser(voxel_scale) for p in profiles]
    template_anatomy(grid_mm)  # built once here, so that forked workers inherit it
    make_case = functools.partial(make_brain_case, grid_mm=grid_mm, tissue=True)
    return write_simulated_sites(out_dir, profiles, make_case, seed=seed, cases=cases, workers=workers,
                                 label_sets=("tissue",))
