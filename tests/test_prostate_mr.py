"""Prostate phantom v2 (fedharmony.phantom.prostate_mr): anatomy in mm scanned by the MR simulator."""

import numpy as np
import pytest

from fedharmony.phantom.mr import ProfileError
from fedharmony.phantom.prostate_mr import ProstateMRSite, annotate, load_v2_profiles, make_case_v2


def _profile(name="SMALL", matrix=96, slice_mm=3.0, **extra) -> ProstateMRSite:
    return ProstateMRSite.from_dict({
        "name": name, "field_t": 3.0, "sequence": {"kind": "SE", "tr_ms": 4000, "te_ms": 100},
        "acquisition": {"fov_mm": [120, 120], "matrix": [matrix, matrix], "slice_mm": slice_mm},
        "coverage_mm": 48, **extra})


def test_the_six_profiles_load_and_stand_for_the_six_sites():
    profiles = load_v2_profiles()
    assert list(profiles) == ["BIDMC", "HK", "I2CVB", "RUNMC", "BMC", "UCL"]
    fields = {name: p.scanner.field_t for name, p in profiles.items()}
    assert fields == {"BIDMC": 3.0, "HK": 1.5, "I2CVB": 3.0, "RUNMC": 3.0, "BMC": 1.5, "UCL": 1.5}
    assert profiles["I2CVB"].scanner.acquisition.slice_mm == 1.25  # the thin-slice site


def test_a_case_is_reproducible_and_another_case_is_another_patient():
    profile = _profile()
    a, mask_a, affine = make_case_v2(profile, seed=0, case_index=0)
    b, mask_b, _ = make_case_v2(profile, seed=0, case_index=0)
    c, _, _ = make_case_v2(profile, seed=0, case_index=1)
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b) and not np.array_equal(a, c)
    assert a.dtype == np.int16 and a.shape == (96, 96, 16) and np.allclose(np.diag(affine)[:3], [1.25, 1.25, 3.0])
    volume_ml = mask_a.sum() * 1.25 * 1.25 * 3.0 / 1000
    assert 10 < volume_ml < 60  # an adult gland


def test_the_gland_keeps_its_size_in_mm_whatever_the_resolution():
    """v1 drew anatomy in field-of-view units, so resampling to 1.5 mm changed the gland; here the same
    patient scanned at two resolutions and slice thicknesses has the same gland volume (within partial volume)."""
    coarse, fine = _profile(matrix=64, slice_mm=4.0), _profile(matrix=128, slice_mm=2.0)
    _, mask_c, aff_c = make_case_v2(coarse, 0, 3)
    _, mask_f, aff_f = make_case_v2(fine, 0, 3)
    vol = [m.sum() * abs(np.prod(np.diag(a)[:3])) for m, a in ((mask_c, aff_c), (mask_f, aff_f))]
    assert vol[0] == pytest.approx(vol[1], rel=0.15)


def test_annotation_conventions_move_the_boundary_and_drop_apex_and_base():
    fraction = np.zeros((6, 20, 20))
    fraction[1:5, 5:15, 5:15] = 1.0  # a gland over slices 1-4
    plain = annotate(fraction)
    assert plain.sum() == 4 * 100
    assert annotate(fraction, boundary_voxels=1).sum() > plain.sum() > annotate(fraction, boundary_voxels=-1).sum()
    cut = annotate(fraction, apex_base="exclude")
    assert cut.any(axis=(1, 2)).tolist() == [False, False, True, True, False, False]


@pytest.mark.parametrize("extra, message", [
    ({"coverage_mm": 5}, "coverage_mm must be a number in \\[20, 200\\]"),
    ({"population": {"gland_scale": 9}}, "population.gland_scale must be a number"),
    ({"annotation": {"boundary_voxels": 2}}, "annotation.boundary_voxels must be -1, 0 or 1"),
    ({"annotation": {"apex_base": "maybe"}}, "annotation.apex_base must be include or exclude"),
    ({"annotation": {"style": 1}}, "population takes gland_scale; annotation takes boundary_voxels, apex_base"),
])
def test_a_bad_v2_profile_is_refused_naming_the_field(extra, message):
    with pytest.raises(ProfileError, match=f"site SMALL: {message}"):
        _profile(**extra)


def test_the_phantom_tool_writes_v2_sites_in_the_v1_layout(tmp_path, capsys):
    import json

    import nibabel as nib

    import make_phantom_sites  # tools/ is on sys.path (conftest)

    profile = {"name": "TINY", "field_t": 1.5, "sequence": {"kind": "SE", "tr_ms": 4000, "te_ms": 100},
               "acquisition": {"fov_mm": [100, 100], "matrix": [48, 48], "slice_mm": 4.0}, "coverage_mm": 40}
    (tmp_path / "sites.json").write_text(json.dumps({"sites": [profile]}))
    out = tmp_path / "data"
    assert make_phantom_sites.main(["--phantom", "v2", "--profiles", str(tmp_path / "sites.json"), "--out", str(out),
                                    "--cases", "3", "--workers", "1"]) == 0
    assert json.loads((out / "sites.json").read_text()) == {"site-1": "TINY"}
    datalist = json.loads((out / "TINY" / "datalist.json").read_text())
    assert sum(len(datalist[s]) for s in ("training", "validation", "testing")) == 3
    image = nib.load(str(out / "TINY" / "Case00.nii.gz"))
    assert image.shape == (48, 48, 10) and image.get_data_dtype() == "int16"
    with pytest.raises(SystemExit):
        make_phantom_sites.main(["--phantom", "v2", "--out", str(out), "--sites", "NOWHERE"])
    assert "unknown site(s) ['NOWHERE']" in capsys.readouterr().err
