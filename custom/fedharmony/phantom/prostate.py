"""Phantom T2-weighted prostate MR volumes.

Two independent stages, so a case's anatomy does not depend on the scanner:

1. :func:`make_anatomy` draws one patient: a pelvis-like body (fat rim, muscle,
   bladder, rectum with a dark lumen, periprostatic tissue) and a lobulated prostate
   whose peripheral zone is brighter than its central gland. Tissue signal is in
   [0, 1], sampled on a 2x supersampled in-plane grid, then box-averaged, so the gland
   boundary has partial volume. Neighbouring tissue has signal close to the central
   gland and everything carries smooth texture, so no threshold separates the gland.
2. :func:`apply_scanner` images that anatomy with a site's profile: contrast curve,
   coil bias field, blur, k-space truncation (ringing), Rician noise, linear scale.

All randomness comes from one ``numpy.random.Generator`` per case, so a (seed, site,
case) triple always gives the same volume.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from fedharmony.phantom.profiles import SiteProfile

# tissue signal on T2 (before the scanner's contrast curve), brightest = 1
T2_SIGNAL = {
    "fat": 0.80,
    "muscle": 0.22,
    "soft": 0.46,  # periprostatic / pelvic floor tissue: close to the central gland on purpose
    "bladder": 1.00,
    "rectal_wall": 0.30,
    "rectal_lumen": 0.08,
    "central_gland": 0.42,
    "peripheral_zone": 0.68,
}


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, ...], cutoff: float) -> np.ndarray:
    """Zero-mean, unit-std random field with spatial frequencies below ``cutoff`` (cycles/voxel)."""
    noise = rng.standard_normal(shape)
    freqs = np.meshgrid(*[np.fft.fftfreq(n) for n in shape], indexing="ij")
    radius2 = sum(f ** 2 for f in freqs)
    field = np.real(np.fft.ifftn(np.fft.fftn(noise) * np.exp(-radius2 / (2 * cutoff ** 2))))
    return (field - field.mean()) / (field.std() + 1e-8)


def make_anatomy(rng: np.random.Generator, matrix: int, slices: int, supersample: int = 2):
    """Draw one patient.

    Returns:
        signal: (matrix, matrix, slices) float32 tissue signal in [0, 1].
        zones: (matrix, matrix, slices) uint8, 0 background, 1 central gland, 2 peripheral zone.
    """
    n = matrix * supersample
    # normalized in-plane coordinates in [-1, 1]: x = left-right, y = posterior(-) to anterior(+)
    c = (np.arange(n) + 0.5) / n * 2 - 1
    x, y = np.meshgrid(c, c, indexing="ij")
    zc = (np.arange(slices) + 0.5) / slices * 2 - 1  # inferior (-1) to superior (+1)

    # patient-level random anatomy
    body_a, body_b = rng.uniform(0.80, 0.92), rng.uniform(0.62, 0.75)
    fat_rim = rng.uniform(0.10, 0.16)
    p_cx, p_cy = rng.uniform(-0.05, 0.05), rng.uniform(-0.12, 0.0)
    p_rx, p_ry = rng.uniform(0.17, 0.25), rng.uniform(0.12, 0.18)
    p_z0, p_zr = rng.uniform(-0.25, 0.0), rng.uniform(0.35, 0.55)
    harm = [(k, rng.uniform(0.02, 0.07), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4, 5)]
    pz_depth = rng.uniform(0.35, 0.55)  # fraction of the gland's AP extent taken by the PZ (posterior)
    rect_cy = p_cy - p_ry - rng.uniform(0.10, 0.14)
    rect_r = rng.uniform(0.09, 0.13)
    bladder_cy = p_cy + rng.uniform(0.05, 0.15)
    bladder_r = rng.uniform(0.22, 0.32)
    muscle_x = rng.uniform(0.40, 0.50)
    texture = _smooth_field(rng, (n, n, slices), cutoff=0.06)
    fine = _smooth_field(rng, (n, n, slices), cutoff=0.25)

    signal = np.zeros((n, n, slices), np.float32)
    zones = np.zeros((n, n, slices), np.uint8)
    theta = np.arctan2(y - p_cy, x - p_cx)
    lobes = 1 + sum(a * np.cos(k * theta + ph) for k, a, ph in harm)
    for k, z in enumerate(zc):
        body = (x / body_a) ** 2 + (y / body_b) ** 2 <= 1
        inner = (x / (body_a - fat_rim)) ** 2 + (y / (body_b - fat_rim)) ** 2 <= 1
        s = np.where(body, T2_SIGNAL["fat"], 0.0)
        s = np.where(inner, T2_SIGNAL["soft"], s)
        muscle = inner & (np.abs(x) > muscle_x) & (((np.abs(x) - muscle_x - 0.12) / 0.14) ** 2
                                                    + ((y + 0.05) / 0.35) ** 2 <= 1)
        s = np.where(muscle, T2_SIGNAL["muscle"], s)
        # rectum: along the whole pelvis, wall + dark lumen
        rd = np.hypot(x - p_cx, (y - rect_cy) * 1.2)
        s = np.where(inner & (rd <= rect_r), T2_SIGNAL["rectal_wall"], s)
        s = np.where(inner & (rd <= rect_r * 0.55), T2_SIGNAL["rectal_lumen"], s)
        # bladder: above the gland, shrinking towards the apex
        b_extent = np.clip((z - (p_z0 + 0.1)) / 0.8, 0, 1)
        if b_extent > 0:
            br = bladder_r * np.sqrt(b_extent)
            bd = np.hypot(x - p_cx, (y - bladder_cy - 0.5 * p_ry) * 1.1)
            s = np.where(inner & (bd <= br), T2_SIGNAL["bladder"], s)
        # prostate: lobulated ellipse whose size follows an ellipsoid along z
        zfrac = 1 - ((z - p_z0) / p_zr) ** 2
        if zfrac > 0:
            scale = np.sqrt(zfrac)
            r = np.hypot((x - p_cx) / (p_rx * scale), (y - p_cy) / (p_ry * scale))
            gland = r <= lobes
            # peripheral zone: posterior crescent of the gland
            pz = gland & (y - p_cy < -p_ry * scale * (1 - 2 * pz_depth) * 0.5) & (r > 0.45 * lobes)
            cg = gland & ~pz
            s = np.where(cg, T2_SIGNAL["central_gland"], s)
            s = np.where(pz, T2_SIGNAL["peripheral_zone"], s)
            zones[..., k] = np.where(pz, 2, np.where(cg, 1, 0))
        signal[..., k] = s

    # tissue texture (+-8%) and fine heterogeneity inside the gland
    inside = signal > 0
    signal = signal * (1 + 0.08 * texture) + inside * 0.03 * fine * (zones > 0)
    signal = np.clip(signal, 0, 1)

    # box-average the supersampled grid: partial volume at every boundary
    f = supersample
    signal = signal.reshape(matrix, f, matrix, f, slices).mean(axis=(1, 3))
    frac_cg = (zones == 1).reshape(matrix, f, matrix, f, slices).mean(axis=(1, 3))
    frac_pz = (zones == 2).reshape(matrix, f, matrix, f, slices).mean(axis=(1, 3))
    gland = (frac_cg + frac_pz) >= 0.5
    labels = np.where(gland, np.where(frac_pz > frac_cg, 2, 1), 0).astype(np.uint8)
    return signal.astype(np.float32), labels


def apply_scanner(signal: np.ndarray, profile: SiteProfile, spacing_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Image a tissue-signal volume (H, W, D) in [0, 1] with a site's scanner; returns float32."""
    h, w, d = signal.shape
    img = np.power(np.clip(signal, 0, None), profile.gamma)

    if profile.bias > 0:  # coil sensitivity: smooth, peaked at bias_center, plus a little randomness
        c = (np.arange(h) + 0.5) / h * 2 - 1
        x, y = np.meshgrid(c, c, indexing="ij")
        bx, by = profile.bias_center
        dist2 = (x - bx) ** 2 + (y - by) ** 2
        field = np.exp(-dist2 / 1.2)
        field = field / field.max()
        field = (1 - profile.bias) + profile.bias * field
        field = field * (1 + 0.05 * _smooth_field(rng, (h, w), cutoff=0.03))
        img = img * field[..., None]

    spectrum = np.fft.fft2(img, axes=(0, 1))
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.fftfreq(w)[None, :]
    if profile.blur_mm > 0:
        sigma_vox = profile.blur_mm / spacing_mm
        spectrum *= np.exp(-2 * (np.pi * sigma_vox) ** 2 * (fx ** 2 + fy ** 2))[..., None]
    if profile.ringing < 1:  # hard k-space truncation -> Gibbs ringing at edges
        keep = (np.abs(fy) <= 0.5 * profile.ringing) & (np.abs(fx) <= 0.5 * profile.ringing)
        spectrum *= keep[..., None]
    img = np.real(np.fft.ifft2(spectrum, axes=(0, 1)))

    if profile.noise > 0:  # Rician: magnitude of a complex signal with Gaussian noise in both channels
        n1 = rng.normal(0, profile.noise, img.shape)
        n2 = rng.normal(0, profile.noise, img.shape)
        img = np.sqrt((img + n1) ** 2 + n2 ** 2)
    return (img * profile.scale + profile.offset).astype(np.float32)


def make_case(profile: SiteProfile, seed: int, case_index: int, size: int = 96, slices: int | None = None):
    """One case of a site: (image (H, W, D) float32, mask (H, W, D) uint8, affine (4, 4)).

    The anatomy depends on (seed, site, case) and the site's matrix; the scanner noise on
    the same triple, so regenerating with the same arguments is bit-identical.
    """
    matrix = profile.matrix(size)
    depth = slices or profile.slices
    site_key = sum(ord(ch) * 31 ** i for i, ch in enumerate(profile.name)) % (2 ** 31)
    rng = np.random.default_rng([seed, site_key, case_index])
    signal, labels = make_anatomy(rng, matrix, depth)
    spacing = profile.fov_mm / matrix
    image = apply_scanner(signal, profile, spacing, rng)
    if not profile.zonal_labels:
        labels = (labels > 0).astype(np.uint8)
    # RAS affine with the site's spacing; origin at the volume's centre
    affine = np.diag([spacing, spacing, profile.slice_mm, 1.0])
    affine[:3, 3] = -0.5 * np.array([matrix * spacing, matrix * spacing, depth * profile.slice_mm])
    return image, labels, affine
