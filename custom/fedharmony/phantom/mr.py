"""An MR signal simulator: tissue maps in mm -> the image one site's scanner would store (numpy only).

A phantom site here is physics, not a global intensity map: the same anatomy scanned with another field
strength, sequence, resolution, coil and noise gives another image, and the differences between sites are
the ones real scanners have (tissue contrast that changes non-monotonically between sequences, partial
volume through thick slices, k-space truncation, coil shading, spatially varying noise, slice-to-slice drift,
ghosts, spikes).

**Signal equations** (steady state, perfect spoiling; ``E1 = exp(-TR/T1)``, times in ms):

* spin echo, ``SE``: ``S = PD (1 - E1) exp(-TE/T2)`` (TE << TR, the usual approximation);
* spoiled gradient echo, ``GRE``: ``S = PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE/T2)`` (T2 stands in for
  T2*; the Ernst angle ``arccos(E1)`` gives the largest signal);
* inversion recovery, ``IR`` (magnitude): ``S = PD |1 - 2 exp(-TI/T1) + E1| exp(-TE/T2)`` (a tissue is nulled
  at ``TI = T1 ln 2`` when TR >> T1).

A voxel holding several tissues gives the sum of their signals weighted by their fractions.

**Relaxation times** (:data:`TISSUES`, at 1.5 T and 3 T; rounded literature values, within the reported
ranges): white and grey matter, skeletal muscle and blood from Stanisz et al., "T1, T2 relaxation and
magnetization transfer in tissue at 3T", Magn Reson Med 54:507-512 (2005); prostate and subcutaneous fat from
de Bazelaire et al., "MR imaging relaxation times of abdominal and pelvic tissues measured in vivo at 3.0 T:
preliminary results", Radiology 230:652-659 (2004), the peripheral zone's T2 relative to the transition
zone's from Simpkin et al., "Relationship between T2 relaxation and apparent diffusion coefficient in malignant
and non-malignant prostate regions", Br J Radiol 86:20120469 (2013: PZ 149 +- 49 ms, TZ 125 +- 26 ms); fluid (CSF, urine) and cortical bone typical values. Proton
densities relative to water, as in the BrainWeb simulator (Kwan et al., IEEE Trans Med Imaging 18:1085-1097,
1999).

**Acquisition** (:func:`acquire`), in this order:

1. *slice profile*: each stored slice integrates the tissue signal over its thickness (a box profile; a gap
   leaves tissue unseen), so a thick slice averages what it crosses (partial volume);
2. *in-plane sampling*: the slice's k-space is cut to the site's matrix over its field of view in mm (box
   truncation: the point-spread function is a sinc of full width at half maximum about 1.21 pixels, and edges
   ring as Gibbs describes); optional *ghosting*: a phase error on every other phase-encoding line (motion or
   an eddy current) puts a ghost half a field of view away;
3. *coil*: a volume coil is uniform; a surface coil's sensitivity falls off with the distance from it;
4. *noise*: complex Gaussian noise of standard deviation ``sigma`` times a g-factor map (parallel imaging
   amplifies noise toward the centre), then the magnitude: Rician noise, as a scanner stores it (MONAI's
   ``RandRicianNoise`` draws one sigma per image, so the spatially varying one is done here);
5. *slice-to-slice drift* (a gain that varies between slices), *k-space spikes* (MONAI's
   ``KSpaceSpikeNoise``) and the receiver scale to the scanner's stored range.

A site is an :class:`MRSite`, read from a small JSON object (:meth:`MRSite.from_dict`) whose every field has a
unit and a physical range; a value outside it is refused naming the field. The same (site, seed) gives the same
image.

Example::

    >>> import numpy as np
    >>> site = MRSite.from_dict({"name": "A", "field_t": 3.0,
    ...     "sequence": {"kind": "SE", "tr_ms": 4000, "te_ms": 100},
    ...     "acquisition": {"fov_mm": [64, 64], "matrix": [32, 32], "slice_mm": 4.0}})
    >>> gm = np.ones((8, 64, 64))  # 8 x 64 x 64 voxels of 1 mm, all grey matter
    >>> image, spacing = acquire({"grey_matter": gm}, (1.0, 1.0, 1.0), site, seed=0)
    >>> image.shape, spacing
    ((2, 32, 32), (4.0, 2.0, 2.0))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Relaxation", "TISSUES", "PulseSequence", "Acquisition", "Coil", "Noise", "MRSite", "ProfileError",
           "signal", "tissue_signal", "slice_profile", "kspace_sample", "coil_sensitivity", "g_factor_map",
           "rician", "acquire", "area_average", "load_site_profiles", "FIELDS_T"]

FIELDS_T = (1.5, 3.0)  # field strengths with relaxation values


class ProfileError(ValueError):
    """A site profile value outside its physical range; the message names the field."""


def _check(where: str, name: str, value, low: float, high: float, unit: str = "", low_open: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value > high or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ProfileError(f"{where}{name} must be a number in {bound}{' ' + unit if unit else ''}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Relaxation:
    """One tissue at one field strength: ``t1_ms``, ``t2_ms`` (> 0) and proton density ``pd`` (0 to 1, water
    = 1)."""

    t1_ms: float
    t2_ms: float
    pd: float

    def __post_init__(self):
        _check("relaxation: ", "t1_ms", self.t1_ms, 0, 10000, "ms", low_open=True)
        _check("relaxation: ", "t2_ms", self.t2_ms, 0, 5000, "ms", low_open=True)
        _check("relaxation: ", "pd", self.pd, 0, 1)


# tissue -> field strength (T) -> relaxation; see the module docstring for the sources
TISSUES: Dict[str, Dict[float, Relaxation]] = {
    "white_matter": {1.5: Relaxation(884, 72, 0.77), 3.0: Relaxation(1084, 69, 0.77)},
    "grey_matter": {1.5: Relaxation(1124, 95, 0.86), 3.0: Relaxation(1820, 99, 0.86)},
    "fluid": {1.5: Relaxation(4000, 2000, 1.0), 3.0: Relaxation(4300, 1800, 1.0)},  # CSF, urine
    "muscle": {1.5: Relaxation(1008, 44, 0.75), 3.0: Relaxation(1412, 50, 0.75)},
    "blood": {1.5: Relaxation(1441, 290, 0.90), 3.0: Relaxation(1932, 275, 0.90)},
    "fat": {1.5: Relaxation(343, 58, 0.95), 3.0: Relaxation(382, 68, 0.95)},
    "prostate": {1.5: Relaxation(1317, 88, 0.85), 3.0: Relaxation(1597, 74, 0.85)},
    # the gland's zones: the central gland (transition and central zone) as the whole-gland values above; the
    # peripheral zone's T2 longer by the ratio Simpkin et al. measured (149 / 125 ms, PZ / TZ), so it is the
    # brighter zone on T2-weighted images, as radiologists read it
    "prostate_tz": {1.5: Relaxation(1317, 88, 0.85), 3.0: Relaxation(1597, 74, 0.85)},
    "prostate_pz": {1.5: Relaxation(1317, 105, 0.85), 3.0: Relaxation(1597, 88, 0.85)},
    "bone": {1.5: Relaxation(250, 1, 0.05), 3.0: Relaxation(300, 1, 0.05)},  # cortical: short T2, little signal
}


@dataclass(frozen=True)
class PulseSequence:
    """``kind`` ``SE`` / ``GRE`` / ``IR``; ``tr_ms`` (1 to 20000), ``te_ms`` (0.5 to TR), ``ti_ms`` (IR only,
    1 to TR), ``flip_deg`` (GRE; 1 to 180)."""

    kind: str
    tr_ms: float
    te_ms: float
    ti_ms: Optional[float] = None
    flip_deg: float = 90.0

    def check(self, where: str = "") -> "PulseSequence":
        if self.kind not in ("SE", "GRE", "IR"):
            raise ProfileError(f"{where}sequence.kind must be SE, GRE or IR, got {self.kind!r}")
        tr = _check(where, "sequence.tr_ms", self.tr_ms, 1, 20000, "ms")
        _check(where, "sequence.te_ms", self.te_ms, 0.5, 20000, "ms")
        if self.te_ms >= tr:
            raise ProfileError(f"{where}sequence.te_ms {self.te_ms} must be shorter than tr_ms {tr}")
        if self.kind == "IR":
            if self.ti_ms is None:
                raise ProfileError(f"{where}sequence.ti_ms is required for an inversion recovery (IR)")
            _check(where, "sequence.ti_ms", self.ti_ms, 1, tr, "ms")
        elif self.ti_ms is not None:
            raise ProfileError(f"{where}sequence.ti_ms is for an inversion recovery (IR), not {self.kind}")
        _check(where, "sequence.flip_deg", self.flip_deg, 1, 180, "degrees")
        return self


def signal(tissue: Relaxation, seq: PulseSequence):
    """The signal equation of ``seq`` for ``tissue`` (see the module docstring); water fully relaxed = 1."""
    e1 = math.exp(-seq.tr_ms / tissue.t1_ms)
    t2_decay = math.exp(-seq.te_ms / tissue.t2_ms)
    if seq.kind == "SE":
        return tissue.pd * (1 - e1) * t2_decay
    if seq.kind == "GRE":
        a = math.radians(seq.flip_deg)
        return tissue.pd * math.sin(a) * (1 - e1) / (1 - math.cos(a) * e1) * t2_decay
    return tissue.pd * abs(1 - 2 * math.exp(-seq.ti_ms / tissue.t1_ms) + e1) * t2_decay


@dataclass(frozen=True)
class Acquisition:
    """``fov_mm`` (y, x; 50 to 500 mm), ``matrix`` (y, x; 16 to 1024 samples), ``slice_mm`` (0.5 to 20 mm),
    ``gap_mm`` (0 to 20 mm), ``ghost_rad`` (phase error on every other phase-encoding line, 0 to pi; 0: none)."""

    fov_mm: Tuple[float, float]
    matrix: Tuple[int, int]
    slice_mm: float
    gap_mm: float = 0.0
    ghost_rad: float = 0.0

    def check(self, where: str = "") -> "Acquisition":
        if len(self.fov_mm) != 2 or len(self.matrix) != 2:
            raise ProfileError(f"{where}acquisition.fov_mm and matrix must give (y, x)")
        for axis, fov, n in zip("yx", self.fov_mm, self.matrix):
            _check(where, f"acquisition.fov_mm[{axis}]", fov, 50, 500, "mm")
            if not isinstance(n, int) or isinstance(n, bool) or not 16 <= n <= 1024:
                raise ProfileError(f"{where}acquisition.matrix[{axis}] must be an integer in [16, 1024], got {n!r}")
        _check(where, "acquisition.slice_mm", self.slice_mm, 0.5, 20, "mm")
        _check(where, "acquisition.gap_mm", self.gap_mm, 0, 20, "mm")
        _check(where, "acquisition.ghost_rad", self.ghost_rad, 0, math.pi, "rad")
        return self


@dataclass(frozen=True)
class Coil:
    """``kind`` ``volume`` (uniform) or ``surface``: sensitivity ``1 / (1 + (d / falloff_mm)^2)`` at in-plane
    distance d from ``center_mm`` (y, x from the field of view's centre; a surface coil sits outside or at the
    edge of the body)."""

    kind: str = "volume"
    center_mm: Tuple[float, float] = (0.0, 0.0)
    falloff_mm: float = 100.0

    def check(self, where: str = "") -> "Coil":
        if self.kind not in ("volume", "surface"):
            raise ProfileError(f"{where}coil.kind must be volume or surface, got {self.kind!r}")
        for axis, c in zip("yx", self.center_mm):
            _check(where, f"coil.center_mm[{axis}]", c, -500, 500, "mm")
        _check(where, "coil.falloff_mm", self.falloff_mm, 0, 1000, "mm", low_open=True)
        return self


@dataclass(frozen=True)
class Noise:
    """``sigma``: standard deviation of each of the real and imaginary noise channels, relative to the signal of
    fully relaxed water (0 to 1); ``g_factor``: the parallel-imaging noise amplification at the centre of the
    field of view (1 to 5; 1: none), falling to 1 at its edge; ``drift``: standard deviation of a gain that
    varies from slice to slice (0 to 0.5); ``spike``: a k-space spike (MONAI's ``KSpaceSpikeNoise``) at one random
    location of one random slice, its magnitude ``spike`` times the slice's k-space centre, so the stripes it
    draws have ``spike`` times the slice's mean intensity as amplitude (0 to 1; 0: none)."""

    sigma: float = 0.0
    g_factor: float = 1.0
    drift: float = 0.0
    spike: float = 0.0

    def check(self, where: str = "") -> "Noise":
        _check(where, "noise.sigma", self.sigma, 0, 1)
        _check(where, "noise.g_factor", self.g_factor, 1, 5)
        _check(where, "noise.drift", self.drift, 0, 0.5)
        _check(where, "noise.spike", self.spike, 0, 1)
        return self


@dataclass(frozen=True)
class MRSite:
    """One site's scanner: ``field_t`` (1.5 or 3.0 T), its sequence, acquisition, coil and noise, and
    ``receiver_scale`` (the stored value of fully relaxed water, 1e-3 to 1e5: scanners store arbitrary units)."""

    name: str
    field_t: float
    sequence: PulseSequence
    acquisition: Acquisition
    coil: Coil = field(default_factory=Coil)
    noise: Noise = field(default_factory=Noise)
    receiver_scale: float = 1000.0
    note: str = ""

    @classmethod
    def from_dict(cls, raw: Mapping) -> "MRSite":
        """A site from its JSON object; every value checked against its physical range (ProfileError naming
        the site and the field)."""
        if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
            raise ProfileError("a site profile is a JSON object with a 'name'")
        where = f"site {raw['name']}: "
        known = {"name", "field_t", "sequence", "acquisition", "coil", "noise", "receiver_scale", "note"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ProfileError(f"{where}unknown field(s) {unknown} (known: {sorted(known)})")

        def part(key, kind, required=True):
            value = raw.get(key)
            if value is None and not required:
                return kind()
            if not isinstance(value, Mapping):
                raise ProfileError(f"{where}{key} must be an object")
            try:
                made = kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})
            except TypeError as e:
                raise ProfileError(f"{where}{key}: {e}") from None
            return made.check(where)

        if raw.get("field_t") not in FIELDS_T:
            raise ProfileError(f"{where}field_t must be one of {list(FIELDS_T)} (tesla), got {raw.get('field_t')!r}")
        site = cls(raw["name"], float(raw["field_t"]), part("sequence", PulseSequence),
                   part("acquisition", Acquisition), part("coil", Coil, False), part("noise", Noise, False),
                   _check(where, "receiver_scale", raw.get("receiver_scale", 1000.0), 1e-3, 1e5),
                   str(raw.get("note", "")))
        return site

    def coarser(self, factor: float) -> "MRSite":
        """The same scanner with voxels ``factor`` times larger in every direction (matrix divided, at least 16;
        slice thickness, at most 20 mm, and gap multiplied; field of view kept): smaller data for quick studies
        and tests, the sites' differences kept. ``factor`` in [1, 16]."""
        if factor == 1:
            return self
        if not 1 <= factor <= 16:
            raise ValueError(f"voxel scale must be in [1, 16], got {factor}")
        acq = self.acquisition
        matrix = tuple(max(16, int(round(n / factor))) for n in acq.matrix)
        return replace(self, acquisition=replace(acq, matrix=matrix, slice_mm=min(20.0, acq.slice_mm * factor),
                                                 gap_mm=acq.gap_mm * factor).check())


def tissue_signal(fractions: Mapping[str, np.ndarray], site: MRSite) -> np.ndarray:
    """The noise-free signal per voxel: each tissue's signal equation weighted by its fraction. ``fractions``:
    tissue name (a key of :data:`TISSUES`) -> array of fractions (0 to 1), all of one shape."""
    out = None
    for name, frac in fractions.items():
        if name not in TISSUES:
            raise ValueError(f"unknown tissue {name!r}; known: {sorted(TISSUES)}")
        frac = np.asarray(frac, dtype=np.float64)
        if out is not None and frac.shape != out.shape:
            raise ValueError(f"tissue {name!r} has shape {frac.shape}, the others {out.shape}")
        term = frac * signal(TISSUES[name][site.field_t], site.sequence)
        out = term if out is None else out + term
    if out is None:
        raise ValueError("no tissue map given")
    return out


def slice_profile(volume: np.ndarray, dz_mm: float, slice_mm: float, gap_mm: float = 0.0) -> np.ndarray:
    """Slices of ``slice_mm`` every ``slice_mm + gap_mm`` along axis 0 of ``volume`` (fine planes ``dz_mm``
    apart, plane i covering ``[i dz, (i + 1) dz)``): each slice is the mean of the planes it covers, weighted by
    their overlap (a box slice profile). Shape ``(n_slices, *volume.shape[1:])``."""
    depth = volume.shape[0] * dz_mm
    step = slice_mm + gap_mm
    n = int((depth - slice_mm) // step) + 1 if depth >= slice_mm else 0
    if n < 1:
        raise ValueError(f"a {slice_mm} mm slice does not fit in {depth:.1f} mm of anatomy")
    edges = np.arange(volume.shape[0] + 1) * dz_mm
    out = np.empty((n, *volume.shape[1:]), dtype=np.float64)
    for j in range(n):
        lo, hi = j * step, j * step + slice_mm
        w = np.clip(np.minimum(edges[1:], hi) - np.maximum(edges[:-1], lo), 0, None) / slice_mm
        out[j] = np.tensordot(w, volume, axes=(0, 0))
    return out


def kspace_sample(image: np.ndarray, spacing_mm: Tuple[float, float], fov_mm: Tuple[float, float],
                  matrix: Tuple[int, int], ghost_rad: float = 0.0,
                  recon_matrix: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """One slice (y, x) on a fine grid of ``spacing_mm`` seen through the site's k-space: the slice is cut or
    padded (centred) to ``fov_mm``, and its k-space cut to the central ``matrix`` samples (box truncation; a
    matrix finer than the grid zero-fills instead: the image is interpolated, with no detail the grid lacks); a
    ``ghost_rad`` phase error on every other phase-encoding (y) line; reconstructed at ``recon_matrix`` (zero
    filling; default ``matrix``). Returns the complex image; its spacing is ``fov_mm / recon_matrix``.
    The mean intensity is kept."""
    recon = tuple(recon_matrix or matrix)
    fine = [int(round(fov / d)) for d, fov in zip(spacing_mm, fov_mm)]
    grid = np.zeros(fine, dtype=np.float64)  # the field of view on the fine grid, the slice centred in it
    src = [slice(max(0, (n - f) // 2), max(0, (n - f) // 2) + min(n, f)) for n, f in zip(image.shape, fine)]
    dst = [slice(max(0, (f - n) // 2), max(0, (f - n) // 2) + min(n, f)) for n, f in zip(image.shape, fine)]
    grid[tuple(dst)] = image[tuple(src)]
    k = np.fft.fftshift(np.fft.fft2(grid))
    if any(m > f for m, f in zip(matrix, fine)):  # an acquisition finer than the simulation grid: zero-filled,
        size = tuple(max(m, f) for m, f in zip(matrix, fine))  # it resolves no detail the grid does not have
        padded = np.zeros(size, dtype=complex)
        padded[tuple(slice(s // 2 - f // 2, s // 2 - f // 2 + f) for s, f in zip(size, fine))] = k
        k = padded
    centre = k.shape
    k = k[tuple(slice(c // 2 - m // 2, c // 2 - m // 2 + m) for c, m in zip(centre, matrix))]
    if ghost_rad:
        k[1::2, :] *= np.exp(1j * ghost_rad)
    if recon != tuple(matrix):
        padded = np.zeros(recon, dtype=complex)
        padded[tuple(slice(r // 2 - m // 2, r // 2 - m // 2 + m) for r, m in zip(recon, matrix))] = k
        k = padded
    scale = (recon[0] * recon[1]) / (fine[0] * fine[1])
    return np.fft.ifft2(np.fft.ifftshift(k)) * scale


def _centred_coords(shape: Tuple[int, int], fov_mm: Tuple[float, float]):
    return np.meshgrid(*[(np.arange(n) + 0.5) * (f / n) - f / 2 for n, f in zip(shape, fov_mm)], indexing="ij")


def coil_sensitivity(shape: Tuple[int, int], fov_mm: Tuple[float, float], coil: Coil) -> np.ndarray:
    """The coil's receive sensitivity on the reconstructed grid (max 1)."""
    if coil.kind == "volume":
        return np.ones(shape)
    y, x = _centred_coords(shape, fov_mm)
    d2 = (y - coil.center_mm[0]) ** 2 + (x - coil.center_mm[1]) ** 2
    s = 1 / (1 + d2 / coil.falloff_mm ** 2)
    return s / s.max()


def g_factor_map(shape: Tuple[int, int], fov_mm: Tuple[float, float], g_factor: float) -> np.ndarray:
    """Parallel imaging's noise amplification: ``g_factor`` at the centre, falling smoothly to 1 at the edge."""
    y, x = _centred_coords(shape, fov_mm)
    r2 = (y / (fov_mm[0] / 2)) ** 2 + (x / (fov_mm[1] / 2)) ** 2
    return 1 + (g_factor - 1) * np.exp(-r2 / (2 * 0.35 ** 2))


def rician(complex_image: np.ndarray, sigma, rng: np.random.Generator) -> np.ndarray:
    """The magnitude of ``complex_image`` plus complex Gaussian noise of standard deviation ``sigma`` (a number
    or a map) in each channel: Rician noise (mean ``sigma sqrt(pi / 2)`` where there is no signal)."""
    noise = rng.normal(size=complex_image.shape) + 1j * rng.normal(size=complex_image.shape)
    return np.abs(complex_image + np.asarray(sigma) * noise)


def acquire(fractions: Mapping[str, np.ndarray], spacing_mm: Sequence[float], site: MRSite,
            seed: int = 0) -> Tuple[np.ndarray, Tuple[float, float, float]]:
    """Scan tissue maps with ``site``: returns the stored image ``(slices, y, x)`` (float32) and its spacing in
    mm ``(slice step, y, x)``. ``fractions``: tissue -> fraction map ``(z, y, x)`` on a grid of ``spacing_mm``
    (finer than the acquisition); ``seed``: the noise, drift and spike draws (the same seed, the same image)."""
    spacing_mm = tuple(float(s) for s in spacing_mm)
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ValueError(f"spacing_mm must give three positive spacings (z, y, x), got {spacing_mm}")
    acq, noise = site.acquisition, site.noise
    rng = np.random.default_rng(seed)
    slices = slice_profile(tissue_signal(fractions, site), spacing_mm[0], acq.slice_mm, acq.gap_mm)
    coil = coil_sensitivity(acq.matrix, acq.fov_mm, site.coil)
    sigma = noise.sigma * g_factor_map(acq.matrix, acq.fov_mm, noise.g_factor)
    drift = 1 + noise.drift * rng.normal(size=len(slices))
    out = np.empty((len(slices), *acq.matrix), dtype=np.float32)
    for i, plane in enumerate(slices):
        sampled = kspace_sample(plane, spacing_mm[1:], acq.fov_mm, acq.matrix, acq.ghost_rad) * coil * drift[i]
        out[i] = rician(sampled, sigma, rng) if noise.sigma > 0 else np.abs(sampled)
    if noise.spike > 0:
        from monai.transforms import KSpaceSpikeNoise

        i = int(rng.integers(len(out)))
        loc = (0, *(int(rng.integers(n)) for n in acq.matrix))
        # the spike's magnitude: `spike` times the slice's k-space centre (its sum), whatever the intensity unit
        level = math.log(noise.spike * abs(float(out[i].sum())) + 1e-12)
        out[i] = np.abs(np.asarray(KSpaceSpikeNoise(loc=loc, k_intensity=level)(out[i][None]))[0])
    step = acq.slice_mm + acq.gap_mm
    return out * np.float32(site.receiver_scale), (step, acq.fov_mm[0] / acq.matrix[0], acq.fov_mm[1] / acq.matrix[1])


def area_average(plane: np.ndarray, matrix: Tuple[int, int], spacing_mm, fov_mm) -> np.ndarray:
    """A fraction map ``(y, x)`` on the fine grid (``spacing_mm``), cut or padded to the field of view and
    area-averaged to ``matrix``: what share of each acquired pixel a structure fills (labels from anatomy)."""
    import torch
    import torch.nn.functional as F

    fine = [int(round(f / d)) for f, d in zip(fov_mm, spacing_mm)]
    grid = np.zeros(fine, dtype=np.float32)
    src = [slice(max(0, (n - f) // 2), max(0, (n - f) // 2) + min(n, f)) for n, f in zip(plane.shape, fine)]
    dst = [slice(max(0, (f - n) // 2), max(0, (f - n) // 2) + min(n, f)) for n, f in zip(plane.shape, fine)]
    grid[tuple(dst)] = plane[tuple(src)]
    return F.interpolate(torch.from_numpy(grid)[None, None], size=tuple(matrix), mode="area")[0, 0].numpy()


def load_site_profiles(path, from_dict) -> dict:
    """``{name: site}`` from a profile file (``{"sites": [...]}``), each entry made by ``from_dict`` (for
    example :meth:`MRSite.from_dict`); an unreadable file or one without sites is a :class:`ProfileError`
    naming it."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ProfileError(f"{path}: cannot be read as JSON ({e})") from None
    sites = [from_dict(s) for s in raw.get("sites", [])] if isinstance(raw, dict) else []
    if not sites:
        raise ProfileError(f"{path}: no site under 'sites'")
    return {s.name: s for s in sites}
