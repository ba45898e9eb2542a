"""Outside studies: an IOP-FL model pool on sites outside its federation, run as a study (no NVFlare import).

The study tool's other studies (:class:`fedharmony.study.runner.Study`) train a method per arm and score it on
the sites that trained it. An outside study asks what IOP-FL was built for: a site that took no part in
training, with the federation's model pool and a test-time method. Its shape is the same, so it shares the
tool's cache rules, provenance, plan files, verdicts and report sections:

* the *arms* are test-time methods (:data:`TABLE`: the global model, each personalized model, the expert mean,
  BN statistics, TENT, routing and its variants, the routing safeguard with each criterion);
* the *sites* are the outside targets, of one kind per study:
  ``unseen`` (scanners no site has, drawn from a profile file such as ``docs/studies/unseen_scanners/set1.json``;
  the pool of one IOP-FL federation on the six phantom sites, which also gives the *inside* table:
  personalized vs global on each site's test split) or ``loso`` (leave one site out: for each held-out site
  H, the pool of a federation on the other sites);
* the *seeds* are the replicates: seed k draws the phantom data with seed k and trains with bundle seed k;
* the *phantom*: ``v1`` (:mod:`fedharmony.phantom.prostate`, the studies before it), ``v2``
  (:mod:`fedharmony.phantom.prostate_mr`: anatomy in mm, MR physics, each scanner's own matrix; a plan whose task is
  ``prostate_v2``, whose ``overrides`` should then give the network its ``image_size``) or ``brain``
  (:mod:`fedharmony.phantom.brain_mr`, the three IXI hospitals' scanners, the brain job and bundle; a plan whose
  task is ``brain``; leave one site out only). ``voxel_scale`` scans v2 and brain sites with coarser voxels.

A unit of work is one (target, seed): every method segments every volume of the target with the bundle's
``configs/routed_inference.json`` (nothing labelled is seen, except by the labelled safeguard, which is given
the labels of the volumes the other criteria hold out), and the written masks are scored against the labels
(foreground Dice per volume, native grid). Its ``result.json`` (``runs/<target>/seed<k>/``, written atomically,
with what it was made on) is reused when the study's settings (:meth:`OutsideStudy.settings`) are the same; a
method added to the study later runs alone on the stored federation. As in the rest of the tool, the cache keys
the settings, not the code: the report lists what the runs were made on.

Two criteria can be *derived* rather than run (:data:`DERIVED`): the departure rule judges the consensus run's
stored agreements, and the labelled criterion the stored per-volume Dice of the same adapted network on the
volumes it would be given; a stored result made before the criterion existed gets its call that way, marked
``derived_from`` and counted in the report (``run_derived`` runs them for real instead).

Federations and predictions stay in the study folder (``sim/``, ``predictions/``, ``data/``; not committed).
``results.json`` holds every target result, the inside table, the bundle CLI's cost on the first target and
each invocation that ran something; :mod:`fedharmony.study.outside_report` builds the report from it alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from fedharmony.study.outside_arms import (OUTSIDE_TASKS, PHANTOM_JOBS, PHANTOM_SITES, PHANTOMS, ADAPTIVE, DERIVED, HOLDOUT_EVERY, LABELLED, SAFE_CANDIDATE, SAFEGUARDS, SITES,
                                           SWEEP, TABLE, TARGETS, UNSEEN_SETS, check_arms, check_outside_plan,
                                           derive_safeguards, drop_derived, labelled_cases)
from fedharmony.study.outside_segment import BUNDLE, cli_cost, labelled_folder, score, segment
from fedharmony.study.provenance import bundle_record, code_line, made_on
from fedharmony.study.runner import (REPO, STALL_S, RunStalled, _atomic_json, lock_plan, once_more_if_stalled,
                                     plan_results, read_cache_entry, run_watched)

__all__ = ["OutsideStudy", "check_arms", "check_outside_plan", "TARGETS", "SITES", "ADAPTIVE", "SWEEP", "SAFEGUARDS", "LABELLED", "SAFE_CANDIDATE",
           "DERIVED", "TABLE", "HOLDOUT_EVERY", "UNSEEN_SETS", "unseen_set", "derive_safeguards", "drop_derived",
           "labelled_cases", "method_runs", "load_outside_results", "convert_legacy"]

RESULT_FILE = "result.json"
RESULTS_FILE = "results.json"


def unseen_set(number: int) -> Path:
    """The profile file of unseen-scanner set ``number`` (``docs/studies/unseen_scanners/set<N>.json``)."""
    path = UNSEEN_SETS / f"set{number}.json"
    if not path.is_file():
        sets = sorted(int(m.group(1)) for p in UNSEEN_SETS.glob("set*.json") if (m := re.fullmatch(r"set(\d+)", p.stem)))
        raise ValueError(f"no unseen-scanner set {number} ({path} does not exist; the sets are {sets})")
    return path


def _profiles_digest(path: Path) -> str:
    """sha256 of a profile file's profiles (its ``sites``, canonical JSON): its prose may change, not them."""
    sites = json.loads(Path(path).read_text())["sites"]
    return "sha256:" + hashlib.sha256(json.dumps(sites, sort_keys=True).encode()).hexdigest()


class OutsideStudy:
    """An IOP-FL model pool on outside targets, over seeds (see the module docstring).

    Args:
        target: ``unseen`` (scanners of ``profiles``, pool of a federation on all ``sites``) or ``loso`` (each of
            ``holdout`` held out in turn, pool of a federation on the others).
        seeds: seeds 0 .. seeds - 1.
        out: study folder.
        profiles: the unseen scanners' profile file (``target="unseen"``); see :func:`unseen_set`.
        holdout: the held-out sites (``target="loso"``; default every site).
        sites: how many of the phantom's sites take part (the first ones; default all: 6 prostate, 3 brain).
        cases, size: phantom cases per site and in-plane size (v1; a v2 or brain site has its scanner's matrix).
        phantom: ``v1``, ``v2`` or ``brain`` (see the module docstring); a plan's task decides it.
        voxel_scale: v2 and brain: voxels that much larger than the profiles' (field of view kept).
        rounds, local_epochs, iop_alpha: the IOP-FL federation's.
        passes: adaptation passes over a target.
        overrides: bundle overrides for the federations (a smoke test's small network).
        sweep: add routing with 10x the learning rate, 4x the passes and the released online schedule.
        run_derived: run the :data:`DERIVED` criteria for real where stored results only derive them.
        cost: measure the bundle CLI's wall time and peak memory (global, routing) on the first target.
    """

    def __init__(self, target: str, seeds: int, out, *, profiles=None, holdout: Optional[Sequence[str]] = None,
                 sites: Optional[int] = None, cases: int = 10, size: int = 96, rounds: int = 20, local_epochs: int = 2,
                 iop_alpha: float = 0.1, passes: int = 2, overrides: Optional[dict] = None, sweep: bool = False,
                 run_derived: bool = False, cost: bool = True, first_seed: int = 0,
                 arms: Optional[Sequence[str]] = None, echo: Callable[[str], None] = print, command: str = "",
                 stall_s: float = STALL_S, analysis_plan=None, plan_path=None, phantom: str = "v1",
                 voxel_scale: float = 1.0):
        if phantom not in PHANTOMS:
            raise ValueError(f"phantom must be one of {list(PHANTOMS)}, got {phantom!r}")
        self.phantom = phantom
        phantom_sites = PHANTOM_SITES[phantom]
        script, bundle = PHANTOM_JOBS[phantom]
        self.job_script, self.bundle = REPO / "jobs" / script, REPO / "bundles" / bundle
        sites = len(phantom_sites) if sites is None else sites
        if phantom == "brain" and target != "loso":
            raise ValueError("the brain phantom's outside studies hold out one of its sites (target 'loso'); there "
                             "are no unseen brain scanner sets")
        if not 1.0 <= voxel_scale <= 16.0 or (phantom == "v1" and voxel_scale != 1.0):
            raise ValueError(f"voxel_scale must be in [1, 16] (v2 and brain phantoms only), got {voxel_scale}")
        self.voxel_scale = float(voxel_scale)
        if target not in TARGETS:
            raise ValueError(f"unknown outside target {target!r}; choose one of {list(TARGETS)}")
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        if not 2 <= sites <= len(phantom_sites):
            raise ValueError(f"sites must be 2 to {len(phantom_sites)}, got {sites}")
        for name, value, low in (("cases", cases, 3), ("size", size, 16), ("rounds", rounds, 1),
                                 ("local_epochs", local_epochs, 1), ("passes", passes, 1)):
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        if first_seed < 0:
            raise ValueError(f"first_seed must be >= 0, got {first_seed}")
        self.target, self.out = target, Path(out).resolve()
        self.seeds = list(range(first_seed, first_seed + seeds))
        self.sites = list(phantom_sites[:sites])
        if target == "unseen":
            if profiles is None:
                raise ValueError("an unseen-scanner study needs its scanners' profile file (profiles=, e.g. "
                                 "fedharmony.study.outside.unseen_set(1))")
            self.profiles = Path(profiles).resolve()
            self.unseen = list(self._load_profiles(self.profiles))  # refuses a bad file before anything runs
            self.holdout: List[str] = []
        else:
            if profiles is not None:
                raise ValueError("profiles= is for target='unseen'; a leave-one-site-out study holds out its own sites")
            self.profiles, self.unseen = None, []
            self.holdout = list(holdout) if holdout is not None else list(self.sites)
            unknown = [h for h in self.holdout if h not in self.sites]
            if unknown or not self.holdout or len(set(self.holdout)) != len(self.holdout):
                raise ValueError(f"holdout must name distinct sites of {self.sites}, got {self.holdout}")
        self.cases, self.size, self.rounds, self.local_epochs = cases, size, rounds, local_epochs
        self.iop_alpha, self.passes = float(iop_alpha), passes
        self.overrides = dict(overrides or {})
        self.sweep, self.run_derived, self.measure_cost = bool(sweep), bool(run_derived), bool(cost)
        self.echo, self.command, self.stall_s = echo, command, float(stall_s)
        self.arms = check_arms(arms) if arms is not None else None
        self.analysis_plan = analysis_plan
        self.plan_path = Path(plan_path).resolve() if plan_path else None
        if analysis_plan is not None and self.plan_path is None:
            raise ValueError("a study with an analysis plan needs the plan's file (plan_path)")
        self._plan_record: Optional[dict] = None

    @classmethod
    def from_plan(cls, plan_path, out=None, **kwargs) -> "OutsideStudy":
        """The outside study a plan file describes (its ``outside`` block, arms and seeds), in ``out`` (default:
        the plan file's folder). It runs only the plan's arms.

        Raises:
            PlanError: the plan cannot be used, or is not an outside study's.
        """
        from fedharmony.study.plan import PlanError, load_plan

        plan = load_plan(plan_path)
        if plan.outside is None:
            raise PlanError(f"plan {plan_path} has no 'outside' block: it is not an outside study's plan")
        settings = dict(plan.outside)
        profiles = settings.pop("profiles", None)
        return cls(settings.pop("target"), plan.seeds, out or Path(plan_path).resolve().parent,
                   profiles=REPO / profiles if profiles else None, arms=list(plan.arms), analysis_plan=plan,
                   plan_path=plan_path, phantom=OUTSIDE_TASKS[plan.task], **settings, **kwargs)

    # ------------------------------------------------------------------ settings and cache
    def settings(self) -> dict:
        """What a target result depends on (its cache key): the federation's and the adaptation's settings and,
        for unseen scanners, the profiles' content. The methods are not in it: one a stored result lacks runs
        alone. The bundle's configs and the code are not either (a study's runs take hours); each result
        records what it was made on."""
        return {"target": self.target, "sites": self.sites, "cases": self.cases, "size": self.size,
                "rounds": self.rounds, "local_epochs": self.local_epochs, "iop_alpha": self.iop_alpha,
                "passes": self.passes, "overrides": self.overrides,
                **({"profiles": _profiles_digest(self.profiles)} if self.profiles else {}),
                **({"phantom": self.phantom} if self.phantom != "v1" else {}),  # absent for v1: older caches valid
                **({"voxel_scale": self.voxel_scale} if self.voxel_scale != 1.0 else {})}

    def settings_key(self, target: str, seed: int) -> str:
        blob = json.dumps({**self.settings(), "outside_site": target, "seed": seed}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def methods(self) -> List[str]:
        """The report's methods: the plan's arms, or :data:`TABLE` (and the sweep's)."""
        if self.arms is not None:
            return list(self.arms)
        return list(TABLE) + (list(SWEEP) if self.sweep else [])

    def _runs_needed(self) -> Optional[set]:
        """The segmentation runs the arms need (None: all): global always (the baseline and the safeguard's
        fallback), every personalized model for their mean and best, routing_safe (with its adapted candidate)
        wherever a safeguard is an arm."""
        if self.arms is None:
            return None
        needed = set(self.arms) | {"global"}
        if needed & {"personalized (mean)", "personalized (best, oracle)"}:
            needed.add("personalized")
        if SAFE_CANDIDATE in needed or needed & {"routing_safe", *SAFEGUARDS}:
            needed.add("routing_safe")  # its adapted candidate, scored alone, tells whether a criterion chose well
        return needed

    def targets(self) -> List[str]:
        return list(self.unseen) if self.target == "unseen" else list(self.holdout)

    def run_dir(self, target: str, seed: int) -> Path:
        return self.out / "runs" / target / f"seed{seed}"

    def cached(self, target: str, seed: int) -> Optional[dict]:
        """The stored result of (target, seed), or None (with the reason said) when it cannot be reused."""
        path = self.run_dir(target, seed) / RESULT_FILE
        entry = read_cache_entry(path, self.echo)
        if entry is None:
            return None
        if not isinstance(entry, dict) or entry.get("settings_key") != self.settings_key(target, seed):
            self.echo(f"cache entry {path} was made with other settings: running it again")
            return None
        if not all(isinstance(entry.get(k), dict) for k in ("per_volume", "mean", "timings")):
            self.echo(f"cache entry {path} is incomplete: running it again")
            return None
        return entry

    def missing_methods(self, entry: dict) -> List[str]:
        """The methods a stored result lacks (added after it ran): the plan's arms, or the safeguard and sweep
        variants."""
        wanted = self.arms if self.arms is not None else [*SAFEGUARDS, *(SWEEP if self.sweep else [])]
        return [name for name in wanted if name not in entry["mean"]]

    # ------------------------------------------------------------------ data and federations
    def _load_profiles(self, path=None) -> dict:
        """Site profiles of the study's phantom (v1: ``SiteProfile``; v2: the MR simulator's ``ProstateMRSite``)."""
        if self.phantom == "v2":
            from fedharmony.phantom.prostate_mr import load_v2_profiles

            return load_v2_profiles(path)
        if self.phantom == "brain":
            from fedharmony.phantom.brain_mr import load_brain_profiles

            return load_brain_profiles(path)
        from fedharmony.phantom import load_profiles

        return load_profiles(path)

    def _write(self, root: Path, profiles: list, seed: int) -> None:
        from fedharmony.phantom._common import default_workers

        if self.phantom == "v2":  # each scanner's own matrix and slices (size does not apply)
            from fedharmony.phantom.prostate_mr import write_sites_v2

            write_sites_v2(root, profiles, seed=seed, cases=self.cases, workers=default_workers(),
                           voxel_scale=self.voxel_scale)
        elif self.phantom == "brain":  # the MNI152 template per case, scanned as each IXI hospital's scanner
            from fedharmony.phantom.brain_mr import write_brain_sites

            write_brain_sites(root, profiles, seed=seed, cases=self.cases, workers=default_workers(),
                              voxel_scale=self.voxel_scale)
        else:
            from fedharmony.phantom.sites import write_sites

            write_sites(root, profiles, seed=seed, cases=self.cases, size=self.size, workers=default_workers())

    def data(self, seed: int) -> Path:
        """The seed's phantom sites (``data/seed<k>/``), drawn once."""
        root = self.out / "data" / f"seed{seed}"
        if not (root / "sites.json").is_file():
            self._write(root, [p for name, p in self._load_profiles().items() if name in self.sites], seed)
        return root

    def unseen_data(self, seed: int) -> Path:
        """The seed's draw of the unseen scanners (``data/seed<k>/unseen/``)."""
        root = self.out / "data" / f"seed{seed}" / "unseen"
        if not (root / "sites.json").is_file():
            self._write(root, list(self._load_profiles(self.profiles).values()), seed)
        return root

    def federation(self, data_root: Path, n_sites: int, name: str, seed: int) -> Path:
        """One IOP-FL federation in the simulator (bundle seed = ``seed``), run once; returns its model pool."""
        ws_root = self.out / "sim"
        pool = ws_root / name / "server" / "simulate_job" / "model_pool"
        if (pool / "manifest.json").is_file():
            _stamp_if_old(pool, self.echo)
            return pool
        cmd = [sys.executable, str(self.job_script), "--algorithm", "iopfl", "--rounds", str(self.rounds),
               "--local-epochs", str(self.local_epochs), "--sites", str(n_sites), "--data-root", str(data_root),
               "--workspace", str(ws_root), "--name", name, "--iop-alpha", str(self.iop_alpha),
               "--override", json.dumps({**self.overrides, "seed": seed}), "--verbose"]
        ws_root.mkdir(parents=True, exist_ok=True)
        log_path = ws_root / f"{name}.log"
        t0 = time.time()

        def attempt():
            with open(log_path, "w") as log:
                try:
                    run_watched(cmd, log, dict(os.environ), self.stall_s)
                except RunStalled:  # a RuntimeError too, but retried by the caller, not a failure
                    raise
                except RuntimeError as e:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"federation {name} failed ({e}):\n{tail}") from None

        self.echo(f"  federation {name} (log {log_path})")
        try:  # the study tool's rule: a run silent for stall_s is stopped and run once more
            once_more_if_stalled(attempt, lambda why: self.echo(f"  {name}: {why}"))
        except RunStalled as e:
            raise RuntimeError(f"federation {name}: {e}, twice") from None
        if not (pool / "manifest.json").is_file():
            raise RuntimeError(f"federation {name} wrote no model pool under {pool.parent}")
        self.echo(f"  federation {name}: {time.time() - t0:.0f} s")
        return pool

    # ------------------------------------------------------------------ the study
    def run(self, collect_only: bool = False) -> dict:
        """Run what is not stored (``collect_only``: nothing) and write ``results.json``; returns it."""
        t_study = time.time()
        if self.analysis_plan is not None and not collect_only:
            self._plan_record = lock_plan(self.analysis_plan, self.plan_path, self.out)
        results = self._stored()
        if not collect_only:
            self.echo(f"outside study: {self.target}, {len(self.targets())} target(s) x {len(self.seeds)} seed(s), "
                      f"out {self.out}")
            self._drop_work_of_other_settings()
            ran = False
            for seed in self.seeds:
                ran |= self._run_seed(seed, results)
            if ran:
                results["invocations"].append(self._invocation())
        results["wall_s"] = time.time() - t_study
        _atomic_json(self.out / RESULTS_FILE, results)
        return results

    def _drop_work_of_other_settings(self) -> None:
        """The drawn data, federations and predictions (``data/``, ``sim/``, ``predictions/``) are reused by name;
        made with other settings they are removed first (``work_settings.json`` records theirs). Stored results
        are checked one by one against their own key."""
        marker = self.out / "work_settings.json"
        try:
            before = json.loads(marker.read_text()) if marker.is_file() else None
        except (OSError, json.JSONDecodeError):
            before = {}
        if before is not None and before != self.settings():
            for folder in ("data", "sim", "predictions"):
                if (self.out / folder).exists():
                    shutil.rmtree(self.out / folder)
            self.echo(f"{self.out}: data, federations and predictions were made with other settings; removed")
        _atomic_json(marker, self.settings())

    def _plan_results(self) -> dict:
        return plan_results(self.analysis_plan, self._plan_record, self.plan_path, self.out)

    def _stored(self) -> dict:
        """``results.json``'s frame with every stored target result and inside table of this study's settings."""
        old = {}
        if (self.out / RESULTS_FILE).is_file():
            try:
                old = json.loads((self.out / RESULTS_FILE).read_text())
            except (OSError, json.JSONDecodeError):
                old = {}
        same = old.get("settings") == self.settings()
        task = next(t for t, phantom in OUTSIDE_TASKS.items() if phantom == self.phantom)
        results = {"study": "outside", "task": task,
                   "metric": "foreground_dice",
                   "metric_label": "foreground Dice", "baseline": "global", "target": self.target,
                   "methods": self.methods(), "seeds": self.seeds, "settings": self.settings(),
                   "expected_targets": self.targets(),
                   "profiles_file": _shown(self.profiles) if self.profiles else None,
                   "bundle": bundle_record(self.bundle),
                   "invocations": old.get("invocations", []) if same else [],
                   "inside": old.get("inside", {}) if same else {}, "cost": old.get("cost", {}) if same else {},
                   "targets": {}, "failed": [], **self._plan_results(), **({"converted": old["converted"]} if same and "converted" in old else {})}
        for target in self.targets():
            for seed in self.seeds:
                entry = self.cached(target, seed)
                if entry is not None:
                    results["targets"].setdefault(target, {})[str(seed)] = entry
        return results

    def _invocation(self) -> dict:
        import monai
        import nvflare
        import torch

        info = made_on()
        return {"command": self.command, "code": code_line(info), "cpu": info["cpu"],
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
                "versions": {"torch": torch.__version__, "monai": monai.__version__, "nvflare": nvflare.__version__},
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def _run_seed(self, seed: int, results: dict) -> bool:
        """Every target of one seed; returns whether anything ran."""
        ran = False
        work = []  # (target, its folder, the pool's site names, the federation's name, the stored entry)
        for target in self.targets():
            entry = results["targets"].get(target, {}).get(str(seed))
            if entry is not None and not self.run_derived:  # from before a criterion existed: not rerun for it
                derive_safeguards({"targets": {target: {str(seed): entry}}}, self.methods())
            elif entry is not None:
                drop_derived({"targets": {target: {str(seed): entry}}})
            if entry is not None and not self.missing_methods(entry):
                continue
            if self.target == "unseen":
                work.append((target, self.out / "data" / f"seed{seed}" / "unseen" / target, self.sites,
                             f"iopfl_inside_seed{seed}", entry))
            else:
                work.append((target, self.out / "data" / f"seed{seed}" / target, [s for s in self.sites if s != target],
                             f"iopfl_without_{target}_seed{seed}", entry))
        if not work and (self.target == "loso" or str(seed) in results["inside"]) \
                and (results["cost"] or not self.measure_cost):
            return False  # everything stored: not even the data is drawn
        data = self.data(seed)
        if self.target == "unseen" and (work or str(seed) not in results["inside"]):
            pool = self.federation(data, len(self.sites), f"iopfl_inside_seed{seed}", seed)
            results["inside"][str(seed)] = _inside_scores(pool.parent, data)
            self.unseen_data(seed)
            ran = True
        for target, folder, sources, name, entry in work:
            self.echo(f"seed {seed}: {'unseen scanner' if self.target == 'unseen' else 'held-out site'} {target} ...")
            t0, made = time.time(), made_on()
            try:
                if self.target == "loso":
                    root = self.out / "data" / f"seed{seed}" / "loso" / target
                    root.mkdir(parents=True, exist_ok=True)
                    (root / "sites.json").write_text(json.dumps({f"site-{i + 1}": str(data / s)
                                                                 for i, s in enumerate(sources)}, indent=2))
                    pool = self.federation(root, len(sources), name, seed)
                else:
                    pool = self.federation(data, len(self.sites), name, seed)
                label = {f"site-{i + 1}": s for i, s in enumerate(sources)}
                result = self.outside_site(pool, folder, self.out / "predictions" / f"seed{seed}" / target, label,
                                           seed, entry)
            except Exception as e:  # one failed target must not lose the others: report it, go on
                results["failed"].append({"target": target, "seed": seed, "error": f"{type(e).__name__}: {e}"})
                self.echo(f"seed {seed}: {target} FAILED ({type(e).__name__}: {e})")
                continue
            result.update({"target": target, "seed": seed, "settings_key": self.settings_key(target, seed),
                           "made_on": (entry or {}).get("made_on", made),
                           "wall_s": (entry or {}).get("wall_s", 0.0) + time.time() - t0})
            if entry is not None and entry.get("made_on") != made:  # methods added on other code: say so
                result["methods_added_on"] = [*entry.get("methods_added_on", []), made]
            _atomic_json(self.run_dir(target, seed) / RESULT_FILE, result)
            results["targets"].setdefault(target, {})[str(seed)] = result
            ran = True
            self.echo(f"seed {seed}: {target} done, global {result['mean']['global']:.3f}, "
                      f"routing {result['mean'].get('routing', float('nan')):.3f}")
            _atomic_json(self.out / RESULTS_FILE, results)  # nothing lost if the study stops here
        if self.measure_cost and not results["cost"] and results["targets"]:
            results["cost"] = self._cost(seed, results)
            ran = True
        return ran

    def _cost(self, seed: int, results: dict) -> dict:
        """The bundle CLI run as a user runs it, on the first target with a result of this seed."""
        found = [(t, by_seed[str(seed)]) for t, by_seed in results["targets"].items() if str(seed) in by_seed]
        if not found:
            return {}
        target, r = found[0]
        if self.target == "unseen":
            folder, name = self.unseen_data(seed) / target, f"iopfl_inside_seed{seed}"
        else:
            folder, name = self.data(seed) / target, f"iopfl_without_{target}_seed{seed}"
        pool = self.out / "sim" / name / "server" / "simulate_job" / "model_pool"
        cost = {}
        for method in ("global", "routing"):
            c = cli_cost(method, pool, folder, self.out / "predictions" / "cost" / method,
                         self.passes if method in ADAPTIVE else 0, bundle=self.bundle)
            t = r["timings"][method]
            cost[method] = {**c, "site": target, "volumes": r["volumes"], "s_per_volume": c["wall_s"] / r["volumes"],
                            "in_process_s_per_volume": (t["adapt_s"] + t["infer_s"]) / r["volumes"]}
        return cost

    def outside_site(self, pool: Path, site_dir: Path, pred_root: Path, label: dict, seed: int,
                     done: Optional[dict] = None) -> dict:
        """Segment every volume of one outside site with every method; Dice per volume and per method. With
        ``done`` (this site's stored result), only the methods it lacks run."""
        experts = [e["name"] for e in json.loads((pool / "manifest.json").read_text())["experts"]
                   if e["kind"] == "personalized"]
        runs = [(m, m, {}, self.passes if m in ADAPTIVE else 0)
                for m in ["global", *experts, "expert_mean", *ADAPTIVE]]
        runs += [(name, m, extra, self.passes * k) for name, (m, extra, k) in SAFEGUARDS.items()]
        if self.sweep or self.arms is not None:
            runs += [(name, m, extra, self.passes * k) for name, (m, extra, k) in SWEEP.items()]
        needed = self._runs_needed()
        if needed is not None:
            runs = [r for r in runs if r[0] in needed or r[0] in experts and "personalized" in needed]
        per_method = dict((done or {}).get("per_volume", {}))
        timings = dict((done or {}).get("timings", {}))
        for name, method, extra, passes in runs:
            key = f"personalized {label[name]}" if name in experts else name
            if key in per_method:
                continue
            pred = pred_root / name.replace(",", "").replace(" ", "_")
            shutil.rmtree(pred, ignore_errors=True)  # masks of an earlier, interrupted or dropped run: never scored
            cand = pred_root / "routing_safe_candidate" if name == "routing_safe" else None
            if name == LABELLED:  # the site's labelled volumes: those the other criteria hold out
                extra = {**extra, "labelled_dir": str(labelled_folder(site_dir, pred_root / "labelled"))}
            t = segment(method, pool, site_dir, pred, passes, seed, extra, cand, bundle=self.bundle)
            per_method[key] = score(site_dir, pred)
            if cand is not None:
                per_method[SAFE_CANDIDATE] = score(site_dir, cand)
            timings[key] = {k: v for k, v in t.items() if k != "history"}
            if t["history"]:
                timings[key]["history"] = t["history"]
        mean = {m: sum(v.values()) / len(v) for m, v in per_method.items()}
        alone = [mean[f"personalized {label[e]}"] for e in experts if f"personalized {label[e]}" in mean]
        if alone:
            mean["personalized (mean)"] = sum(alone) / len(alone)
            mean["personalized (best, oracle)"] = max(alone)
        return {"per_volume": per_method, "mean": mean, "timings": timings, "volumes": len(per_method["global"])}


def _shown(path: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def _inside_scores(run: Path, data: Path) -> dict:
    """{site: {"global", "personalized"}} from the inside federation's cross-site matrix."""
    from fedharmony.core.results import load_cross_site

    matrix = load_cross_site(run / "cross_site_val" / "cross_val_results.json")
    names = json.loads((data / "sites.json").read_text())
    return {Path(names[s]).name: {"global": row["SRV_FL_global_model.pt"], "personalized": row[s]}
            for s, row in sorted(matrix.items())}


def _stamp_if_old(pool: Path, echo) -> None:
    """A pool this study's own federation wrote before pools recorded digests: record them (the study made
    these files, so it can vouch for them; a pool from elsewhere is never stamped here)."""
    from fedharmony.methods.iopfl.model_pool import OLD_FORMATS, stamp_pool

    if json.loads((pool / "manifest.json").read_text()).get("format") in OLD_FORMATS:
        stamp_pool(pool, BUNDLE)
        echo(f"  {pool}: written before pools recorded digests; stamped")


def method_runs(results: dict) -> List[dict]:
    """The outside results as the study tool's runs: one entry per (method, seed) with ``site_scores`` (target ->
    mean Dice over its volumes) and ``made_on``, for the seeds where every target has the method. This is the
    view :mod:`fedharmony.study.report`'s tables and :mod:`fedharmony.study.analysis`'s verdicts read."""
    targets = results.get("targets", {})
    seeds = sorted({int(s) for by_seed in targets.values() for s in by_seed})
    runs = []
    for method in results.get("methods", []):
        for seed in seeds:
            entries = [by_seed.get(str(seed)) for by_seed in targets.values()]
            if any(e is None or method not in e["mean"] for e in entries):
                continue
            runs.append({"method": method, "seed": seed,
                         "site_scores": {t: float(by_seed[str(seed)]["mean"][method]) for t, by_seed in targets.items()},
                         "made_on": entries[0].get("made_on")})
    return runs


def load_outside_results(path) -> dict:
    """An outside study's ``results.json`` (a folder or the file), checked for what the report reads."""
    from fedharmony.study.report import _check_scores, read_results_file

    path, results = read_results_file(path)
    if results.get("study") != "outside":
        raise ValueError(f"{path} is not an outside study's results (no \"study\": \"outside\")")
    for key in ("target", "methods", "targets", "settings"):
        if key not in results:
            raise ValueError(f"{path} has no {key!r}")
    for target, by_seed in results["targets"].items():
        for seed, r in by_seed.items():
            where = f"{path}: targets[{target!r}][{seed!r}]"
            if not isinstance(r, dict) or not all(isinstance(r.get(k), dict) for k in ("per_volume", "mean")):
                raise ValueError(f"{where} needs per_volume and mean")
            _check_scores(r["mean"], f"{where} mean")
            for method, volumes in r["per_volume"].items():
                _check_scores(volumes, f"{where} per_volume[{method!r}]")
    return results


# ---------------------------------------------------------------------- the results of tools/iopfl_study.py
_LEGACY_SETTING = re.compile(r"phantom sites x (\d+) cases, (\d+) rounds x (\d+) local epochs, a = ([\d.]+), "
                             r"(\d+) adaptation passes")


def convert_legacy(legacy_file, out, profiles=None, command: str = "") -> dict:
    """Store the results of the retired ``tools/iopfl_study.py`` (one ``iopfl_study.json``) as an outside study
    in ``out``: one ``runs/<target>/seed<k>/result.json`` per stored (target, seed), numbers unchanged, keyed with
    the settings the study gets from the same options (so a rerun resumes from them), and ``results.json``.
    Those runs recorded what they were made on once for the whole study (its header): each gets that record,
    marked so. ``profiles``: the unseen scanners' file (an unseen study). Returns the results."""
    legacy = json.loads(Path(legacy_file).read_text())
    m = _LEGACY_SETTING.fullmatch(legacy["setting"])
    if not m:
        raise ValueError(f"{legacy_file}: unknown setting {legacy['setting']!r}")
    cases, rounds, epochs, alpha, passes = m.groups()
    kinds = [k for k in TARGETS if legacy.get(k)]
    if len(kinds) != 1:
        raise ValueError(f"{legacy_file}: holds {kinds or 'no'} outside results; a study has one kind")
    target = kinds[0]
    seeds = sorted({int(s) for by_seed in legacy[target].values() for s in by_seed})
    sweep = any(name in r["mean"] for by_seed in legacy[target].values() for r in by_seed.values() for name in SWEEP)
    study = OutsideStudy(target, max(seeds) + 1, out, profiles=profiles,
                         holdout=list(legacy[target]) if target == "loso" else None, cases=int(cases),
                         rounds=int(rounds), local_epochs=int(epochs), iop_alpha=float(alpha), passes=int(passes),
                         sweep=sweep, echo=lambda line: None)
    headers = [*legacy.get("earlier_headers", []), legacy["header"]]
    invocations = [_legacy_invocation(h) for h in headers]
    last = invocations[-1]
    record = None if not last["code_digest"] else {  # headers before runs recorded their code: not recorded
        "code": last["code_digest"], "commit": last["commit"], "dirty": None, "cpu": last["cpu"],
        "versions": last["versions"], "recorded": "once for the whole study, in tools/iopfl_study.py's header"}
    for name, by_seed in legacy[target].items():
        for seed, r in by_seed.items():
            entry = {**r, "target": name, "seed": int(seed), "settings_key": study.settings_key(name, int(seed)),
                     "made_on": record}
            _atomic_json(study.run_dir(name, int(seed)) / RESULT_FILE, entry)
    results = study._stored()
    results["inside"], results["cost"] = legacy.get("inside", {}), legacy.get("cost", {})
    results["invocations"] = [{k: v for k, v in i.items() if k not in ("code_digest", "commit")} for i in invocations]
    results["converted"] = f"from tools/iopfl_study.py's iopfl_study.json by `{command}`" if command else True
    results["wall_s"] = 0.0
    _atomic_json(study.out / RESULTS_FILE, results)
    return results


def _legacy_invocation(header: List[str]) -> dict:
    fields = dict(line.split(": ", 1) for line in header if ": " in line)
    code = re.match(r"(\S+) \(commit (\S+?)[,)]", fields.get("code", ""))
    machine = re.match(r"(.*?) \((.*)\), (Python [\d.]+), torch (\S+), monai (\S+), nvflare (\S+)$",
                       fields.get("machine", ""))
    return {"command": fields.get("command", ""), "code": fields.get("code"),
            "code_digest": code.group(1) if code else None, "commit": code.group(2) if code else None,
            "cpu": machine.group(2) if machine else None,
            "machine": f"{machine.group(1)}, {machine.group(3)}" if machine else fields.get("machine", "?"),
            "versions": {"torch": machine.group(4), "monai": machine.group(5), "nvflare": machine.group(6)}
            if machine else {}, "time": None}
