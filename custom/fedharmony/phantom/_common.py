"""Helpers shared by the phantom classification generators (histology, dermoscopy).

Profile files (typed, validated), seeded random streams, smooth random fields, anti-aliased
dots, the "camera" finish (blur, noise, JPEG round trip) that every phantom RGB image goes
through, and a process pool for writing many images.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import multiprocessing as mp
import os
import typing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Type, TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

P = TypeVar("P")


def site_key(name: str) -> int:
    """Stable integer of a site name (part of every random stream's seed)."""
    return sum(ord(ch) * 31 ** i for i, ch in enumerate(name)) % (2 ** 31)


def profile_error(kind: str, name: str, field: str, value, rule: str) -> ValueError:
    return ValueError(f"{kind} profile {name!r}: field {field!r} = {value!r} is invalid; {rule}")


def check_fields(kind: str, name: str, rules: Dict[str, tuple]) -> None:
    """Raise a ValueError naming the profile and the first bad field.

    ``rules`` maps field name to ``(value, ok, rule text)``.
    """
    for field, (value, ok, rule) in rules.items():
        if not ok:
            raise profile_error(kind, name, field, value, rule)


def _coerce(kind: str, name: str, key: str, hint, value):
    """Type-check one JSON value against the dataclass field's type hint."""
    args = typing.get_args(hint)
    if type(None) in args:  # Optional[...]
        if value is None:
            return None
        hint = next(a for a in args if a is not type(None))
    if value is None:
        raise profile_error(kind, name, key, value, "a value is required")
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        length = len(typing.get_args(hint))
        allowed = (int,) if item is int else (int, float)
        if (not isinstance(value, (list, tuple)) or len(value) != length
                or not all(isinstance(v, allowed) and not isinstance(v, bool) for v in value)):
            what = "integers" if item is int else "numbers"
            raise profile_error(kind, name, key, value, f"expected a list of {length} {what}")
        return tuple(item(v) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise profile_error(kind, name, key, value, "expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise profile_error(kind, name, key, value, "expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise profile_error(kind, name, key, value, "expected a number")
        return float(value)
    if hint is str and not isinstance(value, str):
        raise profile_error(kind, name, key, value, "expected a string")
    return value


def load_profile_file(path: Optional[str | Path], default: Path, cls: Type[P], kind: str) -> Dict[str, P]:
    """Read ``{"sites": [{...}, ...]}`` into ``cls`` instances keyed by name (file order kept).

    Unknown keys, missing names, duplicate names and values of the wrong type are refused
    with a ValueError naming the file, the profile and the field.
    """
    path = Path(path) if path else default
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"profile file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"profile file {path} is not valid JSON: {e}") from None
    entries = raw.get("sites") if isinstance(raw, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"profile file {path} must hold {{'sites': [ {{'name': ...}}, ... ]}}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    profiles: Dict[str, P] = {}
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
            raise ValueError(f"profile file {path}: every entry needs a non-empty string 'name', got {entry!r}")
        name = entry["name"]
        unknown = sorted(set(entry) - set(fields))
        if unknown:
            raise ValueError(f"profile file {path}: {kind} profile {name!r} has unknown key(s) {unknown}; "
                             f"known keys: {sorted(fields)}")
        if name in profiles:
            raise ValueError(f"profile file {path}: {kind} profile {name!r} appears twice")
        values = {}
        for key, value in entry.items():
            values[key] = _coerce(kind, name, key, hints[key], value)
        try:
            profiles[name] = cls(**values)
        except TypeError as e:  # a required field is missing
            raise ValueError(f"profile file {path}: {kind} profile {name!r}: {e}") from None
    return profiles


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *[int(k) for k in keys]])


@functools.lru_cache(maxsize=128)
def _basis(n: int, cells: int) -> np.ndarray:
    """(n, cells + 4) Gaussian interpolation weights from a coarse grid to n pixels (rows sum to 1)."""
    centres = (np.arange(cells + 4) - 1.5) * (n / cells)
    x = np.arange(n) + 0.5
    a = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / (0.6 * n / cells)) ** 2)
    a = a / a.sum(axis=1, keepdims=True)
    a[a < 1e-6] = 0  # no float32 denormals (they make the matrix products very slow)
    return a.astype(np.float32)


def smooth_field(rng: np.random.Generator, n: int, cells: int, cells_x: Optional[int] = None) -> np.ndarray:
    """(n, n) float32 zero-mean, unit-std random field with about ``cells`` blobs across the rows
    (``cells_x`` across the columns, default the same): a Gaussian-interpolated random grid."""
    rows, cols = _basis(n, max(1, cells)), _basis(n, max(1, cells_x or cells))
    grid = rng.standard_normal((rows.shape[1], cols.shape[1]), dtype=np.float32)
    f = (rows @ grid) @ cols.T
    return (f - f.mean()) / (f.std() + np.float32(1e-6))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


def dot_mask(n: int, centres: np.ndarray, radii: np.ndarray, supersample: int = 3) -> np.ndarray:
    """(n, n) float32 anti-aliased mask of filled discs; centres and radii in pixels."""
    big = n * supersample
    img = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(img)
    for (x, y), r in zip(centres * supersample, radii * supersample):
        draw.ellipse([x - r, y - r, x + r, y + r], fill=255)
    img = img.resize((n, n), Image.BOX)
    return np.asarray(img, np.float32) / 255.0


_NOISE_BANK: list = []


def gaussian_noise(rng: np.random.Generator, shape: tuple) -> np.ndarray:
    """Standard-normal float32 noise of ``shape``: a random window of a fixed bank of 2**20
    samples (far cheaper than drawing per image; deterministic given ``rng``)."""
    size = int(np.prod(shape))
    if size > (1 << 19):
        return rng.standard_normal(shape, dtype=np.float32)
    if not _NOISE_BANK:
        _NOISE_BANK.append(np.random.default_rng(20240917).standard_normal(1 << 20, dtype=np.float32))
    bank = _NOISE_BANK[0]
    start = int(rng.integers(0, bank.size - size))
    return bank[start:start + size].reshape(shape)


def finish(rgb: np.ndarray, rng: np.random.Generator, blur: float, noise: float,
           jpeg_quality: Optional[int]) -> np.ndarray:
    """Camera / scanner finish of a float RGB image in [0, 255]: Gaussian blur (PIL radius in
    pixels), additive Gaussian noise (sigma as a fraction of 255), then an in-memory JPEG round
    trip at ``jpeg_quality`` (None = none). Returns uint8 (H, W, 3)."""
    img = Image.fromarray(np.ascontiguousarray(np.clip(rgb, 0, 255).astype(np.uint8)), "RGB")
    if blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    arr = np.asarray(img, dtype=np.float32)
    if noise > 0:
        arr = arr + gaussian_noise(rng, arr.shape) * np.float32(noise * 255.0)
    arr = np.clip(arr + np.float32(0.5), 0, 255).astype(np.uint8)
    if jpeg_quality:
        buf = io.BytesIO()
        Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=int(jpeg_quality))
        buf.seek(0)
        arr = np.asarray(Image.open(buf).convert("RGB"))
    return arr


def default_workers() -> int:
    """Worker processes for the generators' CLIs: the CPUs this process may use, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def run_jobs(fn: Callable, jobs: Sequence, workers: int = 1) -> None:
    """``fn(job)`` for every job (they are independent and seeded, so the output does not
    depend on ``workers``); in ``workers`` forked processes when more than one."""
    if workers <= 1 or len(jobs) < 4 * workers or "fork" not in mp.get_all_start_methods():
        for job in jobs:
            fn(job)
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("fork")) as pool:
        for _ in pool.map(fn, jobs, chunksize=max(1, len(jobs) // (workers * 8))):
            pass


def save_png(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, "PNG", compress_level=1)
