"""The federated methods, one subpackage each, and the registry that maps a name to them.

Each ``fedharmony/methods/<name>/`` holds:

* ``site.py``: ``Site`` (e.g. ``FedProxSite``), a :class:`fedharmony.methods.base.SiteMethod` (no NVFlare import):
  what the method does on a site each round;
* ``server.py``: ``Recipe`` (e.g. ``FedProxRecipe``), the method's NVFlare recipe (keyword-only settings, validated
  there), with its server side (aggregator, extra components).

The executor and the site runner name no method: they look the job's method up here. A name
is all a job gives: only the subpackages listed in :data:`METHODS` can be loaded.

=========  ==================================================================  ============
name       what it is                                                          result
=========  ==================================================================  ============
fedavg     sample-weighted mean of site models (McMahan et al. 2017)           global model
fedprox    FedAvg + proximal term mu/2 ||w - w_global||^2 (Li et al. 2020)     global model
fedbn      FedAvg, normalization layers stay on each site (Li et al. 2021)     site models
harmofl    amplitude normalization + weight perturbation (Jiang et al. 2022)   global model
iopfl      FedAvg + per-site moving-average model (Jiang et al. 2023)          site models
prrfl      deputy transfer + progressive Fourier aggregation (Chen et al. 2021) site models
ditto      FedAvg + per-site model pulled towards it (Li et al. 2021)          site models
scaffold   FedAvg + control variates against client drift (Karimireddy 2020)  global model
=========  ==================================================================  ============
"""

from __future__ import annotations

import importlib
from typing import Mapping, Optional, Type

from fedharmony.methods.base import RoundNotes, SiteMethod

__all__ = ["METHODS", "site_method_class", "make_site_method", "recipe_class", "SiteMethod", "RoundNotes"]

METHODS = ("fedavg", "fedprox", "fedbn", "harmofl", "iopfl", "prrfl", "ditto", "scaffold")


def _module(name: str, part: str):
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")
    return importlib.import_module(f"{__name__}.{name}.{part}")


def site_method_class(name: str) -> Type[SiteMethod]:
    """The site side of method ``name`` (a :class:`SiteMethod` subclass)."""
    return _module(name, "site").Site


def make_site_method(name: str, settings: Optional[Mapping[str, object]] = None) -> SiteMethod:
    """A site's method object, from the job's method name and settings (both checked)."""
    return site_method_class(name).from_settings(settings)


def recipe_class(name: str):
    """The NVFlare recipe of method ``name`` (imports NVFlare)."""
    return _module(name, "server").Recipe
