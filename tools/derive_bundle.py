#!/usr/bin/env python
"""Write (or check) a bundle derived from another: the source's files, with the values its
``derived_from.json`` names replaced.

    python tools/derive_bundle.py bundles/brain_mri_seg            # rewrite it from its source
    python tools/derive_bundle.py bundles/brain_mri_seg --check    # exit 1 naming what differs

The brain bundle runs the prostate bundle's network, transforms, federated settings and inference
unchanged; only what describes the task differs (metadata, DICOM segment names, plausible volumes, the
example data folder). Deriving it keeps one copy of everything else: change the prostate bundle, rerun
this, and the brain bundle follows (the test suite runs --check). ``derived_from.json``:

    {"source": "prostate_mri_seg", "own_files": ["docs/README.md"],
     "overrides": {"configs/metadata.json": {"name": "...", "network_data_format/outputs/pred/channel_def/1": "brain"}}}

A key path is the JSON keys joined by "/"; each must exist in the source (a typo is refused, naming it).
Files under ``own_files`` are the derived bundle's own and are left alone.
"""

import argparse
import json
import sys
from pathlib import Path

SPEC = "derived_from.json"
SKIP = {"models/model.pt", "eval"}  # weights and outputs are never copied


def _set(tree: dict, path: str, value, where: str) -> None:
    *parents, last = path.split("/")
    node = tree
    for key in parents:
        if not isinstance(node, dict) or key not in node:
            raise KeyError(f"{where}: {path!r}: the source has no {key!r}")
        node = node[key]
    if not isinstance(node, dict) or last not in node:
        raise KeyError(f"{where}: {path!r}: the source has no {last!r}")
    node[last] = value


def derived_files(bundle: Path) -> dict:
    """``{relative path: text}`` of every file the derived bundle should hold (its own files excepted)."""
    spec = json.loads((bundle / SPEC).read_text())
    source = bundle.parent / spec["source"]
    if not source.is_dir():
        raise FileNotFoundError(f"{bundle / SPEC}: source bundle {source} not found")
    own = set(spec.get("own_files", []))
    overrides = spec.get("overrides", {})
    unknown = [f for f in overrides if not (source / f).is_file()]
    if unknown:
        raise FileNotFoundError(f"{bundle / SPEC}: overrides name file(s) the source lacks: {unknown}")
    out = {}
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        rel = path.relative_to(source).as_posix()
        if rel in own or rel in SKIP or rel.split("/")[0] in SKIP or "__pycache__" in rel:
            continue
        if rel in overrides:
            tree = json.loads(path.read_text())
            for key, value in overrides[rel].items():
                _set(tree, key, value, f"{SPEC} {rel}")
            out[rel] = json.dumps(tree, indent=4) + "\n"
        else:
            out[rel] = path.read_text()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="the derived bundle's folder (holds derived_from.json)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 naming every file that differs")
    args = p.parse_args(argv)
    bundle = Path(args.bundle)
    if not (bundle / SPEC).is_file():
        p.error(f"{bundle} has no {SPEC}")
    try:
        files = derived_files(bundle)
    except (KeyError, FileNotFoundError, json.JSONDecodeError) as e:
        p.error(str(e))
    stale = [rel for rel, text in files.items()
             if not (bundle / rel).is_file() or (bundle / rel).read_text() != text]
    if args.check:
        for rel in stale:
            print(f"{bundle / rel}: differs from its derivation (run: python tools/derive_bundle.py {bundle})")
        print(f"{bundle}: {'up to date' if not stale else f'{len(stale)} file(s) stale'} ({len(files)} derived)")
        return 1 if stale else 0
    for rel in stale:
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        (bundle / rel).write_text(files[rel])
        print(f"wrote {bundle / rel}")
    print(f"{bundle}: {len(stale)} file(s) written, {len(files) - len(stale)} already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
