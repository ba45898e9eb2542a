"""The wall-time table of stored studies (fedharmony.study.times, tools/study_times.py): read, never rerun."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from fedharmony.study.times import study_time, times_table


def _write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))


def _plan(arms, seeds=None, **extra):
    """A plan the study tool accepts (fedharmony.study.plan.load_plan): the first arm against the second."""
    plan = {"plan": "fedharmony-study-plan/1", "name": "t", "question": "q", "task": "prostate", "arms": arms,
            "comparisons": [{"arm": arms[1], "baseline": arms[0], "test": "superiority", "endpoints": ["mean"]}],
            "power": {"effect": 0.02, "sd": 0.015, "power": 0.8}, **extra}
    return plan if seeds is None else {**plan, "seeds": seeds}


def test_a_finished_study_sums_its_runs_wall_times(tmp_path):
    runs = [{"method": "fedavg", "seed": s, "wall_s": 600.0} for s in range(3)] + [{"method": "pooled", "seed": 0}]
    _write(tmp_path / "done" / "results.json", {"runs": runs, "pending": [], "machine": "2 cores"})
    row = study_time(tmp_path / "done")
    assert row == {"study": "done", "kind": "runs", "done": 4, "planned": 4, "timed": 3, "run_hours": 0.5,
                   "finished": True, "machine": "2 cores"}
    assert "| done | runs | 4 of 4 | 0.5 (3 timed) | 10.0 | finished |" in times_table([row])


def test_a_running_planned_study_counts_its_stored_runs_against_the_plan(tmp_path):
    folder = tmp_path / "headroom"
    _write(folder / "plan.json", _plan(["fedavg", "fedavg_iid"], 5))
    _write(folder / "runs" / "fedavg" / "seed0" / "result.json", {"method": "fedavg", "wall_s": 540.0})
    _write(folder / "runs" / "fedavg_iid" / "seed0" / "result.json", {"method": "fedavg_iid", "wall_s": 660.0})
    (folder / "runs" / "fedavg" / "seed1").mkdir(parents=True)  # a run under way: no result yet
    row = study_time(folder)
    assert (row["kind"], row["done"], row["planned"], row["finished"]) == ("runs", 2, 10, False)
    assert row["run_hours"] == pytest.approx(1200 / 3600)
    assert "| headroom | runs | 2 of 10 | 0.3 | 10.0 | running |" in times_table([row])


def test_outside_studies_with_and_without_recorded_times_and_a_plan_not_yet_run(tmp_path):
    _write(tmp_path / "old" / "results.json", {"targets": {"BIDMC": {"0": {"mean": {}}, "1": {"mean": {}}}}})
    old = study_time(tmp_path / "old")
    assert (old["kind"], old["done"], old["run_hours"]) == ("outside", 2, None)
    # an unseen-scanner plan names its profile file from the repository root, as the study tool reads it
    folder = tmp_path / "routing"
    _write(folder / "plan.json", json.loads((REPO / "docs/studies/routing_default/plan.json").read_text()))
    _write(folder / "runs" / "A" / "seed100" / "result.json", {"target": "A", "wall_s": 360.0})
    running = study_time(folder)
    assert (running["kind"], running["done"], running["planned"]) == ("outside", 1, 6 * 9)  # 6 scanners x 9 seeds
    # an outside study writes results.json after every target: one target of 54 is not a finished study
    _write(folder / "results.json", {"targets": {"A": {"100": {"mean": {}, "wall_s": 360.0}}}})
    assert (study_time(folder)["done"], study_time(folder)["finished"]) == (1, False)
    (folder / "results.json").unlink()
    _write(tmp_path / "queued" / "plan.json", _plan(["fedavg", "fedbn"], 2))
    queued = study_time(tmp_path / "queued")
    table = times_table([old, running, queued])
    assert "| old | outside | 2 of 2 | not recorded | not recorded | finished |" in table
    assert "| routing | outside | 1 of 54 | 0.1 | 6.0 | running |" in table
    assert "| queued | runs | 0 of 4 | - | - | planned |" in table
    (tmp_path / "empty").mkdir()
    assert study_time(tmp_path / "empty") is None


def test_the_tool_lists_every_study_folder_and_names_a_folder_without_one(tmp_path):
    tool = [sys.executable, str(REPO / "tools" / "study_times.py")]
    _write(tmp_path / "studies" / "a" / "results.json", {"runs": [{"wall_s": 60.0}], "pending": []})
    (tmp_path / "studies" / "notes").mkdir()
    res = subprocess.run(tool + [str(tmp_path / "studies")], capture_output=True, text=True)
    assert res.returncode == 0 and "| a | runs | 1 of 1 | 0.0 | 1.0 | finished |" in res.stdout
    assert "notes" not in res.stdout
    _write(tmp_path / "studies" / "b" / "runs" / "fedavg" / "seed0" / "result.json", {"wall_s": 120.0})
    (tmp_path / "studies" / "b" / "runs" / "fedavg" / "seed1").mkdir(parents=True)
    (tmp_path / "studies" / "b" / "runs" / "fedavg" / "seed1" / "result.json").write_text("{truncated")
    res = subprocess.run(tool + [str(tmp_path / "studies")], capture_output=True, text=True)
    assert res.returncode == 0 and "| b | runs | 1 | 0.0 | 2.0 | running |" in res.stdout  # the good run counts
    assert "seed1/result.json: not read (JSONDecodeError" in res.stderr  # the corrupt one is named
    res = subprocess.run(tool + [str(tmp_path / "studies" / "notes")], capture_output=True, text=True)
    assert res.returncode == 2 and "holds no study results" in res.stderr
    res = subprocess.run(tool + [str(tmp_path / "missing")], capture_output=True, text=True)
    assert res.returncode == 2 and "missing: no such folder" in res.stderr


def test_planned_runs_are_counted_as_the_study_tool_reads_the_plan(tmp_path):
    from fedharmony.study.plan import load_plan
    from fedharmony.study.stats import seeds_for_power

    # no "seeds": the power calculation's number, as tools/study.py --plan runs it
    _write(tmp_path / "powered" / "plan.json", _plan(["fedavg", "fedbn", "fedprox"]))
    needed = seeds_for_power(0.02, 0.015, 0.8, 0.05)
    assert load_plan(tmp_path / "powered" / "plan.json").seeds == needed
    assert study_time(tmp_path / "powered")["planned"] == 3 * needed
    # a leave-one-site-out plan without "holdout" holds out each of the six prostate sites
    loso = json.loads((REPO / "docs/studies/iopfl_v2_loso/plan.json").read_text())
    del loso["outside"]["holdout"]
    _write(tmp_path / "loso" / "plan.json", loso)
    assert study_time(tmp_path / "loso")["planned"] == 6 * 9
    # a plan the study tool refuses: named, its planned count unknown, the stored runs still counted
    warnings = []
    _write(tmp_path / "broken" / "plan.json", {**_plan(["fedavg", "no_such_method"], 3)})
    _write(tmp_path / "broken" / "runs" / "fedavg" / "seed0" / "result.json", {"wall_s": 60.0})
    row = study_time(tmp_path / "broken", warnings.append)
    assert (row["done"], row["planned"]) == (1, None)
    assert len(warnings) == 1 and "broken/plan.json: planned runs not known" in warnings[0]
    assert "no_such_method" in warnings[0]
