"""Phantom classification sites (histology, dermoscopy) and the preparation / loading of their layouts."""

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedharmony.data.classification import (CAMELYON_DIR, DERMOSCOPY_CSV_COLUMNS, class_counts, class_counts_markdown,
                                            find_images, load_classification_datalist, prepare_camelyon17,
                                            prepare_dermoscopy)
from fedharmony.data.datalist import SPLITS, SiteDataError
from fedharmony.phantom import (dermoscopy_markdown, histology_markdown, load_dermoscopy_profiles,
                                load_histology_profiles, make_lesion_image, make_patch,
                                write_dermoscopy_sites, write_histology_sites)
from fedharmony.phantom.dermoscopy import split_class_counts
from fedharmony.phantom.histology import separate_stains, stain_matrix

TINY_HISTO = dict(patients=3, patches_per_patient=4, size=32)  # 12 patches per hospital
TINY_DERM = dict(images_per_site=24, size=32)
PATCH_RE = re.compile(r"^patches/patient_(\d{3})_node_(\d)/patch_patient_\1_node_\2_x_(\d+)_y_(\d+)\.png$")


@pytest.fixture(scope="module")
def histo_sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("histo")
    sites = write_histology_sites(out, list(load_histology_profiles().values()), seed=0, **TINY_HISTO)
    return out, sites


@pytest.fixture(scope="module")
def derm_sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("derm")
    sites = write_dermoscopy_sites(out, list(load_dermoscopy_profiles().values()), seed=0, **TINY_DERM)
    return out, sites


def _items(site_dir, split, check=False):
    return load_classification_datalist(Path(site_dir) / "datalist.json", split, check=check)


def _auc(pos, neg):
    pos, neg = np.asarray(pos)[:, None], np.asarray(neg)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def _nearest_centroid_accuracy(x, y):
    """Fit class centroids on every other pair of samples, test on the rest."""
    x, y = np.asarray(x, float), np.asarray(y)
    train = (np.arange(len(y)) // len(set(y))) % 2 == 0
    classes = sorted(set(y))
    cents = np.stack([x[train & (y == c)].mean(0) for c in classes])
    pred = np.asarray(classes)[((x[~train][:, None] - cents[None]) ** 2).sum(-1).argmin(1)]
    return float((pred == y[~train]).mean())


# ------------------------------------------------------------------------------------------- profiles

def test_default_profiles_are_the_real_sites():
    histo = load_histology_profiles()
    assert list(histo) == [f"hospital_{c}" for c in range(5)]
    assert [p.center for p in histo.values()] == list(range(5))
    derm = load_dermoscopy_profiles()
    assert list(derm) == ["clientA", "clientB", "clientC", "clientD"]
    assert [p.dataset for p in derm.values()] == ["vidir_modern", "vidir_molemax", "rosendahl", "msk_isic2017"]
    assert [p.class_counts for p in derm.values()] == [(1282, 333, 476), (2604, 87, 17), (562, 343, 239),
                                                      (960, 178, 262)]


@pytest.mark.parametrize("loader,entry,field", [
    (load_histology_profiles, {"name": "h9", "center": 9, "h_scale": -1.0}, "h_scale"),
    (load_histology_profiles, {"name": "h9", "center": 9, "jpeg_quality": "high"}, "jpeg_quality"),
    (load_histology_profiles, {"name": "h9", "center": 9, "white_balance": [1, 1]}, "white_balance"),
    (load_histology_profiles, {"name": "h9", "center": 9, "stain": 1}, "stain"),
    (load_dermoscopy_profiles, {"name": "clientX", "dataset": "d", "class_counts": [1, 1, 1], "frame_radius": 3},
     "frame_radius"),
    (load_dermoscopy_profiles, {"name": "clientX", "dataset": "d", "class_counts": [1, 1]}, "class_counts"),
    (load_dermoscopy_profiles, {"name": "clientX", "dataset": "d", "class_counts": [1, 1, 1], "hairs": 2}, "hairs"),
])
def test_bad_profile_value_names_profile_and_field(tmp_path, loader, entry, field):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"sites": [entry]}))
    with pytest.raises(ValueError) as err:
        loader(f)
    assert entry["name"] in str(err.value) and field in str(err.value)


def test_duplicate_center_is_refused(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"sites": [{"name": "a", "center": 1}, {"name": "b", "center": 1}]}))
    with pytest.raises(ValueError, match="'b'.*center"):
        load_histology_profiles(f)


def test_profile_file_adds_an_unseen_site(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps({"sites": [{"name": "hospital_9", "center": 9, "h_hue_deg": 30, "e_scale": 2.0}]}))
    profiles = load_histology_profiles(f)
    assert list(profiles) == ["hospital_9"]
    img = make_patch(profiles["hospital_9"], 0, 0, True, size=32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    g = tmp_path / "q.json"
    g.write_text(json.dumps({"sites": [{"name": "clientZ", "dataset": "new", "class_counts": [5, 3, 2]}]}))
    assert make_lesion_image(load_dermoscopy_profiles(g)["clientZ"], 0, 0, 2, size=32).shape == (32, 32, 3)


def test_markdown_tables_list_every_site():
    h = histology_markdown(list(load_histology_profiles().values()))
    d = dermoscopy_markdown(list(load_dermoscopy_profiles().values()))
    assert h.startswith("| profile | site folder |") and all(f"hospital_{c}" in h for c in range(5))
    assert d.startswith("| site | dataset |") and all(f"client{x}" in d for x in "ABCD")
    assert "2604 / 87 / 17" in d


# ------------------------------------------------------------------------------------------- images

def test_histology_patch_same_seed_same_bytes_different_seed_different():
    p = load_histology_profiles()["hospital_1"]
    a, b, c = make_patch(p, 3, 5, True, 48), make_patch(p, 3, 5, True, 48), make_patch(p, 4, 5, True, 48)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_dermoscopy_image_same_seed_same_bytes_different_seed_different():
    p = load_dermoscopy_profiles()["clientC"]
    a, b = make_lesion_image(p, 3, 5, 2, 64), make_lesion_image(p, 3, 5, 2, 64)
    c, d = make_lesion_image(p, 4, 5, 2, 64), make_lesion_image(p, 3, 5, 2, 64, view=1)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, d)


def test_written_phantom_is_byte_identical_for_the_same_seed(tmp_path):
    prof = [load_dermoscopy_profiles()["clientB"]]
    write_dermoscopy_sites(tmp_path / "a", prof, seed=1, images_per_site=18, size=32)
    write_dermoscopy_sites(tmp_path / "b", prof, seed=1, images_per_site=18, size=32, workers=2)
    write_dermoscopy_sites(tmp_path / "c", prof, seed=2, images_per_site=18, size=32)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (tmp_path / "a" / "csv_folder/clientB/train_clientB.csv").read_bytes() != \
        (tmp_path / "c" / "csv_folder/clientB/train_clientB.csv").read_bytes()


def test_sites_differ_in_mean_colour():
    for profiles, make in ((load_histology_profiles(), lambda p, i: make_patch(p, 0, i, i % 2 == 1, 64)),
                           (load_dermoscopy_profiles(), lambda p, i: make_lesion_image(p, 0, i, i % 3, 64))):
        means = np.stack([np.mean([make(p, i).reshape(-1, 3).mean(0) for i in range(12)], axis=0)
                          for p in profiles.values()])
        dist = np.sqrt(((means[:, None] - means[None]) ** 2).sum(-1))
        off_diagonal = dist[~np.eye(len(means), dtype=bool)]
        assert off_diagonal.min() > 10, means.round(1)


def test_histology_classes_overlap_in_mean_colour_but_nuclei_stain_separates():
    p = load_histology_profiles()["hospital_0"]
    patches = [make_patch(p, 0, i, i % 2 == 1) for i in range(80)]
    labels = np.arange(80) % 2
    acc = _nearest_centroid_accuracy([im.reshape(-1, 3).mean(0) for im in patches], labels)
    assert acc < 0.9, f"mean colour separates the classes ({acc:.2f})"
    h = [separate_stains(im, np.vstack([stain_matrix(p), [[0.27, 0.57, 0.78]]]))[..., 0].mean() for im in patches]
    auc = _auc(np.asarray(h)[labels == 1], np.asarray(h)[labels == 0])
    assert auc > 0.65, f"haematoxylin amount does not separate tumour from normal (AUC {auc:.2f})"


def test_dermoscopy_classes_overlap_in_mean_colour_but_dark_area_separates():
    p = load_dermoscopy_profiles()["clientA"]
    images = [make_lesion_image(p, 0, i, i % 3).astype(np.float32) for i in range(72)]
    labels = np.arange(72) % 3
    acc = _nearest_centroid_accuracy([im.reshape(-1, 3).mean(0) for im in images], labels)
    assert acc < 0.85, f"mean colour separates the classes ({acc:.2f})"
    grey = [im.mean(-1) for im in images]
    dark = np.array([(g < 0.6 * np.median(g)).mean() for g in grey])
    auc = _auc(dark[labels == 2], dark[labels == 1])
    assert auc > 0.7, f"the dark area does not separate melanoma from keratosis (AUC {auc:.2f})"


# ------------------------------------------------------------------------------------------- layouts

def test_histology_layout_names_and_header(histo_sites):
    out, sites = histo_sites
    root = out / CAMELYON_DIR
    lines = (root / "metadata.csv").read_text().splitlines()
    assert lines[0] == ",patient,node,x_coord,y_coord,tumor,slide,center,split"
    rows = list(csv.DictReader(lines))
    assert len(rows) == 5 * 12 and [int(r[""]) for r in rows] == list(range(60))
    assert {r["center"] for r in rows} == {"0", "1", "2", "3", "4"} and {r["tumor"] for r in rows} == {"0", "1"}
    assert all(re.fullmatch(r"\d{3}", r["patient"]) for r in rows)  # zero-padded, as WILDS writes it
    for r in rows:
        p, n = int(r["patient"]), int(r["node"])
        rel = f"patches/patient_{p:03d}_node_{n}/patch_patient_{p:03d}_node_{n}_x_{r['x_coord']}_y_{r['y_coord']}.png"
        assert PATCH_RE.match(rel) and (root / rel).is_file(), rel
        assert p // 20 == int(r["center"])  # real numbering: center c owns patients 20c .. 20c+19
    with Image.open(root / rel) as im:
        assert im.mode == "RGB" and im.size == (32, 32)
    assert [s.name for s in sites] == [f"hospital_{c}" for c in range(5)]
    assert json.loads((out / "sites.json").read_text()) == {f"site-{c + 1}": f"hospital_{c}" for c in range(5)}
    dl = json.loads((sites[0] / "datalist.json").read_text())
    assert dl["name"] == "hospital_0" and dl["classes"] == ["normal", "tumor"]
    assert all(it["image"].startswith("../camelyon17_v1.0/patches/patient_") for s in SPLITS for it in dl[s])


def test_dermoscopy_layout_names_and_headers(derm_sites):
    out, sites = derm_sites
    assert [s.name for s in sites] == ["clientA", "clientB", "clientC", "clientD"]
    assert json.loads((out / "sites.json").read_text()) == {f"site-{i + 1}": f"client{x}" for i, x in enumerate("ABCD")}
    datasets = dict(zip("ABCD", ["vidir_modern", "vidir_molemax", "rosendahl", "msk_isic2017"]))
    for x in "ABCD":
        client = f"client{x}"
        for stem in ("train", "valid", "test"):
            path = out / "csv_folder" / client / f"{stem}_{client}.csv"
            lines = path.read_text().splitlines()
            assert lines[0] == "image_id,label,label_binary,lesion_id,dx,dx_type,age,sex,localization,dataset"
            assert tuple(lines[0].split(",")) == DERMOSCOPY_CSV_COLUMNS
            for row in csv.DictReader(lines):
                assert re.fullmatch(r"ISIC_\d{7}", row["image_id"]) and re.fullmatch(r"HAM_\d{7}", row["lesion_id"])
                assert row["dx"] == ["nv", "bkl", "mel"][int(row["label"])]
                assert row["label_binary"] == ("1" if row["dx"] == "mel" else "0")
                assert row["dataset"] == datasets[x]
                assert (out / client / "img_resize128" / f"{row['image_id']}.png").is_file()
        dl = json.loads((out / client / "datalist.json").read_text())
        assert dl["name"] == client and dl["classes"] == ["nv", "bkl", "mel"]
        assert all(re.fullmatch(r"img_resize128/ISIC_\d{7}\.png", it["image"]) for s in SPLITS for it in dl[s])


def test_dermoscopy_class_balance_follows_the_real_sources(derm_sites):
    profiles = load_dermoscopy_profiles()
    for name, p in profiles.items():
        plan = split_class_counts(p, 200)
        per_class = np.sum([plan[s] for s in SPLITS], axis=0)
        assert per_class.sum() == 200 and all(min(plan[s]) >= 2 for s in SPLITS)  # floor: 2 per class per split
        if name != "clientB":  # proportions follow the real source (within rounding / floor)
            share, real = per_class / 200, np.asarray(p.class_counts) / sum(p.class_counts)
            assert np.abs(share - real).max() < 0.03, (name, share, real)
    b = np.sum([split_class_counts(profiles["clientB"], 200)[s] for s in SPLITS], axis=0)
    assert b[0] / b.sum() > 0.85  # clientB (MoleMax) is almost only naevi
    out, sites = derm_sites  # the written sites hold exactly the planned counts
    for site in sites:
        counts = class_counts(site / "datalist.json")
        plan = split_class_counts(profiles[site.name], TINY_DERM["images_per_site"])
        assert {s: list(counts[s].values()) for s in SPLITS} == plan


def test_no_patient_or_lesion_in_two_splits(histo_sites, derm_sites):
    for _, sites in (histo_sites, derm_sites):
        for site in sites:
            cases = [{it["case"] for it in _items(site, s)} for s in SPLITS]
            assert all(cases) and not (cases[0] & cases[1] or cases[0] & cases[2] or cases[1] & cases[2]), site
    out, _ = histo_sites  # and the datalist's case is the patient of the metadata row
    rows = list(csv.DictReader((out / CAMELYON_DIR / "metadata.csv").read_text().splitlines()))
    patient_of = {f"patch_patient_{r['patient']}_node_{r['node']}_x_{r['x_coord']}_y_{r['y_coord']}.png":
                  f"patient_{r['patient']}" for r in rows}
    items = _items(out / "hospital_2", "training")
    assert items and all(patient_of[Path(it["image"]).name] == it["case"] for it in items)


def test_prepare_on_the_phantom_layouts_gives_the_generators_datalists(histo_sites, derm_sites, tmp_path):
    out, sites = histo_sites
    again = prepare_camelyon17(out / CAMELYON_DIR, tmp_path / "h", seed=0)
    assert [s.name for s in again] == [s.name for s in sites]
    for a, b in zip(sites, again):
        for split in SPLITS:
            assert _items(a, split, check=True) == _items(b, split, check=True)
    out, sites = derm_sites
    again = prepare_dermoscopy(out, out / "csv_folder", out_dir=tmp_path / "d")
    for a, b in zip(sites, again):
        assert json.loads((a / "datalist.json").read_text())["name"] == b.name
        for split in SPLITS:
            assert _items(a, split, check=True) == _items(b, split, check=True)
    before = (sites[0] / "datalist.json").read_bytes()
    prepare_dermoscopy(out, out / "csv_folder")  # in place: the same file
    assert (sites[0] / "datalist.json").read_bytes() == before
    # the dermoscopy datalist is the CSVs' split, image for image
    for stem, split in (("train", "training"), ("valid", "validation"), ("test", "testing")):
        rows = list(csv.DictReader((out / "csv_folder/clientA" / f"{stem}_clientA.csv").open()))
        got = {(Path(it["image"]).stem, it["label"], it["case"]) for it in _items(sites[0], split)}
        assert got == {(r["image_id"], int(r["label"]), r["lesion_id"]) for r in rows}


def test_prepare_camelyon17_subsamples_per_hospital_with_the_seed(histo_sites, tmp_path):
    out, _ = histo_sites
    a = prepare_camelyon17(out / CAMELYON_DIR, tmp_path / "a", seed=0, patches_per_hospital=9)
    b = prepare_camelyon17(out / CAMELYON_DIR, tmp_path / "b", seed=0, patches_per_hospital=9)
    c = prepare_camelyon17(out / CAMELYON_DIR, tmp_path / "c", seed=1, patches_per_hospital=9)
    assert all(sum(len(_items(s, sp)) for sp in SPLITS) == 9 for s in a)
    assert (a[0] / "datalist.json").read_text() == (b[0] / "datalist.json").read_text()
    assert any((x / "datalist.json").read_text() != (y / "datalist.json").read_text() for x, y in zip(a, c))


def test_loader_gives_absolute_paths_int_labels_and_class_counts_table(derm_sites):
    out, sites = derm_sites
    items = load_classification_datalist(sites[2] / "datalist.json", "testing", site="clientC")
    assert items and all(Path(it["image"]).is_absolute() and Path(it["image"]).is_file() for it in items)
    assert all(isinstance(it["label"], int) and 0 <= it["label"] < 3 for it in items)
    table = class_counts_markdown(sites)
    assert table.splitlines()[0].startswith("| site | images | training (nv / bkl / mel)")
    assert "| clientB | 24 |" in table


def test_find_images_lists_a_folders_images_and_names_everything_else(derm_sites, tmp_path):
    out, _ = derm_sites
    folder = out / "clientB" / "img_resize128"
    (folder / "notes.txt").write_text("not an image")
    (folder / "predictions").mkdir()
    (folder / "scans").mkdir()
    (folder / ".hidden").write_text("")
    items, problems = find_images(folder, exclude=[folder / "predictions"])
    assert len(items) == 24 and all(it["image"].endswith(".png") and Path(it["image"]).is_absolute() for it in items)
    assert {Path(p["input"]).name: p["reason"] for p in problems} == {
        "notes.txt": "not an image file (.png, .jpg, .jpeg, .bmp, .tif, .tiff)",
        "scans": "a folder: images are read from the top level only"}
    (tmp_path / "empty").mkdir()
    assert find_images(tmp_path / "empty") == ([], [])  # nothing to do is not an error; the summary says 0
    with pytest.raises(SiteDataError, match="input folder not found"):
        find_images(tmp_path / "missing")


# ------------------------------------------------------------------------------------------- bad input

@pytest.fixture()
def derm_copy(derm_sites, tmp_path):
    out, _ = derm_sites
    shutil.copytree(out, tmp_path / "d")
    site = tmp_path / "d" / "clientA"
    dl = json.loads((site / "datalist.json").read_text())
    return site, dl


def test_corrupt_png_is_named(derm_copy):
    site, dl = derm_copy
    bad = site / dl["validation"][1]["image"]
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(SiteDataError) as err:
        load_classification_datalist(site / "datalist.json", "validation", site="clientA")
    assert str(bad.resolve()) in str(err.value) and "clientA" in str(err.value)


def test_truncated_png_is_named(derm_copy):
    site, dl = derm_copy
    bad = site / dl["training"][0]["image"]
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(SiteDataError, match=re.escape(bad.name)):
        load_classification_datalist(site / "datalist.json", "training", site="clientA")


def test_missing_image_is_named(derm_copy):
    site, dl = derm_copy
    gone = site / dl["testing"][0]["image"]
    gone.unlink()
    with pytest.raises(SiteDataError, match=f"not found: {re.escape(str(gone.resolve()))}"):
        load_classification_datalist(site / "datalist.json", "testing", site="clientA")


def test_grey_image_is_refused_as_not_rgb(derm_copy):
    site, dl = derm_copy
    path = site / dl["testing"][0]["image"]
    Image.new("L", (32, 32), 128).save(path)
    with pytest.raises(SiteDataError, match=f"{re.escape(path.name)} has mode 'L'"):
        load_classification_datalist(site / "datalist.json", "testing", site="clientA")


def test_opaque_rgba_is_accepted_transparent_rgba_is_named(derm_copy):
    site, dl = derm_copy  # the real Camelyon17-WILDS patches are opaque RGBA (OpenSlide read_region)
    path = site / dl["testing"][0]["image"]
    Image.open(path).convert("RGBA").save(path)
    assert load_classification_datalist(site / "datalist.json", "testing", site="clientA")
    Image.new("RGBA", (32, 32), (10, 20, 30, 0)).save(path)
    with pytest.raises(SiteDataError, match=f"{re.escape(path.name)} is RGBA with transparent pixels"):
        load_classification_datalist(site / "datalist.json", "testing", site="clientA")


@pytest.mark.parametrize("label,match", [(3, "label 3 outside"), (-1, "label -1 outside"), (1.0, "not an integer"),
                                         ("mel", "not an integer"), (True, "not an integer"), (None, "no 'label'")])
def test_bad_label_is_named(derm_copy, label, match):
    site, dl = derm_copy
    if label is None:
        del dl["training"][2]["label"]
    else:
        dl["training"][2]["label"] = label
    (site / "datalist.json").write_text(json.dumps(dl))
    with pytest.raises(SiteDataError) as err:
        load_classification_datalist(site / "datalist.json", "training", site="clientA")
    assert match in str(err.value) and "datalist.json" in str(err.value) and "training[2]" in str(err.value)


def test_num_classes_argument_bounds_labels(derm_sites):
    _, sites = derm_sites
    with pytest.raises(SiteDataError, match="outside \\[0, 1\\)"):
        load_classification_datalist(sites[0] / "datalist.json", "training", num_classes=1, check=False)


def test_missing_datalist_split_and_empty_split_are_named(derm_copy):
    site, dl = derm_copy
    with pytest.raises(SiteDataError, match="datalist not found: .*nowhere.json"):
        load_classification_datalist(site / "nowhere.json", "training", site="clientA")
    with pytest.raises(SiteDataError, match="has no 'train' list"):
        load_classification_datalist(site / "datalist.json", "train", site="clientA")
    dl["validation"] = []
    (site / "datalist.json").write_text(json.dumps(dl))
    with pytest.raises(SiteDataError, match="'validation' list is empty"):
        load_classification_datalist(site / "datalist.json", "validation", site="clientA")


def test_lesion_in_two_csv_splits_is_named(derm_copy):
    site, _ = derm_copy
    csv_dir = site.parent / "csv_folder" / "clientA"
    train = (csv_dir / "train_clientA.csv").read_text().splitlines()
    row = train[1].split(",")
    lesion = row[3]
    with (csv_dir / "test_clientA.csv").open("a") as fh:  # the same lesion, another image, in the test split
        shutil.copy(site / "img_resize128" / f"{row[0]}.png", site / "img_resize128" / "ISIC_9999999.png")
        fh.write(",".join(["ISIC_9999999"] + row[1:]) + "\n")
    with pytest.raises(SiteDataError) as err:
        prepare_dermoscopy(site.parent, site.parent / "csv_folder", clients=["clientA"])
    msg = str(err.value)
    assert lesion in msg and "train_clientA.csv" in msg and "test_clientA.csv" in msg


def test_bad_csv_label_and_missing_csv_are_named(derm_copy):
    site, _ = derm_copy
    csv_dir = site.parent / "csv_folder" / "clientA"
    path = csv_dir / "valid_clientA.csv"
    lines = path.read_text().splitlines()
    fields = lines[3].split(",")
    lines[3] = ",".join(fields[:1] + ["7"] + fields[2:])
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(SiteDataError, match=f"{re.escape(str(path))} line 4: label 7 outside"):
        prepare_dermoscopy(site.parent, site.parent / "csv_folder", clients=["clientA"])
    path.unlink()
    with pytest.raises(SiteDataError, match=f"split CSV not found: {re.escape(str(path))}"):
        prepare_dermoscopy(site.parent, site.parent / "csv_folder", clients=["clientA"])


def test_split_csv_found_by_prefix_as_prrfl_does(derm_copy):
    site, dl = derm_copy
    csv_dir = site.parent / "csv_folder" / "clientA"
    (csv_dir / "test_clientA.csv").rename(csv_dir / "test_clientA_2017.csv")
    prepare_dermoscopy(site.parent, site.parent / "csv_folder", clients=["clientA"])
    assert json.loads((site / "datalist.json").read_text())["testing"] == dl["testing"]


def test_missing_patch_and_bad_metadata_are_named(histo_sites, tmp_path):
    out, _ = histo_sites
    root = tmp_path / CAMELYON_DIR
    shutil.copytree(out / CAMELYON_DIR, root)
    victim = sorted((root / "patches").rglob("*.png"))[3]
    victim.unlink()
    with pytest.raises(SiteDataError, match=re.escape(str(victim))):
        prepare_camelyon17(root, tmp_path / "sites")
    meta = root / "metadata.csv"
    meta.write_text(meta.read_text().replace(",tumor,", ",label,", 1))
    with pytest.raises(SiteDataError, match=r"metadata.csv: column\(s\) \['tumor'\] missing"):
        prepare_camelyon17(root, tmp_path / "sites")


def test_prepare_needs_three_patients_per_hospital(histo_sites, tmp_path):
    out, _ = histo_sites
    rows = (out / CAMELYON_DIR / "metadata.csv").read_text().splitlines()
    keep = [rows[0]] + [r for r in rows[1:] if r.split(",")[1] in ("000", "001")]  # 2 patients of center 0
    root = tmp_path / "root"
    root.mkdir()
    (root / "metadata.csv").write_text("\n".join(keep) + "\n")
    with pytest.raises(SiteDataError, match="site 'hospital_0'.*2 patient"):
        prepare_camelyon17(root, tmp_path / "sites", check_files=False)


# ------------------------------------------------------------------------------------------- CLIs

def test_generator_cli_writes_sites_and_prints_counts(tmp_path, capsys):
    import make_phantom_classification as cli

    assert cli.main(["--task", "dermoscopy", "--out", str(tmp_path / "d"), "--sites", "clientB",
                     "--images-per-site", "18", "--size", "32", "--workers", "1"]) == 0
    text = capsys.readouterr().out
    assert "| clientB | 18 | 2 / 2 / 2 | 2 / 2 / 2 | 2 / 2 / 2 |" in text and "wrote 1 dermoscopy site(s)" in text
    assert cli.main(["--task", "histology", "--out", str(tmp_path / "h"), "--sites", "hospital_3",
                     "--patients", "3", "--patches-per-patient", "2", "--size", "32", "--workers", "1"]) == 0
    assert (tmp_path / "h" / "hospital_3" / "datalist.json").is_file()
    assert cli.main(["--task", "histology", "--list-profiles"]) == 0
    assert "| hospital_4 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv,needle", [
    (["--task", "histology", "--out", "x", "--colour", "red"], "--colour"),
    (["--task", "xray", "--out", "x"], "xray"),
    (["--task", "dermoscopy", "--out", "x", "--patients", "4"], "--patients"),
    (["--task", "dermoscopy", "--out", "x", "--images-per-site", "10"], "at least 18"),
    (["--task", "histology", "--out", "x", "--images-per-site", "20", "--patches-per-patient", "3"], "not both"),
    (["--task", "histology", "--out", "x", "--size", "8"], "--size must be at least 32"),
    (["--task", "histology", "--out", "x", "--sites", "hospital_7"], "hospital_7"),
    (["--task", "histology"], "--out is required"),
])
def test_generator_cli_rejects_bad_flags(argv, needle, capsys):
    import make_phantom_classification as cli

    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and needle in capsys.readouterr().err


def test_generator_cli_names_a_bad_profile_file(tmp_path, capsys):
    import make_phantom_classification as cli

    f = tmp_path / "p.json"
    f.write_text(json.dumps({"sites": [{"name": "clientQ", "dataset": "q", "class_counts": [3, 2, 1], "noise": -1}]}))
    with pytest.raises(SystemExit):
        cli.main(["--task", "dermoscopy", "--out", str(tmp_path / "o"), "--profiles", str(f)])
    err = capsys.readouterr().err
    assert "clientQ" in err and "'noise'" in err


def test_prepare_clis(histo_sites, derm_sites, tmp_path, capsys):
    import prepare_dermoscopy_data
    import prepare_histology_data

    out, _ = histo_sites
    assert prepare_histology_data.main(["--wilds-root", str(out / CAMELYON_DIR), "--out", str(tmp_path / "h"),
                                        "--patches-per-hospital", "6"]) == 0
    assert "| hospital_4 | 6 |" in capsys.readouterr().out
    out, _ = derm_sites
    assert prepare_dermoscopy_data.main(["--data-dir", str(out), "--csv-folder", str(out / "csv_folder"),
                                         "--out", str(tmp_path / "d")]) == 0
    assert "| clientD | 24 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        prepare_histology_data.main(["--wilds-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
    assert "nowhere is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        prepare_dermoscopy_data.main(["--data-dir", str(out), "--csv-folder", str(tmp_path / "nocsv")])
    assert "--csv-folder" in capsys.readouterr().err
    assert prepare_dermoscopy_data.main(["--data-dir", str(out), "--csv-folder", str(out / "csv_folder"),
                                         "--clients", "clientZ", "--out", str(tmp_path / "z")]) == 1
    assert "split CSV not found" in capsys.readouterr().err
