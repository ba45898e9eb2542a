"""The README's method guide (fedharmony.study.guide, tools/method_guide.py): every number is a planned study's own
verdict recomputed from its stored results; unfinished studies show as pending."""

import json
import subprocess
import sys

import pytest

from conftest import REPO
from fedharmony.study.guide import END, START, GuideError, guide_table, load_guide, replace_table, study_verdicts

TOOL = [sys.executable, str(REPO / "tools" / "method_guide.py")]
PLAN = {"plan": "fedharmony-study-plan/1", "name": "toy", "question": "q", "task": "prostate",
        "arms": ["fedavg", "fedbn"], "seeds": 3, "power": {"effect": 0.02, "sd": 0.01, "power": 0.8},
        "comparisons": [{"arm": "fedbn", "baseline": "fedavg", "test": "superiority", "endpoints": ["mean"]}]}
ROW = {"situation": "Sites that differ", "task": "prostate", "method": "FedBN - FedAvg", "study": "toy",
       "arm": "fedbn", "baseline": "fedavg", "endpoint": "mean"}


def _study(root, pending=(), name="toy", plan=True):
    """A finished toy study: FedBN beats FedAvg by 0.01, 0.02, 0.03 at every site on seeds 0, 1, 2 (``plan``
    False: an earlier study without a plan)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    if plan:
        (folder / "plan.json").write_text(json.dumps(PLAN))
    runs = []
    for seed, gain in enumerate((0.01, 0.02, 0.03)):
        base = {"A": 0.70 + 0.01 * seed, "B": 0.60}
        runs.append({"method": "fedavg", "seed": seed, "site_scores": base})
        runs.append({"method": "fedbn", "seed": seed, "site_scores": {s: v + gain for s, v in base.items()}})
    (folder / "results.json").write_text(json.dumps({
        "task": "prostate", "metric": "val_mean_dice", "metric_label": "Dice", "runs": runs,
        "pending": list(pending), **({"plan": {"name": "toy", "content": PLAN}} if plan else {})}))
    return folder


def _guide(path, rows):
    path.write_text(json.dumps({"guide": "fedharmony-method-guide/1", "rows": rows}))
    return path


def test_the_readme_guide_is_what_the_stored_results_give():
    res = subprocess.run(TOOL + ["--check", str(REPO / "README.md")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_a_row_quotes_its_studys_planned_verdict_computed_by_hand(tmp_path):
    _study(tmp_path)
    # differences 0.01, 0.02, 0.03: mean 0.02, SE 0.01 / sqrt(3); t = 3.464 on 2 df, two-sided p = 0.0742;
    # 95% CI 0.02 -/+ 4.303 x 0.005774 = [-0.005, +0.045]; one verdict, so Holm's p is the p
    rows = load_guide(_guide(tmp_path / "guide.json", [ROW]), tmp_path)
    (verdict,) = study_verdicts(tmp_path / "toy")
    assert verdict["p_holm"] == pytest.approx(0.0742, abs=1e-4)
    table = guide_table(rows, tmp_path)
    assert ("| **Sites that differ** | prostate | FedBN - FedAvg | mean over sites | +0.020 Dice [-0.005, +0.045] | "
            "0.074 | no difference shown | [report](docs/studies/toy/report.md) | - |") in table


def test_a_row_shows_what_an_earlier_unplanned_study_said_re_read_with_holm(tmp_path):
    _study(tmp_path)
    _study(tmp_path, name="old", plan=False)
    # the old report shows fedbn - fedavg on mean and worst (both the same differences here): two p of 0.0742,
    # Holm's adjusted p 2 x 0.0742 = 0.148 for the smaller; the old rule's bootstrap and t CIs: the t CI spans 0
    rows = load_guide(_guide(tmp_path / "guide.json", [{**ROW, "before": "old"}]), tmp_path)
    table = guide_table(rows, tmp_path)
    assert ("| +0.020 [-0.005, +0.045], Holm p 0.148: no difference shown under either rule "
            "([old](docs/studies/old/report.md)) |") in table
    with pytest.raises(GuideError, match=r"rows\[0\]: before 'toy': toy has a plan"):
        load_guide(_guide(tmp_path / "g.json", [{**ROW, "before": "toy"}]), tmp_path)
    with pytest.raises(GuideError, match=r"before 'old:fedprox': old's report compares no fedprox - fedavg"):
        load_guide(_guide(tmp_path / "g.json", [{**ROW, "before": "old:fedprox"}]), tmp_path)


def test_an_unfinished_study_is_pending_with_no_interim_number(tmp_path):
    _study(tmp_path, pending=[{"method": "fedbn", "seed": 2}])
    rows = load_guide(_guide(tmp_path / "guide.json", [ROW, {**ROW, "task": "again"}]), tmp_path)
    assert study_verdicts(tmp_path / "toy") is None
    table = guide_table(rows, tmp_path)
    assert "pending: the planned study has not finished | - | - | [plan](docs/studies/toy/plan.json)" in table
    assert "+0.0" not in table
    assert table.count("**Sites that differ**") == 1  # the situation once for its run of rows
    _study(tmp_path)  # results with nothing pending, but the plan asks for more seeds than were run
    (tmp_path / "toy" / "plan.json").write_text(json.dumps({**PLAN, "seeds": 4}))
    assert study_verdicts(tmp_path / "toy") is None and "pending" in guide_table(rows, tmp_path)
    (tmp_path / "toy" / "results.json").unlink()  # a plan alone: queued
    assert "pending" in guide_table(rows, tmp_path)


def test_rows_that_the_studies_cannot_answer_are_refused_by_name(tmp_path):
    _study(tmp_path)
    # a plan file changed after the study ran: its stored verdicts lack the row the new plan allows
    (tmp_path / "toy" / "plan.json").write_text(json.dumps({**PLAN, "comparisons": [
        {**PLAN["comparisons"][0], "endpoints": ["mean", "worst"]}]}))
    worst = load_guide(_guide(tmp_path / "g.json", [{**ROW, "endpoint": "worst"}]), tmp_path)
    with pytest.raises(GuideError, match="the plan file differs from the one the study ran"):
        guide_table(worst, tmp_path)
    (tmp_path / "toy" / "plan.json").write_text(json.dumps(PLAN))
    with pytest.raises(GuideError, match=r"rows\[0\]: .*makes no comparison fedbn - fedavg on endpoint 'worst'"):
        load_guide(_guide(tmp_path / "g.json", [{**ROW, "endpoint": "worst"}]), tmp_path)
    with pytest.raises(GuideError, match=r"rows\[1\]: study 'gone' has no plan"):
        load_guide(_guide(tmp_path / "g.json", [ROW, {**ROW, "study": "gone"}]), tmp_path)
    with pytest.raises(GuideError, match=r"rows\[0\] needs exactly"):
        load_guide(_guide(tmp_path / "g.json", [{**ROW, "note": "x"}]), tmp_path)
    (tmp_path / "toy" / "plan.json").write_text(json.dumps({**PLAN, "arms": ["fedavg", "fedbn", "nosuch"]}))
    with pytest.raises(GuideError, match=r"rows\[0\]: plan .*unknown method"):
        load_guide(_guide(tmp_path / "g.json", [ROW]), tmp_path)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(GuideError, match="not valid JSON"):
        load_guide(tmp_path / "bad.json", tmp_path)


def test_the_tool_checks_and_rewrites_only_the_part_between_the_markers(tmp_path):
    _study(tmp_path / "studies")
    guide = _guide(tmp_path / "guide.json", [ROW])
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nabove\n{START}\n| stale |\n{END}\nbelow\n")
    args = ["--guide", str(guide), "--studies", str(tmp_path / "studies")]
    res = subprocess.run(TOOL + args + ["--check", str(readme)], capture_output=True, text=True)
    assert res.returncode == 1 and "is not what the stored results give" in res.stderr
    res = subprocess.run(TOOL + args + ["--write", str(readme)], capture_output=True, text=True)
    assert res.returncode == 0 and "rewritten" in res.stdout
    text = readme.read_text()
    assert text.startswith("# title\n\nabove\n") and text.endswith(f"{END}\nbelow\n") and "stale" not in text
    assert "+0.020 Dice [-0.005, +0.045]" in text
    res = subprocess.run(TOOL + args + ["--check", str(readme)], capture_output=True, text=True)
    assert res.returncode == 0
    readme.write_text("no markers\n")
    res = subprocess.run(TOOL + args + ["--check", str(readme)], capture_output=True, text=True)
    assert res.returncode == 2 and "needs one line" in res.stderr and readme.read_text() == "no markers\n"
    with pytest.raises(GuideError):
        replace_table(f"{END}\n{START}\n", "| t |\n")
