"""Prostate phantom v2: a pelvis in millimetres, scanned by the MR simulator (:mod:`fedharmony.phantom.mr`).

Phantom v1 (:mod:`fedharmony.phantom.prostate`) draws the anatomy in field-of-view units and gives sites global
intensity effects; it stays as it is, so every committed study reproduces. v2 draws each patient in mm and
scans it with a site's physics, so sites differ the way scanners do (contrast from the sequence and field,
partial volume from the slice thickness, resolution, coil, noise) and anatomy keeps its size whatever the
resolution.

**One patient** (:func:`draw_patient`; x left-right, y posterior to anterior, z inferior to superior, mm, the
gland centred at the origin): a body ellipse with a rim of subcutaneous fat, pelvic muscle, a central cavity of
periprostatic fat, the femoral heads and the pubic bones (cortical rim, fatty marrow), the bladder (urine in a
muscular wall) above and in front of the gland, the rectum behind it (muscular wall around an air lumen, which
gives no signal), and the gland: an ellipsoid whose radius varies smoothly with direction (lobulation). Its
semi-axes are drawn so that its volume spans about 17 to 50 mL (adult glands without enlargement: about 20 to 30
mL, more with benign hyperplasia); a site's ``population.gland_scale`` scales it (an older population). The gland
has two zones: the central gland (transition and central zone), an ellipsoid in its anterior, upper part whose
axes are 0.5 to 0.68 of the gland's (larger in an older population), and the peripheral zone around it, which
is brighter on T2-weighted images (longer T2: :data:`~fedharmony.phantom.mr.TISSUES`); the label is the whole
gland, as the multi-site dataset annotates it. Tissue edges are soft over one grid step, so partial volume is
exact in-plane.

**One site** (:class:`ProstateMRSite`, :func:`load_v2_profiles`): an :class:`~fedharmony.phantom.mr.MRSite`
(field strength, T2-weighted fast spin echo as a spin echo, field of view, matrix, slice thickness, coil, noise),
the anatomy's coverage along z, and the site's annotation convention: ``boundary_voxels`` (-1: drawn one voxel
inside the gland edge, +1: one voxel outside) and ``apex_base`` (``include`` or ``exclude`` the first and last
slices of the gland). The label is the gland's fraction after the slice profile and an area average to the
matrix, above one half, then the convention. The six profiles in ``prostate_mr_sites.json`` stand in for the
six sites of the multi-site prostate dataset; their field strength, coil and resolution follow the dataset
papers' tables (Liu et al., MS-Net, IEEE TMI 39:2713, 2020, Table I, after the NCI-ISBI 2013, I2CVB and
PROMISE12 releases); the sequence timings, noise and annotation conventions are illustrative, not measured.

A case is reproducible from (profile, seed, case index). :func:`write_sites_v2` writes the same layout as v1
(``CaseNN.nii.gz``, ``CaseNN_segmentation.nii.gz``, ``datalist.json``, ``sites.json``), images as int16 as
scanners store them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from fedharmony.phantom.mr import (MRSite, ProfileError, acquire, area_average, load_site_profiles,
                                   slice_profile)

__all__ = ["ProstateMRSite", "draw_patient", "tissue_maps", "annotate", "make_case_v2", "load_v2_profiles",
           "write_sites_v2", "V2_PROFILES", "SIM_SPACING_MM"]

V2_PROFILES = Path(__file__).with_name("prostate_mr_sites.json")
SIM_SPACING_MM = (0.5, 0.5, 0.5)  # the anatomy's grid (z, y, x); finer acquisitions are interpolated


@dataclass(frozen=True)
class ProstateMRSite:
    """A v2 site: its scanner, the anatomy it covers and how it annotates."""

    scanner: MRSite
    coverage_mm: float = 60.0  # along z, centred on the gland (20 to 200 mm)
    gland_scale: float = 1.0  # the population's gland size, by volume (0.5 to 3)
    boundary_voxels: int = 0  # -1, 0 or +1
    apex_base: str = "include"  # or "exclude"
    cases: int = 10

    @property
    def name(self) -> str:
        return self.scanner.name

    def coarser(self, factor: float) -> "ProstateMRSite":
        """The same site with voxels ``factor`` times larger (:meth:`MRSite.coarser`)."""
        return self if factor == 1 else dataclasses.replace(self, scanner=self.scanner.coarser(factor))

    @classmethod
    def from_dict(cls, raw: dict) -> "ProstateMRSite":
        """A site from its JSON object: the scanner's fields (:meth:`MRSite.from_dict`) plus ``coverage_mm``,
        ``population`` (``{"gland_scale": ...}``), ``annotation`` (``{"boundary_voxels", "apex_base"}``) and
        ``cases``; values out of range are refused naming the field."""
        raw = dict(raw)
        own = {k: raw.pop(k) for k in ("coverage_mm", "population", "annotation", "cases") if k in raw}
        scanner = MRSite.from_dict(raw)
        where = f"site {scanner.name}: "
        population, annotation = own.get("population", {}), own.get("annotation", {})
        if set(population) - {"gland_scale"} or set(annotation) - {"boundary_voxels", "apex_base"}:
            raise ProfileError(f"{where}population takes gland_scale; annotation takes boundary_voxels, apex_base")
        coverage = own.get("coverage_mm", 60.0)
        scale = population.get("gland_scale", 1.0)
        boundary = annotation.get("boundary_voxels", 0)
        apex = annotation.get("apex_base", "include")
        cases = own.get("cases", 10)
        if not isinstance(coverage, (int, float)) or not 20 <= coverage <= 200:
            raise ProfileError(f"{where}coverage_mm must be a number in [20, 200] mm, got {coverage!r}")
        if not isinstance(scale, (int, float)) or not 0.5 <= scale <= 3:
            raise ProfileError(f"{where}population.gland_scale must be a number in [0.5, 3], got {scale!r}")
        if boundary not in (-1, 0, 1):
            raise ProfileError(f"{where}annotation.boundary_voxels must be -1, 0 or 1, got {boundary!r}")
        if apex not in ("include", "exclude"):
            raise ProfileError(f"{where}annotation.apex_base must be include or exclude, got {apex!r}")
        if not isinstance(cases, int) or cases < 3:
            raise ProfileError(f"{where}cases must be an integer >= 3, got {cases!r}")
        return cls(scanner, float(coverage), float(scale), boundary, apex, cases)


def load_v2_profiles(path=None) -> Dict[str, ProstateMRSite]:
    """The v2 site profiles of a JSON file (``{"sites": [...]}``; default: the six of ``prostate_mr_sites.json``)."""
    return load_site_profiles(path or V2_PROFILES, ProstateMRSite.from_dict)


def draw_patient(rng: np.random.Generator, gland_scale: float = 1.0) -> dict:
    """One patient's anatomy parameters (mm). The gland's semi-axes (x, y, z) are drawn from 20-27, 14-20 and
    15-22 mm, times ``gland_scale`` to the power 1/3 (a volume factor)."""
    k = gland_scale ** (1 / 3)
    gland = (rng.uniform(20, 27) * k, rng.uniform(14, 20) * k, rng.uniform(15, 22) * k)
    body = (rng.uniform(150, 185), rng.uniform(100, 130))
    return {
        "gland": gland,
        "lobes": rng.normal(0, 0.06, size=(3, 2)),  # cosine amplitudes of the gland's radius modulation
        "lobe_phase": rng.uniform(0, 2 * math.pi, size=(3, 2)),
        "body": body,
        "fat_mm": rng.uniform(12, 40),
        "cavity": (rng.uniform(48, 62), rng.uniform(42, 55)),
        "bladder": (rng.uniform(28, 45), rng.uniform(22, 34), rng.uniform(22, 34)),
        "rectum_mm": rng.uniform(11, 16),
        "texture": rng.normal(size=(6,)),
        # the central gland (transition + central zone): its semi-axes as a share of the gland's, larger in an
        # older population (benign hyperplasia grows the transition zone)
        "central_share": float(np.clip(rng.uniform(0.5, 0.68) * gland_scale ** (1 / 6), 0.4, 0.85)),
    }


def _soft_inside(distance_mm: np.ndarray, step_mm: float) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, linear over one grid step across the edge."""
    return np.clip(0.5 - distance_mm / step_mm, 0.0, 1.0).astype(np.float32)


def _ellipsoid_distance(coords, centre, axes) -> np.ndarray:
    """Approximate signed distance (mm) to an axis-aligned ellipsoid (or ellipse, when given 2 axes)."""
    rho = np.sqrt(sum(((c - c0) / a) ** 2 for c, c0, a in zip(coords, centre, axes)))
    return (rho - 1) * min(axes)


def tissue_maps(patient: dict, shape: Tuple[int, int, int], spacing_mm: Sequence[float]):
    """Tissue fractions ``{tissue: (z, y, x)}`` and the gland's fraction on a grid of ``shape`` and
    ``spacing_mm`` centred on the gland. Painted from the innermost structure outwards: each takes what the
    ones before it left, so fractions never sum above 1; the air of the rectal lumen and outside the body take
    their share with no tissue."""
    step = min(spacing_mm)
    z, y, x = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * d for n, d in zip(shape, spacing_mm)]
    zz, yy, xx = z[:, None, None], y[None, :, None], x[None, None, :]
    free = np.ones(shape, dtype=np.float32)
    maps: Dict[str, np.ndarray] = {}

    def paint(tissue: Optional[str], inside: np.ndarray):
        share = np.broadcast_to(inside, shape) * free
        free[...] -= share
        if tissue is not None:
            maps[tissue] = maps.get(tissue, 0) + share

    ga = patient["gland"]
    rectum_y = -(ga[1] + patient["rectum_mm"] + 2)
    r_rect = np.sqrt((yy - rectum_y) ** 2 + xx ** 2)
    paint(None, _soft_inside(r_rect - (patient["rectum_mm"] - 3), step))  # air
    paint("muscle", _soft_inside(r_rect - patient["rectum_mm"], step))  # rectal wall
    # the gland: its radius varies with direction (lobulation)
    theta = np.arctan2(yy, xx)
    phi = np.arctan2(zz, np.sqrt(xx ** 2 + yy ** 2))
    mod = 1 + sum(patient["lobes"][i, 0] * np.cos((i + 1) * theta + patient["lobe_phase"][i, 0])
                  + patient["lobes"][i, 1] * np.cos((i + 1) * phi + patient["lobe_phase"][i, 1]) for i in range(3))
    rho = np.sqrt((xx / ga[0]) ** 2 + (yy / ga[1]) ** 2 + (zz / ga[2]) ** 2)
    gland = _soft_inside((rho - mod) * min(ga), step)
    # zones: the central gland, an ellipsoid in the gland's anterior and upper part, painted first; the
    # peripheral zone takes the rest of the gland (posterior, lateral and at the apex)
    share = patient["central_share"]
    central = _soft_inside(_ellipsoid_distance((zz, yy, xx), (0.15 * ga[2], 0.2 * ga[1], 0.0),
                                               (share * ga[2], share * ga[1], share * ga[0])), step)
    paint("prostate_tz", gland * central)
    paint("prostate_pz", gland)
    gland_fraction = maps["prostate_tz"] + maps["prostate_pz"]
    bl = patient["bladder"]
    bladder_centre = (ga[2] + bl[2] - 2, 8.0, 0.0)  # (z, y, x): above the gland, a little anterior
    paint("fluid", _soft_inside(_ellipsoid_distance((zz, yy, xx), bladder_centre, (bl[2], bl[1], bl[0])), step))
    paint("muscle", _soft_inside(_ellipsoid_distance((zz, yy, xx), bladder_centre,
                                                     (bl[2] + 3, bl[1] + 3, bl[0] + 3)), step))  # bladder wall
    cx, cy = patient["cavity"]
    for side in (-1, 1):  # femoral heads: cortical rim, fatty marrow
        d = np.sqrt((xx - side * (cx + 38)) ** 2 + (yy + 5) ** 2 + (zz - 10) ** 2)
        paint("fat", _soft_inside(d - 19, step))
        paint("bone", _soft_inside(d - 23, step))
        d = _ellipsoid_distance((yy, xx), (cy + 10, side * 14.0), (8.0, 11.0))  # pubic bones
        paint("fat", _soft_inside(d, step))
        paint("bone", _soft_inside(d - 3, step))
    paint("fat", _soft_inside(_ellipsoid_distance((yy, xx), (0.0, 0.0), (cy, cx)), step))  # periprostatic fat
    bx, by = patient["body"]
    inner = (by - patient["fat_mm"], bx - patient["fat_mm"])
    paint("muscle", _soft_inside(_ellipsoid_distance((yy, xx), (-10.0, 0.0), inner), step))
    paint("fat", _soft_inside(_ellipsoid_distance((yy, xx), (-10.0, 0.0), (by, bx)), step))
    # tissue texture: a smooth +-4 % variation of how much signal each voxel holds
    t = patient["texture"]
    texture = 1 + 0.04 * np.tanh(t[0] * np.sin(xx / 9 + t[1]) * np.cos(yy / 11 + t[2])
                                 + t[3] * np.sin(zz / 7 + t[4]) * np.cos(xx / 13 + t[5]))
    return {name: (m * texture).astype(np.float32) for name, m in maps.items()}, gland_fraction


def annotate(gland_slices: np.ndarray, boundary_voxels: int = 0, apex_base: str = "include") -> np.ndarray:
    """A site's gland mask from the gland's fraction per acquired voxel ``(slices, y, x)``: above one half, then
    eroded (-1) or dilated (+1) by one voxel in-plane, and without its first and last slices for
    ``apex_base="exclude"``."""
    from scipy.ndimage import binary_dilation, binary_erosion

    mask = gland_slices > 0.5
    structure = np.zeros((1, 3, 3), dtype=bool)
    structure[0] = [[0, 1, 0], [1, 1, 1], [0, 1, 0]]
    if boundary_voxels > 0:
        mask = binary_dilation(mask, structure)
    elif boundary_voxels < 0:
        mask = binary_erosion(mask, structure)
    if apex_base == "exclude":
        present = np.where(mask.any(axis=(1, 2)))[0]
        if len(present) > 2:
            mask[present[0]] = mask[present[-1]] = False
    return mask.astype(np.uint8)


def make_case_v2(profile: ProstateMRSite, seed: int, case_index: int):
    """One case: (image (x, y, z) int16, mask (x, y, z) uint8, RAS affine (4, 4)); reproducible from
    (profile, seed, case index)."""
    from fedharmony.phantom._common import site_key

    rng = np.random.default_rng([seed, site_key(profile.name), case_index])
    patient = draw_patient(rng, profile.gland_scale)
    acq = profile.scanner.acquisition
    spacing = SIM_SPACING_MM
    shape = (int(round(profile.coverage_mm / spacing[0])),
             *(int(round(f / d)) for f, d in zip(acq.fov_mm, spacing[1:])))
    fractions, gland = tissue_maps(patient, shape, spacing)
    image, (dz, dy, dx) = acquire(fractions, spacing, profile.scanner, seed=int(rng.integers(2 ** 31)))
    gland_slices = slice_profile(gland, spacing[0], acq.slice_mm, acq.gap_mm)
    gland_acq = np.stack([area_average(p, acq.matrix, spacing[1:], acq.fov_mm) for p in gland_slices])
    mask = annotate(gland_acq, profile.boundary_voxels, profile.apex_base)
    stored = np.clip(np.rint(image), 0, 32767).astype(np.int16)
    # arrays are (z, y, x), z inferior -> superior and y posterior -> anterior (x: the body is symmetric);
    # stored as (x, y, z) with a RAS affine whose origin is the volume's centre
    affine = np.diag([dx, dy, dz, 1.0])
    affine[:3, 3] = -0.5 * np.array([acq.matrix[1] * dx, acq.matrix[0] * dy, len(image) * dz])
    return stored.transpose(2, 1, 0), mask.transpose(2, 1, 0), affine


def write_sites_v2(out_dir, profiles: Sequence[ProstateMRSite], seed: int = 0, cases: Optional[int] = None,
                   workers: int = 1, voxel_scale: float = 1.0) -> Path:
    """Write each site's cases, ``datalist.json`` and ``sites.json`` (the v1 layout) under ``out_dir``.
    ``voxel_scale`` > 1 scans with voxels that much larger (:meth:`ProstateMRSite.coarser`)."""
    from fedharmony.phantom.sites import write_simulated_sites

    profiles = [p.coarser(voxel_scale) for p in profiles]
    return write_simulated_sites(out_dir, profiles, make_case_v2, seed=seed, cases=cases, workers=workers)
