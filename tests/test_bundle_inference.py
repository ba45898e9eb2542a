"""The bundles' inference configs on folders as hospitals have them, through ``python -m monai.bundle run``.

The folder mixes what nobody here chose: a volume stored RAS and the same scan stored LPS, a 4-D
series, a volume too small for the network, a truncated ``.nii.gz``, a text file, a DICOM series
folder, a folder holding two series (split up), a series with a missing slice, a DICOM report and
(when pydicom ships it) a real scanner's DICOM file. A PACS-style export (a series among another
series, localizers and a CT series) gives the mask of the series alone; pydicom's ``dicomdirtests``
export goes through with every series named. The weights are untrained: what is checked is
the pipeline (what is segmented, where, on which grid, what is named), not the masks' quality.
"""

import csv
import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import (BUNDLE, REPO, phantom_series_image, sitk_image, write_mixed_export, write_non_image_dicom,
                      write_series)

pytestmark = pytest.mark.integration  # whole folders through MONAI's command line (tests/test_folder_inference.py
                                      # checks the same pieces in-process, fast)

CLS_BUNDLE = REPO / "bundles" / "image_classification"
AFFINE = np.array([[0.9, 0, 0, -30.0], [0, 0.9, 0, -25.0], [0, 0, 3.0, -12.0], [0, 0, 0, 1]])


def _lps(volume, affine):
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = volume.shape[0] - 1, volume.shape[1] - 1
    return np.flip(volume, axis=(0, 1)).copy(), affine @ flip


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from fedharmony.bundle.networks import build_network

    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(build_network(str(BUNDLE), overrides={"base_features": 4}, seed=3).state_dict(), path)
    return path


@pytest.fixture()
def hospital_folder(tmp_path):
    import SimpleITK as sitk

    rng = np.random.default_rng(7)
    scan = (rng.random((48, 40, 6)) * 400 + np.linspace(0, 300, 48)[:, None, None]).astype(np.float32)
    d = tmp_path / "incoming"
    d.mkdir()
    nib.save(nib.Nifti1Image(scan, AFFINE), d / "t2_ras.nii.gz")
    nib.save(nib.Nifti1Image(*_lps(scan, AFFINE)), d / "t2_lps.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([scan, scan * 0.5], -1), AFFINE), d / "dwi_4d.nii.gz")
    nib.save(nib.Nifti1Image(scan[:4, :5, :3], AFFINE), d / "tiny.nii.gz")
    (d / "truncated.nii.gz").write_bytes(gzip.compress(b"\x5c\x01" + b"\0" * 400)[:50])
    (d / "notes.txt").write_text("scanner 3 was serviced on Monday\n")
    series = sitk.Cast(sitk_image(scan.transpose(2, 1, 0).astype(np.int16), spacing=(0.9, 0.9, 3.0),
                                  direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)), sitk.sitkInt16)
    write_series(d / "series_ok", series)
    write_series(d / "two_series", series)
    write_series(d / "two_series", series, prefix="ADC", description="ADC")  # a second series (its own UID) beside it
    write_series(d / "gap", series, skip=(3,))
    write_non_image_dicom(d / "report.dcm")
    return d, scan


def bundle_run(configs, *args, bundle=BUNDLE, cwd=None):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps([str(bundle / c) for c in configs]),
           "--bundle_root", str(bundle), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)


def test_inference_segments_every_usable_scan_and_names_every_other_input(hospital_folder, model, tmp_path):
    folder, scan = hospital_folder
    out = tmp_path / "masks"
    res = bundle_run(["configs/inference.json"], "--dataset_dir", folder, "--output_dir", out, "--ckpt_path", model,
                     "--base_features", 4)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]  # something was skipped
    summary = json.loads((out / "inference_summary.json").read_text())
    done = {p["input"].rsplit("/", 1)[-1] for p in summary["inputs"] if p["input"].startswith(str(folder))}
    skipped = {s["input"].rsplit("/", 1)[-1]: s["reason"] for s in summary["skipped_inputs"]}
    assert done == {"t2_ras.nii.gz", "t2_lps.nii.gz", "series_ok"}
    split = [p for p in summary["inputs"] if not p["input"].startswith(str(folder))]  # two_series/, split up
    assert sorted(p["series"]["series_description"] for p in split) == ["ADC", "T2 AX"]
    assert all(p["series"]["folders"] == "two_series" and p["input"].endswith(f"({p['series']['series_uid']})")
               for p in split)
    assert set(skipped) == {"dwi_4d.nii.gz", "tiny.nii.gz", "truncated.nii.gz", "notes.txt", "gap"}
    assert "2 volumes" in skipped["dwi_4d.nii.gz"] and "volume_index" in skipped["dwi_4d.nii.gz"]
    assert "4 x 5 in-plane" in skipped["tiny.nii.gz"]
    assert skipped["truncated.nii.gz"].startswith("no reader could open it: ")
    assert "not an image" in skipped["notes.txt"] and "1 slice(s) missing" in skipped["gap"]
    (report,) = summary["not_selected_inputs"]  # a structured report is not for an MR bundle: listed, no error
    assert report["input"] == str(folder / "report.dcm") and "Modality 'SR' is not MR" in report["reason"]
    assert summary["dicom_series"] == {"found": 5, "segmented": 3, "skipped": 1, "not_selected": 1}
    for name in skipped:  # the terminal says it too, file by file
        assert name in res.stdout
    assert f"processed 5, skipped 5 (summary: {out / 'inference_summary.json'})" in res.stdout
    assert "not selected 1 (not for this bundle; no error)" in res.stdout
    t2 = next(p for p in split if p["series"]["series_description"] == "T2 AX")
    np.testing.assert_array_equal(np.asarray(nib.load(t2["outputs"][0]).dataobj),  # the same scan, the same mask
                                  np.asarray(nib.load(out / "series_ok_seg.nii.gz").dataobj))

    # each mask has its own input's grid, and the LPS copy's mask is the RAS one's in world space
    ras, lps = nib.load(out / "t2_ras_seg.nii.gz"), nib.load(out / "t2_lps_seg.nii.gz")
    assert ras.shape == lps.shape == scan.shape
    np.testing.assert_allclose(ras.affine, AFFINE, atol=1e-5)
    np.testing.assert_allclose(lps.affine, nib.load(folder / "t2_lps.nii.gz").affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(lps.dataobj)[::-1, ::-1], np.asarray(ras.dataobj))
    series_mask = nib.load(out / "series_ok_seg.nii.gz")  # a DICOM series: mask in NIfTI, with the series' geometry
    assert series_mask.shape == scan.shape
    # DICOM's identity direction is LPS: in RAS terms x and y run the other way
    np.testing.assert_allclose(series_mask.affine[:3, :3], np.diag([-0.9, -0.9, 3.0]), atol=1e-4)

    # a second run keeps the masks (and says so); overwrite replaces them; volume_index picks a volume of the series
    before = (out / "t2_ras_seg.nii.gz").read_bytes()
    (out / "t2_ras_seg.nii.gz").write_bytes(b"edited by a radiologist")
    res = bundle_run(["configs/inference.json"], "--dataset_dir", folder, "--output_dir", out, "--ckpt_path", model,
                     "--base_features", 4, "--volume_index", 1, "--allow_skipped", "true")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (out / "t2_ras_seg.nii.gz").read_bytes() == b"edited by a radiologist"
    assert "t2_ras_seg.nii.gz already exists" in res.stdout and (out / "dwi_4d_seg.nii.gz").is_file()
    res = bundle_run(["configs/inference.json"], "--dataset_dir", folder, "--output_dir", out, "--ckpt_path", model,
                     "--base_features", 4, "--overwrite", "true", "--allow_skipped", "true")
    assert res.returncode == 0 and (out / "t2_ras_seg.nii.gz").read_bytes() == before


def test_spacing_normalization_and_harmofl_overlay_keep_each_masks_grid(hospital_folder, tmp_path):
    from fedharmony.bundle.networks import build_network

    folder, scan = hospital_folder
    for name in ("tiny.nii.gz", "truncated.nii.gz", "notes.txt", "dwi_4d.nii.gz", "report.dcm"):
        (folder / name).unlink()
    for name in ("two_series", "gap"):
        shutil.rmtree(folder / name)
    overlays = ["configs/inference.json", "configs/harmofl.json"]
    net = build_network(str(BUNDLE), ["configs/train.json", "configs/harmofl.json"],
                        overrides={"base_features": 4, "image_size": 64})
    net.harmonize.target.fill_(1.0)  # a trained HarmoFL model carries its federation's target
    torch.save(net.state_dict(), tmp_path / "harmofl.pt")
    out = tmp_path / "masks"
    res = bundle_run(overlays, "--dataset_dir", folder, "--output_dir", out, "--ckpt_path", tmp_path / "harmofl.pt",
                     "--base_features", 4, "--image_size", 64, "--pixdim", 1.5)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "processed 3, skipped 0" in res.stdout
    for name in ("t2_ras", "t2_lps", "series_ok"):
        assert nib.load(out / f"{name}_seg.nii.gz").shape == scan.shape  # back on the stored grid
    np.testing.assert_array_equal(np.asarray(nib.load(out / "t2_lps_seg.nii.gz").dataobj)[::-1, ::-1],
                                  np.asarray(nib.load(out / "t2_ras_seg.nii.gz").dataobj))


def test_a_real_scanners_dicom_file_from_pydicom_goes_through_inference(model, tmp_path):
    pydicom_data = pytest.importorskip("pydicom.data")
    try:
        source = pydicom_data.get_testdata_file("MR_small.dcm", download=False)
    except TypeError:  # older pydicom: no download flag
        source = pydicom_data.get_testdata_file("MR_small.dcm")
    if not source:
        pytest.skip("this pydicom ships no MR_small.dcm")
    folder = tmp_path / "in" / "mr_small"
    folder.mkdir(parents=True)
    shutil.copy(source, folder / "MR_small.dcm")
    res = bundle_run(["configs/inference.json"], "--dataset_dir", tmp_path / "in", "--output_dir", tmp_path / "out",
                     "--ckpt_path", model, "--base_features", 4)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    mask = nib.load(tmp_path / "out" / "mr_small_seg.nii.gz")
    assert mask.shape[:2] == (64, 64)  # the scanner's 64 x 64 slice, one mask on its grid


def test_a_series_in_an_export_with_another_series_and_localizers_gets_the_mask_it_gets_alone(model, tmp_path):
    img = phantom_series_image(size=48, slices=10)
    write_series(tmp_path / "alone" / "T2", img)
    uid = write_mixed_export(tmp_path / "export" / "PACS", img)
    write_series(tmp_path / "export" / "PACS", img, description="CT of something", prefix="CT",
                 tags={"0008|0060": "CT", "0010|0020": "PHANTOM01"})
    masks = {}
    for key in ("alone", "export"):
        out = tmp_path / f"masks_{key}"
        res = bundle_run(["configs/inference.json"], "--dataset_dir", tmp_path / key, "--output_dir", out,
                         "--ckpt_path", model, "--base_features", 4,
                         *(["--series_filter", "{'Modality': 'MR', 'SeriesDescription': '*T2*'}"] if key == "export"
                           else []))
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]  # not selected is no error
        summary = json.loads((out / "inference_summary.json").read_text())
        (entry,) = summary["inputs"]
        masks[key] = nib.load(entry["outputs"][0])
    assert entry["series"]["series_uid"] == uid
    assert Path(entry["outputs"][0]).name.startswith("PHANTOM01_MRI_PROSTATE_S3_T2_AX_")
    assert entry["series"]["dropped"].startswith("1 localizer image(s) (ImageType LOCALIZER)")
    reasons = sorted(r["reason"].split(" (")[0] for r in summary["not_selected_inputs"])
    assert reasons == ["not selected: Modality 'CT' is not MR",  # the filter speaks first, then the localizer rule
                       "not selected: SeriesDescription '3-Plane Loc' does not match *T2*",
                       "not selected: SeriesDescription 'ADC' does not match *T2*"]
    assert summary["dicom_series"] == {"found": 4, "segmented": 1, "skipped": 0, "not_selected": 3}
    np.testing.assert_allclose(masks["export"].affine, masks["alone"].affine, atol=1e-5)  # the same world grid
    np.testing.assert_array_equal(np.asarray(masks["export"].dataobj), np.asarray(masks["alone"].dataobj))


def test_pydicoms_dicomdirtests_export_through_the_bundle_names_every_series(model, tmp_path):
    from pydicom.data import get_testdata_file

    export = tmp_path / "export"
    shutil.copytree(Path(get_testdata_file("DICOMDIR")).parent, export)
    out = tmp_path / "masks"
    res = bundle_run(["configs/inference.json"], "--dataset_dir", export, "--output_dir", out, "--ckpt_path", model,
                     "--base_features", 4)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]  # README.txt, DICOMDIR-nopatient skipped
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["dicom_series"] == {"found": 14, "segmented": 0, "skipped": 0, "not_selected": 14}
    assert summary["processed"] == 0 and summary["skipped"] == 2 and len(summary["notes"]) == 7
    assert "not selected 14 (not for this bundle; no error)" in res.stdout


def test_classification_inference_names_bad_images_and_keeps_predictions_csv(tiny_dermoscopy, tmp_path):
    from fedharmony.bundle.networks import build_network

    src = sorted((tiny_dermoscopy / "clientA").rglob("*.png"))[:3]
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in src:
        shutil.copy(p, folder / p.name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    (folder / "consent.pdf").write_bytes(b"%PDF-1.4")
    ckpt = tmp_path / "model.pt"
    torch.save(build_network(str(CLS_BUNDLE), overrides={"base_features": 4, "image_size": 32}).state_dict(), ckpt)
    args = ["--dataset_dir", folder, "--output_dir", tmp_path / "out", "--ckpt_path", ckpt, "--base_features", 4,
            "--image_size", 32]
    res = bundle_run(["configs/inference.json"], *args, bundle=CLS_BUNDLE)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert sorted(r["image"].rsplit("/", 1)[-1] for r in rows) == sorted(p.name for p in src)
    assert "broken.png" in res.stdout and "consent.pdf" in res.stdout and "processed 3, skipped 2" in res.stdout
    res = bundle_run(["configs/inference.json"], *args, bundle=CLS_BUNDLE)  # the csv is kept
    assert res.returncode != 0 and "predictions.csv already exists" in res.stdout + res.stderr
    assert len(list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))) == 3
