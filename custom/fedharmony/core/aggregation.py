"""Server-side aggregation math, free of NVFlare: checking site updates and averaging them.

Weights are ``{name: array-like}`` dicts (NumPy arrays or torch tensors). The NVFlare
aggregators (``fedharmony.fl.aggregator``, PRR-FL's and SCAFFOLD's servers) are thin wrappers around these functions.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np


class UpdateRejected(ValueError):
    """A site's update cannot be aggregated; the message says why."""


def is_local_key(name: str, local_keys: Optional[str]) -> bool:
    """True when ``name`` matches the regex of keys that stay on each site (FedBN's norm layers)."""
    return bool(local_keys) and re.search(local_keys, name) is not None


def expected_shapes(reference: Mapping[str, object], local_keys: Optional[str] = None) -> Dict[str, Tuple[int, ...]]:
    """Shapes every site must send: the reference model's keys, minus the local ones."""
    return {k: tuple(np.shape(v)) for k, v in reference.items() if not is_local_key(k, local_keys)}


def check_update(update: Mapping[str, object], expected: Mapping[str, Tuple[int, ...]],
                 local_keys: Optional[str] = None) -> Dict[str, np.ndarray]:
    """Validate one site's weights against the expected keys/shapes.

    Local keys in the update are dropped (a site may send its whole state dict).
    Returns the shared weights as float64 NumPy arrays.

    Raises:
        UpdateRejected: missing keys, unexpected keys, wrong shapes, or non-finite values.
    """
    shared = {k: v for k, v in update.items() if not is_local_key(k, local_keys)}
    missing = sorted(set(expected) - set(shared))
    extra = sorted(set(shared) - set(expected))
    if missing or extra:
        raise UpdateRejected(f"keys do not match the model: missing {_head(missing)}, unexpected {_head(extra)}")
    out = {}
    for k, v in shared.items():
        arr = np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
        if arr.shape != tuple(expected[k]):
            raise UpdateRejected(f"{k!r} has shape {arr.shape}, the model has {tuple(expected[k])}")
        if arr.dtype.kind in "fc" and not np.isfinite(arr).all():
            raise UpdateRejected(f"{k!r} holds NaN or Inf")
        out[k] = arr
    return out


def _head(keys: Iterable[str], n: int = 3) -> str:
    keys = list(keys)
    return "[]" if not keys else str(keys[:n])[:-1] + (f", ... {len(keys) - n} more]" if len(keys) > n else "]")


class WeightedAverage:
    """Streaming weighted mean of site updates: ``sum_i w_i x_i / sum_i w_i``.

    Integer entries (e.g. BatchNorm's ``num_batches_tracked``) are averaged in float and
    rounded back, so the result keeps each key's dtype.
    """

    def __init__(self):
        self.reset()

    def reset(self):
        self._sum: Dict[str, np.ndarray] = {}
        self._dtypes: Dict[str, np.dtype] = {}
        self.total_weight = 0.0
        self.contributors: Dict[str, float] = {}

    def add(self, site: str, weights: Mapping[str, np.ndarray], weight: float):
        if not np.isfinite(weight) or weight <= 0:
            raise UpdateRejected(f"aggregation weight must be a positive number, got {weight!r}")
        if site in self.contributors:
            raise UpdateRejected(f"{site} already contributed this round")
        for k, v in weights.items():
            v = np.asarray(v)
            self._dtypes.setdefault(k, v.dtype)
            acc = v.astype(np.float64) * weight
            self._sum[k] = self._sum[k] + acc if k in self._sum else acc
        self.total_weight += weight
        self.contributors[site] = weight

    def result(self) -> Dict[str, np.ndarray]:
        if not self.contributors:
            raise ValueError("no update to average")
        out = {}
        for k, s in self._sum.items():
            mean = s / self.total_weight
            dtype = self._dtypes[k]
            out[k] = (np.rint(mean) if dtype.kind in "iu" else mean).astype(dtype)
        return out
