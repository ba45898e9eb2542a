"""Inferers that apply a 2D network to 3D volumes."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import Inferer

from fedharmony.bundle.transforms import volume_to_slabs


def check_volume_size(volumes: torch.Tensor, min_size: int):
    """Refuse (B, 1, H, W, D) volumes whose in-plane size is below ``min_size``, naming the file."""
    h, w, d = volumes.shape[2:5]
    if d < 1 or h < min_size or w < min_size:
        names = getattr(volumes, "meta", {}).get("filename_or_obj", "input volume")
        raise ValueError(f"volume too small for the network: {names} is {h} x {w} x {d}; "
                         f"the in-plane size must be at least {min_size} x {min_size}")


class Slab25DInferer(Inferer):
    """Run a 2.5D network (3 adjacent slices in, centre-slice logits out) over whole volumes.

    inputs (B, 1, H, W, D) -> outputs (B, C_out, H, W, D). Each slice i sees slices
    (i-1, i, i+1), edges replicated. H and W are zero-padded up to a multiple of
    ``divisible_by`` (the UNet's total stride) and cropped back, so any in-plane size
    works and the output keeps the input's geometry (and its MetaTensor metadata).

    Args:
        slices_per_batch: how many slices go through the network at once (memory bound).
        divisible_by: spatial size multiple the network needs.
        min_size: smallest in-plane size accepted (a network normalizing with batch
            statistics needs more than one value per channel at its coarsest level).
    """

    def __init__(self, slices_per_batch: int = 32, divisible_by: int = 16, min_size: int = 2):
        super().__init__()
        if slices_per_batch < 1 or divisible_by < 1:
            raise ValueError("slices_per_batch and divisible_by must be >= 1")
        self.slices_per_batch = slices_per_batch
        self.divisible_by = divisible_by
        self.min_size = max(2, min_size)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any):
        if inputs.ndim != 5 or inputs.shape[1] != 1:
            raise ValueError(f"Slab25DInferer expects (B, 1, H, W, D) volumes, got {tuple(inputs.shape)}")
        h, w = inputs.shape[2:4]
        check_volume_size(inputs, self.min_size)
        k = self.divisible_by
        ph, pw = (-h) % k, (-w) % k
        outs = []
        for vol in torch.as_tensor(inputs):
            slabs = F.pad(volume_to_slabs(vol), (0, pw, 0, ph))  # (D, 3, H', W')
            logits = torch.cat([network(chunk, *args, **kwargs)
                                for chunk in torch.split(slabs, self.slices_per_batch)], dim=0)
            outs.append(logits[:, :, :h, :w].permute(1, 2, 3, 0))  # (C, H, W, D)
        out = torch.stack(outs)
        if isinstance(inputs, MetaTensor):
            out = MetaTensor(out, meta=inputs.meta, applied_operations=inputs.applied_operations)
        return out
