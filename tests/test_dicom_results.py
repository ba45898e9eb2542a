"""DICOM SEG and RT Structure Set written from a mask on its source series, the gland volume and the review flag.

The writers are checked on known masks (a ball in a phantom series) for every way a series is stored: files in
shuffled order, feet-to-head, oblique, and an all-empty mask; each SEG frame is compared with the NIfTI mask's
slice at that instance's own position (nibabel's affine, independent of the writer's sampling). One bundle run
per inference config checks the pieces together (integration)."""

import json
import random
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import BUNDLE, phantom_series_image, sitk_image, write_series

highdicom = pytest.importorskip("highdicom")

from fedharmony.bundle.folder_inference import InferenceSummary  # noqa: E402
from fedharmony.bundle.results import SaveResultsd, check_segments, mask_report, parse_output_format  # noqa: E402
from fedharmony.data.dicom_out import (DicomOutputError, mask_on_source_frames, read_source_series,  # noqa: E402
                                       write_rtstruct, write_seg)
from fedharmony.data.images import SimpleITKReader  # noqa: E402

OBLIQUE = tuple(np.array([[np.cos(0.3), 0, np.sin(0.3)], [0, 1, 0], [-np.sin(0.3), 0, np.cos(0.3)]]).ravel())


def _series(tmp_path, how):
    """A 12-slice series stored ``how``; returns (folder, SimpleITK image)."""
    import SimpleITK as sitk

    vol = (np.random.default_rng(0).random((12, 40, 36)) * 300).astype(np.int16)
    direction = {"axial": (1, 0, 0, 0, 1, 0, 0, 0, 1), "feet_to_head": (1, 0, 0, 0, 1, 0, 0, 0, -1),
                 "oblique": OBLIQUE, "shuffled": (1, 0, 0, 0, 1, 0, 0, 0, 1)}[how]
    img = sitk.Cast(sitk_image(vol, spacing=(0.8, 0.7, 3.0), direction=direction), sitk.sitkInt16)
    folder = write_series(tmp_path / how, img)
    if how == "shuffled":  # file names and instance numbers no longer follow the slices
        import pydicom

        files = sorted(folder.iterdir())
        names = [f"{random.Random(1).random():.6f}_{i}" for i in range(len(files))]
        random.Random(2).shuffle(names)
        numbers = list(range(1, len(files) + 1))
        random.Random(3).shuffle(numbers)
        for f, n, num in zip(files, names, numbers):
            ds = pydicom.dcmread(f)
            ds.InstanceNumber = num
            ds.save_as(folder / f"{n}.dcm")
            f.unlink()
    return folder


def _ball(shape, centre, radius):
    grid = np.indices(shape).astype(float)
    return (sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2).astype(np.uint8)


def _expected_frame(mask, affine_ras, ds):
    """The NIfTI mask's slice holding instance ``ds``, found by the instance's position (x: columns, y: rows)."""
    ras = np.array(ds.ImagePositionPatient, dtype=float) * [-1, -1, 1]
    k = np.rint(nib.affines.apply_affine(np.linalg.inv(affine_ras), ras)).astype(int)
    assert k[0] == 0 and k[1] == 0, k  # a SimpleITK-read stack: the instance's first pixel is voxel (0, 0, k)
    return mask[:, :, k[2]].T


@pytest.mark.parametrize("how", ["axial", "shuffled", "feet_to_head", "oblique", "empty"])
def test_the_seg_read_back_equals_the_nifti_mask_voxel_for_voxel_however_the_series_is_stored(tmp_path, how):
    folder = _series(tmp_path, "axial" if how == "empty" else how)
    reader = SimpleITKReader()
    arr, meta = reader.get_data(reader.read(str(folder)))
    mask = np.zeros(arr.shape, np.uint8) if how == "empty" else _ball(arr.shape, (14, 22, 4), 9)
    mask[:3, :3, 9] = 1 if how != "empty" else 0  # a corner on one slice: slices and axes cannot be confused
    series = read_source_series(folder, how)
    frames = mask_on_source_frames(mask, meta["affine"], series)
    assert frames.sum() == mask.sum()
    out = write_seg(series, frames, {1: "prostate"}, tmp_path / "seg.dcm", algorithm="prostate_mri_seg",
                    version="0.12.0")
    seg = highdicom.seg.segread(out)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == series.study_uid and seg.SeriesInstanceUID != series.series_uid
    assert seg.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"  # uncompressed
    assert int(seg.NumberOfFrames) == series.frames  # one frame per source slice, the empty ones too
    assert "prostate_mri_seg 0.12.0" in seg.SeriesDescription
    desc = seg.SegmentSequence[0]
    assert desc.SegmentedPropertyTypeCodeSequence[0].CodeValue == "41216001"
    assert desc.SegmentAlgorithmType == "AUTOMATIC"
    assert desc.SegmentationAlgorithmIdentificationSequence[0].AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    back = seg.get_pixels_by_source_instance(series.instance_uids, combine_segments=True)
    for ds, frame in zip(series.datasets, back):
        np.testing.assert_array_equal(frame, _expected_frame(mask, meta["affine"], ds))
    positions = [float(np.dot(p, np.cross(series.orientation[:3], series.orientation[3:]))) for p in series.positions]
    assert positions == sorted(positions)  # sorted spatially, not by name or instance number


def test_a_grey_and_white_matter_mask_gives_a_seg_with_two_coded_segments_that_reads_back(tmp_path):
    from pydicom.sr.codedict import codes

    folder = _series(tmp_path, "axial")
    reader = SimpleITKReader()
    arr, meta = reader.get_data(reader.read(str(folder)))
    mask = _ball(arr.shape, (14, 22, 4), 9).astype(np.uint8)
    mask[_ball(arr.shape, (14, 22, 4), 5) > 0] = 2  # white matter inside, grey matter around it
    series = read_source_series(folder, "axial")
    frames = mask_on_source_frames(mask, meta["affine"], series)
    out = write_seg(series, frames, {1: "grey matter", 2: "white matter"}, tmp_path / "seg.dcm",
                    algorithm="brain_mri_seg", version="0.4.0")
    seg = highdicom.seg.segread(out)
    coded = [d.SegmentedPropertyTypeCodeSequence[0].CodeValue for d in seg.SegmentSequence]
    assert coded == [codes.SCT.GrayMatter.value, codes.SCT.WhiteMatter.value]  # the DICOM standard's codes
    back = seg.get_pixels_by_source_instance(series.instance_uids, combine_segments=True)
    for ds, frame in zip(series.datasets, back):
        np.testing.assert_array_equal(frame, _expected_frame(mask, meta["affine"], ds))


@pytest.mark.parametrize("how", ["axial", "oblique"])
def test_the_rtstruct_contours_give_back_the_mask_one_roi_per_label_on_the_same_instances(tmp_path, how):
    pytest.importorskip("rt_utils")
    folder = _series(tmp_path, how)
    reader = SimpleITKReader()
    arr, meta = reader.get_data(reader.read(str(folder)))
    mask = _ball(arr.shape, (14, 22, 5), 8)
    mask[mask.shape[0] // 2:] *= 2  # two labels: a zonal mask
    series = read_source_series(folder)
    frames = mask_on_source_frames(mask, meta["affine"], series)
    out = write_rtstruct(series, frames, {1: "peripheral zone", 2: "transition zone"}, tmp_path / "rt.dcm",
                         algorithm="prostate_mri_seg", version="0.12.0")
    import cv2
    import pydicom

    rt = pydicom.dcmread(out)
    assert rt.Modality == "RTSTRUCT" and rt.StudyInstanceUID == series.study_uid
    assert [r.ROIName for r in rt.StructureSetROISequence] == ["peripheral zone", "transition zone"]
    refs = {c.ReferencedSOPInstanceUID for c in rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
            .RTReferencedSeriesSequence[0].ContourImageSequence}
    assert refs == set(series.instance_uids)
    by_uid = {ds.SOPInstanceUID: (i, ds) for i, ds in enumerate(series.datasets)}
    for label, roi in zip((1, 2), rt.ROIContourSequence):
        back = np.zeros_like(frames, dtype=np.uint8)
        for contour in roi.ContourSequence:  # rasterize each contour on its referenced instance's own grid
            i, ds = by_uid[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
            pts = np.asarray(contour.ContourData, float).reshape(-1, 3) - np.asarray(ds.ImagePositionPatient, float)
            o = np.asarray(ds.ImageOrientationPatient, float)
            assert np.abs(pts @ np.cross(o[:3], o[3:])).max() < 1e-3  # on the instance's plane
            cols, rows = pts @ o[:3] / float(ds.PixelSpacing[1]), pts @ o[3:] / float(ds.PixelSpacing[0])
            poly = np.rint(np.stack([cols, rows], -1)).astype(np.int32)
            layer = np.zeros(frames.shape[1:], np.uint8)
            cv2.fillPoly(layer, [poly], 1)
            back[i] ^= layer
        np.testing.assert_array_equal(back, frames == label)


def test_an_empty_mask_gives_an_rtstruct_whose_roi_has_no_contour(tmp_path):
    folder = _series(tmp_path, "axial")
    series = read_source_series(folder)
    out = write_rtstruct(series, np.zeros((series.frames, series.rows, series.columns), np.uint8), {1: "prostate"},
                         tmp_path / "rt.dcm", algorithm="a", version="1")
    import pydicom

    ds = pydicom.dcmread(out)
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["prostate"]
    assert "ContourSequence" not in ds.ROIContourSequence[0]


def test_a_mask_off_the_source_grid_and_an_existing_result_are_refused_with_the_input_named(tmp_path):
    folder = _series(tmp_path, "axial")
    reader = SimpleITKReader()
    arr, meta = reader.get_data(reader.read(str(folder)))
    series = read_source_series(folder, "export/T2")
    shifted = meta["affine"].copy()
    shifted[0, 3] += 0.4  # 0.4 mm: half a voxel
    with pytest.raises(DicomOutputError, match="export/T2: the mask is not on the source grid"):
        mask_on_source_frames(np.zeros(arr.shape), shifted, series)
    frames = mask_on_source_frames(np.zeros(arr.shape), meta["affine"], series)
    write_seg(series, frames, {1: "prostate"}, tmp_path / "s.dcm", algorithm="a", version="1")
    with pytest.raises(DicomOutputError, match="already exists"):
        write_seg(series, frames, {1: "prostate"}, tmp_path / "s.dcm", algorithm="a", version="1")
    with pytest.raises(DicomOutputError, match="no SNOMED CT code"):
        write_seg(series, frames, {1: "bladder"}, tmp_path / "b.dcm", algorithm="a", version="1")


def test_the_real_mr_object_from_pydicom_gets_a_seg_on_its_own_slice(tmp_path):
    pydicom_data = pytest.importorskip("pydicom.data")
    source = pydicom_data.get_testdata_file("MR_small.dcm")
    if not source:
        pytest.skip("this pydicom ships no MR_small.dcm")
    folder = tmp_path / "mr"
    folder.mkdir()
    shutil.copy(source, folder / "MR_small.dcm")
    reader = SimpleITKReader()
    arr, meta = reader.get_data(reader.read(str(folder / "MR_small.dcm")))
    mask = np.zeros(arr.shape, np.uint8)
    mask[10:30, 20:40] = 1
    series = read_source_series(folder)
    frames = mask_on_source_frames(mask, meta["affine"], series)
    out = write_seg(series, frames, {1: "prostate"}, tmp_path / "seg.dcm", algorithm="a", version="1")
    back = highdicom.seg.segread(out).get_pixels_by_source_instance(series.instance_uids, combine_segments=True)
    np.testing.assert_array_equal(back[0], mask[..., 0].T)


def test_gland_volume_in_ml_and_the_review_flag_for_empty_implausible_and_broken_masks():
    affine = np.diag([0.5, 0.5, 3.0, 1.0])  # 0.75 mm^3 voxels
    mask = np.zeros((100, 100, 30), np.uint8)
    mask[20:60, 20:60, 5:25] = 1  # 32000 voxels = 24 mL
    rep = mask_report(mask, affine, {1: "prostate"})
    assert rep["gland_volume_ml"] == pytest.approx(24.0) and not rep["needs_review"] and rep["pieces"] == 1
    assert mask_report(mask * 0, affine, {1: "prostate"})["review_reason"] == "no gland found (empty mask)"
    small = mask_report(mask, affine, {1: "prostate"}, {"plausible_volume_ml": [30, 300]})
    assert small["needs_review"] and "24.0 mL outside the plausible 30-300 mL" in small["review_reason"]
    two = mask.copy()
    two[80:95, 80:95, 5:25] = 1  # a second piece of 4500 voxels (12% of the mask)
    assert "mask in 2 pieces" in mask_report(two, affine, {1: "prostate"})["review_reason"]
    speck = mask.copy()
    speck[90, 90, 2] = 1  # one stray voxel is no piece
    assert not mask_report(speck, affine, {1: "prostate"})["needs_review"]
    zonal = mask.copy()
    zonal[40:60] *= 2
    rep = mask_report(zonal, affine, {1: "peripheral zone", 2: "transition zone"})
    assert rep["volumes_ml"] == {"peripheral zone": 12.0, "transition zone": 12.0} and rep["gland_volume_ml"] == 24.0


def test_segments_must_name_every_class_of_the_network_before_any_input_is_read(tmp_path):
    """A label without a name would vanish from the volumes and the DICOM results: the results step refuses
    segments that do not name exactly the labels 1 .. num_classes - 1, when it is built."""
    assert check_segments({"1": "grey matter", "2": "white matter"}, 3) == {1: "grey matter", 2: "white matter"}
    assert check_segments({1: "prostate"}, 2) == {1: "prostate"}
    with pytest.raises(ValueError, match=r"segments names labels \[1\], but the network has num_classes 3 "
                                         r"\(labels 1 to 2 besides background\)"):
        check_segments({"1": "brain"}, 3)
    with pytest.raises(ValueError, match=r"names labels \[1, 2\], but the network has num_classes 2"):
        check_segments({"1": "peripheral zone", "2": "transition zone"}, 2)
    with pytest.raises(ValueError, match="labels 1 to 2"):
        check_segments({"0": "background", "1": "grey matter"}, 3)
    with pytest.raises(ValueError, match="must map labels"):
        check_segments({"one": "prostate"}, 2)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2"):
        check_segments({"1": "prostate"}, 1)
    with pytest.raises(ValueError, match="num_classes 3"):
        SaveResultsd("pred", output_dir=str(tmp_path), segments={"1": "brain"}, num_classes=3)
    step = SaveResultsd("pred", output_dir=str(tmp_path), segments={"1": "grey matter", "2": "white matter"},
                        num_classes=3)
    assert step.segments == {1: "grey matter", 2: "white matter"}
    assert SaveResultsd("pred", output_dir=str(tmp_path), num_classes=2).segments == {1: "prostate"}


def test_output_format_takes_one_a_list_or_text_and_names_an_unknown_one():
    assert parse_output_format("nifti") == ["nifti"]
    assert parse_output_format(["dicom_seg", "rtstruct"]) == ["dicom_seg", "rtstruct"]
    assert parse_output_format("nifti, dicom_seg") == ["nifti", "dicom_seg"]
    with pytest.raises(ValueError, match="unknown \\['nrrd'\\]"):
        parse_output_format(["nifti", "nrrd"])


def test_the_summary_csv_has_a_row_per_input_with_its_volume_flag_and_outputs(tmp_path):
    s = InferenceSummary("in", str(tmp_path), unusable=[{"input": "in/bad.nii.gz", "reason": "EOFError"}],
                         allow_skipped=True)
    s.add_output("in/a", str(tmp_path / "a_seg.nii.gz"))
    s.add_result("in/a", {"gland_volume_ml": 0.0, "needs_review": True, "review_reason": "no gland found (empty mask)",
                          "dicom_seg": str(tmp_path / "a_seg.dcm")})
    s.done("in/a", 1.0)
    summary = s.finish()
    assert summary["needs_review"] == 1 and summary["inputs"][0]["dicom_seg"].endswith("a_seg.dcm")
    import csv

    rows = list(csv.DictReader((tmp_path / "inference_summary.csv").open()))
    assert [(r["input"], r["status"], r["needs_review"]) for r in rows] == [("in/a", "done", "yes"),
                                                                          ("in/bad.nii.gz", "skipped", "")]
    assert rows[0]["dicom_seg"].endswith("a_seg.dcm") and rows[0]["nifti"].endswith("a_seg.nii.gz")


# --------------------------------------------------------------------------- through the bundle (integration)
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from fedharmony.bundle.networks import build_network

    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(build_network(str(BUNDLE), overrides={"base_features": 4}, seed=3).state_dict(), path)
    return path


@pytest.mark.integration
def test_inference_writes_seg_and_rtstruct_for_a_dicom_series_and_keeps_nifti_for_a_nifti_input(model, tmp_path):
    from test_bundle_inference import bundle_run

    img = phantom_series_image(size=48, slices=10)
    write_series(tmp_path / "in" / "T2", img)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((48, 48, 6)).astype("f4") * 400,
                             np.diag([0.9, 0.9, 3.0, 1.0])), tmp_path / "in" / "vol.nii.gz")
    res = bundle_run(["configs/inference.json"], "--dataset_dir", tmp_path / "in", "--output_dir", tmp_path / "out",
                     "--ckpt_path", model, "--base_features", 4, "--output_format", '["nifti","dicom_seg","rtstruct"]')
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "inference_summary.json").read_text())
    rec = {Path(r["input"]).name: r for r in summary["inputs"]}
    seg = highdicom.seg.segread(rec["T2"]["dicom_seg"])
    series = read_source_series(tmp_path / "in" / "T2")
    assert seg.StudyInstanceUID == series.study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_uid
    nifti = nib.load(out / "T2_seg.nii.gz")
    back = seg.get_pixels_by_source_instance(series.instance_uids, combine_segments=True)
    mask = np.asarray(nifti.dataobj)
    for ds, frame in zip(series.datasets, back):
        np.testing.assert_array_equal(frame, _expected_frame(mask, nifti.affine, ds))
    voxel_ml = abs(np.linalg.det(nifti.affine[:3, :3])) / 1000
    assert rec["T2"]["gland_volume_ml"] == pytest.approx(float((mask > 0).sum()) * voxel_ml, abs=1e-3)
    assert Path(rec["T2"]["rtstruct"]).is_file() and "needs_review" in rec["T2"]
    assert "no DICOM UIDs to refer to" in rec["vol.nii.gz"]["note"]
    assert (out / "inference_summary.csv").read_text().count("\n") == 3


@pytest.mark.integration
def test_routed_inference_writes_the_seg_and_flags_its_results_too(tmp_path):
    import subprocess

    from test_adaptation import _write_tiny_pool

    _write_tiny_pool(tmp_path / "pool")
    write_series(tmp_path / "in" / "T2", phantom_series_image(size=48, slices=10))
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str(BUNDLE / "configs" / "routed_inference.json"), "--bundle_root", str(BUNDLE),
           "--pool_dir", str(tmp_path / "pool"), "--dataset_dir", str(tmp_path / "in"), "--output_dir",
           str(tmp_path / "out"), "--method", "routing", "--adaptation#passes", "1", "--output_format", "dicom_seg"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rec = json.loads((tmp_path / "out" / "inference_summary.json").read_text())["inputs"][0]
    assert not (tmp_path / "out" / "T2_seg.nii.gz").exists()  # DICOM results only, as asked
    seg = highdicom.seg.segread(rec["dicom_seg"])
    assert seg.StudyInstanceUID == read_source_series(tmp_path / "in" / "T2").study_uid
    assert isinstance(rec["needs_review"], bool) and "gland_volume_ml" in rec
    if rec["needs_review"]:
        assert f"needs review {rec['input']}: {rec['review_reason']}" in res.stdout
