"""A real POC federation: provisioned server and 3 site processes; jobs via `nvflare job submit` and the FLARE API,
and the faults a production federation must survive (bad updates, a site or the server killed mid-run)."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import NVFLARE, POC_TOOL, REPO, export_job, poc_federation

pytestmark = pytest.mark.integration
SITE_TIMEOUT = 30  # seconds of silence before the server drops a site (NVFlare's default is ~11 min)


@pytest.fixture(scope="module")
def poc(tmp_path_factory):
    """Three tiny phantom sites and a POC federation (server + site-1..site-3) serving them."""
    with poc_federation(tmp_path_factory.mktemp("poc"), "--site-timeout", str(SITE_TIMEOUT)) as federation:
        yield federation


def _export(base, name, *flags, rounds=2):
    return export_job(base, name, *flags, rounds=rounds)


def _kits(poc):
    return poc["root"] / "poc" / "example_project" / "prod_00"


def _session(poc):
    sys.path.insert(0, str(REPO / "tools"))
    import poc as poc_tool

    return poc_tool.session(poc["root"])


def _wait_for(path, text, timeout=600, poll=0.5):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(poll)
    raise TimeoutError(f"{text!r} never appeared in {path}")


def _crash(poc, participant, job_id):
    """Kill -9 a participant the way a power cut would: its supervisor loop, its main process
    and its process for the job; nothing gets to say goodbye."""
    workspace = _kits(poc) / participant
    pids = [int((workspace / f).read_text()) for f in ("daemon_pid.fl", "pid.fl") if (workspace / f).is_file()]
    if participant == "server":
        pids = pids[1:]  # keep the supervisor: it restarts the server like a service manager would
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if job_id in cmd and any(a.startswith(str(workspace)) for a in cmd):
            pids.append(int(pid))
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def _start(poc, participant):
    res = subprocess.run(POC_TOOL + ["--root", str(poc["root"]), "start", participant],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


def _run_with_crash(poc, job, participant, at_round, download_to):
    """Submit ``job``, crash ``participant`` when the server starts round ``at_round``, follow
    the job to its end; returns (job status, downloaded workspace)."""
    sess = _session(poc)
    try:
        job_id = sess.submit_job(str(job))
        # kill within ~0.1 s of the round's start, while the site is still training (the crash jobs run
        # 5 local epochs): a site killed in the middle of uploading its update leaves NVFlare with a
        # half-received stream, and NVFlare 2.9 then fails the whole job when the run ends
        _wait_for(_kits(poc) / "server" / job_id / "log.txt", f"Round {at_round} started", poll=0.05)
        assert _crash(poc, participant, job_id)
        sess.monitor_job(job_id, timeout=900, poll_interval=2.0)
        status = sess.get_job_meta(job_id)["status"]
        result = sess.download_job_result(job_id, str(download_to))
    finally:
        sess.close()
    return status, result


def _nvflare(poc, *args, timeout=600):
    env = {**os.environ, "HOME": str(poc["root"] / "home")}  # the POC's own startup-kit registry
    return subprocess.run([NVFLARE, *args], env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=poc["base"])


def _check_results(workspace, global_model=True):
    rows = list(csv.DictReader(open(workspace / "results" / "metrics_by_round.csv")))
    assert {(r["site"], int(r["round"])) for r in rows if r["tag"] == "val_mean_dice"} == \
        {(s, r) for s in ("site-1", "site-2", "site-3") for r in (0, 1)}
    cse = json.loads((workspace / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(cse) == {"site-1", "site-2", "site-3"}
    # PRR-FL has no global model: the matrix holds the sites' personalized models only
    assert all(("SRV_FL_global_model.pt" in row) == global_model for row in cse.values())
    assert (workspace / "app_server" / "FL_global_model.pt").is_file()


def test_nvflare_job_submit_gives_the_simulator_results(poc):
    job = _export(poc["base"], "cli_submit")
    res = _nvflare(poc, "job", "submit", "-j", str(job))
    assert res.returncode == 0, res.stdout + res.stderr
    job_id = next(line.split()[-1] for line in (res.stdout + res.stderr).splitlines() if line.startswith("job_id:"))
    res = _nvflare(poc, "job", "wait", job_id, "--timeout", "600")
    assert "FINISHED:COMPLETED" in res.stdout + res.stderr, res.stdout + res.stderr
    out = poc["base"] / "downloads"
    res = _nvflare(poc, "job", "download", job_id, "-o", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    _check_results(out / job_id / "workspace")


def test_flare_api_tool_submits_follows_and_downloads(poc):
    job = _export(poc["base"], "api_submit")
    out = poc["base"] / "api_results"
    res = subprocess.run(POC_TOOL + ["--root", str(poc["root"]), "submit", str(job), "--timeout", "600",
                                     "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "RUNNING" in res.stdout and "FINISHED:COMPLETED" in res.stdout  # progress was followed
    assert "Cross-site val_mean_dice, test split" in res.stdout
    (result,) = [p for p in out.iterdir() if p.is_dir()]
    _check_results(result / "workspace")


# The methods whose server side differs from FedAvg's (IOP-FL's model pool, PRR-FL's Fourier aggregation,
# SCAFFOLD's control variates in the global model's meta, serialized between real processes). FedProx, FedBN,
# HarmoFL and Ditto use FedAvg's server unchanged; their sites run in the simulator tests.
@pytest.mark.parametrize("algorithm, flags", [("iopfl", []), ("prrfl", []), ("scaffold", [])])
def test_methods_with_their_own_server_side_run_on_the_federation(poc, algorithm, flags):
    job = _export(poc["base"], f"poc_{algorithm}", "--algorithm", algorithm, *flags)
    out = poc["base"] / f"poc_{algorithm}_results"
    res = subprocess.run(POC_TOOL + ["--root", str(poc["root"]), "submit", str(job), "--timeout", "600",
                                     "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "FINISHED:COMPLETED" in res.stdout, res.stdout + res.stderr
    (result,) = [p for p in out.iterdir() if p.is_dir()]
    _check_results(result / "workspace", global_model=algorithm != "prrfl")
    if algorithm == "iopfl":  # the model pool comes back with the run
        manifest = json.loads((result / "workspace" / "model_pool" / "manifest.json").read_text())
        assert sorted(e["kind"] for e in manifest["experts"]) == ["global"] + ["personalized"] * 3, manifest


def test_corrupt_nifti_on_one_site_is_named_in_the_server_log(poc):
    bad = poc["base"] / "bad_data"
    shutil.copytree(poc["data"], bad)
    test_case = json.loads((bad / "UCL" / "datalist.json").read_text())["testing"][0]["image"]
    corrupt = bad / "UCL" / test_case
    corrupt.write_bytes(b"truncated")
    job = _export(poc["base"], "corrupt", "--data-root", str(bad))  # the job's data_root wins over the sites' env
    out = poc["base"] / "corrupt_results"
    res = subprocess.run(POC_TOOL + ["--root", str(poc["root"]), "submit", str(job), "--timeout", "600",
                                     "--out", str(out)], capture_output=True, text=True, timeout=900)
    (result,) = [p for p in out.iterdir() if p.is_dir()]
    server_log = (result / "workspace" / "log.txt").read_text()
    # the test split is read by cross-site evaluation: site-3 fails there, with the file named on the server
    assert f"site-3: task 'validate' failed: SiteDataError: site 'UCL': cannot read NIfTI {corrupt}" in server_log
    # nothing else is lost: training finished, the global model is saved, the other sites scored every model
    assert res.returncode == 0 and "FINISHED:COMPLETED" in res.stdout, res.stdout + res.stderr
    assert (result / "workspace" / "app_server" / "FL_global_model.pt").is_file()
    cse = json.loads((result / "workspace" / "cross_site_val" / "cross_val_results.json").read_text())
    assert all("SRV_FL_global_model.pt" in cse[s] for s in ("site-1", "site-2"))
    assert (poc["data"] / "UCL" / test_case).stat().st_size > 100  # the sites' real data is untouched


def _inject_faults(job, faults):
    """Add the test-only SpoilUpdate filter to every site's training results of an exported job."""
    shutil.copy(REPO / "tests" / "fault_injection.py", job / "app" / "custom" / "fault_injection.py")
    config_file = job / "app" / "config" / "config_fed_client.json"
    config = json.loads(config_file.read_text())
    config.setdefault("task_result_filters", []).append(
        {"tasks": ["train"], "filters": [{"path": "fault_injection.SpoilUpdate", "args": {"faults": faults}}]})
    config_file.write_text(json.dumps(config, indent=2))


def test_bad_site_updates_are_rejected_and_the_job_finishes(poc):
    job = _export(poc["base"], "bad_updates")
    _inject_faults(job, {"site-2": {"0": "nan", "1": "missing"}, "site-3": {"0": "shape", "1": "inf"}})
    out = poc["base"] / "bad_updates_results"
    res = subprocess.run(POC_TOOL + ["--root", str(poc["root"]), "submit", str(job), "--timeout", "600",
                                     "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "FINISHED:COMPLETED" in res.stdout, res.stdout + res.stderr
    (result,) = [p for p in out.iterdir() if p.is_dir()]
    log = (result / "workspace" / "log.txt").read_text()
    # each bad update is rejected with its reason, named by site and round
    assert "round 0: rejected the update from site-2: " in log and "holds NaN or Inf" in log
    assert "round 0: rejected the update from site-3: " in log and "has shape" in log
    assert "round 1: rejected the update from site-2: keys do not match the model: missing" in log
    assert "round 1: rejected the update from site-3: " in log
    assert log.count("aggregated ['site-1'], rejected ['site-2', 'site-3']") == 2
    checkpoint = torch.load(result / "workspace" / "app_server" / "FL_global_model.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in checkpoint["model"].values())


def test_site_crash_mid_round_the_others_finish_the_job(poc):
    # no cross-site evaluation: a new NVFlare workflow that does not know site-3 died would wait for it
    job = _export(poc["base"], "site_crash", "--min-clients", "2", "--no-cross-site-eval", "--local-epochs", "5",
                  rounds=3)
    status, result = _run_with_crash(poc, job, "site-3", at_round=1, download_to=poc["base"] / "site_crash_results")
    _start(poc, "site-3")  # back for the next tests
    log = (poc["base"] / "site_crash_results" / os.path.basename(result) / "workspace" / "log.txt").read_text()
    assert status == "FINISHED:COMPLETED", status
    assert "site site-3 is gone from the job (no heartbeat)" in log
    # the round it died in completed without it: round 1, or round 2 when site-3 had already sent
    # its round-1 update in the moment between "Round 1 started" and the kill; every later round too
    died_in = 1 if "round 1: aggregated ['site-1', 'site-2']" in log else 2
    assert all(f"round {r}: aggregated ['site-1', 'site-2']" in log for r in range(died_in, 3)), log[-3000:]
    rows = list(csv.DictReader(open(os.path.join(result, "workspace", "results", "metrics_by_round.csv"))))
    rounds = {s: {int(r["round"]) for r in rows if r["site"] == s and r["tag"] == "val_mean_dice"}
              for s in ("site-1", "site-2", "site-3")}
    assert rounds["site-1"] == rounds["site-2"] == {0, 1, 2} and 2 not in rounds["site-3"]


def test_site_crash_below_the_minimum_stops_the_job(poc):
    job = _export(poc["base"], "site_crash_min3", "--min-clients", "3", "--cross-site-timeout", "30",
                  "--local-epochs", "5", rounds=3)
    status, result = _run_with_crash(poc, job, "site-3", at_round=1, download_to=poc["base"] / "min3_results")
    _start(poc, "site-3")
    log = (poc["base"] / "min3_results" / os.path.basename(result) / "workspace" / "log.txt").read_text()
    assert status.startswith("FINISHED:") and status != "FINISHED:COMPLETED", status
    assert "Alive clients 2 < required min 3" in log
    assert "site site-3 is gone from the job" in log
    assert "round 2: aggregated" not in log


def test_server_crash_keeps_the_last_global_model_and_the_run_resumes_from_it(poc):
    job = _export(poc["base"], "server_crash", rounds=4)
    sess = _session(poc)
    try:
        job_id = sess.submit_job(str(job))
        server_log = _kits(poc) / "server" / job_id / "log.txt"
        _wait_for(server_log, "Round 2 started")
    finally:
        sess.close()
    _crash(poc, "server", job_id)  # the POC supervisor restarts the server, as a service manager would
    checkpoint = _kits(poc) / "server" / job_id / "app_server" / "FL_global_model.pt"
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["meta_props"]["current_round"] >= 1  # at most one round lost
    assert all(torch.isfinite(v.float()).all() for v in saved["model"].values())
    # the documented restart: a new job from the saved model, numbering rounds on
    resumed = _export(poc["base"], "server_crash_resumed", "--initial-model", str(checkpoint), rounds=1)
    out = poc["base"] / "resumed_results"
    _session(poc).close()  # the restarted server accepts admins again (the session waits for it)
    res = subprocess.run(POC_TOOL + ["--root", str(poc["root"]), "submit", str(resumed), "--timeout", "600",
                                     "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "FINISHED:COMPLETED" in res.stdout, res.stdout + res.stderr
    (result,) = [p for p in out.iterdir() if p.is_dir()]
    rows = list(csv.DictReader(open(result / "workspace" / "results" / "metrics_by_round.csv")))
    first = saved["meta_props"]["current_round"] + 1
    assert {int(r["round"]) for r in rows if r["tag"] == "val_mean_dice"} == {first}
    assert f"Round {first} started" in (result / "workspace" / "log.txt").read_text()
