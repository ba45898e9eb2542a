"""PRR-FL's progressive Fourier aggregation of deputy models (no NVFlare).

Every weight with two or more dimensions (convolution kernels, linear layers) is seen
as a 2-D matrix and moved to the Fourier domain. The sites share the low-frequency part
of the *amplitude* spectrum and each keeps its own high frequencies and its own phase:

1. ``weight_to_matrix``: conv ``(O, I, k1, k2, ...)`` -> permute to ``(I, k1, k2, ..., O)``
   -> ``(I * k1, k2 * ... * O)`` (a 2-D conv ``(O, I, kh, kw)`` gives ``(I*kh, kw*O)``);
   a linear ``(out, in)`` is used as is.
2. ``F_k = FFT2(M_k)``, amplitude ``A_k = |F_k|``, phase ``P_k = angle(F_k)``.
3. ``A_bar``: the (weighted or uniform) mean of the sites' amplitudes.
4. A rectangle around DC (in the centred spectrum) with half-widths ``floor(h * L / 2)``
   and ``floor(w * L / 2)``; ``L`` grows each round, see :func:`ratio_schedule`.
5. Site k gets ``A'_k = mask * A_bar + (1 - mask) * A_k`` with its own phase ``P_k``,
   inverse transform, reshape back.

1-D tensors (biases, PReLU slopes) are plainly averaged. Normalization layers never reach
this module: the caller keeps them on the sites (as in FedBN).

Two equivalent ways to run it:
* :func:`fourier_aggregate`: all deputies in, one deputy per site out (the paper's form);
* :func:`mean_amplitudes` on the server, broadcast with ``L``, then :func:`mix_amplitudes`
  on each site with its own deputy. Site k's result depends only on ``A_bar``, ``L`` and
  its own spectrum, so the numbers are the same (a test checks it), the server sends one
  message to all sites and never needs a site's phase. fedharmony's NVFlare job does this.

Unlike the released code: any number of sites, weighted or uniform mean, layers chosen by
tensor rank rather than by name, and a rectangle that is symmetric about DC (``[c - b, c + b]``).
The released half-open box ``[c - b, c + b)`` breaks the conjugate symmetry of a real
matrix's spectrum, so its inverse transform is complex and the imaginary part is dropped;
with the symmetric box the result is real up to rounding. ``box="half_open"`` reproduces the
released box (the released protocol).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

DEFAULT_R0, DEFAULT_R1 = 0.7, 0.95  # the released start / end ratios
BOXES = ("symmetric", "half_open")


def check_box(box: str) -> str:
    if box not in BOXES:
        raise ValueError(f"box must be one of {list(BOXES)}, got {box!r}")
    return box


def check_ratio(ratio: float, name: str = "ratio") -> float:
    """A shared fraction of each spectral axis must be in (0, 1]."""
    if not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {ratio!r}")
    return float(ratio)


def check_schedule(r0: float, r1: float) -> Tuple[float, float]:
    r0, r1 = check_ratio(r0, "r0"), check_ratio(r1, "r1")
    if r0 > r1:
        raise ValueError(f"the shared ratio must not shrink over the rounds: r0 = {r0} > r1 = {r1}")
    return r0, r1


def ratio_schedule(round_index: int, num_rounds: int, r0: float = DEFAULT_R0, r1: float = DEFAULT_R1) -> float:
    """``L_t = r0 + (t / T) * (r1 - r0)`` for round ``t`` in ``[0, T)``: ``L_0 = r0``, ``L_{T-1} < r1``."""
    r0, r1 = check_schedule(r0, r1)
    if num_rounds < 1 or not 0 <= round_index < num_rounds:
        raise ValueError(f"round {round_index} is outside the job's rounds [0, {num_rounds})")
    return r0 + (round_index / num_rounds) * (r1 - r0)


def is_fourier_weight(shape: Sequence[int]) -> bool:
    """Convolution kernels and linear weights (two or more dimensions) are aggregated in Fourier space."""
    return len(shape) >= 2


def weight_to_matrix(weight: np.ndarray) -> np.ndarray:
    """Shape ``(O, I, k1, ..., kn)`` -> ``(I * k1, k2 * ... * kn * O)``; 2-D weights unchanged."""
    w = np.asarray(weight)
    if w.ndim < 2:
        raise ValueError(f"expected a weight with >= 2 dimensions, got shape {w.shape}")
    if w.ndim == 2:
        return w
    moved = np.moveaxis(w, 0, -1)  # (I, k1, ..., kn, O)
    return moved.reshape(moved.shape[0] * moved.shape[1], -1)


def matrix_to_weight(matrix: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`weight_to_matrix` for a weight of ``shape``."""
    shape = tuple(shape)
    if len(shape) == 2:
        return np.asarray(matrix).reshape(shape)
    moved_shape = shape[1:] + shape[:1]
    return np.moveaxis(np.asarray(matrix).reshape(moved_shape), -1, 0)


def low_frequency_mask(height: int, width: int, ratio: float, box: str = "symmetric") -> np.ndarray:
    """Boolean ``(height, width)`` mask of the shared low frequencies, in *unshifted* FFT order.

    In the centred spectrum (DC at ``(h // 2, w // 2)``) it is the rectangle
    ``[c - b, c + b]`` on each axis with ``b = floor(side * ratio / 2)``: symmetric about
    DC, so ``ratio = 1`` covers the whole spectrum. ``box="half_open"``: ``[c - b, c + b)``,
    the released code's slice (one bin fewer per axis, off-centre).

    Example (8 x 8, ratio 0.5, b = 2): symmetric 5 x 5 = 25 bins, half-open 4 x 4 = 16.
    """
    ratio, box = check_ratio(ratio), check_box(box)
    centred = np.zeros((height, width), dtype=bool)
    ch, cw = height // 2, width // 2
    bh, bw = int(np.floor(height * ratio / 2)), int(np.floor(width * ratio / 2))
    end = 0 if box == "half_open" else 1
    centred[max(ch - bh, 0):min(ch + bh + end, height), max(cw - bw, 0):min(cw + bw + end, width)] = True
    return np.fft.ifftshift(centred)


def amplitude(matrix: np.ndarray) -> np.ndarray:
    return np.abs(np.fft.fft2(np.asarray(matrix, dtype=np.float64)))


def mix_amplitude(own: np.ndarray, mean_amplitude: np.ndarray, ratio: float, box: str = "symmetric") -> np.ndarray:
    """One matrix: the low-frequency amplitudes become ``mean_amplitude``; own high frequencies and phase stay."""
    own = np.asarray(own, dtype=np.float64)
    mean_amplitude = np.asarray(mean_amplitude, dtype=np.float64)
    if own.shape != mean_amplitude.shape:
        raise ValueError(f"mean amplitude has shape {mean_amplitude.shape}, the weight matrix {own.shape}")
    spectrum = np.fft.fft2(own)
    mask = low_frequency_mask(*own.shape, ratio, box)
    mixed = np.where(mask, mean_amplitude, np.abs(spectrum))
    return np.real(np.fft.ifft2(mixed * np.exp(1j * np.angle(spectrum))))


def _normalized_weights(n: int, weights: Optional[Sequence[float]]) -> np.ndarray:
    if n < 1:
        raise ValueError("no deputy to aggregate")
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f"need one positive finite weight per deputy ({n}), got {weights!r}")
    return w / w.sum()


def _check_same_keys(deputies: Sequence[Mapping[str, object]], names: Sequence[str]) -> List[str]:
    keys = list(deputies[0])
    for name, d in zip(names, deputies):
        missing, extra = sorted(set(keys) - set(d)), sorted(set(d) - set(keys))
        if missing or extra:
            raise ValueError(f"deputy of {name} does not match the others: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for k in keys:
            if np.shape(d[k]) != np.shape(deputies[0][k]):
                raise ValueError(f"deputy of {name}: {k!r} has shape {np.shape(d[k])}, "
                                 f"{names[0]} has {np.shape(deputies[0][k])}")
    return keys


def mean_amplitudes(deputies: Sequence[Mapping[str, object]], weights: Optional[Sequence[float]] = None,
                    names: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """The server's part: for each Fourier weight the mean amplitude ``A_bar`` (stored in the
    weight's own shape, see :func:`matrix_to_weight`), for every other tensor the plain mean.

    Args:
        deputies: one ``{key: array}`` per site, same keys and shapes (norm layers already removed).
        weights: per-site weights (e.g. training-set sizes); None = uniform, as released.
        names: site names for error messages.
    """
    names = list(names or [f"site {i}" for i in range(len(deputies))])
    w = _normalized_weights(len(deputies), weights)
    out = {}
    for k in _check_same_keys(deputies, names):
        arrays = [np.asarray(d[k]) for d in deputies]
        if is_fourier_weight(arrays[0].shape):
            mean = sum(wi * amplitude(weight_to_matrix(a)) for wi, a in zip(w, arrays))
            out[k] = matrix_to_weight(mean, arrays[0].shape)
        else:
            mean = sum(wi * a.astype(np.float64) for wi, a in zip(w, arrays))
            out[k] = np.rint(mean) if arrays[0].dtype.kind in "iu" else mean
        out[k] = out[k].astype(arrays[0].dtype)
    return out


def mix_amplitudes(deputy: Mapping[str, object], aggregate: Mapping[str, object], ratio: float,
                   box: str = "symmetric") -> Dict[str, np.ndarray]:
    """The site's part: its deputy after aggregation, from the server's :func:`mean_amplitudes` and ``L``.

    Keys of ``aggregate`` that the deputy lacks, or with another shape, are an error; the
    deputy's keys absent from ``aggregate`` (its local norm layers) are returned unchanged.
    """
    ratio = check_ratio(ratio)
    out = {k: np.asarray(v) for k, v in deputy.items()}
    for k, agg in aggregate.items():
        if k not in out:
            raise ValueError(f"aggregate holds {k!r}, which the deputy does not have")
        agg = np.asarray(agg)
        if agg.shape != out[k].shape:
            raise ValueError(f"aggregate {k!r} has shape {agg.shape}, the deputy has {out[k].shape}")
        if is_fourier_weight(agg.shape):
            mixed = mix_amplitude(weight_to_matrix(out[k]), weight_to_matrix(agg), ratio, box)
            out[k] = matrix_to_weight(mixed, agg.shape).astype(out[k].dtype)
        else:
            out[k] = agg.astype(out[k].dtype)
    return out


def fourier_aggregate(deputies: Sequence[Mapping[str, object]], ratio: float,
                      weights: Optional[Sequence[float]] = None,
                      names: Optional[Sequence[str]] = None, box: str = "symmetric") -> List[Dict[str, np.ndarray]]:
    """All deputies in, each site's own aggregated deputy out (same order)."""
    check_ratio(ratio)
    aggregate = mean_amplitudes(deputies, weights, names)
    return [mix_amplitudes(d, aggregate, ratio, box) for d in deputies]
