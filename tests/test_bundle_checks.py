"""Both bundles pass MONAI's own bundle tools: property checks, verify_net_in_out, ckpt_export, large_files.yml.

MONAI's ``check_properties`` instantiates the trainer / evaluator, so it needs a site folder:
a training data loader cannot be built over no data (MONAI's model zoo checks train and
evaluate properties in unit tests for the same reason). Without one, ``initialize()`` still
works and the check fails naming the folder.
"""

import json
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, ckpt_export, verify_net_in_out
from monai.bundle.properties import InferProperties, TrainProperties

from conftest import REPO, TINY_CLS_OVERRIDES, TINY_OVERRIDES

PROSTATE = REPO / "bundles" / "prostate_mri_seg"
CLASSIFICATION = REPO / "bundles" / "image_classification"
BUNDLES = {"prostate": PROSTATE, "classification": CLASSIFICATION}
TINY = {"prostate": TINY_OVERRIDES, "classification": TINY_CLS_OVERRIDES}

TRAIN_CONFIGS = [("prostate", ["train.json"]), ("prostate", ["train.json", "harmofl.json"]),
                 ("prostate", ["train.json", "prrfl.json"]), ("classification", ["train.json"]),
                 ("classification", ["train.json", "harmofl.json"]), ("classification", ["train.json", "prrfl.json"])]
INFER_CONFIGS = [("prostate", ["inference.json"]), ("prostate", ["inference.json", "harmofl.json"]),
                 ("prostate", ["train.json", "evaluate.json"]), ("classification", ["inference.json"]),
                 ("classification", ["inference.json", "harmofl.json"]),
                 ("classification", ["train.json", "evaluate.json"])]

# MONAI's ids this repository's configs define (beyond the required ones), so that tools which set or
# read them through the workflow's properties reach the component the engine uses
TRAIN_IDS = ["train#handlers", "train#preprocessing", "val_interval", "validate#evaluator", "validate#handlers",
             "validate#dataset", "validate#inferer", "validate#preprocessing", "validate#postprocessing",
             "validate#key_metric"]
INFER_IDS = ["handlers", "preprocessing", "postprocessing"]


def _files(bundle, configs):
    return [str(BUNDLES[bundle] / "configs" / c) for c in configs]


def _workflow(bundle, configs, workflow_type, **overrides):
    root = BUNDLES[bundle]
    return ConfigWorkflow(config_file=_files(bundle, configs), meta_file=str(root / "configs" / "metadata.json"),
                          logging_file=False, workflow_type=workflow_type, bundle_root=str(root),
                          **{**TINY[bundle], **overrides})


def _site(bundle, tiny_sites, tiny_dermoscopy):
    return tiny_sites / "BIDMC" if bundle == "prostate" else tiny_dermoscopy / "clientA"


def _input_folder(bundle, tiny_sites, tiny_dermoscopy):
    return tiny_sites / "BIDMC" if bundle == "prostate" else tiny_dermoscopy / "clientA" / "img_resize128"


# ----------------------------------------------------------------------------------- properties

@pytest.mark.parametrize("bundle,configs", TRAIN_CONFIGS, ids=lambda v: "+".join(v) if isinstance(v, list) else v)
def test_train_configs_have_monai_train_properties(bundle, configs, tiny_sites, tiny_dermoscopy, tmp_path):
    wf = _workflow(bundle, configs, "train", dataset_dir=str(_site(bundle, tiny_sites, tiny_dermoscopy)),
                   ckpt_dir=str(tmp_path / "models"), output_dir=str(tmp_path / "eval"))
    wf.initialize()
    assert wf.check_properties() == []
    missing = [i for i in TRAIN_IDS if i not in wf.parser]
    assert not missing, missing
    required = [p["id"] for p in TrainProperties.values() if p["required"]]
    assert all(i in wf.parser for i in required)


@pytest.mark.parametrize("bundle,configs", INFER_CONFIGS, ids=lambda v: "+".join(v) if isinstance(v, list) else v)
def test_inference_configs_have_monai_infer_properties(bundle, configs, tiny_sites, tiny_dermoscopy, tmp_path):
    folder = (_site if "evaluate.json" in configs else _input_folder)(bundle, tiny_sites, tiny_dermoscopy)
    wf = _workflow(bundle, configs, "infer", dataset_dir=str(folder), output_dir=str(tmp_path / "out"))
    wf.initialize()
    assert wf.check_properties() == []
    assert all(i in wf.parser for i in INFER_IDS)
    assert all(p["id"] in wf.parser for p in InferProperties.values() if p["required"])


@pytest.fixture
def tiny_pool(tmp_path):
    from fedharmony.bundle.networks import build_network
    from fedharmony.methods.iopfl.model_pool import write_pool

    experts = [build_network(str(PROSTATE), overrides=TINY_OVERRIDES, seed=s).state_dict() for s in range(2)]
    write_pool(tmp_path / "pool", experts[-1], {"site-1": experts[0]}, overrides=TINY_OVERRIDES)
    return tmp_path / "pool"


def test_routed_inference_has_monai_infer_properties(tiny_sites, tiny_pool, tmp_path):
    wf = _workflow("prostate", ["routed_inference.json"], "infer", dataset_dir=str(tiny_sites / "BIDMC"),
                   pool_dir=str(tiny_pool), output_dir=str(tmp_path / "out"))
    wf.initialize()
    assert wf.check_properties() == []


@pytest.mark.parametrize("bundle", ["prostate", "classification"])
def test_without_the_site_folder_initialize_works_and_the_check_names_the_folder(bundle, tmp_path):
    from fedharmony.data.datalist import SiteDataError

    nowhere = tmp_path / "nowhere"
    wf = _workflow(bundle, ["train.json"], "train", dataset_dir=str(nowhere))
    wf.initialize()  # reads no data
    with pytest.raises(Exception) as info:
        wf.check_properties()  # builds the trainer, which lists (and caches) the training data
    cause = info.value
    while cause is not None and not isinstance(cause, SiteDataError):
        cause = cause.__cause__
    assert cause is not None and f"the folder {nowhere} does not exist" in str(cause), info.value


# ----------------------------------------------------------------------------------- networks

def _verify(bundle, configs, **kw):
    root = BUNDLES[bundle]
    verify_net_in_out(net_id="network_def", meta_file=str(root / "configs" / "metadata.json"),
                      config_file=_files(bundle, configs), device="cpu", bundle_root=str(root), **kw)


# a HarmoFL network has no amplitude target until it trains or loads a checkpoint; any non-negative one will do
HARMOFL_TARGET = {"network_def#target": "$torch.ones(3, @image_size, @image_size)"}


@pytest.mark.parametrize("bundle,configs,kw", [
    ("prostate", ["inference.json"], {}),
    ("prostate", ["inference.json"], {"n": 6}),
    ("prostate", ["inference.json", "harmofl.json"], {"n": 6, **HARMOFL_TARGET}),  # image_size 96 = 16 * 6
    ("classification", ["inference.json"], {}),
    ("classification", ["inference.json", "harmofl.json"], HARMOFL_TARGET),
    ("classification", ["inference.json"], {"task": "histology",  # the other task's format
                                            "_meta_#network_data_format#inputs#image#spatial_shape": [96, 96],
                                            "_meta_#network_data_format#outputs#pred#num_channels": 2}),
], ids=["prostate", "prostate-n6", "prostate+harmofl", "classification", "classification+harmofl", "histology"])
def test_verify_net_in_out(bundle, configs, kw):
    _verify(bundle, configs, **kw)


def test_harmofl_network_refuses_another_size_and_runs_without_a_target_only_in_training():
    with pytest.raises(ValueError, match=r"expects inputs \(B, 3, 96, 96\)"):
        _verify("prostate", ["inference.json", "harmofl.json"], **HARMOFL_TARGET)  # n = 1: 16 x 16
    with pytest.raises(RuntimeError, match="no target yet"):
        _verify("prostate", ["inference.json", "harmofl.json"], n=6)


def test_verify_net_in_out_cli_as_documented():
    """The HarmoFL command of docs/README.md, through MONAI's command line."""
    cmd = [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def", "--meta_file",
           "configs/metadata.json", "--config_file", "['configs/inference.json','configs/harmofl.json']",
           "--bundle_root", ".", "--device", "cpu", "--n", "6", "--network_def#target",
           "$torch.ones(3, @image_size, @image_size)"]
    res = subprocess.run(cmd, cwd=PROSTATE, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "verified with no error" in res.stdout + res.stderr
    assert "$torch.ones(3, @image_size, @image_size)" in (PROSTATE / "docs" / "README.md").read_text()


def test_metadata_describes_what_the_networks_take_and_give():
    for bundle in BUNDLES:
        root = BUNDLES[bundle]
        meta = json.loads((root / "configs" / "metadata.json").read_text())
        parser = ConfigParser()
        parser.read_config(_files(bundle, ["inference.json"]))
        parser["bundle_root"] = str(root)
        net = parser.get_parsed_content("network_def").eval()
        image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
        size = [16 if isinstance(s, str) else s for s in image["spatial_shape"]]  # "16*n" with n = 1
        with torch.no_grad():
            out = net(torch.rand(2, image["num_channels"], *size))
        assert out.dtype == getattr(torch, pred["dtype"]) and out.shape[1] == pred["num_channels"]
        assert len(pred["channel_def"]) == pred["num_channels"]
        if bundle == "prostate":
            assert out.shape[2:] == (16, 16)
            assert pred["channel_def"] == {"0": "background", "1": "prostate"}
            continue
        # classification: one logit per class of the default task; every task described with its classes
        assert out.shape == (2, 3) and pred["type"] == "logits" and pred["value_range"] == []
        train = json.loads((root / "configs" / "train.json").read_text())
        infer = json.loads((root / "configs" / "inference.json").read_text())
        assert infer["tasks"] == train["tasks"] and infer["task"] == train["task"]
        default = train["tasks"][train["task"]]
        assert list(pred["channel_def"].values()) == default["class_names"]
        assert image["spatial_shape"] == [default["image_size"]] * 2
        for task, setting in train["tasks"].items():
            classes = f"{task}: " + ", ".join(f"{i} {c}" for i, c in enumerate(setting["class_names"]))
            assert classes in meta["label_classes"] and classes in meta["pred_classes"], task
            assert task in meta["task"] and f"{setting['image_size']} x {setting['image_size']}" in meta["description"]


def _trained_harmofl(net, size):
    net.train()
    with torch.no_grad():
        net(torch.rand(2, 3, size, size))  # a training batch gives the amplitude target
    return net.eval()


@pytest.mark.parametrize("bundle,configs", [("prostate", ["inference.json"]), ("classification", ["inference.json"]),
                                            ("prostate", ["inference.json", "harmofl.json"]),
                                            ("classification", ["inference.json", "harmofl.json"])],
                         ids=["prostate", "classification", "prostate+harmofl", "classification+harmofl"])
def test_ckpt_export_gives_the_eager_model(bundle, configs, tmp_path):
    root = BUNDLES[bundle]
    overrides = {**TINY[bundle], "image_size": 32}
    parser = ConfigParser()
    parser.read_config(_files(bundle, configs))
    parser.update({"bundle_root": str(root), **overrides})
    net = parser.get_parsed_content("network_def")
    harmofl = "harmofl.json" in configs
    if harmofl:
        _trained_harmofl(net, 32)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    ckpt = tmp_path / "model.pt"
    # HarmoFL: as a federation's server saves it (NVFlare checkpoint, weights under "model")
    torch.save({"model": weights, "train_conf": {"train": {"model": "network_def"}}} if harmofl else weights, ckpt)
    ts_file = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_file), ckpt_file=str(ckpt), key_in_ckpt="model" if harmofl else "",
                meta_file=str(root / "configs" / "metadata.json"), config_file=_files(bundle, configs),
                bundle_root=str(root), **overrides)
    exported = torch.jit.load(str(ts_file))
    assert set(exported.state_dict()) == set(weights)  # the checkpoint keys (harmonize.target included)
    eager = ConfigParser()
    eager.read_config(_files(bundle, configs))
    eager.update({"bundle_root": str(root), **overrides})
    model = eager.get_parsed_content("network_def")
    model.load_state_dict(weights)
    model.eval()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(x), model(x))


@pytest.mark.parametrize("mode", ["paper", "released", "off"])
def test_scripted_amplitude_layer_follows_the_eager_rules(mode):
    """The scripted layer: same target updates in training, same output, same refusals."""
    from fedharmony.methods.harmofl.networks import AmplitudeNormalization

    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(2, 3, 16, 16, generator=g) * (i + 1) for i in range(3)]
    eager = AmplitudeNormalization(3, (16, 16), ratio=0.2, momentum=0.3, mode=mode)
    scripted = torch.jit.script(AmplitudeNormalization(3, (16, 16), ratio=0.2, momentum=0.3, mode=mode))
    for module in (eager, scripted):
        module.train()
        for b in batches[:2]:
            module(b)
        module.eval()
    torch.testing.assert_close(scripted.target, eager.target)
    torch.testing.assert_close(scripted(batches[2]), eager(batches[2]))
    if mode != "off":
        with pytest.raises(Exception, match=r"expects inputs \(B, 3, 16, 16\)"):
            scripted(torch.rand(1, 3, 8, 16))


# ----------------------------------------------------------------------------------- large files

@pytest.mark.parametrize("bundle", ["prostate", "classification"])
def test_large_files_says_where_the_weights_go(bundle):
    from monai.bundle.scripts import _safe_large_file_path

    root = BUNDLES[bundle]
    parser = ConfigParser()
    parser.read_config(str(root / "large_files.yml"))  # as monai.bundle download_large_files reads it
    entries = parser.get()["large_files"]
    assert [e["path"] for e in entries] == ["models/model.pt"]
    assert set(entries[0]) == {"path", "url", "hash_val", "hash_type"}
    assert entries[0]["hash_type"] in ("md5", "sha1", "sha256", "sha512")
    assert _safe_large_file_path(str(root), "models/model.pt") == str(root / "models" / "model.pt")
    text = (root / "large_files.yml").read_text()
    assert "FL_global_model.pt" in text and "--key_in_ckpt model" in text  # how a site fills it
