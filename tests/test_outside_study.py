"""Outside studies (fedharmony.study.outside): the report's safeguard tables and derived criteria on hand-made
results, the committed studies' reports rebuilt from their stored results, and one small study run for real
through the NVFlare simulator and the bundle (cached, resumed, reported)."""

import json

import pytest

from fedharmony.study import outside
from fedharmony.study import outside_report


def _site(seed_means: dict, candidate_loss: float, global_loss: float, kept: str) -> dict:
    mean = {"global": 0.5, outside.SAFE_CANDIDATE: 0.5, "routing": 0.5, **seed_means}
    return {"mean": mean, "timings": {"routing_safe": {"history": [
        {"pass": 1, "loss": 1.0}, {"safeguard": {"candidate_loss": candidate_loss, "global_loss": global_loss,
                                                 "kept": kept}}]}}}


def test_the_safeguard_table_tells_the_margins_call_from_the_bare_loss_comparison():
    runs = {
        # adapted much better, its loss lower but within the margin: the decision is wrong, the loss right
        "A": {"0": _site({outside.SAFE_CANDIDATE: 0.9}, 0.98, 1.0, "global")},
        # adapted worse and its loss higher: both right
        "B": {"0": _site({outside.SAFE_CANDIDATE: 0.3}, 1.2, 1.0, "global")},
        # a Dice gap under the tie threshold: counted for neither
        "C": {"0": _site({outside.SAFE_CANDIDATE: 0.502}, 0.5, 1.0, "adapted")},
    }
    rows = outside_report.safeguard_rows(runs)
    assert "| A | 0 | 0.980 / 1.000 | global | adapted | +0.400 | no | yes |" in rows
    assert "| B | 0 | 1.200 / 1.000 | global | global | -0.200 | yes | yes |" in rows
    assert "| C | 0 | 0.500 / 1.000 | adapted | adapted | +0.002 | either (tie) | either (tie) |" in rows
    assert any("decision picked the network with the higher Dice in 1 of 2 cases, the lower held-out loss "
               "alone in 2 of 2" in r for r in rows)


def _consensus_site(candidate_dice: float, kept: str, variant_dice: float) -> dict:
    site = _site({outside.SAFE_CANDIDATE: candidate_dice, "routing_safe (consensus)": variant_dice}, 1, 1, "global")
    site["timings"]["routing_safe (consensus)"] = {"history": [{"safeguard": {
        "criterion": "consensus", "candidate_agreement": 0.8, "global_agreement": 0.6, "kept": kept}}]}
    return site


def test_the_consensus_table_scores_each_call_and_checks_the_masks_are_the_kept_networks():
    runs = {
        "A": {"0": _consensus_site(0.9, "adapted", 0.9)},   # kept the better adapted network: right, paired
        "B": {"0": _consensus_site(0.3, "adapted", 0.3)},   # kept a worse adapted network: wrong
        "C": {"0": _consensus_site(0.3, "global", 0.45)},   # kept global, but its masks are neither network's
    }
    rows = outside_report.consensus_rows(runs)
    assert "| A | 0 | 0.800 / 0.600 | adapted | +0.400 | yes |" in rows
    assert "| B | 0 | 0.800 / 0.600 | adapted | -0.200 | no |" in rows
    assert "| C | 0 | 0.800 / 0.600 | global | -0.200 | yes |" in rows
    assert any("picked the network with the higher Dice in 2 of 3 cases" in r and "except C seed 0" in r
               for r in rows)


STUDIES = ["iopfl_unseen", "iopfl_unseen_2", "iopfl_unseen_3", "iopfl_unseen_4", "iopfl_loso", "routing_default"]


@pytest.mark.parametrize("name", STUDIES)
def test_report_only_rebuilds_the_committed_outside_report_from_its_results_and_runs_nothing(tmp_path, capsys, name):
    """The fourth set's report names two runs (the labelled criterion ran later, on the stored federations)."""
    import shutil

    import study  # tools/study.py
    from conftest import REPO

    committed = REPO / "docs" / "studies" / name
    shutil.copytree(committed, tmp_path / name, ignore=shutil.ignore_patterns("report.md", "*.png", "*.csv"))
    assert study.main(["--report-only", str(tmp_path / name)]) == 0
    report = (tmp_path / name / "report.md").read_text()
    assert report == (committed / "report.md").read_text()  # the committed report is the results', nothing by hand
    assert (tmp_path / name / "outside.csv").read_text() == (committed / "outside.csv").read_text()
    assert ("\n- earlier run: `python tools/iopfl_study.py" in report) == (name == "iopfl_unseen_4")
    assert str(tmp_path) not in report and f"report: {tmp_path / name / 'report.md'}" in capsys.readouterr().out
    assert not (tmp_path / name / "data").exists() and not (tmp_path / name / "sim").exists()  # nothing ran


def test_committed_outside_results_are_keyed_as_the_same_command_would_key_them():
    """A rerun of a committed study's make target resumes from its stored runs instead of running them again."""
    from conftest import REPO

    for name, number in (("iopfl_unseen_2", 2), ("iopfl_loso", None)):
        folder = REPO / "docs" / "studies" / name
        stored = json.loads((folder / "results.json").read_text())
        study = outside.OutsideStudy("unseen" if number else "loso", len(stored["seeds"]), folder,
                                         profiles=outside.unseen_set(number) if number else None,
                                         echo=lambda line: None)
        assert study.settings() == stored["settings"]
        for target in study.targets():
            for seed in study.seeds:
                assert study.cached(target, seed) is not None, (name, target, seed)


def test_an_unknown_unseen_set_and_bad_settings_are_refused_by_name():
    with pytest.raises(ValueError, match="no unseen-scanner set 9 .* the sets are \\[1, 2, 3, 4, 5\\]"):
        outside.unseen_set(9)
    with pytest.raises(ValueError, match="needs its scanners' profile file"):
        outside.OutsideStudy("unseen", 1, "/tmp/x")
    with pytest.raises(ValueError, match="holdout must name distinct sites"):
        outside.OutsideStudy("loso", 1, "/tmp/x", holdout=["NOWHERE"])
    with pytest.raises(ValueError, match="unknown outside target 'inside'"):
        outside.OutsideStudy("inside", 1, "/tmp/x")


def test_the_study_cli_refuses_options_of_other_studies_with_outside(capsys):
    import study

    with pytest.raises(SystemExit):
        study.main(["--outside", "loso", "--task", "prostate", "--out", "/tmp/x"])
    assert "--task: not options of an outside study" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        study.main(["--outside", "loso", "--unseen-set", "2", "--out", "/tmp/x"])
    assert "--unseen-set is for --outside unseen" in capsys.readouterr().err


def _stored(candidate_agreement: float, global_agreement: float) -> dict:
    """A stored outside result with the consensus safeguard's record: adapted 0.7 and global 0.5 per volume."""
    per_volume = {"global": {"Case00": 0.4, "Case01": 0.6}, outside.SAFE_CANDIDATE: {"Case00": 0.6, "Case01": 0.8}}
    return {"per_volume": per_volume, "mean": {"global": 0.5, outside.SAFE_CANDIDATE: 0.7},
            "timings": {"routing_safe (consensus)": {"history": [{"safeguard": {
                "criterion": "consensus", "candidate_agreement": candidate_agreement,
                "global_agreement": global_agreement, "kept": "global", "reason": "stored"}}]}}}


def test_the_departure_call_is_derived_exactly_from_the_stored_consensus_agreements():
    name = "routing_safe (departure)"
    results = {"targets": {"A": {"0": _stored(0.86, 0.89)}, "B": {"0": _stored(0.40, 0.89)},
                           "C": {"0": {**_stored(0.9, 0.9), "mean": {"global": 0.5, outside.SAFE_CANDIDATE: 0.7,
                                                                     name: 0.123}}}}}
    # 2 departure calls (C already has the criterion's own run: left as it is) and 3 labelled ones
    assert outside.derive_safeguards(results) == 5
    a, b = results["targets"]["A"]["0"], results["targets"]["B"]["0"]
    assert a["mean"][name] == 0.7 and a["per_volume"][name] == {"Case00": 0.6, "Case01": 0.8}  # 0.86 >= 0.8455
    assert b["mean"][name] == 0.5 and b["per_volume"][name] == {"Case00": 0.4, "Case01": 0.6}  # a clear departure
    record = a["timings"][name]
    assert record["derived_from"] == "routing_safe (consensus)"
    assert record["history"][-1]["safeguard"] == {"criterion": "departure", "candidate_agreement": 0.86,
                                                  "global_agreement": 0.89, "kept": "adapted", "margin": 0.05}
    assert results["targets"]["C"]["0"]["mean"][name] == 0.123
    assert outside.derive_safeguards(results) == 0  # filled once
    del results["targets"]["C"]
    rows = outside_report.consensus_rows(results["targets"], name)
    assert "| A | 0 | 0.860 / 0.890 | adapted | +0.200 | yes |" in rows
    assert "| B | 0 | 0.400 / 0.890 | global | +0.200 | no |" in rows
    assert any("2 of these calls were derived from the consensus criterion's stored agreements" in r for r in rows)


def _rederived(number: int, name: str):
    """For each (scanner, seed) of the committed unseen scanner set ``number``, where ``name`` ran for real: the
    real result, a copy with ``name`` removed and then derived, and how many entries the derivation filled."""
    import copy
    import json

    from conftest import REPO

    stored = json.loads((REPO / "docs" / "studies" / f"iopfl_unseen_{number}" / "results.json").read_text())
    for site, by_seed in stored["targets"].items():
        for seed, real in by_seed.items():
            assert "derived_from" not in real["timings"][name]  # run, not derived
            stripped = copy.deepcopy(real)
            for key in ("mean", "per_volume", "timings"):
                del stripped[key][name]
            yield real, stripped, outside.derive_safeguards({"targets": {site: {seed: stripped}}})


def test_derived_departure_calls_equal_the_real_runs_of_the_third_scanner_set():
    """The claim behind deriving the departure criterion for older studies: on the third scanner set, where it
    ran for real, deriving it from the consensus run's record gives the same network and the same masks' Dice."""
    name = "routing_safe (departure)"
    checked = 0
    for real, stripped, filled in _rederived(3, name):
        assert filled == 2  # and the labelled call
        assert stripped["timings"][name]["derived_from"] == "routing_safe (consensus)"
        assert stripped["timings"][name]["history"][-1]["safeguard"]["kept"] == \
            real["timings"][name]["history"][-1]["safeguard"]["kept"]
        assert stripped["per_volume"][name] == real["per_volume"][name]
        checked += 1
    assert checked == 9


def _five_cases(candidate: list, glob: list) -> dict:
    """A stored outside result of 5 volumes (Case00 .. Case04) with the per-volume Dice of routing_safe's adapted
    network and of the global model, and no labelled criterion."""
    cases = [f"Case0{i}" for i in range(5)]
    per_volume = {outside.SAFE_CANDIDATE: dict(zip(cases, candidate)), "global": dict(zip(cases, glob))}
    return {"per_volume": per_volume, "mean": {k: sum(v.values()) / 5 for k, v in per_volume.items()},
            "timings": {}}


def test_the_labelled_call_is_derived_from_the_labelled_volumes_dice_and_judged_on_the_others():
    name = outside.LABELLED
    # labelled: Case00 and Case04 (the first and every 4th). A: adapted better on them (0.8 vs 0.6) and on the
    # others; B: adapted worse on them (0.5 vs 0.7) but better on the others: the labelled volumes misled it
    results = {"targets": {"A": {"0": _five_cases([0.8, 0.9, 0.9, 0.9, 0.8], [0.6, 0.5, 0.5, 0.5, 0.6])},
                          "B": {"0": _five_cases([0.5, 0.9, 0.9, 0.9, 0.5], [0.7, 0.6, 0.6, 0.6, 0.7])}}}
    assert outside.derive_safeguards(results) == 2
    a, b = results["targets"]["A"]["0"], results["targets"]["B"]["0"]
    decision = a["timings"][name]["history"][-1]["safeguard"]
    assert decision == {"criterion": "labelled", "candidate_dice": pytest.approx(0.8),
                        "global_dice": pytest.approx(0.6), "kept": "adapted", "labelled_volumes": ["Case00", "Case04"]}
    assert a["timings"][name]["derived_from"] == outside.SAFE_CANDIDATE
    assert a["per_volume"][name] == a["per_volume"][outside.SAFE_CANDIDATE]
    assert b["per_volume"][name] == b["per_volume"]["global"]  # 0.5 < 0.7 on the labelled ones: fall back
    b["per_volume"]["routing"] = b["per_volume"]["global"]
    a["per_volume"]["routing"] = {c: v - 0.05 for c, v in a["per_volume"]["global"].items()}  # 5 points below
    rows = outside_report.labelled_rows(results["targets"])
    assert "| A | 0 | Case00, Case04 | 0.800 / 0.600 | adapted | +0.400 | yes |" in rows
    assert "| B | 0 | Case00, Case04 | 0.500 / 0.700 | global | +0.300 | no |" in rows
    assert any("in 1 of 2 cases" in r and "2 of these calls were derived" in r for r in rows)
    # on the volumes without a label the labelled safeguard gains (0.4 + 0) / 2 = 0.2 over global (1 seed: no CI,
    # no verdict); per site: A +0.4, B +0.0
    row = next(r for r in rows if r.startswith(f"| {name} - global |"))
    assert row.startswith(f"| {name} - global | +0.200 |") and "| no difference shown |" in row
    site_row = next(r for r in rows if r.startswith(f"| {name} - global | +0.400 | +0.000 |"))
    assert site_row.endswith("| - |")  # one seed: no site counted either way
    assert any(r.startswith("single (site, seed) cases more than 1 point below global on these volumes: routing 1 "
                            "of 2 (worst A seed 0 -0.050); ") and r.endswith(f"{name} 0 of 2 (worst B seed 0 +0.000)")
               for r in rows)
    assert outside.drop_derived(results) == 2 and name not in a["mean"] and name not in b["timings"]


def test_derived_labelled_calls_equal_the_real_runs_of_the_fourth_scanner_set():
    """The claim behind deriving the labelled criterion for older studies: on the fourth scanner set, where it ran
    for real, deriving it from the study's per-volume Dice gives the same call, the same labelled-volume Dice (the
    default geometry keeps each scan's own grid, so the bundle and the study score the same voxels) and the same
    masks' Dice."""
    name = outside.LABELLED
    checked = 0
    for real, stripped, filled in _rederived(4, name):
        assert filled == 1
        derived = stripped["timings"][name]["history"][-1]["safeguard"]
        ran = real["timings"][name]["history"][-1]["safeguard"]
        assert derived["kept"] == ran["kept"] and derived["labelled_volumes"] == ran["labelled_volumes"]
        assert derived["candidate_dice"] == pytest.approx(ran["candidate_dice"], abs=1e-9)
        assert derived["global_dice"] == pytest.approx(ran["global_dice"], abs=1e-9)
        assert stripped["per_volume"][name] == real["per_volume"][name]
        checked += 1
    assert checked == 9


TINY = {"samples_per_volume": 4, "batch_size": 1, "base_features": 4}


def _tiny_plan(tmp_path, arms):
    plan = {"plan": "fedharmony-study-plan/1", "name": "tiny", "question": "does the harness run a plan?",
            "task": "prostate", "arms": arms, "seeds": 2, "alpha": 0.05, "margin": 0.03,
            "outside": {"target": "loso", "sites": 3, "holdout": ["I2CVB"], "cases": 3, "size": 32, "rounds": 1,
                        "local_epochs": 1, "passes": 1, "first_seed": 7, "overrides": TINY},
            "comparisons": [{"arm": "routing", "baseline": "global", "test": "noninferiority",
                             "endpoints": ["sites"], "primary": True}],
            "power": {"effect": 0.05, "sd": 0.045, "power": 0.8}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def test_a_planned_leave_one_site_out_study_runs_its_arms_caches_resumes_and_reports(tmp_path):
    """Three tiny phantom sites, I2CVB held out, under a plan (outside a git checkout, so not committed): per seed
    one IOP-FL federation on the other two in the NVFlare simulator, then only the plan's arms through the
    bundle's routed inference config, scored against the labels; the plan is locked at the first run."""
    from fedharmony.study.outside_report import write_outside_report
    from fedharmony.study.plan import PlanError

    arms = ["global", "routing", "routing_safe (departure)", "routing_safe (consensus)"]
    plan = _tiny_plan(tmp_path, arms)
    said = []

    def make():
        return outside.OutsideStudy.from_plan(plan, tmp_path / "study", cost=False, command="the test",
                                              echo=said.append)

    results = make().run()
    assert results["failed"] == [] and list(results["targets"]) == ["I2CVB"] and results["seeds"] == [7, 8]
    assert results["plan"]["digest"].startswith("sha256:") and results["methods"] == arms
    entry = results["targets"]["I2CVB"]["7"]
    # the plan's arms, and routing_safe with its adapted candidate (what the criteria's calls are judged against)
    assert set(entry["mean"]) == {*arms, "routing_safe", outside.SAFE_CANDIDATE} and entry["volumes"] == 3
    assert all(len(entry["per_volume"][m]) == 3 and 0 <= entry["mean"][m] <= 1 for m in arms)
    stored = tmp_path / "study" / "runs" / "I2CVB" / "seed7" / "result.json"
    assert json.loads(stored.read_text())["made_on"]["code"] and results["invocations"][-1]["command"] == "the test"

    said.clear()  # everything is stored: nothing runs, not even the federation
    again = make().run()
    assert again["targets"] == results["targets"] and not any("federation" in s or "I2CVB ..." in s for s in said)

    # a criterion missing from a stored result runs alone, on the stored federation; the rest is kept as it was
    record = json.loads(stored.read_text())
    for key in ("mean", "per_volume", "timings"):
        del record[key]["routing_safe (consensus)"]
    stored.write_text(json.dumps(record))
    said.clear()
    resumed = make().run()["targets"]["I2CVB"]["7"]
    assert "routing_safe (consensus)" in resumed["mean"] and not any("federation iopfl" in s for s in said)
    assert {m: resumed["mean"][m] for m in arms[:3]} == {m: entry["mean"][m] for m in arms[:3]}

    report = write_outside_report(tmp_path / "study").read_text()
    assert "## Protocol: analysis plan" in report and "| routing - global (primary) | sites | noninferiority | 2 |" \
        in report and "consensus safeguard" in report
    assert (tmp_path / "study" / "outside_dice.png").stat().st_size > 0

    plan.write_text(plan.read_text().replace('"margin": 0.03', '"margin": 0.02'))  # changed after its first run
    with pytest.raises(PlanError, match="A plan is fixed before the first run"):
        make().run()
    stored.write_text("{ not json")  # a corrupt result is named (and would run again)
    said.clear()
    study = outside.OutsideStudy("loso", 1, tmp_path / "study", sites=3, holdout=["I2CVB"], cases=3, size=32,
                                 rounds=1, local_epochs=1, passes=1, overrides=TINY, first_seed=7, echo=said.append)
    assert study.cached("I2CVB", 7) is None and any("is corrupt" in s for s in said)


def test_an_outside_plan_is_checked_by_name(tmp_path):
    from fedharmony.study.plan import PlanError, load_plan

    with pytest.raises(PlanError, match="unknown outside arm"):
        load_plan(_tiny_plan(tmp_path, ["global", "routing", "routing_magic"]))
    with pytest.raises(PlanError, match="'global' must be one of its arms"):
        load_plan(_tiny_plan(tmp_path, ["routing", "tent"]))
    path = _tiny_plan(tmp_path, ["global", "routing"])
    path.write_text(path.read_text().replace('"passes": 1', '"passes": 1, "speed": 3'))
    with pytest.raises(PlanError, match="unknown setting\\(s\\) \\['speed'\\]"):
        load_plan(path)
    path.write_text(path.read_text().replace('"target": "loso"', '"target": "unseen"').replace(', "speed": 3', ''))
    with pytest.raises(PlanError, match="'profiles' must name the unseen scanners' profile file"):
        load_plan(path)
    with pytest.raises(PlanError, match="has no 'outside' block"):
        from conftest import REPO

        outside.OutsideStudy.from_plan(REPO / "docs" / "studies" / "prostate_headroom" / "plan.json")


def test_report_only_without_results_names_the_missing_file(tmp_path, capsys):
    import study

    with pytest.raises(SystemExit):
        study.main(["--report-only", str(tmp_path)])
    assert f"no results.json at {tmp_path / 'results.json'}" in capsys.readouterr().err


def test_data_and_federations_of_other_settings_are_removed_before_a_run(tmp_path):
    said = []
    study = outside.OutsideStudy("loso", 1, tmp_path, sites=3, cases=3, echo=said.append)
    (tmp_path / "sim" / "old").mkdir(parents=True)
    (tmp_path / "data" / "seed0").mkdir(parents=True)
    study._drop_work_of_other_settings()  # no record yet (a folder from before the record): kept, recorded
    assert (tmp_path / "sim" / "old").is_dir() and not said
    outside.OutsideStudy("loso", 1, tmp_path, sites=3, cases=3, echo=said.append)._drop_work_of_other_settings()
    assert (tmp_path / "sim" / "old").is_dir() and not said  # the same settings: kept
    outside.OutsideStudy("loso", 1, tmp_path, sites=3, cases=4, echo=said.append)._drop_work_of_other_settings()
    assert not (tmp_path / "sim").exists() and not (tmp_path / "data").exists() and "removed" in said[-1]


def _tiny_loso_plan(task: str, holdout: str, first_seed: int, **outside_settings) -> dict:
    """A leave-one-site-out plan small enough for the suite: 3 cases a site, one round, one routing pass."""
    return {"plan": "fedharmony-study-plan/1", "name": f"tiny_{task}", "question": f"does the harness run on {task}?",
            "task": task, "arms": ["global", "routing"], "seeds": 2, "alpha": 0.05, "margin": 0.03,
            "outside": {"target": "loso", "holdout": [holdout], "cases": 3, "rounds": 1, "local_epochs": 1,
                        "passes": 1, "first_seed": first_seed, **outside_settings,
                        "overrides": {**TINY, "image_size": 32}},
            "comparisons": [{"arm": "routing", "baseline": "global", "test": "noninferiority",
                             "endpoints": ["sites"], "primary": True}],
            "power": {"effect": 0.05, "sd": 0.045, "power": 0.8}}


def test_a_leave_one_site_out_plan_on_prostate_v2_draws_v2_sites_and_routes_on_the_held_out_scanner(tmp_path):
    """Task prostate_v2: the same harness on v2 sites (each scanner's own matrix and slices), HK held out; the
    federation trains at the plan's image_size, routed inference reads HK's scans at their own grid."""
    import nibabel as nib

    plan = _tiny_loso_plan("prostate_v2", holdout="HK", first_seed=3, sites=3)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    study = outside.OutsideStudy.from_plan(path, tmp_path / "study", cost=False, echo=lambda _: None)
    assert study.phantom == "v2" and study.settings()["phantom"] == "v2"
    assert "phantom" not in outside.OutsideStudy("loso", 1, tmp_path / "v1", sites=3).settings()  # v1 keys unchanged
    study.seeds = [3]  # one seed is enough to show the path
    results = study.run()
    assert results["failed"] == [] and results["task"] == "prostate_v2" and list(results["targets"]) == ["HK"]
    entry = results["targets"]["HK"]["3"]
    assert entry["volumes"] == 3 and all(0.0 <= entry["mean"][m] <= 1.0 for m in ("global", "routing"))
    held_out = nib.load(str(tmp_path / "study" / "data" / "seed3" / "HK" / "Case00.nii.gz"))
    assert held_out.shape[:2] == (256, 256)  # the v2 HK scanner's matrix, not a v1 size


def test_a_leave_one_site_out_plan_on_the_brain_task_runs_the_brain_job_and_bundle_on_the_held_out_hospital(
        tmp_path):
    """Task brain: the harness draws the three IXI-like brain sites (voxels 4x the profiles', a plan's
    voxel_scale), trains IOP-FL with jobs/brain.py on two of them and routes the held-out IOP scans through the
    brain bundle's routed inference; an unseen-scanner brain plan is refused (there are no brain scanner sets)."""
    import nibabel as nib

    from fedharmony.study.plan import PlanError, load_plan

    plan = _tiny_loso_plan("brain", holdout="IOP", first_seed=5, voxel_scale=4)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    study = outside.OutsideStudy.from_plan(path, tmp_path / "study", cost=False, echo=lambda _: None)
    assert study.sites == ["Guys", "HH", "IOP"] and study.settings()["voxel_scale"] == 4.0
    study.seeds = [5]
    results = study.run()
    assert results["failed"] == [] and results["task"] == "brain" and list(results["targets"]) == ["IOP"]
    assert results["bundle"]["name"] == "brain_mri_seg"
    entry = results["targets"]["IOP"]["5"]
    assert entry["volumes"] == 3 and all(0.0 <= entry["mean"][m] <= 1.0 for m in ("global", "routing"))
    log = (tmp_path / "study" / "sim" / "iopfl_without_IOP_seed5.log").read_text()
    assert "brain_mri_seg" in log  # the brain job trained the pool
    held_out = nib.load(str(tmp_path / "study" / "data" / "seed5" / "IOP" / "Case00.nii.gz"))
    assert held_out.shape[:2] == (48, 48)  # the IOP scanner's 192 px matrix at 4x voxels
    path.write_text(json.dumps({**plan, "outside": {**plan["outside"], "target": "unseen",
                                                    "profiles": "docs/studies/unseen_scanners/set1.json"}}))
    with pytest.raises(PlanError, match="the brain task's outside studies hold out one of its sites"):
        load_plan(path)
