"""The prostate bundle through MONAI's own bundle CLI and API, and the BundleSite runner."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from conftest import BUNDLE, TINY_OVERRIDES
from fedharmony.bundle.site import BundleSite, build_network
from fedharmony.bundle.inferers import Slab25DInferer
from fedharmony.bundle.transforms import SlabToChannelsd, volume_to_slabs


def _overrides_cli(d):
    return [a for k, v in d.items() for a in (f"--{k}", str(v))]


def test_metadata_has_network_data_format():
    wf = ConfigWorkflow(config_file=str(BUNDLE / "configs" / "train.json"),
                        meta_file=str(BUNDLE / "configs" / "metadata.json"), workflow_type="train", logging_file=False)
    assert wf.parser["_meta_#network_data_format#inputs#image#num_channels"] == 3


def test_inference_builds_the_training_network():
    """inference.json repeats train.json's network (MONAI macros cannot point at bundle_root): keep them equal."""
    import json

    train = json.loads((BUNDLE / "configs" / "train.json").read_text())
    infer = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    for key in ("network_def", "backbone_def", "base_features", "image_size"):
        assert infer[key] == train[key], key


@pytest.mark.integration  # a MONAI CLI training
def test_train_then_infer_with_monai_bundle_cli(tiny_sites, tmp_path):
    """`python -m monai.bundle run` from an unrelated working directory, train then inference."""
    ckpt, pred = tmp_path / "models", tmp_path / "pred"
    train = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "train.json"),
             "--bundle_root", str(BUNDLE), "--dataset_dir", str(tiny_sites / "HK"), "--ckpt_dir", str(ckpt),
             "--output_dir", str(tmp_path / "eval"), "--num_epochs", "2", "--val_interval", "1",
             *_overrides_cli(TINY_OVERRIDES)]
    subprocess.run(train, cwd=tmp_path, check=True, capture_output=True)
    assert (ckpt / "model.pt").is_file()
    per_volume = (tmp_path / "eval" / "val_mean_dice_raw.csv").read_text()
    assert "Case" in per_volume  # foreground Dice per validation volume, by file name

    infer = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "inference.json"),
             "--bundle_root", str(BUNDLE), "--dataset_dir", str(tiny_sites / "BIDMC"), "--output_dir", str(pred),
             "--ckpt_path", str(ckpt / "model.pt"), "--base_features", str(TINY_OVERRIDES["base_features"])]
    subprocess.run(infer, cwd=tmp_path, check=True, capture_output=True)
    inputs = sorted((tiny_sites / "BIDMC").glob("Case??.nii.gz"))
    assert len(list(pred.glob("*_seg.nii.gz"))) == len(inputs)
    for vol in inputs:
        src = nib.load(str(vol))
        out = nib.load(str(pred / vol.name.replace(".nii.gz", "_seg.nii.gz")))
        assert out.shape == src.shape
        np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
        assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}


@pytest.mark.integration  # a MONAI CLI training
def test_harmofl_overlay_trains_and_the_target_reaches_inference(tiny_sites, tmp_path):
    """train.json + harmofl.json with MONAI's CLI, then inference.json + harmofl.json on the checkpoint."""
    ckpt, pred = tmp_path / "models", tmp_path / "pred"
    harmo = ["--image_size", "32", "--amp_ratio", "0.1"]
    configs = f"['{BUNDLE / 'configs' / 'train.json'}','{BUNDLE / 'configs' / 'harmofl.json'}']"
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root",
                    str(BUNDLE), "--dataset_dir", str(tiny_sites / "HK"), "--ckpt_dir", str(ckpt), "--output_dir",
                    str(tmp_path / "eval"), "--num_epochs", "1", "--val_interval", "1",
                    *_overrides_cli(TINY_OVERRIDES), *harmo], cwd=tmp_path, check=True, capture_output=True)
    sd = torch.load(ckpt / "model.pt", weights_only=True)
    assert sd["harmonize.target"].shape == (3, 32, 32) and sd["harmonize.target"].abs().sum() > 0
    configs = f"['{BUNDLE / 'configs' / 'inference.json'}','{BUNDLE / 'configs' / 'harmofl.json'}']"
    subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--bundle_root",
                    str(BUNDLE), "--dataset_dir", str(tiny_sites / "BIDMC"), "--output_dir", str(pred), "--ckpt_path",
                    str(ckpt / "model.pt"), "--base_features", str(TINY_OVERRIDES["base_features"]), *harmo],
                   cwd=tmp_path, check=True, capture_output=True)
    for vol in sorted((tiny_sites / "BIDMC").glob("Case??.nii.gz")):
        out = nib.load(str(pred / vol.name.replace(".nii.gz", "_seg.nii.gz")))
        assert out.shape == nib.load(str(vol)).shape


def test_inference_on_empty_folder_fails_clearly(tmp_path):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(BUNDLE / "configs" / "inference.json"),
           "--bundle_root", str(BUNDLE), "--dataset_dir", str(tmp_path)]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True)
    assert res.returncode == 1 and f"no input found in {tmp_path}" in res.stdout, res.stdout[-800:] + res.stderr[-800:]


def test_slab_transform_and_inferer_keep_geometry():
    vol = torch.arange(1 * 5 * 6 * 4, dtype=torch.float32).reshape(1, 5, 6, 4)
    slabs = volume_to_slabs(vol)
    assert slabs.shape == (4, 3, 5, 6)
    assert torch.equal(slabs[0, 0], vol[0, ..., 0]) and torch.equal(slabs[2, 1], vol[0, ..., 2])
    assert torch.equal(slabs[3, 2], vol[0, ..., 3])  # edge replicated
    d = SlabToChannelsd("image", "label")({"image": vol[..., :3], "label": vol[..., :3]})
    assert d["image"].shape == (3, 5, 6) and torch.equal(d["label"][0], vol[0, ..., 1])
    net = torch.nn.Conv2d(3, 2, 1)
    out = Slab25DInferer(slices_per_batch=3, divisible_by=16)(vol[None], net)
    assert out.shape == (1, 2, 5, 6, 4)
    assert torch.allclose(out[0, :, :, :, 2], net(slabs[2:3])[0], atol=1e-6)


def _site(tiny_sites, tmp_path, **kw):
    return BundleSite(str(BUNDLE), str(tiny_sites / "BIDMC"), str(tmp_path / "state"), "BIDMC",
                      overrides=TINY_OVERRIDES, **kw)


def test_site_state_survives_restart(tiny_sites, tmp_path):
    from fedharmony.methods.contract import SiteContract

    site = _site(tiny_sites, tmp_path, method="fedbn")
    assert isinstance(site, SiteContract)  # every member a method may use is there
    steps = site.train(None, local_epochs=1)
    assert steps > 0
    before = site.state_dict()
    opt_state = site.optimizer.state_dict()["state"]
    restarted = _site(tiny_sites, tmp_path, method="fedbn")
    after = restarted.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert restarted.round == 1 and restarted.trainer.state.iteration == steps
    restored = restarted.optimizer.state_dict()["state"]
    assert restored.keys() == opt_state.keys()
    assert all(torch.equal(restored[i]["exp_avg"], opt_state[i]["exp_avg"]) for i in opt_state)


def test_received_weights_never_overwrite_local_keys(tiny_sites, tmp_path):
    site = _site(tiny_sites, tmp_path, method="fedbn")
    own = site.state_dict()
    incoming = {k: v + 1 if v.is_floating_point() else v for k, v in own.items()}
    site.load_weights(incoming)
    now = site.state_dict()
    for k in own:
        if k in site.local_key_names:
            assert torch.equal(now[k], own[k]), k
        elif own[k].is_floating_point():
            assert torch.equal(now[k], own[k] + 1), k
    with pytest.raises(ValueError, match="shape"):
        site.load_weights({next(iter(own)): torch.zeros(1)})
    with pytest.raises(KeyError, match="does not have"):
        site.load_weights({"not.a.key": torch.zeros(1)})


def test_evaluating_other_weights_leaves_the_site_model_alone(tiny_sites, tmp_path):
    site = _site(tiny_sites, tmp_path)
    own = site.state_dict()
    other = {k: torch.zeros_like(v) for k, v in own.items()}
    metrics = site.evaluate(other, "testing")
    assert 0.0 <= metrics["val_mean_dice"] <= 1.0
    assert all(torch.equal(own[k], v) for k, v in site.state_dict().items())


@pytest.mark.parametrize("geometry", [{"pixdim": 0.0, "image_size": -1}, {"pixdim": 1.7, "image_size": 32},
                                      {"pixdim": 0.0, "image_size": 48}])
def test_test_dice_is_measured_on_each_scans_own_grid_whatever_the_geometry(tiny_sites, geometry):
    from fedharmony.study.scoring import score_on_site

    overrides = {**TINY_OVERRIDES, **geometry}
    weights = build_network(str(BUNDLE), overrides=overrides, seed=1).state_dict()
    result = score_on_site(BUNDLE, tiny_sites / "HK", weights, "val_mean_dice", overrides=overrides)
    assert result["n"] == 1 and 0.0 <= result["score"] <= 1.0
    # the network-grid label as the "prediction", through the same inverse path, lands on the stored label
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["bundle_root"], parser["dataset_dir"] = str(BUNDLE), str(tiny_sites / "HK")
    for k, v in overrides.items():
        parser[k] = v
    item = parser.get_parsed_content("test#dataset")[0]
    item["pred"] = torch.cat([1 - item["label"], item["label"]])  # (2, H, W, D) logits of the network-grid label
    out = parser.get_parsed_content("test#postprocessing")(item)
    assert out["pred"].shape == out["label"].shape and out["label"].shape[1:] == item["stored_label"].shape[1:]
    fg_pred, fg_true = out["pred"][1].bool(), out["label"][1].bool()
    dice = 2 * (fg_pred & fg_true).sum() / (fg_pred.sum() + fg_true.sum())
    if geometry["pixdim"] == 0 and geometry["image_size"] == -1:
        assert dice == 1.0  # no resampling: the round trip is exact
    else:
        # resampled there and back with nearest neighbour: the same gland on the stored grid, its border off by
        # a pixel here and there (a 32 x 32 phantom's gland is a few dozen pixels, so that costs Dice)
        assert dice > 0.5


def test_fedprox_term_gradient_pulls_towards_global(tiny_sites, tmp_path):
    from fedharmony.bundle.losses import ProximalLoss

    net = torch.nn.Linear(2, 1)
    ref = {k: torch.zeros_like(v) for k, v in net.state_dict().items()}
    loss = ProximalLoss(lambda p, t: torch.zeros(()), net, mu=0.5)
    loss.set_reference(ref)
    loss(None, None).backward()
    assert torch.allclose(net.weight.grad, 0.5 * net.weight.detach())  # d/dw mu/2 ||w||^2 = mu w


def test_server_builds_the_same_network_as_the_sites(tiny_sites, tmp_path):
    site = _site(tiny_sites, tmp_path)
    server = build_network(str(BUNDLE))
    # compare shapes against a site at bundle defaults, keys against the tiny-override site
    default_site = BundleSite(str(BUNDLE), str(tiny_sites / "BIDMC"), str(tmp_path / "s2"), "BIDMC")
    assert ({k: v.shape for k, v in server.state_dict().items()}
            == {k: v.shape for k, v in default_site.network.state_dict().items()})
    assert site.network.state_dict().keys() == server.state_dict().keys()


def _training_samples(tiny_sites, spatial_augmentation, drop_last=False, draws=6):
    """The training pipeline's samples from the HK phantom site, seeded as MONAI seeds it (Compose at seed 0)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["bundle_root"], parser["dataset_dir"] = str(BUNDLE), str(tiny_sites / "HK")
    for k, v in {**TINY_OVERRIDES, "spatial_augmentation": spatial_augmentation}.items():
        parser[k] = v
    if drop_last:  # the augmentation list as it was before bundle 0.14.0
        parser["train#augmentation"] = parser["train#augmentation"][:-1]
    pipeline = parser.get_parsed_content("train#preprocessing")
    pipeline.set_random_state(0)
    item = parser.get_parsed_content("train#datalist")[0]
    return [s for _ in range(draws) for s in pipeline(item)]


def test_spatial_augmentation_none_is_the_earlier_training_exactly_and_zoom_rotate_changes_the_samples(tiny_sites):
    """Bundle 0.14.0 adds in-plane zoom and rotation last in the random transforms: ``none`` gives the samples of
    the pipeline without it, bit for bit (committed studies stay reproducible); ``zoom_rotate`` keeps their
    shapes and the label binary, and changes the label's area in some samples (the anatomy's size in pixels)."""
    old = _training_samples(tiny_sites, "none", drop_last=True)
    none = _training_samples(tiny_sites, "none")
    assert len(old) == len(none) > 0
    for a, b in zip(old, none):
        assert torch.equal(torch.as_tensor(a["image"]), torch.as_tensor(b["image"]))
        assert torch.equal(torch.as_tensor(a["label"]), torch.as_tensor(b["label"]))
    zoomed = _training_samples(tiny_sites, "zoom_rotate")
    assert [tuple(s["image"].shape) for s in zoomed] == [tuple(s["image"].shape) for s in none]
    assert all(set(torch.unique(s["label"]).tolist()) <= {0.0, 1.0} for s in zoomed)
    areas = [(float(a["label"].sum()), float(b["label"].sum())) for a, b in zip(none, zoomed)]
    assert any(x != y for x, y in areas)


def test_an_unknown_spatial_augmentation_is_refused_naming_the_choices():
    from fedharmony.bundle.transforms import spatial_augmentation

    with pytest.raises(ValueError, match=r"spatial_augmentation must be one of \['zoom_rotate', 'none'\], got 'big'"):
        spatial_augmentation("big", "image", "label")
