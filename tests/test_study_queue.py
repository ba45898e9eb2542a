"""The queue of planned studies (fedharmony.study.queue, tools/study_queue.py): each study in a clone at its own
commit, resuming from the runs this checkout holds, its finished runs collected back, nothing overwritten."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from fedharmony.study.queue import QueueError, QueuedStudy, collect, load_queue, prepare_clone, run_queue

TOOL = [sys.executable, str(REPO / "tools" / "study_queue.py")]
TOY_PLAN = {"plan": "fedharmony-study-plan/1", "name": "toy", "question": "q", "task": "prostate", "preset": "smoke",
            "arms": ["pooled", "pooled_steps"], "seeds": 2, "power": {"effect": 0.02, "sd": 0.03, "power": 0.8},
            "comparisons": [{"arm": "pooled", "baseline": "pooled_steps", "test": "superiority",
                             "endpoints": ["mean"]}]}


def _git(repo, *args):
    res = subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args],
                         capture_output=True, text=True, check=True)
    return res.stdout.strip()


def _repo_with_plan(tmp_path, clone_of=None):
    """A git repository (a clone of ``clone_of``, or a new one) with docs/studies/toy/plan.json committed."""
    repo = tmp_path / "repo"
    if clone_of:
        subprocess.run(["git", "clone", "-q", str(clone_of), str(repo)], check=True)
    else:
        repo.mkdir()
        _git(repo, "init", "-q")
    plan = repo / "docs" / "studies" / "toy" / "plan.json"
    plan.parent.mkdir(parents=True, exist_ok=True)
    plan.write_text(json.dumps(TOY_PLAN))
    _git(repo, "add", "docs/studies/toy/plan.json")
    _git(repo, "commit", "-q", "-m", "toy plan")
    return repo, _git(repo, "rev-parse", "HEAD")


def _queue(path, entries):
    path.write_text(json.dumps({"queue": "fedharmony-study-queue/1", "studies": entries}))
    return path


def _shallow(repo) -> bool:
    return subprocess.run(["git", "-C", str(repo), "rev-parse", "--is-shallow-repository"], capture_output=True,
                          text=True).stdout.strip() == "true"


def test_the_committed_queue_names_planned_studies_at_commits_holding_their_plans():
    if _shallow(REPO):
        pytest.skip("a shallow clone lacks the commits the queue names")
    studies = load_queue(REPO / "docs" / "studies" / "queue.json", REPO)
    names = [s.study for s in studies]
    assert len(names) == len(set(names)) and "prostate_v2_main" in names
    res = subprocess.run(TOOL + ["list"], capture_output=True, text=True)
    assert res.returncode == 0 and f"| prostate_main | {studies[names.index('prostate_main')].commit[:12]} |" in res.stdout


def test_a_queue_that_cannot_run_is_refused_by_name(tmp_path):
    repo, commit = _repo_with_plan(tmp_path)
    entry = {"study": "toy", "commit": commit, "why": "w"}
    assert load_queue(_queue(tmp_path / "q.json", [entry]), repo) == [QueuedStudy("toy", commit, "w")]
    with pytest.raises(QueueError, match=r"studies\[1\]: 'toy' is queued twice"):
        load_queue(_queue(tmp_path / "q.json", [entry, entry]), repo)
    with pytest.raises(QueueError, match=r"studies\[0\]: 'gone' has no plan"):
        load_queue(_queue(tmp_path / "q.json", [{**entry, "study": "gone"}]), repo)
    with pytest.raises(QueueError, match=r"commit 0{40} of 'toy' is not in"):
        load_queue(_queue(tmp_path / "q.json", [{**entry, "commit": "0" * 40}]), repo)
    with pytest.raises(QueueError, match=r"studies\[0\] needs exactly"):
        load_queue(_queue(tmp_path / "q.json", [{**entry, "when": "now"}]), repo)
    plan = repo / "docs" / "studies" / "toy" / "plan.json"
    plan.write_text(json.dumps({**TOY_PLAN, "seeds": 3}))  # changed after the commit the queue names
    with pytest.raises(QueueError, match=r"plan.json at commit .* differs from this checkout's"):
        load_queue(_queue(tmp_path / "q.json", [entry]), repo)
    res = subprocess.run(TOOL + ["list", "--queue", str(tmp_path / "q.json"), "--repo", str(repo)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "differs from this checkout's" in res.stderr
    res = subprocess.run(TOOL + ["run", "--queue", str(tmp_path / "q.json"), "--repo", str(repo)],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "run needs --workdir" in res.stderr


def test_a_clone_gets_the_runs_held_here_and_gives_back_new_ones_without_overwriting(tmp_path):
    repo, commit = _repo_with_plan(tmp_path)
    item = QueuedStudy("toy", commit, "w")
    here = item.folder(repo)
    (here / "runs" / "pooled" / "seed0").mkdir(parents=True)
    (here / "runs" / "pooled" / "seed0" / "result.json").write_text('{"wall_s": 1}')
    (here / "plan.lock.json").write_text('{"digest": "d"}')
    _git(repo, "commit", "-q", "--allow-empty", "-m", "later")  # the study runs on the commit, not on HEAD
    clone = prepare_clone(item, repo, tmp_path / "work", log=lambda line: None)
    assert _git(clone, "rev-parse", "HEAD") == commit
    there = item.folder(clone)
    assert (there / "runs" / "pooled" / "seed0" / "result.json").read_text() == '{"wall_s": 1}'
    assert (there / "plan.lock.json").is_file()
    (there / "runs" / "pooled" / "seed1").mkdir(parents=True)
    (there / "runs" / "pooled" / "seed1" / "result.json").write_text('{"wall_s": 2}')
    (there / "runs" / "pooled" / "seed0" / "result.json").write_text('{"wall_s": 99}')  # not what is here
    warnings = []
    got = collect(item, clone, repo, warnings.append)
    assert got == {"copied": [here / "runs" / "pooled" / "seed1" / "result.json"], "finished": False}
    assert (here / "runs" / "pooled" / "seed0" / "result.json").read_text() == '{"wall_s": 1}'  # kept
    assert len(warnings) == 1 and "seed0/result.json: differs from" in warnings[0]
    # a study whose clone cannot be made is named and not started; the queue does not stop
    (tmp_path / "work2").mkdir()
    (tmp_path / "work2" / "toy").write_text("a file where the clone would go")
    lines = []
    assert run_queue([item], repo, tmp_path / "work2", python=sys.executable, poll_s=0, log=lines.append) == {"toy": 1}
    assert any("toy: cannot clone" in line and "not started" in line for line in lines)


@pytest.mark.integration
def test_the_queue_runs_a_planned_study_at_its_commit_and_resumes_from_the_runs_held_here(tmp_path):
    """A real (smoke-sized) planned study, twice: the second time with one run missing here, so the study tool
    reuses the three runs copied into the new clone and runs only the fourth."""
    repo, commit = _repo_with_plan(tmp_path, clone_of=REPO)
    item = QueuedStudy("toy", commit, "w")
    lines = []
    status = run_queue([item], repo, tmp_path / "work", parallel=1, python=sys.executable, poll_s=1,
                       log=lines.append)
    assert status == {"toy": 0}, (tmp_path / "work" / "toy.log").read_text()[-3000:]
    here = item.folder(repo)
    runs = sorted(here.glob("runs/*/seed*/result.json"))
    assert len(runs) == 4 and (here / "results.json").is_file() and (here / "report.md").is_file()
    assert (here / "plan.lock.json").is_file() and any("toy: finished; " in line for line in lines)
    assert json.loads((here / "plan.lock.json").read_text())["commit"] == commit
    # again, from a fresh clone, without one run and without the finished outputs
    subprocess.run(["rm", "-rf", str(tmp_path / "work"), str(runs[-1]), str(here / "results.json")], check=True)
    assert run_queue([item], repo, tmp_path / "work", parallel=1, python=sys.executable, poll_s=1,
                     log=lines.append) == {"toy": 0}
    log = (tmp_path / "work" / "toy.log").read_text()
    assert log.count(": cached") == 3 and log.count(": done in") == 1
    assert runs[-1].is_file() and (here / "results.json").is_file()
    # finished here: the queue does not start it again
    assert run_queue([item], repo, tmp_path / "work", parallel=1, python=sys.executable, poll_s=1,
                     log=lines.append) == {}
    assert any("toy: finished here (4 runs); skipped" in line for line in lines)


def test_an_interpreter_that_would_run_another_checkouts_package_is_named(tmp_path):
    from fedharmony.study.queue import _package_location

    clone = tmp_path / "clone"  # holds no custom/fedharmony: the interpreter finds this checkout's package instead
    clone.mkdir()
    where = _package_location(sys.executable, {"PATH": "/usr/bin:/bin"}, clone)
    assert where is not None and str(REPO / "custom") in where
    assert _package_location(sys.executable, {"PYTHONPATH": str(REPO / "custom")}, REPO) is None
