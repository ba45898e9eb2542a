"""The ``fedharmony`` command: the method list, a job export through it, and its refusals."""

import subprocess
import sys

from fedharmony.methods import METHODS


def _run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "fedharmony", *args], capture_output=True, text=True, cwd=cwd)


def test_methods_lists_every_registered_method_with_its_settings():
    res = _run("methods")
    assert res.returncode == 0, res.stderr
    rows = [line.split("|")[1].strip() for line in res.stdout.splitlines()[2:]]
    assert rows == list(METHODS)
    ditto = next(line for line in res.stdout.splitlines() if line.startswith("| ditto |"))
    assert "the site's personalized model, best on its validation split" in ditto
    assert "`--ditto-lambda`: float, 0.1, > 0<br>`--ditto-epochs`: int, 1, >= 1" in ditto


def test_job_exports_the_same_folder_as_the_job_script(tmp_path):
    res = _run("job", "dermoscopy", "--algorithm", "scaffold", "--rounds", "1", "--export", "--export-dir",
               str(tmp_path / "jobs"), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    job = tmp_path / "jobs" / "dermoscopy_scaffold"
    assert (job / "app" / "config" / "image_classification" / "configs" / "train.json").is_file()
    assert '"method": "scaffold"' in (job / "app" / "config" / "config_fed_client.json").read_text()


def test_unknown_commands_and_a_job_without_a_task_are_refused():
    res = _run("trian")
    assert res.returncode == 2 and "unknown command 'trian'" in res.stderr and "study" in res.stderr
    res = _run("job", "--algorithm", "fedavg")
    assert res.returncode == 2 and "name a task first" in res.stderr
