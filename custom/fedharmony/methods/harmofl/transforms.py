"""HarmoFL's amplitude normalization as a MONAI dictionary transform, for preprocessing outside the network
(no NVFlare import)."""

from typing import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from fedharmony.methods.harmofl.harmonize import amplitude_normalize

__all__ = ["AmplitudeNormalized"]


class AmplitudeNormalized(MapTransform):
    """HarmoFL's amplitude normalization as a MONAI dictionary transform.

    Each key holds a (C, H, W) image (e.g. a 2.5D slab after :class:`SlabToChannelsd`);
    it is harmonized to a fixed target amplitude (C, H, W), exactly as the network's
    :class:`~fedharmony.methods.harmofl.networks.AmplitudeNormalization` layer does in eval mode.

    Args:
        keys: image keys.
        target: the amplitude target, or the path of a checkpoint holding ``harmonize.target``.
        ratio: window ratio L in [0, 0.5].
    """

    def __init__(self, keys: KeysCollection, target, ratio: float = 0.01, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if isinstance(target, (str, bytes)) or hasattr(target, "__fspath__"):
            sd = torch.load(target, map_location="cpu", weights_only=True)
            sd = sd.get("model", sd)
            if "harmonize.target" not in sd:
                raise KeyError(f"{target} holds no 'harmonize.target' (not a HarmoFL checkpoint)")
            target = sd["harmonize.target"]
        self.target = torch.as_tensor(target, dtype=torch.float32)
        self.ratio = ratio

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            if x.ndim != 3:
                raise ValueError(f"AmplitudeNormalized: {key!r} must be (C, H, W), got {tuple(x.shape)}")
            d[key] = amplitude_normalize(x[None].float(), self.target.to(x.device), self.ratio)[0].to(x.dtype)
        return d
