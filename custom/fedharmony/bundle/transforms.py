"""MONAI transforms for 2.5D training: three adjacent axial slices become three channels."""

from __future__ import annotations

from typing import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform


class SlabToChannelsd(MapTransform):
    """Turn a 3-slice crop into a 2.5D sample.

    After ``RandCropByPosNegLabeld(spatial_size=(-1, -1, 3))`` every key holds a
    (1, H, W, 3) slab. Image keys become (3, H, W): slices i-1, i, i+1 as channels.
    Label keys become (1, H, W): the centre slice only, the one the network predicts.
    """

    def __init__(self, image_keys: KeysCollection, label_keys: KeysCollection = (), allow_missing_keys=False):
        image_keys = [image_keys] if isinstance(image_keys, str) else list(image_keys)
        label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        super().__init__(image_keys + label_keys, allow_missing_keys)
        self.image_keys, self.label_keys = image_keys, label_keys

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])  # drop 3-D metadata: the 2-D sample has no valid affine
            if x.ndim != 4 or x.shape[0] != 1 or x.shape[-1] != 3:
                raise ValueError(f"SlabToChannelsd: {key!r} must be a (1, H, W, 3) slab, got {tuple(x.shape)}")
            d[key] = x[0].permute(2, 0, 1).contiguous() if key in self.image_keys else x[..., 1].contiguous()
        return d


def volume_to_slabs(volume: torch.Tensor) -> torch.Tensor:
    """(C=1, H, W, D) volume -> (D, 3, H, W) 2.5D inputs, edge slices replicated."""
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"expected a (1, H, W, D) volume, got {tuple(volume.shape)}")
    v = volume[0]
    padded = torch.cat([v[..., :1], v, v[..., -1:]], dim=-1)  # (H, W, D + 2)
    idx = torch.arange(v.shape[-1], device=v.device)
    slabs = torch.stack([padded[..., idx], padded[..., idx + 1], padded[..., idx + 2]], dim=0)  # (3, H, W, D)
    return slabs.permute(3, 0, 1, 2).contiguous()


class AmplitudeNormalized(MapTransform):
    """HarmoFL's amplitude normalization as a MONAI dictionary transform.

    Each key holds a (C, H, W) image (e.g. a 2.5D slab after :class:`SlabToChannelsd`);
    it is harmonized to a fixed target amplitude (C, H, W), exactly as the network's
    :class:`fedharmony.methods.harmofl.networks.AmplitudeNormalization` layer does in eval mode.

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
        from fedharmony.methods.harmofl.harmonize import amplitude_normalize

        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(d[key])
            if x.ndim != 3:
                raise ValueError(f"AmplitudeNormalized: {key!r} must be (C, H, W), got {tuple(x.shape)}")
            d[key] = amplitude_normalize(x[None].float(), self.target.to(x.device), self.ratio)[0].to(x.dtype)
        return d


__all__: Sequence[str] = ["SlabToChannelsd", "volume_to_slabs", "AmplitudeNormalized"]
