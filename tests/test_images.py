"""SimpleITKReader, DICOM series, find_inputs and DICOM sites in the prostate preparation tool (fast, no federation)."""

import json
import os

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from pydicom.uid import generate_uid

from fedharmony.data.datalist import SPLITS, load_datalist
from fedharmony.data.images import SimpleITKReader, attach_labels, convert_to_nifti, find_inputs

from conftest import sitk_image, write_non_image_dicom, write_series

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def volume(shape_xyz=(7, 6, 5), seed=0):
    """A volume with no symmetry, so any axis swap or flip shows; (z, y, x) as SimpleITK's arrays."""
    return np.random.default_rng(seed).integers(0, 1000, shape_xyz[::-1]).astype(np.int16)


def expected_affine(img):
    """RAS affine of a SimpleITK image, computed here from the DICOM/ITK (LPS) definition."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    return LPS_TO_RAS @ affine


def load(path, reader=None):
    """LoadImaged + EnsureChannelFirstd, with ``reader`` or MONAI's default choice (NibabelReader for NIfTI)."""
    kwargs = {"reader": reader} if reader is not None else {}
    return Compose([LoadImaged(keys="image", image_only=True, **kwargs),
                    EnsureChannelFirstd(keys="image")])({"image": str(path)})["image"]


def assert_same_as_nibabel(path):
    mine, ref = load(path, SimpleITKReader()), load(path)
    assert mine.shape == ref.shape
    assert torch.allclose(mine.as_tensor().double(), ref.as_tensor().double(), atol=1e-5)
    np.testing.assert_allclose(mine.affine.numpy(), ref.affine.numpy(), atol=1e-5)
    return mine, ref


# NIfTI affines: LPS-stored, LAS-stored, and axes permuted (array x runs along A, y along R, z along I)
AFFINES = {
    "LPS": np.diag([-1.3, -0.7, 3.0, 1.0]),
    "LAS": np.diag([-1.3, 0.7, 3.0, 1.0]),
    "permuted": np.array([[0, -0.7, 0, 0], [1.3, 0, 0, 0], [0, 0, -3.0, 0], [0, 0, 0, 1]], dtype=float),
}


@pytest.mark.parametrize("kind", sorted(AFFINES))
def test_reader_equals_nibabel_for_flipped_and_permuted_niftis(tmp_path, kind):
    affine = AFFINES[kind].copy()
    affine[:3, 3] = [12.5, -40.25, 7.0]
    data = np.random.default_rng(1).random((7, 6, 5), dtype=np.float32)
    path = tmp_path / f"{kind}.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    mine, _ = assert_same_as_nibabel(path)
    np.testing.assert_allclose(mine.affine.numpy(), affine, atol=1e-5)
    assert mine.shape == (1, 7, 6, 5)
    assert mine.meta["space"] == "RAS" and str(mine.meta["filename_or_obj"]) == str(path)
    assert list(mine.meta["spatial_shape"]) == [7, 6, 5]


def test_reader_meta_dict_has_monais_keys(tmp_path):
    path = tmp_path / "v.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 3, 2), np.float32), AFFINES["LPS"]), str(path))
    reader = SimpleITKReader()
    array, meta = reader.get_data(reader.read(path))
    assert array.shape == (4, 3, 2)
    assert np.isnan(meta["original_channel_dim"]) and meta["space"] == "RAS"
    np.testing.assert_allclose(meta["affine"], AFFINES["LPS"], atol=1e-6)
    np.testing.assert_allclose(meta["original_affine"], meta["affine"])
    assert list(meta["spatial_shape"]) == [4, 3, 2] and meta["filename_or_obj"] == str(path)


def test_reader_keeps_every_volume_of_a_4d_nifti(tmp_path):
    path = tmp_path / "dwi.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(2).random((5, 4, 3, 2), dtype=np.float32), AFFINES["LAS"]),
             str(path))
    reader = SimpleITKReader()
    array, meta = reader.get_data(reader.read(path))
    assert array.shape == (5, 4, 3, 2) and meta["original_channel_dim"] == -1
    mine, _ = assert_same_as_nibabel(path)
    assert mine.shape == (2, 5, 4, 3)  # both volumes, channel first


def test_dicom_series_reads_back_with_the_volumes_array_and_geometry(tmp_path):
    vol = volume()
    img = sitk_image(vol)
    series = write_series(tmp_path / "Case00", img)
    nifti = tmp_path / "Case00.nii.gz"
    sitk.WriteImage(img, str(nifti))  # the same volume as NIfTI, read by MONAI's NibabelReader below
    mine, ref = load(series, SimpleITKReader()), load(nifti)
    assert mine.shape == (1, 7, 6, 5)
    np.testing.assert_array_equal(mine[0].numpy(), vol.T)
    np.testing.assert_array_equal(mine.numpy(), ref.numpy())
    np.testing.assert_allclose(mine.affine.numpy(), expected_affine(img), atol=1e-4)
    np.testing.assert_allclose(ref.affine.numpy(), expected_affine(img), atol=1e-4)


def test_reader_refuses_a_folder_with_two_series_unless_one_is_named(tmp_path):
    uid = generate_uid()
    write_series(tmp_path / "mixed", sitk_image(volume(seed=3)), series_uid=uid)
    write_series(tmp_path / "other", sitk_image(volume((7, 6, 4), seed=4)))
    for f in (tmp_path / "other").iterdir():
        f.rename(tmp_path / "mixed" / f"B{f.name}")
    with pytest.raises(ValueError, match="holds 2 DICOM series"):
        SimpleITKReader().read(tmp_path / "mixed")
    reader = SimpleITKReader(series_name=uid)
    array, _ = reader.get_data(reader.read(tmp_path / "mixed"))
    np.testing.assert_array_equal(array, volume(seed=3).T)


def _bundle_chain(tmp_path):
    """preprocessing / postprocessing as a bundle config would build them with the reader."""
    from monai.bundle import ConfigParser

    parser = ConfigParser({
        "imports": ["$import fedharmony", "$import fedharmony.data.images"],  # as the bundle configs import
        "pre": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "reader": "$fedharmony.data.images.SimpleITKReader()",
             "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"}]},
        "post": {"_target_": "Compose", "transforms": [
            {"_target_": "Invertd", "keys": "pred", "transform": "@pre", "orig_keys": "image",
             "nearest_interp": True, "to_tensor": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": str(tmp_path / "out"), "output_postfix": "seg",
             "output_dtype": "$numpy.uint8", "resample": False, "separate_folder": False, "print_log": False}]},
    })
    return parser.get_parsed_content("pre"), parser.get_parsed_content("post")


@pytest.mark.parametrize("stored_as", ["nifti", "dicom"])
def test_bundle_config_chain_saves_the_mask_with_the_inputs_geometry(tmp_path, stored_as):
    vol = volume()
    img = sitk_image(vol)
    if stored_as == "dicom":
        src = write_series(tmp_path / "Case00", img)
    else:
        src = tmp_path / "Case00.nii.gz"
        sitk.WriteImage(img, str(src))
    pre, post = _bundle_chain(tmp_path)
    item = pre({"image": str(src)})
    assert item["image"].shape == (1, 7, 5, 6)  # Orientationd swapped y and z: the coronal volume is now RAS
    item["pred"] = (item["image"] > 500).to(torch.uint8)  # a "segmentation" in the RAS-oriented space
    post(item)
    saved = nib.load(str(tmp_path / "out" / "Case00_seg.nii.gz"))
    np.testing.assert_allclose(saved.affine, expected_affine(img), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), (vol.T > 500).astype(np.uint8))


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm"])
def test_reader_reads_pydicoms_scanner_files_like_pydicom(name):
    from pydicom.data import get_testdata_file
    from pydicom.pixels import apply_modality_lut

    path = get_testdata_file(name)  # shipped in pydicom's wheel, no download
    ds = pydicom.dcmread(path)
    reader = SimpleITKReader()
    array, meta = reader.get_data(reader.read(path))
    assert array.shape == (ds.Columns, ds.Rows, 1)  # (x, y, z): pydicom's (row, column) transposed
    np.testing.assert_allclose(array[:, :, 0].T, apply_modality_lut(ds.pixel_array, ds))
    np.testing.assert_allclose(meta["spacing"][:2], [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0])])
    lps = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(meta["affine"][:3, 3], lps * [-1, -1, 1], atol=1e-4)


def test_find_inputs_splits_a_folder_with_two_series_and_keeps_the_series_next_to_it_as_before(tmp_path):
    write_series(tmp_path / "patient1" / "T2", sitk_image(volume()))
    mixed = tmp_path / "patient1" / "mixed"
    write_series(mixed, sitk_image(volume()), description="T2 AX", tags={"0010|0020": "P1", "0020|0011": "4"})
    write_series(mixed, sitk_image(volume((7, 6, 3))), description="ADC", prefix="BIM", tags={"0010|0020": "P1"})
    inputs, problems = find_inputs(tmp_path)
    assert problems == []
    alone = next(i for i in inputs if isinstance(i["image"], str))  # one series in a folder: the folder, as before
    assert alone["image"] == str(tmp_path / "patient1" / "T2") and alone["name"] == "patient1_T2"
    assert "input" not in alone and alone["series"]["folders"] == "patient1/T2"
    t2, adc = sorted((i for i in inputs if i is not alone), key=lambda i: i["series"]["series_description"],
                     reverse=True)
    assert [len(t2["image"]), len(adc["image"])] == [5, 3]  # each series its own input: the list of its files
    assert all(os.path.dirname(f) == str(mixed) for f in t2["image"] + adc["image"])
    assert t2["input"] == f"P1 / {t2['series']['study_date']} / series 4 'T2 AX' ({t2['series']['series_uid']})"
    uid_digits = "".join(c for c in t2["series"]["series_uid"] if c.isdigit())
    assert t2["name"] == f"P1_{t2['series']['study_date']}_S4_T2_AX_{uid_digits[-6:]}"
    assert adc["name"].startswith(f"P1_{adc['series']['study_date']}_ADC_")  # no series number: left out
    reader = SimpleITKReader()
    np.testing.assert_array_equal(reader.get_data(reader.read(adc["image"]))[0], volume((7, 6, 3)).T)


def test_find_inputs_names_the_gap_of_a_series_with_a_missing_slice(tmp_path):
    series = write_series(tmp_path / "Case07", sitk_image(volume()), skip=(3,))
    inputs, problems = find_inputs(tmp_path)
    assert inputs == []
    assert problems[0]["input"] == str(series)
    reason = problems[0]["reason"]
    assert "not evenly spaced" in reason and "IM0002.dcm and IM0004.dcm" in reason
    assert "6.00 mm" in reason and "3.00 mm apart" in reason and "1 slice(s) missing" in reason


def test_find_inputs_reports_dicom_files_without_pixel_data(tmp_path):
    series = write_series(tmp_path / "Case00", sitk_image(volume()))
    report = write_non_image_dicom(series / "report.dcm")
    dicomdir = write_non_image_dicom(tmp_path / "DICOMDIR", sop_class="1.2.840.10008.1.3.10", modality="OT")
    inputs, problems = find_inputs(tmp_path)
    assert [i["image"] for i in inputs] == [str(series)]  # the series beside the report is still an input
    reasons = {p["input"]: p["reason"] for p in problems}
    assert set(reasons) == {str(report), str(dicomdir)}
    assert "without an image" in reasons[str(report)] and "structured report" in reasons[str(report)]
    assert "DICOMDIR" in reasons[str(dicomdir)]


def test_find_inputs_reports_text_files_and_other_image_formats(tmp_path):
    (tmp_path / "notes.txt").write_text("patient list")
    sitk.WriteImage(sitk_image(volume()), str(tmp_path / "scan.mha"))
    inputs, problems = find_inputs(tmp_path)
    reasons = {p["input"]: p["reason"] for p in problems}
    assert inputs == []
    assert reasons[str(tmp_path / "notes.txt")] == "not an image SimpleITK or the DICOM reader can open"
    assert "only NIfTI files and DICOM series" in reasons[str(tmp_path / "scan.mha")]


def test_find_inputs_skips_masks_hidden_files_datalists_and_the_output_folder(tmp_path):
    img = np.zeros((2, 2, 2), np.float32)
    for name in ["Case00.nii.gz", "Case00_segmentation.nii.gz", "Case01_SEG.nii", "sub/Case00.nii",
                 "predictions/Case00_out.nii.gz", ".hidden/Case09.nii.gz"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(img, np.eye(4)), str(tmp_path / name))
    write_series(tmp_path / "Case02_segmentation", sitk_image(volume()))  # a mask stored as a DICOM series
    for name in [".DS_Store", "datalist.json", "sites.json"]:
        (tmp_path / name).write_text("{}")
    inputs, problems = find_inputs(tmp_path, exclude=tmp_path / "predictions")
    assert inputs == [{"image": str(tmp_path / "Case00.nii.gz"), "name": "Case00"},
                      {"image": str(tmp_path / "sub" / "Case00.nii"), "name": "sub_Case00"}]
    assert problems == []
    inputs, problems = find_inputs(tmp_path, recursive=False, exclude=[tmp_path / "predictions"])
    assert [i["name"] for i in inputs] == ["Case00"]
    assert {p["input"] for p in problems} == {str(tmp_path / "sub"), str(tmp_path / "Case02_segmentation")}
    assert all("not searched" in p["reason"] for p in problems)


def test_find_inputs_names_are_unique_and_filesystem_safe(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    for name in ["a b.nii", "a b.nii.gz", "x/y.nii.gz", "x_y.nii.gz"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        nib.save(img, str(tmp_path / name))
    write_series(tmp_path / "MR" / "T2 (ax)", sitk_image(volume()))
    names = [i["name"] for i in find_inputs(tmp_path)[0]]
    assert len(names) == 5 and len(set(names)) == 5
    assert all(n == os.path.basename(n) and n.replace("_", "").replace("-", "").replace(".", "").isalnum()
               for n in names)
    assert "MR_T2_ax" in names and "a_b" in names and "x_y" in names


def test_find_inputs_missing_folder_raises_and_an_empty_folder_is_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="input folder not found: .*nowhere"):
        find_inputs(tmp_path / "nowhere")
    assert find_inputs(tmp_path) == ([], [])


def _nifti(path, shape):
    nib.save(nib.Nifti1Image(np.zeros(shape, np.uint8), np.eye(4)), str(path))
    return path


def test_attach_labels_gives_the_labelled_inputs_their_labels_and_checks_every_label_first(tmp_path):
    site, labels = tmp_path / "site", tmp_path / "labels"
    site.mkdir()
    labels.mkdir()
    for case in ("Case00", "Case01", "Case02"):
        _nifti(site / f"{case}.nii.gz", (8, 8, 4))
    inputs, _ = find_inputs(site)
    _nifti(labels / "Case01_segmentation.nii.gz", (8, 8, 4))
    _nifti(labels / "Case02_segmentation.nii", (8, 8, 4, 1))  # .nii and a trailing axis of 1 are labels too
    (labels / "notes.txt").write_text("not a label")  # other files are no concern of the labels'
    items = attach_labels(inputs, labels)
    assert [i.get("label") for i in items] == [None, str(labels / "Case01_segmentation.nii.gz"),
                                               str(labels / "Case02_segmentation.nii")]
    assert [i["image"] for i in items] == [i["image"] for i in inputs] and "label" not in inputs[1]  # a copy

    with pytest.raises(FileNotFoundError, match="labelled_dir not found"):
        attach_labels(inputs, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no label map"):
        attach_labels(inputs, empty)
    _nifti(labels / "Case7_segmentation.nii.gz", (8, 8, 4))  # a typo: matches no input, named with the inputs
    with pytest.raises(ValueError, match=r"match no input: Case7_segmentation.nii.gz \(inputs: Case00, Case01"):
        attach_labels(inputs, labels)
    (labels / "Case7_segmentation.nii.gz").unlink()
    _nifti(labels / "Case01_segmentation.nii.gz", (8, 8, 5))
    with pytest.raises(ValueError, match=r"Case01_segmentation.nii.gz has shape \(8, 8, 5\), its input .*\(8, 8, 4\)"):
        attach_labels(inputs, labels)
    (labels / "Case01_segmentation.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(ValueError, match="Case01_segmentation.nii.gz cannot be read"):
        attach_labels(inputs, labels)
    _nifti(labels / "Case01_segmentation.nii.gz", (8, 8, 4))
    (site / "Case02.nii.gz").write_bytes(b"damaged")  # a damaged input is skipped later, as without labels
    assert "label" in attach_labels(inputs, labels)[2]


def test_convert_to_nifti_keeps_geometry_and_never_overwrites(tmp_path):
    img = sitk_image(volume())
    series = write_series(tmp_path / "Case00", img)
    out = convert_to_nifti(series, tmp_path / "Case00.nii.gz")
    saved = nib.load(str(out))
    np.testing.assert_array_equal(np.asarray(saved.dataobj), volume().T)
    np.testing.assert_allclose(saved.affine, expected_affine(img), atol=1e-4)
    with pytest.raises(FileExistsError, match="Case00.nii.gz"):
        convert_to_nifti(series, out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_prepare_tool_converts_a_dicom_site_and_writes_a_datalist_the_bundle_loads(tmp_path, capsys):
    import prepare_prostate_data

    site = tmp_path / "root" / "HOSP"
    site.mkdir(parents=True)
    images = {}
    for i in range(5):
        vol = volume(seed=10 + i)
        images[i] = sitk_image(vol, origin=(i, 2.0 * i, -3.0))
        mask = sitk.GetImageFromArray((vol > 500).astype(np.uint8))
        mask.CopyInformation(images[i])
        if i == 1:  # mask stored as a DICOM series too
            write_series(site / "Case01_segmentation", sitk.Cast(mask, sitk.sitkInt16))
        else:
            sitk.WriteImage(mask, str(site / f"Case{i:02d}_segmentation.nii.gz"))
        if i == 3:  # a plain NIfTI case beside the DICOM ones
            sitk.WriteImage(images[i], str(site / "Case03.nii.gz"))
        else:
            write_series(site / f"Case{i:02d}", images[i], skip=(2,) if i == 4 else ())  # Case04 misses a slice
    assert prepare_prostate_data.main(["--root", str(tmp_path / "root"), "--check"]) == 0
    out = capsys.readouterr().out
    for case in ("Case00", "Case01", "Case01_segmentation", "Case02"):
        assert f"converted: HOSP/{case}/ -> {case}.nii.gz" in out
    assert "HOSP/Case04: slice positions are not evenly spaced" in out  # the bad series is named ...
    assert "HOSP/Case04_segmentation.nii.gz: mask without its image" in out
    assert "HOSP: 4 cases" in out and not (site / "Case04.nii.gz").exists()  # ... and the rest goes on
    cases = set()
    for split in SPLITS:
        for item in load_datalist(site / "datalist.json", split, site="HOSP", check=True):
            assert item["image"].endswith(".nii.gz") and item["label"].endswith("_segmentation.nii.gz")
            cases.add(item["case"])
    assert cases == {"Case00", "Case01", "Case02", "Case03"}
    converted = nib.load(str(site / "Case02.nii.gz"))
    np.testing.assert_allclose(converted.affine, expected_affine(images[2]), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(converted.dataobj), volume(seed=12).T)
    # a second run keeps the converted files (and says so) unless --overwrite
    before = (site / "Case00.nii.gz").stat().st_mtime_ns
    assert prepare_prostate_data.main(["--root", str(tmp_path / "root")]) == 0
    assert "HOSP/Case00/: not converted, Case00.nii.gz exists and is used" in capsys.readouterr().out
    assert (site / "Case00.nii.gz").stat().st_mtime_ns == before
    assert json.loads((tmp_path / "root" / "sites.json").read_text()) == {"site-1": "HOSP"}


def test_nifti_inputs_need_no_simpleitk(tmp_path):
    """SimpleITK is imported at its first use: a NIfTI folder is scanned and loaded the way the inference configs
    load it (nibabel first) where SimpleITK is missing (the GPU machines: tools/gpu_check.py); DICOM needs it."""
    import subprocess
    import sys

    nib.save(nib.Nifti1Image(volume().T.astype(np.float32), np.eye(4)), str(tmp_path / "Case00.nii.gz"))
    code = (
        "import sys; sys.modules['SimpleITK'] = None\n"
        "from monai.transforms import LoadImage\n"
        "from fedharmony.data.images import SimpleITKReader, find_inputs, convert_to_nifti\n"
        f"inputs, problems = find_inputs({str(tmp_path)!r})\n"
        "assert [i['name'] for i in inputs] == ['Case00'] and not problems, (inputs, problems)\n"
        "image = LoadImage(reader=[SimpleITKReader(), 'NibabelReader'], image_only=True)(inputs[0]['image'])\n"
        "assert tuple(image.shape) == (7, 6, 5), image.shape\n"
        "try:\n"
        f"    convert_to_nifti({str(tmp_path / 'Case00.nii.gz')!r}, {str(tmp_path / 'copy.nii.gz')!r})\n"
        "except ImportError as e:\n"
        "    print('needs SimpleITK:', e)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "needs SimpleITK" in res.stdout
