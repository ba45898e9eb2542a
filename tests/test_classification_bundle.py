"""The image-classification bundle with MONAI's own CLI, and PRR-FL / HarmoFL jobs on the real NVFlare simulator."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_CLS_OVERRIDES, TINY_OVERRIDES, export_job, simulate

CLS_BUNDLE = REPO / "bundles" / "image_classification"


def _bundle_run(*args, cwd):
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--bundle_root", str(CLS_BUNDLE), *args]
    for k, v in TINY_CLS_OVERRIDES.items():
        cmd += [f"--{k}", str(v)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=600)


@pytest.mark.integration  # a MONAI CLI training
def test_train_evaluate_and_infer_with_monai_bundle_cli(tiny_dermoscopy, tmp_path):
    site = tiny_dermoscopy / "clientA"
    ckpt = tmp_path / "models"
    res = _bundle_run("--config_file", str(CLS_BUNDLE / "configs" / "train.json"), "--dataset_dir", str(site),
                      "--ckpt_dir", str(ckpt), "--output_dir", str(tmp_path / "eval"), "--num_epochs", "2",
                      "--val_interval", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (ckpt / "model.pt").is_file()

    configs = f"['{CLS_BUNDLE / 'configs' / 'train.json'}','{CLS_BUNDLE / 'configs' / 'evaluate.json'}']"
    res = _bundle_run("--config_file", configs, "--dataset_dir", str(site), "--ckpt_dir", str(ckpt),
                      "--output_dir", str(tmp_path / "eval"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {r[0]: float(r[1]) for r in csv.reader(open(tmp_path / "eval" / "metrics.csv"), delimiter=",")}
    assert set(rows) == {"val_macro_f1", "val_accuracy", "val_auc"}
    assert all(0.0 <= v <= 1.0 for v in rows.values())

    images = tmp_path / "images"
    images.mkdir()
    for p in sorted((site / "img_resize128").glob("*.png"))[:5]:
        shutil.copy(p, images / p.name)
    res = _bundle_run("--config_file", str(CLS_BUNDLE / "configs" / "inference.json"), "--dataset_dir", str(images),
                      "--output_dir", str(tmp_path / "pred"), "--ckpt_path", str(ckpt / "model.pt"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    table = list(csv.DictReader(open(tmp_path / "pred" / "predictions.csv")))
    assert len(table) == 5 and list(table[0]) == ["image", "nv", "bkl", "mel", "predicted"]
    assert {os.path.basename(r["image"]) for r in table} == {p.name for p in images.iterdir()}
    for r in table:
        probs = [float(r[c]) for c in ("nv", "bkl", "mel")]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert r["predicted"] == ("nv", "bkl", "mel")[probs.index(max(probs))]


def test_histology_task_and_a_corrupt_image_is_named(tiny_histology, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_histology, data, symlinks=True)
    site = data / "hospital_0"
    listed = json.loads((site / "datalist.json").read_text())["training"][0]["image"]
    corrupt = (site / listed).resolve()
    corrupt.write_bytes(b"\x89PNG not really")
    res = _bundle_run("--config_file", str(CLS_BUNDLE / "configs" / "train.json"), "--task", "histology",
                      "--dataset_dir", str(site), "--ckpt_dir", str(tmp_path / "m"), "--num_epochs", "1",
                      cwd=tmp_path)
    assert res.returncode != 0
    assert str(corrupt) in res.stderr and "hospital_0" in res.stderr


def test_prrfl_site_receives_into_the_deputy_only_and_restores_both_models(tiny_dermoscopy, tmp_path):
    import numpy as np

    from fedharmony.bundle.site import BundleSite
    from fedharmony.methods.prrfl.fourier_aggregation import mean_amplitudes, mix_amplitudes
    from fedharmony.methods.prrfl.site import FOURIER_RATIO

    def make_site():
        return BundleSite(str(CLS_BUNDLE), str(tiny_dermoscopy / "clientA"), str(tmp_path / "state"), "clientA",
                          method="prrfl", overrides=TINY_CLS_OVERRIDES,
                          config_file=["configs/train.json", "configs/prrfl.json"])

    site = make_site()
    assert site.key_metric == "val_macro_f1"
    site.train(None, local_epochs=2)
    personal = site.state_dict()
    deputy = {k: v.numpy() for k, v in site.method.transfer.deputy.state_dict().items()}
    sent = site.shared_weights()
    assert all(torch.equal(sent[k], torch.from_numpy(deputy[k])) for k in sent)  # the deputy is what leaves
    assert not any("adn.N" in k for k in sent)  # norm layers stay on the site

    other = {k: v.numpy() * 0.5 + 0.01 for k, v in sent.items()}
    aggregate = mean_amplitudes([{k: v.numpy() for k, v in sent.items()}, other])
    site.receive({k: torch.from_numpy(v) for k, v in aggregate.items()}, {FOURIER_RATIO: 0.8})
    expected = mix_amplitudes(deputy, aggregate, 0.8)
    got = site.method.transfer.deputy.state_dict()
    for k in got:
        np.testing.assert_allclose(got[k].numpy(), expected[k], rtol=1e-5, atol=1e-6)
    assert all(torch.equal(personal[k], v) for k, v in site.state_dict().items())  # p untouched

    # the retrogress view scores the deputy whole (its own norm layers too) in the site's network, then puts
    # the personalized model back and leaves the training RNG stream where it was
    deputy_state = {k: v.clone() for k, v in site.method.transfer.deputy.state_dict().items()}
    assert any(not torch.equal(personal[k], deputy_state[k]) for k in deputy_state if "adn.N" in k)
    scored, real_evaluate = {}, site.evaluate

    def spy(weights=None, split="validation"):
        scored.update({k: v.clone() for k, v in site.network.state_dict().items()})
        return real_evaluate(weights, split)

    site.evaluate, rng = spy, torch.get_rng_state()
    score = site.score_exchanged()
    site.evaluate = real_evaluate
    assert all(torch.equal(scored[k], deputy_state[k]) for k in deputy_state) and 0.0 <= score <= 1.0
    assert all(torch.equal(personal[k], v) for k, v in site.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    site.save_state()

    restored = make_site()  # a new process: both models, both optimizers and the stages come back
    assert restored.round == 1 and len(restored.method.transfer.history) == 2
    assert all(torch.equal(v, got[k]) for k, v in restored.method.transfer.deputy.state_dict().items())
    assert restored.method.transfer.deputy_optimizer.state_dict()["state"]
    with pytest.raises(ValueError, match="needs the bundle's configs/prrfl.json"):  # PRR-FL without its overlay
        BundleSite(str(CLS_BUNDLE), str(tiny_dermoscopy / "clientA"), str(tmp_path / "plain"), "clientA",
                   method="prrfl", overrides=TINY_CLS_OVERRIDES)
    with pytest.raises(RuntimeError, match="saved state is a prrfl site's; this job runs fedavg"):
        BundleSite(str(CLS_BUNDLE), str(tiny_dermoscopy / "clientA"), str(tmp_path / "state"), "clientA",
                   overrides=TINY_CLS_OVERRIDES)


def test_an_unknown_task_is_named_by_the_job_script_and_the_bundle(tiny_dermoscopy, tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "histology.py"), "--override", '{"task": "histolgy"}',
                          "--export", "--export-dir", str(tmp_path / "jobs")], capture_output=True, text=True)
    assert res.returncode != 0 and "unknown task 'histolgy'" in res.stderr and "'histology'" in res.stderr
    assert not (tmp_path / "jobs").exists()
    res = _bundle_run("--config_file", str(CLS_BUNDLE / "configs" / "train.json"), "--task", "histolgy",
                      "--dataset_dir", str(tiny_dermoscopy / "clientA"), cwd=tmp_path)
    assert res.returncode != 0 and "unknown task 'histolgy'; the bundle defines ['dermoscopy', 'histology']" in res.stderr


# ---------------------------------------------------------------- federations on the NVFlare simulator
def _simulate(job_script, algorithm, data_root, tmp_path, overrides, *flags, sites=2, threads=1, rounds=2):
    job = export_job(tmp_path, None, *flags, algorithm=algorithm, script=job_script, overrides=overrides,
                     rounds=rounds, sites=sites)
    ws = tmp_path / "ws"
    return ws, simulate(job, ws, data_root, sites=sites, threads=threads)


@pytest.mark.integration
@pytest.mark.parametrize("method", ["ditto", "scaffold"])
def test_ditto_and_scaffold_on_dermoscopy_two_sites(tiny_dermoscopy, tmp_path, method):
    ws, run = _simulate("dermoscopy.py", method, tiny_dermoscopy, tmp_path, TINY_CLS_OVERRIDES, threads=2)
    rows = list(csv.DictReader(open(run / "results" / "metrics_by_round.csv")))
    tags = {"val_macro_f1"} | ({"val_macro_f1_personalized"} if method == "ditto" else set())
    for tag in tags:
        assert {(r["site"], int(r["round"])) for r in rows if r["tag"] == tag} == \
            {(s, r) for s in ("site-1", "site-2") for r in (0, 1)}, tag
    for s in ("site-1", "site-2"):
        st = torch.load(ws / s / "simulate_job" / "fedharmony" / s / "site_state.pt", weights_only=True)
        assert st["round"] == 2 and st["method"]["name"] == method
        extra = st["method"]["state"]["personal" if method == "ditto" else "c_local"]
        assert extra and all(torch.isfinite(v).all() for v in extra.values() if v.is_floating_point())


@pytest.mark.integration
def test_prrfl_dermoscopy_two_sites_personalized_and_deputy_models(tiny_dermoscopy, tmp_path):
    from fedharmony.methods.prrfl.deputy import RECOVER
    from fedharmony.methods.prrfl.site import FOURIER_RATIO
    from fedharmony.methods.prrfl.fourier_aggregation import ratio_schedule

    # -t 2: one process per site (both models and optimizers coming back from disk after a restart is
    # test_prrfl_site_receives_into_the_deputy_only_and_restores_both_models; -t 1 restarts: the IOP-FL run)
    ws, run = _simulate("dermoscopy.py", "prrfl", tiny_dermoscopy, tmp_path, TINY_CLS_OVERRIDES,
                        "--local-epochs", "2", "--score-after-training", threads=2)
    rows = list(csv.DictReader(open(run / "results" / "metrics_by_round.csv")))
    tags = ("val_macro_f1", "val_macro_f1_after_training", "val_macro_f1_exchanged",
            "val_macro_f1_exchanged_after_training")  # the last two: the deputy (--score-after-training)
    for tag in tags:
        assert {(r["site"], int(r["round"])) for r in rows if r["tag"] == tag} == \
            {(s, t) for s in ("site-1", "site-2") for t in (0, 1)}, tag
    value = {(r["tag"], r["site"], int(r["round"])): float(r["value"]) for r in rows}
    for s in ("site-1", "site-2"):  # the answer goes to the deputy: the personalized model has no retrogress
        assert value[("val_macro_f1", s, 1)] == value[("val_macro_f1_after_training", s, 0)]
    stages = {(r["site"], int(r["round"])): float(r["value"]) for r in rows if r["tag"] == "prrfl_stage"}
    assert {stages[(s, e)] for s in ("site-1", "site-2") for e in (0, 2)} == {1.0}  # each round starts in recover

    states = {s: torch.load(ws / s / "simulate_job" / "fedharmony" / s / "site_state.pt", weights_only=True)
              for s in ("site-1", "site-2")}
    for s, st in states.items():
        prrfl = st["method"]["state"]
        assert st["round"] == 2 and st["method"]["name"] == "prrfl" and prrfl["deputy"] is not None
        assert [h[1] for h in prrfl["history"]][0::2] == [RECOVER, RECOVER]  # first epoch of each round
        assert prrfl["deputy_optimizer"]["state"] and st["optimizer"]["state"]  # both optimizers kept
        personal, deputy = st["network"], prrfl["deputy"]
        assert not all(torch.equal(personal[k], deputy[k]) for k in personal)
        log = (ws / s / "log.txt").read_text()
        assert f"{s} round 1: personalized val_macro_f1" in log and "stages recover/" in log
    # the server's answer is mixed with each site's own phase: the deputies stay site-specific
    deputies = {s: st["method"]["state"]["deputy"] for s, st in states.items()}
    conv = next(k for k, v in deputies["site-1"].items() if v.ndim == 4)
    assert not torch.allclose(deputies["site-1"][conv], deputies["site-2"][conv])

    ckpt = torch.load(run / "app_server" / "FL_global_model.pt", weights_only=False)
    assert ckpt["meta_props"][FOURIER_RATIO] == pytest.approx(ratio_schedule(1, 2))
    # cross-site evaluation: only the sites' personalized models (there is no global model)
    cse = json.loads((run / "cross_site_val" / "cross_val_results.json").read_text())
    for site in ("site-1", "site-2"):
        assert set(cse[site]) == {"site-1", "site-2"}
        assert set(cse[site][site]) == {"val_macro_f1", "val_accuracy", "val_auc"}
    server_log = (ws / "server" / "log.txt").read_text()
    assert "Fourier aggregation of 2 deputies, shared ratio L = 0.7000" in server_log


@pytest.mark.integration
def test_prrfl_released_protocol_on_the_prostate_sites(tiny_sites, tmp_path):
    # --protocol released: the half-open box on the server; on the sites the batchmean KL and the released
    # optimizer (SGD, lr 1e-2 for rounds 0-4, both optimizers built anew each round). The paper default runs
    # on dermoscopy above and in the unit tests.
    ws, run = _simulate("prostate.py", "prrfl", tiny_sites, tmp_path, TINY_OVERRIDES, "--protocol", "released",
                        threads=2)
    assert "Fourier aggregation of 2 deputies" in (ws / "server" / "log.txt").read_text()
    server = json.loads(next(ws.rglob("config_fed_server.json")).read_text())
    assert '"box": "half_open"' in json.dumps(server)
    client = json.loads(next(ws.rglob("config_fed_client.json")).read_text())
    sent = client["executors"][0]["executor"]["args"]["overrides"]
    assert sent["optimizer_name"] == "sgd" and sent["prrfl_kl_reduction"] == "batchmean"
    for site in ("site-1", "site-2"):
        log = (ws / site / "log.txt").read_text()
        assert "round 0 trains at learning rate 0.01 (optimizers reset)" in log
        assert "round 1 trains at learning rate 0.01 (optimizers reset)" in log
        state = torch.load(ws / site / "simulate_job" / "fedharmony" / site / "site_state.pt", weights_only=True)
        assert state["optimizer"]["param_groups"][0]["momentum"] == 0  # the released plain SGD
    summary = json.loads((run / "results" / "summary.json").read_text())
    assert summary["tag"] == "val_mean_dice" and set(summary["per_site"]) == {"site-1", "site-2"}
    cse = json.loads((run / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(cse["site-1"]) == {"site-1", "site-2"}


@pytest.mark.integration
def test_harmofl_job_runs_on_the_histology_sites(tiny_histology, tmp_path):
    for algorithm in ("harmofl",):  # FedBN runs on the prostate and dermoscopy sites (test_simulator, the study)
        work = tmp_path / algorithm
        work.mkdir()
        ws, run = _simulate("histology.py", algorithm, tiny_histology, work, TINY_CLS_OVERRIDES, rounds=1,
                            threads=2)
        cse = json.loads((run / "cross_site_val" / "cross_val_results.json").read_text())
        assert {"site-1", "site-2"} <= set(cse["site-1"])
        if algorithm == "harmofl":  # the amplitude target (3 RGB channels at 32 x 32) reached the global model
            glob = torch.load(run / "app_server" / "FL_global_model.pt", weights_only=False)["model"]
            target = [v for k, v in glob.items() if "target" in k]
            assert target and tuple(torch.as_tensor(target[0]).shape)[-3:][0] == 3
