"""Fourier amplitude normalization (HarmoFL's AmpNorm), pure torch / cupy, no NVFlare.

For each image and channel: F = FFT2(x) over (H, W); inside the low-frequency window
``|k_y| <= b, |k_x| <= b`` with ``b = floor(min(H, W) * ratio)`` the amplitude |F| is
replaced by the target's and the phase kept; outside the window F is unchanged; the
output is the real inverse FFT. ``ratio = 0`` replaces only the DC coefficient: a
per-image, per-channel mean shift (what the released HarmoFL code effectively does).

Implementation: one batched ``rfft2`` over (B, C, H, W) (real input: the half
spectrum is enough), the window's coefficients replaced in place (two small corner
blocks of the half spectrum; the phase as F / |F|, no trigonometry), one ``irfft2``.
The window is symmetric in frequency, so the result is the real signal a full ``fft2``
implementation gives (and whose imaginary part the released code throws away).

Backends: ``torch.fft`` anywhere; ``cupy.fft`` for CUDA tensors when cupy is installed,
zero-copy through DLPack. The choice is automatic (logged once), or forced with
``backend=`` / ``FEDHARMONY_FFT_BACKEND`` (``torch`` | ``cupy``).

TorchScript: :func:`batch_amplitude` and :func:`amplitude_normalize` compile with
``torch.jit.script`` (so does the layer that calls them,
:class:`fedharmony.methods.harmofl.networks.AmplitudeNormalization`). A scripted model always
uses the torch backend; the backend choice and cupy exist only in eager Python
(``torch.jit.is_scripting()``). Both backends share the window arithmetic below, so a scripted
model computes what the eager torch backend computes.
"""

from __future__ import annotations

import logging
import math
import os
from functools import lru_cache
from typing import List, Optional, Tuple

import torch

logger = logging.getLogger(__name__)
BACKEND_ENV = "FEDHARMONY_FFT_BACKEND"
BACKENDS = ("torch", "cupy")


def window_radius(height: int, width: int, ratio: float) -> int:
    """Half-size b of the (2b+1) x (2b+1) low-frequency window."""
    return int(math.floor(min(height, width) * ratio))


def empty_window_note(height: int, width: int, ratio: float) -> Optional[str]:
    """Why amplitude normalization at this size and ratio swaps no more than the DC term (None: it does more).

    With ``b = floor(min(H, W) * L) = 0`` the window holds only the zero frequency, so the "paper" mode
    is a per-image, per-channel mean shift, not a low-frequency amplitude swap. For example L = 0.01
    needs at least 100 px for b = 1 and 200 px for b = 2; at 96 px b >= 2 needs L >= 2 / 96.

    Example::

        >>> empty_window_note(96, 96, 0.01)[:60]
        'amplitude window b = floor(96 x 0.01) = 0 at 96 x 96: only t'
        >>> empty_window_note(384, 384, 0.01) is None
        True
    """
    side = min(height, width)
    if ratio <= 0 or window_radius(height, width, ratio) > 0:
        return None
    return (f"amplitude window b = floor({side} x {ratio:g}) = 0 at {height} x {width}: only the DC term is swapped "
            f"(a per-image mean shift, not HarmoFL's low-frequency amplitude swap); b >= 1 needs L >= {1 / side:.4f} "
            f"and b >= 2 needs L >= {2 / side:.4f} at this size")


def batch_amplitude(images: torch.Tensor) -> torch.Tensor:
    """Mean amplitude spectrum of a batch: (B, C, H, W) -> (C, H, W), NumPy's unshifted ``fft2`` layout."""
    _check_images(images)
    return torch.fft.fft2(images.to(torch.float64 if images.dtype == torch.float64 else torch.float32)).abs().mean(0)


def shape_text(shape: List[int]) -> str:
    """``(2, 3, 16, 16)``: a shape as Python prints a tuple, in eager and in TorchScript code alike."""
    return "(" + ", ".join([str(d) for d in shape]) + ")"


def _check_images(images: torch.Tensor):
    if not torch.jit.is_scripting():
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {shape_text(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point, got {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contain NaN or Inf")


def _check_inputs(images: torch.Tensor, target: torch.Tensor, ratio: float):
    _check_images(images)
    if not torch.jit.is_scripting():
        if not isinstance(target, torch.Tensor):
            raise ValueError(f"target must be (C, H, W) = {shape_text(images.shape[1:])} like the images, "
                             f"got {type(target).__name__}")
    if target.shape != images.shape[1:]:
        raise ValueError(f"target must be (C, H, W) = {shape_text(images.shape[1:])} like the images, "
                         f"got {shape_text(target.shape)}")
    if not bool(torch.isfinite(target).all()) or bool((target < 0).any()):
        raise ValueError("target must be a finite, non-negative amplitude spectrum")
    if torch.jit.is_scripting():
        if not 0.0 <= ratio <= 0.5:  # a float by its annotation
            raise ValueError(f"ratio L must be in [0, 0.5], got {ratio}")
    else:
        check_ratio(ratio)


def check_ratio(ratio: float) -> float:
    """The window ratio L must be a number in [0, 0.5] (the one place this is checked)."""
    if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 0.5):
        raise ValueError(f"ratio L must be in [0, 0.5], got {ratio!r}")
    return float(ratio)


_logged_backend = set()


def select_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """``torch`` or ``cupy`` for tensors on ``device`` (see the module docstring)."""
    requested = backend or os.environ.get(BACKEND_ENV) or "auto"
    if requested not in ("auto",) + BACKENDS:
        raise ValueError(f"unknown FFT backend {requested!r}; choose auto, torch or cupy")
    cupy_ok = device.type == "cuda" and _cupy() is not None
    if requested == "cupy" and not cupy_ok:
        raise RuntimeError("FFT backend 'cupy' needs a CUDA tensor and an installed cupy "
                           f"(device {device}, cupy {'found' if _cupy() else 'not installed'})")
    chosen = requested if requested != "auto" else ("cupy" if cupy_ok else "torch")
    key = (chosen, device.type)
    if key not in _logged_backend:
        _logged_backend.add(key)
        logger.info("amplitude normalization: %s FFT on %s%s", chosen, device.type,
                    "" if requested != "auto" else " (automatic choice)")
    return chosen


@lru_cache(maxsize=1)
def _cupy():
    try:
        import cupy

        return cupy
    except Exception:  # not installed, or no CUDA driver
        return None


def window_rows(height: int, b: int) -> List[Tuple[int, int]]:
    """Row ranges ``[start, stop)`` of the window on an rfft2 half spectrum of ``height`` rows.

    On the half spectrum (..., H, W//2+1) the window |k_y|, |k_x| <= b is two corner blocks:
    rows 0..b and H-b..H-1 (none when b = 0), columns 0..b.
    """
    rows = [(0, b + 1)]
    if b > 0:
        rows.append((height - b, height))
    return rows


def _replace_window(spectrum, target_half, b: int, where):
    """In place on an rfft2 half spectrum (..., H, W//2+1): inside the window |k_y|, |k_x| <= b set
    F <- T * F / |F| (the target's amplitude with F's own phase; phase 0 where |F| = 0).

    Only the (2b+1)(b+1) coefficients per image in :func:`window_rows` are touched: no
    trigonometry and no pass over the rest of the spectrum. For cupy arrays (``where`` =
    ``cupy.where``); :func:`_replace_window_torch` is the same arithmetic for torch tensors.
    """
    for start, stop in window_rows(spectrum.shape[-2], b):
        block = spectrum[..., start:stop, : b + 1]
        mag = abs(block)
        unit = where(mag > 0, block / where(mag > 0, mag, 1), 1)
        spectrum[..., start:stop, : b + 1] = target_half[..., start:stop, : b + 1] * unit


def _replace_window_torch(spectrum: torch.Tensor, target_half: torch.Tensor, b: int):
    """:func:`_replace_window` on a torch spectrum, in TorchScript-compilable form (same operations)."""
    for start, stop in window_rows(spectrum.shape[-2], b):
        block = spectrum[..., start:stop, : b + 1]
        mag = block.abs()
        unit = torch.where(mag > 0, block / torch.where(mag > 0, mag, 1), 1)
        spectrum[..., start:stop, : b + 1] = target_half[..., start:stop, : b + 1] * unit


def _normalize_torch(images: torch.Tensor, target_half: torch.Tensor, b: int) -> torch.Tensor:
    spectrum = torch.fft.rfft2(images)
    _replace_window_torch(spectrum, target_half, b)
    return torch.fft.irfft2(spectrum, s=images.shape[-2:])


def _normalize_cupy(images, target_half, b):
    cp = _cupy()
    x = cp.from_dlpack(images.contiguous())
    spectrum = cp.fft.rfft2(x)
    _replace_window(spectrum, cp.from_dlpack(target_half.contiguous()).astype(spectrum.real.dtype), b, cp.where)
    out = cp.fft.irfft2(spectrum, s=images.shape[-2:]).astype(x.dtype, copy=False)
    return torch.from_dlpack(out)


def _normalize_eager(images, target_half, b: int, backend: Optional[str]):
    """The backend choice (eager Python only): cupy for CUDA tensors when available, else torch."""
    if select_backend(images.device, backend) == "cupy":
        return _normalize_cupy(images, target_half, b)
    return _normalize_torch(images, target_half, b)


def amplitude_normalize(images: torch.Tensor, target: torch.Tensor, ratio: float,
                        backend: Optional[str] = None) -> torch.Tensor:
    """Harmonize a batch to a target amplitude spectrum.

    Args:
        images: (B, C, H, W) float tensor (any device).
        target: (C, H, W) amplitude spectrum in NumPy's unshifted ``fft2`` layout
            (e.g. from :func:`batch_amplitude`), on the same device.
        ratio: window ratio L in [0, 0.5]; 0 replaces only the DC coefficient.
        backend: ``torch`` / ``cupy`` / None (automatic).

    Returns:
        (B, C, H, W) tensor of the input's dtype and device. No gradient flows through it.
        Compiled with TorchScript, the torch backend is used whatever ``backend`` says.
    """
    _check_inputs(images, target, ratio)
    h, w = images.shape[-2], images.shape[-1]
    dtype = images.dtype
    work = images.to(torch.float32) if dtype == torch.float16 or dtype == torch.bfloat16 else images
    target_half = target[..., : w // 2 + 1].to(device=images.device, dtype=work.dtype)
    b = window_radius(h, w, ratio)
    with torch.no_grad():
        if torch.jit.is_scripting():
            out = _normalize_torch(work.detach(), target_half, b)
        else:
            out = _normalize_eager(work.detach(), target_half, b, backend)
    return out.to(dtype)


def mean_shift_reference(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What ``ratio = 0`` computes, written directly: x - mean(x) + sign(mean(x)) * T[c, 0, 0] / (H W)."""
    h, w = images.shape[-2:]
    mean = images.mean(dim=(-2, -1), keepdim=True)
    sign = torch.where(mean < 0, -1.0, 1.0).to(images.dtype)
    return images - mean + sign * target[:, :1, :1].to(images.dtype) / (h * w)


def spectrum_parts(images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(amplitude, phase) of ``fft2`` over (H, W): for tests and figures."""
    f = torch.fft.fft2(images)
    return f.abs(), f.angle()
