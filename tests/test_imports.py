"""The package's import graph: no cycles, no import of a higher layer, and each subpackage imports alone."""

import subprocess
import sys

import pytest

from import_graph import LAYERS, cycles, import_graph, layer_breaks, layer_of  # tools/ (conftest)

SUBPACKAGES = ("core", "data", "bundle", "methods", "fl", "study", "phantom")


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 50 and "fedharmony.bundle.site" in graph["fedharmony.fl.executor"]  # it read the source
    found = cycles(graph)
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_no_module_imports_a_higher_layer():
    assert layer_breaks(import_graph()) == []


def test_the_layers_are_the_documented_ones():
    names = [name for name, _ in LAYERS]
    assert names.index("bundle") < names.index("methods") < names.index("site runner") < names.index("fl")
    assert LAYERS[layer_of("fedharmony.methods.prrfl.server")][0] == "fl"  # a method's NVFlare side
    assert LAYERS[layer_of("fedharmony.methods.prrfl.fourier_aggregation")][0] == "methods"
    assert LAYERS[layer_of("fedharmony.bundle.site")][0] == "site runner"
    assert LAYERS[layer_of("fedharmony.bundle.transforms")][0] == "bundle"


def test_the_walk_finds_a_cycle_and_a_layer_break_when_there_is_one(tmp_path):
    pkg = tmp_path / "fedharmony"
    for sub in ("core", "methods", "methods/x"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from fedharmony.core import b\n")
    (pkg / "core" / "b.py").write_text("def f():\n    from fedharmony.core.a import g  # a lazy import is an edge too\n")
    (pkg / "core" / "c.py").write_text("from fedharmony.methods.x import site\n")
    (pkg / "methods" / "x" / "site.py").write_text("from ...core import c\n")  # relative, three levels
    graph = import_graph(pkg)
    assert graph["fedharmony.core.a"] == {"fedharmony.core.b"} and graph["fedharmony.core.b"] == {"fedharmony.core.a"}
    assert graph["fedharmony.methods.x.site"] == {"fedharmony.core.c"}
    assert cycles(graph) == [["fedharmony.core.a", "fedharmony.core.b"],
                             ["fedharmony.core.c", "fedharmony.methods.x.site"]]
    assert layer_breaks(graph) == ["fedharmony.core.c (core) -> fedharmony.methods.x.site (methods)"]


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_each_subpackage_imports_alone_in_a_fresh_interpreter(subpackage):
    res = subprocess.run([sys.executable, "-c", f"import fedharmony.{subpackage}"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
