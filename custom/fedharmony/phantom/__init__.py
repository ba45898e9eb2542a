"""Phantom multi-site data in the real datasets' layouts (see ``phantom_data`` in the docs)."""

from fedharmony.phantom.dermoscopy import (DermoscopyProfile, dermoscopy_markdown, load_dermoscopy_profiles, make_lesion_image,
                         write_dermoscopy_sites)
from fedharmony.phantom.histology import HistologyProfile, histology_markdown, load_histology_profiles, make_patch, write_histology_sites
from fedharmony.phantom.profiles import SiteProfile, load_profiles, profiles_markdown, select_profiles
from fedharmony.phantom.prostate import apply_scanner, make_anatomy, make_case

__all__ = ["SiteProfile", "load_profiles", "select_profiles", "profiles_markdown",
           "make_anatomy", "apply_scanner", "make_case",
           "HistologyProfile", "load_histology_profiles", "histology_markdown", "make_patch", "write_histology_sites",
           "DermoscopyProfile", "load_dermoscopy_profiles", "dermoscopy_markdown", "make_lesion_image",
           "write_dermoscopy_sites"]
