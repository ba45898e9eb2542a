"""What a job may ask of a site that has not agreed to run the job's code (no NVFlare import).

A MONAI bundle config is code: MONAI's ``ConfigParser`` evaluates every string that starts
with ``$``, resolves ``@`` references and ``%`` macros, and instantiates every ``_target_``.
So a site that forbids custom code must never parse a config that came with a job, and
must treat the job's bundle overrides as data. This module holds the rules; the NVFlare
components (``fedharmony.fl.executor``, ``fedharmony.fl.persistor``) apply them and the
job builder (``fedharmony.fl.job``) applies them too, so a bad job fails where it is built.

Two modes, decided by the site, never by the job:

* **code-shipping** (research: the simulator, jobs with an ``app/custom`` folder): the job
  brings its code, so a site that runs it has agreed to run anything; the job's bundle copy
  and its overrides are used as they are (``$`` expressions included).
* **no custom code** (production sites whose policy refuses jobs with code): the site runs
  a bundle installed at the site (:func:`site_bundle_root`), chosen by name, and checks the
  version and content digest the job expects (:func:`resolve_installed_bundle`); the job's
  own copy of the configs is never parsed (:func:`check_job_copy` refuses one that differs);
  overrides must be plain values of ids on the bundle's list of tunables
  (:func:`validate_overrides`, list in ``configs/tunables.json``); the data folder comes only
  from the site's own configuration; errors that leave the site carry no absolute path
  (:func:`redact_paths`).

Example::

    >>> tunables = {"learning_rate": Tunable("number", exclusive_minimum=0)}
    >>> validate_overrides({"learning_rate": 1e-3}, tunables)
    {'learning_rate': 0.001}
    >>> validate_overrides({"learning_rate": "$__import__('os').system('id')"}, tunables)
    Traceback (most recent call last):
    ...
    fedharmony.bundle.job_policy.PolicyError: override 'learning_rate': ... starts with '$' (a MONAI expression)...
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

__all__ = [
    "PolicyError", "Tunable", "TUNABLES_FILE", "BUNDLE_ROOT_ENV", "PATH_IDS", "load_tunables",
    "validate_overrides", "check_tunable_values", "bundle_digest", "bundle_version", "site_bundle_root",
    "resolve_installed_bundle", "check_config_files", "check_job_copy", "redact_paths", "is_plain_name", "is_plain_value",
]

TUNABLES_FILE = "configs/tunables.json"
METADATA_FILE = "configs/metadata.json"
BUNDLE_ROOT_ENV = "FEDHARMONY_BUNDLE_ROOT"  # a site's folder of installed bundles
# ids that locate files on the site's disk: never a job's to set when the site runs no job code
PATH_IDS = ("bundle_root", "dataset_dir", "datalist", "ckpt_dir", "output_dir", "data_root", "pool_dir",
            "output_postfix", "logging_file")
EXPRESSION_PREFIXES = {"$": "a MONAI expression", "@": "a MONAI reference", "%": "a MONAI macro"}
TYPES = ("number", "integer", "boolean", "string")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CONFIG_FILE = re.compile(r"^configs/[A-Za-z0-9][A-Za-z0-9_.-]*\.json$")


class PolicyError(ValueError):
    """A job asks for something this site's policy does not allow; the message names what and why."""


@dataclass(frozen=True)
class Tunable:
    """One bundle config id a job may override on a site that runs no job code.

    Args:
        type: ``number`` (int or float), ``integer``, ``boolean`` or ``string``.
        minimum, maximum: inclusive bounds (numbers).
        exclusive_minimum: strict lower bound (numbers), e.g. 0 for a learning rate.
        choices: the allowed values (any type).
        description: what the id does (shown in the docs and in refusals).
    """

    type: str
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    exclusive_minimum: Optional[float] = None
    choices: Optional[tuple] = None
    description: str = ""

    def __post_init__(self):
        if self.type not in TYPES:
            raise ValueError(f"tunable type must be one of {TYPES}, got {self.type!r}")

    def check(self, value) -> Optional[str]:
        """Why ``value`` is not allowed (None: it is)."""
        if self.type == "boolean":
            if not isinstance(value, bool):
                return f"must be true or false, got {type(value).__name__} {value!r}"
        elif self.type == "string":
            if not isinstance(value, str):
                return f"must be a string, got {type(value).__name__} {value!r}"
        else:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return f"must be a {self.type}, got {type(value).__name__} {value!r}"
            if self.type == "integer" and not isinstance(value, int):
                return f"must be an integer, got {value!r}"
            if not math.isfinite(value):
                return f"must be finite, got {value!r}"
            if self.minimum is not None and value < self.minimum:
                return f"must be >= {self.minimum}, got {value!r}"
            if self.maximum is not None and value > self.maximum:
                return f"must be <= {self.maximum}, got {value!r}"
            if self.exclusive_minimum is not None and value <= self.exclusive_minimum:
                return f"must be > {self.exclusive_minimum}, got {value!r}"
        if self.choices is not None and value not in self.choices:
            return f"must be one of {list(self.choices)}, got {value!r}"
        return None


def load_tunables(bundle_dir) -> Dict[str, Tunable]:
    """The bundle's tunable ids (``configs/tunables.json``: ``{id: {"type": ..., ...}}``).

    Raises:
        PolicyError: the file is missing or malformed (a bundle without the list takes no overrides
            from a job that ships no code).
    """
    path = Path(bundle_dir) / TUNABLES_FILE
    if not path.is_file():
        raise PolicyError(f"bundle {Path(bundle_dir).name!r} has no {TUNABLES_FILE}: it declares no tunable ids")
    try:
        raw = json.loads(path.read_text())
        return {k: Tunable(**{f: (tuple(v) if f == "choices" else v) for f, v in spec.items()})
                for k, spec in raw.items() if not k.startswith("_")}
    except (json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
        raise PolicyError(f"bundle {Path(bundle_dir).name!r}: {TUNABLES_FILE} is malformed ({e})") from None


def _refusal(key, value, tunables: Mapping[str, Tunable]) -> Optional[str]:
    if not isinstance(key, str):
        return f"override id {key!r}: ids are strings"
    if key.startswith("_") or "_target_" in key:
        return f"override {key!r}: a config object key, not a value"
    if key in PATH_IDS:
        return (f"override {key!r}: a path on the site's disk; a site takes its data and bundle folders only from "
                f"its own configuration, never from a job")
    if isinstance(value, (dict, list, tuple)):
        return f"override {key!r}: a nested config ({type(value).__name__}); only plain numbers, booleans and strings"
    if value is None or not isinstance(value, (bool, int, float, str)):
        return f"override {key!r}: {type(value).__name__} is not a plain number, boolean or string"
    if isinstance(value, str):
        head = value.lstrip()[:1]
        if head in EXPRESSION_PREFIXES:
            return (f"override {key!r}: the value starts with {head!r} ({EXPRESSION_PREFIXES[head]}), which the site "
                    f"would evaluate; only plain values are accepted")
    if key not in tunables:
        return f"override {key!r}: not on this bundle's list of tunables ({', '.join(sorted(tunables)) or 'none'})"
    why = tunables[key].check(value)
    return f"override {key!r}: {why}" if why else None


def is_plain_value(value) -> bool:
    """A number, boolean or string that MONAI's config parser takes as it is (no ``$``, ``@`` or ``%`` head)."""
    if isinstance(value, str):
        return value.lstrip()[:1] not in EXPRESSION_PREFIXES
    return isinstance(value, (bool, int, float))


def validate_overrides(overrides, tunables: Mapping[str, Tunable]) -> dict:
    """Check that every override is plain data on an id the bundle lists as tunable.

    Refused: a value that starts with ``$``, ``@`` or ``%`` (MONAI evaluates, references or
    expands it), a dict or list (a nested config, e.g. a ``_target_`` object), None, an id not
    in ``tunables``, a path id (:data:`PATH_IDS`), a value of the wrong type or out of range.

    Returns:
        a copy of ``overrides``.

    Raises:
        PolicyError: naming every refused id and the reason.
    """
    if not isinstance(overrides, Mapping):
        raise PolicyError(f"overrides must be a mapping of bundle config ids to values, got {type(overrides).__name__}")
    problems = [why for k, v in overrides.items() if (why := _refusal(k, v, tunables))]
    if problems:
        raise PolicyError("; ".join(problems))
    return dict(overrides)


def check_tunable_values(overrides: Mapping, tunables: Mapping[str, Tunable]) -> None:
    """Check the plain values a code-shipping job sets on tunable ids against the bundle's list.

    A job that ships its code may override any id, with expressions and nested configs too, so
    only what the list can judge is checked: a plain number, boolean or string on a listed id.
    Without this a typo such as ``optimizer_name: "sgdd"`` or ``lr_round_step: 0`` is found only
    when every site refuses the job at start.

    Example::

        >>> check_tunable_values({"lr_round_step": "$2 * 5"}, {"lr_round_step": Tunable("integer", minimum=1)})
        >>> check_tunable_values({"lr_round_step": 0}, {"lr_round_step": Tunable("integer", minimum=1)})
        Traceback (most recent call last):
        ...
        fedharmony.bundle.job_policy.PolicyError: override 'lr_round_step': must be >= 1, got 0

    Raises:
        PolicyError: naming every refused id and the reason.
    """
    problems = []
    for key, value in overrides.items():
        plain = isinstance(value, (bool, int, float, str))
        if key not in tunables or not plain or (isinstance(value, str) and value.lstrip()[:1] in EXPRESSION_PREFIXES):
            continue
        why = tunables[key].check(value)
        if why:
            problems.append(f"override {key!r}: {why}")
    if problems:
        raise PolicyError("; ".join(problems))


def bundle_digest(bundle_dir) -> str:
    """``sha256:<hex>`` of the bundle's ``configs/`` folder (every file, by relative path and content).

    Only configs decide what a site runs; weights, docs and the licence may differ between copies.
    """
    configs = Path(bundle_dir) / "configs"
    if not configs.is_dir():
        raise PolicyError(f"{Path(bundle_dir).name!r} is not a bundle (no configs/ folder)")
    h = hashlib.sha256()
    for path in sorted(p for p in configs.rglob("*") if p.is_file()):
        rel = path.relative_to(configs).as_posix()
        h.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return "sha256:" + h.hexdigest()


def bundle_version(bundle_dir) -> str:
    """The ``version`` of the bundle's ``configs/metadata.json``."""
    path = Path(bundle_dir) / METADATA_FILE
    try:
        return str(json.loads(path.read_text())["version"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise PolicyError(f"bundle {Path(bundle_dir).name!r}: cannot read its version from {METADATA_FILE} "
                          f"({type(e).__name__})") from None


def site_bundle_root() -> Path:
    """The folder of bundles installed at this site.

    ``$FEDHARMONY_BUNDLE_ROOT`` when set (a site's own choice, like its data root); otherwise
    the ``bundles/`` folder of the checkout the package is installed from (``pip install -e``).
    """
    configured = os.environ.get(BUNDLE_ROOT_ENV)
    if configured:
        root = Path(configured)
        if not root.is_dir():
            raise PolicyError(f"{BUNDLE_ROOT_ENV} is set but is not a folder")
        return root
    beside_package = Path(__file__).resolve().parents[3] / "bundles"  # <checkout>/custom/fedharmony/bundle/job_policy.py
    if beside_package.is_dir():
        return beside_package
    raise PolicyError(f"this site has no installed bundles: set {BUNDLE_ROOT_ENV} to the folder holding them")


def is_plain_name(name) -> bool:
    """A file or folder name with no path in it: letters, digits, ``_ . -``, not starting with ``.`` or ``-``."""
    return isinstance(name, str) and bool(_NAME.fullmatch(name))


def resolve_installed_bundle(name: str, version: str = "", digest: str = "", root=None) -> Path:
    """The site's installed bundle ``name``, after checking the version and digest the job expects.

    Args:
        name: a bundle folder name under ``root`` (no path).
        version, digest: what the job was built against; at least one is required, and every one
            given must equal the installed bundle's.
        root: the site's bundle folder (default :func:`site_bundle_root`).

    Raises:
        PolicyError: a bad name, no such bundle, nothing to check against, or a mismatch (naming both).
    """
    if not is_plain_name(name):
        raise PolicyError(f"bundle name {name!r} is not a plain folder name")
    if not version and not digest:
        raise PolicyError(f"the job names bundle {name!r} with no version or digest to check against the site's")
    root = Path(root) if root is not None else site_bundle_root()
    bundle = root / name
    if not (bundle / "configs").is_dir():
        raise PolicyError(f"bundle {name!r} is not installed at this site")
    installed_version = bundle_version(bundle)
    if version and str(version) != installed_version:
        raise PolicyError(f"bundle {name!r}: the job expects version {version}, this site has {installed_version}")
    installed_digest = bundle_digest(bundle)
    if digest and digest != installed_digest:
        raise PolicyError(f"bundle {name!r} {installed_version}: the job expects configs digest {digest}, "
                          f"this site's installed copy has {installed_digest}")
    return bundle


def check_config_files(bundle_dir, config_files: Sequence[str]) -> list:
    """The job's choice of configs to layer: each must be ``configs/<name>.json`` of the installed bundle."""
    if isinstance(config_files, str):
        config_files = [config_files]
    files = list(config_files or [])
    bad = [f for f in files if not isinstance(f, str) or not _CONFIG_FILE.fullmatch(f)
           or not (Path(bundle_dir) / f).is_file()]
    if bad or not files:
        raise PolicyError(f"config files {bad or files} are not configs of the installed bundle "
                          f"{Path(bundle_dir).name!r} (each must be configs/<name>.json)")
    return files


def check_job_copy(job_copy, installed) -> None:
    """A job that ships no code may still carry a copy of the bundle: it is never parsed, and it
    must equal the installed bundle, or the job is refused (someone changed it on the way)."""
    if job_copy is None or not Path(job_copy).exists():
        return
    theirs, ours = bundle_digest(job_copy), bundle_digest(installed)
    if theirs != ours:
        raise PolicyError(f"the job carries its own copy of bundle {Path(installed).name!r} (configs digest {theirs}) "
                          f"that differs from this site's installed one ({ours}); a site that runs no job code "
                          f"never parses a job's configs")


_ABS_PATH = re.compile(r"(?<![\w.:/>])/(?:[^\s'\",;:()\[\]{}<>]+)")


def redact_paths(message: str, roots: Mapping[str, object]) -> str:
    """``message`` with the site's absolute paths removed, for text that leaves the site.

    A path under one of ``roots`` (``{"<data>": dataset_dir, ...}``) becomes ``<data>/relative``;
    any other absolute path keeps only its last component (``<path>/name``).
    """
    out = str(message)
    for label, root in sorted(roots.items(), key=lambda kv: -len(str(kv[1] or ""))):
        if not root:
            continue
        for form in {str(root).rstrip("/"), os.path.realpath(str(root)).rstrip("/")}:
            if form:
                out = out.replace(form, label)
    return _ABS_PATH.sub(lambda m: "<path>/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], out)
