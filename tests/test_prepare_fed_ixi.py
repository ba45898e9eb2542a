"""tools/prepare_fed_ixi.py on a tiny tree in FLamby's IXI_sample layout."""

import json
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedharmony.data.datalist import load_datalist, make_datalist

import prepare_fed_ixi  # tools/ is on sys.path (conftest)

# patient id -> (center, FLamby split); 5 + 5 + 4 good subjects
SUBJECTS = {2: ("Guys", "test"), 3: ("Guys", "train"), 4: ("Guys", "train"), 5: ("Guys", "train"),
            6: ("Guys", "train"), 12: ("HH", "test"), 13: ("HH", "train"), 14: ("HH", "test"),
            15: ("HH", "train"), 16: ("HH", "train"), 20: ("IOP", "test"), 21: ("IOP", "train"),
            22: ("IOP", "train"), 23: ("IOP", "train")}
NO_LABEL = "IXI090-HH-0001"
CORRUPT = "IXI091-IOP-0002"
NOT_IN_CSV = "IXI099-Guys-0003"
UNPARSABLE = "notes-and-stuff"


def _name(pid, center):
    return f"IXI{pid:03d}-{center}-{1000 + pid:04d}"


def _subject(root, name, image=True, label=True):
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    for kind, wanted, data in (("T1", image, rng.integers(0, 500, (8, 10, 8)).astype(np.int16)),
                               ("label", label, (rng.random((8, 10, 8)) > 0.5).astype(np.uint8))):
        if wanted:
            suffix = "image" if kind == "T1" else "label"
            (root / name / kind).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, np.eye(4)), str(root / name / kind / f"{name}_{suffix}.nii.gz"))


@pytest.fixture
def ixi(tmp_path):
    src = tmp_path / "IXI_sample"
    for pid, (center, _) in SUBJECTS.items():
        _subject(src, _name(pid, center))
    # a modality the tool ignores
    (src / _name(2, "Guys") / "T2").mkdir()
    (src / _name(2, "Guys") / "T2" / "t2.nii.gz").write_bytes(b"ignored")
    _subject(src, NO_LABEL, label=False)
    _subject(src, CORRUPT)
    (src / CORRUPT / "T1" / f"{CORRUPT}_image.nii.gz").write_bytes(np.random.default_rng(0).bytes(300))
    _subject(src, NOT_IN_CSV)
    (src / UNPARSABLE).mkdir()
    rows = [f"{pid},{0},{split}" for pid, (_, split) in SUBJECTS.items()] + ["90,1,train", "91,2,train"]
    csv = tmp_path / "metadata_tiny.csv"
    csv.write_text("Patient ID,Manufacturer,Split\n" + "\n".join(rows) + "\n")
    return src, csv


def _run(*argv):
    return prepare_fed_ixi.main([str(a) for a in argv])


def _datalist(out, center):
    return json.loads((out / center / "datalist.json").read_text())


def _cases(dl, split):
    return {item["case"] for item in dl[split]}


def test_csv_split_is_kept_and_train_validation_is_seeded(ixi, tmp_path, capsys):
    src, csv = ixi
    assert _run("--source", src, "--out", tmp_path / "a", "--split", csv, "--seed", 3) == 0
    out = capsys.readouterr().out
    assert "Guys: 5 subjects -> training 3, validation 1, testing 1" in out
    assert f"{NOT_IN_CSV} (patient 99 is not in the --split CSV" in out
    for center in ("Guys", "HH", "IOP"):
        dl = _datalist(tmp_path / "a", center)
        train = {_name(p, c) for p, (c, s) in SUBJECTS.items() if c == center and s == "train"}
        test = {_name(p, c) for p, (c, s) in SUBJECTS.items() if c == center and s == "test"}
        train |= {CORRUPT} if center == "IOP" else set()  # in the CSV as train; only --check drops it
        assert _cases(dl, "testing") == test
        assert _cases(dl, "training") | _cases(dl, "validation") == train
        assert not _cases(dl, "training") & _cases(dl, "validation") and _cases(dl, "validation")
        item = dl["training"][0]
        assert item == {"image": f"{item['case']}/T1/{item['case']}_image.nii.gz",
                        "label": f"{item['case']}/label/{item['case']}_label.nii.gz", "case": item["case"]}
    assert NOT_IN_CSV not in json.dumps(_datalist(tmp_path / "a", "Guys"))
    assert _run("--source", src, "--out", tmp_path / "b", "--split", csv, "--seed", 3) == 0
    assert all(_datalist(tmp_path / "a", c) == _datalist(tmp_path / "b", c) for c in ("Guys", "HH", "IOP"))
    validations = set()
    for seed in range(8):
        _run("--source", src, "--out", tmp_path / f"s{seed}", "--split", csv, "--seed", seed, "--centers", "Guys")
        validations.add(frozenset(_cases(_datalist(tmp_path / f"s{seed}", "Guys"), "validation")))
    assert len(validations) > 1  # the seed does pick the validation subjects


def test_without_split_it_is_make_datalists_60_20_20(ixi, tmp_path):
    src, _ = ixi
    assert _run("--source", src, "--out", tmp_path / "out", "--seed", 5) == 0
    guys = sorted(_name(p, c) for p, (c, _) in SUBJECTS.items() if c == "Guys") + [NOT_IN_CSV]
    want = make_datalist({s: prepare_fed_ixi.subject_files(s) for s in guys}, 5)
    assert {k: v for k, v in _datalist(tmp_path / "out", "Guys").items() if k != "name"} == want
    assert [len(want[k]) for k in ("training", "validation", "testing")] == [4, 1, 1]


def test_bad_items_are_named_and_the_rest_are_prepared(ixi, tmp_path, capsys):
    src, _ = ixi
    _subject(src, "IXI200-Cam-0001")  # two other centers: one after IOP, one too small
    for pid in (201, 202, 203):
        _subject(src, f"IXI{pid}-Abe-0001")
    _subject(src, "IXI204-Tiny-0001")
    out_dir = tmp_path / "out"
    assert _run("--source", src, "--out", out_dir, "--check") == 0
    out = capsys.readouterr().out
    assert f"skipped: {src / NO_LABEL / 'label' / (NO_LABEL + '_label.nii.gz')} (no label" in out
    assert f"{CORRUPT}/T1/{CORRUPT}_image.nii.gz" in out and "cannot read NIfTI" in out
    assert f"skipped: {src / UNPARSABLE} (not an IXInnn-Center-nnnn subject folder)" in out
    assert "Tiny (only 1 usable subject(s)" in out and "Cam (only 1 usable" in out
    assert "IOP: 4 subjects" in out and "HH: 5 subjects" in out
    assert json.loads((out_dir / "sites.json").read_text()) == {
        "site-1": "Guys", "site-2": "HH", "site-3": "IOP", "site-4": "Abe"}
    everything = json.dumps([_datalist(out_dir, c) for c in ("Guys", "HH", "IOP")])
    assert NO_LABEL not in everything and CORRUPT not in everything
    assert not (out_dir / "Tiny").exists() and not (out_dir / "IOP" / CORRUPT).exists()
    copied = out_dir / "Guys" / _name(2, "Guys")
    assert (copied / "T1" / f"{_name(2, 'Guys')}_image.nii.gz").is_file()
    assert not (copied / "T1" / f"{_name(2, 'Guys')}_image.nii.gz").is_symlink()
    assert (copied / "label" / f"{_name(2, 'Guys')}_label.nii.gz").is_file() and not (copied / "T2").exists()
    assert (src / _name(2, "Guys") / "T1" / f"{_name(2, 'Guys')}_image.nii.gz").is_file()


def test_corrupt_file_is_listed_without_check_and_caught_with_it(ixi, tmp_path, capsys):
    src, csv = ixi
    assert _run("--source", src, "--out", tmp_path / "plain", "--split", csv) == 0
    assert CORRUPT in json.dumps(_datalist(tmp_path / "plain", "IOP"))
    assert "cannot read NIfTI" not in capsys.readouterr().out
    assert _run("--source", src, "--out", tmp_path / "checked", "--split", csv, "--check") == 0
    assert CORRUPT not in json.dumps(_datalist(tmp_path / "checked", "IOP"))
    assert f"skipped: {src / CORRUPT} (site 'IOP': cannot read NIfTI" in capsys.readouterr().out


def test_symlinks_then_copies_leave_the_source_alone(ixi, tmp_path):
    src, csv = ixi
    out_dir = tmp_path / "out"
    rel = prepare_fed_ixi.subject_files(_name(13, "HH"))[0]
    source_bytes = (src / rel).read_bytes()
    assert _run("--source", src, "--out", out_dir, "--split", csv, "--symlink") == 0
    assert (out_dir / "HH" / rel).is_symlink() and (out_dir / "HH" / rel).resolve() == (src / rel).resolve()
    assert _run("--source", src, "--out", out_dir, "--split", csv) == 0  # same split: copies replace the links
    assert not (out_dir / "HH" / rel).is_symlink() and (out_dir / "HH" / rel).read_bytes() == source_bytes
    assert (src / rel).is_file() and not (src / rel).is_symlink() and (src / rel).read_bytes() == source_bytes


def test_an_existing_different_datalist_is_kept_unless_overwrite(ixi, tmp_path, capsys):
    src, csv = ixi
    mine = tmp_path / "out" / "Guys" / "datalist.json"
    mine.parent.mkdir(parents=True)
    mine.write_text(json.dumps({"training": [{"image": "x.nii.gz", "label": "y.nii.gz"}]}))
    before = mine.read_text()
    assert _run("--source", src, "--out", tmp_path / "out", "--split", csv) == 0  # HH and IOP still written
    out = capsys.readouterr().out
    assert mine.read_text() == before and f"skipped: {mine} (exists with another split; kept" in out
    assert json.loads((tmp_path / "out" / "sites.json").read_text()) == {"site-1": "HH", "site-2": "IOP"}
    assert _run("--source", src, "--out", tmp_path / "out", "--split", csv, "--overwrite") == 0
    assert _cases(_datalist(tmp_path / "out", "Guys"), "testing") == {_name(2, "Guys")}


def test_the_written_datalist_loads(ixi, tmp_path):
    src, csv = ixi
    _run("--source", src, "--out", tmp_path / "out", "--split", csv)
    items = load_datalist(tmp_path / "out" / "Guys" / "datalist.json", "training", site="Guys")
    assert len(items) == 3
    for item in items:
        for key in ("image", "label"):
            assert item[key].startswith(str((tmp_path / "out" / "Guys").resolve())) and Path(item[key]).is_file()


@pytest.mark.parametrize("text, message", [
    ("Patient,Split\n2,test\n", "no column Patient ID"),
    ("Patient ID,Manufacturer,Split\n2,0,validation\n", "line 2: expected an integer Patient ID"),
    ("Patient ID,Manufacturer,Split\nx,0,test\n", "line 2: expected an integer Patient ID"),
    ("Patient ID,Manufacturer,Split\n2,0,test\n2,0,train\n", "patient 2 is listed as both"),
])
def test_a_bad_csv_is_an_error_naming_it(ixi, tmp_path, capsys, text, message):
    src, csv = ixi
    csv.write_text(text)
    with pytest.raises(SystemExit) as e:
        _run("--source", src, "--out", tmp_path / "out", "--split", csv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and str(csv) in err and message in err
    assert not (tmp_path / "out").exists()


def test_missing_csv_or_source_is_an_error(ixi, tmp_path, capsys):
    src, _ = ixi
    for argv in (["--source", src, "--out", tmp_path / "o", "--split", tmp_path / "nope.csv"],
                 ["--source", tmp_path / "nothing", "--out", tmp_path / "o"]):
        with pytest.raises(SystemExit) as e:
            _run(*argv)
        assert e.value.code == 2 and str(argv[-1] if "--split" in argv else argv[1]) in capsys.readouterr().err


def test_nothing_written_exits_1(ixi, tmp_path, capsys):
    src, _ = ixi
    assert _run("--source", src, "--out", tmp_path / "out", "--centers", "Nowhere") == 1
    assert "Nowhere (only 0 usable subject(s)" in capsys.readouterr().out
    assert not (tmp_path / "out" / "sites.json").exists()
