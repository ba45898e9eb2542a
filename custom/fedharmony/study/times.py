"""How long each study took on the machine that ran it: a table from the stored results, nothing rerun.

A study's cost is the sum of its runs' own wall times (each ``result.json`` records ``wall_s``; a
finished study's ``results.json`` also sums them as ``run_wall_s``). That is machine time: a study that
ran while the machine did other work (a second study, a test suite) took longer than it would alone,
and one resumed over several sessions took longer in calendar time. Both kinds of study are read:

* a study of runs (``tools/study.py --task`` / ``--plan``): ``results.json`` with ``runs``, or, while it
  is still running, ``runs/<arm>/seed<k>/result.json`` (the planned count from ``plan.json``);
* an outside study (``--outside``): ``results.json`` with ``targets``, or ``runs/<target>/seed<k>/result.json``
  while running; outside studies made before 2026-12-07 did not record their federations' times, and an
  unseen-scanner study's per-scanner times leave out the federation each seed trains once for all its
  scanners (a leave-one-site-out target's time includes its own federation);
* a plan not yet run (``plan.json`` alone): 0 of its planned runs.

    python tools/study_times.py docs/studies          # the markdown table of every study folder

Example::

    >>> rows = [study_time(p) for p in sorted(Path("docs/studies").iterdir())]
    >>> print(times_table([r for r in rows if r]))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, List, Optional

__all__ = ["study_time", "times_table"]


def _read(path: Path, warn: Optional[Callable[[str], None]] = None) -> Optional[dict]:
    """A JSON object, or None: missing silently, unreadable or not an object named through ``warn``."""
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        if warn:
            warn(f"{path}: not read ({type(e).__name__}: {e}); left out of the table")
        return None
    if not isinstance(content, dict):
        if warn:
            warn(f"{path}: holds a {type(content).__name__}, not a JSON object; left out of the table")
        return None
    return content


def _seconds(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0 else None


def _planned_runs(folder: Path, outside: bool, warn: Optional[Callable[[str], None]] = None) -> Optional[int]:
    """Runs a plan asks for: arms x seeds, or (outside) held-out sites or unseen scanners x seeds; None without a
    plan. The plan is read as the study tool reads it (:func:`fedharmony.study.plan.load_plan`: seeds from its power
    calculation where it gives none; an outside plan's scanners from its profile file, named from the repository
    root, and a leave-one-site-out plan without ``holdout`` holding out every site); one it refuses is named
    through ``warn``."""
    path = folder / "plan.json"
    if not path.is_file():
        return None
    from fedharmony.study.plan import PlanError, load_plan

    try:
        if outside:
            from fedharmony.study.outside import OutsideStudy

            study = OutsideStudy.from_plan(path, out=folder)
            return len(study.unseen or study.holdout) * len(study.seeds)
        plan = load_plan(path)
        return len(plan.arms) * plan.seeds
    except (PlanError, ValueError, OSError) as e:
        if warn:
            warn(f"{path}: planned runs not known ({e})")
        return None


def study_time(folder: str | Path, warn: Optional[Callable[[str], None]] = None) -> Optional[dict]:
    """The stored time of the study in ``folder``; None when the folder holds no study results.

    Returns ``{"study", "kind": "runs" | "outside", "done", "planned" (None: not known), "timed" (runs that
    recorded a time), "run_hours" (sum of the timed runs' wall times; None when none recorded one), "finished"
    (results.json written with nothing pending and, where the plan says how many, every planned run in it),
    "machine"}``. A corrupt ``results.json`` or ``result.json``
    is named through ``warn`` and left out (the folder's other files still count).
    """
    folder = Path(folder)
    results = _read(folder / "results.json", warn)
    if results is not None and isinstance(results.get("runs"), list):
        times = [_seconds(r.get("wall_s")) for r in results["runs"] if isinstance(r, dict)]
        kind, done, finished = "runs", len(results["runs"]), not results.get("pending")
    elif results is not None and isinstance(results.get("targets"), dict):
        entries = [e for seeds in results["targets"].values() if isinstance(seeds, dict) for e in seeds.values()]
        times = [_seconds(e.get("wall_s")) if isinstance(e, dict) else None for e in entries]
        kind, done, finished = "outside", len(entries), True
    else:
        stored = [_read(p, warn) for p in sorted((folder / "runs").glob("*/seed*/result.json"))]
        stored = [r for r in stored if r is not None]
        plan = _read(folder / "plan.json")
        if not stored and plan is None:
            return None
        times = [_seconds(r.get("wall_s")) for r in stored]
        kind = "outside" if (plan is not None and "outside" in plan) or any("target" in r for r in stored) else "runs"
        done, finished = len(stored), False
    timed = [t for t in times if t is not None]
    planned = _planned_runs(folder, kind == "outside", warn)
    # an outside study writes results.json after every target: finished once every planned run is in it
    finished = finished and (planned is None or done >= planned)
    machine = results.get("machine") if results else None
    if machine is None and results and isinstance(results.get("invocations"), list) and results["invocations"]:
        machine = results["invocations"][-1].get("machine") if isinstance(results["invocations"][-1], dict) else None
    return {"study": folder.name, "kind": kind, "done": done, "planned": planned if planned is not None else (
        done if finished else None), "timed": len(timed), "run_hours": sum(timed) / 3600 if timed else None,
        "finished": finished, "machine": machine}


def times_table(rows: List[dict]) -> str:
    """A markdown table of :func:`study_time` rows: runs done of planned, the timed runs' hours, and the mean
    minutes per timed run."""
    lines = ["| study | kind | runs done | run time (h) | minutes a run | state |", "|---|---|---|---|---|---|"]
    for r in rows:
        done = f"{r['done']} of {r['planned']}" if r["planned"] is not None else str(r["done"])
        if r["run_hours"] is None:
            hours = per_run = "not recorded" if r["done"] else "-"
        else:
            hours = f"{r['run_hours']:.1f}" + (f" ({r['timed']} timed)" if r["timed"] < r["done"] else "")
            per_run = f"{60 * r['run_hours'] / r['timed']:.1f}"
        state = "finished" if r["finished"] else "running" if r["done"] else "planned"
        lines.append(f"| {r['study']} | {r['kind']} | {done} | {hours} | {per_run} | {state} |")
    return "\n".join(lines) + "\n"
