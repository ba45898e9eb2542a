#!/usr/bin/env python
"""The package's import graph, read from the source (nothing is imported): cycles and layer breaks.

    python tools/import_graph.py            # prints every import cycle and every import across a layer; exit 1 if any

Every ``import`` / ``from ... import`` of a ``fedharmony`` module counts, at module level or inside a
function, under ``if TYPE_CHECKING`` or not: an import moved into a function to dodge a cycle at run
time is still a circle a reader has to follow. ``from fedharmony.x import y`` is an edge to the module
``fedharmony.x.y`` when that is a module, else to ``fedharmony.x``. A package's implicit import of its
parents is not an edge.

Layers (:data:`LAYERS`): a module may import its own layer and the ones below it. ``tests/test_imports.py``
fails on any cycle and any layer break.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Dict, List, Set

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "custom" / "fedharmony"

# lowest first; the most specific pattern that matches a module names its layer: a prefix of the dotted name,
# ``=name`` for that module alone, or ``*.server`` for the methods' NVFlare side
LAYERS = (
    ("core", ("fedharmony.core", "=fedharmony")),  # the root package: its version and a logging filter
    ("data", ("fedharmony.data",)),
    ("bundle", ("fedharmony.bundle",)),  # transforms, losses, inferers, results, job policy ...
    ("methods", ("fedharmony.methods",)),  # the methods' math and site side (their server.py: "fl")
    ("site runner", ("fedharmony.bundle.site",)),
    ("fl", ("fedharmony.fl", "*.server")),
    ("tools", ("fedharmony.phantom", "fedharmony.study", "fedharmony.__main__")),
)


def modules(package_dir: Path = PACKAGE_DIR) -> Dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under the package (a package is its ``__init__``)."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def import_graph(package_dir: Path = PACKAGE_DIR) -> Dict[str, Set[str]]:
    """Module -> the package modules it imports (see the module docstring for what counts)."""
    mods = modules(package_dir)
    root = package_dir.name

    def resolve(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package
                    pkg = name if is_package else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        pkg = pkg.rpartition(".")[0]
                    base = pkg + ("." + base if base else "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for target in targets:
                if target == root or target.startswith(root + "."):
                    found = resolve(target)
                    if found and found != name:
                        graph[name].add(found)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    counter = [0]

    def visit(v: str):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def layer_of(module: str) -> int:
    """The index in :data:`LAYERS` of the most specific pattern that matches ``module``."""
    best, best_len = None, -1
    for i, (_, patterns) in enumerate(LAYERS):
        for p in patterns:
            if p.startswith("="):
                hit, length = module == p[1:], 10 ** 7  # one module: beats everything
            elif p.startswith("*"):
                hit, length = module.endswith(p[1:]), 10 ** 6  # the .server suffix beats any prefix
            else:
                hit, length = module == p or module.startswith(p + "."), len(p)
            if hit and length > best_len:
                best, best_len = i, length
    if best is None:
        raise ValueError(f"{module} is in no layer of tools/import_graph.py LAYERS")
    return best


def layer_breaks(graph: Dict[str, Set[str]]) -> List[str]:
    """``a -> b`` for every import of a higher layer than the importer's."""
    out = []
    for a in sorted(graph):
        for b in sorted(graph[a]):
            if layer_of(b) > layer_of(a):
                out.append(f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})")
    return out


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    graph = import_graph()
    found, breaks = cycles(graph), layer_breaks(graph)
    print(f"{len(graph)} modules, {sum(map(len, graph.values()))} imports between them")
    for c in found:
        inside = "; ".join(f"{a} -> {', '.join(sorted(b for b in graph[a] if b in c))}" for a in c)
        print(f"cycle: {inside}")
    for b in breaks:
        print(f"layer break: {b}")
    if not found and not breaks:
        print("no cycles, no layer breaks")
    return 1 if found or breaks else 0


if __name__ == "__main__":
    sys.exit(main())
