"""Scanner profiles of phantom sites.

A profile is the "scanner" of one site: how it maps tissue to intensity (scale, offset,
gamma), its coil (a smooth multiplicative bias field), its noise, resolution and
geometry. Profiles live in one JSON file (``prostate_sites.json`` beside this module);
a user can pass another file of the same form to add an unseen scanner.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from fedharmony.phantom._common import load_profile_file

DEFAULT_PROFILE_FILE = Path(__file__).with_name("prostate_sites.json")


@dataclasses.dataclass(frozen=True)
class SiteProfile:
    """One site's scanner.

    Attributes:
        name: site name (also its folder name).
        cases: number of cases the real site has (used when ``--cases`` is not given).
        fov_mm: in-plane field of view in mm; spacing = fov_mm / matrix.
        matrix_scale: in-plane matrix relative to the generator's ``--size``
            (rounded to a multiple of 16, so 1.333 at size 96 gives 128).
        slice_mm: slice thickness / spacing along z in mm.
        slices: number of axial slices (``--slices`` overrides).
        scale, offset: linear intensity mapping after the contrast curve.
        gamma: non-linear contrast curve ``x ** gamma`` applied to tissue signal in [0, 1].
        bias: strength of the smooth multiplicative bias field (0 = flat coil).
        bias_center: (x, y) in [-1, 1] of the coil's peak sensitivity.
        noise: Rician noise sigma, relative to the brightest tissue (1.0).
        blur_mm: Gaussian in-plane blur sigma in mm (resolution loss), 0 = none.
        ringing: fraction of k-space kept in-plane (Gibbs ringing), 1.0 = none.
        zonal_labels: masks hold 1 (central gland) and 2 (peripheral zone) instead of 1.
        note: free text for the docs table.
    """

    name: str
    cases: int = 10
    fov_mm: float = 160.0
    matrix_scale: float = 1.0
    slice_mm: float = 3.5
    slices: int = 20
    scale: float = 1000.0
    offset: float = 0.0
    gamma: float = 1.0
    bias: float = 0.0
    bias_center: Tuple[float, float] = (0.0, 0.0)
    noise: float = 0.03
    blur_mm: float = 0.0
    ringing: float = 1.0
    zonal_labels: bool = False
    note: str = ""

    def __post_init__(self):
        checks = {
            "cases": self.cases >= 1,
            "fov_mm": self.fov_mm > 0,
            "matrix_scale": self.matrix_scale > 0,
            "slice_mm": self.slice_mm > 0,
            "slices": self.slices >= 3,
            "scale": self.scale > 0,
            "gamma": self.gamma > 0,
            "bias": 0 <= self.bias < 1,
            "noise": self.noise >= 0,
            "blur_mm": self.blur_mm >= 0,
            "ringing": 0 < self.ringing <= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"site profile {self.name!r}: invalid value(s) for {', '.join(bad)}: "
                             + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))

    def matrix(self, size: int) -> int:
        """In-plane matrix for the generator's base ``size``."""
        return max(16, int(round(size * self.matrix_scale / 16.0)) * 16)


def load_profiles(path: Optional[str | Path] = None) -> Dict[str, SiteProfile]:
    """Read a profile file (default: the six phantom prostate sites), keyed by site name."""
    return load_profile_file(path, DEFAULT_PROFILE_FILE, SiteProfile, "site")


def select_profiles(profiles: Dict[str, SiteProfile], names: Optional[Sequence[str]]) -> List[SiteProfile]:
    """Pick profiles by name, in the given order (all, in file order, when ``names`` is empty)."""
    if not names:
        return list(profiles.values())
    missing = [n for n in names if n not in profiles]
    if missing:
        raise KeyError(f"unknown site(s) {missing}; known: {sorted(profiles)}")
    return [profiles[n] for n in names]


def profiles_markdown(profiles: Sequence[SiteProfile], size: int = 96) -> str:
    """The docs table of profiles (what ``make_phantom_sites.py --list-profiles`` prints)."""
    head = ("| site | cases | matrix @size | spacing mm | slices x mm | gamma | scale / offset | bias | "
            "noise | blur mm | k-space kept | labels | scanner |")
    rows = [head, "|" + "---|" * 13]
    for p in profiles:
        m = p.matrix(size)
        rows.append(
            f"| {p.name} | {p.cases} | {m} | {p.fov_mm / m:.2f} | {p.slices} x {p.slice_mm} | {p.gamma} | "
            f"{p.scale:g} / {p.offset:g} | {p.bias} | {p.noise} | {p.blur_mm} | {p.ringing} | "
            f"{'zones 1/2' if p.zonal_labels else '0/1'} | {p.note} |"
        )
    return "\n".join(rows)
