"""The job scripts' command line and the job folders they export (no federation starts here)."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import BUNDLE, REPO, TINY_OVERRIDES, export_job
from fedharmony.bundle.networks import build_network


def _export(tmp_path, algorithm, *flags, rounds=2, sites=2):
    return export_job(tmp_path, None, *flags, algorithm=algorithm, rounds=rounds, sites=sites)


def test_job_script_refuses_unknown_overrides_and_bad_method_flags(tmp_path, monkeypatch, capsys):
    """Every refusal of the job scripts' command line (``fedharmony.fl.cli.main``, in this process: each case
    must stop before a recipe runs or exports), then the real script once, as a user runs it."""
    from nvflare.recipe.spec import Recipe

    from fedharmony.fl.cli import main

    def must_not_run(*args, **kwargs):
        raise AssertionError("a refused command line reached recipe.execute")

    monkeypatch.setattr(Recipe, "execute", must_not_run)
    cases = ((["--override", '{"learning_rat": 0.1}'], "learning_rat"),
             (["--override", "[1]"], "JSON object"),
             (["--algorithm", "harmofl", "--amp-ratio", "0.7"], "amp_ratio"),
             (["--algorithm", "harmofl", "--wp-alpha", "-1"], "alpha"),
             (["--algorithm", "fedavg", "--wp-alpha", "0.1"], "--wp-alpha is a setting of harmofl, not of --algorithm fedavg"),
             (["--algorithm", "iopfl", "--iop-alpha", "1.5"], "[0, 1)"),
             (["--algorithm", "fedavg", "--iop-alpha", "0.1"], "--iop-alpha is a setting of iopfl, not of --algorithm fedavg"),
             (["--algorithm", "ditto", "--mu", "0.1"], "--mu is a setting of fedprox, not of --algorithm ditto"),
             (["--algorithm", "ditto", "--ditto-lambda", "0"], "ditto_lambda must be > 0, got 0.0"),
             (["--algorithm", "fedprox", "--mu", "0"], "mu must be > 0, got 0.0"),
             (["--algorithm", "harmofl", "--image-size", "40"], "image_size must be in [16, 2048], a multiple of 16"),
             (["--algorithm", "prrfl", "--prrfl-box", "round"], "invalid choice"),
             (["--tracking", "neptune"], "invalid choice"),
             (["--algorithm", "fedsgd"], "invalid choice"),
             (["--algorithm", "iopfl", "--no-cross-site-eval"], "cross-site evaluation"),
             (["--privacy-percentile", "100"], "privacy_percentile"),
             (["--privacy-percentile", "90", "--privacy-gamma", "0"], "privacy_gamma"),
             (["--start-round", "-1"], "start_round"),
             (["--cross-site-timeout", "0"], "cross_site_timeout"),
             (["--initial-model", str(tmp_path / "none.pt")], "cannot read its round"),
             (["--algorithm", "prrfl", "--prrfl-r0", "0.9", "--prrfl-r1", "0.8"], "r0 = 0.9 > r1 = 0.8"),
             (["--algorithm", "prrfl", "--prrfl-r1", "1.5"], "prrfl_r1 must be in (0, 1]"),
             (["--algorithm", "prrfl", "--prrfl-r0", "0"], "prrfl_r0 must be in (0, 1]"),
             (["--algorithm", "prrfl", "--prrfl-alpha1", "0.95"], "alpha1 <= alpha2"),
             (["--algorithm", "prrfl", "--privacy-percentile", "90"], "full deputy"),
             (["--algorithm", "prrfl", "--initial-model", str(tmp_path / "x.pt"), "--start-round", "3"],
              "cannot resume"),
             (["--algorithm", "fedavg", "--prrfl-r0", "0.5"], "--prrfl-r0 is a setting of prrfl, not of --algorithm fedavg"),
             (["--override", '{"optimizer_name": "sgdd"}'], "override 'optimizer_name': must be one of ['adam', 'sgd']"),
             (["--override", '{"lr_round_step": 0}'], "override 'lr_round_step': must be >= 1, got 0"),
             (["--bogus-flag"], "unrecognized arguments"))
    for extra, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(str(BUNDLE), argv=extra)
        said = capsys.readouterr().err + (stop.value.code if isinstance(stop.value.code, str) else "")
        assert stop.value.code != 0 and message in said, (extra, said[-500:])

    script = [sys.executable, str(REPO / "jobs" / "prostate.py"), "--export", "--export-dir", str(tmp_path / "j")]
    res = subprocess.run(script + ["--algorithm", "fedavg", "--amp-ratio", "0.1"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert res.returncode != 0 and "--amp-ratio is a setting of harmofl, not of --algorithm fedavg" in res.stderr, res.stderr[-500:]
    assert not (tmp_path / "j").exists()  # nothing was exported


def test_exported_job_is_self_contained(tmp_path):
    job = _export(tmp_path, "fedavg")
    assert (job / "meta.json").is_file()
    assert (job / "app" / "custom" / "fedharmony" / "fl" / "executor.py").is_file()
    assert (job / "app" / "config" / "prostate_mri_seg" / "configs" / "train.json").is_file()
    assert (job / "app" / "custom" / "fedharmony" / "methods" / "fedavg" / "site.py").is_file()
    assert not (job / "app" / "custom" / "fedharmony" / "phantom").exists()  # no site runs the generators
    text = "".join(p.read_text() for p in (job / "app" / "config").glob("config_fed_*.json"))
    assert str(REPO) not in text  # nothing points back at this checkout


def test_production_options_reach_the_exported_job(tmp_path):
    """--min-clients, --no-custom-code, --privacy-percentile, --initial-model and --cross-site-timeout
    as NVFlare sees them in the job folder."""
    ckpt = tmp_path / "FL_global_model.pt"
    net = build_network(str(BUNDLE), "configs/train.json", "network_def", TINY_OVERRIDES, 0)
    torch.save({"model": net.state_dict(), "meta_props": {"current_round": 4}}, ckpt)
    job = _export(tmp_path, "fedavg", "--sites", "3", "--min-clients", "2", "--no-custom-code",
                  "--privacy-percentile", "90", "--initial-model", str(ckpt), "--cross-site-timeout", "45")
    assert json.loads((job / "meta.json").read_text())["min_clients"] == 2
    assert not (job / "app" / "custom").exists()  # no code travels
    server = json.loads((job / "app" / "config" / "config_fed_server.json").read_text())
    client = json.loads((job / "app" / "config" / "config_fed_client.json").read_text())
    fedavg = next(w["args"] for w in server["workflows"] if w["path"].endswith("FedAvg"))
    assert fedavg["num_clients"] == 0 and fedavg["start_round"] == 5  # every connected site; after round 4
    persistor = next(c["args"] for c in server["components"] if c["id"] == "persistor")
    assert persistor["source_ckpt_file_full_name"] == str(ckpt)
    cse = next(w["args"] for w in server["workflows"] if w["path"].endswith("CrossSiteModelEval"))
    assert cse["submit_model_timeout"] == cse["validation_timeout"] == 45
    (result_filters,) = client["task_result_filters"]
    assert result_filters["tasks"] == ["train"]
    assert [f["path"].rsplit(".", 1)[-1] for f in result_filters["filters"]] == ["PercentilePrivacy"]
    assert client["executors"][0]["executor"]["args"]["send_weight_diff"] is True
