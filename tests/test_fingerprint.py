"""Data fingerprints (fedharmony.data.fingerprint, tools/fingerprint.py): header numbers per site, and the spacing
and crop a federation derives from them."""

import gzip
import json
import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO
from fedharmony.data.fingerprint import check_fingerprint, combine_fingerprints, scan_geometry, site_fingerprint

TOOL = [sys.executable, str(REPO / "tools" / "fingerprint.py")]


def _site(root, name, spacings, matrix=64, slice_mm=3.0):
    site = root / name
    site.mkdir(parents=True)
    items = []
    for i, mm in enumerate(spacings):
        image = np.zeros((matrix, matrix, 6), dtype=np.int16)
        nib.save(nib.Nifti1Image(image, np.diag([mm, mm, slice_mm, 1.0])), str(site / f"Case{i}.nii.gz"))
        items.append({"image": f"Case{i}.nii.gz", "label": f"Case{i}.nii.gz"})
    (site / "datalist.json").write_text(json.dumps({"training": items, "validation": [], "testing": []}))
    return site


def _fingerprint(site, inplane, fov, count=None):
    count = count or sum(inplane.values())
    return {"format": "fedharmony-fingerprint/1", "site": site, "count": count,
            "inplane_spacing_mm": inplane, "slice_spacing_mm": {"3.00": count}, "inplane_matrix": {"256": count},
            "inplane_fov_mm": fov}


def test_a_site_fingerprint_counts_each_scans_header_values_and_names_what_it_cannot_read(tmp_path):
    site = _site(tmp_path, "A", [0.5, 0.5, 0.625])
    (site / "Case3.nii.gz").write_bytes(b"not an image")
    listed = json.loads((site / "datalist.json").read_text())
    listed["training"].append({"image": "Case3.nii.gz", "label": "Case3.nii.gz"})
    (site / "datalist.json").write_text(json.dumps(listed))
    fp = site_fingerprint(site)
    assert fp["count"] == 3 and fp["unread"] == 1 and fp["unread_names"][0].startswith("Case3.nii.gz")
    assert fp["inplane_spacing_mm"] == {"0.500": 2, "0.625": 1} and fp["slice_spacing_mm"] == {"3.00": 3}
    assert fp["inplane_matrix"] == {"64": 3} and fp["inplane_fov_mm"] == {"32": 2, "40": 1}
    check_fingerprint(fp)  # what a site writes, a coordinator accepts


def test_the_geometry_comes_from_the_header_alone_and_finds_the_slice_axis(tmp_path):
    """A file whose voxels are cut off still gives its geometry: only the header is read. A volume stored with
    its slices first gives the same numbers as the usual layout."""
    nib.save(nib.Nifti1Image(np.ones((40, 50, 8), dtype=np.int16), np.diag([0.8, 0.8, 4.0, 1.0])),
             str(tmp_path / "full.nii.gz"))
    raw = gzip.decompress((tmp_path / "full.nii.gz").read_bytes())
    (tmp_path / "cut.nii").write_bytes(raw[:400])  # the 348-byte header and a few voxels
    geometry = scan_geometry(tmp_path / "cut.nii")
    assert geometry == pytest.approx({"inplane_spacing_mm": 0.8, "slice_spacing_mm": 4.0, "inplane_matrix": 45,
                                      "inplane_fov_mm": 36.0})
    affine = np.array([[0, 0.8, 0, 0], [0, 0, 0.8, 0], [4.0, 0, 0, 0], [0, 0, 0, 1]])  # axis 0 runs superior
    nib.save(nib.Nifti1Image(np.ones((8, 40, 50), dtype=np.int16), affine), str(tmp_path / "slices_first.nii.gz"))
    assert scan_geometry(tmp_path / "slices_first.nii.gz") == pytest.approx(geometry)


def test_the_federation_takes_the_pooled_median_spacing_and_a_crop_holding_the_median_field_of_view():
    fps = [_fingerprint("A", {"0.500": 3}, {"140": 3}), _fingerprint("B", {"0.625": 4}, {"160": 4}),
           _fingerprint("C", {"1.500": 1}, {"180": 1})]
    choice = combine_fingerprints(fps)
    # pooled: 0.5 x3, 0.625 x4, 1.5 x1 -> median of 8 values = 0.625; field of view 140 x3, 160 x4, 180 -> 160
    assert choice["pooled"]["inplane_spacing_mm"] == 0.625 and choice["pooled"]["inplane_fov_mm"] == 160
    assert choice["settings"] == {"pixdim": 0.625, "image_size": 256} and choice["scans"] == 8
    assert choice["outliers"] == ["C: median in-plane spacing 1.5 mm is 2.40 times the pooled 0.625 mm"]
    capped = combine_fingerprints(fps, max_image_size=96)
    assert capped["settings"]["image_size"] == 96 and capped["settings"]["pixdim"] * 96 >= 160
    assert "capped at image_size 96" in capped["why"][-1]


@pytest.mark.parametrize("change, message", [
    ({"format": "x"}, "not a site fingerprint"),
    ({"count": 0}, "'count' must be a positive integer"),
    ({"inplane_spacing_mm": {"abc": 3}}, "'inplane_spacing_mm' has a value that is not a number"),
    ({"inplane_spacing_mm": {"-1": 3}}, "is not a positive value with a count"),
    ({"inplane_fov_mm": {"140": 2}}, "'inplane_fov_mm' counts 2 scans, 'count' says 3"),
])
def test_a_malformed_fingerprint_is_refused_naming_the_site_and_the_field(change, message):
    fp = {**_fingerprint("A", {"0.500": 3}, {"140": 3}), **change}
    with pytest.raises(ValueError, match=f"A: .*{message}"):
        combine_fingerprints([fp], ["A"])


def test_the_tool_writes_each_sites_fingerprint_and_combines_them_into_bundle_settings(tmp_path):
    for name, spacings in (("A", [0.5, 0.5]), ("B", [0.5, 1.0])):
        _site(tmp_path / "data", name, spacings)
        res = subprocess.run(TOOL + ["site", "--dataset-dir", str(tmp_path / "data" / name), "--out",
                                     str(tmp_path / f"{name}.json")], capture_output=True, text=True)
        assert res.returncode == 0 and "fingerprint of 2 training scans" in res.stdout
    again = subprocess.run(TOOL + ["site", "--dataset-dir", str(tmp_path / "data" / "A"), "--out",
                                   str(tmp_path / "A.json")], capture_output=True, text=True)
    assert again.returncode == 2 and "exists: pass --overwrite" in again.stderr
    res = subprocess.run(TOOL + ["combine", str(tmp_path / "A.json"), str(tmp_path / "B.json"), "--out",
                                 str(tmp_path / "choice.json")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"pixdim": 0.5, "image_size": 64}
    assert json.loads((tmp_path / "choice.json").read_text())["sites"]["B"]["inplane_spacing_mm"] == 0.75
    (tmp_path / "bad.json").write_text("{}")
    res = subprocess.run(TOOL + ["combine", str(tmp_path / "bad.json")], capture_output=True, text=True)
    assert res.returncode == 2 and "not a site fingerprint" in res.stderr


def test_a_fingerprint_arm_gets_its_spacing_and_crop_from_the_seeds_training_sites(tmp_path):
    from fedharmony.study.runner import Study

    lines = []
    study = Study("prostate", ["fedavg", "fedavg+pixdim=fingerprint"], 1, "smoke", tmp_path, echo=lines.append)
    overrides = study.overrides(0, "fedavg+pixdim=fingerprint")
    assert isinstance(overrides["pixdim"], float) and overrides["pixdim"] > 0
    assert overrides["image_size"] % 16 == 0 and overrides["image_size"] > 0
    assert any("fingerprint, seed 0: pixdim" in line for line in lines)
    capped = study.overrides(0, "fedavg+pixdim=fingerprint+image_size=16")
    assert capped["image_size"] == 16 and capped["pixdim"] >= overrides["pixdim"]


@pytest.mark.integration
def test_a_federation_plans_its_spacing_from_the_sites_fingerprints_before_round_1(tiny_sites, tmp_path):
    """``--fingerprint`` in the real simulator (IOP-FL, so a model pool is written too): the server collects the two
    sites' fingerprints, writes its choice and reasons to fingerprint.json and its log, every site builds its
    bundle with that pixdim / image_size before training, and the pool's manifest holds them; the choice is the
    one the same math gives on the same folders."""
    from conftest import TINY_OVERRIDES, export_job, simulate

    job = export_job(tmp_path, "fp", "--fingerprint", "--fingerprint-max-image-size", "32", "--cross-site-timeout",
                     "300", algorithm="iopfl", rounds=1, sites=2)
    run = simulate(job, tmp_path / "ws", tiny_sites, sites=2, threads=2)
    chosen = json.loads((run / "fingerprint.json").read_text())
    expected = combine_fingerprints([site_fingerprint(tiny_sites / s) for s in ("BIDMC", "HK")], ["site-1", "site-2"],
                                    32)
    assert chosen["settings"] == expected["settings"] and set(chosen["fingerprints"]) == {"site-1", "site-2"}
    assert chosen["settings"]["image_size"] <= 32
    server_log = (tmp_path / "ws" / "server" / "log.txt").read_text()
    assert "fingerprint: pixdim" in server_log and "every site builds its bundle with" in server_log
    for site in ("site-1", "site-2"):
        site_log = (tmp_path / "ws" / site / "log.txt").read_text()
        assert f"preprocessing from the federation's fingerprint: {chosen['settings']}" in site_log
    assert (run / "app_server" / "FL_global_model.pt").is_file()  # training ran after the planning
    # every global checkpoint records the planned geometry as data, and the bundle's inference resamples with it
    meta = torch.load(run / "app_server" / "FL_global_model.pt", map_location="cpu", weights_only=True)["meta_props"]
    assert meta["preprocessing"] == {**chosen["settings"], "source": "fingerprint"}
    folder, out = tmp_path / "incoming", tmp_path / "masks"
    folder.mkdir()
    shutil.copy(tiny_sites / "HK" / "Case00.nii.gz", folder)
    bundle = REPO / "bundles" / "prostate_mri_seg"
    infer = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
             "--bundle_root", str(bundle), "--dataset_dir", str(folder), "--output_dir", str(out), "--ckpt_path",
             str(run / "app_server" / "FL_global_model.pt"), "--base_features", "4"]
    res = subprocess.run(infer, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (f"pixdim {chosen['settings']['pixdim']:g} mm, image_size {chosen['settings']['image_size']}"
            in res.stdout + res.stderr)
    mask = next(out.rglob("Case00*seg*.nii.gz"))  # put back on the scan's own grid
    assert nib.load(mask).shape == nib.load(folder / "Case00.nii.gz").shape
    res = subprocess.run(infer + ["--pixdim", "1.5", "--output_dir", str(tmp_path / "other")], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode != 0 and "GeometryMismatch" in res.stdout + res.stderr
    assert f"trained at pixdim {chosen['settings']['pixdim']:g}" in res.stdout + res.stderr
    # IOP-FL's model pool records the planned spacing, so routed inference resamples as the sites trained
    manifest = json.loads((run / "model_pool" / "manifest.json").read_text())
    assert {k: manifest["overrides"][k] for k in ("pixdim", "image_size")} == chosen["settings"]
    # a hand-set pixdim and --fingerprint: refused when the job is built, naming both
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "prostate.py"), "--fingerprint", "--override",
                          json.dumps({**TINY_OVERRIDES, "pixdim": 1.5}), "--export", "--export-dir",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert res.returncode == 2 and "fingerprint chooses ['pixdim', 'image_size']" in res.stderr
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "prostate.py"), "--fingerprint", "--algorithm",
                          "harmofl", "--export", "--export-dir", str(tmp_path / "x")], capture_output=True, text=True)
    assert res.returncode == 2 and "plan pixdim and image_size with tools/fingerprint.py" in res.stderr


@pytest.mark.integration
def test_a_job_stops_before_training_when_a_site_does_not_take_the_planned_preprocessing(tmp_path):
    """Headers in the wrong unit (150 mm pixels at both sites) plan a pixdim the sites' bundle does not accept (its
    tunables stop at 100 mm): every site refuses ``set_preprocessing``, and the server stops the job before round 1,
    naming the sites and the settings, rather than let them train on other inputs than the plan."""
    from conftest import NVFLARE, export_job

    root = tmp_path / "data"
    for name in ("site-1", "site-2"):
        _site(root, name, [150.0, 150.0], matrix=32)
    job = export_job(tmp_path, "fp_refused", "--fingerprint", "--no-cross-site-eval", rounds=1, sites=2)
    ws = tmp_path / "ws"
    subprocess.run([NVFLARE, "simulator", str(job), "-w", str(ws), "-n", "2", "-t", "2"], capture_output=True,
                   text=True, timeout=900, env={**os.environ, "FEDHARMONY_DATA_ROOT": str(root)})
    run = ws / "server" / "simulate_job"
    chosen = json.loads((run / "fingerprint.json").read_text())
    assert chosen["settings"]["pixdim"] == 150.0
    server_log = (ws / "server" / "log.txt").read_text()
    assert "did not take the planned preprocessing" in server_log and "['site-1', 'site-2']" in server_log
    assert "every site builds its bundle with" not in server_log
    for site in ("site-1", "site-2"):
        site_log = (ws / site / "log.txt").read_text()
        assert "task 'set_preprocessing' not run: override 'pixdim': must be <= 100, got 150.0" in site_log
        assert "preprocessing from the federation's fingerprint" not in site_log
    assert not (run / "app_server" / "FL_global_model.pt").exists()  # no round ran
