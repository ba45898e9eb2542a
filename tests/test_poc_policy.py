"""Site policies on a real POC federation whose 3 sites forbid custom code: jobs that carry code are
refused, jobs without code run from the installed package and bundle (with a privacy filter), a
job without code that was altered to make a site evaluate something or read other data is refused
by every site before anything is parsed, and an admin without the right to submit is refused."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import BUNDLE, POC_TOOL, REPO, TINY_OVERRIDES, export_job, poc_federation

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def strict_poc(tmp_path_factory):
    with poc_federation(tmp_path_factory.mktemp("strict_poc"), "--no-custom-code") as federation:
        yield federation


def _export(base, name, *flags):
    return export_job(base, name, *flags, rounds=1)


def _submit(poc, job, *flags):
    out = poc["base"] / f"{job.name}_results"
    res = subprocess.run(POC_TOOL + ["--root", str(poc["root"]), "submit", str(job), "--timeout", "600",
                                     "--out", str(out), *flags], capture_output=True, text=True, timeout=900)
    return res, out


def _jobs(poc):
    sys.path.insert(0, str(REPO / "tools"))
    import poc as poc_tool

    sess = poc_tool.session(poc["root"])
    try:
        return {j["job_name"]: j["status"] for j in sess.list_jobs()}
    finally:
        sess.close()


def test_a_job_with_custom_code_is_refused_by_every_site(strict_poc):
    job = _export(strict_poc["base"], "carries_code")
    assert (job / "app" / "custom" / "fedharmony").is_dir()
    res, out = _submit(strict_poc, job)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FINISHED:FAILED_TO_RUN" in res.stdout
    for site in ("site-1", "site-2", "site-3"):
        assert f"deploy: {site}: NVFLARE_ERROR: BYOC not permitted" in res.stdout  # NVFlare's own words
    job_id = next(line.split()[-1] for line in res.stdout.splitlines() if line.startswith("submitted "))
    kits = strict_poc["root"] / "poc" / "example_project" / "prod_00"
    assert not any((kits / site / job_id / "log.txt").exists() for site in ("site-1", "site-2", "site-3"))


def test_a_job_without_code_runs_from_the_installed_package_with_a_privacy_filter(strict_poc):
    gamma = 2e-4  # below the size of one optimizer step, so unfiltered updates would break the bound
    job = _export(strict_poc["base"], "no_code", "--no-custom-code", "--privacy-percentile", "90",
                  "--privacy-gamma", str(gamma))
    assert not (job / "app" / "custom").exists()
    res, out = _submit(strict_poc, job)
    assert res.returncode == 0 and "FINISHED:COMPLETED" in res.stdout, res.stdout + res.stderr
    (result,) = [p for p in out.iterdir() if p.is_dir()]
    assert (result / "workspace" / "cross_site_val" / "cross_val_results.json").is_file()
    # PercentilePrivacy shares only the largest 10% of a site's update values, each clipped to
    # +-gamma per local step, so one round moves the global model by at most gamma * steps, and
    # most weights not at all (unfiltered, nearly every weight moves, most by more than that)
    import re

    job_id = result.name
    kits = strict_poc["root"] / "poc" / "example_project" / "prod_00"
    site_logs = [(kits / site / job_id / "log.txt").read_text() for site in ("site-1", "site-2", "site-3")]
    steps = max(int(x) for log in site_logs for x in re.findall(r"(\d+) local steps", log))
    from fedharmony.bundle.networks import build_network

    bundle = REPO / "bundles" / "prostate_mri_seg"
    initial = build_network(str(bundle), "configs/train.json", "network_def", TINY_OVERRIDES, 0).state_dict()
    final = torch.load(result / "workspace" / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    moved = [np.abs(final[k].double().numpy() - initial[k].double().numpy()).ravel()
             for k in initial if initial[k].is_floating_point() and "running_" not in k]
    moved = np.concatenate(moved)
    assert moved.max() <= gamma * steps + 1e-7
    assert (moved == 0).mean() > 0.6


def test_an_admin_without_the_submit_right_is_refused(strict_poc):
    job = _export(strict_poc["base"], "org_admin_job", "--no-custom-code")
    res, _ = _submit(strict_poc, job, "--as", "org-admin@nvidia.com")
    assert res.returncode == 2
    assert "user 'org-admin@nvidia.com' is not authorized for 'submit_job'" in res.stderr
    assert "org_admin_job" not in _jobs(strict_poc)  # nothing was queued


def _site_logs(poc, job_id):
    kits = poc["root"] / "poc" / "example_project" / "prod_00"
    return {site: (kits / site / job_id / "log.txt").read_text(errors="replace")
            for site in ("site-1", "site-2", "site-3") if (kits / site / job_id / "log.txt").is_file()}


def _marker_expression(marker):
    return f"$__import__('pathlib').Path({str(marker)!r}).write_text('a site ran job-supplied code') and 0.002"


def _with_override(key, value):
    def edit(job):
        config = job / "app" / "config" / "config_fed_client.json"
        client = json.loads(config.read_text())
        client["executors"][0]["executor"]["args"]["overrides"][key] = value
        config.write_text(json.dumps(client, indent=2))
    return edit


def _with_edited_bundle_copy(marker):
    def edit(job):  # the job now carries a copy of the bundle whose train.json holds an expression
        copy = job / "app" / "config" / "prostate_mri_seg"
        shutil.copytree(BUNDLE / "configs", copy / "configs")
        train = json.loads((copy / "configs" / "train.json").read_text())
        train["learning_rate"] = _marker_expression(marker)
        (copy / "configs" / "train.json").write_text(json.dumps(train, indent=2))
    return edit


def _with_job_data_root(data):
    def edit(job):
        config = job / "app" / "config" / "config_fed_client.json"
        client = json.loads(config.read_text())
        client["executors"][0]["executor"]["args"]["data_root"] = str(data)
        config.write_text(json.dumps(client, indent=2))
    return edit


CASES = {
    # a job altered on the way (or built by hand): what each site must refuse, and the reason it gives
    "expression_override": (lambda poc, marker: _with_override("learning_rate", _marker_expression(marker)),
                            "override 'learning_rate': the value starts with '$' (a MONAI expression)"),
    "edited_bundle_copy": (lambda poc, marker: _with_edited_bundle_copy(marker),
                           "the job carries its own copy of bundle 'prostate_mri_seg'"),
    "dataset_dir_override": (lambda poc, marker: _with_override("dataset_dir", str(poc["data"] / "UCL")),
                             "override 'dataset_dir': a path on the site's disk"),
    "job_data_root": (lambda poc, marker: _with_job_data_root(poc["data"]),
                      "the job sets data_root"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_no_code_job_altered_on_the_way_is_refused_by_every_site(strict_poc, case):
    edit, reason = CASES[case]
    marker = strict_poc["base"] / f"marker_{case}"
    job = _export(strict_poc["base"], f"altered_{case}", "--no-custom-code")
    edit(strict_poc, marker)(job)
    res, out = _submit(strict_poc, job)
    assert res.returncode == 1 and "FINISHED:COMPLETED" not in res.stdout, res.stdout + res.stderr
    job_id = next(line.split()[-1] for line in res.stdout.splitlines() if line.startswith("submitted "))
    logs = _site_logs(strict_poc, job_id)
    assert sorted(logs) == ["site-1", "site-2", "site-3"]
    server_refused_at_start = f"job refused by the server's policy: {reason}" in res.stdout
    refused_by = {site for site, log in logs.items()
                  if f"{site}: job refused by this site's policy: " in log and reason in log}
    assert refused_by or server_refused_at_start, res.stdout[-3000:]  # someone checked the job and refused it
    for site, log in logs.items():
        # The server applies the same policy when the run starts. Where it refuses first (a bundle copy in the job),
        # it aborts the run at once; where the other sites refuse first, the server aborts the job after their
        # errors. Either way a site still starting (importing torch and MONAI on a loaded machine) can be stopped
        # before its own check: then it must have run nothing of the job (no bundle built, no task run). The site's
        # own check of a bundle copy is tests/test_job_policy.py::test_a_job_copy_of_the_bundle_must_equal_the_installed_one.
        stopped_before_its_check = ("Received command to abort job" in log or server_refused_at_start) \
            and "bundle ready" not in log and "job refused" not in log
        assert site in refused_by or stopped_before_its_check, (site, log[-3000:])
        assert "local steps" not in log  # nothing trained
    assert not marker.exists()  # nothing the job carried was evaluated, anywhere
    assert reason in res.stdout  # the admin sees why, from the server's log
    assert str(strict_poc["data"]) not in res.stdout  # and no site path leaves the site
