"""What a job may ask of a site that runs no job code: overrides as data, the installed bundle pinned
by version and digest, no job-chosen paths, no absolute paths in errors that leave the site."""

import json
import math
import shutil
import subprocess
import sys

import pytest

from conftest import BUNDLE, REPO, TINY_OVERRIDES
from fedharmony.methods import METHODS, SPECS
from fedharmony.bundle.job_policy import (PolicyError, Tunable, bundle_digest, bundle_version, check_config_files,
                                   check_job_copy, check_tunable_values, load_tunables, redact_paths,
                                   resolve_installed_bundle, validate_overrides)

CLS_BUNDLE = REPO / "bundles" / "image_classification"
TUNABLES = {
    "learning_rate": Tunable("number", exclusive_minimum=0),
    "batch_size": Tunable("integer", minimum=1),
    "amp_mode": Tunable("string", choices=("paper", "released", "off")),
    "flag": Tunable("boolean"),
}
EXPLOIT = "$__import__('pathlib').Path('/tmp/marker').write_text('ran') and 0.002"


@pytest.mark.parametrize("overrides, reason", [
    ({"learning_rate": EXPLOIT}, "starts with '$' (a MONAI expression)"),
    ({"learning_rate": "  $1e-3"}, "starts with '$'"),
    ({"amp_mode": "@network_def"}, "starts with '@' (a MONAI reference)"),
    ({"amp_mode": "%configs/train.json#amp_mode"}, "starts with '%' (a MONAI macro)"),
    ({"learning_rate": {"_target_": "os.system", "command": "id"}}, "a nested config (dict)"),
    ({"batch_size": [1, 2]}, "a nested config (list)"),
    ({"_target_": "os.system"}, "a config object key"),
    ({"train#trainer": 1}, "not on this bundle's list of tunables"),
    ({"network_def": 1}, "not on this bundle's list of tunables"),
    ({"dataset_dir": "/etc"}, "a path on the site's disk"),
    ({"datalist": "/elsewhere/datalist.json"}, "a path on the site's disk"),
    ({"bundle_root": "/tmp"}, "a path on the site's disk"),
    ({"learning_rate": None}, "NoneType is not a plain number"),
    ({"learning_rate": "0.01"}, "must be a number"),
    ({"learning_rate": True}, "must be a number"),
    ({"learning_rate": math.nan}, "must be finite"),
    ({"learning_rate": math.inf}, "must be finite"),
    ({"learning_rate": 0}, "must be > 0"),
    ({"batch_size": 2.5}, "must be an integer"),
    ({"batch_size": 0}, "must be >= 1"),
    ({"amp_mode": "fast"}, "must be one of ['paper', 'released', 'off']"),
    ({"flag": 1}, "must be true or false"),
])
def test_each_forbidden_override_is_refused_naming_the_id_and_the_reason(overrides, reason):
    with pytest.raises(PolicyError) as e:
        validate_overrides(overrides, TUNABLES)
    (key,) = overrides
    assert f"override {key!r}" in str(e.value) and reason in str(e.value)


@pytest.mark.parametrize("overrides", [
    {},
    {"learning_rate": 1e-3},
    {"learning_rate": 2},  # an int is a number
    {"batch_size": 8},
    {"amp_mode": "released"},
    {"flag": False},
    {"learning_rate": 0.5, "batch_size": 1, "amp_mode": "off", "flag": True},
])
def test_plain_values_of_tunable_ids_are_accepted_unchanged(overrides):
    assert validate_overrides(overrides, TUNABLES) == overrides


def test_a_code_shipping_job_has_only_its_plain_values_on_tunable_ids_checked():
    # what the list can judge is judged: every bad plain value named in one message
    with pytest.raises(PolicyError) as e:
        check_tunable_values({"amp_mode": "fast", "batch_size": 0, "learning_rate": 1e-3}, TUNABLES)
    assert "override 'amp_mode': must be one of" in str(e.value)
    assert "override 'batch_size': must be >= 1" in str(e.value)
    assert "learning_rate" not in str(e.value)
    # a job that ships code may use expressions, references, nested configs and ids off the list
    check_tunable_values({"learning_rate": "$0.001 * 2", "amp_mode": "@other", "batch_size": {"_target_": "int"},
                          "train#trainer#max_epochs": 0, "dataset_dir": "/data"}, TUNABLES)


def test_every_refused_id_is_named_in_one_message():
    with pytest.raises(PolicyError) as e:
        validate_overrides({"learning_rate": EXPLOIT, "dataset_dir": "/x", "batch_size": 4}, TUNABLES)
    assert "'learning_rate'" in str(e.value) and "'dataset_dir'" in str(e.value) and "'batch_size'" not in str(e.value)
    with pytest.raises(PolicyError, match="must be a mapping"):
        validate_overrides([("learning_rate", 1)], TUNABLES)


@pytest.mark.parametrize("bundle", [BUNDLE, CLS_BUNDLE])
def test_each_bundle_lists_tunables_its_configs_define_with_defaults_that_pass(bundle):
    from monai.bundle import ConfigParser

    tunables = load_tunables(bundle)
    assert {"learning_rate", "batch_size", "seed", "amp_ratio", "wp_alpha", "prrfl_alpha1"} <= set(tunables)
    parser = ConfigParser()
    parser.read_config([str(bundle / f) for f in ("configs/train.json", "configs/harmofl.json", "configs/prrfl.json")])
    assert [k for k in tunables if k not in parser] == []  # no tunable names an id the bundle lacks
    for key, tunable in tunables.items():
        default = parser[key]
        if not (isinstance(default, str) and default[:1] in "$@%"):  # computed defaults (e.g. image_size by task)
            assert tunable.check(default) is None, (key, default)


def test_the_tiny_test_overrides_are_tunable():
    assert validate_overrides(TINY_OVERRIDES, load_tunables(BUNDLE)) == TINY_OVERRIDES


def _copy_bundle(tmp_path, name="prostate_mri_seg"):
    root = tmp_path / "installed"
    shutil.copytree(BUNDLE, root / name, ignore=shutil.ignore_patterns("models", "eval"))
    return root, root / name


def test_the_digest_covers_the_configs_and_nothing_else(tmp_path):
    root, bundle = _copy_bundle(tmp_path)
    digest = bundle_digest(bundle)
    assert digest == bundle_digest(BUNDLE) and digest.startswith("sha256:")
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"weights")  # trained weights do not change what runs
    (bundle / "docs" / "README.md").write_text("edited")
    assert bundle_digest(bundle) == digest
    train = bundle / "configs" / "train.json"
    train.write_text(train.read_text().replace('"learning_rate": 0.002', '"learning_rate": 0.003'))
    assert bundle_digest(bundle) != digest


def test_the_installed_bundle_must_match_the_version_and_digest_the_job_expects(tmp_path):
    root, bundle = _copy_bundle(tmp_path)
    version, digest = bundle_version(bundle), bundle_digest(bundle)
    assert resolve_installed_bundle("prostate_mri_seg", version, digest, root=root) == bundle
    assert resolve_installed_bundle("prostate_mri_seg", version, root=root) == bundle
    with pytest.raises(PolicyError, match=f"the job expects version 9.9.9, this site has {version}"):
        resolve_installed_bundle("prostate_mri_seg", "9.9.9", digest, root=root)
    with pytest.raises(PolicyError) as e:
        resolve_installed_bundle("prostate_mri_seg", version, "sha256:" + "0" * 64, root=root)
    assert "sha256:" + "0" * 64 in str(e.value) and digest in str(e.value)  # both named
    with pytest.raises(PolicyError, match="no version or digest"):
        resolve_installed_bundle("prostate_mri_seg", root=root)
    with pytest.raises(PolicyError, match="is not installed at this site"):
        resolve_installed_bundle("image_classification", "0.1.0", root=root)
    for bad in ("../prostate_mri_seg", "/etc", "..", "a/b"):
        with pytest.raises(PolicyError, match="not a plain folder name"):
            resolve_installed_bundle(bad, version, root=root)


def test_site_bundle_root_comes_from_the_site_environment(tmp_path, monkeypatch):
    from fedharmony.bundle.job_policy import BUNDLE_ROOT_ENV, site_bundle_root

    monkeypatch.delenv(BUNDLE_ROOT_ENV, raising=False)
    assert site_bundle_root() == REPO / "bundles"  # the checkout the package is installed from
    root, _ = _copy_bundle(tmp_path)
    monkeypatch.setenv(BUNDLE_ROOT_ENV, str(root))
    assert site_bundle_root() == root
    monkeypatch.setenv(BUNDLE_ROOT_ENV, str(tmp_path / "missing"))
    with pytest.raises(PolicyError, match="is set but is not a folder"):
        site_bundle_root()


def test_config_files_must_be_configs_of_the_installed_bundle():
    assert check_config_files(BUNDLE, ["configs/train.json", "configs/harmofl.json"]) == [
        "configs/train.json", "configs/harmofl.json"]
    for bad in (["configs/../../../etc/passwd.json"], ["/tmp/evil.json"], ["configs/missing.json"],
                ["train.json"], [], ["configs/train.json", {"_target_": "x"}]):
        with pytest.raises(PolicyError, match="are not configs of the installed bundle"):
            check_config_files(BUNDLE, bad)


def test_a_job_copy_of_the_bundle_must_equal_the_installed_one(tmp_path):
    _, copy = _copy_bundle(tmp_path)
    check_job_copy(copy, BUNDLE)  # identical: fine (it is not parsed anyway)
    check_job_copy(tmp_path / "absent", BUNDLE)  # no copy: fine
    train = copy / "configs" / "train.json"
    config = json.loads(train.read_text())
    config["learning_rate"] = EXPLOIT
    train.write_text(json.dumps(config))
    with pytest.raises(PolicyError, match="carries its own copy of bundle 'prostate_mri_seg'.*differs"):
        check_job_copy(copy, BUNDLE)


def test_errors_that_leave_a_site_carry_no_absolute_path():
    message = ("SiteDataError: /data/hospital/prostate/case_07.nii.gz is corrupt; state in "
               "/srv/nvflare/site-1/job-3/fedharmony/site_state.pt; see /opt/secret/config.yaml, "
               "https://docs.example.org/a/b")
    out = redact_paths(message, {"<data>": "/data/hospital/prostate", "<run>": "/srv/nvflare/site-1/job-3"})
    assert out == ("SiteDataError: <data>/case_07.nii.gz is corrupt; state in <run>/fedharmony/site_state.pt; "
                   "see <path>/config.yaml, https://docs.example.org/a/b")
    assert redact_paths("no path here", {"<data>": ""}) == "no path here"


def test_the_job_builder_refuses_what_a_site_would_refuse(tmp_path):
    from fedharmony.fl.job import FedHarmonyRecipe

    with pytest.raises(ValueError, match="override 'learning_rate': the value starts with '\\$'"):
        FedHarmonyRecipe(bundle_dir=str(BUNDLE), ship_code=False, overrides={"learning_rate": EXPLOIT})
    with pytest.raises(ValueError, match="override 'dataset_dir': a path on the site's disk"):
        FedHarmonyRecipe(bundle_dir=str(BUNDLE), ship_code=False, overrides={"dataset_dir": "/etc"})
    with pytest.raises(ValueError, match="data_root with ship_code=False"):
        FedHarmonyRecipe(bundle_dir=str(BUNDLE), ship_code=False, data_root=str(tmp_path))
    # research mode (the job ships its code anyway) keeps accepting expressions
    FedHarmonyRecipe(bundle_dir=str(BUNDLE), ship_code=True, overrides={"learning_rate": "$0.001 * 2"})
    # ... but a plain value on a tunable id is still checked when the job is built, not first on the sites
    with pytest.raises(PolicyError, match="override 'optimizer_name': must be one of"):
        FedHarmonyRecipe(bundle_dir=str(BUNDLE), ship_code=True, overrides={"optimizer_name": "sgdd"})


def test_the_job_script_refuses_a_code_override_for_a_no_code_job(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "jobs" / "prostate.py"), "--no-custom-code", "--override",
                          json.dumps({"learning_rate": EXPLOIT}), "--export", "--export-dir", str(tmp_path / "j")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and "override 'learning_rate'" in res.stderr and "starts with '$'" in res.stderr
    assert not (tmp_path / "j").exists()


@pytest.mark.parametrize("algorithm", [m for m in METHODS if SPECS[m].no_code])
def test_a_no_code_job_carries_no_configs_and_names_only_allow_listed_classes(algorithm, tmp_path):
    from fedharmony.fl import SERVER_COMPONENTS, SITE_COMPONENTS
    from fedharmony.fl.job import FedHarmonyRecipe

    recipe = FedHarmonyRecipe(algorithm=algorithm, bundle_dir=str(BUNDLE), ship_code=False,
                              overrides=dict(TINY_OVERRIDES), name="j")
    recipe.export(str(tmp_path))
    app = tmp_path / "j" / "app"
    assert sorted(p.name for p in (app / "config").iterdir()) == ["config_fed_client.json", "config_fed_server.json"]
    assert not (app / "custom").exists()
    client = json.loads((app / "config" / "config_fed_client.json").read_text())
    server = json.loads((app / "config" / "config_fed_server.json").read_text())

    def paths(node):
        if isinstance(node, dict):
            yield from ([node["path"]] if isinstance(node.get("path"), str) else [])
            for v in node.values():
                yield from paths(v)
        elif isinstance(node, list):
            for v in node:
                yield from paths(v)

    assert {p for p in paths(client) if p.startswith("fedharmony")} <= set(SITE_COMPONENTS)
    assert {p for p in paths(server) if p.startswith("fedharmony")} <= set(SERVER_COMPONENTS)
    args = client["executors"][0]["executor"]["args"]
    assert args["bundle_name"] == "prostate_mri_seg" and args["bundle_version"] == bundle_version(BUNDLE)
    assert args["bundle_digest"] == bundle_digest(BUNDLE) and not args.get("bundle_root")
