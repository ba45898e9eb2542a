"""MONAI transforms of the volumes' path to a 2.5D network: one geometry for every scan, one volume per
input, and three adjacent axial slices as three channels."""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (AsDiscreted, Compose, EnsureTyped, Identityd, MapTransform, Orientationd, RandRotated,
                              RandZoomd, Resized, ResizeWithPadOrCropd, Spacingd)

from fedharmony.bundle.folder_inference import InputRejected


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


class LabelClassesd(MapTransform):
    """A stored label as the network's classes: ``num_classes`` 2 makes any label > 0 foreground (a threshold at
    0.5, MONAI ``AsDiscreted``: a zonal prostate mask holding 1 and 2 becomes the gland, as before this transform
    existed); more classes keep the label values 0 .. num_classes - 1 (a grey / white matter map: 0, 1, 2), rounded
    to integers, and refuse a value outside that range, naming the file, since the loss would read it as another
    class.

    Example::

        >>> LabelClassesd("label", num_classes=3)({"label": torch.tensor([[0.0, 1.0, 2.0]])})["label"]
        tensor([[0., 1., 2.]])
    """

    def __init__(self, keys: KeysCollection, num_classes: int = 2, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2 (background included), got {num_classes!r}")
        self.num_classes = num_classes
        self._binary = AsDiscreted(keys, threshold=0.5, allow_missing_keys=allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        if self.num_classes == 2:
            return self._binary(data)
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key] if isinstance(d[key], torch.Tensor) else torch.as_tensor(d[key])
            label = torch.round(value.float())  # a MetaTensor keeps its metadata and applied operations
            low, high = float(label.min()), float(label.max())
            if low < 0 or high > self.num_classes - 1:
                where = getattr(value, "meta", {}).get("filename_or_obj", key)
                raise ValueError(f"{where}: label values {low:g} to {high:g}, but num_classes {self.num_classes} "
                                 f"takes 0 to {self.num_classes - 1}")
            d[key] = label
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


class VolumeGeometryd(Compose):
    """One geometry for every scan before a 2.5D network, whatever the storage: RAS, in-plane spacing, in-plane size.

    Steps (all invertible: ``Invertd`` over the preprocessing puts a prediction back on its input's
    grid, shape, affine and orientation):

    1. ``Orientationd(axcodes="RAS")``: a volume stored LPS, LAS or with its axes permuted reaches the
       network as the RAS volume would, so it gets the same segmentation in world space; the slice
       axis is the last one (superior).
    2. with ``pixdim > 0``: ``Spacingd`` to ``pixdim`` mm in-plane, slice spacing kept (a 2.5D network
       sees neighbouring slices as they were acquired); then, with ``image_size > 0``,
       ``ResizeWithPadOrCropd`` to ``image_size`` x ``image_size`` around the centre: a fixed field of
       view of ``image_size * pixdim`` mm, so the anatomy has one scale in pixels at every site.
       With ``pixdim <= 0`` and ``image_size > 0``: ``Resized`` in-plane to ``image_size`` (each scan's
       own field of view squeezed onto one grid: the scale follows the field of view).
       With both off, the in-plane grid is the scan's own (the inferer pads it to the network's stride).

    Args:
        image_keys: image keys (resampled linearly; ``Resized`` uses area averaging).
        label_keys: label keys (nearest neighbour).
        pixdim: target in-plane spacing in mm; 0 or less keeps each scan's spacing.
        image_size: in-plane size in pixels; -1 keeps the size the spacing step gives. A multiple of
            ``divisible_by`` so that the network's pooling levels line up.
        divisible_by: the network's total stride.
        min_size: refuse (:class:`~fedharmony.bundle.folder_inference.InputRejected`) a scan whose
            stored in-plane size, after orientation, is below ``min_size`` pixels: resampling would
            invent the detail a network needs. 0 (default) checks nothing.

    Example::

        >>> geometry = VolumeGeometryd("image", "label", pixdim=1.0, image_size=160)
        >>> out = geometry({"image": image, "label": label})   # (1, H, W, D) MetaTensors
        >>> out["image"].shape[1:3]
        torch.Size([160, 160])
    """

    def __init__(self, image_keys: KeysCollection, label_keys: KeysCollection = (), pixdim: float = 0.0,
                 image_size: int = -1, divisible_by: int = 16, min_size: int = 0):
        image_keys = [image_keys] if isinstance(image_keys, str) else list(image_keys)
        label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
        keys = image_keys + label_keys
        pixdim, image_size = float(pixdim), int(image_size)
        if image_size > 0 and image_size % divisible_by:
            raise ValueError(f"image_size {image_size} must be a multiple of {divisible_by} (the network's stride), "
                             f"e.g. {image_size + (-image_size) % divisible_by}")
        if not (pixdim == pixdim) or pixdim > 100:  # NaN, or metres given as millimetres
            raise ValueError(f"pixdim must be an in-plane spacing in mm (0 = keep each scan's), got {pixdim}")
        # the steps tolerate a missing key: Invertd inverts them on a dict holding only the prediction (MONAI's
        # allow_missing_keys_mode does not reach inside a Compose subclass); a missing input still fails later
        # labels spelled out: MONAI's default is to change to the meta-tensor's space; RAS means RAS here
        steps = [Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True)]
        if min_size > 0:
            steps.append(_RequireInPlaneSize(image_keys, min_size, allow_missing_keys=True))
        if pixdim > 0:
            steps.append(Spacingd(keys, pixdim=(pixdim, pixdim, -1.0),
                                  mode=["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys),
                                  allow_missing_keys=True))
            if image_size > 0:
                steps.append(ResizeWithPadOrCropd(keys, spatial_size=(image_size, image_size, -1),
                                                  allow_missing_keys=True))
        elif image_size > 0:
            steps.append(Resized(keys, spatial_size=(image_size, image_size, -1),
                                 mode=["area"] * len(image_keys) + ["nearest"] * len(label_keys),
                                 allow_missing_keys=True))
        super().__init__(steps)
        self.pixdim, self.image_size = pixdim, image_size


class _RequireInPlaneSize(MapTransform):
    """Refuse a (C, H, W, D) scan smaller than ``min_size`` in-plane, naming its file (not invertible: checks only)."""

    def __init__(self, keys: KeysCollection, min_size: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.min_size = int(min_size)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        for key in self.key_iterator(data):
            x = data[key]
            h, w = x.shape[1:3]
            if h < self.min_size or w < self.min_size:
                name = x.meta.get("filename_or_obj", key) if isinstance(x, MetaTensor) else key
                raise InputRejected(f"{name} is {h} x {w} in-plane; the network needs at least "
                                    f"{self.min_size} x {self.min_size}")
        return dict(data)


class SelectVolumed(MapTransform):
    """Keep one volume of a multi-volume (4-D) input, or refuse it by name.

    After ``EnsureChannelFirstd`` a 4-D series (diffusion, dynamic, multi-echo) is (T, H, W, D). The
    network takes one volume: with ``index`` set, that volume is kept as (1, H, W, D); with
    ``index=None`` the input is refused with a message that says how many volumes it has and which
    setting picks one. Single volumes pass unchanged.
    """

    def __init__(self, keys: KeysCollection, index: int | None = None, setting: str = "volume_index",
                 allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.index, self.setting = index, setting

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            n = x.shape[0]
            if n == 1:
                continue
            name = x.meta.get("filename_or_obj", key) if isinstance(x, MetaTensor) else key
            if self.index is None:
                raise InputRejected(f"{name} holds {n} volumes (a 4-D series, shape {tuple(x.shape)}); "
                                    f"set {self.setting} to the one to use (0 to {n - 1})")
            if not -n <= self.index < n:
                raise InputRejected(f"{name} holds {n} volumes; {self.setting}={self.index} is not one of them")
            d[key] = x[self.index:self.index + 1] if self.index >= 0 else x[n + self.index:n + self.index + 1]
        return d


# spatial_augmentation recipes: "none" is the training before bundle 0.14.0 (flip and intensity jitter only)
SPATIAL_AUGMENTATIONS = ("zoom_rotate", "none")
ZOOM_RANGE = (0.7, 1.4)  # nnU-Net's default scale range: the anatomy 0.7x to 1.4x its size in pixels
ROTATE_DEG = 15.0
SPATIAL_PROB = 0.5


def spatial_augmentation(recipe: str, image_keys: KeysCollection, label_keys: KeysCollection = ()):
    """The in-plane spatial augmentation of a 2.5D training sample, by recipe name (the bundle's
    ``spatial_augmentation``).

    * ``"zoom_rotate"``: with probability 0.5 an isotropic in-plane zoom by a factor drawn from 0.7 to 1.4 (the
      anatomy as it would look with pixels 1/1.4 = 0.71x to 1/0.7 = 1.43x the size; the sample keeps its size,
      edges replicated or cropped), then with probability 0.5 a rotation by up to 15 degrees either way;
      images bilinear, labels nearest. A model trained on one pixel size otherwise learns the anatomy's size in
      pixels and loses it when a scanner's matrix or field of view differs.
    * ``"none"``: no spatial change (the recipe before bundle 0.14.0: flips and intensity jitter only).

    Put it last in the random part of the training transforms: MONAI's ``Compose`` seeds its random transforms
    in order, so the transforms before it draw the same numbers under either recipe, and ``"none"`` reproduces
    the earlier training exactly.

    Args:
        recipe: one of :data:`SPATIAL_AUGMENTATIONS`.
        image_keys: keys of (C, H, W) images (2.5D samples: C = 3 slices).
        label_keys: keys of (1, H, W) labels.

    Returns:
        A MONAI transform: a ``Compose`` of ``RandZoomd`` and ``RandRotated`` (plain tensors out), or ``Identityd``.

    Example::

        >>> aug = spatial_augmentation("zoom_rotate", "image", "label")
        >>> _ = aug.set_random_state(0)
        >>> out = aug({"image": torch.rand(3, 96, 96), "label": torch.zeros(1, 96, 96)})
        >>> tuple(out["image"].shape), tuple(out["label"].shape)
        ((3, 96, 96), (1, 96, 96))
    """
    image_keys = [image_keys] if isinstance(image_keys, str) else list(image_keys)
    label_keys = [label_keys] if isinstance(label_keys, str) else list(label_keys)
    keys = image_keys + label_keys
    if recipe == "none":
        return Identityd(keys=keys)
    if recipe != "zoom_rotate":
        raise ValueError(f"spatial_augmentation must be one of {list(SPATIAL_AUGMENTATIONS)}, got {recipe!r}")
    modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys)
    return Compose([
        RandZoomd(keys, prob=SPATIAL_PROB, min_zoom=ZOOM_RANGE[0], max_zoom=ZOOM_RANGE[1], mode=modes,
                  padding_mode="edge", keep_size=True),
        RandRotated(keys, range_x=math.radians(ROTATE_DEG), prob=SPATIAL_PROB, mode=modes, padding_mode="border",
                    keep_size=True),
        EnsureTyped(keys, track_meta=False),  # plain tensors, as SlabToChannelsd leaves them: a 2-D sample has no affine
    ])


__all__: Sequence[str] = ["VolumeGeometryd", "SelectVolumed", "SlabToChannelsd", "LabelClassesd", "volume_to_slabs",
                          "spatial_augmentation", "SPATIAL_AUGMENTATIONS"]
