"""The papers' protocols and the released code's, one switch per method (no NVFlare import).

``protocol="paper"`` (the default everywhere) is what the papers describe and what this
package does by default. ``protocol="released"`` reproduces the choices the authors' released
code makes where it differs, so a result can be set against theirs.

Each method states its own released protocol, next to the rest of its definition:

* the bundle settings, on its site class (:class:`fedharmony.methods.base.SiteMethod`):
  ``released_settings`` and ``released_cuts_to_smallest_site``;
* the server-side choices, in its recipe (``fedharmony/methods/<name>/server.py``), which reads
  ``self.protocol`` (set by :class:`fedharmony.fl.recipe.BundleRecipe`).

=========  ===========================================================================
method     ``released`` sets
=========  ===========================================================================
harmofl    site: amplitude normalization ``released`` (DC only, target frozen at the
           first batch), the 0-255 input (``intensity=released``), batch norm without
           affine or running statistics (``norm=batch_stats_only``), plain conv blocks
           (``num_res_units=0``), every site cut to the smallest site's training-set
           size (``max_train_cases``). Server: the uniform mean of every weight and of
           the amplitude target. The optimizer, learning rate and rounds stay the
           bundle's / the job's.
prrfl      site: the distillation KL with ``batchmean`` reduction
           (``prrfl_kl_reduction``: summed over pixels, divided by the batch size; the
           same as ours for classification); the released optimizer: SGD without
           momentum, lr 1e-2, weight decay 1e-6, halved every 5 rounds, built anew each
           round (``optimizer_name``, ``lr_round_gamma``, ``lr_round_step``,
           ``optimizer_reset_each_round``; :mod:`fedharmony.bundle.optim`). Server: the
           half-open low-frequency box ``[c - b, c + b)``.
iopfl      nothing at training time (``released_elsewhere``): its released choices are
           test-time options of the bundle's ``configs/routed_inference.json``.
=========  ===========================================================================

This module only reads those attributes (through the registry) and merges them with a job's
overrides. Example::

    >>> released_bundle_overrides("harmofl", max_train_cases=7)["max_train_cases"]
    7
    >>> released_bundle_overrides("prrfl", max_train_cases=7)["optimizer_name"]
    'sgd'
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

__all__ = ["PROTOCOLS", "released_methods", "check_protocol", "released_bundle_overrides", "needs_smallest_site",
           "merge_protocol_overrides", "protocol_overrides"]

PROTOCOLS = ("paper", "released")


def _site_class(method: str):
    from fedharmony.methods import site_method_class  # the registry imports this package: import late

    return site_method_class(method)


def released_methods() -> Tuple[str, ...]:
    """The registry's methods that have a released protocol."""
    from fedharmony.methods import METHODS

    return tuple(m for m in METHODS if _site_class(m).released_settings is not None)


def check_protocol(protocol: str, method: str) -> str:
    """``protocol`` if ``method`` has it; a ValueError naming what exists otherwise."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if protocol == "released":
        site_cls = _site_class(method)
        if site_cls.released_settings is None:
            raise ValueError(f"{method} has no released protocol"
                             + (f" ({site_cls.released_elsewhere})" if site_cls.released_elsewhere else "")
                             + f"; methods with one: {', '.join(released_methods())}")
    return protocol


def needs_smallest_site(method: str) -> bool:
    """Whether ``method``'s released protocol needs the smallest site's training-set size."""
    return bool(_site_class(method).released_cuts_to_smallest_site)


def released_bundle_overrides(method: str, *, max_train_cases: Optional[int]) -> Dict[str, object]:
    """The bundle overrides of ``method``'s released protocol; ``max_train_cases`` is the smallest site's
    training-set size (used by the methods whose released code cuts every site to it; ignored otherwise)."""
    check_protocol("released", method)
    out = dict(_site_class(method).released_settings)
    if needs_smallest_site(method):
        if isinstance(max_train_cases, bool) or not isinstance(max_train_cases, int) or max_train_cases < 1:
            raise ValueError(f"{method}'s released protocol cuts every site's training set to the smallest site's "
                             f"size: max_train_cases must be an integer >= 1, got {max_train_cases!r} (a job script "
                             f"counts it from the sites' data; fedharmony.data.datalist.smallest_split does that)")
        out["max_train_cases"] = max_train_cases
    return out


def merge_protocol_overrides(overrides: Dict[str, object], protocol_overrides: Dict[str, object],
                             protocol: str = "released") -> Dict[str, object]:
    """``overrides`` with the protocol's; an id the user set to another value is refused (naming both)."""
    clash = {k: (overrides[k], v) for k, v in protocol_overrides.items() if k in overrides and overrides[k] != v}
    if clash:
        raise ValueError(f"protocol {protocol!r} sets " + ", ".join(f"{k}={v!r} (given {u!r})"
                                                                     for k, (u, v) in sorted(clash.items())))
    return {**overrides, **protocol_overrides}


def protocol_overrides(method: str, protocol: str, overrides: Dict[str, object],
                       max_train_cases: Optional[int] = None) -> Dict[str, object]:
    """A job's bundle overrides under ``protocol``: ``overrides`` unchanged for ``paper``; for ``released``, merged
    with the method's released settings (a contradicting value is refused). The smallest site's size is
    ``max_train_cases``, else the ``max_train_cases`` already in ``overrides`` (an exported job's sites' data
    is not visible where the job is built, so it is given)."""
    if check_protocol(protocol, method) == "paper":
        return dict(overrides)
    if max_train_cases is None:
        max_train_cases = overrides.get("max_train_cases")
    return merge_protocol_overrides(overrides, released_bundle_overrides(method, max_train_cases=max_train_cases),
                                    protocol)
