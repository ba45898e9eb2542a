"""tools/iopfl_study.py's report: the safeguard's calls and the differences from the global model, on a
hand-made results dict (the federations and segmentations it summarizes are tested elsewhere)."""

import pytest

import iopfl_study  # tools/ is on sys.path (conftest)


def _site(seed_means: dict, candidate_loss: float, global_loss: float, kept: str) -> dict:
    mean = {"global": 0.5, iopfl_study.SAFE_CANDIDATE: 0.5, "routing": 0.5, **seed_means}
    return {"mean": mean, "timings": {"routing_safe": {"history": [
        {"pass": 1, "loss": 1.0}, {"safeguard": {"candidate_loss": candidate_loss, "global_loss": global_loss,
                                                 "kept": kept}}]}}}


def test_the_safeguard_table_tells_the_margins_call_from_the_bare_loss_comparison():
    runs = {
        # adapted much better, its loss lower but within the margin: the decision is wrong, the loss right
        "A": {"0": _site({iopfl_study.SAFE_CANDIDATE: 0.9}, 0.98, 1.0, "global")},
        # adapted worse and its loss higher: both right
        "B": {"0": _site({iopfl_study.SAFE_CANDIDATE: 0.3}, 1.2, 1.0, "global")},
        # a Dice gap under the tie threshold: counted for neither
        "C": {"0": _site({iopfl_study.SAFE_CANDIDATE: 0.502}, 0.5, 1.0, "adapted")},
    }
    rows = iopfl_study.safeguard_rows(runs)
    assert "| A | 0 | 0.980 / 1.000 | global | adapted | +0.400 | no | yes |" in rows
    assert "| B | 0 | 1.200 / 1.000 | global | global | -0.200 | yes | yes |" in rows
    assert "| C | 0 | 0.500 / 1.000 | adapted | adapted | +0.002 | either (tie) | either (tie) |" in rows
    assert any("decision picked the network with the higher Dice in 1 of 2 cases, the lower held-out loss "
               "alone in 2 of 2" in r for r in rows)


@pytest.mark.parametrize("seeds, verdict", [(2, "none (fewer than 3 seeds)"), (4, "better")])
def test_differences_from_global_give_a_verdict_only_from_three_seeds(seeds, verdict):
    runs = {site: {str(s): _site({"routing": 0.6 + 0.01 * s}, 1, 1, "global") for s in range(seeds)}
            for site in ("A", "B")}
    rows = iopfl_study.difference_rows(runs, ["global", "routing"])
    row = next(r for r in rows if r.startswith("| routing |"))
    assert f"| {verdict} |" in row and "+0.1" in row.split("|")[2]
    assert row.endswith("| 0 of 2 |")  # no site more than one point below global


def _consensus_site(candidate_dice: float, kept: str, variant_dice: float) -> dict:
    site = _site({iopfl_study.SAFE_CANDIDATE: candidate_dice, "routing_safe (consensus)": variant_dice}, 1, 1, "global")
    site["timings"]["routing_safe (consensus)"] = {"history": [{"safeguard": {
        "criterion": "consensus", "candidate_agreement": 0.8, "global_agreement": 0.6, "kept": kept}}]}
    return site


def test_the_consensus_table_scores_each_call_and_checks_the_masks_are_the_kept_networks():
    runs = {
        "A": {"0": _consensus_site(0.9, "adapted", 0.9)},   # kept the better adapted network: right, paired
        "B": {"0": _consensus_site(0.3, "adapted", 0.3)},   # kept a worse adapted network: wrong
        "C": {"0": _consensus_site(0.3, "global", 0.45)},   # kept global, but its masks are neither network's
    }
    rows = iopfl_study.consensus_rows(runs)
    assert "| A | 0 | 0.800 / 0.600 | adapted | +0.400 | yes |" in rows
    assert "| B | 0 | 0.800 / 0.600 | adapted | -0.200 | no |" in rows
    assert "| C | 0 | 0.800 / 0.600 | global | -0.200 | yes |" in rows
    assert any("picked the network with the higher Dice in 2 of 3 cases" in r and "except C seed 0" in r
               for r in rows)


@pytest.mark.parametrize("number", [2, 4])
def test_report_only_rebuilds_the_committed_report_from_its_json_and_runs_nothing(tmp_path, capsys, number):
    """The second set's report (one run) and the fourth's (two: the labelled criterion ran later, on the stored
    federations, so the report names the earlier run's code and command as well as the last one's)."""
    from conftest import REPO

    study = REPO / "docs" / "studies" / f"iopfl_unseen_{number}"
    (tmp_path / "iopfl_study.json").write_text((study / "iopfl_study.json").read_text())
    args = ["--seeds", "3", "--unseen", "--holdout", "--unseen-profiles",
            f"custom/fedharmony/phantom/prostate_unseen_scanners_{number}.json", "--report-only", "--out",
            str(tmp_path)]
    assert iopfl_study.main(args) == 0
    report = (tmp_path / "report.md").read_text()
    assert report == (study / "report.md").read_text()  # the committed report is the json's, nothing by hand
    assert ("\n- earlier run: code: ba03ef150351 (commit 803203e9eae6); command: " in report) == (number == 4)
    assert str(tmp_path) not in report  # the checkout's path is printed, not written into the report
    assert f"written: {tmp_path / 'iopfl_study.json'}" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iopfl_study.json", "outside.csv", "outside_dice.png",
                                                          "report.md"]  # no data, no federation


def test_report_only_without_stored_results_names_the_missing_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        iopfl_study.main(["--report-only", "--out", str(tmp_path)])
    assert f"no stored results at {tmp_path / 'iopfl_study.json'}" in capsys.readouterr().err


def _stored(candidate_agreement: float, global_agreement: float) -> dict:
    """A stored outside result with the consensus safeguard's record: adapted 0.7 and global 0.5 per volume."""
    per_volume = {"global": {"Case00": 0.4, "Case01": 0.6}, iopfl_study.SAFE_CANDIDATE: {"Case00": 0.6, "Case01": 0.8}}
    return {"per_volume": per_volume, "mean": {"global": 0.5, iopfl_study.SAFE_CANDIDATE: 0.7},
            "timings": {"routing_safe (consensus)": {"history": [{"safeguard": {
                "criterion": "consensus", "candidate_agreement": candidate_agreement,
                "global_agreement": global_agreement, "kept": "global", "reason": "stored"}}]}}}


def test_the_departure_call_is_derived_exactly_from_the_stored_consensus_agreements():
    name = "routing_safe (departure)"
    results = {"loso": {"A": {"0": _stored(0.86, 0.89)}, "B": {"0": _stored(0.40, 0.89)}},
               "unseen": {"C": {"0": {**_stored(0.9, 0.9), "mean": {"global": 0.5, iopfl_study.SAFE_CANDIDATE: 0.7,
                                                                     name: 0.123}}}}}
    # 2 departure calls (C already has the criterion's own run: left as it is) and 3 labelled ones
    assert iopfl_study.derive_safeguards(results) == 5
    a, b = results["loso"]["A"]["0"], results["loso"]["B"]["0"]
    assert a["mean"][name] == 0.7 and a["per_volume"][name] == {"Case00": 0.6, "Case01": 0.8}  # 0.86 >= 0.8455
    assert b["mean"][name] == 0.5 and b["per_volume"][name] == {"Case00": 0.4, "Case01": 0.6}  # a clear departure
    record = a["timings"][name]
    assert record["derived_from"] == "routing_safe (consensus)"
    assert record["history"][-1]["safeguard"] == {"criterion": "departure", "candidate_agreement": 0.86,
                                                  "global_agreement": 0.89, "kept": "adapted", "margin": 0.05}
    assert results["unseen"]["C"]["0"]["mean"][name] == 0.123
    assert iopfl_study.derive_safeguards(results) == 0  # filled once
    rows = iopfl_study.consensus_rows(results["loso"], name)
    assert "| A | 0 | 0.860 / 0.890 | adapted | +0.200 | yes |" in rows
    assert "| B | 0 | 0.400 / 0.890 | global | +0.200 | no |" in rows
    assert any("2 of these calls were derived from the consensus criterion's stored agreements" in r for r in rows)


def _rederived(number: int, name: str):
    """For each (scanner, seed) of the committed unseen scanner set ``number``, where ``name`` ran for real: the
    real result, a copy with ``name`` removed and then derived, and how many entries the derivation filled."""
    import copy
    import json

    from conftest import REPO

    stored = json.loads((REPO / "docs" / "studies" / f"iopfl_unseen_{number}" / "iopfl_study.json").read_text())
    for site, by_seed in stored["unseen"].items():
        for seed, real in by_seed.items():
            assert "derived_from" not in real["timings"][name]  # run, not derived
            stripped = copy.deepcopy(real)
            for key in ("mean", "per_volume", "timings"):
                del stripped[key][name]
            yield real, stripped, iopfl_study.derive_safeguards({"unseen": {site: {seed: stripped}}})


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
    per_volume = {iopfl_study.SAFE_CANDIDATE: dict(zip(cases, candidate)), "global": dict(zip(cases, glob))}
    return {"per_volume": per_volume, "mean": {k: sum(v.values()) / 5 for k, v in per_volume.items()},
            "timings": {}}


def test_the_labelled_call_is_derived_from_the_labelled_volumes_dice_and_judged_on_the_others():
    name = iopfl_study.LABELLED
    # labelled: Case00 and Case04 (the first and every 4th). A: adapted better on them (0.8 vs 0.6) and on the
    # others; B: adapted worse on them (0.5 vs 0.7) but better on the others: the labelled volumes misled it
    results = {"unseen": {"A": {"0": _five_cases([0.8, 0.9, 0.9, 0.9, 0.8], [0.6, 0.5, 0.5, 0.5, 0.6])},
                          "B": {"0": _five_cases([0.5, 0.9, 0.9, 0.9, 0.5], [0.7, 0.6, 0.6, 0.6, 0.7])}}}
    assert iopfl_study.derive_safeguards(results) == 2
    a, b = results["unseen"]["A"]["0"], results["unseen"]["B"]["0"]
    decision = a["timings"][name]["history"][-1]["safeguard"]
    assert decision == {"criterion": "labelled", "candidate_dice": pytest.approx(0.8),
                        "global_dice": pytest.approx(0.6), "kept": "adapted", "labelled_volumes": ["Case00", "Case04"]}
    assert a["timings"][name]["derived_from"] == iopfl_study.SAFE_CANDIDATE
    assert a["per_volume"][name] == a["per_volume"][iopfl_study.SAFE_CANDIDATE]
    assert b["per_volume"][name] == b["per_volume"]["global"]  # 0.5 < 0.7 on the labelled ones: fall back
    b["per_volume"]["routing"] = b["per_volume"]["global"]
    a["per_volume"]["routing"] = {c: v - 0.05 for c, v in a["per_volume"]["global"].items()}  # 5 points below
    rows = iopfl_study.labelled_rows(results["unseen"])
    assert "| A | 0 | Case00, Case04 | 0.800 / 0.600 | adapted | +0.400 | yes |" in rows
    assert "| B | 0 | Case00, Case04 | 0.500 / 0.700 | global | +0.300 | no |" in rows
    assert any("in 1 of 2 cases" in r and "2 of these calls were derived" in r for r in rows)
    # on the volumes without a label the labelled safeguard gains (0.4 + 0) / 2 = 0.2 over global (1 seed: no verdict)
    row = next(r for r in rows if r.startswith(f"| {name} |"))
    assert row.startswith(f"| {name} | +0.200 |") and "none (fewer than 3 seeds)" in row and row.endswith("| 0 of 2 |")
    assert any(r.startswith("single (site, seed) cases more than 1 point below global on these volumes: routing 1 "
                            "of 2 (worst A seed 0 -0.050); ") and r.endswith(f"{name} 0 of 2 (worst B seed 0 +0.000)")
               for r in rows)
    assert iopfl_study.drop_derived(results) == 2 and name not in a["mean"] and name not in b["timings"]


def test_derived_labelled_calls_equal_the_real_runs_of_the_fourth_scanner_set():
    """The claim behind deriving the labelled criterion for older studies: on the fourth scanner set, where it ran
    for real, deriving it from the study's per-volume Dice gives the same call, the same labelled-volume Dice (the
    default geometry keeps each scan's own grid, so the bundle and the study score the same voxels) and the same
    masks' Dice."""
    name = iopfl_study.LABELLED
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
