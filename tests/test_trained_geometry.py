"""The training geometry a global checkpoint records (fedharmony.bundle.trained_geometry) and how the bundle's
inference uses it."""

import logging

import pytest
import torch

from fedharmony.bundle.trained_geometry import (GeometryMismatch, check_geometry, inference_geometry,
                                                read_trained_geometry)


def _checkpoint(path, geometry=None, **meta):
    if geometry is not None:
        meta["preprocessing"] = geometry
    torch.save({"model": {"w": torch.zeros(2)}, "meta_props": meta}, path)
    return str(path)


def test_a_checkpoint_records_its_geometry_and_its_source(tmp_path):
    path = _checkpoint(tmp_path / "g.pt", {"pixdim": 0.594, "image_size": 96, "source": "fingerprint"},
                       current_round=3)
    assert read_trained_geometry(path) == {"pixdim": 0.594, "image_size": 96, "source": "fingerprint"}
    assert read_trained_geometry(_checkpoint(tmp_path / "old.pt", current_round=3)) is None  # an older global model
    assert read_trained_geometry(str(tmp_path / "absent.pt")) is None  # the checkpoint loader names a missing file


def test_inference_at_the_default_takes_the_checkpoints_geometry_and_logs_it(tmp_path, caplog):
    path = _checkpoint(tmp_path / "g.pt", {"pixdim": 0.594, "image_size": 96, "source": "fingerprint"})
    with caplog.at_level(logging.INFO, logger="fedharmony.inference"):
        assert inference_geometry(path, 0.0, -1) == {"pixdim": 0.594, "image_size": 96}
    assert "geometry from" in caplog.text and "fingerprint" in caplog.text
    assert inference_geometry(path, 0.594, 96) == {"pixdim": 0.594, "image_size": 96}  # the same, given by hand


def test_other_hand_set_values_are_refused_naming_both_unless_checking_is_off(tmp_path, caplog):
    path = _checkpoint(tmp_path / "g.pt", {"pixdim": 0.594, "image_size": 96, "source": "bundle config"})
    with pytest.raises(GeometryMismatch, match=r"trained at pixdim 0.594, image_size 96.*ask for pixdim 1.5, "
                                                r"image_size 96.*check_geometry false"):
        inference_geometry(path, 1.5, 96)
    with caplog.at_level(logging.WARNING, logger="fedharmony.inference"):
        assert inference_geometry(path, 1.5, 96, check=False) == {"pixdim": 1.5, "image_size": 96}
    assert "check_geometry false" in caplog.text


def test_a_checkpoint_without_a_geometry_runs_at_the_values_given(tmp_path):
    path = _checkpoint(tmp_path / "site.pt")
    assert inference_geometry(path, 1.5, 64) == {"pixdim": 1.5, "image_size": 64}
    torch.save({"w": torch.zeros(2)}, tmp_path / "bare.pt")  # a plain state dict (models/model.pt)
    assert inference_geometry(str(tmp_path / "bare.pt"), 0.0, -1) == {"pixdim": 0.0, "image_size": -1}


@pytest.mark.parametrize("geometry, message", [
    ({"pixdim": -1.0, "image_size": 96}, "pixdim must be a finite number >= 0"),
    ({"pixdim": float("nan"), "image_size": 96}, "pixdim must be a finite number >= 0"),
    ({"pixdim": "$__import__('os')", "image_size": 96}, "pixdim must be a finite number >= 0"),
    ({"pixdim": 1.0, "image_size": 0}, "image_size must be -1 or a positive integer"),
    ({"pixdim": 1.0, "image_size": 96.5}, "image_size must be -1 or a positive integer"),
    ({"pixdim": 1.0}, "has no 'image_size'"),
    ([1.0, 96], "must be a mapping"),
])
def test_a_malformed_recorded_geometry_is_refused_naming_the_file_and_the_field(tmp_path, geometry, message):
    path = _checkpoint(tmp_path / "bad.pt", geometry)
    with pytest.raises(ValueError, match=message) as err:
        inference_geometry(path, 0.0, -1)
    assert "bad.pt: meta_props.preprocessing" in str(err.value)


def test_a_file_that_is_not_a_data_checkpoint_is_refused_naming_it(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt: not a checkpoint that loads as data"):
        read_trained_geometry(str(tmp_path / "junk.pt"))
    with pytest.raises(ValueError, match="inference settings: image_size"):
        check_geometry({"pixdim": 0.0, "image_size": -2}, "inference settings")


@pytest.mark.integration
def test_a_job_resumed_from_a_model_trained_at_another_geometry_stops_naming_both(tiny_sites, tmp_path):
    """``--initial-model`` with a checkpoint that records image_size 64, in a job whose bundle trains at each scan's
    own size (-1): the server stops the job at the start, before any site trains, naming both geometries."""
    import os
    import subprocess

    from conftest import NVFLARE, REPO, TINY_OVERRIDES, export_job
    from fedharmony.bundle.networks import build_network

    network = build_network(str(REPO / "bundles" / "prostate_mri_seg"), overrides=TINY_OVERRIDES)
    ckpt = tmp_path / "FL_global_model.pt"
    torch.save({"model": network.state_dict(), "meta_props": {
        "current_round": 4, "preprocessing": {"pixdim": 0.0, "image_size": 64, "source": "bundle config"}}}, ckpt)
    job = export_job(tmp_path, "resumed", "--initial-model", str(ckpt), "--no-cross-site-eval", rounds=1, sites=2)
    ws = tmp_path / "ws"
    subprocess.run([NVFLARE, "simulator", str(job), "-w", str(ws), "-n", "2", "-t", "2"], capture_output=True,
                   text=True, timeout=900, env={**os.environ, "FEDHARMONY_DATA_ROOT": str(tiny_sites)})
    server_log = (ws / "server" / "log.txt").read_text()
    assert (f"--initial-model {ckpt} was trained at pixdim 0, image_size 64 (bundle config); this job trains at "
            f"pixdim 0, image_size -1" in server_log)
    assert not (ws / "server" / "simulate_job" / "app_server" / "FL_global_model.pt").exists()
    for site in ("site-1", "site-2"):
        log = ws / site / "log.txt"
        assert not log.is_file() or "bundle ready" not in log.read_text()  # no site built its bundle to train


@pytest.mark.integration
def test_a_fingerprint_job_resumed_from_a_model_trained_at_another_geometry_stops_before_round_1(tiny_sites,
                                                                                                tmp_path):
    """With ``--fingerprint`` the geometry is planned after the start, so the check comes then: a checkpoint trained
    at 2 mm / 48 px against the sites' plan (their median spacing, at most 32 px) stops the job before any site
    takes the plan or trains, naming both."""
    import os
    import subprocess

    from conftest import NVFLARE, REPO, TINY_OVERRIDES, export_job
    from fedharmony.bundle.networks import build_network

    network = build_network(str(REPO / "bundles" / "prostate_mri_seg"), overrides=TINY_OVERRIDES)
    ckpt = tmp_path / "FL_global_model.pt"
    trained = {"pixdim": 2.0, "image_size": 48}
    torch.save({"model": network.state_dict(), "meta_props": {
        "current_round": 1, "preprocessing": {**trained, "source": "fingerprint"}}}, ckpt)
    job = export_job(tmp_path, "resumed_fp", "--fingerprint", "--fingerprint-max-image-size", "32", "--initial-model",
                     str(ckpt), "--no-cross-site-eval", rounds=1, sites=2)
    ws = tmp_path / "ws"
    subprocess.run([NVFLARE, "simulator", str(job), "-w", str(ws), "-n", "2", "-t", "2"], capture_output=True,
                   text=True, timeout=900, env={**os.environ, "FEDHARMONY_DATA_ROOT": str(tiny_sites)})
    server_log = (ws / "server" / "log.txt").read_text()
    assert f"the model this job resumes from was trained at {trained}; the sites' fingerprints plan" in server_log
    assert not (ws / "server" / "simulate_job" / "app_server" / "FL_global_model.pt").exists()
    for site in ("site-1", "site-2"):
        log = ws / site / "log.txt"
        assert not log.is_file() or "preprocessing from the federation's fingerprint" not in log.read_text()
