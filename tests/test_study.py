"""The study tool: refusals before anything runs, the cache, the report from a results.json, and the
smoke study end to end through the real NVFlare simulator (reproducible per seed)."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO
from fedharmony.study.report import (load_results, paired_difference, sites_beyond_zero, summarize, verdict,
                                     write_report)
from fedharmony.study.runner import validate_result
from fedharmony.study.tasks import check_methods

STUDY = [sys.executable, str(REPO / "tools" / "study.py")]


@pytest.mark.parametrize("argv, message", [
    (["--task", "prostate", "--methods", "fedavg", "fedsgd", "--out", "OUT"], "unknown method(s) ['fedsgd']"),
    (["--task", "kidney", "--methods", "fedavg", "--out", "OUT"], "invalid choice: 'kidney'"),
    (["--task", "prostate", "--methods", "fedavg", "--preset", "huge", "--out", "OUT"], "invalid choice: 'huge'"),
    (["--task", "prostate", "--methods", "fedavg", "fedavg", "--out", "OUT"], "listed twice"),
    (["--task", "prostate", "--methods", "fedavg", "--seeds", "0", "--out", "OUT"], "seeds must be >= 1"),
    (["--task", "prostate", "--methods", "fedavg", "--data-root", "MISSING", "--out", "OUT"], "has no sites.json"),
    (["--task", "prostate", "--methods", "fedavg"], "--out are required"),
    (["--report-only", "MISSING"], "no results.json"),
])
def test_bad_requests_are_refused_before_anything_runs(tmp_path, argv, message, capsys, monkeypatch):
    import study as study_tool  # tools/study.py, in this process (tools/ is on sys.path): argparse's exit 2

    monkeypatch.chdir(tmp_path)
    argv = [a.replace("OUT", str(tmp_path / "out")).replace("MISSING", str(tmp_path / "missing")) for a in argv]
    with pytest.raises(SystemExit) as stop:
        study_tool.main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err, err[-1500:]
    assert not (tmp_path / "out").exists()


def test_a_task_refuses_a_method_it_does_not_support(monkeypatch):
    from fedharmony.study import tasks

    monkeypatch.setitem(tasks.TASKS, "histology", tasks.TaskSpec("histology", "histology.py", "image_classification",
                                                                 "val_macro_f1", "macro-F1", ("fedavg", "local")))
    with pytest.raises(ValueError, match="task 'histology' does not support \\['prrfl'\\]"):
        check_methods("histology", ["fedavg", "prrfl"])


def test_an_arm_is_a_method_with_its_own_bundle_settings_run_and_cached_apart(tmp_path):
    from fedharmony.study.runner import Study
    from fedharmony.study.tasks import parse_arm

    assert parse_arm("fedavg+pixdim=1.5+intensity=released") == ("fedavg", {"pixdim": 1.5, "intensity": "released"})
    assert parse_arm("fedbn") == ("fedbn", {})
    with pytest.raises(ValueError, match="'pixdim' is not key=value"):
        parse_arm("fedavg+pixdim")
    with pytest.raises(ValueError, match="unknown method.*fedavgg\\+pixdim=1"):
        check_methods("prostate", ["fedavgg+pixdim=1"])
    study = Study("prostate", ["fedavg", "fedavg+pixdim=1.5", "harmofl+pixdim=1.5"], 2, "smoke", tmp_path)
    assert study.overrides(0, "fedavg+pixdim=1.5")["pixdim"] == 1.5 and "pixdim" not in study.overrides(0, "fedavg")
    assert study.config_files("harmofl+pixdim=1.5") == study.config_files("harmofl") != study.config_files("fedavg")
    assert study.settings_key("fedavg", 0) != study.settings_key("fedavg+pixdim=1.5", 0)
    assert study.run_dir("fedavg+pixdim=1.5", 1).parts[-2:] == ("fedavg+pixdim=1.5", "seed1")


def test_a_protocol_arm_becomes_the_protocols_bundle_settings_sized_on_the_seeds_data(tmp_path):
    from fedharmony.data.datalist import smallest_split
    from fedharmony.methods.protocols import released_bundle_overrides
    from fedharmony.study.runner import Study

    study = Study("prostate", ["harmofl+protocol=released", "prrfl+protocol=released"], 1, "smoke", tmp_path)
    data = study.data(0)
    smallest = smallest_split(data.train_root, num_sites=len(data.sites))[0]
    overrides = study.overrides(0, "harmofl+protocol=released")
    assert "protocol" not in overrides  # a job flag, not a bundle id
    assert overrides == {**study.overrides(0, "harmofl"),
                         **released_bundle_overrides("harmofl", max_train_cases=smallest)}
    assert study.overrides(0, "prrfl+protocol=released") == {**study.overrides(0, "prrfl"),
                                                             **released_bundle_overrides("prrfl", max_train_cases=None)}
    assert study.overrides(0, "prrfl+protocol=released")["optimizer_name"] == "sgd"
    with pytest.raises(ValueError, match="arm 'fedbn\\+protocol=released': fedbn has no released protocol"):
        check_methods("prostate", ["fedbn+protocol=released"])
    with pytest.raises(ValueError, match="protocol 'released' sets intensity='released' \\(given 'zscore'\\)"):
        study.overrides(0, "harmofl+protocol=released+intensity=zscore")


def test_a_cached_run_is_used_only_when_complete_and_made_with_the_same_settings():
    good = {"settings_key": "k", "site_scores": {"A": 0.7, "B": 0.6}}
    assert validate_result(good, "k", ["A", "B"]) is None
    assert validate_result(good, "other", ["A", "B"]) == "made with other settings"
    assert "expected ['A', 'B', 'C']" in validate_result(good, "k", ["A", "B", "C"])
    assert "no finite score for ['B']" in validate_result({**good, "site_scores": {"A": 0.7, "B": math.nan}}, "k",
                                                          ["A", "B"])
    assert validate_result([1, 2], "k", ["A"]) == "not a JSON object"


def _results(diffs_by_seed, sites=("A", "B", "C")):
    """A results.json with fedavg at 0.70 + 0.01 * site index and a method 'x' at fedavg + diff(seed, site)."""
    runs = []
    for seed, diffs in enumerate(diffs_by_seed):
        base = {s: 0.70 + 0.01 * i + 0.002 * seed for i, s in enumerate(sites)}
        runs.append({"method": "fedavg", "seed": seed, "site_scores": base})
        runs.append({"method": "x", "seed": seed, "site_scores": {s: base[s] + d for s, d in zip(sites, diffs)}})
    return {"task": "prostate", "metric": "val_mean_dice", "metric_label": "Dice", "methods": ["fedavg", "x"],
            "seeds": list(range(len(diffs_by_seed))), "runs": runs}


def test_paired_differences_by_hand():
    # per seed the mean-over-sites difference is 0.05, 0.04, 0.06, 0.05, 0.05: mean 0.05, t CI excludes zero
    results = _results([(0.05, 0.05, 0.05), (0.04, 0.04, 0.04), (0.06, 0.06, 0.06), (0.05, 0.05, 0.05),
                        (0.05, 0.05, 0.05)])
    d = paired_difference(results, "x")
    assert d["mean"]["per_seed"] == pytest.approx([0.05, 0.04, 0.06, 0.05, 0.05])
    assert d["mean"]["diff"] == pytest.approx(0.05)
    half = 2.7764451051977987 * math.sqrt(0.0002 / 4) / math.sqrt(5)  # sd of the five per-seed values
    assert d["mean"]["t_ci"] == pytest.approx((0.05 - half, 0.05 + half))
    assert d["mean"]["verdict"] == d["worst"]["verdict"] == "better"
    assert d["n_pairs"] == 15 and d["wilcoxon_p"] < 0.001
    # differences that change sign: no difference shown
    mixed = paired_difference(_results([(0.05, 0.0, 0.0), (-0.05, 0.0, 0.0), (0.04, 0.0, 0.0),
                                        (-0.04, 0.0, 0.0), (0.01, 0.0, 0.0)]), "x")
    assert mixed["mean"]["verdict"] == "no difference shown"
    assert verdict([(-0.02, -0.01), (-0.03, -0.001)]) == "worse"
    assert verdict([(0.01, 0.02), (-0.01, 0.02)]) == "no difference shown"


def test_per_site_differences_count_a_site_only_where_its_ci_excludes_zero(tmp_path):
    # site A: +0.05, +0.04, +0.06 (above); B: changes sign (neither); C: -0.03, -0.02, -0.04 (below)
    results = _results([(0.05, 0.02, -0.03), (0.04, -0.02, -0.02), (0.06, 0.01, -0.04)])
    d = paired_difference(results, "x")
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, 2 df) x sd 0.01 / sqrt(3 seeds)
    assert d["per_site_t_ci"]["A"] == pytest.approx((0.05 - half, 0.05 + half))
    assert d["per_site_t_ci"]["C"] == pytest.approx((-0.03 - half, -0.03 + half))
    assert sites_beyond_zero(d) == (["C"], ["A"])
    write_report(tmp_path, results)
    report = (tmp_path / "report.md").read_text()
    section = report.split("## Paired differences per site")[1]
    assert f"| x - fedavg | +0.050 [{0.05 - half:+.3f}, {0.05 + half:+.3f}] |" in section
    assert section.split("\n| x - fedavg |")[1].split("\n")[0].endswith("| 1 / 1 of 3 |")
    write_report(tmp_path, _results([(0.05, 0.02, -0.03)]))  # one seed: no CI, nothing counted
    one_seed = (tmp_path / "report.md").read_text().split("## Paired differences per site")[1]
    assert "| x - fedavg | +0.050 | +0.020 | -0.030 | - |" in one_seed


def test_summary_by_hand():
    results = _results([(0.0, 0.0, -0.3), (0.0, 0.0, -0.3)])
    s = summarize(results)
    assert s["x"]["worst_site"] == "C"  # its mean is the lowest
    assert s["fedavg"]["mean"][0] == pytest.approx((0.71 + 0.712) / 2)
    assert s["x"]["worst"][0] == pytest.approx((0.72 - 0.3 + 0.722 - 0.3) / 2)


def test_report_only_rebuilds_the_report_from_results_json(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps(_results([(0.05, 0.05, 0.05), (0.04, 0.04, 0.04),
                                                                (0.06, 0.06, 0.06)])))
    res = subprocess.run(STUDY + ["--report-only", str(tmp_path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = (tmp_path / "report.md").read_text()
    assert "| x - fedavg | +0.050 |" in report and "better" in report
    assert (tmp_path / "forest.png").stat().st_size > 0 and (tmp_path / "results.csv").is_file()
    first = report
    write_report(tmp_path, load_results(tmp_path))
    assert (tmp_path / "report.md").read_text() == first  # a pure function of results.json
    (tmp_path / "results.json").write_text('{"task": "prostate"}')
    with pytest.raises(ValueError, match="has no 'metric'"):
        load_results(tmp_path)


@pytest.mark.parametrize("bad, message", [
    ({"site_scores": {"A": "0.5"}}, r"runs\[0\] \(fedavg, seed 0\) site_scores\['A'\] is not a number: '0.5'"),
    ({"retrogress_curves": {"": {"A": {"0": "high"}}}},
     r"runs\[0\] \(fedavg, seed 0\) retrogress_curves\[''\]\['A'\]\['0'\] is not a number: 'high'"),
    ({"retrogress_curves": [0.5]}, r"retrogress_curves must map a curve to its sites, got list"),
])
def test_a_malformed_score_in_results_json_is_named_with_its_run(tmp_path, bad, message):
    run = {"method": "fedavg", "seed": 0, "site_scores": {"A": 0.5}, **bad}
    (tmp_path / "results.json").write_text(json.dumps({"task": "prostate", "metric": "dice", "runs": [run]}))
    with pytest.raises(ValueError, match=message):
        load_results(tmp_path)


def test_collect_only_reports_the_cached_runs_and_names_the_pending_ones(tmp_path):
    from fedharmony.study.runner import Study

    study = Study("prostate", ["fedavg", "local"], 2, "smoke", tmp_path, echo=lambda line: None)
    marker = tmp_path / "data" / "seed0" / "study_data.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"data": {"sites": {"site-1": "BIDMC", "site-2": "HK"}}}))
    for method, scores in (("fedavg", {"BIDMC": 0.5, "HK": 0.6}), ("local", {"BIDMC": 0.4, "HK": 0.7})):
        path = study.run_dir(method, 0) / "result.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps({"method": method, "seed": 0, "site_scores": scores,
                                    "settings_key": study.settings_key(method, 0)}))
    results = study.collect()
    assert [(r["method"], r["seed"]) for r in results["runs"]] == [("fedavg", 0), ("local", 0)]
    assert results["pending"] == [{"method": "fedavg", "seed": 1}, {"method": "local", "seed": 1}]
    assert not (tmp_path / "data" / "seed1").exists()  # collecting draws no data
    report = write_report(tmp_path, load_results(tmp_path)).read_text()
    assert "Incomplete study: 2 of 4 runs done" in report and "fedavg seed 1" in report


@pytest.mark.integration
def test_smoke_study_through_the_simulator_is_cached_resumable_and_reproducible(tmp_path):
    out = tmp_path / "study"
    # fedavg and pooled: a federation and a centralized reference (local runs the same centralized code per site)
    argv = ["--task", "prostate", "--methods", "fedavg", "pooled", "--seeds", "2", "--preset", "smoke",
            "--retrogress", "--out", str(out)]
    res = subprocess.run(STUDY + argv, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[4/4] pooled seed 1: done" in res.stdout and "left" in res.stdout  # progress with a time estimate
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "prostate" and results["metric"] == "val_mean_dice"
    assert {(r["method"], r["seed"]) for r in results["runs"]} == {(m, s) for m in ("fedavg", "pooled")
                                                                   for s in (0, 1)}
    for run in results["runs"]:
        assert sorted(run["site_scores"]) == ["BIDMC", "HK"]
        assert all(0.0 <= v <= 1.0 for v in run["site_scores"].values())
        assert all(d["n"] == 4 for d in run["site_results"].values())  # the separate test draw, 4 per site
        assert run["curve"] and all(len(c) == 2 for c in run["curve"].values())  # 2 rounds
    fedavg = {r["seed"]: r["site_scores"] for r in results["runs"] if r["method"] == "fedavg"}
    assert fedavg[0] != fedavg[1]  # the seed changes the data and the training
    for run in results["runs"]:  # --retrogress: each site's model at round start and after training, by round
        if run["method"] == "fedavg":
            assert sorted(run["retrogress_curves"]) == ["", "_after_training"]  # FedAvg exchanges what it uses
            assert all(sorted(c) == ["0", "1"] for v in run["retrogress_curves"].values() for c in v.values())
        else:
            assert "retrogress_curves" not in run  # pooled: no communication
    report = (out / "report.md").read_text()
    assert "| pooled - fedavg |" in report and (out / "curves.png").stat().st_size > 0
    from fedharmony.study.provenance import code_digest
    assert all(run["made_on"]["code"] == code_digest() for run in results["runs"])  # what each run was made on
    assert "Every run: code " + code_digest() in report
    assert "| fedavg | 2 |" in report and (out / "retrogress.png").stat().st_size > 0
    log = (out / "runs" / "fedavg" / "seed0" / "log.txt").read_text()
    assert "Round 1 started" in log or "round 1" in log  # NVFlare's output went to the run's log

    # rerun: everything cached; a corrupt entry is named, run again, and gives the same scores; the resumed
    # study's first fresh run is given a time estimate from the cached runs' times
    # (the runs go seed by seed: fedavg 0, pooled 0, fedavg 1, pooled 1)
    (out / "runs" / "fedavg" / "seed1" / "result.json").write_text("{truncated")
    res = subprocess.run(STUDY + argv, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count(": cached") == 3 and "made on other code" not in res.stdout
    assert f"cache entry {out / 'runs' / 'fedavg' / 'seed1' / 'result.json'} is corrupt" in res.stdout
    assert "[3/4] fedavg seed 1: running, about " in res.stdout
    again = json.loads((out / "results.json").read_text())
    rerun = next(r for r in again["runs"] if r["method"] == "fedavg" and r["seed"] == 1)
    assert rerun["site_scores"] == fedavg[1]  # same (method, seed, preset) on the same machine: same scores


def test_a_seed_draws_training_data_and_a_separate_test_draw(tmp_path):
    from fedharmony.study.data import make_phantom_data, pooled_dataset, real_data

    tiny = {"cases": 3, "size": 32, "slices": 6}
    data = make_phantom_data("prostate", tmp_path / "s0", 0, 2, tiny, test_cases=5)
    assert data.sites == {"site-1": "BIDMC", "site-2": "HK"}
    for folder in data.sites.values():
        train = json.loads((data.train_root / folder / "datalist.json").read_text())
        test = json.loads((data.test_root / folder / "datalist.json").read_text())
        assert sum(len(train[s]) for s in ("training", "validation", "testing")) == 3
        assert len(test["testing"]) == 5 and not test.get("training")  # every test-draw case is a test case
        a = (data.train_root / folder / "Case00.nii.gz").read_bytes()
        assert a != (data.test_root / folder / "Case00.nii.gz").read_bytes()  # a different draw
    stamp = (data.test_root / "BIDMC" / "Case00.nii.gz").stat().st_mtime_ns
    assert make_phantom_data("prostate", tmp_path / "s0", 0, 2, tiny, test_cases=5) == data
    assert (data.test_root / "BIDMC" / "Case00.nii.gz").stat().st_mtime_ns == stamp  # reused, not drawn again
    other = make_phantom_data("prostate", tmp_path / "s1", 1, 2, tiny, test_cases=5)
    assert (other.train_root / "HK" / "Case00.nii.gz").read_bytes() != (data.train_root / "HK" / "Case00.nii.gz").read_bytes()

    pooled = json.loads((pooled_dataset(data, tmp_path / "pooled") / "datalist.json").read_text())
    assert len(pooled["training"]) == 2 * len(json.loads((data.train_root / "HK" / "datalist.json").read_text())["training"])
    assert {item["site"] for item in pooled["training"]} == {"BIDMC", "HK"}
    assert all(item["image"].startswith("/") for item in pooled["training"] + pooled["testing"])
    assert len(pooled["testing"]) == 10

    real = real_data(data.train_root)  # prepared data: its own splits, train and test from the same folders
    assert real.train_root == real.test_root == data.train_root.resolve() and real.sites == data.sites


def test_a_run_that_stops_writing_is_stopped_with_its_children_and_a_failing_one_names_its_status(tmp_path):
    """The watchdog behind every study run: a job whose log stops growing (a simulator waiting forever for a
    dead site) is killed as a process group; a job that fails reports its exit status."""
    import os
    import time

    from fedharmony.study.runner import RunStalled, run_watched

    pid_file = tmp_path / "child.pid"
    stuck = [sys.executable, "-c", "import subprocess, sys, time; "
             f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
             f"open({str(pid_file)!r}, 'w').write(str(c.pid)); print('started', flush=True); time.sleep(120)"]
    t0 = time.time()
    with open(tmp_path / "log.txt", "w") as log, pytest.raises(RunStalled, match="no output for 1 s: stopped"):
        run_watched(stuck, log, dict(os.environ), stall_s=1, poll_s=0.2)
    assert time.time() - t0 < 60
    assert "started" in (tmp_path / "log.txt").read_text()
    child = int(pid_file.read_text())
    for _ in range(50):  # the grandchild went with the group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the job's child process {child} survived")
    with open(tmp_path / "log2.txt", "w") as log, pytest.raises(RuntimeError, match="exit status 3"):
        run_watched([sys.executable, "-c", "import sys; sys.exit(3)"], log, dict(os.environ), stall_s=30, poll_s=0.1)


def test_a_stalled_run_is_run_once_more_and_a_failed_one_is_not():
    """The retry rule shared by the study runs and the outside studies' federations."""
    from fedharmony.study.runner import RunStalled, once_more_if_stalled

    def flaky(outcomes):
        calls = []

        def attempt():
            calls.append(1)
            outcome = outcomes[len(calls) - 1]
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        return attempt, calls

    told = []
    attempt, calls = flaky([RunStalled("no output for 900 s: stopped"), "result"])
    assert once_more_if_stalled(attempt, told.append) == "result" and len(calls) == 2
    assert told == ["no output for 900 s: stopped; running it once more"]
    attempt, calls = flaky([RunStalled("first"), RunStalled("second"), "never"])
    with pytest.raises(RunStalled, match="second"):
        once_more_if_stalled(attempt, told.append)
    assert len(calls) == 2
    attempt, calls = flaky([RuntimeError("exit status 3"), "never"])
    with pytest.raises(RuntimeError, match="exit status 3"):
        once_more_if_stalled(attempt, told.append)
    assert len(calls) == 1


def test_a_study_without_fedavg_compares_its_arms_with_the_first_listed(tmp_path):
    import json as json_mod

    results = _results([[0.05, 0.06, 0.07], [0.04, 0.05, 0.06], [0.05, 0.05, 0.05]])
    for run in results["runs"]:
        run["method"] = {"fedavg": "fedavg+norm=batch_stats_only", "x": "harmofl+protocol=released"}[run["method"]]
    results["methods"] = ["fedavg+norm=batch_stats_only", "harmofl+protocol=released"]
    (tmp_path / "results.json").write_text(json_mod.dumps(results))
    text = write_report(tmp_path).read_text()
    assert "| harmofl+protocol=released - fedavg+norm=batch_stats_only | +0.053 |" in text


def test_harmofl_arms_are_compared_with_each_classical_harmonization_arm(tmp_path):
    offsets = {"fedavg": 0.0, "harmofl": 0.01, "fedavg+bias_correction=true": 0.03,
               "fedavg+histogram_scale=federated": -0.02, "fedavg+bias_correction=false": 0.0}
    runs = [{"method": m, "seed": seed, "site_scores": {s: 0.6 + off + 0.01 * i + 0.003 * seed
                                                         for i, s in enumerate(("A", "B"))}}
            for seed in range(3) for m, off in offsets.items()]
    results = {"task": "prostate", "metric": "val_mean_dice", "metric_label": "Dice", "methods": list(offsets),
               "seeds": [0, 1, 2], "runs": runs}
    text = write_report(tmp_path, results).read_text().split("## Paired differences per site")[0]
    assert "| harmofl - fedavg+bias_correction=true | -0.020 |" in text
    assert "| harmofl - fedavg+histogram_scale=federated | +0.030 |" in text
    assert "harmofl - fedavg+bias_correction=false" not in text  # that arm turns N4 off: not a baseline of it


def test_prrfl_arms_are_compared_with_fedbn_and_an_arm_with_its_plain_method(tmp_path):
    import json as json_mod

    offsets = {"fedavg": 0.0, "fedbn": 0.05, "prrfl": 0.02, "prrfl+protocol=released": 0.04}
    runs = [{"method": m, "seed": seed, "site_scores": {s: 0.6 + off + 0.01 * i + 0.003 * seed
                                                         for i, s in enumerate(("A", "B"))}}
            for seed in range(3) for m, off in offsets.items()]
    (tmp_path / "results.json").write_text(json_mod.dumps(
        {"task": "dermoscopy", "metric": "val_macro_f1", "metric_label": "macro-F1", "methods": list(offsets),
         "seeds": [0, 1, 2], "runs": runs}))
    text = write_report(tmp_path).read_text().split("## Paired differences per site")[0]  # the first table
    rows = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines()
            if " - " in line.split(" | ")[0] and not line.startswith("| method - baseline")]
    assert sorted(rows) == sorted(["fedbn - fedavg", "prrfl - fedavg", "prrfl+protocol=released - fedavg",
                                   "prrfl - fedbn", "prrfl+protocol=released - fedbn",
                                   "prrfl+protocol=released - prrfl"])
    assert "| prrfl+protocol=released - prrfl | +0.020 |" in text and "| prrfl - fedbn | -0.030 |" in text


def test_retrogress_by_hand_and_a_retrogress_study_is_cached_apart(tmp_path):
    from fedharmony.study.report import communication_drops, retrogress_summary
    from fedharmony.study.runner import Study

    # FedAvg: each site gains 0.2 in local training and the answer takes 0.1 of it back (drop 0.1 every round);
    # PRR-FL: the personalized model keeps its score over the answer (drop 0), its deputy loses 0.15
    def curves(drop, exchanged_drop=None, seed=0):
        start = {t: 0.5 + 0.1 * t + 0.01 * seed for t in range(4)}
        after = {t: v + 0.1 + drop for t, v in start.items()}
        out = {"": start, "_after_training": after}
        if exchanged_drop is not None:
            out["_exchanged"] = {t: v - 0.2 for t, v in start.items()}
            out["_exchanged_after_training"] = {t: v - 0.2 + 0.1 + exchanged_drop for t, v in start.items()}
        return {kind: {site: {str(t): v + 0.02 * i for t, v in c.items()} for i, site in enumerate("AB")}
                for kind, c in out.items()}

    assert communication_drops({0: 0.5, 1: 0.6, 2: 0.8}, {0: 0.7, 1: 0.75}) == pytest.approx([0.1, -0.05])
    runs = [{"method": m, "seed": seed, "site_scores": {"A": 0.7, "B": 0.7},
             "retrogress_curves": curves(0.1) if m == "fedavg" else curves(0.0, 0.15, seed)}
            for seed in range(3) for m in ("fedavg", "prrfl")]
    results = {"task": "dermoscopy", "metric": "val_macro_f1", "metric_label": "macro-F1",
               "methods": ["fedavg", "prrfl"], "seeds": [0, 1, 2], "runs": runs}
    summary = retrogress_summary(results)
    assert summary["fedavg"]["mean_drop"][0] == pytest.approx(0.1) and summary["fedavg"]["exchanged_mean_drop"] is None
    assert summary["prrfl"]["mean_drop"][0] == pytest.approx(0.0, abs=1e-12)
    assert summary["prrfl"]["exchanged_mean_drop"][0] == pytest.approx(0.15)
    assert summary["prrfl"]["largest_drop"] == pytest.approx(0.0, abs=1e-12) and summary["prrfl"]["seeds"] == [0, 1, 2]
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    assert "## Retrogress" in text and "| fedavg | 3 | +0.100 [+0.100, +0.100] | +0.100 | - |" in text
    assert "| prrfl | 3 | +0.000 [+0.000, +0.000] | +0.000 | +0.150 [+0.150, +0.150] |" in text
    assert (tmp_path / "retrogress.png").stat().st_size > 0
    # without retrogress curves there is no such section, and a retrogress study never reuses a plain one's runs
    for run in runs:
        del run["retrogress_curves"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert "## Retrogress" not in write_report(tmp_path).read_text()
    plain = Study("dermoscopy", ["fedavg"], 1, "smoke", tmp_path / "s")
    retro = Study("dermoscopy", ["fedavg"], 1, "smoke", tmp_path / "s", retrogress=True)
    assert "retrogress" not in plain.settings() and retro.settings()["retrogress"] is True
    assert plain.settings_key("fedavg", 0) != retro.settings_key("fedavg", 0)


COMMITTED_STUDIES = sorted(p.parent.name for p in (REPO / "docs" / "studies").glob("*/results.json")
                           if (p.parent / "report.md").is_file() and "runs" in json.loads(p.read_text()))


@pytest.mark.parametrize("name", COMMITTED_STUDIES)
def test_every_committed_study_report_rebuilds_from_its_results(tmp_path, name):
    """A committed report is a function of its results.json and this code (nothing edited by hand, nothing stale)."""
    study = REPO / "docs" / "studies" / name
    (tmp_path / "results.json").write_bytes((study / "results.json").read_bytes())
    write_report(tmp_path, load_results(tmp_path))
    assert (tmp_path / "report.md").read_text() == (study / "report.md").read_text()
    assert (tmp_path / "results.csv").read_text() == (study / "results.csv").read_text()
