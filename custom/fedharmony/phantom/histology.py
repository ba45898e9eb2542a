"""Phantom H&E lymph-node patches in the Camelyon17-WILDS layout (tumour vs normal, 96 x 96 RGB).

Two independent stages, as for the prostate phantom:

1. :func:`make_tissue` draws a patch's tissue as stain concentrations (optical-density
   units): an eosin field (stroma / cytoplasm, smooth fibrous texture, with white gaps) and
   haematoxylin nuclei rendered as blobs. Each patch draws a latent "grade" ``t`` in [0, 1]
   (tumour: Beta(4.5, 2.5), normal: Beta(2.5, 4.5), so the classes overlap); nucleus density,
   size, size variability, shape irregularity, elongation and darkness all grow with ``t``,
   and tumour nuclei crowd in clusters. Lymphocyte-like small dark round nuclei are added in
   proportion to ``(1 - t)``. Stroma density and white space vary independently of the
   class, so mean colour alone does not separate the classes.
2. :func:`apply_stain` images the concentrations with a hospital's profile: stain vectors
   (the Ruifrok-Johnston H&E optical-density vectors rotated about the grey axis, i.e. a hue
   shift), stain amounts, Beer-Lambert back to RGB with the scanner's brightness and white
   balance, then blur, noise and a JPEG round trip.

All randomness comes from ``numpy.random.default_rng([seed, site, index, tumor])``, so a
patch is bit-identical when regenerated.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fedharmony.data.classification import CAMELYON_DIR, prepare_camelyon17
from fedharmony.phantom import _common
from fedharmony.phantom._common import check_fields, finish, rng_for, run_jobs, save_png, site_key, smooth_field

DEFAULT_PROFILE_FILE = Path(__file__).with_name("histology_sites.json")
DEFAULT_PATCHES_PER_HOSPITAL = 150
DEFAULT_SIZE = 96
PATIENT_STRIDE = 20  # real Camelyon17: patients 20*c .. 20*c+19 belong to center c

# Ruifrok & Johnston (2001) optical-density vectors (rows: haematoxylin, eosin, DAB), as in skimage's rgb_from_hed
RUIFROK_HED = np.array([[0.65, 0.70, 0.29],
                        [0.07, 0.99, 0.11],
                        [0.27, 0.57, 0.78]])
RUIFROK_HED = RUIFROK_HED / np.linalg.norm(RUIFROK_HED, axis=1, keepdims=True)


@dataclasses.dataclass(frozen=True)
class HistologyProfile:
    """One hospital's stain and scanner.

    Attributes:
        name: profile name (``--sites``); the site folder is ``hospital_<center>``.
        center: the WILDS ``center`` index written to metadata.csv.
        patients: patients of the phantom hospital (``--patients`` overrides).
        real_patches: patches of this center in the real camelyon17_v1.0 (docs only).
        tumor_fraction: mean fraction of tumour patches (each patient varies around it).
        h_hue_deg, e_hue_deg: rotation of the haematoxylin / eosin OD vector about the grey axis.
        h_scale, e_scale: stain amount multipliers (staining time / concentration).
        brightness: scanner light, the glass white level as a fraction of 255.
        white_balance: (r, g, b) gains of the scanner camera.
        blur: PIL GaussianBlur radius in pixels at 96 x 96 (scaled with the patch size).
        jpeg_quality: quality of the JPEG round trip (null = none).
        noise: Gaussian noise sigma as a fraction of 255.
        note: free text for the docs table.
    """

    name: str
    center: int
    patients: int = 10
    real_patches: int = 0
    tumor_fraction: float = 0.5
    h_hue_deg: float = 0.0
    e_hue_deg: float = 0.0
    h_scale: float = 1.0
    e_scale: float = 1.0
    brightness: float = 1.0
    white_balance: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    blur: float = 0.0
    jpeg_quality: Optional[int] = None
    noise: float = 0.0
    note: str = ""

    def __post_init__(self):
        check_fields("histology", self.name, {
            "center": (self.center, self.center >= 0, "must be >= 0"),
            "patients": (self.patients, self.patients >= 3, "a hospital needs at least 3 patients to split"),
            "real_patches": (self.real_patches, self.real_patches >= 0, "must be >= 0"),
            "tumor_fraction": (self.tumor_fraction, 0.05 <= self.tumor_fraction <= 0.95, "must be in [0.05, 0.95]"),
            "h_hue_deg": (self.h_hue_deg, abs(self.h_hue_deg) <= 60, "must be in [-60, 60]"),
            "e_hue_deg": (self.e_hue_deg, abs(self.e_hue_deg) <= 60, "must be in [-60, 60]"),
            "h_scale": (self.h_scale, 0 < self.h_scale <= 3, "must be in (0, 3]"),
            "e_scale": (self.e_scale, 0 < self.e_scale <= 3, "must be in (0, 3]"),
            "brightness": (self.brightness, 0.3 <= self.brightness <= 1.2, "must be in [0.3, 1.2]"),
            "white_balance": (self.white_balance, len(self.white_balance) == 3
                              and all(0.5 <= g <= 1.5 for g in self.white_balance),
                              "must be 3 gains in [0.5, 1.5]"),
            "blur": (self.blur, 0 <= self.blur <= 5, "must be in [0, 5] pixels"),
            "jpeg_quality": (self.jpeg_quality, self.jpeg_quality is None or 1 <= self.jpeg_quality <= 100,
                             "must be null or in [1, 100]"),
            "noise": (self.noise, 0 <= self.noise <= 0.3, "must be in [0, 0.3]"),
        })


def load_histology_profiles(path: Optional[str | Path] = None) -> Dict[str, HistologyProfile]:
    """Read a histology profile file (default: the five phantom Camelyon17 hospitals), keyed by name."""
    profiles = _common.load_profile_file(path, DEFAULT_PROFILE_FILE, HistologyProfile, "histology")
    centers: Dict[int, str] = {}
    for p in profiles.values():
        if p.center in centers:
            raise ValueError(f"histology profile {p.name!r}: field 'center' = {p.center} is already used by "
                             f"{centers[p.center]!r}; every hospital needs its own center")
        centers[p.center] = p.name
    return profiles


def histology_markdown(profiles: Sequence[HistologyProfile]) -> str:
    """The docs table of hospital profiles (``make_phantom_classification.py --task histology --list-profiles``)."""
    rows = ["| profile | site folder | patients | real patches | tumour fraction | H hue deg / amount | "
            "E hue deg / amount | brightness | white balance r,g,b | blur px | JPEG quality | noise | look |",
            "|" + "---|" * 13]
    for p in profiles:
        wb = ",".join(f"{g:g}" for g in p.white_balance)
        rows.append(f"| {p.name} | hospital_{p.center} | {p.patients} | {p.real_patches} | {p.tumor_fraction} | "
                    f"{p.h_hue_deg:+g} / {p.h_scale:g} | {p.e_hue_deg:+g} / {p.e_scale:g} | {p.brightness} | {wb} | "
                    f"{p.blur} | {p.jpeg_quality or 'none'} | {p.noise} | {p.note} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------- stains

def _rotate_about_grey(v: np.ndarray, deg: float) -> np.ndarray:
    """Rotate an OD vector about (1, 1, 1)/sqrt(3) (Rodrigues): a hue shift of that stain."""
    k = np.ones(3) / math.sqrt(3.0)
    a = math.radians(deg)
    r = v * math.cos(a) + np.cross(k, v) * math.sin(a) + k * np.dot(k, v) * (1 - math.cos(a))
    r = np.clip(r, 0.01, None)
    return r / np.linalg.norm(r)


def stain_matrix(profile: HistologyProfile) -> np.ndarray:
    """(2, 3) unit OD vectors of haematoxylin and eosin for this hospital."""
    return _stain_matrix(profile.h_hue_deg, profile.e_hue_deg).astype(np.float64)


@functools.lru_cache(maxsize=64)
def _stain_matrix(h_hue_deg: float, e_hue_deg: float) -> np.ndarray:
    return np.stack([_rotate_about_grey(RUIFROK_HED[0], h_hue_deg),
                     _rotate_about_grey(RUIFROK_HED[1], e_hue_deg)]).astype(np.float32)


def separate_stains(rgb: np.ndarray, stains: np.ndarray = RUIFROK_HED) -> np.ndarray:
    """Colour deconvolution: (..., 3) uint8 RGB -> (..., 3) H, E, DAB concentrations (OD units)."""
    od = -np.log10(np.clip(np.asarray(rgb, np.float64), 1, 255) / 255.0)
    return od @ np.linalg.inv(stains)


# ----------------------------------------------------------------------------------------- tissue

def _render_blobs(n: int, cx, cy, r, aspect, theta, amps, phases, h, vesicular) -> np.ndarray:
    """Max-composite of N soft-edged blobs (nuclei) on an (n, n) canvas.

    Blob k has centre (cx, cy) in pixels, radius r, elongation aspect at angle theta, a
    boundary ``r * (1 + sum_j amps[k, j] cos((j + 2) phi + phases[k, j]))``, darkness h and a
    paler centre (vesicular chromatin) of depth ``vesicular``. Vectorized over blobs, in a
    few groups of similar reach so small blobs get small windows.
    """
    reach = r * aspect * (1 + amps.sum(axis=1))
    halves = 3 * np.ceil((reach + 1) / 3).astype(int)
    pad = int(halves.max()) if len(halves) else 0
    canvas = np.zeros((n + 2 * pad + 1, n + 2 * pad + 1), np.float32)
    for half in np.unique(halves):
        k = halves == half
        off = np.arange(-half, half + 1)
        ix, iy = np.floor(cx[k]).astype(int), np.floor(cy[k]).astype(int)
        dx = off[None, None, :] + (ix + 0.5 - cx[k])[:, None, None]
        dy = off[None, :, None] + (iy + 0.5 - cy[k])[:, None, None]
        c, s = np.cos(theta[k])[:, None, None], np.sin(theta[k])[:, None, None]
        u = ((dx * c + dy * s) / aspect[k][:, None, None]).astype(np.float32)
        v = (dy * c - dx * s).astype(np.float32)
        rho = np.sqrt(u * u + v * v) + np.float32(1e-6)
        c1, s1 = u / rho, v / rho  # cos(phi), sin(phi); higher harmonics by recurrence
        ck, sk = c1 * c1 - s1 * s1, 2 * c1 * s1
        edge = np.ones_like(rho)
        for j in range(amps.shape[1]):
            a = amps[k, j].astype(np.float32)[:, None, None]
            pc = np.cos(phases[k, j]).astype(np.float32)[:, None, None]
            ps = np.sin(phases[k, j]).astype(np.float32)[:, None, None]
            edge += a * (ck * pc - sk * ps)
            ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        R = r[k].astype(np.float32)[:, None, None] * edge
        m = np.clip(R - rho + 0.5, 0, 1)
        val = h[k].astype(np.float32)[:, None, None] * m * (
            1 - vesicular[k].astype(np.float32)[:, None, None] * np.clip(1 - rho / R, 0, 1))
        rows = np.broadcast_to(iy[:, None, None] + off[None, :, None] + pad, val.shape)
        cols = np.broadcast_to(ix[:, None, None] + off[None, None, :] + pad, val.shape)
        np.maximum.at(canvas, (rows.ravel(), cols.ravel()), val.ravel())
    return canvas[pad:pad + n, pad:pad + n]


def make_tissue(rng: np.random.Generator, size: int, tumor: bool) -> Tuple[np.ndarray, np.ndarray]:
    """One patch of tissue: (haematoxylin, eosin) concentration maps (size, size), float32, OD units."""
    n, sc = size, size / 96.0
    t = rng.beta(4.5, 2.5) if tumor else rng.beta(2.5, 4.5)

    # eosin: stroma / cytoplasm with fibrous texture (anisotropic), and white gaps
    coarse = smooth_field(rng, n, 4)
    fib = smooth_field(rng, n, 14, 3) if rng.random() < 0.5 else smooth_field(rng, n, 3, 14)
    e_level = rng.uniform(0.15, 0.5)
    c_e = e_level * np.clip(1 + 0.28 * fib + 0.15 * coarse, 0.2, None)
    white = rng.uniform(0.0, 0.3) * (1 - 0.5 * t)
    gaps = np.zeros((n, n), np.float32)
    if white > 0.01:
        w = smooth_field(rng, n, 3)
        thr = np.quantile(w, 1 - white)
        gaps = 1 / (1 + np.exp(-(w - thr) * 8))
    c_e = c_e * (1 - gaps)
    c_h = 0.06 * np.clip(1 + 0.3 * coarse, 0.2, None) * (1 - gaps)

    # nuclei: count, size, shape and darkness all grow with the grade t; tumour nuclei crowd in clusters
    count = rng.poisson(sc * sc * (20 + 45 * t) * rng.uniform(0.7, 1.3))
    n_cluster = int(round(count * t * rng.uniform(0.5, 1.0)))
    centres = rng.uniform(0, n, (rng.integers(1, 4), 2))
    pick = centres[rng.integers(0, len(centres), n_cluster)]
    pos = np.concatenate([pick + rng.normal(0, 14 * sc, (n_cluster, 2)),
                          rng.uniform(0, n, (count - n_cluster, 2))]) % n
    r_mean = (2.3 + 2.8 * t) * sc
    r = np.clip(r_mean * np.exp(rng.normal(0, 0.08 + 0.2 * t, count)), 1.2 * sc, 6.5 * sc)
    aspect = 1 + rng.uniform(0, 0.1 + 0.4 * t, count)
    amps = rng.uniform(0, 1, (count, 4)) * (0.01 + 0.09 * t)
    h = (0.65 + 0.6 * t) * np.exp(rng.normal(0, 0.08 + 0.18 * t, count))
    ves = rng.uniform(0, 0.5 * t, count)
    # lymphocytes: small, round, very dark; mostly in normal node tissue
    n_lym = rng.poisson(sc * sc * 50 * (1 - t) ** 2 * rng.uniform(0.2, 1.5))
    pos = np.concatenate([pos, rng.uniform(0, n, (n_lym, 2))])
    r = np.concatenate([r, rng.uniform(1.4, 2.1, n_lym) * sc])
    aspect = np.concatenate([aspect, 1 + rng.uniform(0, 0.1, n_lym)])
    amps = np.concatenate([amps, np.zeros((n_lym, 4))])
    h = np.concatenate([h, rng.uniform(1.15, 1.6, n_lym)])
    ves = np.concatenate([ves, np.zeros(n_lym)])
    theta = rng.uniform(0, np.pi, len(r))
    phases = rng.uniform(0, 2 * np.pi, (len(r), 4))
    inside = gaps[pos[:, 1].astype(int), pos[:, 0].astype(int)] < 0.5  # no nuclei in the gaps
    nuclei = _render_blobs(n, pos[inside, 0], pos[inside, 1], r[inside], aspect[inside], theta[inside],
                           amps[inside], phases[inside], h[inside], ves[inside])
    chromatin = 1 + 0.18 * smooth_field(rng, n, max(4, n // 4))
    nuclei = nuclei * chromatin
    c_h = np.maximum(c_h, nuclei)
    c_e = c_e * (1 - 0.4 * np.clip(nuclei, 0, 1))
    return c_h.astype(np.float32), c_e.astype(np.float32)


def apply_stain(c_h: np.ndarray, c_e: np.ndarray, profile: HistologyProfile, rng: np.random.Generator) -> np.ndarray:
    """Stain and scan concentration maps with a hospital's profile; returns uint8 (H, W, 3)."""
    m = _stain_matrix(profile.h_hue_deg, profile.e_hue_deg)
    h_amt = profile.h_scale * rng.uniform(0.88, 1.12)  # slide-to-slide staining variation
    e_amt = profile.e_scale * rng.uniform(0.88, 1.12)
    # channel-first (3, H, W): Beer-Lambert with the hospital's stain vectors
    od = m[0][:, None, None] * (c_h * np.float32(h_amt)) + m[1][:, None, None] * (c_e * np.float32(e_amt))
    gain = (255.0 * profile.brightness * np.asarray(profile.white_balance)).astype(np.float32)[:, None, None]
    rgb = np.exp(od * np.float32(-math.log(10.0)) - np.float32(0.02 * math.log(10.0))) * gain
    scale = c_h.shape[0] / 96.0
    return finish(rgb.transpose(1, 2, 0), rng, profile.blur * scale, profile.noise, profile.jpeg_quality)


def make_patch(profile: HistologyProfile, seed: int, index: int, tumor: bool, size: int = DEFAULT_SIZE) -> np.ndarray:
    """One patch of a hospital: uint8 (size, size, 3) RGB, deterministic given (seed, hospital, index, tumor)."""
    rng = rng_for(seed, site_key(profile.name), index, int(bool(tumor)))
    c_h, c_e = make_tissue(rng, size, bool(tumor))
    return apply_stain(c_h, c_e, profile, rng)


# ----------------------------------------------------------------------------------------- layout

def _patients_plan(profile: HistologyProfile, patients: Optional[int], patches_per_patient: Optional[int],
                   patches_per_hospital: Optional[int]) -> List[int]:
    n_pat = patients or profile.patients
    if n_pat < 3:
        raise ValueError(f"{profile.name}: need at least 3 patients to split by patient, got {n_pat}")
    if patches_per_patient is not None:
        if patches_per_patient < 1:
            raise ValueError(f"patches_per_patient must be >= 1, got {patches_per_patient}")
        return [patches_per_patient] * n_pat
    total = patches_per_hospital or DEFAULT_PATCHES_PER_HOSPITAL
    if total < n_pat:
        raise ValueError(f"{profile.name}: {total} patches cannot cover {n_pat} patients")
    return [total // n_pat + (1 if i < total % n_pat else 0) for i in range(n_pat)]


def _write_patch(job) -> None:
    profile, seed, index, tumor, size, path = job
    save_png(make_patch(profile, seed, index, tumor, size), path)


def write_camelyon17(root: str | Path, profiles: Sequence[HistologyProfile], seed: int = 0,
                     patients: Optional[int] = None, patches_per_patient: Optional[int] = None,
                     patches_per_hospital: Optional[int] = None, size: int = DEFAULT_SIZE,
                     workers: int = 1) -> Path:
    """Write a phantom ``camelyon17_v1.0`` root: ``metadata.csv`` and ``patches/`` for every hospital.

    Each patient has one lymph node slide (node 0..4 at random) holding a mix of tumour and
    normal patches (the patient's tumour fraction scatters around the hospital's). Patient ids
    follow the real numbering and spelling (center c owns patients 20c .. 20c+19, written
    zero-padded as in WILDS, e.g. ``004``; more patients widen the stride). Patches are RGB
    PNGs (the real ones are opaque RGBA, as OpenSlide's read_region returns them; the loader
    accepts both). ``split`` is 1 for about 10 % of the rows, as WILDS's in-hospital validation
    column; the preparation ignores it and splits by patient.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    plans = [_patients_plan(p, patients, patches_per_patient, patches_per_hospital) for p in profiles]
    stride = max([PATIENT_STRIDE] + [len(plan) for plan in plans])
    rows, jobs, slide = [], [], 0
    for profile, plan in zip(profiles, plans):
        rng = rng_for(seed, site_key(profile.name), 2 ** 30)
        index = 0
        for k, n_patches in enumerate(plan):
            patient = profile.center * stride + k
            node = int(rng.integers(0, 5))
            frac = float(np.clip(profile.tumor_fraction + rng.normal(0, 0.12), 0.1, 0.9))
            n_tumor = int(round(frac * n_patches))
            labels = rng.permutation([1] * n_tumor + [0] * (n_patches - n_tumor))
            cells = rng.choice(400 * 400, n_patches, replace=False)
            for label, cell in zip(labels, cells):
                x, y = int(cell % 400) * 96 + 1024, int(cell // 400) * 96 + 1024
                rel = (f"patches/patient_{patient:03d}_node_{node}/"
                       f"patch_patient_{patient:03d}_node_{node}_x_{x}_y_{y}.png")
                jobs.append((profile, seed, index, bool(label), size, root / rel))
                rows.append([len(rows), f"{patient:03d}", node, x, y, int(label), slide, profile.center,
                             int(rng.random() < 0.1)])
                index += 1
            slide += 1
    run_jobs(_write_patch, jobs, workers)
    with (root / "metadata.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["", "patient", "node", "x_coord", "y_coord", "tumor", "slide", "center", "split"])
        w.writerows(rows)
    return root


def write_histology_sites(out_dir: str | Path, profiles: Sequence[HistologyProfile], seed: int = 0,
                          patients: Optional[int] = None, patches_per_patient: Optional[int] = None,
                          patches_per_hospital: Optional[int] = None, size: int = DEFAULT_SIZE,
                          workers: int = 1) -> List[Path]:
    """Phantom Camelyon17-WILDS root ``out_dir/camelyon17_v1.0`` plus the per-hospital site folders
    ``out_dir/hospital_<center>`` and ``out_dir/sites.json``, made by the same
    :func:`fedharmony.data.classification.prepare_camelyon17` as real data. Returns the site folders."""
    out = Path(out_dir)
    root = write_camelyon17(out / CAMELYON_DIR, profiles, seed, patients, patches_per_patient,
                            patches_per_hospital, size, workers)
    return prepare_camelyon17(root, out, seed)
