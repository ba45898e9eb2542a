"""The plan protocol: statistics against scipy / statsmodels and by hand, plan files and their lock, verdicts,
the headroom controls' data and budget, and HarmoFL's window note."""

import json
import logging
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as sps

from conftest import REPO
from fedharmony.study.analysis import noninferiority_p, planned_verdicts, posthoc_rule
from fedharmony.study.plan import PlanError, load_plan, plan_commit
from fedharmony.study.report import paired_difference, write_report
from fedharmony.study.stats import (detectable_effect, holm, noninferiority, paired_t_power, paired_t_test,
                                    seeds_for_power)

STUDY = [sys.executable, str(REPO / "tools" / "study.py")]


# ---------------------------------------------------------------- statistics
@pytest.mark.parametrize("seed", range(5))
def test_paired_t_test_equals_scipy(seed):
    d = np.random.default_rng(seed).normal(0.01, 0.03, size=3 + seed)
    t, p = paired_t_test(d)
    ref = sps.ttest_1samp(d, 0.0)
    assert t == pytest.approx(ref.statistic) and p == pytest.approx(ref.pvalue)


def test_paired_t_test_edge_cases():
    assert all(math.isnan(v) for v in paired_t_test([0.1]))
    assert paired_t_test([0.0, 0.0, 0.0]) == (0.0, 1.0)
    assert paired_t_test([0.02, 0.02, 0.02])[1] == 0.0


def test_holm_by_hand_and_against_statsmodels():
    from statsmodels.stats.multitest import multipletests

    # by hand: sorted 0.01 (x3), 0.03 (x2 -> 0.06), 0.04 (x1, kept >= 0.06)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    for seed in range(5):
        p = np.random.default_rng(seed).uniform(0, 0.2, size=7)
        assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))
    with_nan = holm([0.01, math.nan, 0.04])  # NaN (a comparison with one seed) is not counted in the family
    assert math.isnan(with_nan[1]) and with_nan[0] == pytest.approx(0.02) and with_nan[2] == pytest.approx(0.04)


def test_noninferiority_against_scipy():
    d = np.array([-0.004, 0.002, -0.001, 0.003, -0.002])
    r = noninferiority(d, margin=0.01, level=0.95)
    sem = d.std(ddof=1) / math.sqrt(d.size)
    assert r.lower == pytest.approx(d.mean() - sps.t.ppf(0.95, 4) * sem) and r.noninferior
    assert noninferiority_p(d, 0.01) == pytest.approx(sps.ttest_1samp(d, -0.01, alternative="greater").pvalue)
    assert r.p == noninferiority_p(d, 0.01)  # one test: the bound and the p come from the same SE
    assert math.isnan(noninferiority([0.01], margin=0.01).p) and noninferiority([0.0, 0.0], margin=0.01).p == 0.0
    assert not noninferiority(d - 0.012, margin=0.01).noninferior  # the mean itself is beyond the margin
    with pytest.raises(ValueError, match="margin must be > 0"):
        noninferiority(d, margin=0)


def test_power_against_statsmodels():
    from statsmodels.stats.power import TTestPower

    ref = TTestPower()
    for effect, sd, n in ((0.02, 0.03, 10), (0.05, 0.03, 5), (1.0, 1.0, 8)):
        assert paired_t_power(effect, sd, n) == pytest.approx(ref.power(effect / sd, n, 0.05), rel=1e-6)
        assert detectable_effect(sd, n) == pytest.approx(sd * ref.solve_power(None, n, 0.05, 0.8), rel=1e-5)
    for effect, sd in ((0.02, 0.03), (1.0, 1.0), (0.03, 0.02)):
        assert seeds_for_power(effect, sd) == math.ceil(ref.solve_power(effect / sd, None, 0.05, 0.8))


# ---------------------------------------------------------------- plan files
def _plan(**changes):
    plan = {"plan": "fedharmony-study-plan/1", "name": "t", "question": "does x beat fedavg?", "task": "prostate",
            "preset": "smoke", "arms": ["fedavg", "fedavg_iid", "pooled_steps"],
            "comparisons": [{"arm": "fedavg_iid", "baseline": "fedavg", "test": "superiority",
                             "endpoints": ["mean", "worst"], "primary": True},
                            {"arm": "pooled_steps", "baseline": "fedavg", "test": "noninferiority",
                             "endpoints": ["mean", "sites"]}],
            "alpha": 0.05, "margin": 0.01, "power": {"effect": 0.02, "sd": 0.03, "power": 0.8}, "seeds": 3}
    plan.update(changes)
    return plan


def _write(path, plan):
    path.write_text(json.dumps(plan, indent=1))
    return path


def test_a_plan_loads_and_says_its_power(tmp_path):
    plan = load_plan(_write(tmp_path / "plan.json", _plan()))
    assert plan.arms == ("fedavg", "fedavg_iid", "pooled_steps") and plan.seeds == 3 and plan.margin == 0.01
    assert plan.digest.startswith("sha256:") and plan.comparisons[0].primary
    power = plan.power_summary()
    assert power["seeds_needed"] == seeds_for_power(0.02, 0.03) and power["power_at_seeds"] < 0.8
    assert load_plan(_write(tmp_path / "p2.json", _plan(seeds=None))).seeds == power["seeds_needed"]
    # sized for Holm's strictest step (alpha / m with m = 6 verdicts): more seeds for the same effect
    strict = load_plan(_write(tmp_path / "p3.json", _plan(seeds=None, power={"effect": 0.02, "sd": 0.03,
                                                                              "power": 0.8, "alpha": 0.05 / 6})))
    assert strict.seeds == seeds_for_power(0.02, 0.03, 0.8, 0.05 / 6) > power["seeds_needed"]
    assert strict.power_summary()["alpha"] == pytest.approx(0.05 / 6) and strict.alpha == 0.05


@pytest.mark.parametrize("changes, message", [
    ({"arms": ["fedavg", "fedsgd"]}, "'arms': unknown method(s) ['fedsgd']"),
    ({"arms": ["fedavg", "fedavg_iid"]}, "comparisons[1]: arm 'pooled_steps' is not one of the plan's arms"),
    ({"margin": None}, "comparisons[1]: a non-inferiority comparison needs the plan's 'margin'"),
    ({"comparisons": [{"arm": "fedavg_iid", "baseline": "fedavg", "test": "superiority", "endpoints": ["sites"]}]},
     "the 'sites' endpoint is a non-inferiority claim"),
    ({"comparisons": [{"arm": "fedavg_iid", "baseline": "fedavg", "test": "better", "endpoints": ["mean"]}]},
     "test 'better' is not one of"),
    ({"comparisons": [{"arm": "fedavg_iid", "baseline": "fedavg", "test": "superiority", "endpoints": ["median"]}]},
     "endpoints must be distinct entries"),
    ({"task": "kidney"}, "'arms': unknown task 'kidney'"),
    ({"preset": "huge"}, "unknown preset 'huge'"),
    ({"power": {"effect": 0.02}}, "'power' must give"),
    ({"power": {"effect": 0.02, "sd": 0.03, "power": 0.8, "level": 0.01}}, "'power' has unknown field(s) ['level']"),
    ({"power": {"effect": 0.02, "sd": 0.03, "power": 0.8, "alpha": 0.9}}, "'alpha' must be a number in"),
    ({"seeds": 1}, "'seeds' must be an integer in [2, 1000]"),
    ({"extra": 1}, "unknown fields ['extra']"),
    ({"comparisons": [{"arm": "fedavg_iid", "baseline": "fedavg", "test": "superiority", "endpoints": ["mean@1.25"]}]},
     "endpoints must be distinct entries"),  # a pixel-scale endpoint needs the factor among the plan's pixel_scales
    ({"pixel_scales": [0.8, 9]}, "'pixel_scales': a pixel scale must be a number in [0.25, 4], got 9"),
    ({"pixel_scales": "0.8"}, "'pixel_scales' must be a list of factors"),
    ({"plan": "something else"}, "not a study plan"),
    ({"data": {"voxel_scale": 2}}, "'data' may set nothing for task 'prostate'"),  # v1 has no voxel scale
    ({"task": "prostate_v2", "data": {"cases": 3}}, "'data' may set ['voxel_scale'] for task 'prostate_v2'"),
    ({"task": "brain", "data": {"voxel_scale": 40}}, "'data': 'voxel_scale' must be a number in [1, 16]"),
])
def test_a_bad_plan_is_refused_naming_the_field(tmp_path, changes, message):
    path = _write(tmp_path / "plan.json", {k: v for k, v in _plan(**changes).items() if v is not None})
    with pytest.raises(PlanError, match=f"plan {tmp_path / 'plan.json'}: .*" + __import__("re").escape(message)):
        load_plan(path)


def test_a_plans_data_setting_changes_the_phantom_draw_and_the_runs_cache_key(tmp_path):
    from fedharmony.study.runner import Study

    plain = Study.from_plan(_write(tmp_path / "a.json", _plan(task="prostate_v2")), tmp_path / "a")
    coarse = Study.from_plan(_write(tmp_path / "b.json", _plan(task="prostate_v2", data={"voxel_scale": 2})),
                             tmp_path / "b")
    assert coarse.preset.data == {**plain.preset.data, "voxel_scale": 2}  # the preset's other settings kept
    assert coarse.settings()["data"]["voxel_scale"] == 2
    assert coarse.settings_key("fedavg", 0) != plain.settings_key("fedavg", 0)


def test_a_study_refuses_a_plan_changed_after_its_first_run(tmp_path):
    from fedharmony.study.runner import PLAN_LOCK, Study

    path = _write(tmp_path / "plan.json", _plan())
    study = Study.from_plan(path, tmp_path / "out")
    assert study.methods == ["fedavg", "fedavg_iid", "pooled_steps"] and study.seeds == [0, 1, 2]
    record = study.lock_plan()  # what the first run does
    assert record["commit_state"] == "outside a git checkout" and (tmp_path / "out" / PLAN_LOCK).is_file()
    assert Study.from_plan(path, tmp_path / "out").lock_plan()["digest"] == record["digest"]  # unchanged: goes on
    _write(path, _plan(margin=0.02))
    with pytest.raises(PlanError, match="started on .* with plan digest .* now has sha256:"):
        Study.from_plan(path, tmp_path / "out").lock_plan()
    res = subprocess.run(STUDY + ["--plan", str(path), "--out", str(tmp_path / "out")], capture_output=True,
                         text=True)
    assert res.returncode == 2 and "A plan is fixed before the first run" in res.stderr
    res = subprocess.run(STUDY + ["--plan", str(path), "--seeds", "5"], capture_output=True, text=True)
    assert res.returncode == 2 and "--seeds: a planned study takes these from its plan" in res.stderr


def test_a_plan_in_a_git_checkout_must_be_committed_before_the_first_run(tmp_path):
    from fedharmony.study.runner import Study

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)

    git("init", "-q")
    path = _write(tmp_path / "plan.json", _plan())
    assert plan_commit(path) == (None, "not committed")
    with pytest.raises(PlanError, match="plan .* is not committed: commit it before the study's first run"):
        Study.from_plan(path, tmp_path / "out").lock_plan()
    git("add", "plan.json")
    git("commit", "-q", "-m", "plan")
    commit, state = plan_commit(path)
    assert state == "committed" and len(commit) == 40
    assert Study.from_plan(path, tmp_path / "out").lock_plan()["commit"] == commit
    _write(path, _plan(seeds=4))
    assert plan_commit(path) == (None, "changed since its last commit")


# ---------------------------------------------------------------- verdicts
def _scores(diffs_by_arm, sites=("A", "B", "C")):
    """fedavg at 0.70 + 0.01 * site + 0.003 * seed; each arm at fedavg + its (seed, site) difference."""
    scores = {"fedavg": {}}
    for arm, by_seed in diffs_by_arm.items():
        scores[arm] = {}
        for seed, diffs in enumerate(by_seed):
            base = {s: 0.70 + 0.01 * i + 0.003 * seed for i, s in enumerate(sites)}
            scores["fedavg"][seed] = base
            scores[arm][seed] = {s: base[s] + d for s, d in zip(sites, diffs)}
    return scores


def test_planned_verdicts_by_hand():
    from statsmodels.stats.multitest import multipletests

    clear = [(0.05, 0.05, 0.05), (0.04, 0.04, 0.04), (0.06, 0.06, 0.06), (0.05, 0.05, 0.05)]
    weak = [(0.03, 0.0, 0.0), (-0.01, 0.0, 0.0), (0.04, 0.0, 0.0), (0.0, 0.0, 0.0)]  # mean over sites ~ +0.005
    close = [(0.001, -0.001, 0.0), (0.0, 0.002, -0.001), (-0.001, 0.0, 0.001), (0.0, 0.0, 0.0)]
    scores = _scores({"a": clear, "b": weak, "c": close})
    plan = {"alpha": 0.05, "margin": 0.01, "comparisons": [
        {"arm": "a", "baseline": "fedavg", "test": "superiority", "endpoints": ["mean", "worst"]},
        {"arm": "b", "baseline": "fedavg", "test": "superiority", "endpoints": ["mean"]},
        {"arm": "c", "baseline": "fedavg", "test": "noninferiority", "endpoints": ["mean", "sites"]}]}
    rows = planned_verdicts(scores, plan)
    assert [(r["arm"], r["endpoint"]) for r in rows] == [("a", "mean"), ("a", "worst"), ("b", "mean"), ("c", "mean"),
                                                          ("c", "sites")]
    a_mean = [0.05, 0.04, 0.06, 0.05]
    assert rows[0]["p"] == pytest.approx(sps.ttest_1samp(a_mean, 0).pvalue)
    c_mean = [float(np.mean(d)) for d in close]
    assert rows[3]["p"] == pytest.approx(sps.ttest_1samp(c_mean, -0.01, alternative="greater").pvalue)
    per_site = [sps.ttest_1samp([close[k][i] for k in range(4)], -0.01, alternative="greater").pvalue
                for i in range(3)]
    assert rows[4]["p"] == pytest.approx(max(per_site))  # intersection-union: the weakest site decides
    assert [r["p_holm"] for r in rows] == pytest.approx(list(multipletests([r["p"] for r in rows], method="holm")[1]))
    assert rows[0]["verdict"] == rows[1]["verdict"] == "better"
    assert rows[2]["verdict"] == "no difference shown"
    assert rows[3]["verdict"] == "no worse (margin 0.01)" and rows[4]["verdict"] == "every site no worse (margin 0.01)"


def test_a_pixel_scale_endpoint_is_judged_on_that_scales_scores_and_counted_in_holms_family(tmp_path):
    """``mean@F`` / ``worst@F``: the same test on the scores of the test scans at F times their pixel size."""
    from fedharmony.study.runner import Study

    plan = _plan(pixel_scales=[0.8, 1.25], comparisons=[
        {"arm": "fedavg_iid", "baseline": "fedavg", "test": "superiority", "endpoints": ["mean", "mean@1.25"],
         "primary": True}])
    loaded = load_plan(_write(tmp_path / "plan.json", plan))
    assert loaded.comparisons[0].endpoints == ("mean", "mean@1.25")
    assert Study.from_plan(tmp_path / "plan.json", tmp_path / "out").pixel_scales == (0.8, 1.0, 1.25)
    stored = _scores({"fedavg_iid": [(0.0, 0.0, 0.0)] * 4})  # no difference as stored
    at = {"1.25": _scores({"fedavg_iid": [(0.2, 0.2, 0.2), (0.25, 0.25, 0.25), (0.3, 0.3, 0.3), (0.2, 0.2, 0.2)]})}
    rows = planned_verdicts(stored, plan, at)
    assert [r["endpoint"] for r in rows] == ["mean", "mean@1.25"]
    assert rows[0]["diff"] == pytest.approx(0.0) and rows[0]["verdict"] == "no difference shown"
    assert rows[1]["diff"] == pytest.approx(0.2375) and rows[1]["verdict"] == "better"
    assert rows[1]["p_holm"] == pytest.approx(min(1.0, 2 * sps.ttest_1samp([0.2, 0.25, 0.3, 0.2], 0).pvalue))
    # without the scale's scores (runs made without --pixel-scales) the endpoint has no seeds and no verdict
    assert planned_verdicts(stored, plan)[1]["n"] == 0


def test_holm_can_take_back_a_verdict_the_uncorrected_rule_gave():
    """Ten comparisons of noise-sized effects: some pass the uncorrected rule, Holm keeps none of them."""
    rng = np.random.default_rng(3)
    diffs = {f"m{i}": [tuple(rng.normal(0.004, 0.01, 3)) for _ in range(5)] for i in range(10)}
    scores = _scores(diffs)
    results = {"task": "prostate", "metric": "val_mean_dice", "methods": ["fedavg", *diffs],
               "runs": [{"method": m, "seed": k, "site_scores": v} for m, by in scores.items() for k, v in by.items()]}
    comparisons = [paired_difference(results, m) for m in diffs]
    rows = posthoc_rule(comparisons)
    old = [r["old_verdict"] for r in rows]
    new = [r["verdict"] for r in rows]
    assert any(v == "better" for v in old) and all(v == "no difference shown" for v in new)


def test_a_planned_report_says_the_plan_and_marks_the_rest_post_hoc(tmp_path):
    scores = _scores({"fedavg_iid": [(0.05, 0.05, 0.05), (0.04, 0.04, 0.04), (0.06, 0.06, 0.06)],
                      "pooled_steps": [(0.1, 0.1, 0.1), (0.09, 0.1, 0.1), (0.1, 0.11, 0.1)]})
    plan_path = _write(tmp_path / "plan.json", _plan(comparisons=[
        {"arm": "fedavg_iid", "baseline": "fedavg", "test": "superiority", "endpoints": ["mean"], "primary": True}]))
    plan = load_plan(plan_path)
    results = {"task": "prostate", "metric": "val_mean_dice", "metric_label": "Dice",
               "methods": ["fedavg", "fedavg_iid", "pooled_steps"], "seeds": [0, 1, 2],
               "runs": [{"method": m, "seed": k, "site_scores": v} for m, by in scores.items() for k, v in by.items()],
               "plan": {"name": "t", "file": "plan.json", "digest": plan.digest, "commit": None,
                        "commit_state": "outside a git checkout", "first_run": "2026-12-06T00:00:00Z",
                        "content": plan.raw, "power": plan.power_summary()}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    report = write_report(tmp_path).read_text()
    assert f"- plan: `plan.json`, {plan.digest}" in report
    assert "| fedavg_iid - fedavg (primary) | mean | superiority | 3 |" in report
    assert "| pooled_steps - fedavg | +0.100 |" in report  # shown, not judged:
    row = next(line for line in report.splitlines() if line.startswith("| pooled_steps - fedavg | +0.100"))
    assert row.count("post hoc") == 2 and "better" not in row
    assert "## Post hoc: the verdicts under the plan protocol's rule" not in report  # only for unplanned studies


# ---------------------------------------------------------------- headroom controls
def test_the_iid_deal_keeps_sizes_and_gives_every_site_the_same_mix(tmp_path):
    from fedharmony.data.datalist import write_datalist
    from fedharmony.study.data import StudyData, iid_dataset

    sizes = {"A": (12, 3), "B": (6, 3), "C": (18, 6)}
    train = tmp_path / "train"
    for site, (n_train, n_val) in sizes.items():
        (train / site).mkdir(parents=True)
        write_datalist(train / site, {
            "training": [{"image": f"{site}_t{i}.nii.gz", "label": f"{site}_t{i}_seg.nii.gz"} for i in range(n_train)],
            "validation": [{"image": f"{site}_v{i}.nii.gz", "label": f"{site}_v{i}_seg.nii.gz"} for i in range(n_val)]},
            site)
        write_datalist(train / site, {  # a second label set of the same cases (the brain phantom's tissue labels)
            "training": [{"image": f"{site}_t{i}.nii.gz", "label": f"{site}_t{i}_tissue.nii.gz"} for i in range(n_train)],
            "validation": [{"image": f"{site}_v{i}.nii.gz", "label": f"{site}_v{i}_tissue.nii.gz"}
                           for i in range(n_val)]}, site, "datalist_tissue.json")
    data = StudyData(train_root=str(train), test_root=str(tmp_path / "test"), sites={"site-1": "A", "site-2": "B",
                                                                                       "site-3": "C"})
    iid = iid_dataset(data, tmp_path / "iid", seed=0)
    assert iid.test_root == data.test_root and iid.sites == data.sites
    total = {split: sum(s[i] for s in sizes.values()) for i, split in enumerate(("training", "validation"))}
    for i, split in enumerate(("training", "validation")):
        seen = []
        for site, n in sizes.items():
            items = json.loads((iid.train_root / site / "datalist.json").read_text())[split]
            assert len(items) == n[i]  # sizes per site unchanged
            seen += [item["image"] for item in items]
            for source, m in sizes.items():  # the same mix: each source in proportion, up to rounding
                share = sum(item["site"] == source for item in items)
                assert abs(share - n[i] * m[i] / total[split]) <= 1, (split, site, source)
            assert all(item["image"].startswith(str(train)) for item in items)  # absolute paths
        assert len(seen) == len(set(seen)) == total[split]  # every case exactly once
        for site in sizes:  # every label set is dealt the same way: the same images, each with its own label
            brain = json.loads((iid.train_root / site / "datalist.json").read_text())[split]
            tissue = json.loads((iid.train_root / site / "datalist_tissue.json").read_text())[split]
            assert [i["image"] for i in tissue] == [i["image"] for i in brain]
            assert [i["label"] for i in tissue] == [i["label"].replace("_seg", "_tissue") for i in brain]
    again = iid_dataset(data, tmp_path / "iid2", seed=0)
    assert (again.train_root / "A" / "datalist.json").read_text() == (iid.train_root / "A" / "datalist.json").read_text()


def test_pooled_steps_takes_the_mean_sites_steps_per_epoch(tmp_path):
    from fedharmony.data.datalist import write_datalist
    from fedharmony.study.centralized import mean_site_steps
    from fedharmony.study.data import StudyData

    for site, n in (("A", 10), ("B", 3), ("C", 7)):
        (tmp_path / site).mkdir()
        write_datalist(tmp_path / site, {"training": [{"image": f"{i}"} for i in range(n)]}, site)
    data = StudyData(train_root=str(tmp_path), test_root=str(tmp_path), sites={"1": "A", "2": "B", "3": "C"})
    assert mean_site_steps(data, batch_size=2) == 4  # (5 + 2 + 4) / 3 = 3.67 -> 4
    assert mean_site_steps(data, batch_size=16) == 1


# ---------------------------------------------------------------- HarmoFL's window
def test_harmofl_says_when_its_window_holds_only_the_dc_term(caplog):
    from fedharmony.methods.harmofl.harmonize import empty_window_note
    from fedharmony.methods.harmofl.networks import AmplitudeNormalization

    assert "b = floor(96 x 0.01) = 0" in empty_window_note(96, 96, 0.01)
    assert empty_window_note(96, 96, 0.025) is None and empty_window_note(384, 384, 0.01) is None
    with caplog.at_level(logging.WARNING, logger="fedharmony.methods.harmofl.networks"):
        assert AmplitudeNormalization(3, (96, 96), 0.01).window_radius == 0
        assert "HarmoFL paper mode: amplitude window b = floor(96 x 0.01) = 0" in caplog.text
        caplog.clear()
        assert AmplitudeNormalization(3, (96, 96), 0.025).window_radius == 2
        assert AmplitudeNormalization(3, (96, 96), 0.01, mode="released").window_radius == 0  # released: DC by design
        assert caplog.text == ""


def test_plateau_rule_by_hand():
    from fedharmony.study.analysis import PLATEAU_TOLERANCE, plateau, plateau_rounds

    # three seeds rising by 0.05 a round to round 9, then flat with seed-to-seed spread 0.03
    curves = {k: {r: min(r, 9) * 0.05 + 0.03 * (k - 1) for r in range(24)} for k in range(3)}
    check = plateau(curves)  # window: the last 6 rounds (18-23), flat
    assert check["rounds"] == 24 and check["window"] == 6 and check["plateaued"]
    assert check["change"] == pytest.approx(0.0, abs=1e-12) and check["last"] == pytest.approx(0.45)
    rising = plateau(curves, rounds=10)  # window rounds 6-9 (at least 4): a straight rise of 3 x 0.05
    assert rising["window"] == 4 and rising["change"] == pytest.approx(0.15) and not rising["plateaued"]
    # rounds 8-11 = 0.40, 0.45, 0.45, 0.45: least-squares slope 0.075 / 5 = 0.015, times the span of 3 rounds
    assert plateau(curves, rounds=12)["change"] == pytest.approx(0.045)
    assert plateau(curves, rounds=13)["change"] == pytest.approx(0.0, abs=1e-12)  # rounds 9-12: flat
    assert plateau_rounds(curves) == 13
    # the rise is judged against the tolerance, not against the seeds' spread: a slow, steady rise of
    # 0.002 a round with no spread at all still counts as rising once a quarter of the run adds up to 0.01
    slow = {k: {r: 0.5 + 0.002 * r for r in range(40)} for k in range(2)}
    assert plateau(slow)["change"] == pytest.approx(0.018) and not plateau(slow)["plateaued"]
    assert plateau(slow, rounds=20)["change"] == pytest.approx(0.008) and plateau(slow, rounds=20)["plateaued"]
    assert PLATEAU_TOLERANCE == 0.01
    # a noisy flat curve: single rounds differ by up to 0.04, the fitted line over the window does not rise
    noisy = {k: {r: 0.65 + 0.02 * (-1) ** (r + k) for r in range(40)} for k in range(3)}
    assert abs(plateau(noisy)["change"]) < PLATEAU_TOLERANCE and plateau_rounds(noisy) == 4
    assert plateau({0: {0: 0.1, 1: 0.2}}) is None  # one seed: no standard error
