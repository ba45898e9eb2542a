import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from fedharmony.data.datalist import SiteDataError, find_cases, load_datalist, split_cases


def test_split_is_by_case_disjoint_complete_and_seeded():
    ids = [f"Case{i:02d}" for i in range(13)]
    a = split_cases(ids, seed=5)
    assert a == split_cases(ids, seed=5)
    assert a != split_cases(ids, seed=6)
    sets = [set(a[s]) for s in ("training", "validation", "testing")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert set().union(*sets) == set(ids)
    assert all(len(s) >= 1 for s in sets)


def test_split_needs_three_cases():
    with pytest.raises(ValueError, match="at least 3"):
        split_cases(["Case00", "Case01"], 0)


def test_generated_datalist_loads_with_absolute_paths(tiny_sites):
    items = load_datalist(tiny_sites / "HK" / "datalist.json", "training", site="HK")
    assert items and all(item["image"].startswith("/") for item in items)


def _site_copy(tiny_sites, tmp_path):
    site = tmp_path / "BIDMC"
    shutil.copytree(tiny_sites / "BIDMC", site)
    dl = json.loads((site / "datalist.json").read_text())
    return site, dl["training"][0]


def test_corrupt_nifti_is_named(tiny_sites, tmp_path):
    site, item = _site_copy(tiny_sites, tmp_path)
    raw = gzip.decompress((site / item["image"]).read_bytes())
    (site / item["image"]).write_bytes(gzip.compress(raw[: len(raw) // 2])[:-20])  # truncated stream
    with pytest.raises(SiteDataError, match=item["image"].replace(".", r"\.")) as e:
        load_datalist(site / "datalist.json", "training", site="BIDMC")
    assert "BIDMC" in str(e.value)


def test_missing_file_is_named(tiny_sites, tmp_path):
    site, item = _site_copy(tiny_sites, tmp_path)
    (site / item["label"]).unlink()
    with pytest.raises(SiteDataError, match="file not found.*" + item["label"].replace(".", r"\.")):
        load_datalist(site / "datalist.json", "training", site="BIDMC")


def test_image_and_mask_of_different_shapes(tiny_sites, tmp_path):
    site, item = _site_copy(tiny_sites, tmp_path)
    seg = nib.load(str(site / item["label"]))
    nib.save(nib.Nifti1Image(np.asarray(seg.dataobj)[:, :, :-1], seg.affine), str(site / item["label"]))
    with pytest.raises(SiteDataError, match="shape"):
        load_datalist(site / "datalist.json", "training", site="BIDMC")


def test_nan_voxels_are_rejected(tiny_sites, tmp_path):
    site, item = _site_copy(tiny_sites, tmp_path)
    img = nib.load(str(site / item["image"]))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), str(site / item["image"]))
    with pytest.raises(SiteDataError, match="NaN"):
        load_datalist(site / "datalist.json", "training", site="BIDMC")


def test_empty_split_and_missing_datalist(tmp_path):
    with pytest.raises(SiteDataError, match="datalist not found"):
        load_datalist(tmp_path / "datalist.json", "training", site="X")
    (tmp_path / "datalist.json").write_text(json.dumps({"training": []}))
    with pytest.raises(SiteDataError, match="empty"):
        load_datalist(tmp_path / "datalist.json", "training", site="X")


def test_find_cases_accepts_both_mask_spellings_and_reports_skips(tiny_sites, tmp_path):
    site = tmp_path / "UCL"
    site.mkdir()
    src = tiny_sites / "HK"
    shutil.copy(src / "Case00.nii.gz", site / "Case00.nii.gz")
    shutil.copy(src / "Case00_segmentation.nii.gz", site / "Case00_Segmentation.nii.gz")
    shutil.copy(src / "Case01.nii.gz", site / "Case01.nii.gz")  # no mask
    (site / "notes.txt").write_text("x")
    cases, skipped = find_cases(site)
    assert cases == {"Case00": ("Case00.nii.gz", "Case00_Segmentation.nii.gz")}
    assert any("Case01.nii.gz: no mask" in s for s in skipped)
    assert any("notes.txt" in s for s in skipped)


def test_prepare_tool_on_phantom_output(tiny_sites, tmp_path, capsys):
    import prepare_prostate_data

    root = tmp_path / "real"
    shutil.copytree(tiny_sites, root)
    for dl in root.glob("*/datalist.json"):
        dl.unlink()
    (root / "HK" / "Case02_segmentation.nii.gz").write_bytes(b"not a nifti")
    assert prepare_prostate_data.main(["--root", str(root), "--check"]) == 0
    out = capsys.readouterr().out
    assert "BIDMC: 3 cases" in out
    assert "HK/Case02.nii.gz" in out and "no datalist written" in out  # HK drops to 2 usable cases
    assert (root / "BIDMC" / "datalist.json").is_file() and not (root / "HK" / "datalist.json").exists()
    assert json.loads((root / "sites.json").read_text()) == {"site-1": "BIDMC"}


def test_prepare_tool_keeps_an_existing_different_split(tiny_sites, tmp_path, capsys):
    import prepare_prostate_data

    root = tmp_path / "real"
    shutil.copytree(tiny_sites, root)
    mine = root / "BIDMC" / "datalist.json"
    mine.write_text(json.dumps({"training": [{"image": "Case00.nii.gz", "label": "Case00_segmentation.nii.gz"}]}))
    before = mine.read_text()
    prepare_prostate_data.main(["--root", str(root), "--seed", "7"])
    assert mine.read_text() == before and "kept (use --overwrite)" in capsys.readouterr().out
    prepare_prostate_data.main(["--root", str(root), "--seed", "7", "--overwrite"])
    assert json.loads(mine.read_text())["testing"]


@pytest.mark.parametrize("name", ["../IOP/datalist.json", "/etc/datalist.json", "sub/datalist.json",
                                  "a\\datalist.json", ".datalist.json", "..json", "datalist.txt", "", 5, None])
def test_datalist_file_is_a_json_file_name_in_the_site_folder_never_a_path(tmp_path, name):
    from fedharmony.data.datalist import datalist_path

    with pytest.raises(ValueError, match="datalist_file must be a .json file name in the site's data folder"):
        datalist_path(tmp_path, name)


def test_datalist_file_names_a_list_in_the_site_folder(tmp_path):
    from fedharmony.data.datalist import datalist_path

    assert datalist_path(tmp_path) == str(tmp_path / "datalist.json")
    assert datalist_path(tmp_path, "datalist_tissue.json") == str(tmp_path / "datalist_tissue.json")
