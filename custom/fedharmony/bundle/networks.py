"""The bundles' networks: built from a bundle's configs (:func:`build_network`, no data needed), and the
network settings a user picks by name (no NVFlare import).

``norm`` names the normalization layer of the bundle's MONAI UNet / classifier:

* ``batch``: MONAI's batch norm (learned affine, running statistics for evaluation), the default.
* ``batch_stats_only``: batch norm without affine parameters or running statistics, so it
  normalizes with the current batch's statistics in training *and* evaluation, as the released
  HarmoFL networks do (``BatchNorm2d(affine=False, track_running_stats=False)``). Scores then
  depend on how inference batches slices (the inferer's ``slices_per_batch``), and FedBN-style
  methods have no norm parameters to keep local.

Example::

    >>> norm_layer("batch")
    'batch'
    >>> norm_layer("batch_stats_only")
    ('batch', {'affine': False, 'track_running_stats': False})
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["NORMS", "norm_layer", "ConfigFiles", "config_paths", "bundle_parser", "build_network"]

ConfigFiles = Union[str, Sequence[str]]

NORMS = {
    "batch": "batch",
    "batch_stats_only": ("batch", {"affine": False, "track_running_stats": False}),
}


def norm_layer(name: str) -> Union[str, Tuple[str, dict]]:
    """MONAI's ``norm`` argument for the setting ``name`` (see the module docstring).

    Raises:
        ValueError: ``name`` is not one of :data:`NORMS`.
    """
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; choose one of {sorted(NORMS)}")
    spec = NORMS[name]
    return (spec[0], dict(spec[1])) if isinstance(spec, tuple) else spec


def config_paths(bundle_root: str, config_file: ConfigFiles) -> List[str]:
    """Bundle config file(s), relative to ``bundle_root``, as existing absolute paths (later files override)."""
    files = [config_file] if isinstance(config_file, str) else list(config_file)
    paths = [Path(bundle_root) / f for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise FileNotFoundError(f"bundle config not found: {missing or files}")
    return [str(p) for p in paths]


def bundle_parser(bundle_root: str, config_file: ConfigFiles = "configs/train.json", overrides: Optional[dict] = None):
    """MONAI's ``ConfigParser`` over the bundle's config file(s), layered, with ``bundle_root`` and ``overrides`` set
    (nothing is instantiated until asked)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_paths(bundle_root, config_file))
    parser["bundle_root"] = str(bundle_root)
    for k, v in (overrides or {}).items():
        parser[k] = v
    return parser


def build_network(bundle_root: str, config_file: ConfigFiles = "configs/train.json", key: str = "network_def",
                  overrides: Optional[dict] = None, seed: Optional[int] = 0) -> torch.nn.Module:
    """Instantiate the bundle's network definition (no data needed; used by the server).

    ``overrides`` are the same config overrides the sites get (e.g. ``base_features``),
    so server and sites build the same architecture; ``seed`` makes the initial weights
    reproducible (None leaves torch's RNG alone).
    """
    parser = bundle_parser(bundle_root, config_file, overrides)
    if key not in parser:
        raise KeyError(f"{config_paths(bundle_root, config_file)} has no {key!r}")
    if seed is not None:
        torch.manual_seed(seed)
    return parser.get_parsed_content(key)
