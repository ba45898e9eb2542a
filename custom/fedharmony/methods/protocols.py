"""The papers' protocols and the released code's, one switch per method (no NVFlare import).

``protocol="paper"`` (the default everywhere) is what the papers describe and what this
package does by default. ``protocol="released"`` reproduces the choices the authors' released
code makes where it differs, so a result can be set against theirs:

=========  ===========================================================================
method     ``released`` sets
=========  ===========================================================================
harmofl    amplitude normalization ``released`` (DC only, target frozen at the first
           batch); every site's training set cut to the smallest site's size; uniform
           averaging of all weights and of the amplitude target; the released input
           scaling (``intensity=released``: 99th-percentile clip, 0-255); the released
           network normalization (``norm=batch_stats_only``: batch norm without affine,
           batch statistics in evaluation) and plain conv blocks (``num_res_units=0``).
           The optimizer, learning rate and rounds stay the bundle's / the job's.
prrfl      the half-open low-frequency box ``[c - b, c + b)`` (``prrfl_box=half_open``) and
           the distillation KL with ``batchmean`` reduction (``prrfl_kl_reduction``: summed
           over pixels, divided by the batch size; the same as ours for classification).
           Not built: the released SGD schedule (lr 1e-2, halved every 5 rounds).
iopfl      nothing at training time: the released choices are test-time ones, methods of
           the bundle's ``configs/routed_inference.json`` (``method=routing_released``,
           ``adaptation#entropy=released``).
=========  ===========================================================================

Example::

    >>> released_bundle_overrides("harmofl", max_train_cases=7)["max_train_cases"]
    7
    >>> released_bundle_overrides("prrfl", max_train_cases=7)
    {'prrfl_kl_reduction': 'batchmean'}
"""

from __future__ import annotations

from typing import Dict

__all__ = ["PROTOCOLS", "RELEASED_METHODS", "check_protocol", "released_bundle_overrides", "needs_smallest_site",
           "merge_protocol_overrides"]

PROTOCOLS = ("paper", "released")

# the bundle settings of each method's released protocol (the recipe adds its own server-side choices)
_RELEASED_BUNDLE: Dict[str, Dict[str, object]] = {
    "harmofl": {"amp_mode": "released", "intensity": "released", "norm": "batch_stats_only", "num_res_units": 0},
    "prrfl": {"prrfl_kl_reduction": "batchmean"},
}
RELEASED_METHODS = tuple(_RELEASED_BUNDLE)
_CUT_TO_SMALLEST = ("harmofl",)
_ELSEWHERE = {
    "iopfl": "IOP-FL's released choices are test-time ones: configs/routed_inference.json with "
             "method=routing_released and adaptation#entropy=released",
}


def check_protocol(protocol: str, method: str) -> str:
    """``protocol`` if ``method`` has it; a ValueError naming what exists otherwise."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")
    if protocol == "released" and method not in _RELEASED_BUNDLE:
        raise ValueError(f"{method} has no released protocol"
                         + (f" ({_ELSEWHERE[method]})" if method in _ELSEWHERE else "")
                         + f"; methods with one: {', '.join(RELEASED_METHODS)}")
    return protocol


def released_bundle_overrides(method: str, *, max_train_cases: int) -> Dict[str, object]:
    """The bundle overrides of ``method``'s released protocol; ``max_train_cases`` is the smallest site's
    training-set size (used by the methods whose released code cuts every site to it)."""
    check_protocol("released", method)
    out = dict(_RELEASED_BUNDLE[method])
    if method in _CUT_TO_SMALLEST:
        if isinstance(max_train_cases, bool) or not isinstance(max_train_cases, int) or max_train_cases < 1:
            raise ValueError(f"{method}'s released protocol cuts every site's training set to the smallest site's "
                             f"size: max_train_cases must be an integer >= 1, got {max_train_cases!r}")
        out["max_train_cases"] = max_train_cases
    return out


def needs_smallest_site(method: str) -> bool:
    """Whether ``method``'s released protocol needs the smallest site's training-set size."""
    return method in _CUT_TO_SMALLEST


def merge_protocol_overrides(overrides: Dict[str, object], protocol_overrides: Dict[str, object],
                             protocol: str = "released") -> Dict[str, object]:
    """``overrides`` with the protocol's; an id the user set to another value is refused (naming both)."""
    clash = {k: (overrides[k], v) for k, v in protocol_overrides.items() if k in overrides and overrides[k] != v}
    if clash:
        raise ValueError(f"protocol {protocol!r} sets " + ", ".join(f"{k}={v!r} (given {u!r})"
                                                                     for k, (u, v) in sorted(clash.items())))
    return {**overrides, **protocol_overrides}
