"""End to end on the real NVFlare simulator: export a job folder, run it with the CLI, read the workspace."""

import csv
import json
import os
import shutil
import subprocess

import pytest
import torch

from conftest import BUNDLE, NVFLARE, TINY_OVERRIDES, export_job, simulate
from fedharmony.bundle.site import build_network

pytestmark = pytest.mark.integration


def _export(tmp_path, algorithm, *flags, rounds=2, sites=2):
    return export_job(tmp_path, None, *flags, algorithm=algorithm, rounds=rounds, sites=sites)


def _simulate(job, ws, data_root, threads):
    return simulate(job, ws, data_root, sites=2, threads=threads)


def test_fedbn_two_sites_two_rounds_tracked_scored_and_norm_layers_kept(tiny_sites, tmp_path):
    ws = tmp_path / "ws"
    # -t 2: both sites at once (restarts of a site process are the IOP-FL test's, -t 1, below)
    run = _simulate(_export(tmp_path, "fedbn"), ws, tiny_sites, threads=2)

    # per-round, per-site tracking -> CSV / JSON / plot / TensorBoard
    rows = list(csv.DictReader(open(run / "results" / "metrics_by_round.csv")))
    dice = {(r["site"], int(r["round"])) for r in rows if r["tag"] == "val_mean_dice"}
    assert dice == {(s, r) for s in ("site-1", "site-2") for r in (0, 1)}
    assert (run / "results" / "val_mean_dice_by_round.png").stat().st_size > 0
    assert any((run / "tb_events").rglob("events.out.tfevents.*"))

    # cross-site matrix: every site scored every model
    cse = json.loads((run / "cross_site_val" / "cross_val_results.json").read_text())
    for site in ("site-1", "site-2"):
        assert {"SRV_FL_global_model.pt", "site-1", "site-2"} <= set(cse[site])
        assert 0.0 <= cse[site]["SRV_FL_global_model.pt"]["val_mean_dice"] <= 1.0

    # the global model moved away from the server's seeded initial network
    init = build_network(str(BUNDLE), overrides=TINY_OVERRIDES, seed=0).state_dict()
    glob = torch.load(run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    conv = [k for k in init if k.endswith("conv.weight")]
    assert conv and all(glob[k].shape == init[k].shape for k in conv)
    assert not all(torch.equal(torch.as_tensor(glob[k]), init[k]) for k in conv)

    # FedBN: each site kept its own norm layers
    states = {s: torch.load(ws / s / "simulate_job" / "fedharmony" / s / "site_state.pt", weights_only=True)
              for s in ("site-1", "site-2")}
    assert all(st["round"] == 2 for st in states.values())
    a, b = states["site-1"]["network"], states["site-2"]["network"]
    norm = [k for k in a if ".adn.N." in k and k.endswith("running_mean")]
    assert norm and all(not torch.equal(a[k], b[k]) for k in norm)
    assert len(list((ws / "site-1").rglob("log.txt"))) >= 1


def test_harmofl_two_sites_target_averaged_and_kept(tiny_sites, tmp_path):
    ws = tmp_path / "ws"
    job = _export(tmp_path, "harmofl", "--image-size", "32", "--amp-ratio", "0.1")
    run = _simulate(job, ws, tiny_sites, threads=2)
    glob = torch.load(run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    target = torch.as_tensor(glob["harmonize.target"])
    assert target.shape == (3, 32, 32) and target.abs().sum() > 0  # averaged by the server like the weights
    for s in ("site-1", "site-2"):  # from round 1 on, each site normalizes to the global target
        state = torch.load(ws / s / "simulate_job" / "fedharmony" / s / "site_state.pt", weights_only=True)
        torch.testing.assert_close(state["network"]["harmonize.target"], target.float())
    cse = json.loads((run / "cross_site_val" / "cross_val_results.json").read_text())
    assert {"SRV_FL_global_model.pt", "site-1", "site-2"} <= set(cse["site-1"])


def test_iopfl_two_sites_personalized_models_tracked_returned_and_pooled(tiny_sites, tmp_path):
    ws = tmp_path / "ws"
    # -t 1: every task runs in a fresh site process, so the personalized model must come back from disk
    run = _simulate(_export(tmp_path, "iopfl", "--iop-alpha", "0.2"), ws, tiny_sites, threads=1)

    # global and personalized validation Dice, every site, every round
    rows = list(csv.DictReader(open(run / "results" / "metrics_by_round.csv")))
    for tag in ("val_mean_dice", "val_mean_dice_personalized"):
        assert {(r["site"], int(r["round"])) for r in rows if r["tag"] == tag} == \
            {(s, r) for s in ("site-1", "site-2") for r in (0, 1)}, tag
    assert "personalized_mean_last" in json.loads((run / "results" / "summary.json").read_text())

    states = {s: torch.load(ws / s / "simulate_job" / "fedharmony" / s / "site_state.pt", weights_only=True)
              for s in ("site-1", "site-2")}
    for st in states.values():  # two rounds, the personalized model kept across the process restarts
        phi = st["method"]["state"]["personalized"]
        assert st["round"] == 2 and st["method"]["name"] == "iopfl" and phi is not None
        assert not all(torch.equal(phi[k], st["network"][k]) for k in st["network"])

    # the cross-site matrix scores the global model and each site's personalized model on every site
    cse = json.loads((run / "cross_site_val" / "cross_val_results.json").read_text())
    for site in ("site-1", "site-2"):
        assert {"SRV_FL_global_model.pt", "site-1", "site-2"} <= set(cse[site])

    # the model pool: global + both personalized models, loadable by the bundle
    from fedharmony.methods.iopfl.model_pool import load_pool

    pool = load_pool(run / "model_pool", BUNDLE)
    assert pool.names == ["site-1", "site-2", "global"]
    manifest = json.loads((run / "model_pool" / "manifest.json").read_text())
    assert {e["data"] for e in manifest["experts"] if e["kind"] == "personalized"} == {"BIDMC", "HK"}
    from fedharmony.methods.iopfl.model_pool import FORMAT, file_digest

    assert manifest["format"] == FORMAT  # each expert's digest recorded by the job, checked by load_pool
    assert all(e["sha256"] == file_digest(run / "model_pool" / e["file"]) for e in manifest["experts"])
    for s in ("site-1", "site-2"):  # what each site returned is its best personalized model
        best = torch.load(ws / s / "simulate_job" / "fedharmony" / s / "best_model.pt", weights_only=True)
        pooled = torch.load(run / "model_pool" / f"{s}.pt", weights_only=True)
        assert all(torch.equal(pooled[k], best[k].to(pooled[k].dtype)) for k in best)
    glob = torch.load(run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    pooled = torch.load(run / "model_pool" / "global.pt", weights_only=True)
    assert all(torch.equal(pooled[k], torch.as_tensor(glob[k]).to(pooled[k].dtype)) for k in pooled)


def test_ditto_two_sites_personalized_model_trained_tracked_and_returned(tiny_sites, tmp_path):
    ws = tmp_path / "ws"
    # -t 2: one process per site (restoring Ditto's state after a restart is covered by its unit test; the
    # -t 1 restarts are exercised by the IOP-FL and PRR-FL runs)
    run = _simulate(_export(tmp_path, "ditto", "--ditto-lambda", "0.5"), ws, tiny_sites, threads=2)
    rows = list(csv.DictReader(open(run / "results" / "metrics_by_round.csv")))
    for tag in ("val_mean_dice", "val_mean_dice_personalized"):
        assert {(r["site"], int(r["round"])) for r in rows if r["tag"] == tag} == \
            {(s, r) for s in ("site-1", "site-2") for r in (0, 1)}, tag
    glob = torch.load(run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    cse = json.loads((run / "cross_site_val" / "cross_val_results.json").read_text())
    for s in ("site-1", "site-2"):
        st = torch.load(ws / s / "simulate_job" / "fedharmony" / s / "site_state.pt", weights_only=True)
        ditto = st["method"]["state"]
        assert st["round"] == 2 and st["method"]["name"] == "ditto" and ditto["personal_optimizer"]["state"]
        best = torch.load(ws / s / "simulate_job" / "fedharmony" / s / "best_model.pt", weights_only=True)
        conv = [k for k in best if k.endswith("conv.weight")]
        # the site's result is its personalized model: neither the global model nor the FedAvg-trained one
        assert not all(torch.equal(best[k], torch.as_tensor(glob[k]).to(best[k].dtype)) for k in conv)
        assert not all(torch.equal(best[k], st["network"][k]) for k in conv)
        assert {"SRV_FL_global_model.pt", "site-1", "site-2"} <= set(cse[s])  # returned for cross-site evaluation


def test_scaffold_two_sites_control_variates_move_and_stay_out_of_the_checkpoint(tiny_sites, tmp_path):
    ws = tmp_path / "ws"
    run = _simulate(_export(tmp_path, "scaffold", rounds=3), ws, tiny_sites, threads=2)
    for name in ("FL_global_model.pt", "best_FL_global_model.pt"):  # both load: no arrays in their meta
        ckpt = torch.load(run / "app_server" / name, weights_only=True)
        assert "scaffold_c_global" not in (ckpt.get("meta_props") or {}), name
    log = (ws / "server" / "log.txt").read_text()
    assert log.count("SCAFFOLD control variate moved by the mean of 2 site changes") == 3
    c_local = {}
    for s in ("site-1", "site-2"):
        st = torch.load(ws / s / "simulate_job" / "fedharmony" / s / "site_state.pt", weights_only=True)
        assert st["round"] == 3 and st["method"]["name"] == "scaffold"
        c_local[s] = st["method"]["state"]["c_local"]
        assert all(torch.isfinite(v).all() for v in c_local[s].values())
        assert any(v.abs().sum() > 0 for v in c_local[s].values())
    key = next(k for k in c_local["site-1"] if k.endswith("conv.weight"))
    assert not torch.equal(c_local["site-1"][key], c_local["site-2"][key])  # each site its own drift


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
