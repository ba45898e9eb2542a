"""Pixel-size robustness (fedharmony.study.robustness): the same test scans at other in-plane pixel sizes."""

import json

import nibabel as nib
import numpy as np
import pytest

from fedharmony.study.robustness import (check_pixel_scales, resample_in_plane, resample_site, resampled_test_root,
                                         robustness_lines, robustness_summary)


def _disc(shape=(64, 64, 5), spacing=(0.5, 0.5, 3.0), radius_mm=8.0):
    x = (np.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0]
    y = (np.arange(shape[1]) - (shape[1] - 1) / 2) * spacing[1]
    disc = (x[:, None] ** 2 + y[None, :] ** 2) <= radius_mm ** 2
    return np.repeat(disc[:, :, None], shape[2], axis=2).astype(np.uint8), np.diag([*spacing, 1.0])


def test_twice_the_pixel_size_halves_the_matrix_and_keeps_the_field_of_view_and_the_slices():
    label, affine = _disc()
    out, new = resample_in_plane(label, affine, 2.0, label=True)
    assert out.shape == (32, 32, 5) and out.dtype == np.uint8 and set(np.unique(out)) <= {0, 1}
    np.testing.assert_allclose(np.diag(new)[:3], [1.0, 1.0, 3.0])
    # the field of view's first edge stays where it was: first centre - half a voxel, before and after
    np.testing.assert_allclose(new[:2, 3] - 0.5, affine[:2, 3] - 0.25)
    assert new[2, 3] == affine[2, 3]
    # the disc keeps its area in mm^2 (to a pixel's rim at the coarser size)
    area = [label[..., 0].sum() * 0.25, out[..., 0].sum() * 1.0]
    assert area[1] == pytest.approx(area[0], rel=0.1)


def test_finer_pixels_grow_the_matrix_and_an_integer_image_keeps_its_type_and_range():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 3000, size=(40, 40, 4)).astype(np.int16)
    out, new = resample_in_plane(image, np.diag([1.0, 1.0, 4.0, 1.0]), 0.8)
    assert out.shape == (50, 50, 4) and out.dtype == np.int16
    assert out.min() >= 0 and out.max() <= 3000
    np.testing.assert_allclose(np.diag(new)[:3], [0.8, 0.8, 4.0])


def test_the_slice_axis_is_found_from_the_affine_whichever_stored_axis_it_is():
    """A volume stored with its axial slices along the first axis is resampled along the other two."""
    label, _ = _disc()
    stored = np.moveaxis(label, 2, 0)  # (slices, x, y)
    affine = np.array([[0, 0.5, 0, 0], [0, 0, 0.5, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])  # axis 0 runs superior
    out, new = resample_in_plane(stored, affine, 2.0, label=True)
    assert out.shape == (5, 32, 32)
    np.testing.assert_allclose(np.linalg.norm(new[:3, :3], axis=0), [3.0, 1.0, 1.0])


def test_pixel_scales_are_checked_sorted_and_include_the_stored_size():
    assert check_pixel_scales([1.5, 0.6]) == (0.6, 1.0, 1.5)
    assert check_pixel_scales(None) is None
    with pytest.raises(ValueError, match="a pixel scale must be a number in \\[0.25, 4\\], got 9"):
        check_pixel_scales([9])
    with pytest.raises(ValueError, match="listed twice"):
        check_pixel_scales([0.8, 0.8])


def test_a_site_is_resampled_case_by_case_and_an_unreadable_case_is_named_and_left_out(tmp_path):
    site = tmp_path / "SITE"
    site.mkdir()
    label, affine = _disc()
    image = label.astype(np.int16) * 1000
    for i in range(2):
        nib.save(nib.Nifti1Image(image, affine), str(site / f"Case{i}.nii.gz"))
        nib.save(nib.Nifti1Image(label, affine), str(site / f"Case{i}_seg.nii.gz"))
    (site / "Case2.nii.gz").write_bytes(b"not a nifti")
    items = [{"image": f"Case{i}.nii.gz", "label": f"Case{i}_seg.nii.gz"} for i in range(3)]
    (site / "datalist.json").write_text(json.dumps({"testing": items}))
    out = resample_site(site, tmp_path / "out" / "SITE", 1.25)
    listed = json.loads((out / "datalist.json").read_text())["testing"]
    assert [item["image"] for item in listed] == ["Case0.nii.gz", "Case1.nii.gz"]
    assert "Case2.nii.gz" in (out / "skipped.txt").read_text()
    assert nib.load(str(out / "Case0_seg.nii.gz")).shape == (51, 51, 5)
    # the resampled root is written once and then reused; factor 1 is the test draw itself
    root = resampled_test_root(tmp_path, {"site-1": "SITE"}, 1.25, tmp_path / "px1.25")
    stamp = (root / "SITE" / "Case0.nii.gz").stat().st_mtime_ns
    assert resampled_test_root(tmp_path, {"site-1": "SITE"}, 1.25, tmp_path / "px1.25") == root
    assert (root / "SITE" / "Case0.nii.gz").stat().st_mtime_ns == stamp
    assert resampled_test_root(tmp_path, {"site-1": "SITE"}, 1.0, tmp_path / "px1") == tmp_path


def test_the_report_section_gives_each_arms_mean_and_worst_site_per_factor_with_cis_over_seeds():
    runs = [{"method": "fedavg", "seed": s, "site_scores": {"A": 0.8, "B": 0.6},
             "pixel_scale_scores": {"1": {"A": 0.8, "B": 0.6}, "1.5": {"A": 0.4 + 0.1 * s, "B": 0.2}}}
            for s in range(3)]
    summary = robustness_summary({"runs": runs})
    assert summary["fedavg"]["1"]["mean"][0] == pytest.approx(0.7) and summary["fedavg"]["1"]["seeds"] == 3
    assert summary["fedavg"]["1.5"]["mean"][0] == pytest.approx(0.35)  # seeds' means over sites: 0.3, 0.35, 0.4
    assert summary["fedavg"]["1.5"]["worst"][0] == pytest.approx(0.2)
    lines = "\n".join(robustness_lines(summary, "Dice"))
    assert "| arm | x1 | x1.5 |" in lines and "| fedavg | 0.700 [0.700, 0.700] | 0.350 [" in lines


@pytest.mark.integration
def test_a_pixel_scale_study_scores_federated_and_centralized_models_at_each_scale(tmp_path):
    """``--pixel-scales``: every run (a FedAvg federation in the simulator, the equal-budget pooled model) is also
    scored on its seed's test draw resampled to each factor; factor 1 is the ordinary score; the report has the
    table and the figure; the setting keeps these runs apart from a study without it."""
    from fedharmony.study.report import write_report
    from fedharmony.study.runner import Study

    out = tmp_path / "study"
    study = Study("prostate", ["fedavg", "pooled_steps"], 1, "smoke", out, pixel_scales=[1.25], echo=lambda _: None)
    results = study.run()
    assert not results["failed"] and len(results["runs"]) == 2
    for run in results["runs"]:
        scales = run["pixel_scale_scores"]
        assert set(scales) == {"1", "1.25"} and scales["1"] == run["site_scores"]
        assert set(scales["1.25"]) == set(run["site_scores"])
        assert all(0.0 <= v <= 1.0 for v in scales["1.25"].values())
    resampled = nib.load(str(out / "data" / "seed0" / "test_px1.25" / "HK" / "Case00_segmentation.nii.gz"))
    stored = nib.load(str(out / "data" / "seed0" / "test" / "HK" / "Case00_segmentation.nii.gz"))
    assert resampled.shape[:2] == tuple(round(n / 1.25) for n in stored.shape[:2])
    text = write_report(out).read_text()
    assert "## Pixel size: the same test scans at other in-plane pixel sizes" in text and "| arm | x1 | x1.25 |" in text
    assert (out / "pixel_size.png").stat().st_size > 0
    plain = Study("prostate", ["fedavg"], 1, "smoke", out)
    assert plain.settings_key("fedavg", 0) != study.settings_key("fedavg", 0) and "pixel_scales" not in plain.settings()
