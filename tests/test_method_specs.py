"""Each method's one declaration (``SPEC``) and everything generated from it, checked over the registry:
a method added tomorrow is checked by these tests without touching them."""

import inspect
import json
import math
from pathlib import Path

import pytest

from fedharmony.methods import METHODS, REGISTRY, SPECS, method_table, recipe_class, site_method_class
from fedharmony.methods.spec import MethodSpec, Setting

REPO = Path(__file__).resolve().parents[1]
BUNDLES = {"segmentation": REPO / "bundles" / "prostate_mri_seg",
           "classification": REPO / "bundles" / "image_classification"}
SETTINGS = [(m, s) for m in METHODS for s in SPECS[m].settings]


def test_the_registry_is_the_specs_of_its_packages_in_order():
    assert METHODS == REGISTRY and list(SPECS) == list(REGISTRY)
    assert {p.name for p in (REPO / "custom" / "fedharmony" / "methods").iterdir()
            if (p / "__init__.py").is_file()} == set(REGISTRY)  # no method package outside the registry


@pytest.mark.parametrize("name", METHODS)
def test_a_spec_names_its_site_class_and_recipe_and_the_site_takes_exactly_its_site_settings(name):
    spec = SPECS[name]
    site = site_method_class(name)
    assert site.name == name and site.spec is spec
    assert recipe_class(name).method == name
    params = [p for p in inspect.signature(site.__init__).parameters if p != "self"]
    assert params == [s.name for s in spec.settings if s.goes_to == "site"]
    for s in spec.settings:  # a site default and the declared default are one value
        if s.goes_to == "site":
            assert inspect.signature(site.__init__).parameters[s.name].default == s.default


@pytest.mark.parametrize("name", METHODS)
def test_the_server_allow_list_holds_every_component_a_spec_names(name):
    import importlib

    from fedharmony.fl import SERVER_COMPONENTS

    for dotted in SPECS[name].server_components:
        module, _, cls = dotted.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), cls), type)
        assert dotted in SERVER_COMPONENTS


@pytest.mark.parametrize("name, setting", SETTINGS, ids=[f"{m}-{s.name}" for m, s in SETTINGS])
def test_each_setting_accepts_its_default_and_refuses_wrong_types_and_values_outside_its_range(name, setting):
    if setting.default is not None:
        assert setting.check(setting.default) == setting.default
    wrong = {float: "0.1", int: 1.5, str: 3, bool: 1}[setting.type]
    with pytest.raises(ValueError, match=setting.name):
        setting.check(wrong)
    if setting.type in (int, float):
        with pytest.raises(ValueError, match=setting.name):
            setting.check(True)  # a bool is not a number here
        if setting.type is float:
            with pytest.raises(ValueError, match=setting.name):
                setting.check(math.nan)
        for bound, exclusive, step in ((setting.minimum, setting.exclusive_minimum, -1),
                                       (setting.maximum, setting.exclusive_maximum, 1)):
            if bound is not None:
                outside = bound if exclusive else bound + step * (setting.multiple_of or (1 if setting.type is int
                                                                                         else 1e-6))
                with pytest.raises(ValueError, match=setting.name):
                    setting.check(setting.type(outside))
    if setting.choices:
        with pytest.raises(ValueError, match=setting.name):
            setting.check("not-" + setting.choices[0])


@pytest.mark.parametrize("name, setting", [(m, s) for m, s in SETTINGS if s.goes_to == "bundle"],
                         ids=[f"{m}-{s.name}" for m, s in SETTINGS if s.goes_to == "bundle"])
def test_a_bundle_setting_is_a_tunable_of_every_bundle_the_method_trains_with_a_range_inside_it(name, setting):
    """The job builder checks a bundle setting against the bundle's tunables too: the spec may narrow them,
    never widen them (a value the flag accepts must not be refused later by the bundle)."""
    for kind in SPECS[name].bundle_kinds:
        tunables = json.loads((BUNDLES[kind] / "configs" / "tunables.json").read_text())
        assert setting.name in tunables, f"{BUNDLES[kind].name} has no tunable {setting.name}"
        t = tunables[setting.name]
        if setting.choices:
            assert set(setting.choices) <= set(t["choices"])
        if setting.minimum is not None:
            low = t.get("minimum", t.get("exclusive_minimum"))
            assert low is None or setting.minimum >= low
        if setting.maximum is not None:
            assert t.get("maximum") is None or setting.maximum <= t["maximum"]


def test_the_job_scripts_have_one_flag_per_setting_with_the_settings_name():
    import argparse

    from fedharmony.fl.cli import add_method_flags

    parser = argparse.ArgumentParser()
    add_method_flags(parser)
    flags = {a.option_strings[0]: a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    assert flags == {s.flag: s.name for _, s in SETTINGS}


@pytest.mark.parametrize("name", METHODS)
def test_the_recipe_sends_each_setting_where_its_spec_says(name):
    """Every setting given a non-default valid value reaches the sites, the bundle overrides or the
    recipe's server side, under its own name."""
    spec = SPECS[name]
    bundle = str(BUNDLES[spec.bundle_kinds[0]])
    tied = {"image_size": 64, "prrfl_r0": 0.6, "prrfl_r1": 0.9}  # a multiple of 16; r0 <= r1
    given = {}
    for s in spec.settings:
        if s.name in tied:
            given[s.name] = tied[s.name]
        elif s.type is bool:
            given[s.name] = not s.default
        elif s.choices:
            given[s.name] = s.choices[-1]
        else:
            given[s.name] = s.type(s.minimum + (0.5 if s.type is float else 1)) if s.minimum is not None else 1
    recipe = recipe_class(name)(bundle_dir=bundle, num_rounds=1, **given)
    site_settings, overrides = recipe.site_settings(), recipe.overrides
    for s in spec.settings:
        assert recipe.settings[s.name] == given[s.name]
        if s.goes_to == "site":
            assert site_settings[s.name] == given[s.name]
        elif s.goes_to == "bundle":
            assert overrides[s.name] == given[s.name]
        else:
            assert s.name not in site_settings and s.name not in overrides


def test_a_method_runs_only_on_the_bundle_kinds_and_sites_its_spec_declares(monkeypatch):
    from fedharmony.fl.recipe import bundle_kind
    from fedharmony.methods.fedavg.server import FedAvgRecipe

    assert bundle_kind(str(BUNDLES["segmentation"])) == "segmentation"
    assert bundle_kind(str(BUNDLES["classification"])) == "classification"
    narrow = MethodSpec(name="fedavg", summary="-", site=SPECS["fedavg"].site, recipe=SPECS["fedavg"].recipe,
                        bundle_kinds=("segmentation",), no_code=False)
    monkeypatch.setitem(SPECS, "fedavg", narrow)
    with pytest.raises(ValueError, match="fedavg trains segmentation bundles; .* is a classification bundle"):
        FedAvgRecipe(bundle_dir=str(BUNDLES["classification"]))
    with pytest.raises(ValueError, match="cannot run on sites without job code"):
        FedAvgRecipe(bundle_dir=str(BUNDLES["segmentation"]), ship_code=False)


def test_a_spec_refuses_settings_it_cannot_describe():
    with pytest.raises(TypeError, match="type must be"):
        Setting("x", list)
    with pytest.raises(ValueError, match="goes_to"):
        Setting("x", float, goes_to="client")
    with pytest.raises(ValueError, match="must be > 0, got 0"):
        Setting("x", float, 0, minimum=0, exclusive_minimum=True)  # a default outside its own range
    with pytest.raises(ValueError, match="declared twice"):
        MethodSpec("m", "-", "a.B", "a.C", settings=(Setting("x", float), Setting("x", int)))


def test_the_docs_method_table_is_the_generated_one():
    """docs/architecture.md carries ``python -m fedharmony methods``'s table; regenerate it when a spec changes."""
    text = (REPO / "docs" / "architecture.md").read_text()
    start, end = "<!-- method table: python -m fedharmony methods -->\n", "\n<!-- end of method table -->"
    assert start in text and end in text
    assert text.split(start, 1)[1].split(end, 1)[0] == method_table()


@pytest.mark.parametrize("name, kind", [(m, k) for m in METHODS for k in SPECS[m].bundle_kinds],
                         ids=[f"{m}-{k}" for m in METHODS for k in SPECS[m].bundle_kinds])
def test_each_method_builds_a_job_for_every_bundle_kind_it_declares(name, kind, tmp_path):
    """The overlay the method layers on train.json exists in that bundle, and the job exports with it."""
    site = site_method_class(name)
    if site.overlay:
        assert (BUNDLES[kind] / site.overlay).is_file(), f"{BUNDLES[kind].name} has no {site.overlay}"
    recipe = recipe_class(name)(bundle_dir=str(BUNDLES[kind]), num_rounds=1, name="j")
    recipe.export(str(tmp_path))
    client = json.loads((tmp_path / "j" / "app" / "config" / "config_fed_client.json").read_text())
    args = client["executors"][0]["executor"]["args"]
    assert args.get("method", "fedavg") == name  # NVFlare leaves out an argument equal to its default
    assert args["config_files"] == recipe.config_files


def test_the_site_runner_implements_the_contract_a_method_sees():
    """Every member of :class:`SiteContract` is a method or an attribute the site runner sets (read from its source:
    building a site needs data; ``tests/test_bundle.py`` checks a real one with ``isinstance``)."""
    import ast

    from fedharmony.bundle.site import BundleSite
    from fedharmony.methods.contract import CONTRACT_ATTRIBUTES, CONTRACT_METHODS, SiteContract

    for m in CONTRACT_METHODS:
        assert callable(getattr(BundleSite, m)), m
        assert list(inspect.signature(getattr(BundleSite, m)).parameters) == \
            list(inspect.signature(getattr(SiteContract, m)).parameters), m
    tree = ast.parse(inspect.getsource(BundleSite))
    assigned = {t.attr for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    assert set(CONTRACT_ATTRIBUTES) <= assigned, set(CONTRACT_ATTRIBUTES) - assigned


def test_a_new_method_is_one_package_and_one_registry_line(tmp_path):
    """What ``methods/base.py`` promises, done: a copy of the package gets a method ``fedtest`` (its package and one
    line in ``REGISTRY``, nothing else), and its flag, validation, site settings, allow-list and table row follow."""
    import shutil
    import subprocess
    import sys

    pkg = tmp_path / "fedharmony"
    shutil.copytree(REPO / "custom" / "fedharmony", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    new = pkg / "methods" / "fedtest"
    new.mkdir()
    (new / "__init__.py").write_text(
        '"""A test method: FedAvg with a setting."""\n'
        "from fedharmony.methods.spec import MethodSpec, Setting\n\n"
        'SPEC = MethodSpec(name="fedtest", summary="FedAvg with a test setting", '
        'site="fedharmony.methods.fedtest.site.FedTestSite", recipe="fedharmony.methods.fedtest.server.FedTestRecipe", '
        'settings=(Setting("fedtest_beta", float, 0.5, "a test setting", minimum=0.0, maximum=1.0),))\n')
    (new / "site.py").write_text(
        "from fedharmony.methods.base import SiteMethod\nfrom fedharmony.methods.fedtest import SPEC\n\n\n"
        "class FedTestSite(SiteMethod):\n"
        '    name = "fedtest"\n    spec = SPEC\n\n'
        "    def __init__(self, fedtest_beta: float = 0.5):\n"
        "        super().__init__()\n"
        '        self.beta = SPEC.setting("fedtest_beta").check(fedtest_beta)\n')
    (new / "server.py").write_text(
        "from fedharmony.fl.recipe import BundleRecipe\n\n\nclass FedTestRecipe(BundleRecipe):\n"
        '    method = "fedtest"\n')
    registry = pkg / "methods" / "__init__.py"
    text = registry.read_text()
    assert text.count('    "scaffold",\n)') == 1
    registry.write_text(text.replace('    "scaffold",\n)', '    "scaffold",\n    "fedtest",\n)'))

    check = f"""
import argparse
from fedharmony.methods import METHODS, method_table, make_site_method
from fedharmony.fl.cli import add_method_flags
from fedharmony.fl.job import FedHarmonyRecipe
assert METHODS[-1] == "fedtest"
p = argparse.ArgumentParser(); add_method_flags(p)
assert p.parse_args(["--fedtest-beta", "0.7"]).fedtest_beta == 0.7
recipe = FedHarmonyRecipe("fedtest", bundle_dir={str(BUNDLES['segmentation'])!r}, fedtest_beta=0.7)
assert recipe.site_settings() == {{"fedtest_beta": 0.7}}
assert make_site_method("fedtest", recipe.site_settings()).beta == 0.7
try:
    FedHarmonyRecipe("fedtest", bundle_dir={str(BUNDLES['segmentation'])!r}, fedtest_beta=2.0)
    raise SystemExit("not refused")
except ValueError as e:
    assert "fedtest_beta must be in [0, 1], got 2.0" in str(e), e
assert "| fedtest | FedAvg with a test setting |" in method_table()
print("ok")
"""
    res = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]
