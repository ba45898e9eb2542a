"""Shared fixtures: tiny phantom sites written once per test session."""

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "prostate_mri_seg"
sys.path.insert(0, str(REPO / "tools"))
os.environ.setdefault("OMP_NUM_THREADS", "1")

# tiny but real: 32 x 32 in-plane (UNet needs a multiple of 16), 8 slices, 3 cases (1 per split)
TINY = dict(size=32, slices=8, cases=3)


@pytest.fixture(scope="session")
def tiny_sites(tmp_path_factory):
    from fedharmony.phantom import load_profiles, select_profiles
    from fedharmony.phantom.sites import write_sites

    out = tmp_path_factory.mktemp("phantom")
    profiles = select_profiles(load_profiles(), ["BIDMC", "HK"])
    write_sites(out, profiles, seed=0, **TINY)
    return out


# small bundle overrides so a round is a handful of steps
TINY_OVERRIDES = {"samples_per_volume": 4, "batch_size": 1, "base_features": 4}
