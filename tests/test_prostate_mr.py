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


def test_the_gland_has_a_brighter_peripheral_zone_behind_the_central_gland_and_the_label_is_both():
    """Zonal anatomy as T2-weighted images show it: the peripheral zone (posterior, longer T2) is brighter than
    the central gland at both field strengths; the gland's fraction, which the label follows, is the two zones."""
    from fedharmony.phantom.mr import TISSUES, PulseSequence, signal
    from fedharmony.phantom.prostate_mr import draw_patient, tissue_maps

    patient = draw_patient(np.random.default_rng(3))
    maps, gland = tissue_maps(patient, (60, 120, 120), (1.0, 1.0, 1.0))
    pz, tz = maps["prostate_pz"], maps["prostate_tz"]
    assert pz.sum() > 0 and tz.sum() > 0 and "prostate" not in maps
    inside = gland > 0.01  # the maps carry a +-4 % tissue texture; the gland's fraction does not
    assert not (pz + tz)[gland == 0].any()
    assert np.all(np.abs((pz + tz)[inside] / gland[inside] - 1) <= 0.041)
    y = np.arange(120) - 59.5  # posterior -> anterior
    centre_y = {name: float((m.sum(axis=(0, 2)) * y).sum() / m.sum()) for name, m in (("pz", pz), ("tz", tz))}
    assert centre_y["pz"] < centre_y["tz"]  # the peripheral zone lies behind the central gland
    t2w = PulseSequence("SE", 4000, 100)
    for field in (1.5, 3.0):
        assert signal(TISSUES["prostate_pz"][field], t2w) > 1.1 * signal(TISSUES["prostate_tz"][field], t2w)


def test_a_coarser_v2_site_keeps_its_field_of_view_and_scales_matrix_and_slices():
    bidmc = load_v2_profiles()["BIDMC"]
    coarse = bidmc.coarser(4)
    acq, old = coarse.scanner.acquisition, bidmc.scanner.acquisition
    assert acq.fov_mm == old.fov_mm and acq.matrix == (140, 140) and acq.slice_mm == 12.0
    assert coarse.boundary_voxels == bidmc.boundary_voxels and coarse.cases == bidmc.cases
    assert bidmc.coarser(1) is bidmc
    with pytest.raises(ValueError, match="voxel scale must be in \\[1, 16\\], got 20"):
        bidmc.coarser(20)


def test_the_prostate_v2_study_task_draws_v2_sites_at_each_scanners_own_grid(tmp_path):
    """``--task prostate_v2``: the prostate job and bundle on v2 sites, each at its scanner's matrix (scaled by the
    preset's voxel_scale), with a separate test draw."""
    import nibabel as nib

    from fedharmony.study.data import make_phantom_data
    from fedharmony.study.tasks import TASKS, preset_for

    assert (TASKS["prostate_v2"].job_script, TASKS["prostate_v2"].bundle) == ("prostate.py", "prostate_mri_seg")
    preset = preset_for("smoke", "prostate_v2")
    data = make_phantom_data("prostate_v2", tmp_path, 0, preset.sites, preset.data, preset.test_cases)
    assert data.sites == {"site-1": "BIDMC", "site-2": "HK"}
    for site, matrix, mm in (("BIDMC", 70, 2.0), ("HK", 32, 5.0)):
        image = nib.load(str(data.test_root / site / "Case00.nii.gz"))
        assert image.shape[:2] == (matrix, matrix) and np.allclose(image.header.get_zooms()[:2], mm)
    assert len(list((data.test_root / "HK").glob("Case*_segmentation.nii.gz"))) == preset.test_cases
