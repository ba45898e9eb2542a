"""The IOP-FL model pool is data: its manifest is validated, its files checked by digest, before anything is built."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import BUNDLE, REPO, TINY_OVERRIDES
from fedharmony.bundle.networks import build_network
from fedharmony.methods.iopfl.model_pool import (FORMAT, PoolError, file_digest, load_pool, read_manifest,
                                                 stamp_pool, validate_manifest, write_pool)

MARKER_EXPRESSION = "$__import__('pathlib').Path({marker!r}).write_text('ran') and 4"


def _write_pool(path, n=3, overrides=TINY_OVERRIDES):
    experts = [build_network(str(BUNDLE), overrides=overrides, seed=s).state_dict() for s in range(n)]
    personalized = {f"site-{i + 1}": sd for i, sd in enumerate(experts[:-1])}
    write_pool(path, experts[-1], personalized, overrides=overrides, info={"site-1": {"data": "BIDMC"}})
    return path


def _edit_manifest(pool, edit):
    path = pool / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture
def pool(tmp_path):
    return _write_pool(tmp_path / "pool")


def test_a_written_pool_records_each_files_digest_and_loads(pool):
    manifest = read_manifest(pool)
    assert manifest["format"] == FORMAT
    assert [e["sha256"] for e in manifest["experts"]] == [file_digest(pool / e["file"]) for e in manifest["experts"]]
    assert manifest["experts"][0]["data"] == "BIDMC"
    loaded = load_pool(pool, BUNDLE)
    assert loaded.names == ["site-1", "site-2", "global"] and loaded.kinds[-1] == "global"
    for net, name in zip(loaded.experts, loaded.names):
        stored = torch.load(pool / f"{name}.pt", weights_only=True)
        assert all(torch.equal(v, stored[k]) for k, v in net.state_dict().items())


def test_the_reported_exploit_is_refused_by_the_bundle_cli_and_runs_nothing(pool, tiny_sites, tmp_path):
    """The issue's exploit: a MONAI expression in the manifest's overrides, run through routed_inference.json."""
    marker = tmp_path / "marker"
    _edit_manifest(pool, lambda m: m["overrides"].update(base_features=MARKER_EXPRESSION.format(marker=str(marker))))
    out = tmp_path / "masks"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
           str(BUNDLE / "configs" / "routed_inference.json"), "--bundle_root", str(BUNDLE), "--pool_dir", str(pool),
           "--dataset_dir", str(tiny_sites / "BIDMC"), "--output_dir", str(out), "--method", "global"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    log = res.stdout + res.stderr
    assert res.returncode != 0, log[-2000:]
    assert not marker.exists()
    assert f"model pool {pool}: manifest 'overrides' refused: override 'base_features'" in log, log[-2000:]
    assert "starts with '$'" in log
    assert not list(out.glob("*_seg.nii.gz"))


@pytest.mark.parametrize("overrides, reason", [
    ({"base_features": "$4"}, "starts with '$'"),
    ({"base_features": "@image_size"}, "starts with '@'"),
    ({"base_features": "%configs/train.json#base_features"}, "starts with '%'"),
    ({"network_def": {"_target_": "torch.nn.Identity"}}, "nested config"),
    ({"dataset_dir": "/"}, "a path on the site's disk"),
    ({"not_a_tunable": 1}, "not on this bundle's list of tunables"),
    ({"base_features": -3}, "must be >= 1"),
])
def test_manifest_overrides_pass_the_no_code_allow_list(pool, overrides, reason):
    _edit_manifest(pool, lambda m: m["overrides"].update(overrides))
    with pytest.raises(PoolError, match=f"model pool .*pool: manifest 'overrides' refused: .*{re.escape(reason)}"):
        load_pool(pool, BUNDLE)


@pytest.mark.parametrize("config_file", ["../prostate_mri_seg/configs/train.json", "configs/../configs/train.json",
                                         str(BUNDLE / "configs" / "train.json"), "/etc/hostname",
                                         "configs/no_such_config.json", "configs/train.json\n"])
def test_config_files_must_be_configs_of_the_installed_bundle(pool, config_file):
    _edit_manifest(pool, lambda m: m.update(config_files=[config_file]))
    with pytest.raises(PoolError, match="manifest 'config_files' refused: .*not configs of the installed bundle"):
        validate_manifest(pool, BUNDLE)


@pytest.mark.parametrize("file", ["../global.pt", "/etc/hostname", "sub/site-1.pt", "..", ".hidden.pt"])
def test_expert_files_must_lie_inside_the_pool_folder(pool, file):
    _edit_manifest(pool, lambda m: m["experts"][0].update(file=file))
    with pytest.raises(PoolError, match=r"expert 'site-1': file .* is not a plain file name inside the pool"):
        load_pool(pool, BUNDLE)


def test_an_expert_file_that_is_a_link_out_of_the_pool_is_refused(pool, tmp_path):
    outside = tmp_path / "elsewhere.pt"
    outside.write_bytes((pool / "site-1.pt").read_bytes())
    (pool / "site-1.pt").unlink()
    os.symlink(outside, pool / "site-1.pt")
    with pytest.raises(PoolError, match="expert 'site-1': file 'site-1.pt' leads out of the pool folder"):
        load_pool(pool, BUNDLE)


def test_a_swapped_truncated_or_missing_file_is_named(pool):
    one, two = (pool / "site-1.pt").read_bytes(), (pool / "site-2.pt").read_bytes()
    (pool / "site-1.pt").write_bytes(two)
    (pool / "site-2.pt").write_bytes(one)
    with pytest.raises(PoolError, match="expert 'site-1': .*site-1.pt does not match its digest in the manifest"):
        load_pool(pool, BUNDLE)
    (pool / "site-1.pt").write_bytes(one)
    (pool / "site-2.pt").write_bytes(two[: len(two) // 2])
    with pytest.raises(PoolError, match="expert 'site-2': .*changed, swapped or truncated"):
        load_pool(pool, BUNDLE)
    (pool / "site-2.pt").unlink()
    with pytest.raises(PoolError, match="expert 'site-2': file .*site-2.pt is missing"):
        load_pool(pool, BUNDLE)


def test_weights_are_checked_after_the_digest(tmp_path):
    """A pool written faithfully from bad weights: the digests match, the weights are still refused."""
    good = build_network(str(BUNDLE), overrides=TINY_OVERRIDES, seed=0).state_dict()
    poisoned = {k: v.clone() for k, v in good.items()}
    key = next(k for k, v in poisoned.items() if v.is_floating_point())
    poisoned[key][...] = float("nan")
    write_pool(tmp_path / "nan", good, {"site-1": poisoned}, overrides=TINY_OVERRIDES)
    with pytest.raises(PoolError, match="site-1.*NaN/Inf"):
        load_pool(tmp_path / "nan", BUNDLE)
    wide = build_network(str(BUNDLE), overrides={**TINY_OVERRIDES, "base_features": 8}).state_dict()
    write_pool(tmp_path / "wide", wide, {"site-1": wide}, overrides=TINY_OVERRIDES)
    with pytest.raises(PoolError, match="does not fit the bundle's network_def"):
        load_pool(tmp_path / "wide", BUNDLE)
    with pytest.raises(PoolError, match="no manifest.json"):
        load_pool(tmp_path, BUNDLE)
    with pytest.raises(PoolError, match="at least one personalized"):
        write_pool(tmp_path / "p2", wide, {})


@pytest.mark.parametrize("edit, reason", [
    (lambda m: m.update(format="fedharmony-model-pool/9"), "format 'fedharmony-model-pool/9' is not one"),
    (lambda m: m.update(python="print('x')"), r"unknown manifest keys \['python'\]"),
    (lambda m: m["experts"][0].update(data={"_target_": "os.system"}), "expert 'site-1': unexpected entries"),
    (lambda m: m["experts"][0].pop("sha256"), "expert 'site-1' has no valid 'sha256'"),
    (lambda m: m["experts"][1].update(name="site-1"), "expert name 'site-1' is not a plain, unique name"),
    (lambda m: m["experts"].reverse(), "exactly one global model"),
    (lambda m: m.update(job={"cmd": ["rm"]}), "'job' must be an object of plain values"),
])
def test_a_malformed_manifest_is_named(pool, edit, reason):
    _edit_manifest(pool, edit)
    with pytest.raises(PoolError, match=reason):
        read_manifest(pool)


def test_a_pool_without_digests_is_refused_until_its_owner_restamps_it(pool, tmp_path):
    def as_format_1(m):
        m["format"] = "fedharmony-model-pool/1"
        for e in m["experts"]:
            e.pop("sha256")

    _edit_manifest(pool, as_format_1)
    with pytest.raises(PoolError, match="records no digest .* re-stamp it: python tools/model_pool.py stamp"):
        load_pool(pool, BUNDLE)
    stamp_pool(pool, BUNDLE)
    assert read_manifest(pool)["format"] == FORMAT
    assert load_pool(pool, BUNDLE).names == ["site-1", "site-2", "global"]

    marker = tmp_path / "marker"
    _edit_manifest(pool, lambda m: m["overrides"].update(base_features=MARKER_EXPRESSION.format(marker=str(marker))))
    before = (pool / "manifest.json").read_text()
    with pytest.raises(PoolError, match="manifest 'overrides' refused"):  # stamping checks everything else first
        stamp_pool(pool, BUNDLE)
    assert (pool / "manifest.json").read_text() == before and not marker.exists()


def test_the_model_pool_tool_checks_and_stamps(pool):
    tool = [sys.executable, str(REPO / "tools" / "model_pool.py")]
    res = subprocess.run(tool + ["check", str(pool), "--bundle", str(BUNDLE)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "3 experts (site-1, site-2, global)" in res.stdout and "digests match" in res.stdout
    (pool / "global.pt").write_bytes(b"not a checkpoint")
    res = subprocess.run(tool + ["check", str(pool), "--bundle", str(BUNDLE)], capture_output=True, text=True)
    assert res.returncode == 1 and "expert 'global'" in res.stderr and "does not match its digest" in res.stderr
    res = subprocess.run(tool + ["stamp", str(pool), "--bundle", str(BUNDLE)], capture_output=True, text=True)
    assert res.returncode == 1 and "expert 'global': cannot read" in res.stderr  # stamps only loadable experts


def test_a_pool_of_three_class_experts_routes_three_classes_and_needs_a_name_for_each(tmp_path):
    """The pool's manifest says how many classes its experts give (num_classes 3: grey and white matter); routed
    inference names each class in its results, so the default single segment name is refused before any input."""
    from monai.bundle import ConfigParser

    pool = _write_pool(tmp_path / "pool", overrides={**TINY_OVERRIDES, "num_classes": 3})
    loaded = load_pool(pool, BUNDLE)
    assert loaded.num_classes == 3
    assert all(net(torch.zeros(1, 3, 32, 32)).shape[1] == 3 for net in loaded.experts)
    assert load_pool(_write_pool(tmp_path / "pool2", n=2), BUNDLE).num_classes == 2
    # no override: the classes and intensity scheme are the bundle's own (a bundle whose training says 3, released)
    three = tmp_path / "bundle3"
    shutil.copytree(BUNDLE, three, ignore=shutil.ignore_patterns("models", "eval", "__pycache__"))
    train = json.loads((three / "configs" / "train.json").read_text())
    (three / "configs" / "train.json").write_text(json.dumps({**train, "num_classes": 3, "intensity": "released"}))
    experts = [build_network(str(three), overrides=TINY_OVERRIDES, seed=s).state_dict() for s in range(2)]
    write_pool(tmp_path / "pool3", experts[-1], {"site-1": experts[0]}, overrides=TINY_OVERRIDES)
    loaded = load_pool(tmp_path / "pool3", three)
    assert (loaded.num_classes, loaded.intensity, loaded.image_size) == (3, "released", -1)

    def results_step(segments=None):
        parser = ConfigParser()
        parser.read_config(BUNDLE / "configs" / "routed_inference.json")
        (tmp_path / "in").mkdir(exist_ok=True)
        parser.update({"bundle_root": str(BUNDLE), "pool_dir": str(pool), "dataset_dir": str(tmp_path / "in"),
                       "output_dir": str(tmp_path / "out"), **({"segments": segments} if segments else {})})
        return [t for t in parser.get_parsed_content("postprocessing").transforms
                if type(t).__name__ == "SaveResultsd"][0]

    with pytest.raises(Exception) as refused:  # MONAI wraps the transform's error in its own
        results_step()
    chain = [refused.value]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    assert any("segments names labels [1], but the network has num_classes 3" in str(e) for e in chain), chain
    assert results_step({"1": "peripheral zone", "2": "transition zone"}).segments == {
        1: "peripheral zone", 2: "transition zone"}
