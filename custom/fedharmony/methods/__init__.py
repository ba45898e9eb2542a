"""The federated methods, one subpackage each, and the registry that maps a name to them.

Each ``fedharmony/methods/<name>/`` holds:

* ``__init__.py``: ``SPEC``, the method's one declaration (:class:`fedharmony.methods.spec.MethodSpec`):
  its settings (type, default, range, help, where each goes), its site class, recipe and server
  components, the bundle kinds it trains, whether a site without job code may run it;
* ``site.py``: its :class:`fedharmony.methods.base.SiteMethod` subclass (no NVFlare import): what the
  method does on a site each round;
* ``server.py``: its NVFlare recipe (a :class:`fedharmony.fl.recipe.BundleRecipe` subclass), with its
  server side (aggregator, extra components), where it has one.

Adding a method is that package plus its name in :data:`REGISTRY`; the job scripts' flags, the
recipe's validation, the server allow-list, the tests that run over :data:`METHODS` and the
method table (``python -m fedharmony methods``) follow from ``SPEC``.

The executor and the site runner name no method: they look the job's method up here. A name
is all a job gives: only the subpackages listed in :data:`REGISTRY` can be loaded.
"""

from __future__ import annotations

import importlib
from typing import Dict, Mapping, Optional, Type

from fedharmony.methods.base import RoundNotes, SiteMethod
from fedharmony.methods.spec import MethodSpec, Setting

__all__ = ["REGISTRY", "METHODS", "SPECS", "spec", "site_method_class", "make_site_method", "recipe_class",
           "method_table", "SiteMethod", "RoundNotes", "MethodSpec", "Setting"]

REGISTRY = (  # one line per method: its package under fedharmony/methods/
    "fedavg",
    "fedprox",
    "fedbn",
    "harmofl",
    "iopfl",
    "prrfl",
    "ditto",
    "scaffold",
)


def _load_specs() -> Dict[str, MethodSpec]:
    specs = {}
    for package in REGISTRY:
        found = importlib.import_module(f"{__name__}.{package}").SPEC
        if found.name != package:
            raise ValueError(f"fedharmony.methods.{package}.SPEC is named {found.name!r}, not {package!r}")
        outside = [p for p in (found.site, found.recipe, *found.server_components)
                   if not p.startswith(f"{__name__}.{package}.")]
        if outside:  # a method lives in its own package: what a spec names is imported from there only
            raise ValueError(f"fedharmony.methods.{package}.SPEC names classes outside its package: {outside}")
        specs[package] = found
    owners: Dict[str, str] = {}  # one flag per setting name across the job scripts
    for s in specs.values():
        for setting in s.settings:
            if setting.name in owners:
                raise ValueError(f"setting {setting.name!r} is declared by {owners[setting.name]} and {s.name}: "
                                 f"the job scripts' flags need one name per setting")
            owners[setting.name] = s.name
    return specs


SPECS: Dict[str, MethodSpec] = _load_specs()
METHODS = tuple(SPECS)


def spec(name: str) -> MethodSpec:
    """The declaration of method ``name`` (ValueError naming the choices for an unknown one)."""
    if name not in SPECS:
        raise ValueError(f"unknown method {name!r}; choose one of {METHODS}")
    return SPECS[name]


def _import(dotted: str):
    module, _, attr = dotted.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def site_method_class(name: str) -> Type[SiteMethod]:
    """The site side of method ``name`` (a :class:`SiteMethod` subclass)."""
    return _import(spec(name).site)


def make_site_method(name: str, settings: Optional[Mapping[str, object]] = None) -> SiteMethod:
    """A site's method object, from the job's method name and settings (both checked)."""
    return site_method_class(name).from_settings(settings)


def recipe_class(name: str):
    """The NVFlare recipe of method ``name`` (imports NVFlare)."""
    return _import(spec(name).recipe)


def method_table() -> str:
    """The method table of the docs (markdown), from the specs."""
    rows = ["| method | what it is | each site ends with | settings (flag: type, default, range) | bundles | "
            "no-code sites |", "|---|---|---|---|---|---|"]
    for s in SPECS.values():
        settings = "<br>".join(f"`{x.flag}`: {x.type.__name__}, {_default_text(x)}, {x.range_text()}"
                               for x in s.settings) or "-"
        cells = [s.name, s.summary, site_method_class(s.name).result, settings, ", ".join(s.bundle_kinds),
                 "yes" if s.no_code else "no"]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def _default_text(setting: Setting) -> str:
    if setting.default is not None:
        return str(setting.default).lower() if setting.type is bool else str(setting.default)
    return "the bundle's" if setting.goes_to == "bundle" else "the protocol's"
