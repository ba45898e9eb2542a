"""Site policies on a real POC federation whose 3 sites forbid custom code: jobs that carry code are
refused, jobs without code run from the installed package (with a privacy filter), and an admin
without the right to submit is refused."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import POC_TOOL, REPO, TINY_OVERRIDES, export_job, poc_federation

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
    from fedharmony.bundle_site import build_network

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
