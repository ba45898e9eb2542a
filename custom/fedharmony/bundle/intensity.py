"""Intensity of a volume before the network: one bundle setting, ``intensity``, picks how stored values
become network inputs.

- ``zscore`` (default): each volume to zero mean and unit variance over all its voxels (MONAI's
  ``NormalizeIntensity``). Scanner gain and offset are gone before the network sees the volume.
- ``released``: what the released HarmoFL prostate code fed its network: each volume clipped at its
  99th percentile, scaled min..p99 -> 0..255 and cut to integers (a ``uint8`` cast), then used as
  0-255 floats, not standardized. Contrast and brightness differences between scanners survive
  this scaling except for the gain.
- ``raw``: values as stored (float32). Only sensible when every site stores the same units.

Example::

    >>> volume = torch.rand(1, 8, 8, 4) * 900 + 100
    >>> VolumeIntensity("released")(volume).max()
    tensor(255.)
"""

from __future__ import annotations

from typing import Callable, Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, NormalizeIntensity, ScaleIntensityRangePercentiles, Transform

INTENSITY_MODES = ("zscore", "released", "raw")


def check_intensity_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`INTENSITY_MODES`; a ``ValueError`` naming the setting otherwise."""
    if mode not in INTENSITY_MODES:
        raise ValueError(f"intensity must be one of {list(INTENSITY_MODES)}, got {mode!r}")
    return mode


class VolumeIntensity(Transform):
    """Scale one (C, H, W, D) volume as the ``intensity`` setting says (see the module docstring).

    Args:
        mode: ``zscore``, ``released`` or ``raw``.

    Raises:
        ValueError: an unknown mode; a volume with NaN or Inf values (named by its shape: the dict
            version names the key).
    """

    def __init__(self, mode: str = "zscore"):
        self.mode = check_intensity_mode(mode)
        self._zscore = NormalizeIntensity()
        # lower percentile 0 = the volume's minimum, so this is "clip at p99, min-max to 0..255"
        self._released = ScaleIntensityRangePercentiles(lower=0, upper=99, b_min=0.0, b_max=255.0, clip=True)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        x = img if isinstance(img, torch.Tensor) else torch.as_tensor(img)
        if not torch.isfinite(x).all():
            raise ValueError(f"the volume {tuple(x.shape)} holds NaN or Inf values")
        x = x.float() if not x.is_floating_point() else x
        if self.mode == "zscore":
            return self._zscore(x)
        if self.mode == "released":
            return torch.floor(self._released(x))  # the released code's uint8 cast truncates
        return x


class PerKeyd(MapTransform):
    """Dictionary version of an array transform: ``transform`` applied to each key. A ``ValueError`` it raises
    comes back naming this transform (``label``), the key and the file the volume came from."""

    def __init__(self, keys: KeysCollection, transform: Callable, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.transform = transform

    def label(self, key: Hashable) -> str:
        return f"{type(self).__name__}({key!r})"

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self.transform(d[key])
            except ValueError as e:
                source = (getattr(d[key], "meta", None) or {}).get("filename_or_obj", "an in-memory volume")
                raise ValueError(f"{self.label(key)} on {source}: {e}") from None
        return d


class VolumeIntensityd(PerKeyd):
    """Dictionary version of :class:`VolumeIntensity`; an error names the key, the mode and the file."""

    def __init__(self, keys: KeysCollection, mode: str = "zscore", allow_missing_keys: bool = False):
        super().__init__(keys, VolumeIntensity(mode), allow_missing_keys)

    def label(self, key: Hashable) -> str:
        return f"{type(self).__name__}({key!r}, mode={self.transform.mode!r})"


__all__: Sequence[str] = ["INTENSITY_MODES", "check_intensity_mode", "VolumeIntensity", "VolumeIntensityd", "PerKeyd"]
