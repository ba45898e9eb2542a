"""The released-protocol switch (fedharmony.methods.protocols) and the bundle settings it uses:
norm, num_res_units, max_train_cases."""

import json

import numpy as np
import pytest
import torch

from conftest import BUNDLE, TINY_OVERRIDES, export_job, simulate
from fedharmony.bundle.networks import norm_layer
from fedharmony.data.datalist import load_datalist, smallest_split
from fedharmony.methods.protocols import (check_protocol, merge_protocol_overrides, needs_smallest_site,
                                          released_bundle_overrides)


def test_released_overrides_per_method_and_the_errors_name_what_exists():
    assert released_bundle_overrides("harmofl", max_train_cases=5) == {
        "amp_mode": "released", "intensity": "released", "norm": "batch_stats_only", "num_res_units": 0,
        "max_train_cases": 5}
    assert released_bundle_overrides("prrfl", max_train_cases=5) == {
        "prrfl_kl_reduction": "batchmean", "optimizer_name": "sgd", "learning_rate": 0.01, "weight_decay": 1e-6,
        "lr_round_gamma": 0.5, "lr_round_step": 5, "optimizer_reset_each_round": True}
    assert needs_smallest_site("harmofl") and not needs_smallest_site("prrfl")
    assert check_protocol("paper", "fedavg") == "paper"  # every method has the paper protocol
    with pytest.raises(ValueError, match=r"unknown protocol 'publication'; choose one of \('paper', 'released'\)"):
        check_protocol("publication", "harmofl")
    with pytest.raises(ValueError, match="fedavg has no released protocol; methods with one: harmofl, prrfl"):
        check_protocol("released", "fedavg")
    with pytest.raises(ValueError, match="iopfl has no released protocol .*method=routing_released"):
        check_protocol("released", "iopfl")
    with pytest.raises(ValueError, match="max_train_cases must be an integer >= 1, got 0"):
        released_bundle_overrides("harmofl", max_train_cases=0)


def test_a_user_setting_that_contradicts_the_protocol_is_refused_naming_both_values():
    merged = merge_protocol_overrides({"learning_rate": 1e-3, "intensity": "released"}, {"intensity": "released",
                                                                                         "norm": "batch_stats_only"})
    assert merged == {"learning_rate": 1e-3, "intensity": "released", "norm": "batch_stats_only"}
    with pytest.raises(ValueError, match=r"protocol 'released' sets intensity='released' \(given 'zscore'\)"):
        merge_protocol_overrides({"intensity": "zscore"}, {"intensity": "released"})


def test_batch_stats_only_norm_has_no_affine_and_evaluates_with_the_batchs_statistics():
    from monai.networks.nets import UNet

    net = UNet(2, 3, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0, norm=norm_layer("batch_stats_only"))
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.weight is None and m.running_mean is None for m in norms)
    assert not any(isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1) for m in net.modules()
                   if m is not net.model[-1])  # no residual shortcut convolutions with num_res_units=0
    net.eval()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        alone = net(x[:1])
        with_other = net(torch.cat([x[:1], 50 * x[1:]]))[:1]
        # batch statistics even in eval: the same slice scores differently next to another one
        assert not torch.allclose(alone, with_other, atol=1e-4)
        # and a scaled input gives the same output (the first norm removes the scale: 0-255 input is fine)
        assert torch.allclose(net(255 * x), net(x), atol=1e-3)
    with pytest.raises(ValueError, match=r"unknown norm 'group'; choose one of \['batch', 'batch_stats_only'\]"):
        norm_layer("group")


def test_fedbn_keeps_nothing_local_on_the_released_network_so_it_is_fedavg_there():
    """With norm=batch_stats_only no normalization layer has a parameter or buffer: FedBN's (and PRR-FL's) local
    keys select nothing, so under the released network FedBN exchanges what FedAvg exchanges."""
    import re

    from monai.networks.nets import UNet

    from fedharmony.core.norm_layers import NORM_LAYER_KEYS, norm_layer_keys

    released = UNet(2, 3, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0, norm=norm_layer("batch_stats_only"))
    assert norm_layer_keys(released) == []
    assert not [k for k in released.state_dict() if re.search(NORM_LAYER_KEYS, k)]
    default = UNet(2, 3, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=0, norm=norm_layer("batch"))
    assert norm_layer_keys(default)  # the default network has norm keys: there FedBN differs from FedAvg


def test_max_train_cases_keeps_the_first_cases_and_the_smallest_site_is_found(tiny_sites):
    hk = tiny_sites / "HK" / "datalist.json"
    all_cases = load_datalist(hk, "training", check=False)
    sizes = {s: len(load_datalist(tiny_sites / s / "datalist.json", "training", check=False)) for s in ("BIDMC", "HK")}
    assert smallest_split(tiny_sites) == (min(sizes.values()), min(sizes, key=sizes.get))
    assert smallest_split(tiny_sites, num_sites=1) == (sizes["BIDMC"], "BIDMC")  # site-1 only
    assert load_datalist(hk, "training", check=False, max_cases=1) == all_cases[:1]
    assert load_datalist(hk, "training", check=False, max_cases=100) == all_cases
    with pytest.raises(ValueError, match="site 'HK': max_cases must be an integer >= 0 .*got -1"):
        load_datalist(hk, "training", site="HK", max_cases=-1)


def test_each_method_states_its_released_protocol_and_the_registry_reads_it():
    from fedharmony.methods import site_method_class
    from fedharmony.methods.protocols import released_methods

    assert released_methods() == ("harmofl", "prrfl")
    assert site_method_class("harmofl").released_cuts_to_smallest_site
    assert released_bundle_overrides("prrfl", max_train_cases=None) == dict(site_method_class("prrfl").released_settings)
    for method in ("fedavg", "fedbn", "iopfl"):
        assert site_method_class(method).released_settings is None


def test_the_recipe_merges_the_protocol_once_for_every_method_and_keeps_the_server_choices(tiny_sites):
    from fedharmony.fl.job import FedHarmonyRecipe

    smallest, _ = smallest_split(tiny_sites)
    recipe = FedHarmonyRecipe("harmofl", bundle_dir=str(BUNDLE), num_rounds=1, data_root=str(tiny_sites),
                              overrides=dict(TINY_OVERRIDES), protocol="released", max_train_cases=smallest)
    assert recipe.protocol == "released"
    assert recipe.overrides == {**TINY_OVERRIDES, **released_bundle_overrides("harmofl", max_train_cases=smallest)}
    assert recipe.aggregator().weigh_by_samples is False
    # the size may come as an override too (an exported job's), and a different keyword value clashes with it
    given = FedHarmonyRecipe("harmofl", bundle_dir=str(BUNDLE), num_rounds=1, protocol="released",
                             overrides={**TINY_OVERRIDES, "max_train_cases": 3})
    assert given.overrides["max_train_cases"] == 3
    with pytest.raises(ValueError, match=r"sets max_train_cases=2 \(given 3\)"):
        FedHarmonyRecipe("harmofl", bundle_dir=str(BUNDLE), num_rounds=1, protocol="released", max_train_cases=2,
                         overrides={"max_train_cases": 3})
    paper = FedHarmonyRecipe("harmofl", bundle_dir=str(BUNDLE), num_rounds=1, overrides=dict(TINY_OVERRIDES))
    assert paper.aggregator().weigh_by_samples is True and "norm" not in paper.overrides
    # the recipe does not read the sites' data: without the size it is refused, naming what to give
    with pytest.raises(ValueError, match="max_train_cases must be an integer >= 1, got None .*smallest_split"):
        FedHarmonyRecipe("harmofl", bundle_dir=str(BUNDLE), num_rounds=1, data_root=str(tiny_sites),
                         protocol="released")
    with pytest.raises(ValueError, match=r"sets amp_mode='released' \(given 'paper'\)"):
        FedHarmonyRecipe("harmofl", bundle_dir=str(BUNDLE), num_rounds=1, protocol="released", max_train_cases=2,
                         amp_mode="paper")
    prrfl = FedHarmonyRecipe("prrfl", bundle_dir=str(BUNDLE), num_rounds=1, protocol="released")
    assert prrfl.aggregator().box == "half_open" and prrfl.overrides["prrfl_kl_reduction"] == "batchmean"
    assert prrfl.overrides["optimizer_name"] == "sgd" and prrfl.overrides["lr_round_gamma"] == 0.5
    assert FedHarmonyRecipe("prrfl", bundle_dir=str(BUNDLE), num_rounds=1).aggregator().box == "symmetric"
    with pytest.raises(ValueError, match=r"sets prrfl_box='half_open' \(given 'symmetric'\)"):
        FedHarmonyRecipe("prrfl", bundle_dir=str(BUNDLE), num_rounds=1, protocol="released", prrfl_box="symmetric")
    with pytest.raises(ValueError, match="fedbn has no released protocol"):
        FedHarmonyRecipe("fedbn", bundle_dir=str(BUNDLE), num_rounds=1, protocol="released")


def test_the_job_script_counts_the_smallest_site_for_the_recipe(tiny_sites, tmp_path):
    """The job script is where the sites' data is visible: it sizes the cut (over site-1 .. site-N) and says so."""
    import subprocess
    import sys

    from conftest import REPO

    res = subprocess.run([sys.executable, str(REPO / "jobs" / "prostate.py"), "--algorithm", "harmofl", "--protocol",
                          "released", "--sites", "1", "--data-root", str(tiny_sites), "--override",
                          json.dumps(TINY_OVERRIDES), "--export", "--export-dir", str(tmp_path)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    size, site = smallest_split(tiny_sites, num_sites=1)
    assert f"every site trains on {size} cases (the smallest site, {site})" in res.stdout
    client = json.loads(next(tmp_path.rglob("config_fed_client.json")).read_text())
    assert client["executors"][0]["executor"]["args"]["overrides"]["max_train_cases"] == size


def test_the_job_script_refuses_a_protocol_the_method_does_not_have(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    res = subprocess.run([sys.executable, str(REPO / "jobs" / "prostate.py"), "--algorithm", "fedbn", "--protocol",
                          "released", "--export", "--export-dir", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 2 and "--protocol: fedbn has no released protocol" in res.stderr


@pytest.mark.integration
def test_harmofl_released_protocol_runs_in_the_simulator(tiny_sites, tmp_path):
    """The whole released protocol on 2 tiny sites: the settings travel to the sites, the server is set for the
    uniform mean and accepts both sites, and the global model has the released network (no norm parameters or
    statistics). (Both tiny sites train on 1 case, so the log cannot tell the uniform mean from the case-weighted
    one; the recipe test checks the aggregator.)"""
    overrides = {**TINY_OVERRIDES, "max_train_cases": 1}  # an exported job does not see the data: size given
    job = export_job(tmp_path, "harmofl_released", "--protocol", "released", "--no-cross-site-eval",
                     algorithm="harmofl", rounds=2, sites=2, overrides=overrides)
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    sent = client["executors"][0]["executor"]["args"]["overrides"]
    assert sent == {**TINY_OVERRIDES, **released_bundle_overrides("harmofl", max_train_cases=1)}
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    assert '"weigh_by_samples": false' in json.dumps(server)
    run = simulate(job, tmp_path / "ws", tiny_sites, sites=2, threads=2)
    model = torch.load(run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    assert not any("running_mean" in k or k.endswith("adn.N.weight") for k in model)
    target = np.asarray(model["harmonize.target"])
    assert np.isfinite(target).all() and target.max() > 0  # the averaged amplitude target travelled
    log = (tmp_path / "ws" / "server" / "log.txt").read_text()
    assert "accepted site-1" in log and "accepted site-2" in log
