"""DICOM exports as hospitals hand them over: one folder, many series, a DICOMDIR, localizers mixed in (fast).

On real files: pydicom's ``dicomdirtests`` export (a DICOMDIR index, MR and CT series, 3-plane localizers, single
CR images; shipped inside pydicom's wheel), copied as one folder. On phantom files: a volume written as a DICOM
series into a folder together with a second series and localizers gives the mask of the series given alone.
The bundle's CLI run over such folders is in tests/test_bundle_inference.py.
"""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.data import DataLoader
from monai.transforms import AsDiscreted, Compose, EnsureChannelFirstd, EnsureTyped, Invertd, LoadImaged

from fedharmony.bundle.folder_inference import (FolderEvaluator, InferenceSummary, SaveMaskd, ScreenedDataset,
                                                screened_collate)
from fedharmony.bundle.inferers import Slab25DInferer
from fedharmony.bundle.intensity import VolumeIntensityd
from fedharmony.bundle.transforms import VolumeGeometryd
from fedharmony.data.dicom import SeriesFilter, read_dicomdir
from fedharmony.data.images import SimpleITKReader, dicom_stack, find_inputs

from conftest import SAGITTAL, phantom_series_image, sitk_image, write_mixed_export, write_series

DICOMDIRTESTS = Path(pydicom.data.get_testdata_file("DICOMDIR")).parent  # in pydicom's wheel: no download


@pytest.fixture()
def export(tmp_path):
    """pydicom's dicomdirtests folder copied as a user would: the whole folder (its DICOMDIR variants, README and
    the separate TINY_ALPHA file-set included)."""
    folder = tmp_path / "export"
    shutil.copytree(DICOMDIRTESTS, folder)
    return folder


def by_status(problems):
    out = {}
    for p in problems:
        out.setdefault(p.get("status", "skipped"), []).append(p)
    return out


def test_dicomdirtests_as_one_folder_splits_the_mr_series_names_the_localizers_and_leaves_ct_and_cr_out(export):
    inputs, problems = find_inputs(export, series_filter="MR")
    groups = by_status(problems)
    assert inputs == []  # the export holds no MR volume to segment: every MR series is a localizer or a MIP
    series = [p for p in groups["not selected"] if "series" in p]
    modality = {}
    for p in series:
        modality.setdefault(p["series"]["modality"], []).append(p)
    assert {m: len(v) for m, v in modality.items()} == {"CR": 3, "CT": 4, "MR": 7}  # 14 series in all
    for p in modality["CR"] + modality["CT"]:  # another modality: not selected, by modality, not an error
        assert p["reason"].startswith(f"not selected: Modality '{p['series']['modality']}' is not MR")
    # MR1/ and MR2/ each hold three series: split, each named by patient / study / series and its full UID
    mr = {p["series"]["series_uid"].rsplit(".", 1)[-1]: p for p in modality["MR"]}
    assert set(mr) == {"475", "134", "15", "481", "136", "17", "118"}
    for uid in ("475", "134", "15", "481", "136", "17"):
        assert mr[uid]["input"].startswith("98890234 / ") and mr[uid]["input"].endswith(
            f"({mr[uid]['series']['series_uid']})")
        assert "not selected: a localizer (SeriesDescription" in mr[uid]["reason"]
    assert mr["136"]["series"]["files"] == "3" and "'T/S/C RF FAST PILOT'" in mr["136"]["input"]  # 3-plane
    assert mr["118"]["input"] == str(export / "98892003" / "MR700")  # alone in its folder: named by it
    assert "7 derived projection image(s)" in mr["118"]["reason"]
    assert str(export / "98892003" / "MR1") not in {p["input"] for p in problems}  # no folder refused as a whole
    # the DICOMDIR is read: every file it lists is found; its broken variant is named
    notes = {Path(p["input"]).relative_to(export).as_posix(): p["reason"] for p in groups["note"]}
    assert notes["DICOMDIR"] == "DICOMDIR read: lists 31 file(s); all found"
    assert notes["TINY_ALPHA/DICOMDIR"] == ("DICOMDIR read: lists 50 file(s) and README as the file-set's "
                                            "descriptor; all found")
    assert set(notes) == {"DICOMDIR", "DICOMDIR-bigEnd", "DICOMDIR-implicit", "DICOMDIR-nooffset",
                          "DICOMDIR-reordered", "DICOMDIR-empty.dcm", "TINY_ALPHA/DICOMDIR"}
    assert all(p["series"]["dicomdir"] for p in series)  # every series was found through a DICOMDIR too
    skipped = {Path(p["input"]).name: p["reason"] for p in groups["skipped"]}
    assert set(skipped) == {"README.txt", "DICOMDIR-nopatient"}
    assert "a DICOMDIR (an index of the files on a CD) that cannot be read" in skipped["DICOMDIR-nopatient"]


def test_dicomdirtests_with_every_series_taken_names_the_gap_and_the_scout(export):
    inputs, problems = find_inputs(export, series_filter="")
    names = {i["name"]: i for i in inputs}
    assert set(names) == {"77654033_CR1", "77654033_CR2", "77654033_CR3", "98892001_CT5N"}  # alone: folder names
    assert names["98892001_CT5N"]["image"] == str(export / "98892001" / "CT5N")
    assert names["98892001_CT5N"]["series"]["series_description"] == "SmartScore - Gated 0.5 sec"
    reasons = {p["input"]: p["reason"] for p in problems}
    assert "slice positions are not evenly spaced" in reasons[str(export / "77654033" / "CT2")]
    assert reasons[str(export / "98892001" / "CT2N")].startswith("not selected: a localizer")
    (no_pixels,) = [p for p in problems if "without an image" in p["reason"]]  # TINY_ALPHA's CT files: no pixels
    assert no_pixels["reason"].startswith("50 files of one series, each a DICOM file without an image")
    assert no_pixels["input"].startswith("12345678 / Testing File-set / series 1")


def test_a_dicomdir_listing_missing_files_is_named_and_their_series_skipped_as_incomplete(tmp_path):
    export = tmp_path / "cd"
    export.mkdir()
    for name in ("DICOMDIR", "77654033", "98892001", "98892003"):
        (shutil.copytree if (DICOMDIRTESTS / name).is_dir() else shutil.copy)(DICOMDIRTESTS / name, export / name)
    (export / "98892001" / "CT5N" / "3353").unlink()  # the last slice: no gap shows, only the DICOMDIR knows
    (export / "77654033" / "CR1").rename(export / "77654033" / "cr1")  # a CD copied with lower-case names
    record = read_dicomdir(export / "DICOMDIR")
    assert [f for f, _ in record.missing] == ["98892001/CT5N/3353"] and len(record.files) == 30
    assert export / "77654033" / "cr1" / "6154" in record.files
    inputs, problems = find_inputs(export, series_filter="CT")
    reasons = {p["input"]: p["reason"] for p in problems}
    assert "lists 31 file(s); 1 of them are not in the folder (98892001/CT5N/3353)" in reasons[str(export / "DICOMDIR")]
    assert reasons[str(export / "98892001" / "CT5N")].startswith(
        "incomplete: the DICOMDIR lists 1 more file(s) of this series that are not in the folder (98892001/CT5N/3353)")
    assert inputs == []  # CT2 has a gap, CT2N is a scout, CT5N is incomplete


def test_a_phantom_series_among_another_series_and_localizers_gives_the_mask_of_the_series_alone(tmp_path):
    img = phantom_series_image()
    write_series(tmp_path / "alone" / "T2", img)
    uid = write_mixed_export(tmp_path / "export" / "PACS", img)
    alone, _ = find_inputs(tmp_path / "alone", series_filter="MR")
    inputs, problems = find_inputs(tmp_path / "export", series_filter="MR")
    t2 = next(i for i in inputs if i["series"]["series_uid"] == uid)
    assert sorted(i["series"]["series_description"] for i in inputs) == ["ADC", "T2 AX"]  # the second series too
    assert t2["name"] == f"PHANTOM01_MRI_PROSTATE_S3_T2_AX_{''.join(c for c in uid if c.isdigit())[-6:]}"
    assert len(t2["image"]) == img.GetDepth() and t2["input"].startswith("PHANTOM01 / MRI PROSTATE / series 3")
    assert t2["series"]["dropped"].startswith("1 localizer image(s) (ImageType LOCALIZER)")
    assert [p["reason"].split(",")[0] for p in problems] == [
        "not selected: a localizer (SeriesDescription '3-Plane Loc')"]

    masks = {}
    for key, items in (("alone", alone), ("mixed", [t2])):
        out = tmp_path / f"masks_{key}"
        summary = segment(items, tmp_path, out)
        assert summary.as_dict()["processed"] == 1
        (mask,) = out.glob("*_seg.nii.gz")
        masks[key] = nib.load(mask)
    np.testing.assert_allclose(masks["mixed"].affine, masks["alone"].affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(masks["mixed"].dataobj), np.asarray(masks["alone"].dataobj))
    assert 0 < np.asarray(masks["alone"].dataobj).mean() < 1  # a real mask, not all or nothing
    assert masks["alone"].shape == img.GetSize()


class Threshold(torch.nn.Module):
    """2.5D stand-in network: (B, 3, H, W) -> (B, 2, H, W) logits of 'centre slice z-score > 0.5'."""

    def forward(self, x):
        centre = x[:, 1:2] - 0.5
        return torch.cat([-centre, centre], dim=1)


def segment(items, input_dir, out):
    """The bundle's inference chain in-process (SimpleITK reader, z-score, 2.5D inferer, inverse, SaveMaskd)."""
    pre = Compose([LoadImaged("image", reader=SimpleITKReader(), image_only=True), EnsureChannelFirstd("image"),
                   VolumeGeometryd("image"), VolumeIntensityd("image"), EnsureTyped("image", dtype=torch.float32)])
    summary = InferenceSummary(str(input_dir), str(out))
    summary.begin(items)
    post = Compose([AsDiscreted("pred", argmax=True), Invertd("pred", transform=pre, orig_keys="image",
                                                              nearest_interp=True),
                    SaveMaskd("pred", output_dir=str(out), summary=summary)])
    loader = DataLoader(ScreenedDataset(items, pre), batch_size=1, collate_fn=screened_collate)
    FolderEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=Threshold().eval(),
                    inferer=Slab25DInferer(slices_per_batch=4, min_size=16), postprocessing=post,
                    summary=summary).run()
    return summary


def test_a_series_spread_over_two_folders_is_one_input_read_in_slice_order(tmp_path):
    vol = np.random.default_rng(3).integers(0, 900, (6, 5, 4)).astype(np.int16)  # (z, y, x)
    img = sitk_image(vol, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    uid = "1.2.826.0.1.3680043.2.1125.77"
    write_series(tmp_path / "CD" / "DIR000", img, series_uid=uid, skip=(3, 4, 5))
    write_series(tmp_path / "CD" / "DIR001", img, series_uid=uid, skip=(0, 1, 2), prefix="X")
    (inp,), problems = find_inputs(tmp_path, series_filter="MR")
    assert problems == [] and len(inp["image"]) == 6 and inp["series"]["folders"] == "CD/DIR000; CD/DIR001"
    reader = SimpleITKReader()
    array, meta = reader.get_data(reader.read(list(reversed(inp["image"]))))  # any order: sorted by position
    np.testing.assert_array_equal(array, vol.T)
    np.testing.assert_allclose(meta["affine"][:3, 3], np.array(img.GetOrigin()) * [-1, -1, 1], atol=1e-4)


def test_localizer_images_and_a_minority_orientation_are_dropped_and_named_the_stack_kept(tmp_path):
    vol = np.random.default_rng(4).integers(0, 900, (8, 6, 6)).astype(np.int16)
    axial = sitk_image(vol, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    uid = "1.2.826.0.1.3680043.2.1125.88"
    write_series(tmp_path / "T2", axial, series_uid=uid)
    scout = sitk.Image(6, 8, 1, sitk.sitkInt16)
    scout.SetDirection(SAGITTAL)
    write_series(tmp_path / "T2", scout, series_uid=uid, prefix="SCOUT",
                 tags={"0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER"})
    side = sitk.Image(6, 8, 2, sitk.sitkInt16)
    side.SetDirection((1.0, 0, 0, 0, 0, 1.0, 0, -1.0, 0))  # coronal, ImageType not marked
    write_series(tmp_path / "T2", side, series_uid=uid, prefix="COR")
    (inp,), problems = find_inputs(tmp_path)
    assert problems == []
    assert inp["name"] == "T2" and inp["input"] == str(tmp_path / "T2")  # alone in its folder: named as before
    assert [Path(p).name for p in inp["image"]] == [f"IM{k:04d}.dcm" for k in range(8)]
    dropped = inp["series"]["dropped"]
    assert "1 localizer image(s) (ImageType LOCALIZER): T2/SCOUT0000.dcm" in dropped
    assert "2 image(s) in 1 other orientation(s) than the main stack of 8 (localizers): T2/COR0000.dcm" in dropped
    reader = SimpleITKReader()
    np.testing.assert_array_equal(reader.get_data(reader.read(inp["image"]))[0], vol.T)

    # two stacks of the same size in one series: no main stack, skipped and named
    write_series(tmp_path / "two", sitk_image(vol[:3], direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)), series_uid="1.2.3.4")
    write_series(tmp_path / "two", sitk_image(vol[:3], direction=SAGITTAL), series_uid="1.2.3.4", prefix="S")
    _, problems = find_inputs(tmp_path / "two")
    assert "6 images in 2 orientations (3 + 3) and none holds most of them: no main stack" in problems[0]["reason"]


def test_a_corrupt_file_among_the_series_is_named_and_the_series_still_read(tmp_path):
    img = sitk_image(np.random.default_rng(5).integers(0, 900, (5, 6, 7)).astype(np.int16))
    write_series(tmp_path / "mixed", img, tags={"0010|0020": "P1"})
    write_series(tmp_path / "mixed", img, description="T1", prefix="T1_", tags={"0010|0020": "P1"})
    good = (tmp_path / "mixed" / "IM0002.dcm").read_bytes()
    (tmp_path / "mixed" / "broken.dcm").write_bytes(good[:400])  # truncated in its header
    (tmp_path / "mixed" / "garbage").write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64)
    inputs, problems = find_inputs(tmp_path)
    assert sorted(i["series"]["series_description"] for i in inputs) == ["T1", "T2 AX"]
    assert all(len(i["image"]) == 5 for i in inputs)
    reasons = {Path(p["input"]).name: p["reason"] for p in problems}
    assert set(reasons) == {"broken.dcm", "garbage"}
    assert all("DICOM file" in r for r in reasons.values())


def test_the_series_filter_takes_a_modality_keywords_with_patterns_or_json_and_refuses_unknown_keywords():
    assert not SeriesFilter(None) and not SeriesFilter("") and str(SeriesFilter({})) == "every series"
    mr = SeriesFilter("MR")
    assert mr.rejects({"Modality": "MR"}) is None and mr.rejects({"Modality": "mr"}) is None
    assert mr.rejects({"Modality": "CT"}) == "Modality 'CT' is not MR (series_filter Modality=MR)"
    assert mr.rejects({}) == "Modality (absent) is not MR (series_filter Modality=MR)"
    assert SeriesFilter("MR, CT").rejects({"Modality": "CT"}) is None
    t2 = SeriesFilter('{"Modality": "MR", "SeriesDescription": ["*T2*", "*tse*"]}')
    assert t2.keywords == ("Modality", "SeriesDescription")
    assert t2.rejects({"Modality": "MR", "SeriesDescription": "ax t2 prostate"}) is None
    assert "SeriesDescription 'ADC' does not match *T2* or *tse*" in t2.rejects({"Modality": "MR",
                                                                                 "SeriesDescription": "ADC"})
    assert SeriesFilter({"ImageType": "ORIGINAL"}).rejects({"ImageType": "ORIGINAL\\PRIMARY\\AXIAL"}) is None
    with pytest.raises(ValueError, match="'Modalty' is not a DICOM keyword"):
        SeriesFilter({"Modalty": "MR"})
    with pytest.raises(ValueError, match="not valid JSON"):
        SeriesFilter("{Modality: MR}")
    with pytest.raises(ValueError, match="must be a modality"):
        SeriesFilter(3)


def test_the_reader_takes_a_series_as_its_files_and_refuses_a_list_with_a_gap(tmp_path):
    img = sitk_image(np.random.default_rng(6).integers(0, 900, (5, 4, 3)).astype(np.int16))
    write_series(tmp_path / "s", img)
    files = sorted(str(p) for p in (tmp_path / "s").iterdir())
    uid_named = tmp_path / "s" / "1.2.840.113619.2.55.3.77"  # PACS exports name files by UID
    Path(files[0]).rename(uid_named)
    files[0] = str(uid_named)
    assert SimpleITKReader().verify_suffix(files)
    assert dicom_stack(files[::-1]) == [str(uid_named)] + files[1:]
    with pytest.raises(ValueError, match="slice positions are not evenly spaced"):
        dicom_stack(files[:2] + files[3:])
    assert dicom_stack(files[:1]) is None  # one file: read as a file


def test_the_summary_lists_not_selected_series_and_notes_without_an_error_and_each_series_with_its_input(tmp_path):
    series = {"series_uid": "1.2.3", "modality": "MR", "dropped": "1 localizer image(s) (ImageType LOCALIZER): IM9"}
    unusable = [{"input": "CT/5", "reason": "not selected: Modality 'CT' is not MR", "status": "not selected",
                 "series": {"series_uid": "1.2.5", "modality": "CT"}},
                {"input": "DICOMDIR", "reason": "DICOMDIR read: lists 3 file(s); all found", "status": "note"}]
    summary = InferenceSummary(str(tmp_path), str(tmp_path / "out"), unusable=unusable)
    summary.begin([{"image": ["IM1", "IM2"], "input": "P / S / series 3 'T2' (1.2.3)", "name": "x", "series": series}])
    summary.done("P / S / series 3 'T2' (1.2.3)", 1.0)
    result = summary.finish()  # no SystemExit: nothing was skipped
    assert result["processed"] == 1 and result["skipped"] == 0 and result["not_selected"] == 1
    assert result["inputs"][0]["series"] == series and result["not_selected_inputs"][0]["series"]["modality"] == "CT"
    assert result["dicom_series"] == {"found": 2, "segmented": 1, "skipped": 0, "not_selected": 1}
    assert json.loads((tmp_path / "out" / "inference_summary.json").read_text())["notes"][0]["input"] == "DICOMDIR"
    only_ct = InferenceSummary(str(tmp_path), str(tmp_path / "out2"), unusable=unusable[:1])
    with pytest.raises(SystemExit) as stop:  # nothing to segment at all: still exit status 1, saying why
        only_ct.finish()
    assert stop.value.code == 1


def test_ScreenedDataset_keeps_the_series_record_out_of_the_batch(tmp_path):
    img = sitk_image(np.random.default_rng(7).integers(0, 900, (4, 20, 20)).astype(np.int16))
    write_series(tmp_path / "a", img)
    (item,), _ = find_inputs(tmp_path)
    out = ScreenedDataset([item], Compose([LoadImaged("image", reader=SimpleITKReader(), image_only=True)]))[0]
    assert "series" not in out and out["input"] == str(tmp_path / "a") and "series" in item


def test_prepare_tool_converts_the_filtered_series_of_a_case_folder_holding_a_whole_study(tmp_path, capsys):
    import prepare_prostate_data

    site = tmp_path / "root" / "HOSP"
    images = {}
    for i in range(3):
        images[i] = phantom_series_image(seed=i, size=32, slices=6)
        write_mixed_export(site / f"Case{i:02d}", images[i])  # T2 + ADC + localizers, all in one folder
        mask = sitk.Cast(images[i] > 1500, sitk.sitkUInt8)
        sitk.WriteImage(mask, str(site / f"Case{i:02d}_segmentation.nii.gz"))
    assert prepare_prostate_data.main(["--root", str(tmp_path / "root")]) == 1  # two MR series per case: refused
    out = capsys.readouterr().out
    assert "HOSP/Case00/: expected one DICOM series, found PHANTOM01 / MRI PROSTATE / series 3 'T2 AX'" in out
    assert "set --series_filter to pick one" in out and "not selected: a localizer" in out
    t2 = json.dumps({"Modality": "MR", "SeriesDescription": "*T2*"})
    assert prepare_prostate_data.main(["--root", str(tmp_path / "root"), "--series_filter", t2, "--check"]) == 0
    out = capsys.readouterr().out
    assert "converted: HOSP/Case00/ -> Case00.nii.gz (series 3 'T2 AX'; dropped 1 localizer image(s)" in out
    assert "HOSP: 3 cases" in out
    converted = sitk.ReadImage(str(site / "Case01.nii.gz"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(converted), sitk.GetArrayFromImage(images[1]))
    np.testing.assert_allclose(converted.GetOrigin(), images[1].GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(converted.GetDirection(), images[1].GetDirection(), atol=1e-6)
