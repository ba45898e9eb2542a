"""The brain task: phantom sites on the MNI152 template, the derived brain bundle (MONAI's checks), a federated
job through the NVFlare simulator and ``monai.bundle run`` inference with its global model on a site's folder."""

import json
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from monai.bundle import ConfigWorkflow
from monai.bundle.properties import InferProperties, TrainProperties

from conftest import REPO, TINY_OVERRIDES, export_job, simulate

BRAIN = REPO / "bundles" / "brain_mri_seg"
SMOKE_DATA = {"cases": 3, "voxel_scale": 8, "grid_mm": 4}
TINY = {**TINY_OVERRIDES, "image_size": 32}


@pytest.fixture(scope="module")
def brain_sites(tmp_path_factory):
    from fedharmony.phantom.brain_mr import load_brain_profiles, write_brain_sites

    out = tmp_path_factory.mktemp("brain")
    profiles = list(load_brain_profiles().values())[:2]
    return write_brain_sites(out, profiles, seed=0, cases=3, voxel_scale=8, grid_mm=4)


# ------------------------------------------------------------------------------------------------ anatomy

def test_template_anatomy_keeps_nilearns_brain_mask_and_its_fractions_add_up():
    from nilearn.datasets import load_mni152_brain_mask

    from fedharmony.phantom.brain_mr import template_anatomy

    maps, brain = template_anatomy(4.0)
    reference_ml = float(np.asarray(load_mni152_brain_mask().dataobj).sum()) / 1000  # 1 mm voxels
    assert brain.sum() * 4.0 ** 3 / 1000 == pytest.approx(reference_ml, rel=0.03)
    total = sum(maps.values())
    assert total.max() <= 1 + 1e-5 and min(m.min() for m in maps.values()) >= 0
    inside = brain > 0.99  # grey + white matter + CSF fill the brain
    assert np.allclose((maps["grey_matter"] + maps["white_matter"] + maps["fluid"])[inside], 1, atol=1e-4)
    # the added head: skull and scalp around the brain, nothing of them inside it
    assert maps["bone"][inside].max() < 1e-4 and maps["bone"].sum() > 0 and maps["fat"].sum() > 0


def test_a_case_is_reproducible_from_profile_seed_and_index_and_cases_differ():
    from fedharmony.phantom.brain_mr import load_brain_profiles, make_brain_case

    profile = load_brain_profiles()["IOP"].coarser(6)
    a, mask_a, affine = make_brain_case(profile, 0, 0, grid_mm=4)
    b, mask_b, _ = make_brain_case(profile, 0, 0, grid_mm=4)
    c, mask_c, _ = make_brain_case(profile, 0, 1, grid_mm=4)
    assert np.array_equal(a, b) and np.array_equal(mask_a, mask_b)
    assert not np.array_equal(mask_a, mask_c)  # another deformation of the template
    acq = profile.scanner.acquisition
    assert a.dtype == np.int16 and a.shape[:2] == (acq.matrix[1], acq.matrix[0])
    assert np.allclose(np.diag(affine)[:3], [acq.fov_mm[1] / acq.matrix[1], acq.fov_mm[0] / acq.matrix[0],
                                             acq.slice_mm])
    volume_ml = mask_a.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000
    assert 1000 < volume_ml < 2800  # an adult brain mask (the template's is about 1.9 L), within a few scales
    assert a[mask_a > 0].mean() > 3 * a[mask_a == 0].mean()  # the brain shows above air and scalp on average


def test_the_sites_scan_the_same_brain_with_different_contrast():
    """The same deformed template through each site's sequence: grey/white contrast follows the signal
    equations (HH's 3 T inversion recovery strongest, IOP's gradient echo weakest)."""
    from fedharmony.phantom.brain_mr import case_anatomy, load_brain_profiles
    from fedharmony.phantom.mr import tissue_signal

    fractions, _ = case_anatomy([0, 0, 0], grid_mm=4)
    grey, white = fractions["grey_matter"] > 0.8, fractions["white_matter"] > 0.8
    contrast = {}
    for name, site in load_brain_profiles().items():
        signal = tissue_signal(fractions, site.scanner)
        contrast[name] = signal[white].mean() / signal[grey].mean()
    assert contrast["HH"] > contrast["Guys"] > contrast["IOP"] > 1


def test_coarser_voxels_keep_the_field_of_view_and_profiles_refuse_bad_values():
    from fedharmony.phantom.brain_mr import BrainMRSite, load_brain_profiles
    from fedharmony.phantom.mr import ProfileError

    guys = load_brain_profiles()["Guys"]
    coarse = guys.coarser(2).scanner.acquisition
    assert coarse.matrix == (128, 128) and coarse.slice_mm == pytest.approx(2.4)
    assert coarse.fov_mm == guys.scanner.acquisition.fov_mm
    with pytest.raises(ValueError, match="voxel scale"):
        guys.coarser(40)
    raw = json.loads((REPO / "custom/fedharmony/phantom/brain_mr_sites.json").read_text())["sites"][0]
    for change, field in (({"annotation": {"boundary_voxels": 2}}, "boundary_voxels"), ({"cases": 2}, "cases"),
                          ({"annotation": {"apex_base": "exclude"}}, "annotation"),
                          ({"sequence": {"kind": "IR", "tr_ms": 2000, "te_ms": 4.6}}, "ti_ms")):
        with pytest.raises(ProfileError, match=field):
            BrainMRSite.from_dict({**raw, **change})


def test_the_generator_writes_the_site_layout_and_refuses_prostate_only_flags(tmp_path):
    out = tmp_path / "brain"
    cmd = [sys.executable, str(REPO / "tools" / "make_phantom_sites.py"), "--phantom", "brain", "--out", str(out),
           "--sites", "IOP", "--cases", "3", "--voxel-scale", "8", "--workers", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert json.loads((out / "sites.json").read_text()) == {"site-1": "IOP"}
    datalist = json.loads((out / "IOP" / "datalist.json").read_text())
    assert sum(len(datalist[s]) for s in ("training", "validation", "testing")) == 3
    tissue = json.loads((out / "IOP" / "datalist_tissue.json").read_text())  # the same cases and splits
    for split in ("training", "validation", "testing"):
        assert [(i["case"], i["image"]) for i in tissue[split]] == [(i["case"], i["image"]) for i in datalist[split]]
        assert all(i["label"] == f"{i['case']}_tissue_segmentation.nii.gz" for i in tissue[split])
    assert nib.load(out / "IOP" / "Case00.nii.gz").shape[:2] == (24, 24)  # 192 / 8
    for bad, message in ((["--slices", "10"], "--list-profiles and --slices are for --phantom v1"),
                         (["--voxel-scale", "0.5"], "--voxel-scale must be in [1, 16], got 0.5"),
                         (["--sites", "NOPE"], "unknown site(s) ['NOPE']")):
        res = subprocess.run(cmd[:-6] + bad, capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and message in res.stderr, res.stderr


def test_a_site_folder_with_two_label_sets_gives_its_scans_alone_to_inference_and_to_preparation(brain_sites):
    from fedharmony.data.datalist import find_cases
    from fedharmony.data.images import find_inputs

    site = brain_sites / "HH"
    assert (site / "Case00_tissue_segmentation.nii.gz").is_file() and (site / "datalist_tissue.json").is_file()
    inputs, unusable = find_inputs(site)
    assert sorted(item["name"] for item in inputs) == ["Case00", "Case01", "Case02"] and unusable == []
    cases, skipped = find_cases(site)
    assert cases["Case00"] == ("Case00.nii.gz", "Case00_segmentation.nii.gz") and skipped == []


def test_the_tissue_labels_are_grey_and_white_matter_inside_the_brain_mask_and_leave_the_case_unchanged():
    from fedharmony.phantom.brain_mr import load_brain_profiles, make_brain_case

    profile = load_brain_profiles()["HH"].coarser(4)
    image, mask, affine = make_brain_case(profile, 0, 1, grid_mm=4)
    image_t, mask_t, affine_t, extra = make_brain_case(profile, 0, 1, grid_mm=4, tissue=True)
    assert np.array_equal(image, image_t) and np.array_equal(mask, mask_t) and np.array_equal(affine, affine_t)
    tissue = extra["tissue"]
    assert tissue.shape == mask.shape and set(np.unique(tissue)) == {0, 1, 2}
    assert not tissue[mask == 0].any()  # grey and white matter only inside the brain mask
    grey, white = (tissue == 1).sum(), (tissue == 2).sum()
    assert 0.5 < grey / white < 3.0, (grey, white)  # adult brains: about 1.2 to 1.5 times more grey than white
    # white matter lies deeper: its voxels are farther from outside the mask than grey matter's, on average
    from scipy.ndimage import distance_transform_edt

    depth = distance_transform_edt(mask > 0)
    assert depth[tissue == 2].mean() > depth[tissue == 1].mean()


# ------------------------------------------------------------------------------------------------ bundle

def test_the_brain_bundle_is_the_prostate_bundle_with_its_declared_values():
    res = subprocess.run([sys.executable, str(REPO / "tools" / "derive_bundle.py"), str(BRAIN), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    train = json.loads((BRAIN / "configs" / "train.json").read_text())
    prostate = json.loads((REPO / "bundles" / "prostate_mri_seg" / "configs" / "train.json").read_text())
    assert {k: v for k, v in train.items() if k != "dataset_dir"} == {k: v for k, v in prostate.items()
                                                                       if k != "dataset_dir"}


def test_derive_bundle_names_a_stale_file_and_refuses_an_override_the_source_lacks(tmp_path):
    bundles = tmp_path / "bundles"
    shutil.copytree(REPO / "bundles" / "prostate_mri_seg", bundles / "prostate_mri_seg")
    shutil.copytree(BRAIN, bundles / "brain_mri_seg")
    inference = bundles / "prostate_mri_seg" / "configs" / "inference.json"
    inference.write_text(inference.read_text().replace('"overwrite": false', '"overwrite": true'))
    tool = [sys.executable, str(REPO / "tools" / "derive_bundle.py"), str(bundles / "brain_mri_seg")]
    res = subprocess.run(tool + ["--check"], capture_output=True, text=True)
    assert res.returncode == 1 and "configs/inference.json: differs" in res.stdout
    assert subprocess.run(tool, capture_output=True, text=True).returncode == 0  # rewritten from the source
    assert json.loads((bundles / "brain_mri_seg" / "configs" / "inference.json").read_text())["overwrite"] is True
    assert json.loads((bundles / "brain_mri_seg" / "configs" / "inference.json").read_text())["segments"] == {
        "1": "brain"}
    spec = bundles / "brain_mri_seg" / "derived_from.json"
    raw = json.loads(spec.read_text())
    raw["overrides"]["configs/train.json"]["dataset_dri"] = "/x"
    spec.write_text(json.dumps(raw))
    res = subprocess.run(tool + ["--check"], capture_output=True, text=True)
    assert res.returncode == 2 and "dataset_dri" in res.stderr


@pytest.mark.parametrize("configs,workflow_type", [(["train.json"], "train"), (["inference.json"], "infer"),
                                                   (["train.json", "harmofl.json"], "train")])
def test_the_brain_bundle_passes_monais_property_checks(configs, workflow_type, brain_sites, tmp_path):
    site = brain_sites / "Guys"
    wf = ConfigWorkflow(config_file=[str(BRAIN / "configs" / c) for c in configs],
                        meta_file=str(BRAIN / "configs" / "metadata.json"), logging_file=False,
                        workflow_type=workflow_type, bundle_root=str(BRAIN), dataset_dir=str(site),
                        ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "out"), **TINY)
    wf.initialize()
    assert wf.check_properties() == []
    props = TrainProperties if workflow_type == "train" else InferProperties
    assert all(p["id"] in wf.parser for p in props.values() if p["required"])


# ------------------------------------------------------------------------------------------------ federation

@pytest.mark.integration
def test_a_federated_brain_job_trains_and_its_global_model_segments_a_folder_with_monai_bundle_run(
        brain_sites, tmp_path):
    job = export_job(tmp_path, script="brain.py", overrides=TINY, rounds=2, sites=2)
    run = simulate(job, tmp_path / "ws", brain_sites, sites=2)
    model = run / "app_server" / "best_FL_global_model.pt"
    assert model.is_file()
    folder = tmp_path / "incoming"
    folder.mkdir()
    for case in ("Case00", "Case01"):  # a folder as the hospital has it: scans only
        shutil.copy(brain_sites / "HH" / f"{case}.nii.gz", folder)
    out = tmp_path / "masks"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BRAIN / "configs" / "inference.json"),
           "--bundle_root", str(BRAIN), "--dataset_dir", str(folder), "--output_dir", str(out),
           "--ckpt_path", str(model), *[a for k, v in TINY.items() for a in (f"--{k}", json.dumps(v))]]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["processed"] == 2 and summary["skipped"] == 0, summary
    for record in summary["inputs"]:  # the brain bundle's own plausible range reviews each mask
        assert record["needs_review"] == (not 700 <= record["gland_volume_ml"] <= 2800), record
        assert not record["needs_review"] or "700-2800 mL" in record["review_reason"]
    for case in ("Case00", "Case01"):
        mask = next(out.rglob(f"{case}*seg*.nii.gz"))
        assert nib.load(mask).shape == nib.load(folder / f"{case}.nii.gz").shape


@pytest.mark.integration
def test_the_bundle_trains_and_segments_grey_and_white_matter_as_a_second_label_set(brain_sites, tmp_path):
    """``--num_classes 3 --datalist_file datalist_tissue.json``: one site trains a three-class network with
    ``monai.bundle run`` (validated on the mean Dice of grey and white matter), and inference writes each voxel's
    class, with one segment name for each class (the default single name is refused before any input); a
    datalist_file that is a path is refused."""
    import torch

    site = brain_sites / "HH"
    ckpt, evals = tmp_path / "models", tmp_path / "eval"
    tissue = {"num_classes": 3, "datalist_file": "datalist_tissue.json"}
    args = [a for k, v in {**TINY, **tissue, "num_epochs": 1, "val_interval": 1}.items()
            for a in (f"--{k}", json.dumps(v))]
    train = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BRAIN / "configs" / "train.json"),
             "--bundle_root", str(BRAIN), "--dataset_dir", str(site), "--ckpt_dir", str(ckpt), "--output_dir",
             str(evals)]
    res = subprocess.run(train + args, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    weights = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True)
    last = [v for k, v in weights.items() if k.endswith("weight") and v.ndim == 4][-1]
    assert 3 in last.shape[:2]  # the last convolution gives three classes
    details = (evals / "val_mean_dice_raw.csv").read_text().splitlines()
    assert len(details[0].split(",")) == 1 + 2 + 1  # per case: filename, grey and white matter Dice, their mean
    folder, out = tmp_path / "incoming", tmp_path / "masks"
    folder.mkdir()
    shutil.copy(site / "Case00.nii.gz", folder)
    infer = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BRAIN / "configs" / "inference.json"),
             "--bundle_root", str(BRAIN), "--dataset_dir", str(folder), "--output_dir", str(out), "--ckpt_path",
             str(ckpt / "model.pt"), *[a for k, v in {**TINY, "num_classes": 3}.items()
                                       for a in (f"--{k}", json.dumps(v))]]
    # the default segments ({"1": "brain"}) would drop white matter from the volumes and DICOM results: refused
    res = subprocess.run(infer, capture_output=True, text=True, timeout=600)
    assert res.returncode != 0
    assert "segments names labels [1], but the network has num_classes 3" in res.stdout + res.stderr
    assert not list(out.rglob("*.nii.gz"))
    tissues = {"1": "grey matter", "2": "white matter"}
    res = subprocess.run(infer + ["--segments", json.dumps(tissues)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    mask = np.asarray(nib.load(next(out.rglob("Case00*seg*.nii.gz"))).dataobj)
    assert mask.shape == nib.load(folder / "Case00.nii.gz").shape and set(np.unique(mask)) <= {0, 1, 2}
    summary = json.loads((out / "inference_summary.json").read_text())
    assert set(summary["inputs"][0]["volumes_ml"]) == {"grey matter", "white matter"}
    res = subprocess.run(train + args + ["--datalist_file", json.dumps("../IOP/datalist.json")], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode != 0 and "datalist_file must be a .json file name" in res.stdout + res.stderr
