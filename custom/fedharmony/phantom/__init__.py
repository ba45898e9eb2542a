"""Phantom multi-site data in the real datasets' layouts (see ``phantom_data`` in the docs)."""

from .profiles import SiteProfile, load_profiles, profiles_markdown, select_profiles
from .prostate import apply_scanner, make_anatomy, make_case

__all__ = ["SiteProfile", "load_profiles", "select_profiles", "profiles_markdown",
           "make_anatomy", "apply_scanner", "make_case"]
