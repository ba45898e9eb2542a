import json

import nibabel as nib
import numpy as np
import pytest

from fedharmony.phantom import load_profiles, make_case, select_profiles
from fedharmony.phantom.sites import write_sites


def test_default_profiles_are_the_six_real_sites():
    assert list(load_profiles()) == ["BIDMC", "HK", "I2CVB", "RUNMC", "BMC", "UCL"]


UNSEEN_SETS = ["set1.json", "set2.json", "set3.json", "set4.json", "set5.json"]  # study-only profiles, docs/studies/unseen_scanners/


@pytest.mark.parametrize("name", UNSEEN_SETS)
def test_unseen_scanner_profiles_are_none_of_the_training_sites_and_differ_in_at_least_two_ways(name):
    """The scanner sets for testing a model on a new site: new names, and each profile differs from every
    training site (and from the other sets' profiles) in at least two of the fields its _doc lists."""
    from fedharmony.study.outside import UNSEEN_SETS as folder

    training = load_profiles()
    unseen = load_profiles(folder / name)
    other = {k: v for other_set in UNSEEN_SETS if other_set != name for k, v in load_profiles(folder / other_set).items()}
    assert len(unseen) == (6 if name == "set5.json" else 3) and not set(unseen) & (set(training) | set(other))
    fields = ("gamma", "scale", "offset", "bias", "bias_center", "noise", "blur_mm", "fov_mm", "matrix_scale",
              "slice_mm", "ringing")
    for profile in unseen.values():
        for known in [*training.values(), *other.values()]:
            differing = [f for f in fields if getattr(profile, f) != getattr(known, f)]
            assert len(differing) >= 2, (profile.name, known.name, differing)


def test_same_seed_same_volume_different_seed_different_volume():
    p = load_profiles()["HK"]
    a_img, a_lab, a_aff = make_case(p, seed=3, case_index=1, size=32, slices=8)
    b_img, b_lab, b_aff = make_case(p, seed=3, case_index=1, size=32, slices=8)
    c_img, _, _ = make_case(p, seed=4, case_index=1, size=32, slices=8)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_lab, b_lab) and np.array_equal(a_aff, b_aff)
    assert not np.array_equal(a_img, c_img)


def test_sites_differ_in_geometry_and_intensity():
    profiles = load_profiles()
    cases = {n: make_case(p, 0, 0, size=64, slices=12) for n, p in profiles.items()}
    spacings = {n: tuple(np.round(np.diag(c[2])[:3], 3)) for n, c in cases.items()}
    assert len(set(spacings.values())) == len(profiles), spacings
    assert cases["I2CVB"][0].shape[:2] != cases["HK"][0].shape[:2]  # matrix differs by site
    medians = [float(np.median(c[0][c[1] > 0])) for c in cases.values()]
    assert max(medians) / min(medians) > 3  # the scanners' intensity scales differ widely


def test_gland_is_not_separable_by_a_threshold():
    img, lab, _ = make_case(load_profiles()["RUNMC"], 0, 0, size=64, slices=12)
    fg = lab > 0
    best = 0.0
    for t in np.quantile(img, np.linspace(0.01, 0.99, 99)):
        for pred in (img > t, img <= t):
            dice = 2 * (pred & fg).sum() / (pred.sum() + fg.sum())
            best = max(best, dice)
    assert best < 0.3, f"a global threshold reaches Dice {best:.2f}"


def test_layout_written(tmp_path):
    profiles = select_profiles(load_profiles(), ["I2CVB", "UCL"])
    write_sites(tmp_path, profiles, seed=1, cases=4, size=32, slices=6)
    assert json.loads((tmp_path / "sites.json").read_text()) == {"site-1": "I2CVB", "site-2": "UCL"}
    for site in ("I2CVB", "UCL"):
        folder = tmp_path / site
        for i in range(4):
            img = nib.load(str(folder / f"Case{i:02d}.nii.gz"))
            seg = nib.load(str(folder / f"Case{i:02d}_segmentation.nii.gz"))
            assert img.shape == seg.shape and np.allclose(img.affine, seg.affine)
            spacing = img.header.get_zooms()
            assert spacing[2] == load_profiles()[site].slice_mm
        dl = json.loads((folder / "datalist.json").read_text())
        assert sum(len(dl[s]) for s in ("training", "validation", "testing")) == 4
    labels = np.unique(np.asarray(nib.load(str(tmp_path / "I2CVB" / "Case00_segmentation.nii.gz")).dataobj))
    assert set(labels) <= {0, 1, 2} and 2 in labels  # I2CVB carries zonal labels


def test_profile_file_adds_a_site(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"sites": [{"name": "NEWSCANNER", "gamma": 2.0, "noise": 0.2}]}))
    profiles = load_profiles(f)
    assert list(profiles) == ["NEWSCANNER"]
    img, lab, _ = make_case(profiles["NEWSCANNER"], 0, 0, size=32, slices=6)
    assert img.shape == (32, 32, 6) and lab.any()


@pytest.mark.parametrize("entry,match", [({"name": "X", "gamma": -1}, "gamma"), ({"name": "X", "colour": 1}, "unknown")])
def test_bad_profile_is_named(tmp_path, entry, match):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"sites": [entry]}))
    with pytest.raises(ValueError, match=match):
        load_profiles(f)


def test_cli_rejects_unknown_site_and_bad_size(capsys):
    import make_phantom_sites

    with pytest.raises(SystemExit):
        make_phantom_sites.main(["--out", "x", "--sites", "NOPE"])
    assert "NOPE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_phantom_sites.main(["--out", "x", "--size", "8"])


def test_cases_drawn_in_parallel_are_the_same_files(tmp_path):
    profiles = select_profiles(load_profiles(), ["HK"])
    write_sites(tmp_path / "one", profiles, seed=3, cases=8, size=32, slices=6, workers=1)
    write_sites(tmp_path / "two", profiles, seed=3, cases=8, size=32, slices=6, workers=2)
    one = sorted(p.name for p in (tmp_path / "one" / "HK").iterdir())
    assert one == sorted(p.name for p in (tmp_path / "two" / "HK").iterdir()) and len(one) == 17
    for name in one:
        assert (tmp_path / "one" / "HK" / name).read_bytes() == (tmp_path / "two" / "HK" / name).read_bytes(), name
