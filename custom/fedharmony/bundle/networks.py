"""Network settings of the bundles that a user picks by name (no NVFlare import).

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

from typing import Tuple, Union

__all__ = ["NORMS", "norm_layer"]

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
