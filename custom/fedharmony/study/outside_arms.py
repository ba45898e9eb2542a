"""What an outside study can run: its targets, its test-time methods (arms) and the checks of an outside plan
(no NVFlare import, nothing of the harness: :mod:`fedharmony.study.plan` reads it to check a plan), and the
safeguard criteria that stored results can derive rather than run (:data:`DERIVED`).

The harness is :mod:`fedharmony.study.outside`; see its docstring for what the arms and targets are.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

__all__ = ["PHANTOMS", "OUTSIDE_TASKS", "PHANTOM_SITES", "PHANTOM_JOBS", "TARGETS", "SITES", "UNSEEN_SETS", "ADAPTIVE", "SWEEP", "SAFEGUARDS", "LABELLED", "SAFE_CANDIDATE",
           "HOLDOUT_EVERY", "DERIVED", "TABLE", "PLAN_SETTINGS", "check_arms", "check_outside_plan", "labelled_cases",
           "derive_safeguards", "drop_derived"]

REPO = Path(__file__).resolve().parents[3]
TARGETS = ("unseen", "loso")
SITES = ("BIDMC", "HK", "I2CVB", "RUNMC", "BMC", "UCL")  # the phantom prostate sites, in the simulator's order
# the unseen-scanner sets: study-only scanner profiles, none of them a training site's (docs/studies.md says
# when each set was fixed and which criterion it tests)
UNSEEN_SETS = REPO / "docs" / "studies" / "unseen_scanners"
ADAPTIVE = ("bn_stats", "tent", "routing_released", "routing_sigmoid", "routing_source_stats", "routing", "routing_safe")
# sweep: routing with larger or more steps; name -> (bundle method, adaptation overrides, passes factor)
SWEEP = {"routing lr x10": ("routing", {"adaptation#lr": 1e-2}, 1),
         "routing passes x4": ("routing", {}, 4),
         "routing, online schedule": ("routing", {"adaptation#schedule": "online"}, 0)}  # the released schedule
# the safeguard with another criterion: name -> (bundle method, overrides, passes factor); it adapts exactly as
# routing_safe does (same seed, same held-out volumes), so its masks are those of routing_safe's candidate or of
# the global model, whichever its criterion kept
SAFEGUARDS = {"routing_safe (consensus)": ("routing_safe", {"adaptation#safeguard": "consensus"}, 1),
              "routing_safe (departure)": ("routing_safe", {"adaptation#safeguard": "departure"}, 1),
              "routing_safe (labelled)": ("routing_safe", {"adaptation#safeguard": "labelled"}, 1)}
LABELLED = "routing_safe (labelled)"
SAFE_CANDIDATE = "routing_safe (adapted, always)"
# routing_safe's holdout_every (the bundle's default): the criteria judge on the first volume and every 4th after it;
# the labelled criterion is given the labels of exactly those volumes, so it adapts on the same ones as the others
HOLDOUT_EVERY = 4
# a criterion that decides from what another one stored: name -> (the run whose record it reads, its rule). The
# departure rule judges the consensus run's held-out agreements (same adapted network, same volumes). The labelled
# rule compares the mean Dice of routing_safe's adapted network and of the global model on the volumes it would be
# given labels for; the study scores each volume on its own grid, as the bundle does with this study's geometry
# (nothing resampled), so the derived call is the real one (a test checks it on the fourth scanner set, where it ran)
DERIVED = {"routing_safe (departure)": ("routing_safe (consensus)", "departure"),
           LABELLED: (SAFE_CANDIDATE, "labelled")}
TABLE = ["global", "personalized (mean)", "personalized (best, oracle)", "expert_mean", "bn_stats", "tent",
         "routing_released", "routing_sigmoid", "routing_source_stats", "routing", "routing_safe", *SAFEGUARDS,
         SAFE_CANDIDATE]

def check_arms(arms: Sequence[str]) -> List[str]:
    """The arms, checked: each a test-time method an outside study runs (:data:`TABLE`, :data:`SWEEP`), no one
    twice, ``global`` (the baseline) among them (raises ValueError naming the first that is not)."""
    arms, known = list(arms), [*TABLE, *SWEEP]
    unknown = [a for a in arms if a not in known]
    if unknown:
        raise ValueError(f"unknown outside arm(s) {unknown}; choose from {known}")
    if len(set(arms)) != len(arms):
        raise ValueError(f"an arm is listed twice: {arms}")
    if "global" not in arms:
        raise ValueError("an outside study compares with the global model: 'global' must be one of its arms")
    return arms


# an outside plan's settings: OutsideStudy's keywords (profiles: a file relative to the repository)
PLAN_SETTINGS = {"target", "profiles", "holdout", "sites", "cases", "size", "rounds", "local_epochs", "iop_alpha",
                 "passes", "first_seed", "overrides", "voxel_scale"}


PHANTOMS = ("v1", "v2", "brain")  # the phantoms an outside study draws its sites from
OUTSIDE_TASKS = {"prostate": "v1", "prostate_v2": "v2", "brain": "brain"}  # a plan's task -> its phantom
# each phantom's sites (in the simulator's order), job script and bundle
PHANTOM_SITES = {"v1": SITES, "v2": SITES, "brain": ("Guys", "HH", "IOP")}
PHANTOM_JOBS = {"v1": ("prostate.py", "prostate_mri_seg"), "v2": ("prostate.py", "prostate_mri_seg"),
                "brain": ("brain.py", "brain_mri_seg")}


def check_outside_plan(task: str, outside, arms) -> List[str]:
    """An analysis plan's ``outside`` block and arms, checked (raises ValueError naming the field)."""
    if task not in OUTSIDE_TASKS:
        raise ValueError(f"outside studies run on the segmentation tasks {list(OUTSIDE_TASKS)} (routed inference), "
                         f"not {task!r}")
    if not isinstance(outside, dict) or outside.get("target") not in TARGETS:
        raise ValueError(f"'outside' must be an object with 'target' one of {list(TARGETS)}")
    if task == "brain" and outside["target"] != "loso":
        raise ValueError("the brain task's outside studies hold out one of its sites ('target': 'loso'); there are "
                         "no unseen brain scanner sets")
    unknown = sorted(set(outside) - PLAN_SETTINGS)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown} (known: {sorted(PLAN_SETTINGS)})")
    if outside["target"] == "unseen":
        profiles = outside.get("profiles")
        if not isinstance(profiles, str) or not (REPO / profiles).is_file():
            raise ValueError(f"'profiles' must name the unseen scanners' profile file in the repository, got "
                             f"{profiles!r}")
    return check_arms(arms)


def labelled_cases(cases) -> list:
    """The cases the labelled criterion is given labels for: the first and every ``HOLDOUT_EVERY``-th after it,
    in the order the bundle reads them (sorted), as the other criteria hold them out."""
    return sorted(cases)[::HOLDOUT_EVERY]


def _derived_decision(r: dict, source: str, criterion: str) -> Optional[dict]:
    """The decision a ``DERIVED`` criterion makes from a stored (site, seed) result, or None where it lacks the
    evidence (``departure``: the consensus run's agreements; ``labelled``: the adapted network's per-volume Dice)."""
    if criterion == "labelled":
        dice = r["per_volume"].get(source)
        if not dice:
            return None
        cases = labelled_cases(dice)
        candidate = sum(dice[c] for c in cases) / len(cases)
        glob = sum(r["per_volume"]["global"][c] for c in cases) / len(cases)
        return {"criterion": criterion, "candidate_dice": candidate, "global_dice": glob,
                "kept": "adapted" if candidate > glob else "global", "labelled_volumes": cases}
    from fedharmony.methods.iopfl.adaptation import SAFEGUARD_MARGIN, departure_keeps

    d = r["timings"].get(source, {}).get("history", [{}])[-1].get("safeguard")
    if not d or d.get("candidate_agreement") is None:
        return None
    margin = SAFEGUARD_MARGIN  # the bundle's default, which the study runs
    keep = departure_keeps(d["candidate_agreement"], d["global_agreement"], margin)
    return {**{k: v for k, v in d.items() if k != "reason"}, "criterion": criterion,
            "kept": "adapted" if keep else "global", "margin": margin}


def _entries(results: dict):
    for by_seed in results.get("targets", {}).values():
        yield from by_seed.values()


def derive_safeguards(results: dict, names=None) -> int:
    """Fill each ``DERIVED`` criterion (of ``names``, default all) into the stored target results
    (``results["targets"]``) that lack it, from its source's stored record; returns how many (target, seed)
    entries were filled."""
    filled = 0
    for r in _entries(results):
        for name, (source, criterion) in DERIVED.items():
            if names is not None and name not in names:
                continue
            decision = None if name in r["mean"] else _derived_decision(r, source, criterion)
            if decision is None:
                continue
            kept = SAFE_CANDIDATE if decision["kept"] == "adapted" else "global"
            r["per_volume"][name] = dict(r["per_volume"][kept])
            r["mean"][name] = r["mean"][kept]
            r["timings"][name] = {"derived_from": source, "history": [{"safeguard": decision}]}
            filled += 1
    return filled


def drop_derived(results: dict) -> int:
    """Remove the derived entries (they then run for real); returns how many."""
    dropped = 0
    for r in _entries(results):
        for name in DERIVED:
            if "derived_from" in r["timings"].get(name, {}):
                for key in ("mean", "per_volume", "timings"):
                    r[key].pop(name, None)
                dropped += 1
    return dropped
