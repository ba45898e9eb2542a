"""Phantom dermoscopy images in the PRR-FL "FedSkinLesion" layout (nv / bkl / mel, 128 x 128 RGB).

Three stages:

1. :func:`make_scene` draws one lesion on skin (no camera): skin of a random tone near the
   source's population, with smooth texture, furrows and redness; a lesion whose border is
   an ellipse modulated by a few random low-order harmonics. Each lesion draws an "atypia"
   ``t`` in [0, 1] (nv: Beta(2, 5), bkl: Beta(2.5, 4), mel: Beta(5, 2)) which grows its
   border irregularity, asymmetry (odd harmonics) and colour variegation, so the classes
   overlap. Class patterns: nv: fairly symmetric, uniform brown, soft regular border,
   reticular pigment network fading to the border; bkl: lighter tan, waxy, sharp "stuck-on"
   border, milia-like bright dots, dark fissures and a few comedo-like openings; mel:
   larger, asymmetric, irregular border of varying sharpness, dark brown / black, blue-grey
   veil and reddish areas, irregular dots at the periphery.
2. A view of the scene (a lesion may have two images): a random zoom / shift and one of the
   8 flips / quarter turns.
3. :func:`apply_camera`: hair strands, vignetting and uneven light, white balance, the
   dermoscope's circular black frame (some sources), blur, noise and a JPEG round trip.

Randomness: the scene from ``default_rng([seed, source, lesion, label])``, the view and
camera from ``default_rng([seed, source, lesion, label, view + 1])``; bit-identical on
regeneration.
"""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from fedharmony.data.classification import (DERMOSCOPY_CLASSES, DERMOSCOPY_CSV_COLUMNS, DERMOSCOPY_IMAGE_FOLDER,
                                   DERMOSCOPY_SPLIT_FILES, dermoscopy_csv_path, prepare_dermoscopy)
from fedharmony.data.datalist import SPLITS
from fedharmony.phantom import _common
from fedharmony.phantom._common import check_fields, dot_mask, finish, rng_for, run_jobs, save_png, sigmoid, site_key, smooth_field

DEFAULT_PROFILE_FILE = Path(__file__).with_name("dermoscopy_sites.json")
DEFAULT_IMAGES_PER_SITE = 200
DEFAULT_SIZE = 128
MIN_PER_SPLIT = 2  # floor: every class has at least this many images in every split
CSV_FOLDER = "csv_folder"
FRACTIONS = (0.6, 0.2, 0.2)


@dataclasses.dataclass(frozen=True)
class DermoscopyProfile:
    """One source's population and camera.

    Attributes:
        name: client folder name (``clientA`` ...).
        dataset: value of the CSVs' ``dataset`` column.
        class_counts: the real source's images per class (nv, bkl, mel) as PRR-FL gives them
            (summed over the four sources: PRR-FL's global_category_info 5408 / 941 / 994); the
            phantom keeps these proportions, with a floor of 2 images per class and split.
        skin_tone: population skin tone, 0 = very light, 1 = dark / tanned.
        white_balance: (r, g, b) gains of the camera.
        vignetting: light fall-off at the image corners (0 = none, 1 = black corners).
        uneven_light: strength of a linear light gradient across the image.
        frame_fraction: fraction of images with the dermoscope's circular black frame.
        frame_radius: the frame's radius relative to half the image side (1 = touches the edges).
        blur: PIL GaussianBlur radius in pixels at 128 x 128 (scaled with the size).
        jpeg_quality: quality of the JPEG round trip (null = none).
        noise: Gaussian noise sigma as a fraction of 255.
        hair: mean number of hair strands per image.
        note: free text for the docs table.
    """

    name: str
    dataset: str
    class_counts: Tuple[int, int, int]
    skin_tone: float = 0.2
    white_balance: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    vignetting: float = 0.0
    uneven_light: float = 0.0
    frame_fraction: float = 0.0
    frame_radius: float = 1.0
    blur: float = 0.0
    jpeg_quality: Optional[int] = None
    noise: float = 0.0
    hair: float = 0.0
    note: str = ""

    def __post_init__(self):
        check_fields("dermoscopy", self.name, {
            "dataset": (self.dataset, bool(self.dataset), "must be a non-empty string"),
            "class_counts": (self.class_counts, len(self.class_counts) == len(DERMOSCOPY_CLASSES)
                             and all(c >= 1 for c in self.class_counts),
                             f"must be {len(DERMOSCOPY_CLASSES)} counts >= 1 ({', '.join(DERMOSCOPY_CLASSES)})"),
            "skin_tone": (self.skin_tone, 0 <= self.skin_tone <= 1, "must be in [0, 1]"),
            "white_balance": (self.white_balance, len(self.white_balance) == 3
                              and all(0.5 <= g <= 1.5 for g in self.white_balance),
                              "must be 3 gains in [0.5, 1.5]"),
            "vignetting": (self.vignetting, 0 <= self.vignetting <= 1, "must be in [0, 1]"),
            "uneven_light": (self.uneven_light, 0 <= self.uneven_light <= 1, "must be in [0, 1]"),
            "frame_fraction": (self.frame_fraction, 0 <= self.frame_fraction <= 1, "must be in [0, 1]"),
            "frame_radius": (self.frame_radius, 0.7 <= self.frame_radius <= 1.5, "must be in [0.7, 1.5]"),
            "blur": (self.blur, 0 <= self.blur <= 5, "must be in [0, 5] pixels"),
            "jpeg_quality": (self.jpeg_quality, self.jpeg_quality is None or 1 <= self.jpeg_quality <= 100,
                             "must be null or in [1, 100]"),
            "noise": (self.noise, 0 <= self.noise <= 0.3, "must be in [0, 0.3]"),
            "hair": (self.hair, 0 <= self.hair <= 20, "must be in [0, 20] strands per image"),
        })


def load_dermoscopy_profiles(path: Optional[str | Path] = None) -> Dict[str, DermoscopyProfile]:
    """Read a dermoscopy profile file (default: PRR-FL's four sources), keyed by client name."""
    return _common.load_profile_file(path, DEFAULT_PROFILE_FILE, DermoscopyProfile, "dermoscopy")


def dermoscopy_markdown(profiles: Sequence[DermoscopyProfile]) -> str:
    """The docs table of source profiles (``make_phantom_classification.py --task dermoscopy --list-profiles``)."""
    rows = ["| site | dataset | real nv / bkl / mel | skin tone | white balance r,g,b | vignetting | "
            "uneven light | frame (fraction, radius) | blur px | JPEG quality | noise | hair / image | look |",
            "|" + "---|" * 13]
    for p in profiles:
        wb = ",".join(f"{g:g}" for g in p.white_balance)
        frame = f"{p.frame_fraction:g}, {p.frame_radius:g}" if p.frame_fraction > 0 else "none"
        rows.append(f"| {p.name} | {p.dataset} | {' / '.join(map(str, p.class_counts))} | {p.skin_tone} | {wb} | "
                    f"{p.vignetting} | {p.uneven_light} | {frame} | {p.blur} | {p.jpeg_quality or 'none'} | "
                    f"{p.noise} | {p.hair} | {p.note} |")
    return "\n".join(rows)


def split_class_counts(profile: DermoscopyProfile, images: int, fractions=FRACTIONS) -> Dict[str, List[int]]:
    """Images per class in each split for ``images`` images of a source: the real class
    proportions, but at least ``MIN_PER_SPLIT`` (2) images of every class in every split,
    taken from the largest class (so a site needs at least 18 images)."""
    k = len(DERMOSCOPY_CLASSES)
    floor = MIN_PER_SPLIT * len(SPLITS)
    if images < floor * k:
        raise ValueError(f"{profile.name}: {images} images per site are too few; need at least {floor * k} "
                         f"({MIN_PER_SPLIT} of each of {k} classes in each of {len(SPLITS)} splits)")
    real = np.asarray(profile.class_counts, float)
    per_class = [max(floor, int(round(images * c / real.sum()))) for c in real]
    big = int(np.argmax(real))
    per_class[big] = images - sum(c for i, c in enumerate(per_class) if i != big)
    if per_class[big] < floor:
        raise ValueError(f"{profile.name}: {images} images cannot give every class {floor} images")
    out = {s: [0] * k for s in SPLITS}
    for c, n in enumerate(per_class):
        val = max(MIN_PER_SPLIT, int(round(n * fractions[1])))
        test = max(MIN_PER_SPLIT, int(round(n * fractions[2])))
        out["training"][c], out["validation"][c], out["testing"][c] = n - val - test, val, test
    return out


# ----------------------------------------------------------------------------------------- scene

SKIN_LIGHT = np.array([236.0, 196.0, 178.0], np.float32)
SKIN_DARK = np.array([165.0, 112.0, 82.0], np.float32)
PALETTE = {  # variegation colours (RGB): black, blue-grey veil, red, light brown
    "black": np.array([38.0, 30.0, 30.0], np.float32),
    "blue_grey": np.array([110.0, 118.0, 142.0], np.float32),
    "red": np.array([176.0, 86.0, 84.0], np.float32),
    "light_brown": np.array([168.0, 118.0, 80.0], np.float32),
}
ATYPIA = {0: (2.0, 5.0), 1: (2.5, 4.0), 2: (5.0, 2.0)}  # Beta parameters per class
RADIUS = {0: (0.22, 0.5), 1: (0.25, 0.55), 2: (0.3, 0.62)}  # lesion radius, fraction of half the image


def _dots(rng, n, extent, count, cx, cy, spread, radius, ring=False):
    """Soft mask of ``count`` small round dots near (cx, cy); coordinates and sizes normalized."""
    if count <= 0:
        return np.zeros((n, n), np.float32)
    if ring:  # towards the periphery: between 0.55 and 1.0 of spread from the centre
        ang = rng.uniform(0, 2 * np.pi, count)
        rad = spread * rng.uniform(0.55, 1.0, count)
        px, py = cx + rad * np.cos(ang), cy + rad * np.sin(ang)
    else:
        px, py = cx + rng.normal(0, spread, count), cy + rng.normal(0, spread, count)
    rr = rng.uniform(*radius, count)
    to_px = n / (2 * extent)
    return dot_mask(n, np.stack([(px + extent) * to_px, (py + extent) * to_px], axis=1), rr * to_px)


def _col(rgb) -> np.ndarray:
    """(3,) colour -> (3, 1, 1) float32, to broadcast over channel-first images."""
    return np.asarray(rgb, np.float32).reshape(3, 1, 1)


def make_scene(rng: np.random.Generator, n: int, label: int, skin_tone: float, extent: float = 1.0) -> np.ndarray:
    """One lesion on skin, before the camera: float32 channel-first (3, n, n) RGB in [0, 255]
    over normalized coordinates [-extent, extent]."""
    c = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 * extent - extent
    v, u = np.meshgrid(c, c, indexing="ij")  # v: rows (down), u: columns

    # skin: tone near the population's, smooth and fine texture, furrows, redness
    tone = float(np.clip(skin_tone + rng.normal(0, 0.08), 0, 1))
    skin_rgb = (1 - tone) * SKIN_LIGHT + tone * SKIN_DARK + rng.normal(0, 5, 3)
    shade = 1 + 0.04 * smooth_field(rng, n, 5) + 0.025 * smooth_field(rng, n, max(8, n // 5))
    a = rng.uniform(0, np.pi)
    warp = 0.3 * smooth_field(rng, n, 4)
    furrow = np.cos(np.float32(rng.uniform(18, 30)) * (u * np.float32(np.cos(a)) + v * np.float32(np.sin(a)))
                    + warp * 3) ** 2
    furrow = (furrow * furrow) ** 4
    shade *= 1 - 0.06 * furrow
    skin = _col(skin_rgb) * shade
    red = np.clip(smooth_field(rng, n, 3), 0, None) * np.float32(rng.uniform(0, 0.08))
    skin[1:] *= 1 - red

    # lesion geometry: ellipse x (1 + low-order harmonics); odd harmonics make it asymmetric
    t = rng.beta(*ATYPIA[label])
    r0 = rng.uniform(*RADIUS[label])
    cx, cy = rng.normal(0, 0.08, 2)
    aspect = 1 + rng.uniform(0, 0.2 + 0.2 * t)
    theta = rng.uniform(0, np.pi)
    du, dv = u - np.float32(cx), v - np.float32(cy)
    ct, st = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    pu = (du * ct + dv * st) / np.float32(aspect)
    pv = dv * ct - du * st
    rho = np.sqrt(pu * pu + pv * pv) + np.float32(1e-6)
    c1, s1 = pu / rho, pv / rho  # cos / sin of the polar angle; harmonics by recurrence
    ck, sk = c1, s1
    edge = np.ones_like(rho)
    for k in range(2, 8):
        ck, sk = ck * c1 - sk * s1, sk * c1 + ck * s1
        amp = rng.uniform(0, 1) * (0.015 + 0.11 * t) / (k - 1) ** 0.5
        if k % 2 == 1:
            amp *= 0.3 + 1.4 * t  # odd harmonics: asymmetry, mostly for atypical lesions
        ph = rng.uniform(0, 2 * np.pi)
        edge += ck * np.float32(amp * np.cos(ph)) - sk * np.float32(amp * np.sin(ph))
    R = np.float32(r0) * edge
    q = np.clip(rho / R, 0, 2)  # 0 at the centre, 1 at the border
    if label == 1:  # keratosis: sharp "stuck-on" border
        width = np.float32(rng.uniform(0.012, 0.03))
    else:  # sharp in places, blurred in others (more so when atypical)
        w0 = rng.uniform(0.035, 0.08) if label == 0 else rng.uniform(0.015, 0.05)
        width = np.float32(w0) * np.exp(np.float32(0.2 + 0.8 * t) * smooth_field(rng, n, 3))
    alpha = sigmoid((R - rho) / width)

    # lesion colour and pattern
    dark = rng.uniform(0, 1)
    if label == 0:  # naevus: uniform brown, reticular network, darker centre
        base = (1 - dark) * np.array([158.0, 104.0, 72.0]) + dark * np.array([98.0, 62.0, 42.0])
    elif label == 1:  # benign keratosis: lighter tan, waxy
        base = (1 - dark) * np.array([204.0, 164.0, 124.0]) + dark * np.array([146.0, 104.0, 72.0])
    else:  # melanoma: dark brown
        base = (1 - dark) * np.array([128.0, 82.0, 58.0]) + dark * np.array([70.0, 46.0, 34.0])
    base = base * rng.uniform(0.92, 1.08) + rng.normal(0, 4, 3)
    tint = 1 + 0.05 * smooth_field(rng, n, 6)
    if label != 1 or rng.random() < 0.3:  # pigment network (regular for nv, patchy when atypical)
        f = np.float32(2 * np.pi * rng.uniform(7, 12))
        wu, wv = 0.05 * smooth_field(rng, n, 5), 0.05 * smooth_field(rng, n, 5)
        g = np.maximum(np.cos(f * (pu + wu)), np.cos(f * (pv + wv)))
        lines = np.clip((g - 0.55) / 0.45, 0, 1)
        keep = np.clip(1 - q * q, 0, 1)
        if t > 0.4:
            keep = keep * (smooth_field(rng, n, 4) > rng.uniform(-0.5, 0.8))
        tint *= 1 - np.float32(rng.uniform(0.15, 0.35)) * lines * keep
    tint *= 1 - np.float32(rng.uniform(0.0, 0.25)) * np.clip(1 - q, 0, 1)  # darker centre
    les = _col(base) * tint
    if label == 1:  # waxy: blend toward skin, milia-like dots, fissures, comedo-like openings
        les = 0.75 * les + 0.25 * skin
        fiss = np.abs(smooth_field(rng, n, 7)) < rng.uniform(0.04, 0.1)
        les *= 1 - 0.35 * (fiss & (q < 0.9))
        spot = _dots(rng, n, extent, int(rng.integers(4, 18)), cx, cy, r0 * 0.45, (0.012, 0.03))
        les += (_col([250.0, 242.0, 220.0]) - les) * (0.85 * spot)
        holes = _dots(rng, n, extent, int(rng.integers(0, 5)), cx, cy, r0 * 0.4, (0.01, 0.025))
        les += (_col([70.0, 52.0, 40.0]) - les) * (0.8 * holes)
    # variegation: colour regions whose amount grows with atypia (all classes, strongest for mel)
    inside = q < 1.05
    for name in PALETTE:
        amount = t * rng.uniform(0.0, 0.9) * (1.0 if label == 2 else 0.45)
        if amount < 0.05:
            continue
        region = smooth_field(rng, n, 4)
        thr = np.quantile(region[::3, ::3], 1 - min(0.9, amount * 0.6))
        w = sigmoid((region - thr) * 6) * inside * np.float32(rng.uniform(0.5, 0.9))
        les += (_col(PALETTE[name]) * np.float32(rng.uniform(0.9, 1.1)) - les) * w
    n_dots = rng.poisson(3 + 22 * t) if label == 2 else rng.poisson(6 * t)
    side = rng.uniform(0, 2 * np.pi)  # irregular dots crowd on one side (asymmetry)
    dots = _dots(rng, n, extent, n_dots, cx + 0.3 * r0 * np.cos(side), cy + 0.3 * r0 * np.sin(side), r0 * 0.9,
                 (0.01, 0.03), ring=True)
    if n_dots:
        les += (_col([45.0, 32.0, 30.0]) - les) * (0.85 * dots * (q < 1.1))
    return skin + (les - skin) * alpha


def _view(scene: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random zoom (1 to 1.12) and shift of a (3, n, n) scene, then one of 8 flips / quarter
    turns; returns float32 (3, n, n)."""
    n = scene.shape[1]
    img = Image.fromarray(np.ascontiguousarray(np.clip(scene, 0, 255).astype(np.uint8).transpose(1, 2, 0)), "RGB")
    side = n / rng.uniform(1.0, 1.12)
    x0, y0 = rng.uniform(0, n - side, 2)
    img = img.resize((n, n), Image.BILINEAR, box=(x0, y0, x0 + side, y0 + side))
    k = int(rng.integers(0, 8))
    if k:
        img = img.transpose([Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM,
                             Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270,
                             Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE][k - 1])
    return np.asarray(img).transpose(2, 0, 1).astype(np.float32)


def apply_camera(img: np.ndarray, profile: DermoscopyProfile, rng: np.random.Generator) -> np.ndarray:
    """Hair, illumination, white balance, frame, then blur, noise, JPEG on a float32 (3, H, W)
    image; returns uint8 (H, W, 3)."""
    n = img.shape[1]
    sc = n / 128.0
    strands = rng.poisson(profile.hair)
    if strands:
        mask = Image.new("L", (n, n), 0)
        draw = ImageDraw.Draw(mask)
        for _ in range(strands):
            p0 = rng.uniform(-0.1, 1.1, 2) * n
            ang = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(0.5, 1.4) * n
            bend = rng.normal(0, 0.25) * length
            p2 = p0 + length * np.array([np.cos(ang), np.sin(ang)])
            p1 = (p0 + p2) / 2 + bend * np.array([-np.sin(ang), np.cos(ang)])
            s = np.linspace(0, 1, 24)[:, None]
            pts = (1 - s) ** 2 * p0 + 2 * s * (1 - s) * p1 + s ** 2 * p2
            draw.line([tuple(p) for p in pts], fill=int(rng.uniform(170, 255)),
                      width=max(1, int(round(rng.uniform(0.8, 2.0) * sc))))
        m = np.asarray(mask, np.float32) / np.float32(255.0)
        img = img + (_col([42.0, 32.0, 26.0]) * np.float32(rng.uniform(0.7, 1.3)) - img) * m
    c = (np.arange(n, dtype=np.float32) + 0.5) / n * 2 - 1
    y, x = np.meshgrid(c, c, indexing="ij")
    r2 = x * x + y * y
    b = rng.uniform(0, 2 * np.pi)
    light = (1 - np.float32(profile.vignetting) * np.clip(r2 / 2, 0, 1) ** 1.5) * (
        1 + np.float32(profile.uneven_light * 0.5) * (x * np.float32(np.cos(b)) + y * np.float32(np.sin(b))))
    img = img * light * _col(profile.white_balance)
    if rng.random() < profile.frame_fraction:
        ox, oy = rng.normal(0, 0.03, 2)
        rad = profile.frame_radius * rng.uniform(0.97, 1.03)
        inside = sigmoid((np.float32(rad) - np.sqrt((x - np.float32(ox)) ** 2 + (y - np.float32(oy)) ** 2))
                         / np.float32(0.012 / sc))
        img = 8.0 + (img - 8.0) * inside
    return finish(img.transpose(1, 2, 0), rng, profile.blur * sc, profile.noise, profile.jpeg_quality)


def make_lesion_image(profile: DermoscopyProfile, seed: int, index: int, label: int, size: int = DEFAULT_SIZE,
                      view: int = 0) -> np.ndarray:
    """Image ``view`` (0, 1, ...) of lesion ``index`` of a source: uint8 (size, size, 3) RGB,
    deterministic given (seed, source, index, label, view). Views of one lesion share the scene."""
    if label not in range(len(DERMOSCOPY_CLASSES)):
        raise ValueError(f"label must be in 0..{len(DERMOSCOPY_CLASSES) - 1}, got {label}")
    key = site_key(profile.name)
    scene = make_scene(rng_for(seed, key, index, label), size, label, profile.skin_tone)
    rng = rng_for(seed, key, index, label, view + 1)
    return apply_camera(_view(scene, rng), profile, rng)


# ----------------------------------------------------------------------------------------- layout

_LOCALIZATIONS = ("back", "lower extremity", "trunk", "upper extremity", "abdomen", "face", "chest", "foot",
                  "neck", "scalp", "hand")
_DX_TYPE = {0: (("follow_up", "histo", "consensus"), (0.5, 0.35, 0.15)),
            1: (("histo", "consensus", "confocal"), (0.6, 0.3, 0.1)),
            2: (("histo",), (1.0,))}
_AGE = {0: (15, 60), 1: (40, 85), 2: (35, 85)}


def _write_lesion(job) -> None:
    profile, seed, index, label, size, view, path = job
    save_png(make_lesion_image(profile, seed, index, label, size, view), path)


def write_fedskinlesion(data_dir: str | Path, profiles: Sequence[DermoscopyProfile], seed: int = 0,
                        images_per_site: int = DEFAULT_IMAGES_PER_SITE, size: int = DEFAULT_SIZE,
                        csv_folder: Optional[str | Path] = None, workers: int = 1) -> Path:
    """Write phantom sources in the FedSkinLesion layout; returns the CSV folder.

    ``data_dir/<client>/img_resize128/ISIC_nnnnnnn.png`` (``size`` pixels; the folder keeps
    the real name) and ``<csv_folder>/<client>/{train,valid,test}_<client>.csv`` (default
    csv folder ``data_dir/csv_folder``). Splits are by lesion: a lesion (1 or 2 images, 30 %
    have 2) lies in one split; class counts per split are :func:`split_class_counts`.
    ``workers`` > 1 renders the images in that many processes (same bytes).
    """
    data_dir = Path(data_dir)
    csv_root = Path(csv_folder) if csv_folder is not None else data_dir / CSV_FOLDER
    plans = [split_class_counts(p, images_per_site) for p in profiles]
    total = images_per_site * len(profiles)
    ids = rng_for(seed, 2 ** 30 + 1)
    image_nums = iter(24306 + ids.choice(9_000_000, total, replace=False))
    lesion_nums = iter(ids.choice(9_000_000, total, replace=False))
    jobs = []
    for profile, plan in zip(profiles, plans):
        rng = rng_for(seed, site_key(profile.name), 2 ** 30)
        img_dir = data_dir / profile.name / DERMOSCOPY_IMAGE_FOLDER
        img_dir.mkdir(parents=True, exist_ok=True)
        lesion_index = 0
        for stem, split in DERMOSCOPY_SPLIT_FILES.items():
            rows = []
            for label, count in enumerate(plan[split]):
                left = count
                while left > 0:
                    views = 2 if left >= 2 and rng.random() < 0.3 else 1
                    lesion = f"HAM_{next(lesion_nums):07d}"
                    names, probs = _DX_TYPE[label]
                    meta = [str(rng.choice(names, p=probs)), f"{5 * int(rng.integers(*_AGE[label]) // 5):.1f}",
                            str(rng.choice(("male", "female"))), str(rng.choice(_LOCALIZATIONS))]
                    for view in range(views):
                        image_id = f"ISIC_{next(image_nums):07d}"
                        jobs.append((profile, seed, lesion_index, label, size, view, img_dir / f"{image_id}.png"))
                        rows.append([image_id, label, int(label == 2), lesion, DERMOSCOPY_CLASSES[label], *meta,
                                     profile.dataset])
                    lesion_index += 1
                    left -= views
            path = dermoscopy_csv_path(csv_root, profile.name, stem)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as fh:
                w = csv.writer(fh, lineterminator="\n")
                w.writerow(DERMOSCOPY_CSV_COLUMNS)
                w.writerows(rows[i] for i in rng.permutation(len(rows)))
    run_jobs(_write_lesion, jobs, workers)
    return csv_root


def write_dermoscopy_sites(out_dir: str | Path, profiles: Sequence[DermoscopyProfile], seed: int = 0,
                           images_per_site: int = DEFAULT_IMAGES_PER_SITE, size: int = DEFAULT_SIZE,
                           workers: int = 1) -> List[Path]:
    """Phantom FedSkinLesion sources under ``out_dir`` (CSVs in ``out_dir/csv_folder``), then each
    client's ``datalist.json`` and ``out_dir/sites.json`` by the same
    :func:`fedharmony.data.classification.prepare_dermoscopy` as real data. Returns the site folders."""
    out = Path(out_dir)
    csv_root = write_fedskinlesion(out, profiles, seed, images_per_site, size, workers=workers)
    return prepare_dermoscopy(out, csv_root, clients=[p.name for p in profiles])
