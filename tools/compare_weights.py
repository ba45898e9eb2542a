#!/usr/bin/env python
"""Does a code change alter training? Run every method's tiny federation at two code versions and compare the weights.

    python tools/compare_weights.py --before REV [--after WORKTREE] [--methods fedavg fedprox ...] [--rounds 2]

For each method: the same job (prostate bundle, 2 phantom sites of 32 x 32 x 8, ``--rounds`` rounds, the
tests' tiny overrides, seeded) is exported by each version's own job script and run by ``nvflare simulator
-t 1`` (one task at a time, in a fixed order, so the sum of the aggregation has one order). Compared, tensor
by tensor: the server's global model (where the method has one) and each site's model, best model and
method state. Prints a table: method, tensors compared, largest absolute difference, identical or not; exits
1 if any method differs. ``REV`` is checked out into a temporary git worktree; ``--after`` defaults to this
checkout as it is (uncommitted changes included). A refactor that must not change behaviour passes with
every difference 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

REPO = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = {"samples_per_volume": 4, "batch_size": 1, "base_features": 4}
SITES = ("site-1", "site-2")


def write_sites(out: Path) -> Path:
    """Two tiny phantom prostate sites (BIDMC, HK), seed 0, written by this checkout's generator."""
    from fedharmony.phantom import load_profiles, select_profiles
    from fedharmony.phantom.sites import write_sites as write

    write(out, select_profiles(load_profiles(), ["BIDMC", "HK"]), seed=0, size=32, slices=8, cases=3)
    return out


def run_version(tree: Path, method: str, data: Path, work: Path, rounds: int) -> Path:
    """Export and simulate ``method`` with the code of ``tree``; returns the simulator workspace."""
    env = {**os.environ, "PYTHONPATH": str(tree / "custom"), "FEDHARMONY_DATA_ROOT": str(data)}
    jobs = work / "jobs"
    export = [sys.executable, str(tree / "jobs" / "prostate.py"), "--algorithm", method, "--rounds", str(rounds),
              "--sites", "2", "--override", json.dumps(TINY_OVERRIDES), "--name", method, "--export",
              "--export-dir", str(jobs)]
    res = subprocess.run(export, capture_output=True, text=True, cwd=work, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"{tree}: export of {method} failed: {res.stderr[-1500:]}")
    ws = work / "ws"
    nvflare = str(Path(sys.executable).with_name("nvflare"))
    res = subprocess.run([nvflare, "simulator", str(jobs / method), "-w", str(ws), "-n", "2", "-t", "1"],
                         capture_output=True, text=True, env=env, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{tree}: simulation of {method} failed: {(res.stdout + res.stderr)[-1500:]}")
    return ws


def tensors(ws: Path) -> Dict[str, object]:
    """Every tensor of the run's results, by a name that says where it came from."""
    import torch

    out = {}

    def add(prefix: str, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                add(f"{prefix}/{k}", v)
        elif hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy arrays in the server checkpoint
            out[prefix] = torch.as_tensor(value)

    server = ws / "server" / "simulate_job" / "app_server" / "FL_global_model.pt"
    if server.is_file():
        add("server/FL_global_model", torch.load(server, weights_only=True).get("model"))
    for site in SITES:
        folder = ws / site / "simulate_job" / "fedharmony" / site
        for name in ("site_state.pt", "best_model.pt"):
            if (folder / name).is_file():
                state = torch.load(folder / name, weights_only=True)
                if name == "site_state.pt":  # the model and the method's own state; counters and optimizers aside
                    state = {"network": state.get("network"), "method": (state.get("method") or {}).get("state")}
                add(f"{site}/{name}", state)
    return out


def compare(before: Dict[str, object], after: Dict[str, object]) -> dict:

    if set(before) != set(after):
        return {"tensors": len(before), "max_diff": float("nan"),
                "note": f"different tensors: only before {sorted(set(before) - set(after))[:3]}, "
                        f"only after {sorted(set(after) - set(before))[:3]}"}
    worst = 0.0
    for k in before:
        a, b = before[k], after[k]
        if a.shape != b.shape:
            return {"tensors": len(before), "max_diff": float("nan"), "note": f"{k}: shape {a.shape} vs {b.shape}"}
        if a.numel():
            worst = max(worst, float((a.double() - b.double()).abs().max()) if a.is_floating_point()
                        else float((a != b).any()))
    return {"tensors": len(before), "max_diff": worst, "note": ""}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="git revision of the code before the change")
    p.add_argument("--after", default=str(REPO), help="checkout of the code after it (default: this one, as it is)")
    p.add_argument("--methods", nargs="+", help="methods to compare (default: every registered one)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    args = p.parse_args(argv)
    from fedharmony.methods import METHODS

    methods = args.methods or list(METHODS)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        p.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    keep = args.work is not None
    work = Path(args.work or tempfile.mkdtemp(prefix="compare_weights_"))
    work.mkdir(parents=True, exist_ok=True)
    before_tree = work / "before"
    if not before_tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(before_tree), args.before],
                       check=True, capture_output=True)
    commit = subprocess.run(["git", "-C", str(before_tree), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    data = write_sites(work / "data")
    rows, failed = [], False
    try:
        for method in methods:
            t0 = time.time()
            results = {}
            for label, tree in (("before", before_tree), ("after", Path(args.after))):
                out = work / label / "runs" / method if label == "before" else work / "after_runs" / method
                out.mkdir(parents=True, exist_ok=True)
                results[label] = tensors(run_version(tree, method, data, out, args.rounds))
            row = compare(results["before"], results["after"])
            row.update(method=method, seconds=time.time() - t0)
            failed |= not (row["max_diff"] == 0.0 and not row["note"])
            rows.append(row)
            print(f"{method}: {row['tensors']} tensors, max |diff| {row['max_diff']:.3g} {row['note']}", flush=True)
    finally:
        if not keep:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(before_tree)],
                           capture_output=True)
    print(f"\nbefore: {args.before} ({commit}); after: {args.after}; {args.rounds} rounds, 2 sites, nvflare simulator -t 1")
    print("| method | tensors compared | largest abs. difference | identical | wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        same = "yes" if r["max_diff"] == 0.0 and not r["note"] else f"no {r['note']}".strip()
        print(f"| {r['method']} | {r['tensors']} | {r['max_diff']:.3g} | {same} | {r['seconds']:.0f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
