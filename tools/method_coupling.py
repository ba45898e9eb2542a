#!/usr/bin/env python
"""Where each federated method lives: the package files whose *code* names it (docstrings and comments left out).

    python tools/method_coupling.py            # the working tree
    python tools/method_coupling.py --rev fcb6e96   # any git revision, for a before / after comparison

A method's own subpackage (``fedharmony/methods/<name>/``) is where it should be named; any other
file whose code names it is a seam a change to the method has to cross. The executor and the site
runner (``fl/executor.py``, ``bundle/site.py``; ``bundle_site.py`` before the package was regrouped)
should not use any method's own words ("deputy", "fourier", "fedprox", ...). The study tool and the
phantom generators are left out (they list methods as data).
"""

import argparse
import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "custom/fedharmony"
# method -> the words of its own vocabulary (its name first); its name marks a file as coupled to it, any of
# the words in the executor or site runner counts against them
METHODS = {
    "fedprox": ("fedprox", "proximal", "_mu"),
    "fedbn": ("fedbn",),
    "harmofl": ("harmofl", "global_target", "prime_target"),
    "iopfl": ("iopfl", "personalize_alpha", "ema_update"),
    "prrfl": ("prrfl", "deputy", "fourier"),
    "ditto": ("ditto",),
    "scaffold": ("scaffold",),
}
RUNNERS = ("fl/executor.py", "bundle/site.py", "bundle_site.py")  # the site runner's old place, for --rev


def code_names(source: str):
    """Lower-cased identifiers, attribute names and non-docstring string constants of a module."""
    tree = ast.parse(source)
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.value.lower()
        elif isinstance(node, ast.Name):
            yield node.id.lower()
        elif isinstance(node, ast.Attribute):
            yield node.attr.lower()
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            yield node.name.lower()


def package_files(rev):
    if rev is None:
        return {str(p.relative_to(REPO / PACKAGE)): p.read_text() for p in (REPO / PACKAGE).rglob("*.py")}
    names = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev, PACKAGE], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    return {n[len(PACKAGE) + 1:]: subprocess.run(["git", "show", f"{rev}:{n}"], cwd=REPO, check=True,
                                                 capture_output=True, text=True).stdout
            for n in names if n.endswith(".py")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", help="git revision (default: the working tree)")
    args = p.parse_args(argv)
    files = package_files(args.rev)
    names = {f: list(code_names(src)) for f, src in files.items()}
    print("| method | files whose code names it, outside methods/<name>/ | its words in executor + site runner |")
    print("|---|---|---|")
    for m, words in METHODS.items():
        outside = sorted(f for f, ns in names.items()
                         if not f.startswith(f"methods/{m}/") and not f.startswith("study/")
                         and not f.startswith("phantom/") and any(m in n for n in ns))
        in_runners = sum(n.count(w) for f in RUNNERS if f in names for n in names[f] for w in words)
        print(f"| {m} | {len(outside)}: {', '.join(outside) or '-'} | {in_runners} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
