"""What a study run records it was made on (code digest, commit, CPU), the study naming a cached run made on
other code, and the report's section that warns where an arm's runs were made on different code."""

import json
import subprocess

from fedharmony.study.provenance import code_digest, describe, differing, git_state, made_on
from fedharmony.study.report import write_report
from fedharmony.study.runner import Study


def _package(root):
    (root / "custom" / "fedharmony").mkdir(parents=True)
    (root / "jobs").mkdir()
    (root / "custom" / "fedharmony" / "a.py").write_text("x = 1\n")
    (root / "jobs" / "prostate.py").write_text("print('job')\n")


def test_the_code_digest_follows_the_python_code_and_nothing_else(tmp_path):
    _package(tmp_path)
    first = code_digest(tmp_path)
    assert code_digest(tmp_path) == first and len(first) == 12
    (tmp_path / "custom" / "fedharmony" / "README.md").write_text("docs are not code")
    assert code_digest(tmp_path) == first
    (tmp_path / "jobs" / "prostate.py").write_text("print('job changed')\n")
    changed = code_digest(tmp_path)
    assert changed != first
    (tmp_path / "custom" / "fedharmony" / "a.py").rename(tmp_path / "custom" / "fedharmony" / "b.py")
    assert code_digest(tmp_path) not in (first, changed)  # the same bytes under another name are other code


def test_git_state_names_the_commit_and_whether_the_code_differs_from_it(tmp_path):
    assert git_state(tmp_path) == (None, None)  # no checkout: nothing claimed
    _package(tmp_path)
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    head = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert git_state(tmp_path) == (head, False)
    (tmp_path / "notes.txt").write_text("outside the code folders")
    assert git_state(tmp_path) == (head, False)
    (tmp_path / "custom" / "fedharmony" / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == (head, True)
    info = made_on(tmp_path)
    assert info["commit"] == head and info["dirty"] is True and info["code"] == code_digest(tmp_path)
    assert ", torch kernels " in info["cpu"] and info["versions"]["torch"]
    assert describe(info).startswith(f"code {info['code']} (commit {head}, changed), ")


def test_a_cached_run_made_on_other_code_is_named(tmp_path):
    study = Study("prostate", ["fedavg"], 1, "smoke", tmp_path, echo=lambda line: None)
    here = made_on()
    assert study._made_elsewhere({"made_on": here}) == ""
    other = {**here, "code": "0123456789ab", "commit": "abcdefabcdef", "dirty": False}
    assert study._made_elsewhere({"made_on": other}) == (
        f" (made on other code: code 0123456789ab (commit abcdefabcdef), {here['cpu']})")
    assert study._made_elsewhere({}) == " (made on code it does not record: not recorded)"
    assert study._made_elsewhere({"made_on": "3f2a"}) == " (made on code it does not record: unreadable record (str))"


def _run(method, seed, info):
    return {"method": method, "seed": seed, "site_scores": {"A": 0.6 + 0.01 * seed, "B": 0.7}, "made_on": info}


def test_the_report_warns_where_runs_were_made_on_different_code(tmp_path):
    a = {"code": "aaaaaaaaaaaa", "commit": "c1", "dirty": False, "cpu": "CPU X, torch kernels AVX2"}
    b = {**a, "code": "bbbbbbbbbbbb", "dirty": True}
    results = {"task": "prostate", "metric": "val_mean_dice", "metric_label": "Dice", "methods": ["fedavg", "harmofl"],
               "seeds": [0, 1], "runs": [_run("fedavg", 0, a), _run("fedavg", 1, a), _run("harmofl", 0, a),
                                         _run("harmofl", 1, b)]}
    assert differing(results["runs"]) == [describe(a), describe(b)]
    text = write_report(tmp_path, results).read_text()
    assert "**The runs were made on 2 different code versions or CPUs" in text
    assert f"- fedavg: {describe(a)} (2 of 2)" in text
    assert f"- harmofl: {describe(a)} (1 of 2); {describe(b)} (1 of 2)" in text

    for run in results["runs"]:
        run["made_on"] = a
    text = write_report(tmp_path, json.loads(json.dumps(results))).read_text()
    assert f"Every run: {describe(a)}." in text and "different code versions" not in text

    del results["runs"][0]["made_on"]  # a run from before the study recorded it
    results["runs"][1]["made_on"] = ["not", "an", "object"]  # a damaged record is named, not a crash
    text = write_report(tmp_path, results).read_text()
    assert "- fedavg: not recorded (1 of 2); unreadable record (list) (1 of 2)" in text


def test_a_report_names_the_bundle_version_and_the_training_defaults_its_runs_had(tmp_path):
    """New defaults are labelled: results.json records the bundle's version and its spatial_augmentation default,
    and the report says them; results written before the record (the committed studies) get no such line."""
    import json

    from conftest import REPO
    from fedharmony.study.provenance import bundle_line, bundle_record
    from fedharmony.study.report import write_report

    record = bundle_record(REPO / "bundles" / "prostate_mri_seg")
    train = json.loads((REPO / "bundles" / "prostate_mri_seg" / "configs" / "train.json").read_text())
    assert record["training_defaults"] == {"spatial_augmentation": train["spatial_augmentation"]}
    assert bundle_record(REPO / "bundles" / "image_classification")["training_defaults"] == {}
    results = {"task": "prostate", "metric": "val_mean_dice", "methods": ["fedavg"], "seeds": [0], "bundle": record,
               "runs": [{"method": "fedavg", "seed": 0, "site_scores": {"A": 0.5}}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = write_report(tmp_path).read_text()
    assert f"- bundle: prostate_mri_seg {record['version']}; training defaults: spatial_augmentation " \
           f"{train['spatial_augmentation']}" in text
    del results["bundle"]
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert "- bundle:" not in write_report(tmp_path).read_text() and bundle_line(None) is None
