"""End to end on the real NVFlare simulator: export a job folder, run it with the CLI, read the workspace."""

import csv
import json
import os
import shutil
import subprocess

import pytest
import torch

from conftest import BUNDLE, NVFLARE, TINY_OVERRIDES, export_job, simulate
from fedharmony.bundle.networks import build_network
from fedharmony.methods import METHODS, recipe_class, site_method_class

pytestmark = pytest.mark.integration


def _export(tmp_path, algorithm, *flags, rounds=2, sites=2):
    return export_job(tmp_path, None, *flags, algorithm=algorithm, rounds=rounds, sites=sites)


def _simulate(job, ws, data_root, threads):
    return simulate(job, ws, data_root, sites=2, threads=threads)


SITES = ("site-1", "site-2")


def _site_state(ws, site, name="site_state.pt"):
    return torch.load(ws / site / "simulate_job" / "fedharmony" / site / name, weights_only=True)


# ------------------------------------------------- every registered method: one federation each, deeper checks where a
# method has its own behaviour to show. A method added tomorrow runs here with the generic checks and no new test.
def _fedbn(run, ws):
    states = {s: _site_state(ws, s) for s in SITES}  # each site kept its own norm layers
    a, b = states["site-1"]["network"], states["site-2"]["network"]
    norm = [k for k in a if ".adn.N." in k and k.endswith("running_mean")]
    assert norm and all(not torch.equal(a[k], b[k]) for k in norm)
    assert len(list((ws / "site-1").rglob("log.txt"))) >= 1


def _harmofl(run, ws):
    glob = torch.load(run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    target = torch.as_tensor(glob["harmonize.target"])
    assert target.shape == (3, 32, 32) and target.abs().sum() > 0  # averaged by the server like the weights
    for s in SITES:  # from round 1 on, each site normalizes to the global target
        torch.testing.assert_close(_site_state(ws, s)["network"]["harmonize.target"], target.float())


def _iopfl(run, ws):
    rows = list(csv.DictReader(open(run / "results" / "metrics_by_round.csv")))
    assert {(r["site"], int(r["round"])) for r in rows if r["tag"] == "val_mean_dice_personalized"} == \
        {(s, r) for s in SITES for r in (0, 1)}
    assert "personalized_mean_last" in json.loads((run / "results" / "summary.json").read_text())
    for s in SITES:  # the personalized model kept across the process restarts (-t 1)
        st = _site_state(ws, s)
        phi = st["method"]["state"]["personalized"]
        assert phi is not None and not all(torch.equal(phi[k], st["network"][k]) for k in st["network"])

    # the model pool: global + both personalized models, loadable by the bundle
    from fedharmony.methods.iopfl.model_pool import FORMAT, file_digest, load_pool

    pool = load_pool(run / "model_pool", BUNDLE)
    assert pool.names == ["site-1", "site-2", "global"]
    manifest = json.loads((run / "model_pool" / "manifest.json").read_text())
    assert {e["data"] for e in manifest["experts"] if e["kind"] == "personalized"} == {"BIDMC", "HK"}
    assert manifest["format"] == FORMAT  # each expert's digest recorded by the job, checked by load_pool
    assert all(e["sha256"] == file_digest(run / "model_pool" / e["file"]) for e in manifest["experts"])
    for s in SITES:  # what each site returned is its best personalized model
        best = _site_state(ws, s, "best_model.pt")
        pooled = torch.load(run / "model_pool" / f"{s}.pt", weights_only=True)
        assert all(torch.equal(pooled[k], best[k].to(pooled[k].dtype)) for k in best)
    glob = torch.load(run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    pooled = torch.load(run / "model_pool" / "global.pt", weights_only=True)
    assert all(torch.equal(pooled[k], torch.as_tensor(glob[k]).to(pooled[k].dtype)) for k in pooled)


def _ditto(run, ws):
    rows = list(csv.DictReader(open(run / "results" / "metrics_by_round.csv")))
    assert {(r["site"], int(r["round"])) for r in rows if r["tag"] == "val_mean_dice_personalized"} == \
        {(s, r) for s in SITES for r in (0, 1)}
    glob = torch.load(run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    for s in SITES:
        st = _site_state(ws, s)
        assert st["method"]["state"]["personal_optimizer"]["state"]
        best = _site_state(ws, s, "best_model.pt")
        conv = [k for k in best if k.endswith("conv.weight")]
        # the site's result is its personalized model: neither the global model nor the FedAvg-trained one
        assert not all(torch.equal(best[k], torch.as_tensor(glob[k]).to(best[k].dtype)) for k in conv)
        assert not all(torch.equal(best[k], st["network"][k]) for k in conv)


def _scaffold(run, ws):
    for name in ("FL_global_model.pt", "best_FL_global_model.pt"):  # both load: no arrays in their meta
        ckpt = torch.load(run / "app_server" / name, weights_only=True)
        assert "scaffold_c_global" not in (ckpt.get("meta_props") or {}), name
    log = (ws / "server" / "log.txt").read_text()
    assert log.count("SCAFFOLD control variate moved by the mean of 2 site changes") == 3
    c_local = {s: _site_state(ws, s)["method"]["state"]["c_local"] for s in SITES}
    for c in c_local.values():
        assert all(torch.isfinite(v).all() for v in c.values()) and any(v.abs().sum() > 0 for v in c.values())
    key = next(k for k in c_local["site-1"] if k.endswith("conv.weight"))
    assert not torch.equal(c_local["site-1"][key], c_local["site-2"][key])  # each site its own drift


# method: (extra flags, rounds, simulator threads, deeper checks); every other method: 2 rounds, -t 2, generic checks.
# -t 2 runs both sites at once; -t 1 (IOP-FL) starts a fresh site process for every task, so a method's state must
# come back from disk (restoring Ditto's and PRR-FL's is covered by their unit tests)
RUNS = {
    "fedbn": ((), 2, 2, _fedbn),
    "harmofl": (("--image-size", "32", "--amp-ratio", "0.1"), 2, 2, _harmofl),
    "iopfl": (("--iop-alpha", "0.2"), 2, 1, _iopfl),
    "ditto": (("--ditto-lambda", "0.5"), 2, 2, _ditto),
    "scaffold": ((), 3, 2, _scaffold),
}


@pytest.mark.parametrize("method", METHODS)
def test_every_registered_method_trains_tracks_scores_and_returns_its_models_on_two_sites(method, tiny_sites,
                                                                                          tmp_path):
    flags, rounds, threads, deeper = RUNS.get(method, ((), 2, 2, None))
    site_cls = site_method_class(method)
    ws = tmp_path / "ws"
    run = _simulate(_export(tmp_path, method, *flags, rounds=rounds), ws, tiny_sites, threads=threads)

    # per-round, per-site tracking -> CSV / JSON / plot / TensorBoard
    rows = list(csv.DictReader(open(run / "results" / "metrics_by_round.csv")))
    assert {(r["site"], int(r["round"])) for r in rows if r["tag"] == "val_mean_dice"} == \
        {(s, r) for s in SITES for r in range(rounds)}
    assert (run / "results" / "val_mean_dice_by_round.png").stat().st_size > 0
    assert any((run / "tb_events").rglob("events.out.tfevents.*"))
    for s in SITES:  # every site trained every round with this method; its weights are finite
        st = _site_state(ws, s)
        assert st["round"] == rounds and st["method"]["name"] == method
        assert all(torch.isfinite(v).all() for v in st["network"].values() if v.is_floating_point())

    # cross-site matrix: every site scored every site's model (and the global one, where there is one)
    has_global = recipe_class(method).has_global_model
    cse = json.loads((run / "cross_site_val" / "cross_val_results.json").read_text())
    for s in SITES:
        assert {"site-1", "site-2"} | ({"SRV_FL_global_model.pt"} if has_global else set()) <= set(cse[s])
        assert all(0.0 <= v["val_mean_dice"] <= 1.0 for v in cse[s].values())

    if has_global:  # the global model has the bundle network's weights and moved away from the seeded initial ones
        config = ["configs/train.json"] + ([site_cls.overlay] if site_cls.overlay else [])
        init = build_network(str(BUNDLE), config, overrides=TINY_OVERRIDES, seed=0).state_dict()
        glob = torch.load(run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
        conv = [k for k in init if k.endswith("conv.weight")]
        assert conv and all(tuple(glob[k].shape) == tuple(init[k].shape) for k in conv)
        assert not all(torch.equal(torch.as_tensor(glob[k]), init[k]) for k in conv)
    if deeper:
        deeper(run, ws)


def test_corrupt_nifti_is_named_in_the_server_log(tiny_sites, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_sites, data)
    corrupt = data / "HK" / "Case00.nii.gz"
    corrupt.write_bytes(b"not a nifti")
    ws = tmp_path / "ws"
    env = {**os.environ, "FEDHARMONY_DATA_ROOT": str(data)}
    subprocess.run([NVFLARE, "simulator", str(_export(tmp_path, "fedavg")), "-w", str(ws), "-n", "2", "-t", "2"],
                   env=env, capture_output=True, text=True, timeout=900)
    server_log = (ws / "server" / "log.txt").read_text()
    # the site's own error, naming the file, is in the server's log (not only the site's return code)
    assert f"task 'train' failed: SiteDataError: site 'HK': cannot read NIfTI {corrupt}" in server_log
    assert (data / "BIDMC" / "Case00.nii.gz").stat().st_size > 100  # nothing else touched


def test_classical_harmonization_and_released_intensity_run_in_a_federation(tiny_sites, tmp_path):
    """FedAvg on 2 sites with every new intensity setting at once: N4, the federation's histogram scale, and
    the released 0-255 input (the settings travel as bundle overrides)."""
    from fedharmony.bundle.classical_harmonization import dataset_landmarks, format_scale, standard_scale

    scale = format_scale(standard_scale([dataset_landmarks(tiny_sites / s, bias_correction=True)
                                         for s in ("BIDMC", "HK")]))
    overrides = {**TINY_OVERRIDES, "intensity": "released", "bias_correction": True, "histogram_scale": scale}
    job = export_job(tmp_path, "harmonized", "--no-cross-site-eval", algorithm="fedavg", rounds=1, sites=2,
                     overrides=overrides)
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    assert client["executors"][0]["executor"]["args"]["overrides"]["histogram_scale"] == scale
    run = _simulate(job, tmp_path / "ws", tiny_sites, threads=2)
    rows = list(csv.DictReader(open(run / "results" / "metrics_by_round.csv")))
    dice = [float(r["value"]) for r in rows if r["tag"] == "val_mean_dice"]
    assert len(dice) == 2 and all(0.0 <= d <= 1.0 for d in dice)


def test_the_best_global_model_is_written_and_patience_stops_a_run_that_no_longer_improves(tiny_sites, tmp_path):
    """NVFlare's own mechanisms: IntimeModelSelector picks the best global model by the sites' mean validation key
    metric (the one they send with every update) and the persistor writes best_FL_global_model.pt; FedAvg's
    patience stops a run whose metric stops improving."""
    run = _simulate(_export(tmp_path, "fedavg", "--no-cross-site-eval", rounds=3), tmp_path / "ws", tiny_sites,
                    threads=2)
    best = torch.load(run / "app_server" / "best_FL_global_model.pt", weights_only=True)
    build_network(str(BUNDLE), overrides=TINY_OVERRIDES).load_state_dict(
        {k: torch.as_tensor(v) for k, v in best["model"].items()}, strict=True)
    # both checkpoints record the geometry the sites trained at: the bundle config's, no fingerprint planned
    for ckpt in (best, torch.load(run / "app_server" / "FL_global_model.pt", weights_only=True)):
        assert ckpt["meta_props"]["preprocessing"] == {"pixdim": 0.0, "image_size": -1, "source": "bundle config"}
    rows = list(csv.DictReader(open(run / "results" / "metrics_by_round.csv")))
    by_round = {}
    for r in rows:
        if r["tag"] == "val_mean_dice":
            by_round.setdefault(int(r["round"]), []).append(float(r["value"]))
    means = {r: sum(v) / len(v) for r, v in by_round.items() if r >= 1}  # round 0 scores the untrained model
    best_round = max(means, key=means.get)
    # the model the sites validated at the start of best_round is the one aggregated in the round before
    assert best["meta_props"]["current_round"] == best_round - 1
    server_log = (tmp_path / "ws" / "server" / "log.txt").read_text()
    assert f"new best validation metric at round {best_round}" in server_log

    # patience 2 on a run that cannot improve (no learning, batch statistics at evaluation: the same Dice every
    # round): it stops after two rounds without improvement, and says so
    frozen = {**TINY_OVERRIDES, "learning_rate": 1e-12, "norm": "batch_stats_only"}
    (tmp_path / "p").mkdir()
    job = export_job(tmp_path / "p", None, "--no-cross-site-eval", "--patience", "2", algorithm="fedavg", rounds=6,
                     sites=2, overrides=frozen)
    run = _simulate(job, tmp_path / "ws2", tiny_sites, threads=2)
    server_log = (tmp_path / "ws2" / "server" / "log.txt").read_text()
    assert "Exceeded the number of FL rounds (2) without improvements" in server_log
    assert "Stopping at round=2 out of total_rounds=6" in server_log
    rounds = {int(r["round"]) for r in csv.DictReader(open(run / "results" / "metrics_by_round.csv"))}
    assert rounds == {0, 1, 2}
