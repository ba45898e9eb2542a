"""The geometry a global model was trained at travels in its checkpoint, so inference resamples as the sites did.

A 2.5D network learns the anatomy at one size in pixels. The bundle's ``pixdim`` (target in-plane spacing, mm;
0: each scan's own) and ``image_size`` (in-plane crop, pixels; -1: none) decide that size, and inference must use
the training's values: the same scans at another spacing can lose the whole gland. A federation's server writes
them into every global checkpoint it saves (:class:`fedharmony.fl.persistor.BundleModelPersistor`), in NVFlare's
``meta_props`` entry::

    torch.load("FL_global_model.pt", weights_only=True)["meta_props"]["preprocessing"]
    {"pixdim": 0.594, "image_size": 96, "source": "fingerprint"}

``source`` says where they came from: ``fingerprint`` (chosen before round 1 from the sites' data fingerprints,
:mod:`fedharmony.fl.fingerprint`) or ``bundle config`` (the job's bundle settings, hand-set overrides included).

The bundle's ``inference.json`` reads them back with :func:`inference_geometry`:

* the config's values equal the checkpoint's: used;
* the config is at "each scan as stored" (``pixdim`` 0, ``image_size`` -1, the inference default) and the
  checkpoint says otherwise: the checkpoint's are used, and the log says so;
* the config asks for other values: refused, naming both, unless ``check_geometry`` is false (an experiment on
  purpose: the log warns).

A checkpoint without the entry (a site's own ``models/model.pt``, an older global model) leaves the config's values
as they are. What a checkpoint says is data: read with ``torch.load(weights_only=True)`` and checked
(:func:`check_geometry`), never evaluated.

Example::

    >>> geometry = inference_geometry("FL_global_model.pt", pixdim=0.0, image_size=-1)
    >>> geometry
    {'pixdim': 0.594, 'image_size': 96}
"""

from __future__ import annotations

import logging
import math
import os
from typing import Mapping, Optional

__all__ = ["META_KEY", "GEOMETRY_KEYS", "AS_STORED", "GeometryMismatch", "check_geometry", "read_trained_geometry",
           "inference_geometry", "config_geometry"]

META_KEY = "preprocessing"
GEOMETRY_KEYS = ("pixdim", "image_size")
AS_STORED = {"pixdim": 0.0, "image_size": -1}  # each scan at its own grid: the inference config's default

logger = logging.getLogger("fedharmony.inference")


class GeometryMismatch(ValueError):
    """The inference settings ask for another geometry than the checkpoint was trained at."""


def check_geometry(value, where: str) -> dict:
    """``{"pixdim": float, "image_size": int}`` from ``value``, checked as data.

    Raises:
        ValueError: not a mapping, a key missing, ``pixdim`` not a finite number >= 0, or ``image_size`` not -1 or a
            positive integer; the message names ``where`` and the field.
    """
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: the training geometry must be a mapping, got {type(value).__name__}")
    out = {}
    for key in GEOMETRY_KEYS:
        if key not in value:
            raise ValueError(f"{where}: the training geometry has no {key!r}")
    pixdim, size = value["pixdim"], value["image_size"]
    if isinstance(pixdim, bool) or not isinstance(pixdim, (int, float)) or not math.isfinite(pixdim) or pixdim < 0:
        raise ValueError(f"{where}: pixdim must be a finite number >= 0 (mm; 0 keeps each scan's spacing), "
                         f"got {pixdim!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or size > 0):
        raise ValueError(f"{where}: image_size must be -1 or a positive integer (pixels), got {size!r}")
    out["pixdim"], out["image_size"] = float(pixdim), int(size)
    return out


def read_trained_geometry(ckpt_path: str) -> Optional[dict]:
    """The training geometry a checkpoint records (``meta_props.preprocessing``), checked; None when it records
    none or the file is not there (the checkpoint loader then reports it).

    Raises:
        ValueError: the file is not a checkpoint ``torch.load(weights_only=True)`` reads, or its entry is malformed.
    """
    import torch

    if not ckpt_path or not os.path.isfile(ckpt_path):
        return None
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{ckpt_path}: not a checkpoint that loads as data ({type(e).__name__}: {e})") from e
    meta = checkpoint.get("meta_props") if isinstance(checkpoint, Mapping) else None
    if not isinstance(meta, Mapping) or META_KEY not in meta:
        return None
    recorded = meta[META_KEY]
    geometry = check_geometry(recorded, f"{ckpt_path}: meta_props.{META_KEY}")
    if isinstance(recorded, Mapping) and isinstance(recorded.get("source"), str):
        geometry["source"] = recorded["source"]
    return geometry


def inference_geometry(ckpt_path: str, pixdim: float = 0.0, image_size: int = -1, check: bool = True) -> dict:
    """The ``pixdim`` / ``image_size`` inference uses with the checkpoint ``ckpt_path`` (rules in the module
    docstring).

    Raises:
        GeometryMismatch: the config asks for another geometry than the checkpoint records, and ``check``.
    """
    given = check_geometry({"pixdim": pixdim, "image_size": image_size}, "inference settings")
    trained = read_trained_geometry(ckpt_path)
    if trained is None:
        return given
    source = trained.pop("source", "the checkpoint")
    if given == trained:
        return given
    if given == AS_STORED:
        logger.info("geometry from %s (trained at it; source: %s): pixdim %g mm, image_size %d", ckpt_path, source,
                    trained["pixdim"], trained["image_size"])
        return trained
    if check:
        raise GeometryMismatch(
            f"{ckpt_path} was trained at pixdim {trained['pixdim']:g}, image_size {trained['image_size']} "
            f"(source: {source}); the inference settings ask for pixdim {given['pixdim']:g}, image_size "
            f"{given['image_size']}: drop --pixdim / --image_size to use the checkpoint's, or set "
            f"--check_geometry false to run at other values on purpose")
    logger.warning("geometry: %s was trained at pixdim %g, image_size %d; running at pixdim %g, image_size %d "
                   "(check_geometry false)", ckpt_path, trained["pixdim"], trained["image_size"], given["pixdim"],
                   given["image_size"])
    return given


def config_geometry(parser) -> Optional[dict]:
    """``pixdim`` / ``image_size`` of a resolved bundle config (a MONAI ``ConfigParser``), or None when the bundle has
    no such settings (the classification bundle) or they are not plain numbers."""
    if not all(key in parser for key in GEOMETRY_KEYS):
        return None
    try:
        return check_geometry({key: parser.get_parsed_content(key) for key in GEOMETRY_KEYS}, "bundle config")
    except ValueError:
        return None
