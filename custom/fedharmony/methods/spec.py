"""What a federated method declares about itself, once (no NVFlare, no torch import).

Each method package (``fedharmony/methods/<name>/__init__.py``) exports one :class:`MethodSpec`
named ``SPEC``. Everything else that needs to know about a method reads it from there:

* the registry (:data:`fedharmony.methods.METHODS`, :data:`fedharmony.methods.SPECS`);
* the job scripts' flags and help (:mod:`fedharmony.fl.cli`): one flag per :class:`Setting`,
  ``--`` + its name with ``-`` for ``_``;
* the recipe's validation (:class:`fedharmony.fl.recipe.BundleRecipe`): a setting's type, range
  and choices, checked where the job is built; which bundle kinds the method runs on; whether a
  site that runs no job code may run it;
* where a setting's value goes (:attr:`Setting.goes_to`): the site method's keyword argument, the
  bundle config id of the same name, or the method's server side. The name is the same from the
  flag to the override (``--amp-ratio`` -> ``amp_ratio`` -> bundle id ``amp_ratio``);
* the allow-listed server components (:data:`fedharmony.fl.SERVER_COMPONENTS`);
* the method table (``python -m fedharmony methods``, ``docs/architecture.md``).

Example::

    >>> s = Setting("mu", float, 0.01, "proximal strength", minimum=0.0, exclusive_minimum=True)
    >>> s.flag, s.check(0.1), s.range_text()
    ('--mu', 0.1, '> 0')
    >>> s.check(0)
    Traceback (most recent call last):
    ...
    ValueError: mu must be > 0, got 0
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

__all__ = ["Setting", "MethodSpec", "BUNDLE_KINDS", "GOES_TO"]

BUNDLE_KINDS = ("segmentation", "classification")
GOES_TO = ("site", "bundle", "server")


@dataclass(frozen=True)
class Setting:
    """One setting of a method.

    Attributes:
        name: the one name: the recipe's keyword, the flag (``--`` + name with ``-``), the site
            method's keyword or the bundle config id.
        type: ``float``, ``int``, ``str`` or ``bool``.
        default: the value when the job does not give one; None: the bundle's own value
            (``goes_to="bundle"``) or the method's (documented in ``help``).
        help: one line for ``--help`` and the docs.
        goes_to: ``site`` (a keyword of the method's site class, sent with the job), ``bundle`` (a bundle
            config override of the same id, checked against the bundle's tunables) or ``server``
            (read by the method's recipe only).
        choices: the allowed values of a ``str`` setting.
        minimum, maximum: the range of a number; ``exclusive_*``: the bound itself is outside it.
        multiple_of: a whole number must be a multiple of this (a network's down-sampling factor).
    """

    name: str
    type: type
    default: object = None
    help: str = ""
    goes_to: str = "site"
    choices: Tuple[str, ...] = ()
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    multiple_of: Optional[int] = None

    def __post_init__(self):
        if self.type not in (float, int, str, bool):
            raise TypeError(f"setting {self.name!r}: type must be float, int, str or bool, got {self.type!r}")
        if self.goes_to not in GOES_TO:
            raise ValueError(f"setting {self.name!r}: goes_to must be one of {GOES_TO}, got {self.goes_to!r}")
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ValueError(f"setting name {self.name!r} must be a lower-case identifier")
        if self.default is not None:
            self.check(self.default)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        """The allowed values in words: ``[0, 0.5]``, ``> 0``, ``paper | released | off``, ``true | false``."""
        if self.choices:
            return " | ".join(self.choices)
        if self.type is bool:
            return "true | false"
        lo, hi = self.minimum, self.maximum
        if lo is not None and hi is not None:
            text = f"{'(' if self.exclusive_minimum else '['}{lo:g}, {hi:g}{')' if self.exclusive_maximum else ']'}"
        elif lo is not None:
            text = f"{'>' if self.exclusive_minimum else '>='} {lo:g}"
        elif hi is not None:
            text = f"{'<' if self.exclusive_maximum else '<='} {hi:g}"
        else:
            text = "any"
        return text + (f", a multiple of {self.multiple_of}" if self.multiple_of else "")

    def check(self, value):
        """``value`` if it has the setting's type and lies in its range (an int is a float); else ValueError."""
        bad = f"{self.name} must be"
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{bad} true or false, got {value!r}")
            return value
        if self.type is str:
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise ValueError(f"{bad} one of {list(self.choices)}, got {value!r}" if self.choices
                                 else f"{bad} a string, got {value!r}")
            return value
        numeric = (int,) if self.type is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric) or not math.isfinite(value):
            raise ValueError(f"{bad} {'a whole number' if self.type is int else 'a finite number'}, got {value!r}")
        lo, hi = self.minimum, self.maximum
        if ((lo is not None and (value < lo or (self.exclusive_minimum and value == lo)))
                or (hi is not None and (value > hi or (self.exclusive_maximum and value == hi)))
                or (self.multiple_of and value % self.multiple_of)):
            text = self.range_text()
            raise ValueError(f"{bad} {'in ' if text[0] in '([' else ''}{text}, got {value!r}")
        return self.type(value)


@dataclass(frozen=True)
class MethodSpec:
    """A method, as the rest of the package sees it.

    Attributes:
        name: the registry name (``fedprox``): the job's ``--algorithm``, the package's folder.
        summary: what it is, in one line with its paper (the method table).
        site: dotted path of its :class:`fedharmony.methods.base.SiteMethod` subclass.
        recipe: dotted path of its NVFlare recipe (a :class:`fedharmony.fl.recipe.BundleRecipe` subclass).
        settings: its own settings, in flag order.
        server_components: dotted paths of the server classes its jobs name beyond the common ones
            (allow-listed on servers that run no job code).
        bundle_kinds: the bundle kinds it trains (``segmentation``, ``classification``: the bundle's
            ``network_data_format.outputs.pred.format``).
        no_code: a site that runs no job code may run it (it needs nothing the installed package lacks).
    """

    name: str
    summary: str
    site: str
    recipe: str
    settings: Tuple[Setting, ...] = ()
    server_components: Tuple[str, ...] = ()
    bundle_kinds: Tuple[str, ...] = BUNDLE_KINDS
    no_code: bool = True

    def __post_init__(self):
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name!r}: a setting is declared twice: {names}")
        unknown = set(self.bundle_kinds) - set(BUNDLE_KINDS)
        if unknown or not self.bundle_kinds:
            raise ValueError(f"method {self.name!r}: bundle_kinds must be some of {BUNDLE_KINDS}, got {self.bundle_kinds}")

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise KeyError(f"{name!r} is not a setting of {self.name}; its settings: {[s.name for s in self.settings]}")

    def resolve(self, given: Mapping[str, object]) -> Dict[str, object]:
        """Every setting's value: the given one (checked) or the default. An unknown name is refused with the
        method's own settings listed."""
        foreign = sorted(set(given) - {s.name for s in self.settings})
        if foreign:
            raise ValueError(f"{foreign} {'is not a setting' if len(foreign) == 1 else 'are not settings'} of "
                             f"{self.name}; its own settings: {sorted(s.name for s in self.settings)}")
        values = {}
        for s in self.settings:
            value = given.get(s.name)
            if value is None:
                values[s.name] = s.default
                continue
            try:
                values[s.name] = s.check(value)
            except ValueError as e:
                raise ValueError(f"{self.name}: {e}") from None
        return values

    def going_to(self, where: str, values: Mapping[str, object]) -> Dict[str, object]:
        """The values (None dropped) of the settings that go to ``where`` (``site``, ``bundle``, ``server``)."""
        return {s.name: values[s.name] for s in self.settings if s.goes_to == where and values.get(s.name) is not None}
